"""Benchmark: join-to-peer-visible time of two Python ``Room``s, per signalling strategy.

For each strategy (memory, ws-relay, mqtt, nostr, torrent) a local relay is started on a free
127.0.0.1 port (the same launchers the tests use, ``bench/lab/relays.py``), then ``--runs`` times two
rooms with fresh ids and a fresh appId join at the same moment; the time from the two
``Room.join`` calls until **both** report the other peer as joined (discovery + SDP exchange + ICE +
DTLS/SCTP + the ``@_hsready`` handshake) is recorded, together with a JSON round trip on the joined
rooms. Everything runs on loopback with ``host_addresses_mode="only"`` and ``ice_servers=[]``.

    .venv/bin/python bench/join_bench.py                 # all strategies, 10 runs each
    .venv/bin/python bench/join_bench.py --runs 3 --strategies ws-relay mqtt

Results go to ``bench/results/join.json`` (with the command line and the host) and a table on
stdout. Numbers depend heavily on host load: aiortc is pure Python and shares the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lab import relays
from meshnode.room import Room, RoomConfig
from signaling.adapters.memory import MemoryHub
from signaling.protocol.names import gen_id

STRATEGIES = ["memory", "ws-relay", "mqtt", "nostr", "torrent"]
JOIN_TIMEOUT_SECONDS = 30.0
"""A run that has not joined by then counts as failed."""
RESULTS = ROOT / "bench" / "results" / "join.json"


@contextlib.contextmanager
def relay_for(strategy: str) -> Iterator[str | None]:
    """Start the local relay of `strategy`; yields its URL (None for the in-process hub)."""
    launchers = {
        "ws-relay": relays.wsrelay_relay,
        "mqtt": relays.mosquitto_relay,
        "nostr": relays.nostr_relay,
        "torrent": relays.tracker_relay,
    }
    if strategy == "memory":
        yield None
        return
    with launchers[strategy]() as relay:
        yield relay.url


async def one_run(strategy: str, url: str | None) -> dict[str, Any]:
    hub = MemoryHub()
    config = RoomConfig(
        strategy=strategy,
        relay_urls=[url] if url else [],
        app_id="bench-join-" + gen_id(8),
        room_id="bench",
        ice_servers=[],
    )
    rooms: list[Room] = []
    started = time.perf_counter()
    try:
        for _ in range(2):
            relays_arg = [hub.relay()] if url is None else None
            rooms.append(await Room.join(config, relays=relays_arg))
        await asyncio.gather(*(room.wait_for_peers(1, JOIN_TIMEOUT_SECONDS) for room in rooms))
        joined = time.perf_counter() - started
        sent = time.perf_counter()
        await rooms[0].make_action("ping").send({"t": 1})
        async with asyncio.timeout(JOIN_TIMEOUT_SECONDS):
            await rooms[1].make_action("ping").receive()
        return {
            "ok": True,
            "join_seconds": joined,
            "first_message_seconds": time.perf_counter() - sent,
        }
    except TimeoutError:
        return {"ok": False, "join_seconds": None, "first_message_seconds": None}
    finally:
        for room in rooms:
            await room.leave()


def summarise(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


async def bench(strategies: list[str], runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for strategy in strategies:
        with relay_for(strategy) as url:
            samples = [await one_run(strategy, url) for _ in range(runs)]
        ok = [s for s in samples if s["ok"]]
        results[strategy] = {
            "runs": runs,
            "ok": len(ok),
            "join_seconds": summarise([s["join_seconds"] for s in ok]),
            "first_message_seconds": summarise([s["first_message_seconds"] for s in ok]),
            "samples": samples,
        }
        join = results[strategy]["join_seconds"]
        line = f"{strategy:9} {len(ok)}/{runs} ok"
        if join:
            ms = [join[key] * 1000 for key in ("min", "median", "max")]
            line += "  join min/median/max {:6.0f} / {:6.0f} / {:6.0f} ms".format(*ms)
        print(line, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    results = asyncio.run(bench(args.strategies, args.runs))
    document = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "what": "two Python Rooms, both Room.join() at once -> both see the other joined",
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
