"""Benchmark (issue 12, item 4): three tabs ask more than the engine can serve.

A real :class:`~meshnode.node.node.Node` (real Room, aiortc on 127.0.0.1, a memory relay) serves a
scripted engine whose speed the bench sets (``--rate`` tok/s per stream, ``--slots`` streams at
once). Three askers, like real tabs, each keep ``--per-tab`` calls of ``--max-tokens`` in flight
and give up after ``legion.call_deadline_seconds`` (the real core's timeout). Offered load is far
above what the engine can finish in time, so the node must refuse at once what it could not finish.

Measured, per mode (``deadline``: meshnode as shipped; ``no-deadline``: the same node with the
deadline estimate off, i.e. ``call_deadline_seconds = 0``, the old behaviour):

* how fast a refused call is told (``refusal_ms``: call sent → ``denied`` result);
* of the calls taken, the share that finished (all ``--max-tokens``) within the deadline, and of
  all calls, the share that ended with a full answer in time (``useful``);
* engine work wasted on calls that finished after the asker had given up.

    .venv/bin/python bench/deadline_bench.py          # writes bench/results/deadline.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lab.fakes import TimedEngine
from bench.lab.meshkit import Asker, join_room, median, node_settings, start_node
from bench.lab.report import write_json
from meshnode.legion.client import CallRecord
from signaling.adapters.memory import MemoryHub

RESULTS = ROOT / "bench" / "results" / "deadline.json"
TABS = 3
GRACE_SECONDS = 0.5
"""The asker waits this much past the deadline, so that a result the node sends at it still counts."""


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else None


async def one_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    hub = MemoryHub()
    deadline = args.deadline if mode == "deadline" else 0.0
    settings = node_settings(f"deadline-bench-{mode}-{os.getpid()}", **{
        "legion.calls_per_minute": 10_000, "legion.max_calls_per_peer": args.per_tab,
        "legion.call_deadline_seconds": deadline, "engine.max_queue": 64})
    engine = TimedEngine(rate=args.rate, tokens=args.max_tokens, max_concurrent=args.slots, max_queue=64,
                         slots=True)
    running = await start_node(settings, engine, relays=[hub.relay()])
    askers: list[Asker] = []
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(TABS):
            room = await join_room(settings, relays=[hub.relay()])
            askers.append(Asker(room, running.peer_id))
        async with asyncio.timeout(30):
            while not all(running.peer_id in a.room.peers for a in askers):
                await asyncio.sleep(0.05)
        stop_at = time.monotonic() + args.seconds

        async def tab_loop(asker: Asker) -> None:
            while time.monotonic() < stop_at:
                sent = time.monotonic()
                try:
                    record: CallRecord | None = await asker.call(
                        {"user": "hello", "max_tokens": args.max_tokens, "temperature": 0},
                        timeout=args.deadline + GRACE_SECONDS)
                except (AssertionError, TimeoutError):
                    record = None  # the asker gave up, as the real core does after its timeout
                ended = time.monotonic()
                status = record.result.status if record is not None and record.result is not None else "timeout"
                error = (record.result.error or "") if record is not None and record.result is not None else ""
                rows.append({"status": status, "seconds": ended - sent, "reason": error[:48],
                             "tokens": len(record.ids) if record is not None else 0,
                             "in_time": status == "ok" and len(record.ids if record else []) >= args.max_tokens
                             and ended - sent <= args.deadline + GRACE_SECONDS})
                if status != "ok":
                    await asyncio.sleep(args.retry_seconds)  # a refused tab asks again a little later

        await asyncio.gather(*(tab_loop(a) for a in askers for _ in range(args.per_tab)))
    finally:
        for asker in askers:
            await asker.close()
            await asker.room.leave()
        await running.shutdown()
    refused = [r for r in rows if r["status"] == "denied"]
    taken = [r for r in rows if r["status"] != "denied"]
    return {
        "calls": len(rows), "refused": len(refused), "taken": len(taken),
        "refusal_ms": {"median": round(median([r["seconds"] * 1000 for r in refused]), 1) if refused else None,
                       "p95": round(percentile([r["seconds"] * 1000 for r in refused], 0.95) or 0, 1)
                       if refused else None},
        "taken_finished_in_time": round(sum(r["in_time"] for r in taken) / len(taken), 3) if taken else None,
        "useful_share_of_all_calls": round(sum(r["in_time"] for r in rows) / len(rows), 3) if rows else None,
        "refusal_reasons": {reason: sum(r["reason"] == reason for r in refused)
                            for reason in sorted({r["reason"] for r in refused})},
        "statuses": {status: sum(r["status"] == status for r in rows) for status in sorted({r["status"] for r in rows})},
        "answers_in_time": sum(r["in_time"] for r in rows),
        "engine_streams_started": engine.started, "engine_streams_completed": engine.completed,
        "engine_streams_wasted": engine.started - sum(r["in_time"] for r in rows),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for mode in ("deadline", "no-deadline"):
        print(f"== {mode}", flush=True)
        results[mode] = await one_mode(mode, args)
        print(json.dumps(results[mode]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="engine tok/s per stream (default 20)")
    parser.add_argument("--slots", type=int, default=2, help="streams the engine decodes at once (default 2)")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens each call asks for (default 200)")
    parser.add_argument("--per-tab", type=int, default=2, help="calls each tab keeps in flight (default 2)")
    parser.add_argument("--deadline", type=float, default=20.0,
                        help="seconds an asker waits (the chat app's 20 s; legion.call_deadline_seconds)")
    parser.add_argument("--retry-seconds", type=float, default=1.0, help="a refused tab asks again after this")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the tabs keep asking (default 90)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = asyncio.run(bench(args))
    document = {"command": "python bench/deadline_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tabs": TABS,
                "workload": {k: v for k, v in vars(args).items() if k != "out"},
                "capacity_note": "the engine finishes slots × rate / max_tokens calls per second; the tabs keep "
                                 "tabs × per_tab calls in flight",
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "wall_s": round(time.monotonic() - started, 1), "results": results}
    write_json(document, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
