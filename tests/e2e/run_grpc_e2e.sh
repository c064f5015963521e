#!/usr/bin/env bash
# End-to-end test of qilin's KServe v2 gRPC service and of its gRPC clients: `qilin serve` with
# the demo model on free loopback ports, then
#   - tests/e2e/grpc_e2e.mjs (@grpc/grpc-js + @grpc/proto-loader on proto/*.proto),
#   - `qilin chat` streaming over gRPC (--grpc) and over HTTP (--url),
#   - examples/python/kserve_grpc_client.py where python3-grpcio + grpc_tools exist,
# then SIGTERM -> exit 0.
#   tests/e2e/run_grpc_e2e.sh BUILD_DIR
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="${1:-$ROOT/build/release}"
QILIN="$BUILD/qilin"
[ -x "$QILIN" ] || { echo "grpc e2e: $QILIN not built"; exit 1; }
command -v node >/dev/null || { echo "grpc e2e: node is missing (bash scripts/setup.sh)"; exit 1; }
if [ ! -d "$HERE/node_modules/@grpc/grpc-js" ]; then
  (cd "$HERE" && npm ci --no-audit --no-fund --silent) ||
    { echo "grpc e2e: npm ci failed in tests/e2e (@grpc/grpc-js is needed)"; exit 1; }
fi

free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
PORT=$(free_port)
GPORT=$(free_port)
MPORT=$(free_port)
while [ "$GPORT" = "$PORT" ]; do GPORT=$(free_port); done
while [ "$MPORT" = "$PORT" ] || [ "$MPORT" = "$GPORT" ]; do MPORT=$(free_port); done
LOG="$(mktemp)"
KEY="e2e-key-$RANDOM"
"$QILIN" serve "$ROOT/models/demo" --device cpu --host 127.0.0.1 --http-port "$PORT" \
  --grpc-port "$GPORT" --metrics-port "$MPORT" --kv-cache-tokens 65536 --max-batch-size 32 \
  --api-key "$KEY" --no-access-log >"$LOG" 2>&1 &
PID=$!
cleanup() { kill -9 "$PID" 2>/dev/null || true; rm -f "$LOG" "$LOG".*; }
trap cleanup EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { echo "grpc e2e: server died:"; cat "$LOG"; exit 1; }
  sleep 0.1
done
fail() { echo "grpc e2e FAIL: $*"; echo "--- server log"; tail -30 "$LOG"; exit 1; }
echo "grpc e2e: server pid $PID, HTTP $PORT, gRPC $GPORT, metrics $MPORT"

node "$HERE/grpc_e2e.mjs" "127.0.0.1:$GPORT" "http://127.0.0.1:$MPORT/metrics" \
  "http://127.0.0.1:$PORT" "$KEY" || fail "grpc_e2e.mjs"

# --- qilin chat streams, over gRPC and over HTTP: the answer arrives in pieces (several reads
# with text, timed by the client) and equals the non-streamed greedy answer.
if [ -f "$HERE/chat_stream_check.mjs" ]; then
  node "$HERE/chat_stream_check.mjs" "$QILIN" "127.0.0.1:$GPORT" "http://127.0.0.1:$PORT" "$KEY" ||
    fail "qilin chat streaming"
fi

# --- the Python example client (plain grpcio), where Debian's python3-grpcio is installed.
# Debian's packages serve /usr/bin/python3, which may not be the python3 first on PATH.
PY=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import grpc, grpc_tools' 2>/dev/null; then PY="$p"; break; fi
done
if [ -n "$PY" ]; then
  "$PY" "$ROOT/examples/python/kserve_grpc_client.py" --url "127.0.0.1:$GPORT" \
    --text "It is a truth universally acknowledged" --max-tokens 8 --streaming --requests 3 \
    >"$LOG.py" 2>&1 ||
    { cat "$LOG.py"; fail "examples/python/kserve_grpc_client.py"; }
  grep -q "final response for 3 of 3 requests" "$LOG.py" ||
    { cat "$LOG.py"; fail "python client: not every request got its final response"; }
  echo "grpc e2e: python grpcio client ok"
else
  echo "grpc e2e: python3-grpcio / python3-grpc-tools missing: the Python example is not run"
fi

# --- qilin bench against this server (HTTP and gRPC) and in-process: every request completes
# with exactly --output-len tokens, and (HTTP) the server's own counter of generated tokens
# grows by the same amount (qilin_generation_tokens_total counts the OpenAI API's requests).
gen_tokens() {
  curl -s "http://127.0.0.1:$MPORT/metrics" | awk '/^qilin_generation_tokens_total/ {s += $NF} END {print s + 0}'
}
check_bench() {  # NAME FILE REQUESTS OUTPUT_LEN
  node -e '
const [file, n, len] = [process.argv[1], +process.argv[2], +process.argv[3]];
const j = JSON.parse(require("fs").readFileSync(file, "utf8"));
const bad = [];
if (j.completed !== n || j.failed !== 0) bad.push(`completed ${j.completed} failed ${j.failed} ${j.errors}`);
if (j.output_tokens !== n * len) bad.push(`output tokens ${j.output_tokens}, want ${n * len}`);
for (const k of ["ttft_ms", "itl_ms", "tpot_ms", "e2e_latency_ms"]) {
  const d = j[k];
  if (!(d.p50 > 0 && d.p50 <= d.p90 && d.p90 <= d.p99 && d.p99 <= d.max)) bad.push(`${k} ${JSON.stringify(d)}`);
}
if (!(j.request_throughput > 0 && j.output_throughput > 0)) bad.push("throughput");
if (bad.length) { console.error(bad.join("\n")); process.exit(1); }
console.log(`${j.setup.mode}: ${j.completed} requests, ${j.output_throughput.toFixed(1)} output tok/s, TTFT p50 ${j.ttft_ms.p50.toFixed(1)} ms, ITL p50 ${j.itl_ms.p50.toFixed(1)} ms`);
' "$2" "$3" "$4" || fail "bench $1: $(cat "$2")"
}
before=$(gen_tokens)
"$QILIN" bench --url "http://127.0.0.1:$PORT" --api-key "$KEY" --num-requests 12 --input-len 48 \
  --output-len 16 --concurrency 4 --json >"$LOG.bench" 2>&1 || fail "bench --url: $(cat "$LOG.bench")"
check_bench http "$LOG.bench" 12 16
after=$(gen_tokens)
[ "$((after - before))" = $((12 * 16)) ] ||
  fail "the server generated $((after - before)) tokens for the HTTP bench run, want $((12 * 16))"
"$QILIN" bench --grpc "127.0.0.1:$GPORT" --num-requests 12 --input-len 48 --output-len 16 \
  --request-rate 30 --json >"$LOG.bench" 2>&1 || fail "bench --grpc: $(cat "$LOG.bench")"
check_bench grpc "$LOG.bench" 12 16
"$QILIN" bench --model "$ROOT/models/demo" --device cpu --num-requests 12 --input-len 48 \
  --output-len 16 --range-ratio 0 --concurrency 6 --json >"$LOG.bench" 2>/dev/null ||
  fail "bench --model: $(cat "$LOG.bench")"
check_bench offline "$LOG.bench" 12 16
echo "grpc e2e: qilin bench (HTTP, gRPC, in-process) ok"

kill -TERM "$PID"
for _ in $(seq 1 150); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID" 2>/dev/null && fail "still running 15 s after SIGTERM"
wait "$PID" && rc=0 || rc=$?
[ "$rc" = 0 ] || fail "exit code $rc after SIGTERM"
echo "grpc e2e: all passed"
