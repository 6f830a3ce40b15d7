#!/usr/bin/env bash
# The fast gates that run before the suite (.ci/run): lint, types, layers, module size.
#   scripts/lint.sh          after scripts/setup.sh --test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
status=0
gate() {
  local name=$1; shift
  if "$@"; then echo "gate $name: ok"; else echo "gate $name: FAILED" >&2; status=1; fi
}
gate ruff "$PY/ruff" check --quiet meshnode signaling tests bench fuzz
gate mypy "$PY/mypy" --no-error-summary
gate layers "$PY/lint-imports" --no-cache
# One job per module: none of the runtime's modules may grow past MAX_MODULE_LINES.
MAX_MODULE_LINES=600
oversized() {
  local found=0 file lines
  while IFS= read -r file; do
    lines=$(wc -l <"$file")
    if [ "$lines" -gt "$MAX_MODULE_LINES" ]; then echo "$file: $lines lines (limit $MAX_MODULE_LINES)" >&2; found=1; fi
  done < <(find meshnode signaling -name '*.py' -not -path '*/__pycache__/*')
  return $found
}
gate module-size oversized
exit $status
