"""The node: a backend, a Trystero room and the Legion services, run together until asked to stop."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from meshnode.generation.api import Backend, CodecMapInfo
from meshnode.legion.service import LegionService
from meshnode.link.pacer import Pacer
from meshnode.link.policy import StreamPolicy
from meshnode.node.assembly import ice_policy, room_config, service_config, stream_policy
from meshnode.room import Room
from meshnode.settings import Settings
from meshnode.transport.ice import apply_ice_policy

__all__ = ["DRAIN_DEADLINE_SECONDS", "Node"]

logger = logging.getLogger(__name__)

DRAIN_DEADLINE_SECONDS = 10.0
RELAY_WARNING_SECONDS = 10.0


class Node:
    """Serves one room with one backend.

    `run(stop)` joins, serves until `stop` is set, then drains (running streams get
    DRAIN_DEADLINE_SECONDS to finish, then are cancelled), tells peers it leaves, and leaves.
    `started` is set once the room is joined and the cap is going out.

    Streams are paced as ``settings.link`` says (:func:`~meshnode.node.assembly.stream_policy`);
    `pacing` replaces that policy (``meshnode bench`` compares other wire modes through it).
    """

    def __init__(self, settings: Settings, backend: Backend, *, relays: Sequence[Any] | None = None,
                 room_overrides: dict[str, Any] | None = None, pacing: StreamPolicy | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.pacing = pacing if pacing is not None else stream_policy(settings.link)
        self._relays = relays
        self._room_overrides = room_overrides or {}
        self.room: Room | None = None
        self.service: LegionService | None = None
        self.codec_map: CodecMapInfo | None = None
        """The map the node's frames need (known once :meth:`run` started)."""
        self.started = asyncio.Event()

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    async def run(self, stop: asyncio.Event, *, drain_seconds: float = DRAIN_DEADLINE_SECONDS) -> None:
        self.codec_map = await self.backend.codec_map()
        policy = ice_policy(self.settings.webrtc)
        apply_ice_policy(policy)
        room = await Room.join(room_config(self.settings, **self._room_overrides), relays=self._relays)
        self.room = room
        try:
            nick = self.settings.legion.nick or f"meshnode-{room.self_id[:4]}"
            service = LegionService(room, self.backend, config=service_config(self.settings, nick=nick,
                                                                               model_id=self.model_id),
                                    codec_map=self.codec_map, pacing=self.pacing)
            self.service = service
            room.on_peer_join(service.peer_joined)
            room.on_peer_leave(service.peer_left)
            room.on_join_error(lambda peer_id, reason: logger.warning("peer %s could not join: %s", peer_id, reason))
            logger.info("serving %s as %r (peer %s) in room %r, map %s; ICE host candidates: %s; uplink %s",
                        self.model_id, nick, room.self_id, self.settings.room.room, self.codec_map.map_id,
                        policy.describe(), self._describe_link())
            await self._serve(service, room, stop, drain_seconds)
        finally:
            await room.leave()
            if self.pacing is not None:
                await self.pacing.close()
            if isinstance(self.pacing, Pacer):  # one JSON line: what the link budget did
                logger.info("paced: %s", json.dumps(self.pacing.summary()))
            logger.info("left room %r", self.settings.room.room)

    def _describe_link(self) -> str:
        link = self.settings.link
        if link.uplink_bytes_per_second <= 0:
            legion = self.settings.legion
            return f"unlimited (frames of up to {legion.frame_max_ids} ids every {legion.frame_max_delay_ms} ms)"
        return f"{link.uplink_bytes_per_second:.0f} B/s, paced (windows up to {link.max_delay_ms} ms, admission)"

    async def _serve(self, service: LegionService, room: Room, stop: asyncio.Event, drain_seconds: float) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                serving = group.create_task(service.run(), name="node.service")
                watcher = group.create_task(self._watch_peers(room), name="node.peer-watch")
                stopper = group.create_task(stop.wait(), name="node.stop")
                self.started.set()
                await asyncio.wait([serving, stopper], return_when=asyncio.FIRST_COMPLETED)
                watcher.cancel()
                if not serving.done():
                    logger.info("draining: %d stream(s) running", len(service.calls))
                    await service.drain(drain_seconds)
                    serving.cancel()
                stopper.cancel()
        except ExceptionGroup as failed:  # a crashed service surfaces as itself
            raise failed.exceptions[0] from None

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
