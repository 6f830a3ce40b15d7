"""The bench's processes, each run inside a namespace by the runner (``python -m bench.lab.roles``).

* ``signal``: the ws-relay signalling server (relay namespace).
* ``node``: a long-lived process that runs one :class:`meshnode.node.node.Node` per trial, in the
  trial's room, with settings loaded by meshnode's own loader from the node's config file plus
  the lab's room and ICE flags (the same path ``meshnode join`` takes); the engine replays the
  recorded completion in-process. Baseline modes swap in their link policy.
* ``upstream``: a Codec-HTTP server (meshnode's own) replaying the completion, for ``node`` mode's
  real ``meshnode join --engine-url`` process.
* ``tabs``: requesting tabs (:mod:`bench.lab.tabs`), started on ``go``; late tabs join mid-trial.

Control: JSON lines on stdout (``{"event": "ready" | "result" | "stats", …}``), commands as lines
on stdin; EOF on stdin also stops. Everything is bounded by timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.lab.modes import MODES, BaselinePolicy
from bench.lab.source import DEFAULT_COMPLETION_PATH, Completion, ReplayBackend
from bench.lab.tabs import Tab, is_node, tab_id
from meshnode.link.pacer import Pacer
from meshnode.room import Room

logger = logging.getLogger("bench.lab.roles")

APP_ID = "meshnode-bench"
TURN_USER = TURN_PASSWORD = "bench"
JOIN_TIMEOUT_SECONDS = 60.0
LEAVE_TIMEOUT_SECONDS = 10.0
NODE_START_SECONDS = 30.0
NODE_DRAIN_SECONDS = 2.0
DEFAULT_NODE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "uplink-50KBps.toml"


def emit(event: str, **fields: Any) -> None:
    """One control line on stdout."""
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def turn_server(turn_url: str) -> str:
    """``turn:HOST:PORT?…`` → the settings form with the lab's credentials."""
    return "turn:" + f"{TURN_USER}:{TURN_PASSWORD}@" + turn_url.split(":", 1)[1]


def lab_flags(*, room: str, signal_url: str, turn_url: str) -> dict[tuple[str, str], Any]:
    """Settings for the lab's room and ICE (what a user passes as --room/--relay/--ice-server)."""
    flags: dict[tuple[str, str], Any] = {
        ("room", "room"): room, ("room", "app_id"): APP_ID, ("room", "strategy"): "ws-relay",
        ("room", "relays"): [signal_url],
    }
    if turn_url:  # every byte through coturn, as on the shaped link
        flags.update({("webrtc", "ice_servers"): [turn_server(turn_url)], ("webrtc", "ice_transport_policy"): "relay"})
    else:  # loopback: host candidates on 127.0.0.1
        flags.update({("webrtc", "ice_servers"): [], ("webrtc", "host_addresses_mode"): "only",
                      ("webrtc", "host_addresses"): ["127.0.0.1"]})
    return flags


def workload_flags(*, budget: float, streams_per_tab: int, tokens: int) -> dict[tuple[str, str], Any]:
    """What the workload needs beyond the node's config: its uplink, calls per tab, answer length."""
    return {("link", "uplink_bytes_per_second"): budget,
            ("legion", "max_calls_per_peer"): max(2, streams_per_tab),
            ("legion", "calls_per_minute"): max(30, 6 * streams_per_tab),
            ("engine", "max_tokens"): max(1024, tokens), ("legion", "nick"): "bench-node"}


# -- signal -----------------------------------------------------------------------------------------


async def run_signal(args: argparse.Namespace) -> None:
    from signaling.servers.wsrelay import WsRelayServer

    async with WsRelayServer(args.host, args.port) as server:
        logger.info("signalling on %s", server.url)
        await server.serve_forever()


# -- node -------------------------------------------------------------------------------------------


