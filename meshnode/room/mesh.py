"""The connections of one (selfId, appId), shared by that app's rooms (trystero-wire §8.1, P16).

:class:`AppMesh` owns the live and negotiating :class:`PeerLink` objects, demultiplexes incoming
frames to rooms by room token, applies per-connection flood limits and bans, and closes
connections no room uses. It talks to rooms only through :class:`RoomEndpoint`.
:class:`RoomPeerFactory` is one room's :class:`signaling.strategies.PeerFactory` on its mesh.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import ClassVar, Protocol

from meshnode.errors import ConfigError, MeshError
from meshnode.room.config import RoomConfig
from meshnode.room.inbound import InboundLimits, inbound_limits
from meshnode.tasks import TaskOwner
from meshnode.transport.peer import NegotiationFailed, PeerClosed, PeerError, PeerLink
from meshnode.wire.roomframes import PresenceFrame, decode_frame, encode_presence_frame
from signaling.base import SignalingError
from signaling.protocol.messages import Candidate
from signaling.strategies import NegotiationError

__all__ = ["AppMesh", "RoomEndpoint", "RoomPeerFactory"]

logger = logging.getLogger(__name__)

MAX_BANNED_PEERS = 1024
"""Banned peer ids remembered at once (oldest forgotten first)."""
LEAVE_SEND_TIMEOUT_SECONDS = 2.0
"""Bound on sending presence(0) while leaving."""
LINK_FLUSH_TIMEOUT_SECONDS = 1.0
"""Bound on letting queued frames go out before closing a connection."""


class RoomEndpoint(Protocol):
    """What the mesh needs from a room that uses its connections."""

    token: str

    @property
    def config(self) -> RoomConfig: ...

    def attach(self, peer_id: str, link: PeerLink, *, send_presence: bool) -> object | None:
        """Bind `link` to the room and run the join handshake (no-op if bound)."""
        ...

    def is_bound(self, peer_id: str) -> bool: ...

    def on_presence(self, peer_id: str, link: PeerLink, *, present: bool) -> None: ...

    def on_chunk(self, peer_id: str, link: PeerLink, chunk: bytes) -> None: ...

    def on_link_closed(self, peer_id: str, link: PeerLink) -> None: ...

    def on_peer_dropped(self, peer_id: str) -> None:
        """The peer was dropped for abuse: forget its queued input now."""
        ...

    def release_negotiation(self, peer_id: str, link: PeerLink) -> None:
        """The signalling negotiation that made `link` is over (it opened or closed)."""
        ...


class AppMesh:
    """The connections of one (selfId, appId), shared by that app's rooms (§8.1, P16)."""

    _registry: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], AppMesh]]] = (
        weakref.WeakKeyDictionary())
    """Meshes per event loop (a closed loop's meshes go with it), then per (selfId, appId)."""

    def __init__(self, self_id: str, app_id: str) -> None:
        self.self_id = self_id
        self.app_id = app_id
        self.rooms: dict[str, RoomEndpoint] = {}  # by room token
        self.live: dict[str, PeerLink] = {}  # open links by remote peer id
        self.pending: dict[PeerLink, RoomEndpoint] = {}  # negotiating link -> room that created it
        self.banned: OrderedDict[str, float] = OrderedDict()  # peer id -> monotonic time ban ends
        self.dropped_peers = 0
        """Connections closed for abuse (flood limits, Room.drop_peer)."""
        self._limits: dict[PeerLink, InboundLimits] = {}
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks = TaskOwner(f"mesh[{self_id[:8]}:{app_id}]")

    @classmethod
    def get(cls, self_id: str, app_id: str) -> AppMesh:
        meshes = cls._registry.setdefault(asyncio.get_running_loop(), {})
        mesh = meshes.get((self_id, app_id))
        if mesh is None:
            mesh = meshes[(self_id, app_id)] = cls(self_id, app_id)
        return mesh

    # -- rooms -------------------------------------------------------------------------------------

    def add_room(self, room: RoomEndpoint) -> None:
        if room.token in self.rooms:
            raise ConfigError(f"already in room {room.config.room_id!r} as {self.self_id}")
        self.rooms[room.token] = room
        frame = encode_presence_frame(room.token, True)
        for link in list(self.live.values()):  # joined later: tell every connection (§8.1)
            self._tasks.spawn(self._send_quietly(link, [frame]), "presence")

    async def remove_room(self, room: RoomEndpoint) -> None:
        """Send presence(0) everywhere, then close connections no other room uses."""
        self.rooms.pop(room.token, None)
        frame = encode_presence_frame(room.token, False)
        links = list(self.live.values())
        try:
            async with asyncio.timeout(LEAVE_SEND_TIMEOUT_SECONDS):
                await asyncio.gather(*(self._send_quietly(link, [frame]) for link in links))
        except TimeoutError:
            logger.debug("presence(0) did not go out everywhere in time")
        unused = [
            link
            for peer_id, link in self.live.items()
            if not any(other.is_bound(peer_id) for other in self.rooms.values())
        ]
        await asyncio.gather(*(self._close_link(link) for link in unused))
        for link, origin in list(self.pending.items()):
            if origin is room:
                await link.close()
        if not self.rooms:
            await self.close()

    async def close(self) -> None:
        for meshes in self._registry.values():
            if meshes.get((self.self_id, self.app_id)) is self:
                del meshes[(self.self_id, self.app_id)]
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        for link in [*self.live.values(), *self.pending]:
            await link.close()
        await self._tasks.aclose()

    # -- links -------------------------------------------------------------------------------------

    def new_link(self, room: RoomEndpoint, peer_id: str | None) -> PeerLink:
        config = room.config
        link: PeerLink

        def on_open() -> None:
            self._on_open(link)

        def on_message(data: bytes) -> None:
            self._on_frame(link, data)

        def on_close() -> None:
            self._on_close(link)

        link = PeerLink(
            ice_servers=config.ice_servers,
            peer_id=peer_id,
            on_open=on_open,
            on_message=on_message,
            on_close=on_close,
            buffered_amount_low_bytes=config.buffered_amount_low_bytes,
            high_water_bytes=config.high_water_bytes,
            drain_timeout_seconds=config.drain_timeout_seconds,
            disconnected_grace_seconds=config.disconnected_grace_seconds,
            ice_transport_policy=config.ice_transport_policy,
        )
        self.pending[link] = room
        return link

    def _on_open(self, link: PeerLink) -> None:
        origin = self.pending.pop(link, None)
        peer_id = link.peer_id
        if peer_id is None:
            logger.warning("a connection opened before its peer id was known; closing it")
            self._tasks.spawn(link.close(), "close")
            return
        if self.is_banned(peer_id):
            logger.info("closing a connection from banned peer %s", peer_id)
            self._tasks.spawn(link.close(), "close-banned")
            return
        existing = self.live.get(peer_id)
        if existing is not None and existing is not link:
            # Two negotiations crossed (torrent offers both ways, a re-offer racing a slow open).
            # Trystero keeps the newer connection and destroys the older one (room.ts onPeer,
            # shared-peer register); keeping the older one here would leave each side bound to a
            # different connection, both waiting for a handshake that never comes.
            logger.info("second connection to %s opened; it replaces the first, as in Trystero", peer_id)
            self._forget(peer_id, existing)
            self._tasks.spawn(existing.close(), "close-replaced")
        self.live[peer_id] = link
        self._limits[link] = inbound_limits(
            (room.config for room in self.rooms.values()), time.monotonic()
        )
        logger.info("connected to %s (app %s)", peer_id, self.app_id)
        if origin is not None:
            origin.release_negotiation(peer_id, link)
        self._tasks.spawn(self._activate(link, peer_id, origin), f"open[{peer_id[:8]}]")

    async def _activate(self, link: PeerLink, peer_id: str, origin: RoomEndpoint | None) -> None:
        # A new shared connection announces every room we are in, then the room whose signalling
        # created it runs its handshake (§8.1); the ordered channel keeps presence first.
        frames = [encode_presence_frame(token, True) for token in self.rooms]
        if not await self._send_quietly(link, frames):
            return
        if origin is not None and origin.token in self.rooms:
            origin.attach(peer_id, link, send_presence=False)
        self._check_idle(peer_id)

    def _on_frame(self, link: PeerLink, data: bytes) -> None:
        peer_id = link.peer_id
        if peer_id is None or self.live.get(peer_id) is not link:
            return
        limits = self._limits.get(link)
        if limits is not None:
            over = limits.admit(len(data), time.monotonic())
            if over is not None:
                self.drop_peer(peer_id, f"inbound flood: {over}")
                return
        try:
            frame = decode_frame(data)
        except MeshError as exc:  # FrameError: remote garbage
            logger.debug("bad frame from %s: %s", peer_id, exc)
            return
        room = self.rooms.get(frame.token)
        if room is None:
            logger.debug("frame from %s for a room we are not in", peer_id)
            return
        if isinstance(frame, PresenceFrame):
            room.on_presence(peer_id, link, present=frame.present)
        else:
            room.on_chunk(peer_id, link, frame.chunk)

    def _on_close(self, link: PeerLink) -> None:
        origin = self.pending.pop(link, None)
        peer_id = link.peer_id
        if origin is not None and peer_id is not None:
            origin.release_negotiation(peer_id, link)
        self._limits.pop(link, None)
        if peer_id is None or self.live.get(peer_id) is not link:
            return
        logger.info("connection to %s closed", peer_id)
        self._forget(peer_id, link)

    def _forget(self, peer_id: str, link: PeerLink) -> None:
        """Drop the live connection `link` to `peer_id`; every room bound to it sees the peer leave."""
        del self.live[peer_id]
        self._limits.pop(link, None)
        timer = self._idle_timers.pop(peer_id, None)
        if timer is not None:
            timer.cancel()
        for room in list(self.rooms.values()):
            room.on_link_closed(peer_id, link)

    def _unused(self, peer_id: str, link: PeerLink) -> bool:
        """True while `link` is the live connection to `peer_id` and no room is bound to it."""
        return self.live.get(peer_id) is link and not any(
            room.is_bound(peer_id) for room in self.rooms.values()
        )

    def handshake_timed_out(self, peer_id: str, link: PeerLink) -> None:
        """Close a connection no room could complete a handshake on.

        The remote then most likely holds a different connection to us as its own; while this one
        stays live, every signal from the remote would re-bind it (is_live) and time out again.
        Closing it lets the next offer negotiate a connection both sides use.
        """
        if self._unused(peer_id, link):
            logger.info("closing the connection to %s: no handshake completed on it", peer_id)
            self._tasks.spawn(link.close(), "close-no-handshake")

    def _check_idle(self, peer_id: str) -> None:
        """Close a live connection that no room has used for the idle period (§9.2)."""
        link = self.live.get(peer_id)
        if link is None or peer_id in self._idle_timers or not self._unused(peer_id, link):
            return
        delay = min(
            (room.config.idle_connection_close_seconds for room in self.rooms.values()),
            default=0.0,
        )

        def expire() -> None:
            self._idle_timers.pop(peer_id, None)
            if self._unused(peer_id, link):
                logger.info("closing idle connection to %s", peer_id)
                self._tasks.spawn(link.close(), "close-idle")

        self._idle_timers[peer_id] = asyncio.get_running_loop().call_later(delay, expire)

    def unbound(self, peer_id: str) -> None:
        """A room dropped its binding to `peer_id`."""
        timer = self._idle_timers.pop(peer_id, None)
        if timer is not None:
            timer.cancel()
        self._check_idle(peer_id)

    # -- abuse -------------------------------------------------------------------------------------

    def is_banned(self, peer_id: str) -> bool:
        until = self.banned.get(peer_id)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self.banned[peer_id]
            return False
        return True

    def at_capacity(self) -> bool:
        """True when no further connection may be negotiated (RoomConfig.max_connections)."""
        limits = [r.config.max_connections for r in self.rooms.values() if r.config.max_connections > 0]
        return bool(limits) and len(self.live) + len(self.pending) >= min(limits)

    def drop_peer(self, peer_id: str, reason: str, ban_seconds: float | None = None) -> None:
        """Close the connection to `peer_id` (every room sees it leave) and refuse it for a while."""
        if ban_seconds is None:
            ban_seconds = max((r.config.ban_seconds for r in self.rooms.values()), default=60.0)
        if ban_seconds > 0:
            self.banned[peer_id] = time.monotonic() + ban_seconds
            self.banned.move_to_end(peer_id)
            while len(self.banned) > MAX_BANNED_PEERS:
                self.banned.popitem(last=False)
        links = [link for link in (self.live.get(peer_id), *self.pending) if link is not None
                 and link.peer_id == peer_id]
        if not links:
            return
        self.dropped_peers += 1
        logger.warning("dropping peer %s: %s (refused for %.0f s)", peer_id, reason, ban_seconds)
        # At once, not when the close completes: every room forgets the peer's queued input and
        # sees it leave now, so nothing it sent before the ban is still processed.
        for room in list(self.rooms.values()):
            room.on_peer_dropped(peer_id)
        live = self.live.get(peer_id)
        if live is not None and live in links:
            self._forget(peer_id, live)
        for link in links:
            self.pending.pop(link, None)
            self._limits.pop(link, None)
            self._tasks.spawn(link.close(), f"drop[{peer_id[:8]}]")

    async def _close_link(self, link: PeerLink) -> None:
        await link.flush(LINK_FLUSH_TIMEOUT_SECONDS)
        await link.close()

    @staticmethod
    async def _send_quietly(link: PeerLink, frames: Iterable[bytes]) -> bool:
        """Send frames in order; False (logged) if the connection is gone."""
        try:
            for frame in frames:
                await link.send(frame)
        except PeerError as exc:
            logger.debug("send to %s failed: %s", link.peer_id, exc)
            return False
        return True


