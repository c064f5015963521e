#!/usr/bin/env bash
# Packs what tools/device/run-gpu-checks.sh and serve-bench.sh need on the GPU machine into
# <dest>/.dev/gpu and its gzip <dest>/.dev/carry/gpu.tgz (ignored by git; the end says how to carry
# it): the CUDA test binary, the benchmark, the qilin binary, the shared libraries the device
# image lacks (Debian's, not glibc or CUDA's), the golden fixtures, the configs and the scripts. Builds nothing: run
# `ninja -C build/release` first.
# Usage: tools/device/pack.sh [dest repo root, default /work/main]
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST="${1:-/work/main}/.dev/gpu"
B=build/release
rm -rf "$DEST"
mkdir -p "$DEST/lib" "$DEST/fixtures"
cp $B/tests/qilin_cuda_tests $B/qilin_bench_cuda_decode $B/qilin $B/qilin_bench_tokenizer "$DEST/"
for bin in "$DEST"/qilin "$DEST"/qilin_cuda_tests "$DEST"/qilin_bench_cuda_decode \
  "$DEST"/qilin_bench_tokenizer; do
  # Every Debian library the binaries link (fmt, spdlog, utf8proc, gomp, gRPC, protobuf, abseil,
  # ...) except glibc, libstdc++ and the CUDA libraries the device image has.
  ldd "$bin" | awk '/=> \// {print $3}' | grep -v '^/usr/local/cuda' |
    grep -v -E '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*|libnccl)\.so' |
    xargs -r -I{} cp -L {} "$DEST/lib/"
done
cp -r tests/fixtures/golden "$DEST/fixtures/golden"
cp -r configs "$DEST/configs"
# The tokenizer benchmark side by side with HF tokenizers and tiktoken (python3 there); 13 MB, so
# QILIN_SKIP_TOKENIZER=1 leaves it out (as it does in run-gpu-checks.sh).
if [ -z "${QILIN_SKIP_TOKENIZER:-}" ]; then
  mkdir -p "$DEST/tokenizer"
  cp models/demo/tokenizer.json models/demo/tokenizer_config.json ../shared/data/tokenizer/qwen.tiktoken \
    "$DEST/tokenizer/"
  cp tools/tokenizer/bench_reference.py "$DEST/"
  python3 -c "import sys; sys.path.insert(0, 'tools/tokenizer'); import bench_reference as b; \
  open('$DEST/tok_corpus.txt', 'w', encoding='utf-8').write(b.build_corpus('../shared/data/tokenizer'))"
else
  rm -f "$DEST/qilin_bench_tokenizer"
fi
cp tools/device/run-gpu-checks.sh tools/device/serve-bench.sh tools/device/torch_baseline.py \
  tools/device/ncu-decode.sh \
  tools/device/ab-bench.sh "$DEST/"
# A baseline benchmark binary for tools/device/ab-bench.sh (e.g. main's, built before a change).
if [ -n "${QILIN_AB_BASE:-}" ]; then cp "$QILIN_AB_BASE" "$DEST/base_bench"; fi
# Debug info stays here: the working tree plus this must fit the device tool's 64 MiB.
strip --strip-unneeded "$DEST"/qilin* "$DEST"/base_bench "$DEST"/lib/*.so* 2>/dev/null || true
du -sh "$DEST"
# The working tree and the carry together must stay under the device tool's 64 MiB: carry the
# gzip of the folder and unpack it there first:
#   run carry [".dev/carry"], command "tar -C .dev -xzf .dev/carry/gpu.tgz && bash .dev/gpu/run-gpu-checks.sh"
mkdir -p "$DEST/../carry"
tar -C "$DEST/.." -czf "$DEST/../carry/gpu.tgz" gpu
du -sh "$DEST/../carry/gpu.tgz"