class NodeTrial:
    """One trial on the long-lived node process: a Node in the trial's room."""

    def __init__(self, args: argparse.Namespace, command: dict[str, Any], completion: Completion) -> None:
        from meshnode.cli.config import load_settings
        from meshnode.node.node import Node

        mode = MODES[command["mode"]]
        tokens = int(command["tokens"])
        flags = lab_flags(room=str(command["room"]), signal_url=args.signal, turn_url=args.turn)
        flags.update(workload_flags(budget=float(command["budget"]) if mode.paced else 0.0,
                                    streams_per_tab=int(command["streams_per_tab"]), tokens=tokens))
        settings, _ = load_settings(args.config, env={}, flags=flags)
        self.backend = ReplayBackend(completion, rate=float(command["rate"]), tokens=tokens)
        pieces = completion.pieces
        policy = (BaselinePolicy(mode, model_id=completion.model_id,
                                 piece=lambda i, t: pieces[i] if i < len(pieces) else f"<{t}>")
                  if mode.baseline else None)
        self.node = Node(settings, self.backend, pacing=policy)
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        self.task = asyncio.get_running_loop().create_task(
            self.node.run(self.stop_event, drain_seconds=NODE_DRAIN_SECONDS), name="bench.node")
        started = asyncio.ensure_future(self.node.started.wait())
        try:
            done, _ = await asyncio.wait([started, self.task], timeout=NODE_START_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if self.task in done:
            self.task.result()
        if not self.node.started.is_set() or self.node.room is None:
            raise RuntimeError(f"the node did not start within {NODE_START_SECONDS:.0f} s")
        return self.node.room.self_id

    async def stop(self) -> dict[str, Any]:
        pacing = self.node.pacing
        service = self.node.service
        stats = {"pacer": pacing.summary() if isinstance(pacing, Pacer) else None,
                 "completed": service.completed_calls if service else 0,
                 "cancelled": service.cancelled_calls if service else 0}
        self.stop_event.set()
        if self.task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(NODE_DRAIN_SECONDS + LEAVE_TIMEOUT_SECONDS):
                    await asyncio.gather(self.task, return_exceptions=True)
            self.task.cancel()
        await self.backend.close()
        return stats


async def run_node(args: argparse.Namespace) -> None:
    """A node that serves one trial at a time, on commands from stdin (JSON lines)."""
    completion = Completion.load(Path(args.completion))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    reader = await stdin_lines()
    emit("started")
    trial: NodeTrial | None = None
    try:
        while not stop.is_set():
            line = await reader.readline()
            if not line:
                break
            try:
                command = json.loads(line)
            except ValueError:
                continue
            if command.get("cmd") == "trial" and trial is None:
                trial = NodeTrial(args, command, completion)
                emit("ready", peer_id=await trial.start())
            elif command.get("cmd") == "end" and trial is not None:
                stats = await trial.stop()
                trial = None
                emit("stats", **stats)
            elif command.get("cmd") == "quit":
                break
    finally:
        if trial is not None:
            await trial.stop()


# -- upstream ---------------------------------------------------------------------------------------


async def run_upstream(args: argparse.Namespace) -> None:
    """meshnode's Codec-HTTP server in front of the replay engine."""
    from aiohttp import web

    from meshnode.http.requests import Limits
    from meshnode.http.server import CodecHttpApp

    backend = ReplayBackend(Completion.load(Path(args.completion)), rate=args.rate, tokens=args.tokens)
    runner = web.AppRunner(CodecHttpApp(backend, Limits(max_tokens=max(1024, args.tokens or 0))).make_app())
    await runner.setup()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        emit("started", url=f"http://{args.host}:{args.port}")
        reader = await stdin_lines()
        waiter = asyncio.ensure_future(reader.read())  # EOF: the runner is gone
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
    finally:
        await runner.cleanup()
        await backend.close()


# -- tabs -------------------------------------------------------------------------------------------


async def _join_tab(args: argparse.Namespace, index: int, streams: int, *, late: bool) -> Tab:
    from meshnode.cli.config import load_settings
    from meshnode.node.assembly import room_config

    settings, _ = load_settings(None, env={}, flags=lab_flags(room=args.room, signal_url=args.signal,
                                                               turn_url=args.turn))
    room = await Room.join(room_config(settings, self_id=tab_id(), peer_filter=is_node))
    return Tab(index, room, MODES[args.mode], streams, late=late)


async def _leave_all(rooms: list[Room]) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LEAVE_TIMEOUT_SECONDS):
            await asyncio.gather(*(room.leave() for room in rooms), return_exceptions=True)


