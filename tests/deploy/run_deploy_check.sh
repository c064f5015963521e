#!/usr/bin/env bash
# ctest `deploy_check` (label deploy): the Kubernetes manifests in deploy/kubernetes against the
# Kubernetes and KServe schemas (validate.mjs), and the systemd unit with systemd-analyze.
# Exit 77 (ctest: skipped) where the tools are missing.
#   tests/deploy/run_deploy_check.sh [BUILD_DIR]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="${1:-$ROOT/build/release}"
status=0

if ! command -v node >/dev/null; then
  echo "deploy: SKIP: node is missing (bash scripts/setup.sh installs it)"
  exit 77
fi
if [ ! -d "$HERE/node_modules/kubernetes-models" ]; then
  (cd "$HERE" && npm ci --no-audit --no-fund --silent) || {
    echo "deploy: SKIP: npm ci in tests/deploy failed (kubernetes-models, ajv, yaml)"
    exit 77
  }
fi
QILIN_ARGS=()
[ -x "$BUILD/qilin" ] && QILIN_ARGS=(--qilin "$BUILD/qilin")
node "$HERE/validate.mjs" "${QILIN_ARGS[@]}" || status=1

# systemd: verify a copy whose ExecStart names an existing binary; any warning fails.
if command -v systemd-analyze >/dev/null; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  exe="$BUILD/qilin"
  [ -x "$exe" ] || exe=/bin/true
  sed "s|/usr/local/bin/qilin|$exe|" "$ROOT/deploy/systemd/qilin.service" >"$tmp/qilin.service"
  out=$(systemd-analyze verify "$tmp/qilin.service" 2>&1 | grep -v -e "^$" \
          -e "Failed to .*bus" -e "System has not been booted with systemd" || true)
  if [ -n "$out" ]; then
    echo "deploy: systemd-analyze verify qilin.service:"
    echo "$out"
    status=1
  else
    echo "deploy: systemd unit verified"
  fi
else
  echo "deploy: systemd-analyze missing: the unit is not verified"
fi
exit "$status"
