#!/usr/bin/env bash
# End-to-end test of `qilin serve` with the demo model: curl on every endpoint (SSE read raw),
# promtool on /metrics, the official openai SDK, a bad-input suite, a 500-stream load test with
# random disconnects (KV blocks back to zero, RSS flat), then SIGTERM -> exit 0.
#   tests/e2e/run_e2e.sh BUILD_DIR
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="${1:-$ROOT/build/release}"
QILIN="$BUILD/qilin"
[ -x "$QILIN" ] || { echo "e2e: $QILIN not built"; exit 1; }
command -v node >/dev/null || { echo "e2e: node is missing (bash scripts/setup.sh)"; exit 1; }
if [ ! -d "$HERE/node_modules/openai" ]; then
  (cd "$HERE" && npm ci --no-audit --no-fund --silent) ||
    { echo "e2e: npm ci failed in tests/e2e (the openai SDK is needed)"; exit 1; }
fi

free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
PORT=$(free_port)
MPORT=$(free_port)
while [ "$MPORT" = "$PORT" ]; do MPORT=$(free_port); done
GPORT=$(free_port)
while [ "$GPORT" = "$PORT" ] || [ "$GPORT" = "$MPORT" ]; do GPORT=$(free_port); done
LOG="$(mktemp)"
KEY="e2e-key-$RANDOM"
"$QILIN" serve "$ROOT/models/demo" --device cpu --host 127.0.0.1 --http-port "$PORT" \
  --metrics-port "$MPORT" --grpc-port "$GPORT" --kv-cache-tokens 65536 --max-batch-size 64 --max-queue 256 \
  --header-timeout-ms 2000 --max-body-bytes 1000000 --api-key "$KEY" --no-access-log \
  >"$LOG" 2>&1 &
PID=$!
REPO_PID=""
cleanup() {
  kill -9 "$PID" 2>/dev/null || true
  [ -z "$REPO_PID" ] || kill -9 "$REPO_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { echo "e2e: server died:"; cat "$LOG"; exit 1; }
  sleep 0.1
done
B="http://127.0.0.1:$PORT"
AUTH=(-H "Authorization: Bearer $KEY")
fail() { echo "e2e FAIL: $*"; echo "--- server log"; tail -30 "$LOG"; exit 1; }
echo "e2e: server pid $PID on $PORT (metrics $MPORT)"

# --- curl on every endpoint
[ "$(curl -s -o /dev/null -w '%{http_code}' "$B/v2/health/live")" = 200 ] || fail "live"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$B/v2/health/ready")" = 200 ] || fail "ready"
curl -sf "${AUTH[@]}" "$B/v1/models" | grep -q '"id":"demo"' || fail "/v1/models lists demo"
curl -sf "${AUTH[@]}" "$B/v1/models" | grep -q '"id":"ensemble"' || fail "/v1/models lists ensemble"
out=$(curl -sf "${AUTH[@]}" "$B/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model":"demo","prompt":"It is a truth","max_tokens":5,"temperature":0}')
echo "$out" | grep -q '"completion_tokens":5' || fail "completions usage: $out"
out=$(curl -sf "${AUTH[@]}" "$B/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"你好"}],"max_tokens":6}')
echo "$out" | grep -q '"object":"chat.completion"' || fail "chat: $out"
# SSE, raw: every event is "data: ..." followed by a blank line; the last is [DONE]. The reply
# is sampled: ignore_eos keeps a sampled end of turn from ending it before its 8 tokens.
curl -sN "${AUTH[@]}" "$B/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":8,"stream":true,
       "ignore_eos":true,"stream_options":{"include_usage":true}}' >"$LOG.sse"
node -e '
const s = require("fs").readFileSync(process.argv[1], "utf8");
if (!s.endsWith("data: [DONE]\n\n")) throw new Error("no [DONE] at the end");
const events = s.split("\n\n"); events.pop();
let role = false, usage = null, finish = null;
for (const e of events) {
  if (!e.startsWith("data: ") || e.includes("\n")) throw new Error("bad event framing: " + JSON.stringify(e));
  if (e === "data: [DONE]") continue;
  const j = JSON.parse(e.slice(6));
  if (j.object !== "chat.completion.chunk") throw new Error("object " + j.object);
  for (const c of j.choices) { if (c.delta.role === "assistant") role = true; if (c.finish_reason) finish = c.finish_reason; }
  if (j.usage) usage = j.usage;
}
if (!role || finish !== "length" || !usage || usage.completion_tokens !== 8) throw new Error("stream content " + s);
'  "$LOG.sse" || fail "SSE framing: $(cat "$LOG.sse")"
curl -sN "${AUTH[@]}" "$B/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt":"Emma","max_tokens":4,"stream":true}' >"$LOG.sse"
[ "$(tail -c 14 "$LOG.sse" | od -An -c | tr -d ' ')" = 'data:[DONE]\n\n' ] ||
  fail "completions SSE does not end with [DONE]: $(cat "$LOG.sse")"
