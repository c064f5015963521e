#!/usr/bin/env bash
# On the GPU machine: an interleaved A/B of two qilin_bench_cuda_decode binaries (A, B, A, B, ...),
# each process measuring its own limits, so a change is judged against the instance's spread and
# not against a figure from another machine. Builds nothing.
# Usage: tools/device/ab-bench.sh A B [rounds, default 2] [config dir, default configs/qwen2.5-7b]
# With tools/device/pack.sh: QILIN_AB_BASE=/path/to/baseline/qilin_bench_cuda_decode packs it as
# .dev/gpu/base_bench, then on the device:
#   bash .dev/gpu/ab-bench.sh .dev/gpu/base_bench .dev/gpu/qilin_bench_cuda_decode
set -uo pipefail
G="$(cd "$(dirname "$0")" && pwd)"
A="${1:?usage: ab-bench.sh A B [rounds] [config]}"
B="${2:?usage: ab-bench.sh A B [rounds] [config]}"
ROUNDS="${3:-2}"
CONFIG="${4:-$G/configs/qwen2.5-7b}"
export LD_LIBRARY_PATH="$G/lib:${LD_LIBRARY_PATH:-}"
for i in $(seq 1 "$ROUNDS"); do
  for bin in "$A" "$B"; do
    line="$(timeout 120 "$bin" --model "$CONFIG" --profile 0 --long 0 2>&1 |
      grep -E 'batch-1 decode, gemv, t|64 x \(128' | sed 's/  */ /g' | tr '\n' ' ')"
    echo "round $i $(basename "$bin"): ${line:-(no result)}"
  done
done
