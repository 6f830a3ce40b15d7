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
* Each (room, peer) :class:`~meshnode.room.handshake.Binding` runs the join handshake (§8.6):
  presence(1), the optional password
  challenge over ``@_hsdata``, ``@_hsready``; the peer joins when both sides are ready, and only
  then are application actions exchanged. A binding that times out is dropped and re-bound by the
  next signal, presence(1) or handshake frame from that peer (§9.3).

Remote garbage (bad frames, unknown actions, undecodable payloads) is logged and dropped, never
raised out of the room.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, Self

from meshnode.errors import ConfigError, MeshError
from meshnode.room.actions import Action, ActionMessage, PeerEvent
from meshnode.room.config import RoomConfig
from meshnode.room.errors import HandshakeFailed, RoomClosed
from meshnode.room.events import JoinErrorCallback, Membership, PeerCallback
from meshnode.room.handshake import (
    HSDATA,
    HSREADY,
    LEAVE,
    PING,
    PONG,
    SIGNAL,
    TOLERATED,
    Binding,
    answer_challenge,
    password_step,
)
from meshnode.room.mailbox import Backlog, Mailbox
from meshnode.room.mesh import LEAVE_SEND_TIMEOUT_SECONDS, AppMesh, RoomPeerFactory
from meshnode.tasks import TaskOwner
from meshnode.transport.peer import PeerError, PeerLink
from meshnode.wire.roomframes import NO_METADATA, Delivery, Reassembler, decode_chunk, encode_presence_frame
from signaling import registry
from signaling.base import SignalingError
from signaling.protocol import names
from signaling.protocol.messages import SignalingMessageError, parse_candidate_json
from signaling.strategies import TopicStrategy, TrackerStrategy, build_strategy

__all__ = ["Room"]

logger = logging.getLogger(__name__)

