// KServe v2 gRPC end to end with clients nobody here wrote: @grpc/grpc-js + @grpc/proto-loader
// load the project's proto/*.proto and drive a running `qilin serve`: health and metadata,
// ModelInfer on `tensorrt_llm` (token ids) and `ensemble` (text), ModelStreamInfer with several
// requests in flight on one stream (ids, decoupled per-token responses, the final-response
// flags Triton sets), errors as gRPC status codes, and cancelling a stream freeing its request.
//   node grpc_e2e.mjs HOST:GRPC_PORT METRICS_URL HTTP_URL API_KEY
// Expected values come from the server's other protocol (the OpenAI HTTP API, greedy) and from
// the model's own tokenizer files read here, not from the gRPC path under test.
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "../..");
const [TARGET, METRICS, HTTP_BASE, KEY] = process.argv.slice(2);

const def = protoLoader.loadSync(path.join(ROOT, "proto/grpc_service.proto"), {
  includeDirs: [path.join(ROOT, "proto")],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const inference = grpc.loadPackageDefinition(def).inference;
const client = new inference.GRPCInferenceService(TARGET, grpc.credentials.createInsecure(), {
  "grpc.max_receive_message_length": 64 << 20,
});

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
  console.log(`grpc e2e: ${name} (${Date.now() - t0} ms)`);
}
const unary = (method, req) =>
  new Promise((resolve, reject) =>
    client[method](req, { deadline: Date.now() + 60000 }, (err, resp) => (err ? reject(err) : resolve(resp))),
  );
async function expectCode(promise, code, what) {
  try {
    await promise;
    check(false, `${what}: succeeded, expected ${code}`);
    return null;
  } catch (e) {
    check(e.code === grpc.status[code], `${what}: code ${e.code} (${e.details}), expected ${code}`);
    return e;
  }
}

// ---- tensors (the wire layout written from the KServe v2 spec) ----------------------------

const int32 = (name, values, shape) => ({
  name, datatype: "INT32", shape, contents: { int_contents: values },
});
const bytes = (name, values, shape) => ({
  name, datatype: "BYTES", shape, contents: { bytes_contents: values.map((v) => Buffer.from(v)) },
});
const boolT = (name, v) => ({ name, datatype: "BOOL", shape: [1, 1], contents: { bool_contents: [v] } });

// Decodes an output (raw_output_contents or typed contents) to a JS array.
function output(resp, name) {
  const i = resp.outputs.findIndex((o) => o.name === name);
  if (i < 0) return undefined;
  const o = resp.outputs[i];
  const raw = resp.raw_output_contents?.[i];
  if (raw && raw.length !== undefined && resp.raw_output_contents.length) {
    const buf = Buffer.from(raw);
    if (o.datatype === "BYTES") {
      const out = [];
      for (let p = 0; p < buf.length; ) {
        const n = buf.readUInt32LE(p);
        out.push(buf.subarray(p + 4, p + 4 + n).toString("utf8"));
        p += 4 + n;
      }
      return out;
    }
    if (o.datatype === "INT32") return Array.from({ length: buf.length / 4 }, (_, k) => buf.readInt32LE(4 * k));
    if (o.datatype === "INT64") return Array.from({ length: buf.length / 8 }, (_, k) => Number(buf.readBigInt64LE(8 * k)));
    if (o.datatype === "FP32") return Array.from({ length: buf.length / 4 }, (_, k) => buf.readFloatLE(4 * k));
    throw new Error(`output ${name}: datatype ${o.datatype}`);
  }
  const c = o.contents;
  if (o.datatype === "BYTES") return c.bytes_contents.map((b) => Buffer.from(b).toString("utf8"));
  if (o.datatype === "INT32") return c.int_contents;
  if (o.datatype === "FP32") return c.fp32_contents;
  throw new Error(`output ${name}: datatype ${o.datatype}`);
}
const isFinal = (r) => r.parameters?.triton_final_response?.bool_param === true;

// ---- the references: the OpenAI HTTP API of the same server ---------------------------------

async function httpCompletion(prompt, maxTokens) {
  const r = await fetch(`${HTTP_BASE}/v1/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${KEY}` },
    body: JSON.stringify({ model: "demo", prompt, max_tokens: maxTokens, temperature: 0, ignore_eos: true }),
  });
  if (!r.ok) throw new Error(`HTTP reference: ${r.status} ${await r.text()}`);
  return (await r.json()).choices[0].text;
}
async function httpTokenize(text) {
  // The tokenizer's own vocab: ids of the prompt via the HTTP /v2 preprocessing model.
  const r = await fetch(`${HTTP_BASE}/v2/models/preprocessing/infer`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${KEY}` },
    body: JSON.stringify({
      inputs: [
        { name: "QUERY", datatype: "BYTES", shape: [1, 1], data: [text] },
        { name: "REQUEST_OUTPUT_LEN", datatype: "INT32", shape: [1, 1], data: [1] },
      ],
    }),
  });
  if (!r.ok) throw new Error(`HTTP preprocessing: ${r.status} ${await r.text()}`);
  const j = await r.json();
  return j.outputs.find((o) => o.name === "INPUT_ID").data.flat(Infinity);
}
async function metric(name) {
  const text = await (await fetch(METRICS)).text();
  const line = text.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "{"));
  return line ? Number(line.split(" ").pop()) : NaN;
}

// ---- stream helper: one bidi stream, responses collected per request id ---------------------

function openStream() {
  const call = client.ModelStreamInfer();
  const byId = new Map();
  const waiters = new Map();
  const all = [];
  let ended = null;
  call.on("data", (r) => {
    all.push(r);
    const id = r.infer_response?.id ?? "";
    if (!byId.has(id)) byId.set(id, []);
    byId.get(id).push(r);
    const last = r.error_message || isFinal(r.infer_response);
    if (last && waiters.has(id)) waiters.get(id)();
  });
  call.on("error", (e) => { ended = e; for (const w of waiters.values()) w(); });
  call.on("end", () => { ended = ended ?? "end"; for (const w of waiters.values()) w(); });
  const done = (id, ms = 120000) =>
    new Promise((resolve, reject) => {
      const list = () => byId.get(id) ?? [];
      const finished = () => list().some((r) => r.error_message || isFinal(r.infer_response));
      if (finished()) return resolve(list());
      const t = setTimeout(() => reject(new Error(`request ${id}: no final response in ${ms} ms`)), ms);
      waiters.set(id, () => {
        if (finished() || ended) {
          clearTimeout(t);
          resolve(list());
        }
      });
    });
  return { call, byId, all, done, ended: () => ended };
}

// ---- tests -------------------------------------------------------------------------------------

await section("health and metadata", async () => {
  check((await unary("ServerLive", {})).live === true, "ServerLive");
  check((await unary("ServerReady", {})).ready === true, "ServerReady");
  const md = await unary("ServerMetadata", {});
  check(md.name === "qilin" && md.version.length > 0, `ServerMetadata name/version ${md.name} ${md.version}`);
  for (const m of ["ensemble", "tensorrt_llm", "preprocessing", "postprocessing"]) {
    check((await unary("ModelReady", { name: m })).ready === true, `ModelReady ${m}`);
  }
  const em = await unary("ModelMetadata", { name: "ensemble" });
  check(em.name === "ensemble" && em.versions.includes("1"), "ModelMetadata ensemble name/versions");
  const ti = em.inputs.find((t) => t.name === "text_input");
  check(ti && ti.datatype === "BYTES", "ensemble text_input BYTES");
  check(em.outputs.some((t) => t.name === "text_output" && t.datatype === "BYTES"), "ensemble text_output");
  const lm = await unary("ModelMetadata", { name: "tensorrt_llm" });
  for (const n of ["input_ids", "input_lengths", "request_output_len"]) {
    check(lm.inputs.some((t) => t.name === n && t.datatype === "INT32"), `tensorrt_llm input ${n}`);
  }
  for (const n of ["output_ids", "sequence_length"]) {
    check(lm.outputs.some((t) => t.name === n), `tensorrt_llm output ${n}`);
  }
  const cfg = await unary("ModelConfig", { name: "tensorrt_llm" });
  check(cfg.config.name === "tensorrt_llm", "ModelConfig name");
  check(cfg.config.model_transaction_policy?.decoupled === true, "tensorrt_llm decoupled");
  check(cfg.config.parameters?.gpt_model_type?.string_value !== undefined, "ModelConfig gpt_model_type parameter");
  const ens = await unary("ModelConfig", { name: "ensemble" });
  check(ens.config.platform === "ensemble" && ens.config.ensemble_scheduling.step.length >= 3,
        "ensemble config has its steps");
  await expectCode(unary("ModelReady", { name: "nope" }), "NOT_FOUND", "ModelReady unknown");
  await expectCode(unary("ModelMetadata", { name: "nope" }), "NOT_FOUND", "ModelMetadata unknown");
  await expectCode(unary("ModelConfig", { name: "nope" }), "NOT_FOUND", "ModelConfig unknown");
});

const PROMPT = "It is a truth universally acknowledged";
const N = 8;
let promptIds = null;
let referenceText = null;

await section("ModelInfer tensorrt_llm and ensemble", async () => {
  promptIds = await httpTokenize(PROMPT);
  check(promptIds.length > 3, `prompt ids ${promptIds}`);
  referenceText = await httpCompletion(PROMPT, N);
  // tensorrt_llm: ids in, ids out (greedy: no sampling inputs).
  const r = await unary("ModelInfer", {
    model_name: "tensorrt_llm",
    id: "llm-1",
    inputs: [
      int32("input_ids", promptIds, [1, promptIds.length]),
      int32("input_lengths", [promptIds.length], [1, 1]),
      int32("request_output_len", [N], [1, 1]),
      int32("end_id", [151935], [1, 1]),  // no end token: exactly N tokens
    ],
  });
  check(r.id === "llm-1" && r.model_name === "tensorrt_llm", "ModelInfer id / model_name echoed");
  const ids = output(r, "output_ids");
  const seq = output(r, "sequence_length");
  check(Array.isArray(ids) && seq && seq[0] === ids.length, `sequence_length ${seq} = ${ids?.length} ids`);
  check(ids.length === N, `tensorrt_llm made ${ids?.length} ids, asked ${N}`);
  // The same ids through postprocessing give the HTTP completion's text.
  const post = await unary("ModelInfer", {
    model_name: "postprocessing",
    inputs: [int32("TOKENS_BATCH", ids, [1, 1, ids.length]), int32("SEQUENCE_LENGTH", [ids.length], [1, 1])],
  });
  const text = output(post, "OUTPUT")[0];
  check(text === referenceText, `ids -> text ${JSON.stringify(text)} equals HTTP ${JSON.stringify(referenceText)}`);

  // ensemble: text in, text out, equal to the OpenAI completion (both greedy).
  const e = await unary("ModelInfer", {
    model_name: "ensemble",
    id: "ens-1",
    inputs: [bytes("text_input", [PROMPT], [1, 1]), int32("max_tokens", [N], [1, 1]),
             int32("end_id", [151935], [1, 1])],
  });
  check(e.id === "ens-1", "ensemble id");
  const out = output(e, "text_output");
  check(out && out.length === 1 && out[0] === referenceText,
        `ensemble text_output ${JSON.stringify(out)} equals HTTP ${JSON.stringify(referenceText)}`);
  // Requested outputs: only those come back.
  const only = await unary("ModelInfer", {
    model_name: "tensorrt_llm",
    inputs: [int32("input_ids", promptIds, [1, promptIds.length]), int32("input_lengths", [promptIds.length], [1, 1]),
             int32("request_output_len", [2], [1, 1])],
    outputs: [{ name: "sequence_length" }],
  });
  check(only.outputs.length === 1 && only.outputs[0].name === "sequence_length", "requested outputs only");
});

await section("errors as gRPC status", async () => {
  const good = () => [bytes("text_input", ["Hi"], [1, 1]), int32("max_tokens", [2], [1, 1])];
  let e = await expectCode(unary("ModelInfer", { model_name: "nope", inputs: good() }), "NOT_FOUND", "unknown model");
  check(e && /nope/.test(e.details), "NOT_FOUND names the model");
  e = await expectCode(unary("ModelInfer", { model_name: "ensemble", inputs: [int32("max_tokens", [2], [1, 1])] }),
    "INVALID_ARGUMENT", "missing text_input");
  check(e && /text_input/.test(e.details), `missing input named: ${e?.details}`);
  // Shape says 4 elements, contents hold 1.
  e = await expectCode(unary("ModelInfer", { model_name: "ensemble",
    inputs: [bytes("text_input", ["Hi"], [1, 4]), int32("max_tokens", [2], [1, 1])] }),
    "INVALID_ARGUMENT", "shape/contents mismatch");
  check(e && /text_input/.test(e.details), `shape error names the input: ${e?.details}`);
  // A FP32 tensor where INT32 token ids belong.
  e = await expectCode(unary("ModelInfer", { model_name: "tensorrt_llm", inputs: [
    { name: "input_ids", datatype: "FP32", shape: [1, 2], contents: { fp32_contents: [1, 2] } },
    int32("input_lengths", [2], [1, 1]), int32("request_output_len", [2], [1, 1])] }),
    "INVALID_ARGUMENT", "wrong datatype");
  check(e && /input_ids/.test(e.details) && /INT32/.test(e.details), `datatype error: ${e?.details}`);
  e = await expectCode(unary("ModelInfer", { model_name: "ensemble",
    inputs: [bytes("text_input", ["Hi"], [1, 1]), int32("max_tokens", [2], [1, 1]), int32("bogus", [1], [1, 1])] }),
    "INVALID_ARGUMENT", "unknown input");
  check(e && /bogus/.test(e.details), "unknown input named");
  e = await expectCode(unary("ModelInfer", { model_name: "ensemble",
    inputs: [bytes("text_input", ["Hi"], [1, 1]), int32("max_tokens", [-5], [1, 1])] }),
    "OUT_OF_RANGE", "negative max_tokens");
  check(e && /max_tokens/.test(e.details), "max_tokens named");
  await expectCode(unary("ModelInfer", { model_name: "tensorrt_llm", inputs: [
    int32("input_ids", [1, 2, 3], [1, 3]), int32("input_lengths", [7], [1, 1]), int32("request_output_len", [2], [1, 1])] }),
    "OUT_OF_RANGE", "input_lengths over input_ids");
  await expectCode(unary("ModelInfer", { model_name: "ensemble",
    inputs: [...good(), boolT("stream", true)] }), "INVALID_ARGUMENT", "stream=true on unary ModelInfer");
  await expectCode(unary("ModelInfer", { model_name: "ensemble", model_version: "7", inputs: good() }),
    "NOT_FOUND", "unknown version");
  // A prompt over the model's length limit.
  const long = "word ".repeat(20000);
  e = await expectCode(unary("ModelInfer", { model_name: "ensemble",
    inputs: [bytes("text_input", [long], [1, 1]), int32("max_tokens", [2], [1, 1])] }),
    "INVALID_ARGUMENT", "prompt over the limit");
  // The server still serves.
  check((await unary("ServerLive", {})).live === true, "live after errors");
});

await section("ModelStreamInfer: several requests in flight on one stream", async () => {
  const s = openStream();
  const prompts = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome,", "Mr. Darcy", "Elizabeth"];
  const refs = await Promise.all(prompts.map((p) => httpCompletion(p, N)));
  prompts.forEach((p, i) => {
    const req = {
      model_name: "ensemble",
      id: `req-${i}`,
      inputs: [bytes("text_input", [p], [1, 1]), int32("max_tokens", [N], [1, 1]),
               int32("end_id", [151935], [1, 1]), boolT("stream", true)],
    };
    // The last two ask for an empty final response.
    if (i >= 2) req.parameters = { triton_enable_empty_final_response: { bool_param: true } };
    s.call.write(req);
  });
  // And one tensorrt_llm request on the same stream, streaming ids.
  s.call.write({
    model_name: "tensorrt_llm", id: "ids-0",
    inputs: [int32("input_ids", promptIds, [1, promptIds.length]), int32("input_lengths", [promptIds.length], [1, 1]),
             int32("request_output_len", [N], [1, 1]), int32("end_id", [151935], [1, 1]), boolT("streaming", true)],
  });
  const results = await Promise.all([...prompts.map((_, i) => s.done(`req-${i}`)), s.done("ids-0")]);
  s.call.end();
  // Interleaving: responses of different requests alternate on the stream (in flight together).
  const order = s.all.map((r) => r.infer_response.id);
  let switches = 0;
  for (let i = 1; i < order.length; ++i) if (order[i] !== order[i - 1]) ++switches;
  check(switches >= prompts.length, `responses interleave (${switches} switches in ${order.length})`);
  prompts.forEach((p, i) => {
    const rs = results[i];
    check(rs.every((r) => !r.error_message), `req-${i} no error: ${rs.map((r) => r.error_message).join(";")}`);
    check(rs.every((r) => r.infer_response.id === `req-${i}` && r.infer_response.model_name === "ensemble"),
          `req-${i} responses carry its id`);
    const finals = rs.filter((r) => isFinal(r.infer_response));
    check(finals.length === 1 && isFinal(rs[rs.length - 1].infer_response), `req-${i} one final, last`);
    check(rs.slice(0, -1).every((r) => r.infer_response.parameters?.triton_final_response?.bool_param === false),
          `req-${i} non-final responses say triton_final_response=false`);
    const text = rs.map((r) => output(r.infer_response, "text_output")?.[0] ?? "").join("");
    check(text === refs[i], `req-${i} streamed text ${JSON.stringify(text)} equals HTTP ${JSON.stringify(refs[i])}`);
    const withText = rs.filter((r) => (output(r.infer_response, "text_output")?.[0] ?? "") !== "");
    check(withText.length >= 3, `req-${i} decoupled: ${withText.length} responses with text (per token)`);
    if (i >= 2) {
      const last = rs[rs.length - 1].infer_response;
      check(last.outputs.length === 0, `req-${i} empty final response has no outputs (${last.outputs.length})`);
    } else {
      check(output(rs[rs.length - 1].infer_response, "text_output") !== undefined, `req-${i} final carries data`);
    }
  });
  const ids = results[prompts.length];
  const streamedIds = ids.flatMap((r) => output(r.infer_response, "output_ids") ?? []);
  check(streamedIds.length === N, `tensorrt_llm streamed ${streamedIds.length} ids, asked ${N}`);
  check(ids.filter((r) => (output(r.infer_response, "output_ids") ?? []).length > 0).length >= 3,
        "tensorrt_llm streamed in several responses");
  await new Promise((r) => setTimeout(r, 200));
  check(s.ended() === "end", `stream ended cleanly after the client's end (${s.ended()})`);
});

