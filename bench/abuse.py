"""Abuse figures (issue 8 §2): the scenario of tests/integration/test_abuse.py, run N times.

    .venv/bin/python bench/abuse.py --runs 3 --out bench/results/abuse.json

Each run: a real Node with the scripted engine (50 tok/s, 40-token answers), an honest asker
calling back to back, nine attacks by fresh hostile peers; records every attack's reaction and the
honest peer's TTFT and token rate without and during abuse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lab.abuse import RATE_FLOOR, TTFT_BOUND_SECONDS, run_scenario
from signaling.protocol.names import gen_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "abuse.json")
    args = parser.parse_args(argv)
    runs = [asyncio.run(run_scenario(f"abuse-bench-{gen_id(8)}")) for _ in range(args.runs)]
    report = {
        "command": " ".join([".venv/bin/python", "bench/abuse.py", *(argv or sys.argv[1:])]),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "engine": "tests/fakes.TimedEngine (scripted ids with real timing; the model is irrelevant here)",
        "bound": {"ttft_ms_over_baseline_median": 1000 * TTFT_BOUND_SECONDS, "token_rate_floor": RATE_FLOOR},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for run in runs:
        print(json.dumps({k: run[k] for k in ("honest_without_abuse", "honest_during_abuse",
                                               "streams_held_during_abuse")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
