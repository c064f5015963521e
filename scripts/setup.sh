#!/usr/bin/env bash
# Installs the Debian packages qilin builds with, then configures and builds it (preset
# `release`: the CUDA backend too where nvcc exists). Safe to run again.
#   bash scripts/setup.sh            install + build
#   bash scripts/setup.sh --deps     install only
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build pkg-config git clang-format
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libfmt-dev libspdlog-dev libcli11-dev
  libutf8proc-dev libpcre2-dev
  clang libclang-rt-14-dev libomp-dev
  libboost1.81-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  curl prometheus ccache
  openmpi-bin
  python3-grpcio python3-grpc-tools
)
# Node.js + npm (end-to-end tests with real client SDKs): any install will do; Debian's packages
# only where none is present (a machine may carry a newer Node.js that conflicts with Debian's npm).
command -v node >/dev/null 2>&1 || PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || PACKAGES+=(npm)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The e2e suite's node packages (the official openai SDK), pinned by package-lock.json.
if [ ! -d tests/e2e/node_modules/openai ]; then
  (cd tests/e2e && npm ci --no-audit --no-fund --silent) || echo "setup: npm ci in tests/e2e failed"
fi
# The deploy check's node packages (kubernetes-models, ajv, yaml), pinned by package-lock.json.
if [ ! -d tests/deploy/node_modules/kubernetes-models ]; then
  (cd tests/deploy && npm ci --no-audit --no-fund --silent) ||
    echo "setup: npm ci in tests/deploy failed"
fi

[ "${1:-}" = "--deps" ] && exit 0

PRESET="${QILIN_PRESET:-release}"
cmake --preset "$PRESET" >/dev/null
cmake --build --preset "$PRESET"
echo "setup: built build/$PRESET/qilin"
