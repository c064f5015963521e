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
LOG="$(mktemp)"
KEY="e2e-key-$RANDOM"
"$QILIN" serve "$ROOT/models/demo" --device cpu --host 127.0.0.1 --http-port "$PORT" \
  --metrics-port "$MPORT" --kv-cache-tokens 65536 --max-batch-size 64 --max-queue 256 \
  --header-timeout-ms 2000 --max-body-bytes 1000000 --api-key "$KEY" --no-access-log \
  >"$LOG" 2>&1 &
PID=$!
cleanup() { kill -9 "$PID" 2>/dev/null || true; }
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
# SSE, raw: every event is "data: ..." followed by a blank line; the last is [DONE].
curl -sN "${AUTH[@]}" "$B/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":8,"stream":true,
       "stream_options":{"include_usage":true}}' >"$LOG.sse"
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
echo "e2e: all passed"
