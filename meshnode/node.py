"""The node: an engine, a Trystero room and the Legion services, run together until asked to stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from meshnode.modelinfo import ModelInfo
from meshnode.room import Room, RoomConfig
from meshnode.services import LegionService, ServiceConfig
from meshnode.settings import Settings

logger = logging.getLogger(__name__)

DRAIN_DEADLINE_SECONDS = 10.0
RELAY_WARNING_SECONDS = 10.0


def room_config(settings: Settings, **overrides: Any) -> RoomConfig:
    """The RoomConfig for the configured room (defaults: the Unstable Legion classic demo)."""
    r, w = settings.room, settings.webrtc
    values: dict[str, Any] = dict(
        strategy=r.strategy,
        relay_urls=list(r.relays),
        app_id=r.app_id,
        room_id=r.room,
        password=r.password,
        ice_servers=list(w.ice_servers),
        host_addresses_mode=w.host_addresses_mode,
        host_addresses=list(w.host_addresses),
    )
    values.update(overrides)
    return RoomConfig(**values)


def service_config(settings: Settings, *, nick: str, model_id: str) -> ServiceConfig:
    legion, engine = settings.legion, settings.engine
    return ServiceConfig(
        nick=nick,
        model_id=model_id,
        skills=list(legion.skills),
        authoritative=list(legion.authoritative),
        system_prompt=legion.system_prompt,
        answer_broadcast_ai=legion.answer_broadcast_ai,
        max_calls_per_peer=legion.max_calls_per_peer,
        calls_per_minute=legion.calls_per_minute,
        max_prompt_tokens=engine.max_prompt_tokens,
        max_tokens=engine.max_tokens,
        default_max_tokens=engine.default_max_tokens,
        frame_max_ids=legion.frame_max_ids,
        frame_max_delay_seconds=legion.frame_max_delay_ms / 1000.0,
    )


class Node:
    """Serves one room with one engine.

    `run(stop)` joins, serves until `stop` is set, then drains (running streams get
    DRAIN_DEADLINE_SECONDS to finish, then are cancelled), tells peers it leaves, and leaves.
    `started` is set once the room is joined and the cap is going out.
    """

    def __init__(self, settings: Settings, engine: Any, *, relays: Sequence[Any] | None = None,
                 room_overrides: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.info = ModelInfo(model_id=engine.model_id, tokenizer=engine.tokenizer)
        self._relays = relays
        self._room_overrides = room_overrides or {}
        self.room: Room | None = None
        self.service: LegionService | None = None
        self.started = asyncio.Event()

    async def run(self, stop: asyncio.Event, *, drain_seconds: float = DRAIN_DEADLINE_SECONDS) -> None:
        map_hash = await asyncio.to_thread(lambda: self.info.map_hash)  # builds the map once, off the loop
        room = await Room.join(room_config(self.settings, **self._room_overrides), relays=self._relays)
        self.room = room
        nick = self.settings.legion.nick or f"meshnode-{room.self_id[:4]}"
        service = LegionService(room, self.engine, config=service_config(self.settings, nick=nick,
                                                                         model_id=self.info.model_id),
                                map_id=self.info.map_id, map_hash=map_hash,
                                map_document=lambda: self.info.map_document)
        self.service = service
        room.on_peer_join(service.peer_joined)
        room.on_peer_leave(service.peer_left)
        room.on_join_error(lambda peer_id, reason: logger.warning("peer %s could not join: %s", peer_id, reason))
        logger.info("serving %s as %r (peer %s) in room %r, map %s", self.info.model_id, nick, room.self_id,
                    self.settings.room.room, self.info.map_id)
        try:
            serving = asyncio.create_task(service.run(), name="node.service")
            watcher = asyncio.create_task(self._watch_peers(room), name="node.peer-watch")
            self.started.set()
            stopper = asyncio.create_task(stop.wait(), name="node.stop")
            await asyncio.wait([serving, stopper], return_when=asyncio.FIRST_COMPLETED)
            watcher.cancel()
            if serving.done():
                serving.result()  # a crashed service surfaces here
            logger.info("draining: %d stream(s) running", len(service.calls))
            await service.drain(drain_seconds)
            serving.cancel()
            stopper.cancel()
            await asyncio.gather(serving, stopper, watcher, return_exceptions=True)
        finally:
            await room.leave()
            logger.info("left room %r", self.settings.room.room)

    async def _watch_peers(self, room: Room) -> None:
        """Say plainly when nobody shows up: usually relays that cannot be reached."""
        await asyncio.sleep(RELAY_WARNING_SECONDS)
        if not room.peers:
            logger.warning("no peer has joined after %.0f s; check that the relays (%s) are reachable and "
                           "that tabs use the same appId/room/strategy", RELAY_WARNING_SECONDS,
                           ", ".join(self.settings.room.relays) or f"{self.settings.room.strategy} defaults")


async def run_join(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.commands import install_stop_signals, open_engine, remove_stop_signals

    async with open_engine(settings) as engine:
        node = Node(settings, engine)
        stop = asyncio.Event()
        installed = install_stop_signals(stop)
        web_runner = None
        try:
            if getattr(args, "web", None):
                from meshnode.webapp import start_web

                web_runner = await start_web(node, settings, args.web)
            await node.run(stop)
        finally:
            remove_stop_signals(installed)
            if web_runner is not None:
                await web_runner.cleanup()
    return 0
