// The Node part of the e2e suite: the official openai SDK against qilin serve, a bad-input
// suite (each answer checked for its status and OpenAI error shape, the server still serving
// after), and a load test of 500 concurrent streams with random disconnects.
//   node e2e.mjs BASE_URL METRICS_URL SERVER_PID API_KEY
import OpenAI from "openai";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";

const [BASE, METRICS, PID, KEY] = process.argv.slice(2);
const url = new URL(BASE);
const client = new OpenAI({ baseURL: `${BASE}/v1`, apiKey: KEY, maxRetries: 0, timeout: 60000 });
let failures = 0;
function check(cond, what) {
  if (!cond) {
    failures++;
    console.error(`  FAIL ${what}`);
  }
}
async function section(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
  } catch (e) {
    failures++;
    console.error(`  FAIL ${name}: ${e.stack || e}`);
  }
  console.log(`e2e: ${name} (${Date.now() - t0} ms)`);
}

// ---------------------------------------------------------------------------------------------
// openai SDK

await section("openai SDK", async () => {
  const models = await client.models.list();
  check(models.data.some((m) => m.id === "demo"), "models.list has demo");

  const chat = await client.chat.completions.create({
    model: "demo",
    messages: [{ role: "user", content: "Tell me about Mr. Darcy." }],
    max_tokens: 12,
    temperature: 0,
  });
  check(chat.choices.length === 1, "chat one choice");
  check(typeof chat.choices[0].message.content === "string", "chat content");
  check(chat.usage.completion_tokens <= 12 && chat.usage.prompt_tokens > 5, "chat usage");

  // Greedy is deterministic: streamed text equals the non-streamed text.
  const stream = await client.chat.completions.create({
    model: "demo",
    messages: [{ role: "user", content: "Tell me about Mr. Darcy." }],
    max_tokens: 12,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  let finish = null;
  for await (const chunk of stream) {
    for (const c of chunk.choices) {
      text += c.delta.content ?? "";
      if (c.finish_reason) finish = c.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  check(text === chat.choices[0].message.content, `stream text equals non-stream (${JSON.stringify(text)})`);
  check(finish === chat.choices[0].finish_reason, "stream finish reason");
  check(usage && usage.completion_tokens === chat.usage.completion_tokens, "stream usage");

  const comp = await client.completions.create({
    model: "demo",
    prompt: "It is a truth universally acknowledged",
    max_tokens: 10,
    temperature: 0,
    logprobs: 2,
  });
  const lp = comp.choices[0].logprobs;
  check(lp && lp.tokens.length === comp.usage.completion_tokens, "completion logprobs per token");
  check(lp.token_logprobs.every((x) => x <= 0), "logprobs <= 0");
  check(lp.top_logprobs.every((t) => Object.keys(t).length >= 1 && Object.keys(t).length <= 2), "top 2");
  // Greedy: the chosen token is the most likely one.
  check(lp.token_logprobs.every((x, i) => Math.max(...Object.values(lp.top_logprobs[i])) <= x + 1e-4),
        "greedy token is the top logprob");

  const cstream = await client.completions.create({
    model: "demo", prompt: "It is a truth universally acknowledged", max_tokens: 10,
    temperature: 0, stream: true,
  });
  let ctext = "";
  for await (const chunk of cstream) ctext += chunk.choices.map((c) => c.text).join("");
  check(ctext === comp.choices[0].text, "completion stream equals non-stream");

  // stop: the answer ends right before the stop string.
  const full = comp.choices[0].text;
  const stopAt = full.slice(Math.floor(full.length / 2), Math.floor(full.length / 2) + 2);
  if (stopAt.trim().length > 0) {
    const stopped = await client.completions.create({
      model: "demo", prompt: "It is a truth universally acknowledged", max_tokens: 10,
      temperature: 0, stop: [stopAt],
    });
    check(stopped.choices[0].text === full.slice(0, full.indexOf(stopAt)), `stop string (${JSON.stringify(stopAt)})`);
    check(stopped.choices[0].finish_reason === "stop", "stop finish reason");
  }

  // n and seed: n choices; the same seed gives the same samples.
  const req = { model: "demo", messages: [{ role: "user", content: "Emma" }], max_tokens: 8,
                temperature: 1, n: 3, seed: 42 };
  const a = await client.chat.completions.create(req);
  const b = await client.chat.completions.create(req);
  check(a.choices.length === 3 && a.choices.map((c) => c.index).join() === "0,1,2", "n=3 choices");
  check(JSON.stringify(a.choices.map((c) => c.message.content)) ===
        JSON.stringify(b.choices.map((c) => c.message.content)), "same seed, same samples");

  const withLp = await client.chat.completions.create({
    model: "demo", messages: [{ role: "user", content: "Hi" }], max_tokens: 4, logprobs: true,
    top_logprobs: 3,
  });
  const content = withLp.choices[0].logprobs.content;
  check(content.length === withLp.usage.completion_tokens, "chat logprobs per token");
  check(content.every((t) => t.top_logprobs.length === 3 && Array.isArray(t.bytes)), "top_logprobs 3");

  // Errors through the SDK: its typed exceptions carry our status.
  try {
    await client.chat.completions.create({ model: "gpt-9", messages: [{ role: "user", content: "x" }] });
    check(false, "unknown model must fail");
  } catch (e) {
    check(e.status === 404 && e.code === "model_not_found", `unknown model -> 404 (${e.status})`);
  }
  const bad = new OpenAI({ baseURL: `${BASE}/v1`, apiKey: "wrong", maxRetries: 0 });
  try {
    await bad.models.list();
    check(false, "wrong key must fail");
  } catch (e) {
    check(e.status === 401, `wrong key -> 401 (${e.status})`);
  }
});

// ---------------------------------------------------------------------------------------------
// Bad input: raw HTTP, every answer has the OpenAI error shape, the server keeps serving.

function raw(method, path, body, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: url.hostname, port: url.port, method, path,
      headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json", ...headers } },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
      });
    req.on("error", reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

async function expectError(what, status, path, body, words, headers) {
  const r = await raw("POST", path, body, headers);
  check(r.status === status, `${what}: status ${r.status}, want ${status} (${r.body.slice(0, 200)})`);
  let j = null;
  try { j = JSON.parse(r.body); } catch { /* checked below */ }
  check(j && j.error && typeof j.error.message === "string" && "type" in j.error &&
        "param" in j.error && "code" in j.error, `${what}: OpenAI error shape (${r.body.slice(0, 200)})`);
  if (words && j && j.error) check(j.error.message.includes(words), `${what}: message names '${words}': ${j.error.message}`);
}

await section("bad input", async () => {
  const C = "/v1/chat/completions";
  const msg = (extra) => JSON.stringify({ messages: [{ role: "user", content: "x" }], ...extra });
  await expectError("malformed JSON", 400, C, "{\"messages\": [", "JSON");
  await expectError("not an object", 400, C, "[]", "object");
  await expectError("messages wrong type", 400, C, JSON.stringify({ messages: "hi" }), "messages");
  await expectError("max_tokens wrong type", 400, C, msg({ max_tokens: "5" }), "max_tokens");
  await expectError("negative max_tokens", 400, C, msg({ max_tokens: -5 }), "max_tokens");
  await expectError("huge max_tokens", 400, C, msg({ max_tokens: 1e12 }), "max_tokens");
  await expectError("max_tokens over the context", 400, C, msg({ max_tokens: 100000 }), "512");
  await expectError("temperature wrong type", 400, C, msg({ temperature: "hot" }), "temperature");
  await expectError("unknown model", 404, C, msg({ model: "nope" }), "nope");
  await expectError("prompt over the limit", 400, "/v1/completions",
    JSON.stringify({ prompt: "word ".repeat(1000), max_tokens: 4 }), "512");
  await expectError("token id out of range", 400, "/v1/completions",
    JSON.stringify({ prompt: [1, 99999999], max_tokens: 4 }), "99999999");
  // Invalid UTF-8 inside a JSON string.
  const invalid = Buffer.concat([Buffer.from("{\"prompt\":\"a"), Buffer.from([0xff, 0xfe]), Buffer.from("\"}")]);
  await expectError("invalid UTF-8", 400, "/v1/completions", invalid, "JSON");
  await expectError("oversize body", 413, C, "x".repeat(1_200_000), "limit");
  await expectError("wrong API key", 401, C, msg({}), "API key", { Authorization: "Bearer nope" });
  await expectError("missing API key", 401, C, msg({}), "API key", { Authorization: "" });
  const nf = await raw("GET", "/v1/nothing");
  check(nf.status === 404, `unknown route -> 404 (${nf.status})`);
  const wm = await raw("GET", "/v1/chat/completions");
  check(wm.status === 405, `wrong method -> 405 (${wm.status})`);

  // Slowloris: a request that never finishes its headers is cut at the header timeout (2 s).
  const t0 = Date.now();
  const closed = await new Promise((resolve) => {
    const s = net.connect(url.port, url.hostname, () => s.write("POST /v1/completions HTTP/1.1\r\nHost: x\r\n"));
    let data = "";
    s.on("data", (d) => (data += d));
    s.on("close", () => resolve(data));
    s.on("error", () => {});
    setTimeout(() => { s.destroy(); resolve("still open"); }, 8000);
  });
  check(closed.startsWith("HTTP/1.1 408"), `slowloris -> 408 then close (${JSON.stringify(closed.slice(0, 40))})`);
  check(Date.now() - t0 < 6000, "slowloris cut within the timeout");

  const ok = await client.chat.completions.create({ model: "demo", messages: [{ role: "user", content: "still there?" }], max_tokens: 3 });
  check(ok.choices.length === 1, "serves after the bad inputs");
});

// ---------------------------------------------------------------------------------------------
// Load: 500 concurrent streams, a third disconnecting at random moments.

async function metrics() {
  const r = await fetch(`${METRICS}/metrics`);
  const text = await r.text();
  const get = (name) => {
    const m = text.match(new RegExp(`^${name}(\\{[^}]*\\})? (\\S+)$`, "m"));
    return m ? Number(m[2]) : NaN;
  };
  return { used: get("qilin_kv_cache_blocks_used"), running: get("qilin_num_requests_running"),
           waiting: get("qilin_num_requests_waiting"), active: get("qilin_active_requests"),
           rejected: get("qilin_request_rejected_total") };
}
function rssKb() {
  const m = fs.readFileSync(`/proc/${PID}/status`, "utf8").match(/VmRSS:\s+(\d+)/);
  return Number(m[1]);
}

function streamOnce(i, disconnectAfterMs) {
  return new Promise((resolve) => {
    const body = JSON.stringify({ messages: [{ role: "user", content: `Story ${i % 37}` }],
      max_tokens: 16 + (i % 17), temperature: 0.8, stream: true });
    const req = http.request({ host: url.hostname, port: url.port, method: "POST",
      path: "/v1/chat/completions", agent: false,
      headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" } }, (res) => {
      let data = "";
      res.on("data", (d) => {
        data += d;
        if (disconnectAfterMs === 0) { req.destroy(); resolve({ status: res.statusCode, cut: true }); }
      });
      res.on("end", () => resolve({ status: res.statusCode, done: data.endsWith("data: [DONE]\n\n"), data }));
      res.on("error", () => resolve({ status: res.statusCode, cut: true }));
    });
    req.on("error", (e) => resolve({ status: 0, error: String(e), cut: disconnectAfterMs !== null }));
    req.end(body);
    if (disconnectAfterMs) setTimeout(() => { req.destroy(); resolve({ cut: true }); }, disconnectAfterMs);
  });
}

await section("load: 500 streams with random disconnects", async () => {
  // Warm the allocator, then take RSS.
  await Promise.all(Array.from({ length: 50 }, (_, i) => streamOnce(i, null)));
  const rss0 = rssKb();
  const results = await Promise.all(Array.from({ length: 500 }, (_, i) => {
    const r = Math.random();
    const cut = r < 0.15 ? 0 : r < 0.33 ? Math.floor(Math.random() * 1500) : null;
    return streamOnce(i, cut);
  }));
  let ok = 0, cut = 0, rejected = 0, bad = [];
  for (const r of results) {
    if (r.cut) cut++;
    else if (r.status === 200 && r.done) ok++;
    else if (r.status === 429) rejected++;
    else bad.push(r);
  }
  console.log(`  500 streams: ${ok} complete, ${cut} disconnected on purpose, ${rejected} 429`);
  check(bad.length === 0, `no errors beyond 429: ${JSON.stringify(bad.slice(0, 3)).slice(0, 500)}`);
  check(ok > 200, "most streams complete");
  // Idle again: every KV block back, nothing running.
  let m;
  for (let i = 0; i < 100; i++) {
    m = await metrics();
    if (m.used === 0 && m.running === 0 && m.waiting === 0 && m.active === 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  check(m.used === 0, `KV blocks used after the load: ${m.used}`);
  check(m.running === 0 && m.waiting === 0 && m.active === 0, `idle after the load: ${JSON.stringify(m)}`);
  // Once more, then RSS must be flat (allocator noise allowed).
  await Promise.all(Array.from({ length: 500 }, (_, i) => streamOnce(i, Math.random() < 0.3 ? Math.floor(Math.random() * 800) : null)));
  for (let i = 0; i < 100; i++) {
    m = await metrics();
    if (m.used === 0 && m.active === 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const rss1 = rssKb();
  console.log(`  RSS ${rss0} kB -> ${rss1} kB after 1000 streams; KV blocks used ${m.used}`);
  check(m.used === 0, "KV blocks all free after the second round");
  check(rss1 - rss0 < 64 * 1024, `RSS flat (grew ${rss1 - rss0} kB)`);
});

if (failures) {
  console.error(`e2e: ${failures} failure(s)`);
  process.exit(1);
}
console.log("e2e: node suite passed");