curl -s "http://127.0.0.1:$MPORT/metrics" >"$LOG.metrics"
promtool check metrics <"$LOG.metrics" || fail "promtool check metrics"
grep -q '^nv_inference_request_success{model="demo",version="1"} [1-9]' "$LOG.metrics" ||
  fail "nv_inference_request_success"
echo "e2e: curl + SSE + promtool ok"

# --- KServe v2 / Triton over HTTP, with curl
code() { curl -s -o /dev/null -w '%{http_code}' "${AUTH[@]}" "$@"; }
J=(-H 'Content-Type: application/json')
curl -sf "${AUTH[@]}" "$B/v2" | grep -q '"name":"qilin"' || fail "/v2 server metadata"
for m in ensemble tensorrt_llm preprocessing postprocessing; do
  [ "$(code "$B/v2/models/$m/ready")" = 200 ] || fail "/v2/models/$m/ready"
  curl -sf "${AUTH[@]}" "$B/v2/models/$m" | grep -q "\"name\":\"$m\"" || fail "/v2/models/$m metadata"
  curl -sf "${AUTH[@]}" "$B/v2/models/$m/config" | grep -q "\"name\":\"$m\"" || fail "/v2/models/$m/config"
done
[ "$(code "$B/v2/models/nope/ready")" = 404 ] || fail "unknown model ready -> 404"
# Shapes are JSON numbers, as Triton writes them.
curl -sf "${AUTH[@]}" "$B/v2/models/ensemble" | grep -q '"name":"text_input","datatype":"BYTES","shape":\[-1,-1\]' ||
  fail "ensemble metadata shapes: $(curl -s "${AUTH[@]}" "$B/v2/models/ensemble")"
curl -sf "${AUTH[@]}" "$B/v2/models/tensorrt_llm/config" | grep -q '"dims":\[-1\]' || fail "config dims numbers"
# The same greedy continuation four ways: OpenAI completions, the ensemble's generate, the
# ensemble's infer (JSON tensors), and preprocessing -> tensorrt_llm -> postprocessing by hand.
openai_text=$(curl -sf "${AUTH[@]}" "$B/v1/completions" "${J[@]}" \
  -d '{"prompt":"It is a truth universally","max_tokens":8,"temperature":0}' | node -pe 'JSON.parse(require("fs").readFileSync(0)).choices[0].text')
gen=$(curl -sf "${AUTH[@]}" "$B/v2/models/ensemble/generate" "${J[@]}" \
  -d '{"text_input":"It is a truth universally","max_tokens":8,"temperature":0,"top_k":1,"random_seed":1,"stream":false}')
gen_text=$(echo "$gen" | node -pe 'JSON.parse(require("fs").readFileSync(0)).text_output')
[ -n "$gen_text" ] && [ "$gen_text" = "$openai_text" ] || fail "ensemble generate '$gen_text' != completions '$openai_text'"
echo "$gen" | grep -q '"model_name":"ensemble"' || fail "generate model_name: $gen"
inf=$(curl -sf "${AUTH[@]}" "$B/v2/models/ensemble/infer" "${J[@]}" -d '{"id":"r1","inputs":[
  {"name":"text_input","datatype":"BYTES","shape":[1,1],"data":["It is a truth universally"]},
  {"name":"max_tokens","datatype":"INT32","shape":[1,1],"data":[8]},
  {"name":"top_k","datatype":"INT32","shape":[1,1],"data":[1]}],"outputs":[{"name":"text_output"}]}')
inf_text=$(echo "$inf" | node -pe 'const j=JSON.parse(require("fs").readFileSync(0)); if (j.id!=="r1"||j.outputs[0].name!=="text_output"||j.outputs[0].datatype!=="BYTES") throw j; j.outputs[0].data[0]')
[ "$inf_text" = "$openai_text" ] || fail "ensemble infer '$inf_text' != '$openai_text' ($inf)"
pre=$(curl -sf "${AUTH[@]}" "$B/v2/models/preprocessing/infer" "${J[@]}" -d '{"inputs":[
  {"name":"QUERY","datatype":"BYTES","shape":[1,1],"data":["It is a truth universally"]},
  {"name":"REQUEST_OUTPUT_LEN","datatype":"INT32","shape":[1,1],"data":[8]}]}')