async def run_tabs(args: argparse.Namespace) -> None:
    """Early tabs connect, report ``ready``, and stream on ``go ORIGIN``; late tabs join mid-trial."""
    from meshnode.node.assembly import ice_policy
    from meshnode.settings import WebRTCSettings
    from meshnode.transport.ice import apply_ice_policy

    if not args.turn:
        apply_ice_policy(ice_policy(WebRTCSettings(host_addresses_mode="only", host_addresses=["127.0.0.1"])))
    counts = [int(c) for c in args.streams.split(",") if c]
    late_counts = [int(c) for c in args.late.split(",") if c]
    tabs = list(await asyncio.gather(*(_join_tab(args, args.first_index + i, n, late=False)
                                       for i, n in enumerate(counts))))
    late_tabs: list[Tab] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with asyncio.TaskGroup() as group:
            readers = [group.create_task(t.run(), name=f"bench.tab[{t.index}]") for t in tabs]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.join_timeout):
                    await asyncio.gather(*(t.node_seen.wait() for t in tabs))
            ready = sum(t.node_seen.is_set() for t in tabs)
            emit("ready", peers=ready, wanted=len(tabs))
            reader = await stdin_lines()
            words = (await reader.readline()).split()
            if not words or words[0] != b"go" or ready < len(tabs):
                emit("result", streams=[], aborted=True)
                for task in readers:
                    task.cancel()
                return
            origin = float(words[1]) if len(words) > 1 else time.monotonic()
            await asyncio.sleep(max(0.0, origin - time.monotonic()))
            launches = []
            for order, (tab, delay) in enumerate(_schedule(tabs, args)):
                launches.append(group.create_task(_launch(tab, delay, args.tokens), name=f"bench.launch[{order}]"))
            late_runs = [group.create_task(_late_tab(args, group, late_tabs, args.first_late_index + i, n,
                                                     args.late_at + i * args.late_spacing, readers),
                                           name=f"bench.late[{i}]")
                         for i, n in enumerate(late_counts)]
            records = [await task for task in launches]
            for task in late_runs:
                records.extend(await task)

            async def all_finished() -> None:
                await asyncio.gather(*(r.finished.wait() for r in records))

            finished = group.create_task(all_finished(), name="bench.tabs.finished")
            stopped = group.create_task(stop.wait(), name="bench.tabs.stop")
            remaining = args.deadline - (time.monotonic() - origin)
            await asyncio.wait([finished, stopped], timeout=max(0.1, remaining), return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            stopped.cancel()
            every = [*tabs, *late_tabs]
            emit("result", streams=[r.summary(origin) for r in records], aborted=False,
                 elapsed=round(time.monotonic() - origin, 3),
                 multi_object_messages=sum(t.multi_object_messages for t in every),
                 late_connect_s=[t.connect_s for t in late_tabs])
            for task in readers:
                task.cancel()
    finally:
        await _leave_all([t.room for t in [*tabs, *late_tabs]])


def _schedule(tabs: list[Tab], args: argparse.Namespace) -> list[tuple[Tab, float]]:
    """(tab, delay) per stream: round-robin over the tabs, spread over the ramp by global order."""
    out = []
    for round_index in range(max((t.streams for t in tabs), default=0)):
        for position, tab in enumerate(tabs):
            if round_index < tab.streams:
                order = args.first_index + position + round_index * args.total_tabs
                out.append((tab, args.stagger * order / max(1, args.total_streams)))
    return out


async def _launch(tab: Tab, delay: float, tokens: int) -> Any:
    await asyncio.sleep(delay)
    return await tab.start_stream(tokens)


async def _late_tab(args: argparse.Namespace, group: asyncio.TaskGroup, late_tabs: list[Tab], index: int,
                    streams: int, at: float, readers: list[asyncio.Task[None]]) -> list[Any]:
    """A tab that joins the room `at` seconds into the trial and streams once the node's cap arrives."""
    from bench.lab.tabs import StreamRecord

    await asyncio.sleep(at)
    joined = time.monotonic()
    tab = await _join_tab(args, index, streams, late=True)
    late_tabs.append(tab)
    readers.append(group.create_task(tab.run(), name=f"bench.late-tab[{index}]"))
    try:
        async with asyncio.timeout(args.join_timeout):
            await tab.node_seen.wait()
    except TimeoutError:
        record = StreamRecord(tab=index, call_id=f"late-{index}", late=True, started=joined)
        record.fail(f"late tab: no connection to the node within {args.join_timeout:.0f} s")
        return [record]
    tab.connect_s = round(time.monotonic() - joined, 2)
    return [await tab.start_stream(args.tokens) for _ in range(streams)]


# -- entry ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.roles")
    sub = parser.add_subparsers(dest="role", required=True)
    sig = sub.add_parser("signal")
    sig.add_argument("--host", default="127.0.0.1")
    sig.add_argument("--port", type=int, required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--rate", type=float, required=True)
    up.add_argument("--tokens", type=int)
    up.add_argument("--completion", default=str(DEFAULT_COMPLETION_PATH))
    for name in ("node", "tabs"):
        p = sub.add_parser(name)
        p.add_argument("--signal", required=True, help="ws-relay URL")
        p.add_argument("--turn", default="", help="TURN URL; empty: host candidates on 127.0.0.1")
        p.add_argument("-v", "--verbose", action="count", default=0)
    node = sub.choices["node"]
    node.add_argument("--config", default=str(DEFAULT_NODE_CONFIG), help="the node's TOML settings")
    node.add_argument("--completion", default=str(DEFAULT_COMPLETION_PATH))
    tabs = sub.choices["tabs"]
    tabs.add_argument("--mode", choices=sorted(MODES), required=True)
    tabs.add_argument("--room", required=True)
    tabs.add_argument("--tokens", type=int, default=100_000)
    tabs.add_argument("--streams", required=True, help="streams per early tab, comma-separated")
    tabs.add_argument("--late", default="", help="streams per late tab, comma-separated")
    tabs.add_argument("--late-at", type=float, default=5.0, help="seconds after go when the first late tab joins")
    tabs.add_argument("--late-spacing", type=float, default=0.5, help="seconds between late tabs")
    tabs.add_argument("--first-index", type=int, default=0, help="global index of this process's first tab")
    tabs.add_argument("--first-late-index", type=int, default=0)
    tabs.add_argument("--total-tabs", type=int, default=1, help="early tabs over all processes")
    tabs.add_argument("--total-streams", type=int, default=1, help="early streams over all processes")
    tabs.add_argument("--stagger", type=float, default=1.0)
    tabs.add_argument("--deadline", type=float, default=60.0)
    tabs.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT_SECONDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * getattr(args, "verbose", 0)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s {args.role} %(levelname)s %(name)s: %(message)s")
    runner = {"signal": run_signal, "node": run_node, "upstream": run_upstream, "tabs": run_tabs}[args.role]
    try:
        asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
