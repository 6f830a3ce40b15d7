"""Trystero rooms for Python: join, handshake, actions, presence, leave.

:class:`Room` is what the rest of meshnode uses::

    room = await Room.join(RoomConfig(strategy="ws-relay", relay_urls=[url], app_id=a, room_id=r))
    cap = room.make_action("cap")
    await cap.send({"a": 1})                 # to every joined peer
    message = await cap.receive()            # ActionMessage(peer_id, payload, metadata)
    await room.leave()

How it fits together (trystero-wire §7-§9):

* Signalling (``signaling.strategies.topic`` / ``signaling.strategies.tracker``) finds peers and negotiates
  SDP; it reaches WebRTC only through :class:`_RoomPeerFactory`.
* Connections are shared per (selfId, appId, remote peerId) by an :class:`_AppMesh`, as Trystero
  shares one ``RTCPeerConnection`` per (appId, peer) between rooms (§8.1, P16). Incoming frames
  are demultiplexed by room token; presence frames announce membership.
* Each (room, peer) binding runs the join handshake (§8.6): presence(1), the optional password
  challenge over ``@_hsdata``, ``@_hsready``; the peer joins when both sides are ready, and only
  then are application actions exchanged. A binding that times out is dropped and re-bound by the
  next signal, presence(1) or handshake frame from that peer (§9.3).

Remote garbage (bad frames, unknown actions, undecodable payloads) is logged and dropped, never
raised out of the room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

from meshnode.errors import ConfigError, MeshError
from meshnode.transport.peer import (
    HostAddressMode,
    IceServerSpec,
    NegotiationFailed,
    PeerClosed,
    PeerError,
    PeerLink,
    install_consent_timing,
    install_host_address_override,
)
from meshnode.wire.roomframes import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PENDING_BYTES_PER_PEER,
    DEFAULT_MAX_PENDING_MESSAGES_PER_PEER,
    NO_METADATA,
    Delivery,
    PresenceFrame,
    Reassembler,
    decode_chunk,
    decode_frame,
    encode_action,
    encode_name,
    encode_payload,
    encode_presence_frame,
    encode_room_frame,
)
from signaling import registry
from signaling.protocol import names
from signaling.base import SignalingError
from signaling.protocol.messages import Candidate, SignalingMessageError, parse_candidate_json
from signaling.strategies.topic import (
    NegotiationError,
    StrategyTimers,
    TaskOwner,
    TopicStrategy,
)
from signaling.strategies.tracker import TrackerStrategy

__all__ = [
    "Action",
    "ActionMessage",
    "HandshakeFailed",
    "PeerEvent",
    "Room",
    "RoomClosed",
    "RoomConfig",
]

logger = logging.getLogger(__name__)

SELF_ID_LENGTH = 20
CHALLENGE_LENGTH = 36
PASSWORD_FIELD = "__trystero_pw"
MAX_BACKLOG_NAMES = 16
"""Unregistered action names whose early messages are kept until make_action() (P18)."""
MAX_BACKLOG_PER_NAME = 32
MAX_HSDATA_QUEUED = 4
MAX_JOIN_ERRORS = 64
MAX_BANNED_PEERS = 1024
"""Banned peer ids remembered at once (oldest forgotten first)."""
LEAVE_SEND_TIMEOUT_SECONDS = 2.0
"""Bound on sending @_leave / presence(0) while leaving."""
LINK_FLUSH_TIMEOUT_SECONDS = 1.0
"""Bound on letting queued frames go out before closing a connection."""
ACTION_QUEUE_OVERFLOW: Literal["drop-newest"] = "drop-newest"
"""What a full per-action receive queue does with a new message (logged at WARNING)."""

# Internal action names (trystero-wire §8.5).
HSDATA, HSREADY, LEAVE, PING, PONG = "@_hsdata", "@_hsready", "@_leave", "@_ping", "@_pong"
SIGNAL, STREAM, TRACK, RESPONSE = "@_signal", "@_stream", "@_track", "@_response"
_BEFORE_JOIN = frozenset({HSDATA, HSREADY, LEAVE})
_TOLERATED = frozenset({STREAM, TRACK, RESPONSE})


class RoomClosed(MeshError):
    """The room was left; no more messages or events will come."""


class HandshakeFailed(PeerError):
    """The per-room join handshake with a peer failed (wrong password, bad messages)."""


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RoomConfig:
    """Everything needed to join one Trystero room.

    Timer defaults are Trystero's (trystero-wire §10).
    """

    strategy: str
    """Relay strategy: ``ws-relay``, ``mqtt``, ``nostr``, ``torrent`` or ``memory``."""
    relay_urls: list[str] = field(default_factory=list)
    """Relay URLs; empty = the strategy's defaults (``signaling.registry.DEFAULT_RELAYS``)."""
    app_id: str
    """Trystero appId."""
    room_id: str
    """Trystero roomId."""
    password: str = ""
    """Room password; "" for none."""
    self_id: str | None = None
    """Our peer id; a fresh 20-character id when None (P15). Rooms with the same self_id and
    app_id share connections to a peer, as Trystero rooms of one page do."""
    ice_servers: list[IceServerSpec] = field(default_factory=list)
    """STUN/TURN servers (strings or ``{"urls", "username", "credential"}``); [] = host only."""
    ice_transport_policy: Literal["all", "relay"] = "all"
    """``relay`` uses TURN candidates only (RTCConfiguration.iceTransportPolicy)."""
    host_addresses_mode: HostAddressMode = "auto"
    """aioice host addresses: ``auto`` (untouched), ``append`` or ``only`` (process-wide)."""
    host_addresses: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    """Addresses for ``append`` / ``only``."""
    handshake_timeout_seconds: float = 10.0
    """A bound peer must finish the join handshake within this."""
    leave_flush_seconds: float = 0.099
    """Pause between sending @_leave and tearing the bindings down."""
    idle_connection_close_seconds: float = 123.333
    """A connection no room uses any more is closed after this."""
    timers: StrategyTimers = field(default_factory=StrategyTimers)
    """Signalling timers (announce schedule, offer/answer TTLs, connect deadline)."""
    torrent_offers: int = 3
    """Torrent: offers kept outstanding per tracker (0 = answer only)."""
    buffered_amount_low_bytes: int = 65535
    """Data channel ``bufferedAmountLowThreshold``."""
    high_water_bytes: int = 65535
    """Sends wait while a channel has more than this buffered."""
    drain_timeout_seconds: float = 10.0
    """A send that cannot proceed for this long gives up on that peer."""
    disconnected_grace_seconds: float = 5.0
    """ICE ``disconnected`` for this long closes a connection."""
    dead_peer_seconds: float = 8.0
    """A peer that answers no ICE consent check for about this long is gone and its connection
    closed (aioice's own default is ~30 s; a Trystero tab notices in ~10 s). Process-wide."""
    action_queue_size: int = 1024
    """Received messages buffered per action; beyond that new ones are dropped (logged)."""
    event_queue_size: int = 1024
    """Join/leave events buffered for next_event()."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest accepted action message (reassembled)."""
    max_pending_messages_per_peer: int = DEFAULT_MAX_PENDING_MESSAGES_PER_PEER
    """Incomplete (partially received) messages kept per peer; the oldest is evicted beyond."""
    max_pending_bytes_per_peer: int = DEFAULT_MAX_PENDING_BYTES_PER_PEER
    """Bytes of incomplete messages kept per peer; the oldest is evicted beyond."""
    max_queued_messages_per_peer: int = 0
    """Received messages one peer may have waiting in one action's queue; beyond, that peer's new
    messages are dropped, so one flooding peer cannot push others out (0 = no per-peer bound)."""
    max_queued_bytes_per_peer: int = 0
    """Bytes one peer may have waiting in one action's queue (0 = no per-peer bound)."""
    max_backlog_bytes: int = 1024 * 1024
    """Bytes kept for messages of actions nobody registered yet (P18); beyond, they are dropped."""
    peer_rate_bytes_per_second: float = 0.0
    """Sustained inbound bytes per second allowed per connection; a peer that exhausts its burst
    is disconnected and banned (0 = unlimited)."""
    peer_burst_bytes: int = 0
    """Inbound byte burst per connection (defaults to 2 × max_message_bytes when a rate is set)."""
    peer_rate_frames_per_second: float = 0.0
    """Sustained inbound data-channel messages per second per connection (0 = unlimited)."""
    peer_burst_frames: int = 0
    """Inbound message burst per connection (defaults to 4 s of the rate when a rate is set)."""
    max_connections: int = 0
    """Open plus negotiating connections of this app; further peers are refused (0 = unlimited)."""
    ban_seconds: float = 60.0
    """How long a peer dropped for abuse is refused (signals and connections ignored)."""

    def __post_init__(self) -> None:
        for key in ("strategy", "app_id", "room_id"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"room.{key} must be a non-empty string")
        if not isinstance(self.password, str):
            raise ConfigError("room.password must be a string")
        if self.host_addresses_mode not in ("auto", "append", "only"):
            raise ConfigError(f"room.host_addresses_mode {self.host_addresses_mode!r} is unknown")
        if self.self_id is not None and not self.self_id:
            raise ConfigError("room.self_id must be non-empty when given")
        if (self.handshake_timeout_seconds <= 0 or self.action_queue_size < 1
                or self.dead_peer_seconds <= 0):
            raise ConfigError("room timeouts and queue sizes must be positive")


