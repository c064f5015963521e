#!/usr/bin/env bash
# On the GPU machine, from the repository root, over what tools/device/pack.sh put in .dev/gpu:
# every GPU test, compute-sanitizer memcheck and racecheck over the GPU tests, `qilin generate
# --device cuda`, and the benchmark; a short table at the end. Builds nothing. Logs go to $OUT.
# QILIN_SKIP_TOKENIZER=1 leaves out the tokenizer benchmarks.
set -uo pipefail
G="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/qilin-gpu-out}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$G/lib:${LD_LIBRARY_PATH:-}"
export QILIN_FIXTURES_DIR="$G/fixtures"
# NCCL (tensor parallelism) comes with the CUDA toolkit here; where the image lacks it, take the one
# PyTorch ships in its nvidia-nccl wheel.
if ldd "$G/qilin_cuda_tests" | grep -q "libnccl.*not found"; then
  NCCL_LIB="$(python3 -c 'import glob, site; print(next(iter(sorted(g for p in site.getsitepackages() for g in glob.glob(p + "/nvidia/**/libnccl.so.2", recursive=True))), ""))' 2>/dev/null)"
  [ -n "$NCCL_LIB" ] && export LD_LIBRARY_PATH="$(dirname "$NCCL_LIB"):$LD_LIBRARY_PATH"
  echo "libnccl from $NCCL_LIB"
fi
# QILIN_GPU_PART=checks runs the tests and sanitizers only, =bench the benchmarks only (each fits
# one 10-minute device call); the default runs both.
PART="${QILIN_GPU_PART:-all}"
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
declare -A RES
nvidia-smi -L | tee "$OUT/device.txt"
run() {  # name, timeout seconds, command...
  local name=$1 t=$2
  shift 2
  local start=$(date +%s)
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  RES[$name]="rc=$rc $(( $(date +%s) - start ))s"
  echo "== $name: rc=$rc"; tail -n 25 "$OUT/$name.log"
}
# How many JSON lines' token_ids of two `qilin generate` logs agree: agree A B LABEL.
agree() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
def rows(p):
    return [json.loads(l)["token_ids"] for l in open(p) if l.startswith("{")]
a, b = rows(sys.argv[1]), rows(sys.argv[2])
same = sum(x == y for x, y in zip(a, b))
print(f"{same}/{len(a)} requests identical {sys.argv[3]} (of {len(b)})")
PY
}
if [ "$PART" != bench ]; then
run tests 240 "$G/qilin_cuda_tests"
if [ -n "$SAN" ]; then
  run memcheck 200 "$SAN" --tool memcheck --error-exitcode 9 "$G/qilin_cuda_tests" \
    --gtest_filter='CudaOps.*:CudaSampling.*:CudaBackend.*:Fixtures/CudaGoldenTest.*/qwen2:Fixtures/CudaGoldenTest.*/qwen3'
  # QILIN_RACECHECK_FILTER narrows it to the kernels a change touched (the attention tests alone
  # take minutes under racecheck).
  run racecheck 300 "$SAN" --tool racecheck --error-exitcode 9 "$G/qilin_cuda_tests" \
    --gtest_filter="${QILIN_RACECHECK_FILTER:-CudaOps.PagedAttention*:CudaOps.AddRmsNorm*:CudaOps.RopeWriteKv*:CudaOps.SiluMul*:CudaSampling.*}"
else
  RES[memcheck]="compute-sanitizer not found"
fi
printf '{"prompt_ids":[1,2,3,4,5],"max_tokens":8}\n' >"$OUT/prompts.jsonl"
run generate 120 "$G/qilin" generate --model "$G/configs/qwen2.5-0.5b" --dummy-weights \
  --prompts-jsonl "$OUT/prompts.jsonl" --ignore-eos
# The engine on the GPU: 24 prompts batched together vs one at a time (--max-batch-size 1), greedy.
python3 - "$OUT/engine_prompts.jsonl" <<'PY'
import json, random, sys
random.seed(5)
with open(sys.argv[1], "w") as f:
    for i in range(24):
        n = random.randint(1, 40)
        f.write(json.dumps({"prompt_ids": [random.randrange(503) for _ in range(n)],
                            "max_tokens": random.randint(1, 24)}) + "\n")
PY
run engine_batched 120 "$G/qilin" generate --device cuda --model "$G/fixtures/golden/qwen2" \
  --prompts-jsonl "$OUT/engine_prompts.jsonl" --ignore-eos --max-num-tokens 64 --block-size 8
cp "$OUT/engine_batched.log" "$OUT/engine_batched.out"
run engine_alone 120 "$G/qilin" generate --device cuda --model "$G/fixtures/golden/qwen2" \
  --prompts-jsonl "$OUT/engine_prompts.jsonl" --ignore-eos --max-batch-size 1 --block-size 8
RES[engine_agree]="$(agree "$OUT/engine_batched.log" "$OUT/engine_alone.log" "batched vs alone")"
# Tensor parallelism with ranks as processes on this GPU (both ranks share it: staged collectives
# over the TCP group), against the batched run above.
run engine_tp2_process 180 "$G/qilin" generate --device cuda --model "$G/fixtures/golden/qwen2" \
  --prompts-jsonl "$OUT/engine_prompts.jsonl" --ignore-eos --max-num-tokens 64 --block-size 8 \
  --tp 2 --tp-launch process
RES[tp2_process_agree]="$(agree "$OUT/engine_batched.out" "$OUT/engine_tp2_process.log" \
  "tp 2 (processes) vs tp 1")"
