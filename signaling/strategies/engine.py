"""What both Trystero signalling strategies share: timers, collaborators and the per-peer engine.

:class:`NegotiationEngine` runs one worker task per remote peer that handles that peer's events in
order (signals, timer expiries, releases), so a slow SDP negotiation with one peer never blocks
another and the per-peer state machine has no interleaving. It seals and unseals SDP, buffers
early candidates, and reports join errors. :mod:`signaling.strategies.topic` (topic relays) and
:mod:`signaling.strategies.tracker` (WebTorrent trackers) build on it. Every task is owned by a
:class:`~meshnode.tasks.TaskOwner` and cancelled on close.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from meshnode.tasks import TaskOwner
from signaling.base import SignalingError
from signaling.protocol import names
from signaling.protocol.messages import Candidate
from signaling.protocol.sealing import Sealer, SealError

__all__ = [
    "Answering",
    "Clock",
    "LoopClock",
    "Negotiation",
    "NegotiationEngine",
    "NegotiationError",
    "Offer",
    "PeerFactory",
    "StrategyTimers",
    "TimerHandle",
]

logger = logging.getLogger(__name__)

OFFER_ID_LENGTH = 12
MAX_QUEUED_EVENTS_PER_PEER = 64
"""Relay events waiting for one peer's worker; more are dropped (duplicates, floods)."""
MAX_NEGOTIATING_PEERS = 256
"""Peers with negotiation state at once; signals from further new peers are dropped."""
MAX_BUFFERED_CANDIDATES = 64
"""Early candidates kept per peer (over all its offer ids)."""
MAX_APPLIED_CANDIDATES = 256
MAX_WARNED = 1024
"""Distinct (peer, what) pairs remembered for once-only warnings."""
UNSUBSCRIBE_TIMEOUT_SECONDS = 2.0
RELAY_CONNECT_WAIT_SECONDS = 60.0
"""Slice of the (unbounded, cancellable) wait for a relay's first connection before announcing."""


@dataclass(frozen=True, kw_only=True)
class StrategyTimers:
    """Signalling timers (trystero-wire §10); tests shrink them."""

    announce_schedule_seconds: tuple[float, ...] = (0.0, 0.233, 0.533, 1.333)
    """Warm-up announcements after subscribing, relative to the subscription."""
    announce_interval_seconds: float = 5.333
    """Steady announce period after the warm-up (0.24-0.25.3)."""
    offer_resend_fraction: float = 0.9
    """A relay's "offering" mark is cleared after this fraction of the announce interval."""
    offer_ttl_seconds: float = 57.333
    """An unanswered offer is discarded after this long."""
    answer_ttl_seconds: float = 23.333
    """Answering state expires if the connection has not opened by then."""
    connect_timeout_seconds: float = 23.333
    """After an answer is applied the connection must open within this."""
    tracker_announce_interval_seconds: float = 10.0
    """Torrent: steady announce period (or the tracker's interval, capped below)."""
    tracker_interval_cap_seconds: float = 20.0
    tracker_offer_ttl_seconds: float = 120.0
    """Torrent: an announced, unanswered offer is replaced after this long."""
    tracker_dedupe_seconds: float = 4.0
    tracker_answer_supersede_seconds: float = 5.0
    """Torrent: a different offer from a peer we answered this long ago replaces our answer.

    A tracker forwards each re-announced offer to a random swarm member, so one offer can reach
    two peers; the offerer keeps the first answer and drops ours, and without this we would
    ignore that peer's other offers until our answer expired (answer_ttl_seconds). Long enough
    for a slow but valid connection to open first (loopback ones open in well under a second)."""


# -- collaborators ---------------------------------------------------------------------------------


class NegotiationError(SignalingError):
    """Raised by a :class:`PeerFactory` when a remote description cannot be used (bad SDP).

    The engine logs it as a warning and drops that negotiation; anything else a factory raises
    is treated as a bug and logged with its traceback.
    """


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time source and timer scheduler (the event loop by default; a manual clock in tests)."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopClock:
    """:class:`Clock` on the running event loop."""

    def time(self) -> float:
        return asyncio.get_running_loop().time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)


