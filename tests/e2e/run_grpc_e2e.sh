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
if python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
  python3 "$ROOT/examples/python/kserve_grpc_client.py" --url "127.0.0.1:$GPORT" \
    --text "It is a truth universally acknowledged" --max-tokens 8 --streaming >"$LOG.py" 2>&1 ||
    { cat "$LOG.py"; fail "examples/python/kserve_grpc_client.py"; }
  grep -q "final response" "$LOG.py" || { cat "$LOG.py"; fail "python client: no final response"; }
  echo "grpc e2e: python grpcio client ok"
else
  echo "grpc e2e: python3-grpcio / python3-grpc-tools missing: the Python example is not run"
fi

kill -TERM "$PID"
for _ in $(seq 1 150); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID" 2>/dev/null && fail "still running 15 s after SIGTERM"
wait "$PID" && rc=0 || rc=$?
[ "$rc" = 0 ] || fail "exit code $rc after SIGTERM"
echo "grpc e2e: all passed"
