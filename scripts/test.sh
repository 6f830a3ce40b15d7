#!/usr/bin/env bash
# Install everything the tests need, run the gates (scripts/lint.sh), then the whole suite inside a
# loopback-only network namespace (test-harness §3), so no test can reach anything but 127.0.0.1.
#   scripts/test.sh [pytest args...]
# With MESHNODE_REQUIRE_NETNS=1 (.ci/run sets it) the suite refuses to run on the host network.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
scripts/lint.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  exec unshare -n -- bash -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' pytest "$@"
fi
if [ "${MESHNODE_REQUIRE_NETNS:-}" = 1 ]; then
  echo "error: cannot create a loopback-only network namespace (needs root and unshare -n); refusing to run" >&2
  exit 1
fi
echo "warning: cannot create a network namespace (needs root); running on the host network" >&2
exec .venv/bin/python -m pytest "$@"
