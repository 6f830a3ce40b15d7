"""The bench's processes, each run inside a namespace by the runner (``python -m bench.lab.roles``).

* ``signal``: the ws-relay signalling server (relay namespace).
* ``node``: one serving node; joins rooms ``<prefix>-0 … <prefix>-(P-1)`` with one peer id (one
  connection per requester, shared by its rooms, as Trystero shares connections per app) and
  serves each with a :class:`LegionService` using the mode's policy. Every requester has a room of
  its own, so requesters do not connect to each other (Trystero rooms are full meshes) and the
  node's link carries only node traffic.
* ``peers``: P requesters in one process, S streams each, started on ``go``; each stream records
  when its ids arrive.

Control: JSON lines on stdout (``{"event": "ready" | "result" | "stats", …}``), commands as lines
on stdin (``go``, ``stop``); EOF on stdin also stops. Everything is bounded by timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lab.modes import MODES, SSE_ACTION, Mode, make_pacer, policy_for, stream_hello_needed
from bench.lab.source import DEFAULT_COMPLETION_PATH, Completion, ReplayEngine
from meshnode.errors import FrameError, MeshError
from meshnode.generation.api import CodecMapInfo
from meshnode.generation.local import LocalBackend
from meshnode.generation.modelinfo import ModelInfo
from meshnode.legion.service import LegionService, ServiceConfig
from meshnode.link.pacer import decode_mux_body
from meshnode.room import Room, RoomConfig
from meshnode.transport.ice import IcePolicy, apply_ice_policy
from meshnode.wire import legion
from meshnode.wire.compression import StreamDecompressor
from meshnode.wire.envelopes import DATA, END, HELLO, READY, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame, StreamDecoder

logger = logging.getLogger("bench.lab.roles")

APP_ID = "meshnode-bench"
JOIN_TIMEOUT_SECONDS = 60.0
LEAVE_TIMEOUT_SECONDS = 10.0
STOP_GRACE_SECONDS = 5.0
READY_TIMEOUT_SECONDS = 10.0
TURN_USER = TURN_PASSWORD = "bench"


def emit(event: str, **fields: Any) -> None:
    """One control line on stdout."""
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def room_config(args: argparse.Namespace, room_id: str, self_id: str | None = None) -> RoomConfig:
    ice = [{"urls": args.turn, "username": TURN_USER, "credential": TURN_PASSWORD}] if args.turn else []
    return RoomConfig(strategy="ws-relay", relay_urls=[args.signal], app_id=APP_ID, room_id=room_id,
                      self_id=self_id, ice_servers=ice,
                      ice_transport_policy="relay" if args.turn else "all",
                      drain_timeout_seconds=30.0)


async def _leave_all(rooms: list[Room]) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LEAVE_TIMEOUT_SECONDS):
            await asyncio.gather(*(room.leave() for room in rooms), return_exceptions=True)


# -- signal -----------------------------------------------------------------------------------------


async def run_signal(args: argparse.Namespace) -> None:
    from signaling.servers.wsrelay import WsRelayServer

    async with WsRelayServer(args.host, args.port) as server:
        logger.info("signalling on %s", server.url)
        await server.serve_forever()


# -- node -------------------------------------------------------------------------------------------

BENCH_MAP = CodecMapInfo(map_id="bench", map_hash="sha256:" + "0" * 64, data=b"{}")
"""Replayed ids need no detokenizing at the node: a stand-in map."""


class NodeTrial:
    """One trial on the (long-lived) node process: rooms, services, engine, pacer."""

    def __init__(self, args: argparse.Namespace, command: dict[str, Any], completion: Completion,
                 real_engine: Any) -> None:
        self.args = args
        self.mode = MODES[command["mode"]]
        self.prefix = str(command["prefix"])
        self.room_count = int(command["rooms"])
        self.rate = float(command["rate"])
        self.tokens = int(command["tokens"])
        self.engine: Any = real_engine.engine if real_engine else ReplayEngine(completion, rate=self.rate,
                                                                              tokens=self.tokens)
        self.backend: Any = real_engine or LocalBackend(self.engine, self.engine, ModelInfo(self.engine.model_id, None))
        self.completion = completion
        self.pacer = (make_pacer(self.mode, budget=float(command["budget"]), rate=self.rate,
                                 headroom=float(command.get("headroom", 0.85))) if self.mode.paced else None)
        self.rooms: list[Room] = []
        self.services: list[LegionService] = []
        self.tasks: list[asyncio.Task[None]] = []

    def piece(self, index: int, token: int) -> str:
        if isinstance(self.engine, ReplayEngine):
            pieces = self.completion.pieces
            return pieces[index] if index < len(pieces) else f"<{token}>"
        return str(self.backend.decode([token]))

    async def start(self) -> str:
        self_id = secrets.token_hex(10)
        self.rooms = list(await asyncio.gather(*(Room.join(room_config(self.args, f"{self.prefix}-{i}", self_id))
                                                 for i in range(self.room_count))))
        config = ServiceConfig(nick="bench-node", model_id=self.engine.model_id, skills=["chat"], authoritative=[],
                               system_prompt="", max_calls_per_peer=10_000, calls_per_minute=1_000_000,
                               max_tokens=100_000, default_max_tokens=self.tokens)
        for index, room in enumerate(self.rooms):
            policy = policy_for(self.mode, pacer=self.pacer, sse_action=room.make_action(SSE_ACTION),
                                model_id=self.engine.model_id, piece=self.piece)
            service = LegionService(room, self.backend, config=config, codec_map=BENCH_MAP, pacing=policy)
            room.on_peer_join(service.peer_joined)
            room.on_peer_leave(service.peer_left)
            self.services.append(service)
            self.tasks.append(asyncio.get_running_loop().create_task(service.run(), name=f"bench.node.service[{index}]"))
        return self_id

    async def stop(self) -> dict[str, Any]:
        stats = {"pacer": self.pacer.stats.as_dict() if self.pacer else None,
                 "completed": sum(s.completed_calls for s in self.services),
                 "cancelled": sum(s.cancelled_calls for s in self.services)}
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pacer is not None:
            await self.pacer.close()
        await _leave_all(self.rooms)
        if isinstance(self.engine, ReplayEngine):
            await self.engine.close()
        return stats


async def run_node(args: argparse.Namespace) -> None:
    """A node that serves one trial at a time, on commands from stdin (JSON lines)."""
    import meshnode.generation.torch_backend  # noqa: F401 - torch loads once here, not inside the first trial's stream

    completion = Completion.load(Path(args.completion))
    real_engine: Any = None
    if args.engine == "real":
        from meshnode.generation.factory import build_engine
        from meshnode.generation.models import resolve_model
        from meshnode.generation.text import HFText
        from meshnode.settings import EngineSettings

        loaded = await asyncio.to_thread(resolve_model, None, device="cpu", progress=False)
        engine = build_engine(loaded, EngineSettings(max_concurrent=64, max_queue=256), progress=False)
        real_engine = LocalBackend(engine, HFText(loaded.tokenizer), ModelInfo(loaded.model_id, loaded.tokenizer))
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
                trial = NodeTrial(args, command, completion, real_engine)
                emit("ready", peer_id=await trial.start(), rooms=trial.room_count)
            elif command.get("cmd") == "end" and trial is not None:
                stats = await trial.stop()
                trial = None
                emit("stats", **stats)
            elif command.get("cmd") == "quit":
                break
    finally:
        if trial is not None:
            await trial.stop()
        if real_engine is not None:
            await real_engine.close()


# -- peers ------------------------------------------------------------------------------------------


@dataclass
class StreamRecord:
    """What one requested stream saw (times in seconds on this process's monotonic clock)."""

    peer: int
    call_id: str
    started: float = 0.0
    first: float | None = None
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    tokens: int = 0
    done: bool = False
    finish: str | None = None
    refused: str | None = None
    error: str | None = None
    result_at: float | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    compression: str = "identity"
    inflate: StreamDecompressor | None = None
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, count: int, now: float) -> None:
        if count <= 0:
            return
        if self.first is None:
            self.first = now
        self.arrivals.append((now, count))
        self.tokens += count

    def end(self, finish: str | None) -> None:
        self.done = True
        self.finish = finish
        self.finished.set()

    def summary(self, origin: float) -> dict[str, Any]:
        return {
            "peer": self.peer, "call_id": self.call_id, "started": round(self.started - origin, 4),
            "first": None if self.first is None else round(self.first - origin, 4),
            "arrivals": [[round(t - origin, 4), n] for t, n in self.arrivals], "tokens": self.tokens,
            "done": self.done, "finish": self.finish, "refused": self.refused, "error": self.error,
        }


