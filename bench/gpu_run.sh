#!/usr/bin/env bash
# The GPU verification of issue 17 on the lent H200, in two parts of under 9 minutes each:
#
#   bash bench/gpu_run.sh 1   CUDA-only unit tests, then the Qwen2.5-0.5B shape: 1/64/256 streams
#                             (burst and Poisson), 1k shared-prefix TTFT, warm start, kernel profile,
#                             every transformers baseline
#   bash bench/gpu_run.sh 2   the Llama-3-8B and Qwen2.5-7B shapes: 1/64/256 streams, prefix TTFT,
#                             then the baselines as far as the budget goes
#
# Everything lands in $OUT (the device's return folder; ./gpu-out when unset): the bench's JSON
# (rewritten after every part) and PNG, and the logs. Nothing needs carrying: the GPU path imports
# only torch, transformers, tqdm (and pytest, pytest-timeout, matplotlib for the tests and the
# plot), all in the device's image; tests run without the repository's conftest (it needs aiortc).
# A CPU dry run of this script: GPU_RUN_EXTRA="--device cpu --models tiny --quick" bash bench/gpu_run.sh 1
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bash bench/gpu_run.sh 1|2}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LIMIT_SECONDS=${GPU_RUN_LIMIT_SECONDS:-530}  # the device allows 600 s per command
started=$(date +%s)
left() { echo $((LIMIT_SECONDS - ($(date +%s) - started))); }

echo "== part $part, $(date -u +%FT%TZ), limit ${LIMIT_SECONDS}s"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv,noheader || true
python3 - <<'EOF' || { echo "preflight failed: the GPU path does not import here"; exit 1; }
import sys, torch, transformers
import meshnode.generation.cuda.backend, bench.gpu_bench  # the whole GPU path, no repository extras
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
EOF

bench() {  # bench NAME ARGS...: the bench with what is left of the limit as its budget
  local name=$1; shift
  local budget=$(( $(left) - 45 ))
  echo "== bench $name: budget ${budget}s"
  timeout --signal=TERM --kill-after=10 $(( $(left) - 5 )) \
    python3 bench/gpu_bench.py "$@" --budget-seconds "$budget" --invoked-by "bash bench/gpu_run.sh $part" \
      --out "$OUT/gpu_$name.json" --png "$OUT/gpu_$name.png" ${GPU_RUN_EXTRA:-} 2>&1 | tee "$OUT/bench_$name.log"
}

case $part in
  1)
    echo "== CUDA-only unit tests (and the CPU ones beside them)"
    timeout --kill-after=10 180 python3 -m pytest -q -p no:cacheprovider --noconftest \
      -W ignore::pytest.PytestConfigWarning -o timeout=120 \
      tests/unit/test_cuda_engine.py tests/unit/test_prefix_cache.py 2>&1 | tee "$OUT/pytest_part1.log"
    bench part1 --models qwen0.5b --profile --sampled --warm-start qwen0.5b
    ;;
  2)
    bench part2 --models llama3-8b,qwen2.5-7b --static-batches 1,64 --batch-requests 64 --warm-start llama3-8b
    ;;
  *)
    echo "part must be 1 or 2" >&2; exit 2
    ;;
esac
echo "== part $part done in $(( $(date +%s) - started ))s; $OUT:"
ls -la "$OUT"