await section("ModelStreamInfer: errors on the stream", async () => {
  const s = openStream();
  s.call.write({ model_name: "nope", id: "bad-model", inputs: [bytes("text_input", ["x"], [1, 1])] });
  s.call.write({ model_name: "ensemble", id: "bad-shape",
                 inputs: [bytes("text_input", ["x"], [1, 3]), int32("max_tokens", [2], [1, 1])] });
  s.call.write({ model_name: "ensemble", id: "good", inputs: [bytes("text_input", ["Emma"], [1, 1]),
                 int32("max_tokens", [3], [1, 1]), boolT("stream", true)] });
  const [bm, bs, good] = await Promise.all([s.done("bad-model"), s.done("bad-shape"), s.done("good")]);
  s.call.end();
  check(bm.length === 1 && /unknown model 'nope'/.test(bm[0].error_message), `stream unknown model: ${bm[0]?.error_message}`);
  check(bs.length === 1 && /text_input/.test(bs[0].error_message), `stream bad shape: ${bs[0]?.error_message}`);
  check(good.every((r) => !r.error_message) && isFinal(good[good.length - 1].infer_response),
        "a good request after errors on the same stream completes");
});

await section("ModelStreamInfer: cancel frees the request", async () => {
  const s = openStream();
  s.call.on("error", () => {});
  for (let i = 0; i < 3; ++i) {
    s.call.write({ model_name: "ensemble", id: `long-${i}`, inputs: [bytes("text_input", ["Once upon a time"], [1, 1]),
                   int32("max_tokens", [480], [1, 1]), int32("end_id", [151935], [1, 1]), boolT("stream", true)] });
  }
  // Wait until all three are generating (the demo model holds 512 positions: 480 new tokens
  // take seconds), then cancel the stream.
  const t0 = Date.now();
  while (new Set(s.all.map((r) => r.infer_response.id)).size < 3 && Date.now() - t0 < 60000) {
    await new Promise((r) => setTimeout(r, 20));
  }
  check(s.all.every((r) => !r.error_message), `long requests run (${s.all.find((r) => r.error_message)?.error_message})`);
  const running = await metric("qilin_num_requests_running");
  check(running >= 3, `3 requests running before cancel (${running})`);
  s.call.cancel();
  let blocks = NaN, run = NaN;
  for (let i = 0; i < 100; ++i) {
    await new Promise((r) => setTimeout(r, 100));
    run = await metric("qilin_num_requests_running");
    blocks = await metric("qilin_kv_cache_blocks_used");
    if (run === 0 && blocks === 0) break;
  }
  check(run === 0, `no request running after the cancel (${run})`);
  check(blocks === 0, `KV blocks back to 0 after the cancel (${blocks})`);
  const got = s.all.length;
  check(got < 3 * 480 / 2, `the cancelled requests stopped early (${got} responses)`);
  check(!s.all.some((r) => isFinal(r.infer_response)), "no request had finished when the stream was cancelled");
  check((await unary("ServerReady", {})).ready === true, "ready after cancel");
});

