// `qilin chat` streams, over gRPC (KServe v2 ModelStreamInfer on `ensemble`) and over HTTP
// (OpenAI SSE): the answer reaches stdout in several pieces while the process runs, and the
// whole equals the server's non-streamed greedy answer to the same prompt (/v1/completions or
// /v1/chat/completions, read here with fetch).
//   node chat_stream_check.mjs QILIN HOST:GRPC_PORT HTTP_URL API_KEY
import { spawn } from "node:child_process";

const [QILIN, GRPC, HTTP, KEY] = process.argv.slice(2);
const SYSTEM = "You are a helpful assistant.";
let failures = 0;
const check = (cond, what) => {
  if (!cond) {
    failures++;
    console.error(`  FAIL ${what}`);
  }
};

function run(args) {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const p = spawn(QILIN, ["chat", ...args]);
    const chunks = [];
    let err = "";
    p.stdout.on("data", (d) => chunks.push({ t: Date.now() - t0, s: d.toString("utf8") }));
    p.stderr.on("data", (d) => (err += d));
    p.on("close", (code) => resolve({ code, chunks, out: chunks.map((c) => c.s).join(""), err, t: Date.now() - t0 }));
  });
}
async function post(path, body) {
  const r = await fetch(`${HTTP}${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${KEY}` },
    body: JSON.stringify({ model: "demo", temperature: 0, ...body }),
  });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}
function streamed(name, r, want, minChunks) {
  check(r.code === 0, `${name}: exit ${r.code} ${r.err}`);
  check(r.out === want + "\n", `${name}: printed ${JSON.stringify(r.out)}, the server's answer is ${JSON.stringify(want)}`);
  const withText = r.chunks.filter((c) => c.s.length > 0);
  check(withText.length >= minChunks, `${name}: ${withText.length} pieces on stdout (streamed: >= ${minChunks})`);
  console.log(`chat: ${name}: ${r.out.length} chars in ${withText.length} pieces, first after ${r.chunks[0]?.t} ms, done ${r.t} ms`);
}

const PROMPT = "It is a truth universally acknowledged";
// gRPC, raw text: equals the OpenAI completion of the same text.
const comp = await post("/v1/completions", { prompt: PROMPT, max_tokens: 48 });
streamed("gRPC --raw", await run(["--grpc", GRPC, "--raw", "--temperature", "0", "--max-tokens", "48", PROMPT]),
         comp.choices[0].text, 3);
// gRPC, chat: the ChatML frame qilin chat renders equals the model's own chat template.
for (const msg of ["你好", "Hello"]) {
  const chat = await post("/v1/chat/completions", {
    messages: [{ role: "system", content: SYSTEM }, { role: "user", content: msg }], max_tokens: 24 });
  const want = chat.choices[0].message.content;
  streamed(`gRPC chat ${msg}`, await run(["--grpc", GRPC, "--system", SYSTEM, "--temperature", "0", "--max-tokens", "24", msg]), want, 2);
  streamed(`HTTP chat ${msg}`, await run(["--url", HTTP, "--api-key", KEY, "--system", SYSTEM, "--temperature", "0", "--max-tokens", "24", msg]), want, 2);
}
// Errors: one line naming the problem, exit 1.
let r = await run(["--grpc", GRPC, "--grpc-model", "nope", "x"]);
check(r.code === 1 && /unknown model 'nope'/.test(r.err), `unknown gRPC model: ${r.code} ${r.err}`);
r = await run(["--url", HTTP, "x"]);
check(r.code === 1 && /401|API key/.test(r.err), `HTTP without the API key: ${r.code} ${r.err}`);
if (failures) {
  console.error(`chat: ${failures} failure(s)`);
  process.exit(1);
}
console.log("chat: qilin chat streams over gRPC and HTTP");