class RoomPeerFactory:
    """The :class:`signaling.strategies.topic.PeerFactory` of one room, on its app mesh."""

    def __init__(self, room: RoomEndpoint, mesh: AppMesh) -> None:
        self._room = room
        self._mesh = mesh

    def is_live(self, peer_id: str) -> bool:
        link = self._mesh.live.get(peer_id)
        if link is None or not link.is_open:
            return False
        # A signal from a connected peer for this room attaches the connection to it (§8.1).
        self._room.attach(peer_id, link, send_presence=True)
        return True

    def accepts(self, peer_id: str) -> bool:
        wanted = self._room.config.peer_filter
        return not self._mesh.is_banned(peer_id) and (wanted is None or wanted(peer_id))

    def _refuse(self, peer_id: str | None) -> None:
        if peer_id is not None and self._mesh.is_banned(peer_id):
            raise SignalingError(f"peer {peer_id} is banned for abuse")
        if self._mesh.at_capacity():
            raise SignalingError("connection limit reached (room.max_connections)")

    async def create_offer(self, peer_id: str | None) -> tuple[PeerLink, str]:
        self._refuse(peer_id)
        link = self._mesh.new_link(self._room, peer_id)
        try:
            return link, await link.create_offer()
        except PeerClosed as exc:  # closed while gathering (leaving): nothing to report
            raise SignalingError(str(exc)) from exc
        except NegotiationFailed as exc:
            await link.close()
            raise NegotiationError(str(exc)) from exc
        except BaseException:
            await link.close()
            raise

    async def accept_offer(self, peer_id: str, sdp: str) -> tuple[PeerLink, str]:
        self._refuse(peer_id)
        link = self._mesh.new_link(self._room, peer_id)
        try:
            return link, await link.accept_offer(sdp)
        except NegotiationFailed as exc:  # the remote's SDP: the engine logs it as a warning
            await link.close()
            raise NegotiationError(str(exc)) from exc
        except PeerClosed as exc:  # closed while gathering (leaving): nothing to report
            raise SignalingError(str(exc)) from exc
        except BaseException:
            await link.close()
            raise

    async def accept_answer(self, handle: PeerLink, peer_id: str, sdp: str) -> None:
        handle.peer_id = peer_id
        try:
            await handle.accept_answer(sdp)
        except NegotiationFailed as exc:
            raise NegotiationError(str(exc)) from exc

    async def add_candidate(self, handle: PeerLink, candidate: Candidate) -> None:
        await handle.add_candidate(
            candidate.candidate,
            candidate.sdp_mid,
            candidate.sdp_mline_index,
            candidate.username_fragment,
        )

    async def discard(self, handle: PeerLink) -> None:
        await handle.close()