await section("ModelInfer: a client that goes away cancels the generation", async () => {
  // 480 tokens take 0.3 s (an idle 2-core machine) to seconds on the demo model; the client
  // gives up after 100 ms.
  const req = { model_name: "ensemble", inputs: [bytes("text_input", ["Once upon a time"], [1, 1]),
                int32("max_tokens", [480], [1, 1]), int32("end_id", [151935], [1, 1])] };
  const steps0 = await metric("qilin_engine_steps_total");
  const calls = [0, 1].map(() => new Promise((resolve) =>
    client.ModelInfer(req, { deadline: Date.now() + 100 }, (err) => resolve(err))));
  const errs = await Promise.all(calls);
  check(errs.every((e) => e && e.code === grpc.status.DEADLINE_EXCEEDED),
        `deadline exceeded (${errs.map((e) => e && e.code)})`);
  let run = NaN, blocks = NaN;
  for (let i = 0; i < 50; ++i) {
    run = await metric("qilin_num_requests_running");
    blocks = await metric("qilin_kv_cache_blocks_used");
    if (run === 0 && blocks === 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  check(run === 0 && blocks === 0, `requests cancelled and blocks freed (running ${run}, blocks ${blocks})`);
  // Run to their end, the two would take 480 decode steps; cancelled, far fewer ran.
  const steps = (await metric("qilin_engine_steps_total")) - steps0;
  check(steps < 400, `the engine stopped the cancelled generations (${steps} steps of 480)`);
});

client.close();
if (failures) {
  console.error(`grpc e2e: ${failures} failure(s)`);
  process.exit(1);
}
console.log("grpc e2e: all passed");