class Requester:
    """One requesting peer: its own room, up to S streams to the node."""

    def __init__(self, index: int, room: Room, mode: Mode, streams: int) -> None:
        self.index = index
        self.room = room
        self.mode = mode
        self.streams_per_peer = streams
        self.caps = room.make_action("cap")
        self.cf = room.make_action("cf")
        self.tc = room.make_action("tc")
        self.sse = room.make_action(SSE_ACTION)
        self.node: str | None = None
        self.node_seen = asyncio.Event()
        self.node_available = True
        self.records: dict[str, StreamRecord] = {}
        self.by_mux: dict[tuple[str, int], StreamRecord] = {}

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._loop(self.caps, self._on_cap), name=f"peer{self.index}.cap")
            group.create_task(self._loop(self.cf, self._on_cf), name=f"peer{self.index}.cf")
            group.create_task(self._loop(self.tc, self._on_tc), name=f"peer{self.index}.tc")
            group.create_task(self._loop(self.sse, self._on_sse), name=f"peer{self.index}.sse")

    async def _loop(self, action: Any, handler: Any) -> None:
        while True:
            message = await action.receive()
            try:
                handler(message.peer_id, message.payload, time.monotonic())
            except (MeshError, ValueError, KeyError, TypeError) as exc:
                logger.debug("peer %d: dropped a message: %s", self.index, exc)

    def _on_cap(self, peer_id: str, payload: Any, now: float) -> None:
        cap = legion.parse_cap(payload)
        if "engine_run" in cap.tools:
            self.node = peer_id
            self.node_available = cap.available
            self.node_seen.set()

    def _on_tc(self, peer_id: str, payload: Any, now: float) -> None:
        frame = legion.parse_tool_frame(payload)
        record = self.records.get(frame.call_id)
        if record is None or not isinstance(frame, legion.ToolResult):
            return
        record.result_at = now
        if frame.status != "ok":
            if record.tokens == 0:
                record.refused = frame.error or frame.status
            else:
                record.error = frame.error or frame.status
            record.end(None)
        elif not record.done:
            record.end(record.finish or "result-before-end")

    def _frames(self, record: StreamRecord, data: bytes, now: float) -> None:
        raw = record.inflate.decompress(data) if record.inflate is not None else data
        for frame in record.decoder.feed(raw):
            record.add(len(frame.ids), now)
            if frame.done:
                record.end(frame.finish_reason or "stop")

    def _on_cf(self, peer_id: str, payload: Any, now: float) -> None:
        if not isinstance(payload, bytes):
            return
        decoded = decode_cf_payload(payload)
        if isinstance(decoded, CodecFrame):  # bare frames: only when this peer runs one stream
            open_records = [r for r in self.records.values() if not r.done]
            if len(open_records) == 1:
                open_records[0].add(len(decoded.ids), now)
                if decoded.done:
                    open_records[0].end(decoded.finish_reason or "stop")
            return
        record = self.records.get(decoded.stream_id)
        if decoded.kind == READY and record is not None:
            body = decoded.body if isinstance(decoded.body, dict) else {}
            record.compression = str(body.get("compression", "identity"))
            if record.compression == "zstd":
                record.inflate = StreamDecompressor()
            if "mux" in body:
                self.by_mux[(str(body["mux"]), int(body["mux_tag"]))] = record
            record.ready.set()
        elif decoded.kind == DATA and isinstance(decoded.body, bytes):
            if record is not None:
                self._frames(record, decoded.body, now)
                return
            for tag, data in decode_mux_body(decoded.body):
                target = self.by_mux.get((decoded.stream_id, tag))
                if target is not None:
                    self._frames(target, data, now)
        elif decoded.kind == END and record is not None and not record.done:
            body = decoded.body if isinstance(decoded.body, dict) else {}
            record.end(str(body.get("finish_reason", "stop")))

    def _on_sse(self, peer_id: str, payload: Any, now: float) -> None:
        if not isinstance(payload, dict) or not str(payload.get("id", "")).startswith("cmpl-"):
            return
        record = self.records.get(str(payload["id"])[5:])
        if record is None:
            return
        choice = payload["choices"][0]
        # One chunk per token; only a terminal chunk with no text carries none.
        record.add(0 if choice.get("finish_reason") is not None and not choice.get("text") else 1, now)
        if choice.get("finish_reason") is not None:
            record.end(choice["finish_reason"])

    async def start_stream(self, tokens: int) -> StreamRecord:
        call_id = "tc-" + secrets.token_hex(6)
        record = StreamRecord(peer=self.index, call_id=call_id, started=time.monotonic())
        self.records[call_id] = record
        assert self.node is not None
        if not self.node_available:  # as a Legion tab does: ask only peers whose cap says available
            record.refused = "cap.available is false"
            record.end(None)
            return record
        try:
            if stream_hello_needed(self.mode, self.streams_per_peer):
                body = self.mode.hello_body() or {"codec_version": 1, "accept_compression": ["identity"],
                                                  "accept_safety_policies": [], "intent": "chat"}
                await self.cf.send(encode_envelope(Envelope(kind=HELLO, stream_id=call_id, seq=0, body=body)),
                                   target=self.node)
                # Call only once READY has come back: the node handles cf and tc in separate loops,
                # so a call sent right behind its HELLO can overtake it (then no envelope, no mux).
                async with asyncio.timeout(READY_TIMEOUT_SECONDS):
                    await record.ready.wait()
            call = legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id, tool_name="engine_run",
                                     args={"user": "Tell me about meshes.", "max_tokens": tokens})
            await self.tc.send(call, target=self.node)
        except (MeshError, FrameError) as exc:
            record.error = f"request failed: {exc}"
            record.end(None)
        except TimeoutError:
            record.error = f"no READY within {READY_TIMEOUT_SECONDS:.0f} s"
            record.end(None)
        return record