class PeerFactory(Protocol):
    """What the signalling engine needs from the WebRTC layer (implemented by meshnode).

    Handles are opaque to the engine. A handle given out by ``create_offer`` / ``accept_offer`` is
    owned by the engine until it either calls ``discard(handle)`` or is told through
    ``release(peer_id, handle)`` that the factory took it over (connection open) or lost it.
    """

    def is_live(self, peer_id: str) -> bool:
        """True while a connection to `peer_id` is open (its signals are then ignored, §5.7).

        Called for every signal from that peer; the factory may attach the live connection to the
        room the signal was for (§8.1).
        """
        ...

    def accepts(self, peer_id: str) -> bool:
        """False: ignore every signal from `peer_id` (banned, or not a peer this side talks to)."""
        ...

    async def create_offer(self, peer_id: str | None) -> tuple[Any, str]:
        """A new initiating connection (it creates the data channel); returns (handle, full SDP).

        `peer_id` is None for torrent offers, whose answerer is not known yet.
        """
        ...

    async def accept_offer(self, peer_id: str, sdp: str) -> tuple[Any, str]:
        """A new answering connection for `peer_id`'s offer; returns (handle, answer SDP)."""
        ...

    async def accept_answer(self, handle: Any, peer_id: str, sdp: str) -> None:
        """Apply `peer_id`'s answer to an offer made with `handle`."""
        ...

    async def add_candidate(self, handle: Any, candidate: Candidate) -> None:
        """Add a remote trickled candidate (queued by the factory until a description exists)."""
        ...

    async def discard(self, handle: Any) -> None:
        """Abandon a negotiation (glare, expiry, deadline): close its connection."""
        ...


JoinErrorHandler = Callable[[str, str], None]
"""Called with (peer_id, reason) for join errors (wrong password, connect timeout)."""


# -- per-peer negotiation state --------------------------------------------------------------------


@dataclass(eq=False)
class Offer:
    """Our outgoing offer to one peer (topic: created on announce; torrent: adopted on answer)."""

    offer_id: str
    handle: Any
    sealed: str
    answered: bool = False
    offering_relays: set[Any] = field(default_factory=set)
    timers: list[TimerHandle] = field(default_factory=list)


@dataclass(eq=False)
class Answering:
    offer_id: str | None
    handle: Any
    timers: list[TimerHandle] = field(default_factory=list)
    started: float = 0.0


@dataclass(eq=False)
class Negotiation:
    peer_id: str
    offer: Offer | None = None
    answering: Answering | None = None
    early_candidates: OrderedDict[tuple[str | None, str], Candidate] = field(
        default_factory=OrderedDict
    )
    applied: dict[int, set[str]] = field(default_factory=dict)  # id(handle) -> candidate lines
    early_timer: TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return self.offer is None and self.answering is None and not self.early_candidates


Event = Callable[[Negotiation], Awaitable[None]]


