#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite inside a loopback-only network
# namespace (test-harness §3), so no test can reach anything but 127.0.0.1.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  exec unshare -n -- bash -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' pytest "$@"
fi
echo "warning: cannot create a network namespace (needs root); running on the host network" >&2
exec .venv/bin/python -m pytest "$@"
