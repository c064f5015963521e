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
