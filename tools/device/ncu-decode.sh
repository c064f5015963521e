#!/usr/bin/env bash
# On the GPU machine, over what tools/device/pack.sh put in .dev/gpu: Nsight Compute on single
# launches of the decode-path kernels at the benchmark's per-op shapes (Qwen2.5-7B, batch 1 and
# 64): duration, DRAM throughput, occupancy and its limits, warp stalls. ncu locks clocks to base
# and flushes caches between replays, so these are diagnostics, not benchmark figures. Builds
# nothing; each kernel's full report goes to $OUT/ncu_<name>.txt.
# Usage: tools/device/ncu-decode.sh [config dir, default configs/qwen2.5-7b]
set -uo pipefail
G="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/qilin-ncu-out}"
CONFIG="${1:-$G/configs/qwen2.5-7b}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$G/lib:${LD_LIBRARY_PATH:-}"
NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
B=("$G/qilin_bench_cuda_decode" --model "$CONFIG" --profile 1 --long 0 --decode-steps 16)
S=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
   --section MemoryWorkloadAnalysis)
# name, kernel regex, launches of that kernel to skip (the per-op profile launches each op
# 7 x 20 times: two warm-up rounds and five timed ones).
prof() {
  timeout 120 "$NCU" --kill yes -k "regex:$2" -s "$3" -c 1 "${S[@]}" "${B[@]}" >"$OUT/ncu_$1.txt" 2>&1
  echo "== $1 (rc=$?)"
  grep -v '^==PROF==' "$OUT/ncu_$1.txt" | grep -E "^  [A-Za-z]|Duration|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Grid Size|Block Size|Waves Per|Dynamic Shared|Warp Cycles Per Issued|Block Limit (Reg|Shared|Warps)" |
    sed 's/  */ /g' | head -16
}
prof gemv_qkv_b1 GemvKernel 0          # qkv_proj, 1 token
prof gemv_o_b1 GemvKernel 140          # o_proj, 1 token
prof attn_b1 DecodeMmaKernel 0         # decode attention, 1 token over 128 keys
prof attn_b64 DecodeMmaKernel 280      # decode attention, 64 tokens over 128 keys each
prof norm_b1 AddRmsNormVec 0           # add + RMSNorm, 1 row
prof rope_b1 RopeWriteKv 0             # rope + KV write, 1 token
