#!/usr/bin/env bash
# Bundle the real Trystero strategies (web/src/trystero-*.js re-export @trystero-p2p/<strategy>)
# into tests/browser/www/lib/ for the browser test page (test-harness §6).
# The output is gitignored and rebuilt at test time (tests/browser/conftest.py calls this script
# when a bundle is missing or older than its inputs). Needs `cd web && npm ci` first.
#   scripts/build-web.sh [outdir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-tests/browser/www/lib}
esbuild=web/node_modules/.bin/esbuild
if [ ! -x "$esbuild" ]; then
  echo "build-web: $esbuild missing; run 'cd web && npm ci' (or scripts/setup.sh --test)" >&2
  exit 1
fi
mkdir -p "$out"
for strategy in mqtt nostr torrent; do
  "$esbuild" "web/src/trystero-$strategy.js" --bundle --format=esm --platform=browser \
    --target=es2022 --log-level=warning --outfile="$out/trystero-$strategy.js"
done