ids=$(echo "$pre" | node -pe 'JSON.stringify(JSON.parse(require("fs").readFileSync(0)).outputs.find(o=>o.name==="INPUT_ID").data)')
nids=$(echo "$ids" | node -pe 'JSON.parse(require("fs").readFileSync(0)).length')
llm=$(curl -sf "${AUTH[@]}" "$B/v2/models/tensorrt_llm/generate" "${J[@]}" \
  -d "{\"input_ids\":$ids,\"input_lengths\":$nids,\"request_output_len\":8,\"return_log_probs\":true}")
out_ids=$(echo "$llm" | node -pe 'const j=JSON.parse(require("fs").readFileSync(0)); if (j.sequence_length!==8||j.output_log_probs.length!==8||!(j.cum_log_probs<0)) throw j; JSON.stringify(j.output_ids)')
post=$(curl -sf "${AUTH[@]}" "$B/v2/models/postprocessing/infer" "${J[@]}" -d "{\"inputs\":[
  {\"name\":\"TOKENS_BATCH\",\"datatype\":\"INT32\",\"shape\":[1,1,8],\"data\":$out_ids},
  {\"name\":\"SEQUENCE_LENGTH\",\"datatype\":\"INT32\",\"shape\":[1,1],\"data\":[8]}]}")
post_text=$(echo "$post" | node -pe 'JSON.parse(require("fs").readFileSync(0)).outputs.find(o=>o.name==="OUTPUT").data[0]')
[ "$post_text" = "$openai_text" ] || fail "pre -> tensorrt_llm -> post '$post_text' != '$openai_text' ($pre | $llm | $post)"
# generate_stream, raw SSE: "data: {...}" events whose text_output pieces add up to the text.
curl -sN "${AUTH[@]}" "$B/v2/models/ensemble/generate_stream" "${J[@]}" \
  -d '{"text_input":"It is a truth universally","max_tokens":8,"top_k":1}' >"$LOG.sse"
node -e '
const s = require("fs").readFileSync(process.argv[1], "utf8");
if (!s.endsWith("\n\n")) throw new Error("no blank line at the end");
const events = s.split("\n\n"); events.pop();
if (events.length < 1) throw new Error("no event: " + s);
let text = "";
for (const e of events) {
  if (!e.startsWith("data: ") || e.includes("\n")) throw new Error("bad event framing: " + JSON.stringify(e));
  const j = JSON.parse(e.slice(6));
  if (j.model_name !== "ensemble" || typeof j.text_output !== "string") throw new Error("event " + e);
  text += j.text_output;
}
if (text !== process.argv[2]) throw new Error(JSON.stringify(text) + " != " + JSON.stringify(process.argv[2]));
' "$LOG.sse" "$openai_text" || fail "generate_stream: $(cat "$LOG.sse")"
curl -sN "${AUTH[@]}" "$B/v2/models/tensorrt_llm/generate_stream" "${J[@]}" \
  -d "{\"input_ids\":$ids,\"input_lengths\":$nids,\"request_output_len\":96,\"end_id\":151935}" >"$LOG.sse"
# Tokens made faster than the client reads them go out together (8 tokens of the demo model can
# be one event on an idle machine), so streaming is checked on 96 tokens without an end token.
[ "$(grep -c '^data: {"model_name":"tensorrt_llm"' "$LOG.sse")" -ge 2 ] || fail "tensorrt_llm stream: $(cat "$LOG.sse")"
curl -sN "${AUTH[@]}" "$B/v2/models/ensemble/generate_stream" "${J[@]}" \
  -d '{"text_input":"It is a truth universally","max_tokens":96,"end_id":151935}' >"$LOG.sse"
[ "$(grep -c '^data: {"model_name":"ensemble"' "$LOG.sse")" -ge 2 ] || fail "ensemble stream: $(cat "$LOG.sse")"
# Errors: Triton's {"error": "..."} naming the bad input, with the right status.
r=$(curl -s -w ' %{http_code}' "${AUTH[@]}" "$B/v2/models/ensemble/generate" "${J[@]}" -d '{"text_input":"x","max_tokens":-3}')
[[ "$r" == *max_tokens*" 400" ]] || fail "negative max_tokens: $r"
r=$(curl -s -w ' %{http_code}' "${AUTH[@]}" "$B/v2/models/ensemble/generate" "${J[@]}" -d '{"text_input":"x","max_tokens":3,"colour":1}')
[[ "$r" == *colour*" 400" ]] || fail "unknown input: $r"
r=$(curl -s -w ' %{http_code}' "${AUTH[@]}" "$B/v2/models/ensemble/infer" "${J[@]}" -d '{"inputs":[{"name":"text_input","datatype":"BYTES","shape":[1,2],"data":["x"]}]}')
[[ "$r" == *shape*" 400" ]] || fail "shape mismatch: $r"
r=$(curl -s -w ' %{http_code}' "${AUTH[@]}" "$B/v2/models/nope/generate" "${J[@]}" -d '{}')
[[ "$r" == *nope*" 404" ]] || fail "unknown model: $r"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$B/v2/models/ensemble/generate" -d '{}')" = 401 ] || fail "/v2 needs the key"
curl -s "http://127.0.0.1:$MPORT/metrics" >"$LOG.metrics"
grep -q '^nv_inference_request_success{model="ensemble",version="1"} [1-9]' "$LOG.metrics" ||
  fail "ensemble requests in nv_inference_request_success"
echo "e2e: KServe v2 HTTP (infer, generate, generate_stream, metadata, config) ok"

# --- openai SDK, bad input, load
node "$HERE/e2e.mjs" "$B" "http://127.0.0.1:$MPORT" "$PID" "$KEY" || fail "node suite"

# --- graceful stop
kill -TERM "$PID"
for _ in $(seq 1 150); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$PID" 2>/dev/null; then fail "still running 15 s after SIGTERM"; fi
wait "$PID" && rc=0 || rc=$?
[ "$rc" = 0 ] || fail "exit code $rc after SIGTERM"
grep -q "serve: stopped" "$LOG" || fail "no 'stopped' line"

# --- a port in use is one line and exit 1
node -e 'require("net").createServer().listen(process.argv[1],"127.0.0.1",()=>setTimeout(()=>process.exit(0),8000))' "$PORT" &
HOLD=$!
sleep 0.5
set +e
msg=$("$QILIN" serve "$ROOT/models/demo" --host 127.0.0.1 --http-port "$PORT" --metrics-port "$MPORT" 2>&1)
rc=$?
set -e
kill "$HOLD" 2>/dev/null || true
[ "$rc" = 1 ] || fail "port in use: exit $rc"
[ "$msg" = "qilin serve: error: port $PORT is in use (--http-port to choose another)" ] ||
  fail "port in use message: $msg"

# --- a Triton model repository written by `qilin repo init`, served as such
REPO="$(mktemp -d)/repo"
"$QILIN" repo init --model "$ROOT/models/demo" --out "$REPO" --max-batch-size 8 \
  --max-tokens-in-paged-kv-cache 8192 >/dev/null || fail "repo init"
for m in ensemble preprocessing tensorrt_llm postprocessing; do
  [ -f "$REPO/$m/config.pbtxt" ] || fail "repo init wrote no $m/config.pbtxt"
done
! grep -rq '\${' "$REPO" || fail "repo init left \${...} placeholders"
"$QILIN" serve "$REPO" --device cpu --host 127.0.0.1 --http-port "$PORT" --metrics-port "$MPORT" \
  --grpc-port "$GPORT" >"$LOG.repo" 2>&1 &
REPO_PID=$!
for _ in $(seq 1 600); do
  curl -sf "$B/v2/health/ready" >/dev/null 2>&1 && break
  kill -0 "$REPO_PID" 2>/dev/null || { cat "$LOG.repo"; fail "repository server died"; }
  sleep 0.1
done
grep -q "Triton model repository" "$LOG.repo" || fail "not served as a repository: $(head "$LOG.repo")"
curl -sf "$B/v2/models/tensorrt_llm/config" | grep -q '"max_batch_size":8' || fail "repo max_batch_size"
grep -q "KV pool 256 blocks x 32 tokens = 8192 tokens" "$LOG.repo" ||
  fail "max_tokens_in_paged_kv_cache not honoured: $(grep 'KV pool' "$LOG.repo")"
repo_text=$(curl -sf "$B/v2/models/ensemble/generate" "${J[@]}" \
  -d '{"text_input":"It is a truth universally","max_tokens":8,"top_k":1}' | node -pe 'JSON.parse(require("fs").readFileSync(0)).text_output')
[ "$repo_text" = "$openai_text" ] || fail "repository ensemble '$repo_text' != '$openai_text'"
kill -TERM "$REPO_PID"
wait "$REPO_PID" && rc=0 || rc=$?
[ "$rc" = 0 ] || fail "repository server exit code $rc after SIGTERM"
REPO_PID=""
echo "e2e: repository from qilin repo init served ok"
echo "e2e: all passed"
