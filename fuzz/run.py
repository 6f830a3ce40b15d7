"""Coverage-guided fuzzing of every peer/relay decoder with atheris (outside CI; issue 8 §1).

Install the fuzzer first: .venv/bin/pip install -r requirements-fuzz.lock

    .venv/bin/python fuzz/run.py --seconds 90                 # every target, 90 s each
    .venv/bin/python fuzz/run.py --seconds 600 --only node_inbound

Each target of fuzz/targets.py runs in its own child process under libFuzzer (atheris), with the
meshnode and signaling packages instrumented, the seeds of fuzz/seeds/<target>/ (made by
fuzz/seeds.py, committed), a per-target corpus in fuzz/corpus/<target>/ (kept between runs, not
committed) and crash inputs in fuzz/crashes/<target>/. A crash input is copied to
tests/data/fuzz/<target>/ so that tests/unit/test_fuzz_props.py replays it as a regression test.
Figures (executions, coverage, crashes) are written to bench/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"
SEEDS = ROOT / "fuzz" / "seeds"
CRASHES = ROOT / "fuzz" / "crashes"
REGRESSIONS = ROOT / "tests" / "data" / "fuzz"
RESULTS = ROOT / "bench" / "results" / "fuzz.json"
LONG_INPUT_TARGETS = {"action_chunks", "node_inbound"}
"""Targets whose inputs hold whole multi-chunk messages (a chunk carries up to 16 348 bytes)."""
LONG_INPUT_BYTES = 40_000


def child(name: str, seconds: int) -> None:
    """Runs inside the child process: instrument, then fuzz one target until the time is up."""
    import atheris

    with atheris.instrument_imports(include=["meshnode", "signaling", "fuzz"]):
        from fuzz.targets import TARGETS
    target = TARGETS[name]
    (CORPUS / name).mkdir(parents=True, exist_ok=True)
    (CRASHES / name).mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-max_total_time={seconds}", "-print_final_stats=1",
            f"-max_len={LONG_INPUT_BYTES if name in LONG_INPUT_TARGETS else 8192}",
            "-rss_limit_mb=4096", "-timeout=30", f"-artifact_prefix={CRASHES / name}/", str(CORPUS / name)]
    if (SEEDS / name).is_dir():
        args.append(str(SEEDS / name))  # read-only seeds (fuzz/seeds.py); new inputs go to the corpus
    atheris.Setup(args, target)
    atheris.Fuzz()


def run_target(name: str, seconds: int) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    started = time.monotonic()
    process = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name, "--seconds",
                              str(seconds)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=seconds + 300, check=False)
    elapsed = time.monotonic() - started
    output = process.stdout + process.stderr
    executions = _stat(output, "stat::number_of_executed_units")
    if executions is None:  # older atheris: the last "#N" status line
        runs = re.findall(r"^#(\d+)\s", output, re.MULTILINE)
        executions = int(runs[-1]) if runs else 0
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", output)
    crashes = sorted(p for p in (CRASHES / name).glob("*") if p.is_file())
    for crash in crashes:
        (REGRESSIONS / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(crash, REGRESSIONS / name / crash.name)
    if process.returncode != 0 and not crashes:
        Path(f"/tmp/fuzz-{name}.log").write_text(output)
    return {
        "executions": executions,
        "seconds": round(elapsed, 1),
        "executions_per_second": round(executions / max(elapsed, 1e-6), 1),
        "coverage_edges": int(coverage[-1][0]) if coverage else None,
        "coverage_features": int(coverage[-1][1]) if coverage else None,
        "corpus_inputs": len(list((CORPUS / name).glob("*"))),
        "crashes": len(crashes),
        "crash_files": [str(p.relative_to(ROOT)) for p in crashes],
        "exit_code": process.returncode,
    }


def _stat(output: str, key: str) -> int | None:
    match = re.search(rf"{re.escape(key)}:\s*(\d+)", output)
    return int(match.group(1)) if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="atheris fuzzing of meshnode's decoders")
    parser.add_argument("--seconds", type=int, default=90, help="per target")
    parser.add_argument("--only", action="append", help="target name (repeatable); default: all")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.seconds)
        return 0
    sys.path.insert(0, str(ROOT))
    from fuzz.targets import TARGETS

    names = args.only or sorted(TARGETS)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = dict(previous.get("targets", {}))
    for name in names:
        print(f"fuzzing {name} for {args.seconds} s ...", flush=True)
        results[name] = run_target(name, args.seconds)
        print(f"  {results[name]}", flush=True)
    import atheris  # noqa: F401 - only for its version below

    report = {
        "command": " ".join([".venv/bin/python", "fuzz/run.py", *(argv or sys.argv[1:])]),
        "tool": "atheris (libFuzzer), meshnode + signaling instrumented",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "total_executions": sum(int(r["executions"]) for r in results.values()),
        "total_crashes": sum(int(r["crashes"]) for r in results.values()),
        "targets": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "targets"}, indent=2))
    return 1 if report["total_crashes"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
