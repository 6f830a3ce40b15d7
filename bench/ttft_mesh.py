"""Benchmark: time to first token through the mesh vs directly from the engine, in one run.

One embedded-model engine (SmolLM2-135M-Instruct, CPU) serves both paths:

* **local**: the backend ``meshnode join`` serves (tokenize + generate, greedy) → the first chunk with ids;
* **mesh**, per strategy (ws-relay, mqtt on loopback relays started like the tests do): a
  ``Node`` serves a room; a Python asker (:class:`meshnode.legion.client.LegionClient`) stays
  joined and, per request, sends HELLO + ``tc engine_run`` and waits for the first DATA frame
  carrying ids. Also recorded: the node's own
  ``ttft_ms`` from the tool result (prompt encode + queue + prefill + first decode, node side),
  and per request the difference asker TTFT − node TTFT: the time spent in transit (HELLO + call
  to the node, first DATA frame back), which host load does not skew the way it skews TTFT.

Requests are interleaved (local, then each strategy) so that host load drifts hit all paths alike.
The node and the asker share one event loop (aiortc is pure Python), so the mesh figures include
both sides' CPU time on this host. Loopback only: ``ice_servers=[]``, host address 127.0.0.1.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ttft_mesh.py              # 10 runs, ws-relay + mqtt
    HF_HUB_OFFLINE=1 .venv/bin/python bench/ttft_mesh.py --runs 3     # quick

Results go to ``bench/results/ttft_mesh.json`` (with the command line, host and load average) and a
table on stdout.
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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lab import relays
from meshnode.cli.config import load_settings
from meshnode.generation.api import Prompt, SamplingParams
from meshnode.generation.factory import open_backend
from meshnode.legion.client import LegionClient
from meshnode.node.assembly import room_config
from meshnode.node.node import Node
from meshnode.room import Room

RESULTS = ROOT / "bench" / "results" / "ttft_mesh.json"
STRATEGIES = ["ws-relay", "mqtt"]
LOOPBACK = {"ice_servers": []}
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain entropy in one sentence.",
    "What does a compiler do?",
    "Why is the sky blue?",
]
TIMEOUT_S = 120.0


@contextlib.contextmanager
def relay_for(strategy: str) -> Iterator[str]:
    launcher = {"ws-relay": relays.wsrelay_relay, "mqtt": relays.mosquitto_relay}[strategy]
    with launcher() as relay:
        yield relay.url


class MeshPath:
    """A node and a joined asker for one strategy."""

    def __init__(self, strategy: str, url: str, backend: Any) -> None:
        self.strategy = strategy
        self.settings, _ = load_settings(None, env={}, flags={
            ("room", "strategy"): strategy, ("room", "relays"): [url], ("room", "room"): f"ttft-{strategy}",
            ("room", "app_id"): f"meshnode-bench-{os.getpid()}", ("webrtc", "ice_servers"): [],
            ("webrtc", "host_addresses"): ["127.0.0.1"]})
        self.node = Node(self.settings, backend, room_overrides=LOOPBACK)
        self.stop = asyncio.Event()
        self.serving: asyncio.Task[None] | None = None
        self.asker: Room | None = None
        self.client: LegionClient | None = None
        self.peer_id = ""
        self.join_seconds = 0.0

    async def start(self) -> None:
        self.serving = asyncio.create_task(self.node.run(self.stop, drain_seconds=2))
        async with asyncio.timeout(TIMEOUT_S):
            await self.node.started.wait()
        started = time.perf_counter()
        self.asker = await Room.join(room_config(self.settings, **LOOPBACK))
        self.client = LegionClient(self.asker, negotiate=True, compression=["identity"]).start()
        self.peer_id, _ = await self.client.find_server(TIMEOUT_S)
        self.join_seconds = time.perf_counter() - started

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.asker is not None:
            await self.asker.leave()
        self.stop.set()
        if self.serving is not None:
            await asyncio.wait_for(self.serving, 30)

    async def ask(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        assert self.client is not None
        started = time.monotonic()  # the HELLO / READY round trip counts, as for a real asker
        record = await self.client.call(self.peer_id, {"user": prompt, "max_tokens": max_tokens, "temperature": 0},
                                        timeout=TIMEOUT_S)
        ttft_ms = record.content.get("ttft_ms")
        return {"ttft_s": None if record.first_at is None else record.first_at - started,
                "total_s": time.monotonic() - started, "tokens": len(record.ids),
                "node_ttft_s": None if ttft_ms is None else ttft_ms / 1000,
                "status": record.result.status if record.result is not None else "none"}


async def local_ttft(backend: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    stream = await backend.start(Prompt.chat([{"role": "user", "content": prompt}]),
                                 SamplingParams(temperature=0, max_tokens=max_tokens))
    async with stream:
        async for chunk in stream:
            if chunk.ids and first is None:
                first = time.perf_counter() - started
            tokens += len(chunk.ids)
    return {"ttft_s": first, "total_s": time.perf_counter() - started, "tokens": tokens}


def summarise(values: list[float | None]) -> dict[str, float] | None:
    clean = sorted(v for v in values if v is not None)
    if not clean:
        return None
    return {"n": len(clean), "min": clean[0], "median": statistics.median(clean), "max": clean[-1],
            "p90": clean[min(len(clean) - 1, int(round(0.9 * (len(clean) - 1))))]}


@contextlib.asynccontextmanager
async def mesh_paths(strategies: list[str], engine: Any) -> AsyncIterator[dict[str, MeshPath]]:
    with contextlib.ExitStack() as relays_stack:
        urls = {s: relays_stack.enter_context(relay_for(s)) for s in strategies}
        paths: dict[str, MeshPath] = {}
        try:
            for strategy in strategies:
                path = MeshPath(strategy, urls[strategy], engine)
                paths[strategy] = path
                await path.start()
            yield paths
        finally:
            for path in paths.values():
                with contextlib.suppress(Exception):
                    await path.close()


async def bench(strategies: list[str], runs: int, max_tokens: int, warmup: int) -> dict[str, Any]:
    settings, _ = load_settings(None, env={}, flags={("model", "device"): "cpu", ("engine", "max_concurrent"): 4})
    samples: dict[str, list[dict[str, Any]]] = {"local": [], **{s: [] for s in strategies}}
    async with open_backend(settings.model, settings.engine, progress=False) as engine, \
            mesh_paths(strategies, engine) as paths:
        joins = {s: p.join_seconds for s, p in paths.items()}
        for i in range(warmup + runs):
            prompt = PROMPTS[i % len(PROMPTS)]
            row = {"local": await local_ttft(engine, prompt, max_tokens)}
            for strategy, path in paths.items():
                row[strategy] = await path.ask(prompt, max_tokens)
            if i >= warmup:
                for key, value in row.items():
                    samples[key].append({"prompt": prompt, **value})
            label = "warmup" if i < warmup else f"run {i - warmup + 1}/{runs}"
            print(f"{label:10} " + "  ".join(
                f"{k} {v['ttft_s'] * 1000:7.1f} ms" if v["ttft_s"] is not None else f"{k} -" for k, v in row.items()),
                flush=True)
    results: dict[str, Any] = {}
    local_median = (summarise([s["ttft_s"] for s in samples["local"]]) or {}).get("median")
    for key, rows in samples.items():
        entry: dict[str, Any] = {"ttft_s": summarise([r["ttft_s"] for r in rows]),
                                 "total_s": summarise([r["total_s"] for r in rows]), "samples": rows}
        if key != "local":
            entry["node_ttft_s"] = summarise([r["node_ttft_s"] for r in rows])
            # Paired per request, so host load cancels out: request transit + first frame transit.
            entry["transport_s"] = summarise([r["ttft_s"] - r["node_ttft_s"] for r in rows
                                              if r["ttft_s"] is not None and r["node_ttft_s"] is not None])
            entry["join_and_discover_s"] = joins[key]
            median = (entry["ttft_s"] or {}).get("median")
            if median is not None and local_median is not None:
                entry["overhead_median_s"] = median - local_median
        results[key] = entry
    return {"model": engine.model_id, "max_tokens": max_tokens, "runs": runs, "warmup": warmup, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    load_before = os.getloadavg()
    report = asyncio.run(bench(args.strategies, args.runs, args.max_tokens, args.warmup))
    document = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                 "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "what": "time to first token: engine direct vs Python asker -> meshnode over loopback relays "
                "(HELLO + tc engine_run -> first DATA frame with ids)",
        **report,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print()
    for key, entry in report["results"].items():
        ttft = entry["ttft_s"]
        if ttft:
            extra = ""
            if entry.get("node_ttft_s") and entry.get("transport_s"):
                extra = (f"  node-side {entry['node_ttft_s']['median'] * 1000:.1f} ms,"
                         f" transport {entry['transport_s']['median'] * 1000:.1f} ms")
            print(f"{key:9} TTFT median {ttft['median'] * 1000:7.1f} ms  min {ttft['min'] * 1000:7.1f}  "
                  f"p90 {ttft['p90'] * 1000:7.1f}{extra}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
