"""A serving Node with a fake or real engine, and measuring askers, for the issue 8 tests and bench.

* :func:`node_settings` / :func:`start_node`: a real :class:`meshnode.node.node.Node` (real Room, real
  aiortc on 127.0.0.1) over a MemoryHub or real relays, with the engine of your choice.
* :class:`Asker`: the Legion client bound to one server, opening an envelope stream per call
  (HELLO → READY, stream id = call id); several calls may run at once on one asker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.lab.fakes import fake_backend
from meshnode.cli.config import load_settings
from meshnode.generation.api import Backend
from meshnode.legion.client import CallRecord, LegionClient
from meshnode.node.assembly import room_config
from meshnode.node.node import Node
from meshnode.room import Room
from meshnode.settings import Settings
from signaling.strategies.engine import StrategyTimers

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


class Asker(LegionClient):
    """A :class:`~meshnode.legion.client.LegionClient` that calls one server with envelope streams."""

    def __init__(self, room: Room, server: str) -> None:
        super().__init__(room, negotiate=True, compression=["identity"])
        self.server = server
        self.start()

    async def call(self, args: dict[str, Any], *, timeout: float = 30.0,  # type: ignore[override]
                   tool: str = "engine_run") -> CallRecord:
        try:
            return await super().call(self.server, args, timeout=timeout, tool=tool)
        except TimeoutError:
            record = list(self.calls.values())[-1]
            raise AssertionError(f"call {record.call_id} timed out: ready={record.ready.is_set()} "
                                 f"ids={len(record.ids)} finish={record.finish_reason} end={record.end_reason} "
                                 f"result={record.result} peers={self.room.peers}") from None

    async def close(self) -> None:
        await self.aclose()


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