async def run_peers(args: argparse.Namespace) -> None:
    mode = MODES[args.mode]
    counts = [int(c) for c in args.streams.split(",")]
    rooms = list(await asyncio.gather(*(Room.join(room_config(args, f"{args.prefix}-{i}"))
                                        for i in range(len(counts)))))
    requesters = [Requester(i, room, mode, counts[i]) for i, room in enumerate(rooms)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with asyncio.TaskGroup() as group:
            readers = [group.create_task(r.run(), name=f"bench.peer[{r.index}]") for r in requesters]
            try:
                async with asyncio.timeout(args.join_timeout):
                    await asyncio.gather(*(r.node_seen.wait() for r in requesters))
            except TimeoutError:
                pass
            ready = sum(r.node_seen.is_set() for r in requesters)
            emit("ready", peers=ready, wanted=len(requesters))
            reader = await stdin_lines()
            line = await reader.readline()
            if line.strip() != b"go" or ready < len(requesters):
                emit("result", streams=[], aborted=True)
                for task in readers:
                    task.cancel()
                return
            origin = time.monotonic()
            total = sum(counts)
            launches = []
            order = 0
            for round_index in range(max(counts, default=0)):  # round-robin over the peers
                for requester, count in zip(requesters, counts, strict=True):
                    if round_index >= count:
                        continue
                    delay = args.stagger * order / max(1, total)
                    order += 1
                    launches.append(group.create_task(_launch(requester, delay, args.tokens),
                                                      name=f"bench.launch[{order}]"))
            records = [await task for task in launches]
            async def all_finished() -> None:
                await asyncio.gather(*(r.finished.wait() for r in records))

            finished = group.create_task(all_finished(), name="bench.peers.finished")
            stopped = group.create_task(stop.wait(), name="bench.peers.stop")
            remaining = args.deadline - (time.monotonic() - origin)
            await asyncio.wait([finished, stopped], timeout=max(0.1, remaining),
                               return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            stopped.cancel()
            emit("result", streams=[r.summary(origin) for r in records], aborted=False,
                 elapsed=round(time.monotonic() - origin, 3))
            for task in readers:
                task.cancel()
    finally:
        await _leave_all(rooms)


async def _launch(requester: Requester, delay: float, tokens: int) -> StreamRecord:
    await asyncio.sleep(delay)
    return await requester.start_stream(tokens)


# -- entry ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.roles")
    sub = parser.add_subparsers(dest="role", required=True)
    sig = sub.add_parser("signal")
    sig.add_argument("--host", default="127.0.0.1")
    sig.add_argument("--port", type=int, required=True)
    for name in ("node", "peers"):
        p = sub.add_parser(name)
        p.add_argument("--signal", required=True, help="ws-relay URL")
        p.add_argument("--turn", default="", help="TURN URL; empty: host candidates on 127.0.0.1")
        p.add_argument("-v", "--verbose", action="count", default=0)
    node = sub.choices["node"]
    node.add_argument("--engine", choices=["replay", "real"], default="replay")
    node.add_argument("--completion", default=str(DEFAULT_COMPLETION_PATH))
    peers = sub.choices["peers"]
    peers.add_argument("--mode", choices=sorted(MODES), required=True)
    peers.add_argument("--prefix", required=True, help="room id prefix")
    peers.add_argument("--tokens", type=int, default=100_000)
    peers.add_argument("--streams", required=True, help="streams per peer, comma-separated (one per peer)")
    peers.add_argument("--stagger", type=float, default=1.0)
    peers.add_argument("--deadline", type=float, default=60.0)
    peers.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT_SECONDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * getattr(args, "verbose", 0)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s {args.role} %(levelname)s %(name)s: %(message)s")
    runner = {"signal": run_signal, "node": run_node, "peers": run_peers}[args.role]
    if args.role != "signal" and not getattr(args, "turn", None):  # loopback lab: host candidates on 127.0.0.1
        apply_ice_policy(IcePolicy(host_addresses_mode="only", host_addresses=("127.0.0.1",)))
    try:
        asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
