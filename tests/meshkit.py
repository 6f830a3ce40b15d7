"""A serving Node with a fake or real engine, and measuring askers, for the issue 8 tests and bench.

* :func:`node_settings` / :func:`start_node`: a real :class:`meshnode.node.node.Node` (real Room, real
  aiortc on 127.0.0.1) over a MemoryHub or real relays, with the engine of your choice.
* :class:`Asker`: a Python peer that opens an envelope stream per call (HELLO → READY, stream id =
  call id), calls ``engine_run`` and records what arrived: the ids, the terminal frame, the tool
  result, time to first token and tokens per second. Several calls may run at once on one asker.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meshnode.cli.config import load_settings
from meshnode.generation.api import Backend
from meshnode.node.assembly import room_config
from meshnode.node.node import Node
from meshnode.room import Room
from meshnode.settings import Settings
from meshnode.wire import legion
from meshnode.wire.envelopes import DATA, END, HELLO, READY, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame, decode_frame
from signaling.strategies.engine import StrategyTimers
from tests.fakes import fake_backend

LOOPBACK: dict[str, Any] = {
    "ice_servers": [],
    "timers": StrategyTimers(announce_interval_seconds=1.0),
}
JOIN_TIMEOUT = 30.0


def node_settings(app_id: str, *, strategy: str = "memory", relays: Sequence[str] = (),
                  **flags: Any) -> Settings:
    """Settings for a test room; `flags` maps "section.key" to a value."""
    values: dict[tuple[str, str], Any] = {
        ("room", "strategy"): strategy, ("room", "relays"): list(relays), ("room", "room"): "hardening",
        ("room", "app_id"): app_id, ("webrtc", "ice_servers"): [], ("webrtc", "host_addresses"): ["127.0.0.1"],
    }
    for dotted, value in flags.items():
        section, key = dotted.split(".", 1)
        values[(section, key)] = value
    settings, _ = load_settings(None, env={}, flags=values)
    return settings


@dataclass
class RunningNode:
    node: Node
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def peer_id(self) -> str:
        assert self.node.room is not None
        return self.node.room.self_id

    async def shutdown(self, timeout: float = 30.0) -> None:
        self.stop.set()
        async with asyncio.timeout(timeout):
            await asyncio.gather(self.task, return_exceptions=True)


async def start_node(settings: Settings, engine: Any, *, relays: Sequence[Any] | None = None,
                     drain_seconds: float = 5.0, overrides: dict[str, Any] | None = None,
                     stop: asyncio.Event | None = None) -> RunningNode:
    """Start `Node.run` in a task and wait until it serves (fake engines get a stub map)."""
    backend = engine if isinstance(engine, Backend) else fake_backend(engine)
    node = Node(settings, backend, relays=list(relays) if relays is not None else None,
                room_overrides={**LOOPBACK, **(overrides or {})})
    stop = stop or asyncio.Event()
    task = asyncio.create_task(node.run(stop, drain_seconds=drain_seconds), name="test.node")
    async with asyncio.timeout(JOIN_TIMEOUT):
        waiter = asyncio.create_task(node.started.wait())
        done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            task.result()
    return RunningNode(node=node, stop=stop, task=task)


async def join_room(settings: Settings, *, relays: Sequence[Any] | None = None, **overrides: Any) -> Room:
    return await Room.join(room_config(settings, **{**LOOPBACK, **overrides}),
                           relays=list(relays) if relays is not None else None)


@dataclass
class CallRecord:
    """What one engine_run call produced, as the asker saw it."""

    call_id: str
    sent_at: float
    ids: list[int] = field(default_factory=list)
    first_at: float | None = None
    done_at: float | None = None
    finish_reason: str | None = None
    end_reason: str | None = None
    result: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ttft(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent_at

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_at is None or self.done_at is None or len(self.ids) < 2:
            return None
        return (len(self.ids) - 1) / max(1e-6, self.done_at - self.first_at)


class Asker:
    """Calls engine_run on one serving peer with envelope streams; see the module docstring."""

    def __init__(self, room: Room, server: str) -> None:
        self.room = room
        self.server = server
        self.calls: dict[str, CallRecord] = {}
        self.foreign_frames = 0
        """cf messages that belong to no call of ours (must stay 0: frames are unicast)."""
        self._server_joined = asyncio.Event()
        if server in room.peers:
            self._server_joined.set()
        room.on_peer_join(lambda peer: self._server_joined.set() if peer == server else None)
        room.on_peer_leave(lambda peer: self._server_joined.clear() if peer == server else None)
        self._tc = room.make_action("tc")
        self._cf = room.make_action("cf")
        self._tasks = [asyncio.create_task(self._read_frames(), name="asker.cf"),
                       asyncio.create_task(self._read_results(), name="asker.tc")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def call(self, args: dict[str, Any], *, timeout: float = 30.0, tool: str = "engine_run") -> CallRecord:
        """One call: HELLO, wait READY, send the tool call, wait for the terminal frame and result."""
        call_id = "tc-" + secrets.token_hex(6)
        record = self.calls[call_id] = CallRecord(call_id=call_id, sent_at=time.monotonic())
        try:
            await self._call(record, call_id, tool, args, timeout)
        except TimeoutError:
            raise AssertionError(f"call {call_id} timed out: ready={record.ready.is_set()} ids={len(record.ids)} "
                                 f"finish={record.finish_reason} end={record.end_reason} "
                                 f"result={record.result} readers={[t.done() and t.exception() for t in self._tasks]} "
                                 f"peers={self.room.peers}") from None
        return record

    async def _call(self, record: CallRecord, call_id: str, tool: str, args: dict[str, Any], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            # Messages to a peer that has not joined (yet, from our side) go nowhere: wait for it.
            if self.server not in self.room.peers:
                await self._server_joined.wait()
            hello = Envelope(kind=HELLO, stream_id=call_id, seq=0, body={"codec_version": 1,
                                                                          "accept_compression": ["identity"]})
            await self._cf.send(encode_envelope(hello), target=self.server)
            await record.ready.wait()
            record.sent_at = time.monotonic()
            await self._tc.send(legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id, tool_name=tool,
                                                  args=args), target=self.server)
            await record.done.wait()

    async def _read_frames(self) -> None:
        while True:
            message = await self._cf.receive()
            try:
                decoded = decode_cf_payload(message.payload)
            except Exception:  # a test peer: count garbage, never crash
                self.foreign_frames += 1
                continue
            record = self.calls.get(decoded.stream_id) if isinstance(decoded, Envelope) else None
            if record is None or message.peer_id != self.server:
                self.foreign_frames += 1
                continue
            if decoded.kind == READY:
                record.ready.set()
            elif decoded.kind == DATA:
                assert isinstance(decoded.body, bytes)
                frame: CodecFrame = decode_frame(decoded.body)
                if frame.ids and record.first_at is None:
                    record.first_at = time.monotonic()
                record.ids.extend(frame.ids)
                if frame.done:
                    record.finish_reason = frame.finish_reason
                    record.done_at = time.monotonic()
            elif decoded.kind == END:
                record.end_reason = decoded.body.get("finish_reason") if isinstance(decoded.body, dict) else None
                if record.result is not None:
                    record.done.set()

    async def _read_results(self) -> None:
        while True:
            message = await self._tc.receive()
            payload = message.payload
            if not isinstance(payload, dict) or payload.get("kind") != "result":
                continue
            record = self.calls.get(str(payload.get("callId")))
            if record is None:
                continue
            record.result = payload
            if record.ready.is_set() is False:  # refused before any stream existed
                record.ready.set()
            if record.end_reason is not None or payload.get("status") != "ok":
                record.done.set()


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