SELF_ID_LENGTH = 20



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
        self._relays = list(relays) if relays is not None else None
        self._bindings: dict[str, Binding] = {}
        self._actions: dict[str, Action] = {}
        self._internal: dict[str, Action] = {}
        self._backlog: Backlog[ActionMessage] = Backlog(config.max_backlog_bytes)
        self._members = Membership(config.event_queue_size)
        self.join_errors = self._members.join_errors
        """Recent (peer_id, reason) join errors: wrong password, handshake timeout, …"""
        self._reassembler = Reassembler(
            max_message_bytes=config.max_message_bytes,
            max_pending_messages_per_peer=config.max_pending_messages_per_peer,
            max_pending_bytes_per_peer=config.max_pending_bytes_per_peer,
            on_oversize=self.drop_peer,
        )
        self._tasks = TaskOwner(f"room[{config.room_id}:{self.self_id[:8]}]")
        self._mesh: AppMesh | None = None
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
        relays = self._relays if self._relays is not None else self._build_relays()
        mesh = AppMesh.get(self.self_id, config.app_id)
        mesh.add_room(self)
        self._mesh = mesh
        self._state = "joined"
        self._left = asyncio.get_running_loop().create_future()
        factory = RoomPeerFactory(self, mesh)
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
        try:
            return registry.build_relays(self.config.strategy, self.config.relay_urls)
        except SignalingError as exc:
            raise ConfigError(f"room.strategy {self.config.strategy!r}: {exc}") from exc

    def _build_strategy(self, relays: list[Any], factory: RoomPeerFactory) -> TopicStrategy | TrackerStrategy:
        config = self.config
        try:
            return build_strategy(relays, app_id=config.app_id, room_id=config.room_id, self_id=self.self_id,
                                  factory=factory, password=config.password, timers=config.timers,
                                  on_join_error=self._members.join_error, torrent_offers=config.torrent_offers)
        except ValueError as exc:
            raise ConfigError(f"room: {exc}") from exc

    @property
    def closed(self) -> bool:
        """True once leave() has started."""
        return self._state in ("leaving", "left")

    def check_open(self) -> None:
        """Raise :class:`RoomClosed` unless the room is joined (for its actions)."""
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
                    await self._send_frames([b.peer_id for b in bindings], leave.encode(""), quiet=True)
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
            action.mailbox.close()
        self._members.close()
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
        return self._members.on_join(callback, self.peers)

    def on_peer_leave(self, callback: PeerCallback) -> Callable[[], None]:
        """Call `callback(peer_id)` when a joined peer leaves; returns an unregister function."""
        return self._members.on_leave(callback)

    def on_join_error(self, callback: JoinErrorCallback) -> Callable[[], None]:
        """Call `callback(peer_id, reason)` on join errors (wrong password, timeouts)."""
        return self._members.on_error(callback)

    async def next_event(self) -> PeerEvent:
        """The next join/leave event (bounded queue); raises :class:`RoomClosed` after leave."""
        return await self._members.events.get()

    async def wait_for_peers(self, count: int, timeout: float) -> list[str]:
        """Wait until at least `count` peers have joined; returns the joined peer ids.

        Raises:
            TimeoutError: not enough peers within `timeout` seconds.
            RoomClosed: the room was left meanwhile.
        """
        if len(self.peers) >= count:
            return self.peers
        self.check_open()
        await self._members.wait_for(count, timeout)
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
        self.check_open()
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

    # -- bindings and the handshake (§8.6) ---------------------------------------------------------

    def release_negotiation(self, peer_id: str, link: PeerLink) -> None:
        if self._strategy is not None and not self._strategy.closed:
            self._strategy.release(peer_id, link)

    def attach(self, peer_id: str, link: PeerLink, *, send_presence: bool) -> Binding | None:
        """Attach a connection to this room and run the handshake (no-op if already bound; for the mesh)."""
        if self._state != "joined":
            return None
        binding = self._bindings.get(peer_id)
        if binding is not None:
            return binding
        binding = Binding(peer_id=peer_id, link=link)
        self._bindings[peer_id] = binding
        binding.task = self._tasks.spawn(
            self._handshake(binding, send_presence=send_presence), f"handshake[{peer_id[:8]}]"
        )
        return binding

    async def _handshake(self, binding: Binding, *, send_presence: bool) -> None:
        peer_id = binding.peer_id
        try:
            async with asyncio.timeout(self.config.handshake_timeout_seconds):
                if send_presence:
                    await binding.link.send(encode_presence_frame(self.token, True))
                if self.config.password:
                    await password_step(binding, self.config, self.self_id, self._send_internal)
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
            self._members.join_error(peer_id, "handshake timed out")
            self._unbind(peer_id, emit=False, binding=binding)
            if self._mesh is not None:
                self._mesh.handshake_timed_out(peer_id, binding.link)
            return
        except HandshakeFailed as exc:
            logger.warning(
                "peer %s failed the handshake in room %r: %s", peer_id, self.config.room_id, exc
            )
            self._members.join_error(peer_id, str(exc))
            self._unbind(peer_id, emit=False, binding=binding)
            return
        except (PeerError, RoomClosed) as exc:  # connection or binding went away meanwhile
            logger.debug("handshake with %s aborted: %s", peer_id, exc)
            self._unbind(peer_id, emit=False, binding=binding)
            return
        self._complete_join(binding)

    def _complete_join(self, binding: Binding) -> None:
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
        self._members.emit("join", peer_id, len(self.peers))

    def _unbind(self, peer_id: str, *, emit: bool, binding: Binding | None = None) -> None:
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
            self._members.emit("leave", peer_id, len(self.peers))
        if self._mesh is not None:
            self._mesh.unbound(peer_id)

    def on_presence(self, peer_id: str, link: PeerLink, *, present: bool) -> None:
        if present:
            self.attach(peer_id, link, send_presence=True)  # re-bind on presence(1) (§9.3)
        else:
            self._unbind(peer_id, emit=True)

    def is_bound(self, peer_id: str) -> bool:
        """Whether `peer_id` is bound to this room (handshaking or joined)."""
        return peer_id in self._bindings

    def on_peer_dropped(self, peer_id: str) -> None:
        """The mesh dropped `peer_id` for abuse: its queued messages are forgotten at once."""
        dropped = sum(action.mailbox.purge(peer_id) for action in self._actions.values())
        dropped += self._backlog.purge(peer_id)
        if dropped:
            logger.info("forgot %d queued message(s) from dropped peer %s", dropped, peer_id)

    def on_link_closed(self, peer_id: str, link: PeerLink) -> None:
        binding = self._bindings.get(peer_id)
        if binding is not None and binding.link is link:
            self._unbind(peer_id, emit=True)

    # -- inbound actions ---------------------------------------------------------------------------

    def on_chunk(self, peer_id: str, link: PeerLink, chunk: bytes) -> None:
        binding = self._bindings.get(peer_id)
        if binding is None:
            try:
                name = decode_chunk(chunk).name
            except MeshError:
                return
            if name not in (HSDATA, HSREADY):
                logger.debug("dropping %r from %s: not bound to room", name, peer_id)
                return
            binding = self.attach(peer_id, link, send_presence=True)  # remote re-runs (§9.3)
            if binding is None:
                return
        delivery = self._reassembler.feed(peer_id, chunk)
        if delivery is not None:
            self._dispatch(binding, delivery)

    def _dispatch(self, binding: Binding, delivery: Delivery) -> None:
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
        elif name in TOLERATED:
            logger.debug("ignoring %r from %s (media / request API not supported)", name, peer_id)
        else:
            message = ActionMessage(
                peer_id=peer_id,
                payload=delivery.payload,
                metadata=None if delivery.metadata is NO_METADATA else delivery.metadata,
            )
            action = self._actions.get(name)
            if action is not None:
                action.mailbox.put(message, key=peer_id, size=delivery.size)
            else:
                self._backlog.keep(name, peer_id, message, delivery.size)

    async def _rerun_responder(self, binding: Binding, payload: Any) -> None:
        if self.config.password and self.self_id > binding.peer_id:
            try:
                await answer_challenge(binding, payload, self.config, self._send_internal)
            except HandshakeFailed:
                return
        await self._send_internal(binding, HSREADY, "")

    def _on_inband_signal(self, binding: Binding, payload: Any) -> None:
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
            action = self._actions[name] = self._new_action(name)
            for sender, message, size in self._backlog.take(name):
                action.mailbox.put(message, key=sender, size=size)
        return action

    def _internal_action(self, name: str) -> Action:
        action = self._internal.get(name)
        if action is None:
            action = self._internal[name] = self._new_action(name)
        return action

    def _new_action(self, name: str) -> Action:
        config = self.config
        return Action(self, name, Mailbox(config.action_queue_size, f"action {name!r}",
                                          per_key_messages=config.max_queued_messages_per_peer,
                                          per_key_bytes=config.max_queued_bytes_per_peer))

    async def _send_internal(self, binding: Binding, name: str, payload: Any) -> None:
        frames = self._internal_action(name).encode(payload)
        for frame in frames:
            await binding.link.send(frame)

    def targets(self, target: str | Sequence[str] | None) -> list[str]:
        """The joined peers among `target` (every joined peer for None; for actions)."""
        joined = self.peers
        if target is None:
            return joined
        wanted = [target] if isinstance(target, str) else list(target)
        missing = [peer for peer in wanted if peer not in joined]
        if missing:
            logger.debug("not sending to %s: not joined", ", ".join(missing))
        return [peer for peer in wanted if peer in joined]

    async def send_frames(self, peers: list[str], frames: list[bytes]) -> None:
        """Send `frames` in order to each peer; peers are served concurrently with backpressure."""
        await self._send_frames(peers, frames)

    async def _send_frames(self, peers: list[str], frames: list[bytes], *, quiet: bool = False) -> None:

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
