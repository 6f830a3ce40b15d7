#!/usr/bin/env bash
# Bundle the meshnode browser client (web/client/) into web/dist/ for `meshnode join --web PORT`.
# Each Trystero strategy becomes its own chunk, loaded only when a room uses it. The output is
# gitignored; tests/browser/test_legion_e2e.py rebuilds it when missing or older than its inputs.
# Needs `cd web && npm ci` first.
#   scripts/build-client.sh [outdir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-web/dist}
esbuild=web/node_modules/.bin/esbuild
if [ ! -x "$esbuild" ]; then
  echo "build-client: $esbuild missing; run 'cd web && npm ci' (or scripts/setup.sh --test)" >&2
  exit 1
fi
tmp=$(mktemp -d "${out%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$esbuild" web/client/app.js --bundle --splitting --format=esm --platform=browser --target=es2022 \
  --minify --sourcemap --chunk-names='chunks/[name]-[hash]' --log-level=warning --outdir="$tmp"
cp web/client/index.html web/client/style.css "$tmp/"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
