#!/usr/bin/env bash
# On the GPU machine, over what tools/device/pack.sh put in .dev/gpu: the serving figures of
# docs/performance.md for the Qwen2.5-7B shape (random bf16 weights made on the GPU, the demo's
# Qwen tokenizer):
#   1. `qilin serve` over HTTP (OpenAI streaming completions), 128 in / 128 out, TTFT and
#      inter-token latency at concurrency 1, 16, 64, 256 (`qilin bench --url`);
#   2. 1000 requests of 1024 in / 256 out submitted at once, the engine in-process;
#   3. transformers' batched generate() (64 x 128 in / 256 out) for the side-by-side.
# Builds nothing. Usage: tools/device/serve-bench.sh [config dir]; logs and JSON go to $OUT.
set -uo pipefail
G="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$G/../.." && pwd)"
OUT="${OUT:-/tmp/qilin-serve-out}"
CONFIG="${1:-$G/configs/qwen2.5-7b}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$G/lib:${LD_LIBRARY_PATH:-}"
Q="$G/qilin"
PORT=18000
nvidia-smi -L | tee "$OUT/device.txt"

"$Q" serve "$CONFIG" --dummy-weights --tokenizer "$ROOT/models/demo" --device cuda \
  --served-model-name qwen7b --http-port $PORT --grpc-port 18001 --metrics-port 18002 \
  --no-access-log >"$OUT/serve.log" 2>&1 &
SERVER=$!
ready() { python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/v2/health/ready', timeout=2)" 2>/dev/null; }
for _ in $(seq 1 240); do
  ready && break
  kill -0 $SERVER 2>/dev/null || break
  sleep 0.5
done
ready || { echo "server did not start"; tail -20 "$OUT/serve.log"; exit 1; }
grep -E "KV pool|model '" "$OUT/serve.log"
for c in 1 16 64 256; do
  n=$((c * 4)); [ $n -lt 16 ] && n=16
  timeout 200 "$Q" bench --url "http://127.0.0.1:$PORT" --served-model-name qwen7b \
    --num-requests $n --concurrency $c --input-len 128 --output-len 128 --vocab-size 30000 \
    --json >"$OUT/http_c$c.json" 2>"$OUT/http_c$c.log"
  echo "http concurrency $c: rc=$?"
done
kill -TERM $SERVER; wait $SERVER

timeout 300 "$Q" bench --model "$CONFIG" --dummy-weights --device cuda --num-requests 1000 \
  --input-len 1024 --output-len 256 --json >"$OUT/offline_1000.json" 2>"$OUT/offline_1000.log"
echo "offline 1000 x 1024/256: rc=$?"
[ -f "$G/torch_baseline.py" ] && timeout 200 python3 "$G/torch_baseline.py" "$CONFIG" --batched \
  >"$OUT/torch_batched.log" 2>&1

echo; echo "== summary ($(head -1 "$OUT/device.txt"))"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print(f"{'workload':34} {'req':>5} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  ms")
rows = [(f"HTTP 128/128 concurrency {c}", f"http_c{c}.json") for c in (1, 16, 64, 256)]
rows.append(("offline 1000 x 1024/256", "offline_1000.json"))
for name, f in rows:
    p = os.path.join(out, f)
    try:
        j = json.load(open(p))
    except Exception as e:
        print(f"{name:34} (no result: {e})"); continue
    print(f"{name:34} {j['completed']:5d} {j['output_throughput']:10.0f} {j['ttft_ms']['p50']:9.1f} "
          f"{j['ttft_ms']['p99']:9.1f} {j['itl_ms']['p50']:8.2f} {j['itl_ms']['p99']:8.2f}"
          + (f"  failed {j['failed']}" if j['failed'] else ""))
PY
tail -n 1 "$OUT/torch_batched.log" 2>/dev/null