# -- public value types ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionMessage:
    """One received action message.

    Attributes:
        peer_id: the sender.
        payload: ``str``, ``bytes`` or a parsed JSON value (trystero-wire §8.3).
        metadata: the message's metadata, or None when it had none.
    """

    peer_id: str
    payload: Any
    metadata: Any = None


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A peer joined (handshake complete) or left the room."""

    kind: Literal["join", "leave"]
    peer_id: str


T = TypeVar("T")


class _Mailbox(Generic[T]):
    """A bounded FIFO with one overflow policy (drop the newest, logged) and a closed state.

    Optionally also bounded per sender (`per_key_messages` / `per_key_bytes`): a message whose
    sender already has that much waiting is dropped, so one flooding peer fills only its own share
    and other peers' messages still get in.
    """

    def __init__(
        self,
        maxsize: int,
        what: str,
        *,
        per_key_messages: int = 0,
        per_key_bytes: int = 0,
        drop_oldest: bool = False,
    ) -> None:
        self._drop_oldest = drop_oldest
        """History queues (peer events) keep the newest items and drop quietly: a node that never
        reads `next_event()` must not log a warning for every hundred joins forever."""
        self._items: deque[tuple[T, str | None, int]] = deque()
        self._maxsize = maxsize
        self._what = what
        self._per_key_messages = per_key_messages
        self._per_key_bytes = per_key_bytes
        self._queued: dict[str, list[int]] = {}  # key -> [messages, bytes] waiting
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, item: T, *, key: str | None = None, size: int = 0) -> bool:
        if self._closed:
            return False
        queued = self._queued.get(key) if key is not None else None
        over_key = queued is not None and (
            (self._per_key_messages and queued[0] >= self._per_key_messages)
            or (self._per_key_bytes and queued[1] + size > self._per_key_bytes)
        )
        if self._drop_oldest and len(self._items) >= self._maxsize and not over_key:
            self._items.popleft()  # keys are not used with drop_oldest
            self.dropped += 1
        elif len(self._items) >= self._maxsize or over_key:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                logger.warning(
                    "%s queue is full (%s); %s policy dropped %d message(s) so far",
                    self._what,
                    f"sender {key}" if over_key else self._maxsize,
                    ACTION_QUEUE_OVERFLOW,
                    self.dropped,
                )
            return False
        self._items.append((item, key, size))
        if key is not None:
            entry = self._queued.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += size
        self._ready.set()
        return True

    def queued_by(self, key: str) -> int:
        """Messages from `key` waiting now."""
        entry = self._queued.get(key)
        return entry[0] if entry else 0

    async def get(self) -> T:
        while True:
            if self._items:
                item, key, size = self._items.popleft()
                if key is not None:
                    entry = self._queued[key]
                    entry[0] -= 1
                    entry[1] -= size
                    if entry[0] <= 0:
                        del self._queued[key]
                if not self._items and not self._closed:
                    self._ready.clear()
                return item
            if self._closed:
                raise RoomClosed(f"{self._what}: the room was left")
            await self._ready.wait()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)


# -- actions ---------------------------------------------------------------------------------------


class Action:
    """A named message type of a room (``room.make_action(name)``).

    Payloads: ``bytes``-like → binary, ``str`` → string, anything else → JSON (§8.3). Received
    messages wait in a bounded queue (`RoomConfig.action_queue_size`).
    """

    def __init__(self, room: Room, name: str) -> None:
        self.name = name
        self._room = room
        self._name_field = encode_name(name)
        self._nonce = 0  # per action and per room instance, from 0, wrapping (P13)
        self._mailbox: _Mailbox[ActionMessage] = _Mailbox(
            room.config.action_queue_size,
            f"action {name!r}",
            per_key_messages=room.config.max_queued_messages_per_peer,
            per_key_bytes=room.config.max_queued_bytes_per_peer,
        )

    def __repr__(self) -> str:
        return f"Action({self.name!r})"

    def _frames(self, payload: Any, metadata: Any) -> list[bytes]:
        data, kind = encode_payload(payload)
        chunks = encode_action(self._name_field, self._nonce, data, kind, metadata)
        self._nonce = (self._nonce + 1) % 65536
        token = self._room.token
        return [encode_room_frame(token, chunk) for chunk in chunks]

    async def send(
        self,
        payload: Any,
        target: str | Sequence[str] | None = None,
        metadata: Any = None,
    ) -> list[str]:
        """Send a message to joined peers, waiting while their channels are backed up.

        Args:
            payload: bytes-like (binary), str, or any JSON-serialisable value.
            target: one peer id, a list of them, or None for every joined peer.
            metadata: optional JSON value sent as the metadata chunk (None = no metadata).

        Returns:
            The peer ids the message was handed to (targets that are not joined are skipped).

        Raises:
            RoomClosed: the room was left.
            PayloadError: the payload or metadata cannot be encoded.
        """
        self._room._check_open()
        frames = self._frames(payload, NO_METADATA if metadata is None else metadata)
        peers = self._room._targets(target)
        await self._room._send_frames(peers, frames)
        return peers

    async def receive(self) -> ActionMessage:
        """The next message; raises :class:`RoomClosed` once the room is left and drained."""
        return await self._mailbox.get()

    def __aiter__(self) -> AsyncIterator[ActionMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ActionMessage]:
        while True:
            try:
                yield await self._mailbox.get()
            except RoomClosed:
                return


# -- per-(room, peer) binding ----------------------------------------------------------------------


@dataclass(eq=False)
class _Binding:
    """One peer bound to one room: handshake state, then membership."""

    peer_id: str
    link: PeerLink
    joined: bool = False
    remote_ready: asyncio.Event = field(default_factory=asyncio.Event)
    local_ready: bool = False
    """Our side of the handshake passed and our @_hsready went out."""
    hsdata: _Mailbox[Any] = field(default_factory=lambda: _Mailbox(MAX_HSDATA_QUEUED, "@_hsdata"))
    task: asyncio.Task[Any] | None = None
    pings: deque[asyncio.Future[None]] = field(default_factory=deque)


# -- inbound flood control -------------------------------------------------------------------------


class _Bucket:
    """Token bucket: `rate` units per second, at most `burst` saved up (sans-IO, clock injected)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        """Spend `amount`; False (nothing spent) when the bucket cannot cover it."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


@dataclass(eq=False)
class _InboundLimits:
    """Per-connection inbound budget: bytes and data-channel messages (None = unlimited)."""

    bytes: _Bucket | None
    frames: _Bucket | None

    def admit(self, size: int, now: float) -> str | None:
        """Account one received message; a reason string when the peer went over its budget."""
        if self.frames is not None and not self.frames.take(1, now):
            return f"more than {self.frames.rate:g} messages/s (burst {self.frames.burst:g})"
        if self.bytes is not None and not self.bytes.take(size, now):
            return f"more than {self.bytes.rate:g} bytes/s (burst {self.bytes.burst:g})"
        return None


def _inbound_limits(configs: Iterable[RoomConfig], now: float) -> _InboundLimits:
    """The tightest limits among the rooms that share a connection."""
    byte_rates = [(c.peer_rate_bytes_per_second, c.peer_burst_bytes or 2 * c.max_message_bytes)
                  for c in configs if c.peer_rate_bytes_per_second > 0]
    frame_rates = [(c.peer_rate_frames_per_second, c.peer_burst_frames or 4 * c.peer_rate_frames_per_second)
                   for c in configs if c.peer_rate_frames_per_second > 0]
    return _InboundLimits(
        bytes=_Bucket(*min(byte_rates), now) if byte_rates else None,
        frames=_Bucket(*min(frame_rates), now) if frame_rates else None,
    )


# -- shared connections per (selfId, appId) --------------------------------------------------------


class _AppMesh:
    """The connections of one (selfId, appId), shared by that app's rooms (§8.1, P16)."""

    _registry: ClassVar[dict[tuple[int, str, str], _AppMesh]] = {}

    def __init__(self, self_id: str, app_id: str) -> None:
        self.self_id = self_id
        self.app_id = app_id
        self.rooms: dict[str, Room] = {}  # by room token
        self.live: dict[str, PeerLink] = {}  # open links by remote peer id
        self.pending: dict[PeerLink, Room] = {}  # negotiating link -> room that created it
        self.banned: OrderedDict[str, float] = OrderedDict()  # peer id -> monotonic time ban ends
        self.dropped_peers = 0
        """Connections closed for abuse (flood limits, Room.drop_peer)."""
        self._limits: dict[PeerLink, _InboundLimits] = {}
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks = TaskOwner(f"mesh[{self_id[:8]}:{app_id}]")

    @classmethod
    def get(cls, self_id: str, app_id: str) -> _AppMesh:
        key = (id(asyncio.get_running_loop()), self_id, app_id)
        mesh = cls._registry.get(key)
        if mesh is None:
            mesh = cls._registry[key] = cls(self_id, app_id)
        return mesh

    # -- rooms -------------------------------------------------------------------------------------

    def add_room(self, room: Room) -> None:
        if room.token in self.rooms:
            raise ConfigError(f"already in room {room.config.room_id!r} as {self.self_id}")
        self.rooms[room.token] = room
        frame = encode_presence_frame(room.token, True)
        for link in list(self.live.values()):  # joined later: tell every connection (§8.1)
            self._tasks.spawn(self._send_quietly(link, [frame]), "presence")

    async def remove_room(self, room: Room) -> None:
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
            if not any(peer_id in other._bindings for other in self.rooms.values())
        ]
        await asyncio.gather(*(self._close_link(link) for link in unused))
        for link, origin in list(self.pending.items()):
            if origin is room:
                await link.close()
        if not self.rooms:
            await self.close()

    async def close(self) -> None:
        for key, mesh in list(self._registry.items()):
            if mesh is self:
                del self._registry[key]
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        for link in [*self.live.values(), *self.pending]:
            await link.close()
        await self._tasks.aclose()

    # -- links -------------------------------------------------------------------------------------

    def new_link(self, room: Room, peer_id: str | None) -> PeerLink:
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
        self._limits[link] = _inbound_limits(
            (room.config for room in self.rooms.values()), time.monotonic()
        )
        logger.info("connected to %s (app %s)", peer_id, self.app_id)
        if origin is not None:
            origin._strategy_release(peer_id, link)
        self._tasks.spawn(self._activate(link, peer_id, origin), f"open[{peer_id[:8]}]")

    async def _activate(self, link: PeerLink, peer_id: str, origin: Room | None) -> None:
        # A new shared connection announces every room we are in, then the room whose signalling
        # created it runs its handshake (§8.1); the ordered channel keeps presence first.
        frames = [encode_presence_frame(token, True) for token in self.rooms]
        if not await self._send_quietly(link, frames):
            return
        if origin is not None and origin.token in self.rooms:
            origin._bind(peer_id, link, send_presence=False)
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
            room._on_presence(peer_id, link, present=frame.present)
        else:
            room._on_chunk(peer_id, link, frame.chunk)

    def _on_close(self, link: PeerLink) -> None:
        origin = self.pending.pop(link, None)
        peer_id = link.peer_id
        if origin is not None and peer_id is not None:
            origin._strategy_release(peer_id, link)
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
            room._on_link_closed(peer_id, link)

    def _unused(self, peer_id: str, link: PeerLink) -> bool:
        """True while `link` is the live connection to `peer_id` and no room is bound to it."""
        return self.live.get(peer_id) is link and not any(
            peer_id in room._bindings for room in self.rooms.values()
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
        for link in links:
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


class _RoomPeerFactory:
    """The :class:`signaling.strategies.topic.PeerFactory` of one room, on its app mesh."""

    def __init__(self, room: Room, mesh: _AppMesh) -> None:
        self._room = room
        self._mesh = mesh

    def is_live(self, peer_id: str) -> bool:
        link = self._mesh.live.get(peer_id)
        if link is None or not link.is_open:
            return False
        # A signal from a connected peer for this room attaches the connection to it (§8.1).
        self._room._bind(peer_id, link, send_presence=True)
        return True

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


# -- the room --------------------------------------------------------------------------------------


JoinErrorCallback = Callable[[str, str], None]
PeerCallback = Callable[[str], None]


class Room:
    """A joined Trystero room. Create with :meth:`Room.join`; leave with :meth:`leave`.

    Also an async context manager: ``async with await Room.join(config) as room: ...``.

    Attributes:
        config: the configuration.
        self_id: our peer id.
        token: the room token (hex SHA-256 of ``Trystero:appId:roomId``).
        join_errors: recent (peer_id, reason) join errors: wrong password, handshake timeout, …
    """

    def __init__(self, config: RoomConfig, *, relays: Sequence[Any] | None = None) -> None:
        self.config = config
        self.self_id = config.self_id or names.gen_id(SELF_ID_LENGTH)
        self.token = names.room_token(config.app_id, config.room_id)
        self.join_errors: deque[tuple[str, str]] = deque(maxlen=MAX_JOIN_ERRORS)
        self._relays = list(relays) if relays is not None else None
        self._bindings: dict[str, _Binding] = {}
        self._actions: dict[str, Action] = {}
        self._internal: dict[str, Action] = {}
        self._backlog: dict[str, deque[tuple[ActionMessage, int]]] = {}
        self._backlog_bytes = 0
        self._events: _Mailbox[PeerEvent] = _Mailbox(
            config.event_queue_size, "peer events", drop_oldest=True
        )
        self._join_callbacks: list[PeerCallback] = []
        self._leave_callbacks: list[PeerCallback] = []
        self._error_callbacks: list[JoinErrorCallback] = []
        self._peer_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._reassembler = Reassembler(
            max_message_bytes=config.max_message_bytes,
            max_pending_messages_per_peer=config.max_pending_messages_per_peer,
            max_pending_bytes_per_peer=config.max_pending_bytes_per_peer,
        )
        self._tasks = TaskOwner(f"room[{config.room_id}:{self.self_id[:8]}]")
        self._mesh: _AppMesh | None = None
        self._strategy: TopicStrategy | TrackerStrategy | None = None
        self._state: Literal["new", "joined", "leaving", "left"] = "new"
        self._left: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"Room({self.config.room_id!r}, self_id={self.self_id!r}, peers={len(self.peers)})"

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    async def join(cls, config: RoomConfig, *, relays: Sequence[Any] | None = None) -> Room:
        """Join a room and start finding peers.

        Args:
            config: room settings.
            relays: pre-built relay adapters (e.g. ``MemoryHub().relay()``); the room owns and
                closes them. When None they are built from ``config.strategy`` / ``relay_urls``
                through ``signaling.registry``.

        Raises:
            ConfigError: unknown strategy, no relay URLs, mixed relay kinds, bad ids.
        """
        room = cls(config, relays=relays)
        await room._start()
        return room

    async def _start(self) -> None:
        if self._state != "new":
            return
        config = self.config
        if config.host_addresses_mode != "auto":
            install_host_address_override(config.host_addresses_mode, config.host_addresses)
        install_consent_timing(config.dead_peer_seconds)
        relays = self._relays if self._relays is not None else self._build_relays()
        mesh = _AppMesh.get(self.self_id, config.app_id)
        mesh.add_room(self)
        self._mesh = mesh
        self._state = "joined"
        self._left = asyncio.get_running_loop().create_future()
        factory = _RoomPeerFactory(self, mesh)
        try:
            self._strategy = self._build_strategy(relays, factory)
            await self._strategy.start()
        except BaseException:
            await self.leave()
            raise
        logger.info(
            "joined room %r (app %r) as %s via %s",
            config.room_id,
            config.app_id,
            self.self_id,
            config.strategy,
        )

    def _build_relays(self) -> list[Any]:
        config = self.config
        urls = list(config.relay_urls) or list(registry.DEFAULT_RELAYS.get(config.strategy, []))
        if config.strategy == "memory" and not urls:
            urls = ["memory://default"]
        if not urls:
            raise ConfigError(f"room.relay_urls is empty and {config.strategy!r} has no defaults")
        try:
            adapter = registry.get_adapter_class(config.strategy)
            return [adapter(url) for url in urls]
        except (SignalingError, ValueError) as exc:
            raise ConfigError(f"room.strategy {config.strategy!r}: {exc}") from exc

    def _build_strategy(
        self, relays: list[Any], factory: _RoomPeerFactory
    ) -> TopicStrategy | TrackerStrategy:
        config = self.config
        kinds = {getattr(relay, "kind", None) for relay in relays}
        common: dict[str, Any] = {
            "app_id": config.app_id,
            "room_id": config.room_id,
            "self_id": self.self_id,
            "factory": factory,
            "password": config.password,
            "timers": config.timers,
            "on_join_error": self._join_error,
        }
        try:
            if kinds == {"tracker"}:
                return TrackerStrategy(relays, offers_per_announce=config.torrent_offers, **common)
            if kinds == {"topic"}:
                return TopicStrategy(relays, **common)
        except ValueError as exc:
            raise ConfigError(f"room: {exc}") from exc
        raise ConfigError(f"room relays must all be topic relays or all trackers, got {kinds}")

    @property
    def closed(self) -> bool:
        """True once leave() has started."""
        return self._state in ("leaving", "left")

    def _check_open(self) -> None:
        if self._state != "joined":
            raise RoomClosed(f"room {self.config.room_id!r} is not joined")

    async def leave(self) -> None:
        """Leave the room (idempotent; concurrent callers wait for the same leave).

        Sends ``@_leave`` to every bound peer, waits ~99 ms, drops the bindings, sends presence(0)
        on every connection of the app, stops signalling (unsubscribe, close relays) and closes the
        connections no other room uses (§9.2).
        """
        if self._state == "new":
            self._state = "left"
            return
        if self._state in ("leaving", "left"):
            if self._left is not None:
                await asyncio.shield(self._left)
            return
        self._state = "leaving"
        try:
            await self._leave()
        finally:
            self._state = "left"
            if self._left is not None and not self._left.done():
                self._left.set_result(None)

    async def _leave(self) -> None:
        bindings = list(self._bindings.values())
        if bindings:
            leave = self._internal_action(LEAVE)
            try:
                async with asyncio.timeout(LEAVE_SEND_TIMEOUT_SECONDS):
                    await self._send_frames(
                        [b.peer_id for b in bindings], leave._frames("", NO_METADATA), quiet=True
                    )
            except TimeoutError:
                logger.debug("@_leave did not go out to every peer in time")
            await asyncio.sleep(self.config.leave_flush_seconds)  # let @_leave land (§9.2)
        for binding in list(self._bindings.values()):
            self._unbind(binding.peer_id, emit=False)
        if self._strategy is not None:  # stop signalling first: no new negotiations
            await self._strategy.close()
        if self._mesh is not None:
            await self._mesh.remove_room(self)
        await self._tasks.aclose()
        self._reassembler.clear()
        for action in [*self._actions.values(), *self._internal.values()]:
            action._mailbox.close()
        self._events.close()
        for _, waiter in self._peer_waiters:
            if not waiter.done():
                waiter.set_exception(RoomClosed("the room was left"))
        self._peer_waiters.clear()
        logger.info("left room %r", self.config.room_id)

    async def __aenter__(self) -> Self:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.leave()

    # -- membership --------------------------------------------------------------------------------

    @property
    def peers(self) -> list[str]:
        """Ids of the peers that completed the join handshake."""
        return [peer_id for peer_id, b in self._bindings.items() if b.joined]

    def on_peer_join(self, callback: PeerCallback) -> Callable[[], None]:
        """Call `callback(peer_id)` on every join; replays already-joined peers (§9.1).

        Returns a function that unregisters the callback. Callbacks must not block.
        """
        self._join_callbacks.append(callback)
        for peer_id in self.peers:
            self._call(callback, peer_id)
        return lambda: self._join_callbacks.remove(callback)

    def on_peer_leave(self, callback: PeerCallback) -> Callable[[], None]:
        """Call `callback(peer_id)` when a joined peer leaves; returns an unregister function."""
        self._leave_callbacks.append(callback)
        return lambda: self._leave_callbacks.remove(callback)

    def on_join_error(self, callback: JoinErrorCallback) -> Callable[[], None]:
        """Call `callback(peer_id, reason)` on join errors (wrong password, timeouts)."""
        self._error_callbacks.append(callback)
        return lambda: self._error_callbacks.remove(callback)

    async def next_event(self) -> PeerEvent:
        """The next join/leave event (bounded queue); raises :class:`RoomClosed` after leave."""
        return await self._events.get()

    async def wait_for_peers(self, count: int, timeout: float) -> list[str]:
        """Wait until at least `count` peers have joined; returns the joined peer ids.

        Raises:
            TimeoutError: not enough peers within `timeout` seconds.
            RoomClosed: the room was left meanwhile.
        """
        if len(self.peers) >= count:
            return self.peers
        self._check_open()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (count, waiter)
        self._peer_waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            if entry in self._peer_waiters:
                self._peer_waiters.remove(entry)
        return self.peers

    def drop_peer(self, peer_id: str, reason: str, ban_seconds: float | None = None) -> None:
        """Disconnect a misbehaving peer and refuse it for `ban_seconds` (``config.ban_seconds``).

        The connection is shared by every room of the app, so the peer leaves all of them; its
        signals and connection attempts are ignored until the ban ends. Logged at WARNING.
        """
        if self._mesh is not None:
            self._mesh.drop_peer(peer_id, reason, ban_seconds)

    def relay_status(self) -> dict[str, bool]:
        """Whether each relay URL is connected right now."""
        strategy = self._strategy
        if strategy is None:
            return {}
        return {str(getattr(r, "url", "?")): bool(getattr(r, "connected", False)) for r in strategy.relays}

    @property
    def connections(self) -> int:
        """Open WebRTC connections of this room's app mesh (shared by its rooms)."""
        return len(self._mesh.live) if self._mesh is not None else 0

    async def ping(self, peer_id: str, timeout: float = 10.0) -> float:
        """Round-trip time in seconds of ``@_ping`` / ``@_pong`` to a joined peer."""
        self._check_open()
        binding = self._bindings.get(peer_id)
        if binding is None or not binding.joined:
            raise PeerError(f"{peer_id} is not in the room", peer_id=peer_id)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        binding.pings.append(waiter)
        started = loop.time()
        try:
            async with asyncio.timeout(timeout):
                await self._send_internal(binding, PING, "")
                await waiter
        finally:
            if waiter in binding.pings:
                binding.pings.remove(waiter)
        return loop.time() - started

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # an application callback must not break the room
            logger.exception("room callback failed")

    def _join_error(self, peer_id: str, reason: str) -> None:
        self.join_errors.append((peer_id, reason))
        for callback in list(self._error_callbacks):
            self._call(callback, peer_id, reason)

    def _emit(self, kind: Literal["join", "leave"], peer_id: str) -> None:
        self._events.put(PeerEvent(kind=kind, peer_id=peer_id))
        for callback in list(self._join_callbacks if kind == "join" else self._leave_callbacks):
            self._call(callback, peer_id)
        if kind == "join":
            joined = len(self.peers)
            for count, waiter in self._peer_waiters:
                if joined >= count and not waiter.done():
                    waiter.set_result(None)

    # -- bindings and the handshake (§8.6) ---------------------------------------------------------

    def _strategy_release(self, peer_id: str, link: PeerLink) -> None:
        if self._strategy is not None and not self._strategy.closed:
            self._strategy.release(peer_id, link)

    def _bind(self, peer_id: str, link: PeerLink, *, send_presence: bool) -> _Binding | None:
        """Attach a connection to this room and run the handshake (no-op if already bound)."""
        if self._state != "joined":
            return None
        binding = self._bindings.get(peer_id)
        if binding is not None:
            return binding
        binding = _Binding(peer_id=peer_id, link=link)
        self._bindings[peer_id] = binding
        binding.task = self._tasks.spawn(
            self._handshake(binding, send_presence=send_presence), f"handshake[{peer_id[:8]}]"
        )
        return binding

    async def _handshake(self, binding: _Binding, *, send_presence: bool) -> None:
        peer_id = binding.peer_id
        try:
            async with asyncio.timeout(self.config.handshake_timeout_seconds):
                if send_presence:
                    await binding.link.send(encode_presence_frame(self.token, True))
                if self.config.password:
                    await self._password_step(binding)
                await self._send_internal(binding, HSREADY, "")
                binding.local_ready = True
                await binding.remote_ready.wait()  # §8.6 step 4: both sides ready
        except TimeoutError:
            logger.warning(
                "handshake with %s in room %r timed out after %.1f s",
                peer_id,
                self.config.room_id,
                self.config.handshake_timeout_seconds,
            )
            self._join_error(peer_id, "handshake timed out")
            self._unbind(peer_id, emit=False, binding=binding)
            if self._mesh is not None:
                self._mesh.handshake_timed_out(peer_id, binding.link)
            return
        except HandshakeFailed as exc:
            logger.warning(
                "peer %s failed the handshake in room %r: %s", peer_id, self.config.room_id, exc
            )
            self._join_error(peer_id, str(exc))
            self._unbind(peer_id, emit=False, binding=binding)
            return
        except (PeerError, RoomClosed) as exc:  # connection or binding went away meanwhile
            logger.debug("handshake with %s aborted: %s", peer_id, exc)
            self._unbind(peer_id, emit=False, binding=binding)
            return
        self._complete_join(binding)

    def _complete_join(self, binding: _Binding) -> None:
        """Both sides are ready: the peer joins (once).

        Called synchronously when the remote @_hsready arrives after ours went out, so that an
        application message right behind it in the same ordered channel is accepted rather than
        dropped as "before join" (the handshake task would only resume on a later loop turn).
        """
        peer_id = binding.peer_id
        if binding.joined or self._bindings.get(peer_id) is not binding or self._state != "joined":
            return
        binding.joined = True
        logger.info("peer %s joined room %r", peer_id, self.config.room_id)
        self._emit("join", peer_id)

    async def _password_step(self, binding: _Binding) -> None:
        config = self.config
        if self.self_id < binding.peer_id:  # the smaller id challenges (§8.6)
            challenge = names.gen_id(CHALLENGE_LENGTH)
            await self._send_internal(
                binding, HSDATA, {PASSWORD_FIELD: "challenge", "c": challenge}
            )
            reply = await binding.hsdata.get()
            expected = names.password_hash(
                challenge, config.password, config.app_id, config.room_id
            )
            if not (
                isinstance(reply, dict)
                and reply.get(PASSWORD_FIELD) == "response"
                and reply.get("h") == expected
            ):
                raise HandshakeFailed(
                    "wrong room password? (bad challenge response)", peer_id=binding.peer_id
                )
        else:
            message = await binding.hsdata.get()
            await self._answer_challenge(binding, message)

    async def _answer_challenge(self, binding: _Binding, message: Any) -> None:
        if not (
            isinstance(message, dict)
            and message.get(PASSWORD_FIELD) == "challenge"
            and isinstance(message.get("c"), str)
        ):
            raise HandshakeFailed("expected a password challenge", peer_id=binding.peer_id)
        config = self.config
        digest = names.password_hash(message["c"], config.password, config.app_id, config.room_id)
        await self._send_internal(binding, HSDATA, {PASSWORD_FIELD: "response", "h": digest})

    def _unbind(self, peer_id: str, *, emit: bool, binding: _Binding | None = None) -> None:
        current = self._bindings.get(peer_id)
        if current is None or (binding is not None and current is not binding):
            return
        del self._bindings[peer_id]
        task = current.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        current.hsdata.close()
        for waiter in current.pings:
            if not waiter.done():
                waiter.set_exception(PeerError(f"{peer_id} left", peer_id=peer_id))
        self._reassembler.drop_peer(peer_id)  # P13
        if current.joined and emit:
            logger.info("peer %s left room %r", peer_id, self.config.room_id)
            self._emit("leave", peer_id)
        if self._mesh is not None:
            self._mesh.unbound(peer_id)

    def _on_presence(self, peer_id: str, link: PeerLink, *, present: bool) -> None:
        if present:
            self._bind(peer_id, link, send_presence=True)  # re-bind on presence(1) (§9.3)
        else:
            self._unbind(peer_id, emit=True)

    def _on_link_closed(self, peer_id: str, link: PeerLink) -> None:
        binding = self._bindings.get(peer_id)
        if binding is not None and binding.link is link:
            self._unbind(peer_id, emit=True)

    # -- inbound actions ---------------------------------------------------------------------------

    def _on_chunk(self, peer_id: str, link: PeerLink, chunk: bytes) -> None:
        binding = self._bindings.get(peer_id)
        if binding is None:
            try:
                name = decode_chunk(chunk).name
            except MeshError:
                return
            if name not in (HSDATA, HSREADY):
                logger.debug("dropping %r from %s: not bound to room", name, peer_id)
                return
            binding = self._bind(peer_id, link, send_presence=True)  # remote re-runs (§9.3)
            if binding is None:
                return
        delivery = self._reassembler.feed(peer_id, chunk)
        if delivery is not None:
            self._dispatch(binding, delivery)

    def _dispatch(self, binding: _Binding, delivery: Delivery) -> None:
        name = delivery.name
        peer_id = binding.peer_id
        if name == HSDATA:
            if binding.joined:
                # The remote re-runs its handshake while we consider it joined: answer again.
                self._tasks.spawn(self._rerun_responder(binding, delivery.payload), "rehandshake")
            else:
                binding.hsdata.put(delivery.payload)
        elif name == HSREADY:
            binding.remote_ready.set()
            if binding.local_ready:
                self._complete_join(binding)
        elif name == LEAVE:
            self._unbind(peer_id, emit=True)
        elif not binding.joined:
            logger.debug("dropping %r from %s before it joined (§8.5)", name, peer_id)
        elif name == PING:
            self._tasks.spawn(self._send_internal(binding, PONG, ""), "pong")
        elif name == PONG:
            if binding.pings:
                waiter = binding.pings.popleft()
                if not waiter.done():
                    waiter.set_result(None)
        elif name == SIGNAL:
            self._on_inband_signal(binding, delivery.payload)
        elif name in _TOLERATED:
            logger.debug("ignoring %r from %s (media / request API not supported)", name, peer_id)
        else:
            message = ActionMessage(
                peer_id=peer_id,
                payload=delivery.payload,
                metadata=None if delivery.metadata is NO_METADATA else delivery.metadata,
            )
            action = self._actions.get(name)
            if action is not None:
                action._mailbox.put(message, key=peer_id, size=delivery.size)
            else:
                self._keep_unclaimed(name, message, delivery.size)

    async def _rerun_responder(self, binding: _Binding, payload: Any) -> None:
        if self.config.password and self.self_id > binding.peer_id:
            try:
                await self._answer_challenge(binding, payload)
            except HandshakeFailed:
                return
        await self._send_internal(binding, HSREADY, "")

    def _keep_unclaimed(self, name: str, message: ActionMessage, size: int) -> None:
        """Keep an early message for an unregistered action, within count and byte bounds (P18)."""
        backlog = self._backlog.get(name)
        if backlog is None:
            if len(self._backlog) >= MAX_BACKLOG_NAMES:
                logger.debug("dropping message for unknown action %r", name)
                return
            backlog = self._backlog[name] = deque()
        if self._backlog_bytes + size > self.config.max_backlog_bytes:
            logger.debug("dropping message for unknown action %r: backlog is full", name)
            return
        if len(backlog) >= MAX_BACKLOG_PER_NAME:
            _, old_size = backlog.popleft()
            self._backlog_bytes -= old_size
        backlog.append((message, size))
        self._backlog_bytes += size

    def _on_inband_signal(self, binding: _Binding, payload: Any) -> None:
        """``@_signal``: apply late trickled candidates; media renegotiation is not supported."""
        if not isinstance(payload, dict) or payload.get("type") != "candidate":
            logger.debug("ignoring a non-candidate @_signal from %s", binding.peer_id)
            return
        sdp = payload.get("sdp")
        try:
            candidate = parse_candidate_json(sdp) if isinstance(sdp, str) else None
        except SignalingMessageError:
            candidate = None
        if candidate is None or not candidate.candidate:
            return
        self._tasks.spawn(
            binding.link.add_candidate(
                candidate.candidate,
                candidate.sdp_mid,
                candidate.sdp_mline_index,
                candidate.username_fragment,
            ),
            "candidate",
        )

    # -- outbound ----------------------------------------------------------------------------------

    def make_action(self, name: str) -> Action:
        """The action called `name` (≤ 32 UTF-8 bytes; the same object for the same name).

        Messages that arrived for `name` before this call are delivered first.

        Raises:
            ValueError: the name is too long, empty, or starts with the reserved ``@_``.
        """
        if not name or name.startswith("@_"):
            raise ValueError(f"invalid action name {name!r}")
        action = self._actions.get(name)
        if action is None:
            action = self._actions[name] = Action(self, name)
            for message, size in self._backlog.pop(name, ()):
                self._backlog_bytes -= size
                action._mailbox.put(message, key=message.peer_id, size=size)
        return action

    def _internal_action(self, name: str) -> Action:
        action = self._internal.get(name)
        if action is None:
            action = self._internal[name] = Action(self, name)
        return action

    async def _send_internal(self, binding: _Binding, name: str, payload: Any) -> None:
        frames = self._internal_action(name)._frames(payload, NO_METADATA)
        for frame in frames:
            await binding.link.send(frame)

    def _targets(self, target: str | Sequence[str] | None) -> list[str]:
        joined = self.peers
        if target is None:
            return joined
        wanted = [target] if isinstance(target, str) else list(target)
        missing = [peer for peer in wanted if peer not in joined]
        if missing:
            logger.debug("not sending to %s: not joined", ", ".join(missing))
        return [peer for peer in wanted if peer in joined]

    async def _send_frames(
        self, peers: list[str], frames: list[bytes], *, quiet: bool = False
    ) -> None:
        """Send `frames` in order to each peer; peers are served concurrently with backpressure."""

        async def to_peer(peer_id: str) -> None:
            binding = self._bindings.get(peer_id)
            if binding is None:
                return
            try:
                for frame in frames:
                    await binding.link.send(frame)
            except PeerError as exc:  # the peer is going away; its leave is handled elsewhere
                if not quiet:
                    logger.info("could not send to %s: %s", peer_id, exc)

        if len(peers) == 1:
            await to_peer(peers[0])
        elif peers:
            await asyncio.gather(*(to_peer(peer_id) for peer_id in peers))
