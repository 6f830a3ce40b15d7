"""Soak: a serving node under ~20 streams cycling through peers that join and leave (issue 8 §4).

One process runs a real Node (real Room, real aiortc on 127.0.0.1, MemoryHub signalling) with a
scripted engine with real timing (bench/lab/fakes.py: the model is irrelevant to leaks), and a pool of
askers: each asker joins with a fresh peer id, keeps `calls_per_peer` engine_run streams going for
`peer_lifetime` seconds, checks every stream arrived complete, then leaves and is replaced. Every
`sample_every` seconds the process's RSS, open file descriptors, asyncio tasks, live aiortc
RTCPeerConnection / RTCDataChannel objects and the node's per-peer state are sampled. Growth is
the difference between the mean of the last and the first post-warm-up windows (ideally 0).

    .venv/bin/python bench/soak.py --minutes 30 --out bench/results/soak.json

tests/integration/test_soak.py runs the same for two minutes in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil
from aiortc import RTCDataChannel, RTCPeerConnection

from bench.lab.fakes import TimedEngine, expected_ids
from bench.lab.meshkit import Asker, join_room, node_settings, start_node
from meshnode.transport.ice import quiet_connect_teardown
from signaling.adapters.memory import MemoryHub

logger = logging.getLogger("soak")


def _count(kind: type) -> int:
    with warnings.catch_warnings():  # walking every object touches torch's deprecated module aliases
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


def sample(running: Any, started: float, streams_done: int, streams_live: int) -> dict[str, Any]:
    gc.collect()
    node = running.node
    room, service = node.room, node.service
    process = psutil.Process()
    return {
        "t": round(time.monotonic() - started, 1),
        "rss_mb": round(process.memory_info().rss / 2**20, 2),
        "fds": process.num_fds(),
        "tasks": len(asyncio.all_tasks()),
        "peer_connections": _count(RTCPeerConnection),
        "data_channels": _count(RTCDataChannel),
        "node_links": len(room._mesh.live) if room and room._mesh else 0,
        "node_peers": len(room.peers) if room else 0,
        "node_calls": len(service.calls) if service else 0,
        "node_budgets": len(service.budgets) if service else 0,
        "node_roster": len(service.roster) if service else 0,
        "node_reassembly_bytes": room._reassembler.pending_bytes if room else 0,
        "streams_live": streams_live,
        "streams_done": streams_done,
    }


def steady_growth(samples: list[dict[str, Any]], warmup: float) -> dict[str, float]:
    """Mean of the last fifth minus mean of the first fifth of the samples taken after `warmup`
    (the RSS of a fresh process climbs for a few minutes while allocator arenas and caches fill)."""
    steady = [s for s in samples if s["t"] >= warmup] or samples
    window = max(1, len(steady) // 5)
    growth = {}
    for key in ("rss_mb", "fds", "tasks", "peer_connections", "data_channels", "node_budgets", "node_roster"):
        first = sum(s[key] for s in steady[:window]) / window
        last = sum(s[key] for s in steady[-window:]) / window
        growth[key] = round(last - first, 2)
    return growth


async def run_soak(**options: Any) -> dict[str, Any]:
    """Run the soak; returns samples and a summary (see the module docstring and `_soak`).

    The event loop handles aiortc's orphaned connect tasks as `meshnode join` does (commands.run):
    logged as "Task exception was never retrieved" with their traceback, each would keep its
    RTCPeerConnection alive for as long as a log handler keeps the record (pytest's does), which
    reads as a leak.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    quiet_connect_teardown(loop)
    try:
        return await _soak(**options)
    finally:
        loop.set_exception_handler(previous)


async def _soak(*, seconds: float, streams: int = 20, calls_per_peer: int = 2, peer_lifetime: float = 20.0,
                rate: float = 20.0, tokens: int = 60, sample_every: float = 10.0,
                warmup: float = 30.0) -> dict[str, Any]:
    hub = MemoryHub()
    settings = node_settings(f"soak-{os.getpid()}-{int(time.time())}")
    engine = TimedEngine(rate=rate, tokens=tokens)
    running = await start_node(settings, engine, relays=[hub.relay()])
    started = time.monotonic()
    deadline = started + seconds
    stats = {"streams_done": 0, "streams_live": 0, "tokens": 0, "lost": 0, "failed": 0, "peers": 0}
    samples: list[dict[str, Any]] = []
    baseline = sample(running, started, 0, 0)

    async def one_peer(slot: int) -> None:
        room = await join_room(settings, relays=[hub.relay()])
        stats["peers"] += 1
        asker = None
        try:
            await room.wait_for_peers(1, 30)
            asker = Asker(room, running.peer_id)
            leave_at = min(deadline, time.monotonic() + peer_lifetime)

            async def stream_loop() -> None:
                while time.monotonic() < leave_at:
                    stats["streams_live"] += 1
                    try:
                        record = await asker.call({"user": f"soak {slot}", "max_tokens": tokens}, timeout=60)
                    finally:
                        stats["streams_live"] -= 1
                    ok = record.result is not None and record.result.status == "ok"
                    if not ok:
                        stats["failed"] += 1
                        logger.warning("stream failed: %s", record.result)
                        await asyncio.sleep(1.0)  # refused (rate limit): back off, as a client would
                        continue
                    if record.ids != expected_ids(tokens):
                        stats["lost"] += 1
                    stats["streams_done"] += 1
                    stats["tokens"] += len(record.ids)
                    asker.calls.pop(record.call_id, None)

            await asyncio.gather(*(stream_loop() for _ in range(calls_per_peer)))
        finally:
            if asker is not None:
                await asker.close()
            await room.leave()

    async def slot_loop(slot: int) -> None:
        while time.monotonic() < deadline:
            try:
                await one_peer(slot)
            except Exception:  # a soak keeps going; failures are counted and logged
                stats["failed"] += 1
                logger.exception("peer in slot %d failed", slot)

    async def sampler() -> None:
        while True:
            await asyncio.sleep(sample_every)
            # MemoryHub keeps every publication for test assertions (~1 MB a minute here): that is
            # the fake relay's memory, not the node's, so the soak drops it.
            hub.published.clear()
            samples.append(sample(running, started, stats["streams_done"], stats["streams_live"]))
            logger.info("sample %s", samples[-1])

    slots = max(1, streams // calls_per_peer)
    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.gather(*(slot_loop(slot) for slot in range(slots)))
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    # Everyone has left: what remains must be what there was before the first peer came. A
    # connection whose close was abandoned (PeerLink bounds RTCPeerConnection.close() at 5 s) is
    # only released when aioice's consent checks expire (6 x 5 s), hence up to a minute to settle.
    settle_deadline = time.monotonic() + 60
    while time.monotonic() < settle_deadline:
        final = sample(running, started, stats["streams_done"], 0)
        if final["node_links"] == 0 and final["peer_connections"] <= baseline["peer_connections"]:
            break
        await asyncio.sleep(0.5)
    # Budgets outlive a leave for their one-minute window (a rejoin must not reset them): once that
    # has passed, every one of them is forgotten.
    service = running.node.service
    budgets_after_window = -1
    if service is not None:
        budgets = service.budgets
        now = budgets.clock
        budgets.clock = lambda: now() + 61.0
        budgets.prune()
        budgets_after_window = len(budgets)
        budgets.clock = now
    await running.shutdown()
    growth = steady_growth(samples, warmup)
    after = {key: final[key] - baseline[key] for key in ("fds", "tasks", "peer_connections", "data_channels",
                                                          "node_links", "node_calls")}
    after["node_budgets_after_their_window"] = budgets_after_window
    return {
        "seconds": seconds, "streams_target": streams, "calls_per_peer": calls_per_peer,
        "peer_lifetime_seconds": peer_lifetime, "rate_tokens_per_second": rate, "tokens_per_stream": tokens,
        "peers_joined_and_left": stats["peers"], "streams_completed": stats["streams_done"],
        "tokens_received": stats["tokens"], "streams_with_lost_tokens": stats["lost"],
        "streams_failed": stats["failed"],
        "peak_streams_live": max((s["streams_live"] for s in samples), default=0),
        "warmup_seconds": warmup, "growth_last_minus_first_window": growth, "baseline": baseline, "final_after_all_left": final,
        "left_over_after_all_left": after, "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("meshnode", "signaling", "aiortc", "aioice"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = asyncio.run(run_soak(seconds=args.minutes * 60, streams=args.streams,
                                  warmup=min(300.0, args.minutes * 60 / 4)))
    result["command"] = " ".join([".venv/bin/python", "bench/soak.py", *(argv or sys.argv[1:])])
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