fi
if [ "$PART" != checks ]; then
if [ -x "$G/qilin_bench_tokenizer" ] && [ -z "${QILIN_SKIP_TOKENIZER:-}" ]; then
  run tok_qilin 200 "$G/qilin_bench_tokenizer" --tokenizer "$G/tokenizer" --corpus "$G/tok_corpus.txt"
  run tok_reference 300 python3 "$G/bench_reference.py" --data "$G/tokenizer" --corpus "$G/tok_corpus.txt"
fi
run bench 300 "$G/qilin_bench_cuda_decode" --model "$G/configs/qwen2.5-7b" --prefill-sweep 1
# The same decode and 128/128 figures without programmatic dependent launch (QILIN_PDL=0).
run bench_nopdl 150 env QILIN_PDL=0 "$G/qilin_bench_cuda_decode" --model "$G/configs/qwen2.5-7b" \
  --profile 0 --long 0
# Decode attention without the short-context single split (QILIN_DECODE_SINGLE_SPLIT_KEYS=0:
# factor-4 splits at every context) against the default, on all three 64-sequence workloads.
run bench_nosingle 150 env QILIN_DECODE_SINGLE_SPLIT_KEYS=0 "$G/qilin_bench_cuda_decode" \
  --model "$G/configs/qwen2.5-7b" --profile 0 --long 1
# The engine in-process (qilin bench): steps overlapped (the default) vs one at a time.
for ov in "" "--no-overlap" "--no-warmup"; do
  run "engine_b1$ov" 120 "$G/qilin" bench --model "$G/configs/qwen2.5-7b" --dummy-weights \
    --device cuda --num-requests 4 --concurrency 1 --input-len 128 --output-len 256 $ov
  run "engine_c64$ov" 120 "$G/qilin" bench --model "$G/configs/qwen2.5-7b" --dummy-weights \
    --device cuda --num-requests 64 --input-len 128 --output-len 128 $ov
done
if [ -f "$G/torch_baseline.py" ]; then run torch 200 python3 "$G/torch_baseline.py" "$G/configs/qwen2.5-7b"; fi
fi
# Tensor parallelism over GPUs (issue 8), only where 2+ GPUs are visible: the TP and NCCL tests,
# then batch-1 decode and 64 x 128/128 throughput at TP = 1 and 2 (threads, and processes for
# TP = 2) for the 7B and 32B shapes with dummy weights.
NGPU=$(nvidia-smi -L | grep -c '^GPU' || true)
if [ "$PART" != checks ] && [ "${NGPU:-0}" -ge 2 ]; then
  run tp_tests 300 "$G/qilin_cuda_tests" --gtest_filter='CudaTp*:CudaNccl*'
  for m in qwen2.5-7b qwen2.5-32b; do
    for tp in "1" "2" "2 --tp-launch process"; do
      tag="${m}_tp${tp// /}"; tag="${tag//--tp-launch/_}"
      run "b1_$tag" 300 "$G/qilin" bench --model "$G/configs/$m" --dummy-weights --device cuda \
        --tp $tp --num-requests 4 --concurrency 1 --input-len 128 --output-len 256
      run "c64_$tag" 300 "$G/qilin" bench --model "$G/configs/$m" --dummy-weights --device cuda \
        --tp $tp --num-requests 64 --input-len 128 --output-len 128
    done
  done
  for f in "$OUT"/b1_*.log "$OUT"/c64_*.log; do
    echo "$(basename "$f" .log): $(grep -E 'output tokens/s|^inter-token' "$f" | tr -s ' ' | tr '\n' ' ')"
  done >"$OUT/tp_summary.txt"
else
  RES[tp]="skipped: ${NGPU:-0} GPU(s) visible, tensor parallelism over GPUs needs 2"
fi
echo; echo "== summary"
grep -h -E "^\[  (PASSED|FAILED)|FAILED  \]|tests? ran" "$OUT/tests.log" 2>/dev/null | tail -n 20
grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT"/memcheck.log "$OUT"/racecheck.log 2>/dev/null
grep -h "cuda golden" "$OUT/tests.log" 2>/dev/null
for k in "${!RES[@]}"; do printf '%-10s %s\n' "$k" "${RES[$k]}"; done
tail -n 2 "$OUT/generate.log" 2>/dev/null
sed -n '/== qilin CUDA backend/,$p' "$OUT/bench.log" 2>/dev/null
sed -n '/^prefill step/,/^1 x 16384/p' "$OUT/bench.log" 2>/dev/null
echo "-- without PDL (QILIN_PDL=0):"
grep -E "batch-1 decode|64 x" "$OUT/bench_nopdl.log" 2>/dev/null
echo "-- decode attention without the short-context single split (QILIN_DECODE_SINGLE_SPLIT_KEYS=0):"
grep -E "64 x" "$OUT/bench_nosingle.log" 2>/dev/null
echo "-- the engine in-process, overlapped steps vs --no-overlap, warmed up vs --no-warmup:"
for f in engine_b1 engine_b1--no-overlap engine_b1--no-warmup engine_c64 engine_c64--no-overlap \
  engine_c64--no-warmup; do
  [ -f "$OUT/$f.log" ] && echo "$f: $(grep -E 'output tokens/s|^inter-token' "$OUT/$f.log" | tr -s ' ' | tr '\n' ' ')"
done
tail -n 8 "$OUT/torch.log" 2>/dev/null
cat "$OUT/tp_summary.txt" 2>/dev/null
echo "== tokenizer"; tail -n 12 "$OUT/tok_qilin.log" 2>/dev/null; tail -n 12 "$OUT/tok_reference.log" 2>/dev/null
