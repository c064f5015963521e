#!/usr/bin/env bash
# End to end: `qilin serve --tp 2` with ranks as processes.
#  1. --tp-launch process: the greedy completion equals --tp 1's; SIGKILL of the tp-worker makes
#     /v2/health/ready 503 naming the rank, and the server stops by itself with exit status 1.
#  2. `mpirun -np 2 qilin serve --tp-launch mpi` (where OpenMPI is installed): the same completion;
#     SIGTERM to both ranks (as a supervisor sends it) drains rank 0, which shuts rank 1 down:
#     mpirun exits 0 and no process is left. (SIGTERM to mpirun itself does the same, but mpirun
#     then reports status 1 for any job it was asked to stop.)
#   tests/e2e/run_tp_e2e.sh BUILD_DIR
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="${1:-$ROOT/build/release}"
QILIN="$BUILD/qilin"
[ -x "$QILIN" ] || { echo "tp e2e: $QILIN not built"; exit 1; }
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
LOG="$(mktemp)"
PID=""
cleanup() { [ -z "$PID" ] || kill -9 "$PID" 2>/dev/null || true; pkill -9 -f "$QILIN tp-worker" 2>/dev/null || true; }
trap cleanup EXIT
fail() { echo "tp e2e FAIL: $*"; echo "--- server log"; tail -30 "$LOG"; exit 1; }

# Starts `qilin serve` (or mpirun of it) with the arguments given, on fresh ports; sets PID, B.
start() {
  local port mport gport
  port=$(free_port); mport=$(free_port); gport=$(free_port)
  "$@" --device cpu --host 127.0.0.1 --http-port "$port" --metrics-port "$mport" \
    --grpc-port "$gport" --kv-cache-tokens 4096 >"$LOG" 2>&1 &
  PID=$!
  B="http://127.0.0.1:$port"
  for _ in $(seq 1 300); do
    curl -sf "$B/v2/health/ready" >/dev/null 2>&1 && return 0
    kill -0 "$PID" 2>/dev/null || fail "server died at start"
    sleep 0.1
  done
  fail "server not ready in 30 s"
}
complete() {
  curl -sf "$B/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model":"demo","prompt":"It is a truth universally acknowledged","max_tokens":12,"temperature":0,"ignore_eos":true}' |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["choices"][0]["text"])'
}
# Waits up to $2 seconds for $1 to exit and sets RC to its exit status; fails if it does not.
wait_exit() {
  for _ in $(seq 1 $(($2 * 10))); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$1" 2>/dev/null; then return 1; fi
  RC=0
  wait "$1" || RC=$?
}

start "$QILIN" serve "$ROOT/models/demo"
want=$(complete) || fail "tp 1 completion"
kill -TERM "$PID"
wait_exit "$PID" 20 || fail "tp 1 did not stop"
[ "$RC" = 0 ] || fail "tp 1 exit status $RC"

start "$QILIN" serve "$ROOT/models/demo" --tp 2 --tp-launch process
pgrep -f "$QILIN tp-worker" >/dev/null || fail "no tp-worker process"
got=$(complete) || fail "tp 2 process completion"
[ "$got" = "$want" ] || fail "tp 2 process: '$got' != tp 1's '$want'"
echo "tp e2e: --tp 2 --tp-launch process answers as --tp 1: '$got'"
pkill -9 -f "$QILIN tp-worker"
sleep 0.2
code=$(curl -s -o /tmp/tp_ready.$$ -w '%{http_code}' "$B/v2/health/ready" || true)
if [ "$code" = 503 ]; then
  grep -q "tensor parallel rank 1" /tmp/tp_ready.$$ || fail "ready 503 does not name the rank: $(cat /tmp/tp_ready.$$)"
fi
rm -f /tmp/tp_ready.$$
wait_exit "$PID" 10 || fail "server did not stop after its worker was killed"
[ "$RC" = 1 ] || fail "server exit status $RC after its worker was killed (want 1)"
grep -q "the model can no longer run (tensor parallel rank 1" "$LOG" || fail "no log line naming the lost rank"
PID=""
echo "tp e2e: a killed tp-worker stops the server with status 1 (ready was $code)"

if ! command -v mpirun >/dev/null 2>&1; then
  echo "tp e2e: mpirun not installed (openmpi-bin): the mpi launch is skipped"
  exit 0
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
start mpirun -np 2 "$QILIN" serve "$ROOT/models/demo" --tp-launch mpi --tp-master "127.0.0.1:$(free_port)"
got=$(complete) || fail "mpirun completion"
[ "$got" = "$want" ] || fail "mpirun -np 2: '$got' != tp 1's '$want'"
pkill -TERM -f "^$QILIN serve"
wait_exit "$PID" 30 || fail "mpirun did not stop after SIGTERM"
[ "$RC" = 0 ] || fail "mpirun exit status $RC after SIGTERM"
PID=""
sleep 0.2
! pgrep -f "$QILIN serve" >/dev/null || fail "a rank outlived mpirun"
echo "tp e2e: mpirun -np 2 answers as --tp 1 and stops cleanly"
echo "tp e2e: OK"