class NegotiationEngine:
    """Per-peer workers, timers, sealing and join-error reporting shared by both strategies."""

    def __init__(
        self,
        *,
        app_id: str,
        room_id: str,
        self_id: str,
        password: str,
        factory: PeerFactory,
        timers: StrategyTimers | None,
        clock: Clock | None,
        on_join_error: JoinErrorHandler | None,
    ) -> None:
        if not self_id:
            raise ValueError("self_id must be a non-empty string")
        self.app_id = app_id
        self.room_id = room_id
        self.self_id = self_id
        self.root_topic = names.root_topic(app_id, room_id)
        self.self_topic = names.self_topic(app_id, room_id, self_id)
        self.timers = timers or StrategyTimers()
        self._sealer = Sealer(names.signalling_key(password, app_id, room_id))
        self._factory = factory
        self._clock: Clock = clock or LoopClock()
        self._on_join_error = on_join_error
        self._tasks = TaskOwner(f"signaling[{self_id[:8]}]")
        self._negotiations: dict[str, Negotiation] = {}
        self._queues: dict[str, deque[Event]] = {}
        self._workers: dict[str, asyncio.Task[Any]] = {}
        self._timers: set[TimerHandle] = set()
        self._warned: set[tuple[str, str]] = set()
        self._closed = False
        self._started = False
        self._close_lock = asyncio.Lock()
        self.dropped = 0
        """Signals dropped (malformed, undecryptable, queue full) — for tests and metrics."""

    # -- public ------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def release(self, peer_id: str, handle: Any) -> None:
        """The factory took over `handle` (connection open) or lost it (closed): forget it.

        Clears the negotiation with `peer_id` only if it still refers to `handle`, so a newer
        negotiation is never disturbed. The handle is not discarded.
        """

        neg = self._negotiations.get(peer_id)
        if neg is None:
            return
        # Synchronous: only state is dropped (no await), so a worker in flight for this peer
        # finds the negotiation changed when it resumes and leaves the handle alone.
        if neg.offer is not None and neg.offer.handle is handle:
            self._drop_offer(neg)
        if neg.answering is not None and neg.answering.handle is handle:
            self._drop_answering(neg)
        neg.applied.pop(id(handle), None)
        if neg.idle and peer_id not in self._workers:
            del self._negotiations[peer_id]

    async def _start_relays(self, relays: list[Any], on_message: Callable[..., None],
                            joined: Callable[[Any], Awaitable[None]], what: str) -> None:
        """Start every relay (not waiting for its socket) and run `joined` once each is connected.

        Returns once every relay was asked to connect, so one dead relay never blocks the others.
        """
        if self._started:
            return
        self._started = True
        for relay in relays:
            relay.set_handler(partial(on_message, relay))
            await relay.start()
            self._tasks.spawn(self._when_connected(relay, joined, what), f"join[{relay.url}]")

    async def _when_connected(self, relay: Any, joined: Callable[[Any], Awaitable[None]], what: str) -> None:
        # Announcing into a socket that is still connecting drops the message and delays discovery
        # to the next warm-up point: start once the relay is up.
        while not await relay.wait_connected(RELAY_CONNECT_WAIT_SECONDS):
            logger.info("%s %s is not reachable yet; still waiting", what, relay.url)
        await joined(relay)

    # -- per-peer workers --------------------------------------------------------------------------

    def _enqueue(self, peer_id: str, event: Event, *, internal: bool = False) -> None:
        if self._closed:
            return
        queue = self._queues.get(peer_id)
        if queue is None:
            crowded = len(self._negotiations) >= MAX_NEGOTIATING_PEERS
            if not internal and crowded and peer_id not in self._negotiations:
                self._drop("too many negotiating peers; ignoring %s", peer_id)
                return
            queue = self._queues[peer_id] = deque()
        if not internal and len(queue) >= MAX_QUEUED_EVENTS_PER_PEER:
            self._drop("event queue for %s is full", peer_id)
            return
        queue.append(event)
        if peer_id not in self._workers:
            task = self._tasks.spawn(self._work(peer_id), f"peer[{peer_id[:8]}]")
            if task is not None:
                self._workers[peer_id] = task

    async def _work(self, peer_id: str) -> None:
        queue = self._queues[peer_id]
        try:
            while queue and not self._closed:
                event = queue.popleft()
                neg = self._negotiations.get(peer_id)
                if neg is None:
                    neg = self._negotiations[peer_id] = Negotiation(peer_id)
                try:
                    await event(neg)
                except NegotiationError as exc:  # a remote SDP we cannot use
                    logger.warning("negotiation with %s failed: %s", peer_id, exc)
                except SignalingError as exc:  # remote garbage: drop this event, keep the peer
                    self._drop("from %s: %s", peer_id, exc)
                except Exception:  # a factory failure must not kill the engine (logged)
                    logger.exception("signalling with %s failed", peer_id)
                if neg.idle and self._negotiations.get(peer_id) is neg:
                    del self._negotiations[peer_id]
        finally:
            self._workers.pop(peer_id, None)
            if not queue:
                self._queues.pop(peer_id, None)

    # -- helpers -----------------------------------------------------------------------------------

    def _drop(self, reason: str, *args: object) -> None:
        self.dropped += 1
        logger.debug("signal dropped: " + reason, *args)

    def _timer(self, delay: float, peer_id: str, event: Event) -> TimerHandle:
        """Schedule `event` on `peer_id`'s worker after `delay` seconds."""
        handle: TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self._enqueue(peer_id, event, internal=True)

        handle = self._clock.call_later(delay, fire)
        self._timers.add(handle)
        return handle

    def _cancel(self, handles: list[TimerHandle]) -> None:
        for handle in handles:
            handle.cancel()
            self._timers.discard(handle)
        handles.clear()

    def _unseal(self, peer_id: str, sealed: str, what: str) -> str | None:
        """Decrypt, or warn (offers/answers, once per peer) and return None."""
        try:
            return self._sealer.unseal(sealed)
        except SealError as exc:
            self.dropped += 1
            if what == "candidate":  # dropped silently, like Trystero (§4)
                logger.debug("undecryptable candidate from %s: %s", peer_id, exc)
                return None
            if (peer_id, what) not in self._warned:
                if len(self._warned) >= MAX_WARNED:
                    self._warned.clear()
                self._warned.add((peer_id, what))
                logger.warning(
                    "cannot decrypt the %s from peer %s in room %r: wrong room password? (%s)",
                    what,
                    peer_id,
                    self.room_id,
                    exc,
                )
                self._join_error(peer_id, f"incorrect room password (undecryptable {what})")
            return None

    def _join_error(self, peer_id: str, reason: str) -> None:
        if self._on_join_error is not None:
            try:
                self._on_join_error(peer_id, reason)
            except Exception:  # a callback bug must not break signalling
                logger.exception("join-error callback failed")

    def _discard_later(self, handle: Any) -> None:
        self._tasks.spawn(self._factory.discard(handle), "discard")

    def _drop_offer(self, neg: Negotiation, *, discard: bool = False) -> None:
        if neg.offer is None:
            return
        self._cancel(neg.offer.timers)
        if discard:
            self._discard_later(neg.offer.handle)
        neg.applied.pop(id(neg.offer.handle), None)
        neg.offer = None

    def _drop_answering(self, neg: Negotiation, *, discard: bool = False) -> None:
        if neg.answering is None:
            return
        self._cancel(neg.answering.timers)
        if discard:
            self._discard_later(neg.answering.handle)
        neg.applied.pop(id(neg.answering.handle), None)
        neg.answering = None

    async def _add_candidate(self, neg: Negotiation, handle: Any, candidate: Candidate) -> None:
        applied = neg.applied.setdefault(id(handle), set())
        if candidate.candidate in applied:  # duplicate across relays
            return
        if len(applied) < MAX_APPLIED_CANDIDATES:
            applied.add(candidate.candidate)
        await self._factory.add_candidate(handle, candidate)

    def _buffer_candidate(
        self, neg: Negotiation, offer_id: str | None, candidate: Candidate
    ) -> None:
        neg.early_candidates[(offer_id, candidate.candidate)] = candidate
        while len(neg.early_candidates) > MAX_BUFFERED_CANDIDATES:
            neg.early_candidates.popitem(last=False)
        if neg.early_timer is None:  # candidates whose offer never comes are forgotten
            neg.early_timer = self._timer(
                self.timers.answer_ttl_seconds, neg.peer_id, self._forget_early_candidates
            )

    async def _forget_early_candidates(self, neg: Negotiation) -> None:
        neg.early_timer = None
        neg.early_candidates.clear()

    async def _flush_candidates(self, neg: Negotiation, offer_id: str | None, handle: Any) -> None:
        """Apply early candidates for `offer_id` (and the legacy no-offerId bucket)."""
        matching = [key for key in neg.early_candidates if key[0] in (offer_id, None)]
        for key in matching:
            candidate = neg.early_candidates.pop(key)
            await self._add_candidate(neg, handle, candidate)

    def _expire_answering(self, answering: Answering) -> Event:
        async def expire(neg: Negotiation) -> None:
            if neg.answering is not answering:
                return
            if self._factory.is_live(neg.peer_id):
                self._drop_answering(neg)  # connected: the factory owns the handle now
                return
            logger.info("answer to %s expired without a connection", neg.peer_id)
            self._drop_answering(neg, discard=True)

        return expire

    def _connect_deadline(self, offer: Offer) -> Event:
        async def deadline(neg: Negotiation) -> None:
            if neg.offer is not offer:
                return
            if self._factory.is_live(neg.peer_id):
                self._drop_offer(neg)
                return
            logger.warning(
                "could not connect to peer %s within %g s after its answer (configure TURN?)",
                neg.peer_id,
                self.timers.connect_timeout_seconds,
            )
            self._join_error(neg.peer_id, "could not connect (connect deadline)")
            self._drop_offer(neg, discard=True)

        return deadline

    async def _close_engine(self) -> list[Any]:
        """Stop timers and workers; returns the handles still owned by the engine."""
        self._closed = True
        for handle in list(self._timers):
            handle.cancel()
        self._timers.clear()
        await self._tasks.aclose()
        handles: list[Any] = []
        for neg in self._negotiations.values():
            for state in (neg.offer, neg.answering):
                if state is not None:
                    self._cancel(state.timers)
                    handles.append(state.handle)
        self._negotiations.clear()
        self._queues.clear()
        return handles

    async def _discard_all(self, handles: list[Any]) -> None:
        for handle in handles:
            try:
                await self._factory.discard(handle)
            except Exception:  # closing must go on for the other handles
                logger.exception("discarding a negotiation failed")
