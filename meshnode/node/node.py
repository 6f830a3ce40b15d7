"""The node: an engine, a Trystero room and the Legion services, run together until asked to stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from meshnode.generation.modelinfo import ModelInfo
from meshnode.room import Room, RoomConfig
from meshnode.legion.service import LegionService, ServiceConfig
from meshnode.settings import Settings

logger = logging.getLogger(__name__)

DRAIN_DEADLINE_SECONDS = 10.0
RELAY_WARNING_SECONDS = 10.0


def room_config(settings: Settings, **overrides: Any) -> RoomConfig:
    """The RoomConfig for the configured room (defaults: the Unstable Legion classic demo)."""
    r, w, limits = settings.room, settings.webrtc, settings.limits
    values: dict[str, Any] = dict(
        strategy=r.strategy,
        relay_urls=list(r.relays),
        app_id=r.app_id,
        room_id=r.room,
        password=r.password,
        ice_servers=list(w.ice_servers),
        host_addresses_mode=w.host_addresses_mode,
        host_addresses=list(w.host_addresses),
        # Per-peer limits against hostile room members (issue 8; docs/limits.md).
        max_message_bytes=limits.max_message_bytes,
        max_pending_messages_per_peer=limits.max_pending_messages_per_peer,
        max_pending_bytes_per_peer=limits.max_pending_bytes_per_peer,
        max_queued_messages_per_peer=limits.max_queued_messages_per_peer,
        max_queued_bytes_per_peer=limits.max_queued_bytes_per_peer,
        peer_rate_bytes_per_second=float(limits.peer_rate_bytes_per_second),
        peer_rate_frames_per_second=float(limits.peer_rate_messages_per_second),
        max_connections=limits.max_connections,
        ban_seconds=float(limits.ban_seconds),
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
        max_prompt_chars=settings.limits.max_prompt_chars,
        max_strikes_per_minute=settings.limits.max_strikes_per_minute,
        ban_seconds=float(settings.limits.ban_seconds),
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
                                map_bytes=lambda: self.info.map_bytes)
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
        """Say plainly when nobody shows up: usually relays that cannot be reached.

        If no relay is connected after RELAY_WARNING_SECONDS, warn (naming them) every such period
        until one connects (the adapters keep retrying with backoff meanwhile), then say so.
        """
        await asyncio.sleep(RELAY_WARNING_SECONDS)
        warned = False
        while not any(room.relay_status().values()):
            status = room.relay_status()
            logger.warning("none of the %d relay(s) can be reached (%s); retrying in the background with "
                           "backoff", len(status), ", ".join(status) or "none configured")
            warned = True
            await asyncio.sleep(RELAY_WARNING_SECONDS)
        if warned:
            up = [url for url, ok in room.relay_status().items() if ok]
            logger.warning("relay(s) reachable now: %s", ", ".join(up))
        if not room.peers:
            r = self.settings.room
            logger.info("no peer yet after %.0f s; tabs must use strategy %s, appId %r, room %r and the same "
                        "relays (%s)", RELAY_WARNING_SECONDS, r.strategy, r.app_id, r.room,
                        ", ".join(r.relays) or f"{r.strategy} defaults")


async def run_join(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.cli.commands import install_stop_signals, open_engine, remove_stop_signals

    async with open_engine(settings) as engine:
        node = Node(settings, engine)
        stop = asyncio.Event()
        installed = install_stop_signals(stop)
        web_runner = None
        try:
            if getattr(args, "web", None):
                from meshnode.node.webapp import start_web

                web_runner = await start_web(node, settings, args.web)
            await node.run(stop)
        finally:
            remove_stop_signals(installed)
            if web_runner is not None:
                await web_runner.cleanup()
    return 0
