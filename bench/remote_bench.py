"""Benchmark (issue 16): a room's tabs through ``meshnode join --engine-url`` vs the upstream directly.

One Codec-HTTP upstream in a process of its own, and in front of it a real ``meshnode join
--engine-url`` process (the CLI as users run it) in a room on a local ws-relay. For each
concurrency N, in the same run and interleaved so host load drifts hit both paths alike:

* **direct**: N concurrent ``POST /v1/chat/completions`` (``stream_format: "msgpack"``) to the
  upstream, as a Codec HTTP client of it would;
* **node**: N plain tabs (Python, no HELLO, one call each, as a room's tabs ask: one stream per
  tab) call ``engine_run`` on the node over WebRTC data channels; the node calls the upstream.

Measured: TTFT (request sent → first frame with ids) median and p90 per path, the added median
TTFT, and the aggregate tok/s (all ids / (last frame − first request)) with node/direct; and the
node process's CPU time per new tab connection, per streamed token, and per idle connection. The
upstream is meshnode's own Codec-HTTP server, by default replaying a recorded SmolLM2 completion
at ``--rate`` tok/s per stream (an engine whose speed does not share these 2 cores with the node),
or, with ``--upstream model``, ``meshnode serve-http`` on the embedded model. Loopback only: host
candidates on 127.0.0.1, no STUN; run it inside a loopback-only namespace:

    unshare -n -- bash -c 'ip link set lo up && .venv/bin/python bench/remote_bench.py'

Results: ``bench/results/remote_bench.json`` (with the command) and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp

from bench.lab import relays
from bench.lab.tabs import is_node, tab_id
from meshnode.cli.config import load_settings
from meshnode.legion.client import LegionClient
from meshnode.node.assembly import room_config
from meshnode.room import Room
from meshnode.transport.ice import IcePolicy, apply_ice_policy
from meshnode.wire.frames import StreamDecoder

DEFAULT_OUT = ROOT / "bench" / "results" / "remote_bench"
APP_ID = "meshnode-remote-bench"
PROMPT = "Describe a peer-to-peer network to a child."
START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 300.0
STDERR_LIMIT = 1 << 20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def child(argv: list[str], *, ready: str, log: Path, env: dict[str, str] | None = None
                ) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process of its own (own session, so the whole group is killed), up once a line of its
    stdout or stderr contains `ready`; its output goes to `log`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=ROOT, limit=STDERR_LIMIT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
    seen = asyncio.Event()

    async def tee() -> None:
        assert process.stdout is not None
        with log.open("ab") as out:
            while line := await process.stdout.readline():
                out.write(line)
                out.flush()
                if ready in line.decode(errors="replace"):
                    seen.set()

    teeing = asyncio.create_task(tee())
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            waiter = asyncio.ensure_future(seen.wait())
            await asyncio.wait([waiter, teeing], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if not seen.is_set():
            raise RuntimeError(f"{argv[:3]} exited before it was ready (see {log})")
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                await process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        teeing.cancel()


def upstream_argv(kind: str, port: int, rate: float, tokens: int, max_concurrent: int) -> tuple[list[str], str]:
    if kind == "replay":
        return (["-m", "bench.lab.roles", "upstream", "--port", str(port), "--rate", str(rate),
                 "--tokens", str(tokens)], '"started"')
    return (["-m", "meshnode", "serve-http", "--port", str(port), "--max-concurrent", str(max_concurrent),
             "--max-queue", str(4 * max_concurrent)], "serving ")


async def direct_call(session: aiohttp.ClientSession, url: str, tokens: int) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": PROMPT}], "stream_format": "msgpack",
            "max_tokens": tokens, "temperature": 0}
    decoder = StreamDecoder()
    sent = time.monotonic()
    first: float | None = None
    ids = 0
    async with session.post(url + "/v1/chat/completions", json=body,
                            headers={"Codec-Client-Version": "0.4"}) as response:
        if response.status != 200:
            raise RuntimeError(f"upstream answered {response.status}: {(await response.text())[:200]}")
        async for chunk in response.content.iter_any():
            for frame in decoder.feed(chunk):
                if frame.ids and first is None:
                    first = time.monotonic()
                ids += len(frame.ids)
    return {"sent": sent, "first": first, "done": time.monotonic(), "ids": ids}


async def node_call(client: LegionClient, peer_id: str, tokens: int) -> dict[str, Any]:
    record = await client.call(peer_id, {"user": PROMPT, "max_tokens": tokens, "temperature": 0}, timeout=CALL_TIMEOUT_S)
    status = record.result.status if record.result is not None else "none"
    if status != "ok":
        raise RuntimeError(f"node call ended {status}: {record.result}")
    return {"sent": record.sent_at, "first": record.first_at, "done": record.done_at or time.monotonic(),
            "ids": len(record.ids)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = sorted((r["first"] - r["sent"]) * 1000 for r in rows if r["first"] is not None)
    span = max(r["done"] for r in rows) - min(r["sent"] for r in rows)
    return {"calls": len(rows), "ttft_ms_median": round(statistics.median(ttfts), 1),
            "ttft_ms_p90": round(ttfts[min(len(ttfts) - 1, round(0.9 * (len(ttfts) - 1)))], 1),
            "tokens": sum(r["ids"] for r in rows), "tok_s": round(sum(r["ids"] for r in rows) / span, 1)}


class Tabs:
    """Plain tabs in the node's room, each with its own peer connection to the node only."""

    def __init__(self, relay_url: str, room: str) -> None:
        self.settings, _ = load_settings(None, env={}, flags={
            ("room", "strategy"): "ws-relay", ("room", "relays"): [relay_url], ("room", "room"): room,
            ("room", "app_id"): APP_ID, ("webrtc", "ice_servers"): [], ("webrtc", "host_addresses_mode"): "only",
            ("webrtc", "host_addresses"): ["127.0.0.1"]})
        self.rooms: list[Room] = []
        self.clients: list[tuple[LegionClient, str]] = []

    async def grow(self, count: int) -> None:
        async def one() -> tuple[Room, LegionClient, str]:
            room = await Room.join(room_config(self.settings, self_id=tab_id(), peer_filter=is_node))
            client = LegionClient(room, negotiate=False).start()
            peer_id, _ = await client.find_server(START_TIMEOUT_S)
            return room, client, peer_id

        for room, client, peer_id in await asyncio.gather(*(one() for _ in range(count - len(self.clients)))):
            self.rooms.append(room)
            self.clients.append((client, peer_id))

    async def close(self) -> None:
        for client, _ in self.clients:
            await client.aclose()
        await asyncio.gather(*(room.leave() for room in self.rooms), return_exceptions=True)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.out.parent / (args.out.name + ".logs")
    workdir.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in args.streams.split(",")]
    port = free_port()
    upstream_url = f"http://127.0.0.1:{port}"
    argv, ready = upstream_argv(args.upstream, port, args.rate, args.tokens, max(counts))
    results: dict[str, Any] = {}
    with relays.wsrelay_relay() as relay:
        async with child(argv, ready=ready, log=workdir / "upstream.log") as upstream, child(
                ["-m", "meshnode", "join", "--room", "remote-bench", "--app-id", APP_ID, "--strategy", "ws-relay",
                 "--relay", relay.url, "--ice-host-mode", "only", "--ice-host-address", "127.0.0.1",
                 "--engine-url", f"{upstream_url}?max_concurrent={max(counts)}", "--nick", "bench-node"],
                ready="serving ", log=workdir / "node.log",
                env={"MESHNODE_WEBRTC__ICE_SERVERS": "[]", "MESHNODE_ENGINE__MAX_TOKENS": str(max(1024, args.tokens)),
                     "MESHNODE_LIMITS__MAX_CONNECTIONS": str(max(counts) + 8)}) as node:
            tabs = Tabs(relay.url, "remote-bench")
            costs: dict[str, Any] = {}
            try:
                async with aiohttp.ClientSession() as session:
                    await direct_call(session, upstream_url, 4)  # warm both paths once
                    await tabs.grow(1)
                    await node_call(*tabs.clients[0], 4)
                    for n in counts:
                        print(f"== {n} concurrent streams", flush=True)
                        before, joined = cpu_seconds(node.pid), len(tabs.clients)
                        await tabs.grow(n)
                        if len(tabs.clients) > joined:  # the node's CPU for each new tab's connection
                            costs.setdefault("connect_cpu_ms", []).append(round(
                                (cpu_seconds(node.pid) - before) * 1000 / (len(tabs.clients) - joined), 1))
                        rows: dict[str, list[dict[str, Any]]] = {"direct": [], "node": []}
                        for run in range(args.runs):
                            rows["direct"] += await asyncio.gather(
                                *(direct_call(session, upstream_url, args.tokens) for _ in range(n)))
                            cpu = cpu_seconds(node.pid), cpu_seconds(upstream.pid)
                            rows["node"] += await asyncio.gather(
                                *(node_call(client, peer, args.tokens) for client, peer in tabs.clients[:n]))
                            streamed = sum(r["ids"] for r in rows["node"][-n:])
                            costs.setdefault(f"node_cpu_us_per_token_{n}", []).append(
                                round((cpu_seconds(node.pid) - cpu[0]) * 1e6 / streamed, 1))
                            costs.setdefault(f"upstream_cpu_us_per_token_{n}", []).append(
                                round((cpu_seconds(upstream.pid) - cpu[1]) * 1e6 / streamed, 1))
                            print(f"   run {run + 1}/{args.runs}: direct {summarise(rows['direct'][-n:])}"
                                  f"\n             node   {summarise(rows['node'][-n:])}", flush=True)
                        entry = {path: summarise(r) for path, r in rows.items()}
                        # Aggregate per run (each run is one burst of n), then the best run per path.
                        entry["added_ttft_ms_median"] = round(
                            entry["node"]["ttft_ms_median"] - entry["direct"]["ttft_ms_median"], 1)
                        bursts = {p: [summarise(r[i * n:(i + 1) * n])["tok_s"] for i in range(args.runs)]
                                  for p, r in rows.items()}
                        entry["tok_s_median_run"] = {p: statistics.median(v) for p, v in bursts.items()}
                        entry["tok_s_ratio"] = round(entry["tok_s_median_run"]["node"]
                                                     / entry["tok_s_median_run"]["direct"], 3)
                        results[str(n)] = entry
                    # Idle: what keeping every tab's connection up costs the node (keepalives, caps).
                    before = cpu_seconds(node.pid)
                    await asyncio.sleep(args.idle_seconds)
                    costs["idle_cpu_percent_per_connection"] = round(
                        (cpu_seconds(node.pid) - before) * 100 / args.idle_seconds / len(tabs.clients), 3)
                    costs["connections"] = len(tabs.clients)
            finally:
                await tabs.close()
    return {"results": results, "node_costs": costs}


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(document["results"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("direct", "node"):
        left.plot(counts, [document["results"][n][name]["ttft_ms_median"] for n in counts], marker="o", label=name)
        right.plot(counts, [document["results"][n]["tok_s_median_run"][name] for n in counts], marker="o", label=name)
    left.set_xlabel("concurrent streams")
    left.set_ylabel("median TTFT, ms")
    right.set_xlabel("concurrent streams")
    right.set_ylabel("aggregate tok/s")
    left.set_title(f"upstream: {document['upstream']}")
    right.set_title("node+upstream vs upstream directly")
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,8,32", help="concurrent streams, comma-separated (default 1,8,32)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per call (EOS ignored; default 128)")
    parser.add_argument("--rate", type=float, default=50.0, help="replay upstream: tok/s per stream (default 50)")
    parser.add_argument("--upstream", choices=("replay", "model"), default="replay",
                        help="replay: a recorded completion at --rate; model: meshnode serve-http, embedded model")
    parser.add_argument("--runs", type=int, default=3, help="bursts per concurrency and path (default 3)")
    parser.add_argument("--idle-seconds", type=float, default=20.0,
                        help="idle time at the end, for the CPU cost of keeping connections up (default 20)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    started = time.monotonic()
    apply_ice_policy(IcePolicy(host_addresses_mode="only", host_addresses=("127.0.0.1",)))  # the tabs' ICE
    measured = asyncio.run(bench(args))
    document = {"command": "python bench/remote_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "upstream": args.upstream,
                "rate_per_stream": args.rate if args.upstream == "replay" else None, "tokens": args.tokens,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
                "wall_s": round(time.monotonic() - started, 1), **measured}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    plot(document, args.out.with_suffix(".png"))
    print(json.dumps(measured, indent=1))
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
