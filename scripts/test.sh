#!/usr/bin/env bash
# The whole test suite: builds what changed, then runs every test through CTest.
# GPU tests (label `gpu`) run only where a GPU is present; elsewhere they are skipped and said so.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${QILIN_PRESET:-release}"
[ -f "build/$PRESET/build.ninja" ] || cmake --preset "$PRESET" >/dev/null
cmake --build --preset "$PRESET"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ctest --test-dir "build/$PRESET" --output-on-failure -j 2
else
  echo "test: no GPU here: GPU tests (label gpu) are skipped; tools/device/run-gpu-checks.sh runs them"
  ctest --test-dir "build/$PRESET" --output-on-failure -j 2 -LE gpu
fi

# Fuzzing: the tokenizer's libFuzzer targets (separate clang build, preset `fuzz`) run for a
# bounded time. QILIN_FUZZ_SECONDS=0 skips them.
FUZZ_SECONDS="${QILIN_FUZZ_SECONDS:-30}"
if [ "$FUZZ_SECONDS" != 0 ]; then
  if command -v clang++ >/dev/null 2>&1; then
    [ -f build/fuzz/build.ninja ] || cmake --preset fuzz >/dev/null
    cmake --build --preset fuzz
    for target in tokenizer chat_template; do
      corpus="build/fuzz/corpus_$target"
      mkdir -p "$corpus"
      echo "test: fuzz_$target for ${FUZZ_SECONDS}s"
      "build/fuzz/fuzz_$target" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="build/fuzz/$target-" "$corpus" "fuzz/seeds/$target" \
        2>&1 | tail -n 12
      [ "${PIPESTATUS[0]}" = 0 ] || { echo "test: fuzz_$target found a problem (see build/fuzz/$target-*)"; exit 1; }
    done
  else
    echo "test: clang++ not found: fuzzing skipped"
  fi
fi
