"""The Trystero signalling engine for topic relays (ws-relay, MQTT, Nostr, memory).

Implements trystero-wire §5: subscribe self topic then root topic, announce on the warm-up schedule,
roles by id order (the smaller id offers, the larger counter-announces), one sealed offer per
remote peer re-sent per relay, answers on the relay the offer came on, trickled candidates buffered
until their description exists, duplicates across relays dropped, own echoes ignored, and signals
from peers with a live connection ignored (the peer factory may then attach that connection to
this room, §8.1).

The engine never touches WebRTC: it drives an injected :class:`PeerFactory` (make an offer, accept
an offer, apply an answer, add a candidate, discard), so this package stays free of aiortc.

Concurrency: relay handlers only parse and enqueue; each remote peer has one worker task that
handles its events in order (signals, timer expiries, releases), so a slow SDP negotiation with one
peer never blocks another and the per-peer state machine has no interleaving. Every task is owned
by :class:`TaskOwner` and cancelled by :meth:`TopicStrategy.close`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from signaling.protocol import messages, names
from signaling.base import SignalingError, TopicRelay
from signaling.protocol.messages import Candidate, Signal
from signaling.protocol.sealing import Sealer, SealError

__all__ = [
    "Clock",
    "LoopClock",
    "NegotiationError",
    "PeerFactory",
    "StrategyTimers",
    "TaskOwner",
    "TopicStrategy",
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
TASK_STOP_TIMEOUT_SECONDS = 5.0


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


class TaskOwner:
    """Owns short-lived background tasks: logs their failures, cancels and awaits them on close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        """Start `coro` as an owned task; returns None (and closes `coro`) after close()."""
        if self._closed:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}.{name}")
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def aclose(self, timeout: float = TASK_STOP_TIMEOUT_SECONDS) -> None:
        """Cancel every task and wait (bounded) until they have ended; idempotent."""
        self._closed = True
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                logger.warning("task %s did not stop within %.1f s", task.get_name(), timeout)


# -- per-peer negotiation state --------------------------------------------------------------------


@dataclass(eq=False)
class _Offer:
    """Our outgoing offer to one peer (topic: created on announce; torrent: adopted on answer)."""

    offer_id: str
    handle: Any
    sealed: str
    answered: bool = False
    offering_relays: set[Any] = field(default_factory=set)
    timers: list[TimerHandle] = field(default_factory=list)


@dataclass(eq=False)
class _Answering:
    offer_id: str | None
    handle: Any
    timers: list[TimerHandle] = field(default_factory=list)
    started: float = 0.0


@dataclass(eq=False)
class _Negotiation:
    peer_id: str
    offer: _Offer | None = None
    answering: _Answering | None = None
    early_candidates: OrderedDict[tuple[str | None, str], Candidate] = field(
        default_factory=OrderedDict
    )
    applied: dict[int, set[str]] = field(default_factory=dict)  # id(handle) -> candidate lines
    early_timer: TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return self.offer is None and self.answering is None and not self.early_candidates


Event = Callable[[_Negotiation], Awaitable[None]]


class _EngineBase:
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
        self._negotiations: dict[str, _Negotiation] = {}
        self._queues: dict[str, deque[Event]] = {}
        self._workers: dict[str, asyncio.Task[Any]] = {}
        self._timers: set[TimerHandle] = set()
        self._warned: set[tuple[str, str]] = set()
        self._closed = False
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
                    neg = self._negotiations[peer_id] = _Negotiation(peer_id)
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

    def _drop_offer(self, neg: _Negotiation, *, discard: bool = False) -> None:
        if neg.offer is None:
            return
        self._cancel(neg.offer.timers)
        if discard:
            self._discard_later(neg.offer.handle)
        neg.applied.pop(id(neg.offer.handle), None)
        neg.offer = None

    def _drop_answering(self, neg: _Negotiation, *, discard: bool = False) -> None:
        if neg.answering is None:
            return
        self._cancel(neg.answering.timers)
        if discard:
            self._discard_later(neg.answering.handle)
        neg.applied.pop(id(neg.answering.handle), None)
        neg.answering = None

    async def _add_candidate(self, neg: _Negotiation, handle: Any, candidate: Candidate) -> None:
        applied = neg.applied.setdefault(id(handle), set())
        if candidate.candidate in applied:  # duplicate across relays
            return
        if len(applied) < MAX_APPLIED_CANDIDATES:
            applied.add(candidate.candidate)
        await self._factory.add_candidate(handle, candidate)

    def _buffer_candidate(
        self, neg: _Negotiation, offer_id: str | None, candidate: Candidate
    ) -> None:
        neg.early_candidates[(offer_id, candidate.candidate)] = candidate
        while len(neg.early_candidates) > MAX_BUFFERED_CANDIDATES:
            neg.early_candidates.popitem(last=False)
        if neg.early_timer is None:  # candidates whose offer never comes are forgotten
            neg.early_timer = self._timer(
                self.timers.answer_ttl_seconds, neg.peer_id, self._forget_early_candidates
            )

    async def _forget_early_candidates(self, neg: _Negotiation) -> None:
        neg.early_timer = None
        neg.early_candidates.clear()

    async def _flush_candidates(self, neg: _Negotiation, offer_id: str | None, handle: Any) -> None:
        """Apply early candidates for `offer_id` (and the legacy no-offerId bucket)."""
        matching = [key for key in neg.early_candidates if key[0] in (offer_id, None)]
        for key in matching:
            candidate = neg.early_candidates.pop(key)
            await self._add_candidate(neg, handle, candidate)

    def _expire_answering(self, answering: _Answering) -> Event:
        async def expire(neg: _Negotiation) -> None:
            if neg.answering is not answering:
                return
            if self._factory.is_live(neg.peer_id):
                self._drop_answering(neg)  # connected: the factory owns the handle now
                return
            logger.info("answer to %s expired without a connection", neg.peer_id)
            self._drop_answering(neg, discard=True)

        return expire

    def _connect_deadline(self, offer: _Offer) -> Event:
        async def deadline(neg: _Negotiation) -> None:
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


class TopicStrategy(_EngineBase):
    """Trystero signalling over one or more topic relays for one room.

    Args:
        relays: the relay adapters (one per URL); the strategy owns them and closes them.
        app_id: Trystero appId.
        room_id: Trystero roomId.
        self_id: our peer id (20 characters from the id alphabet).
        password: room password ("" for none).
        factory: the WebRTC side (see :class:`PeerFactory`).
        timers: timer values (defaults are Trystero's).
        clock: time source (the event loop by default).
        on_join_error: called with (peer_id, reason) for wrong passwords and connect timeouts.
    """

    def __init__(
        self,
        relays: list[TopicRelay],
        *,
        app_id: str,
        room_id: str,
        self_id: str,
        factory: PeerFactory,
        password: str = "",
        timers: StrategyTimers | None = None,
        clock: Clock | None = None,
        on_join_error: JoinErrorHandler | None = None,
    ) -> None:
        super().__init__(
            app_id=app_id,
            room_id=room_id,
            self_id=self_id,
            password=password,
            factory=factory,
            timers=timers,
            clock=clock,
            on_join_error=on_join_error,
        )
        if not relays:
            raise ValueError("at least one relay is needed")
        self.relays = list(relays)
        self._started = False

    async def start(self) -> None:
        """Start the relays, subscribe (self topic, then root) and begin announcing.

        Returns once every relay was asked to connect; subscriptions and announcements proceed in
        the background, so one dead relay never blocks the others (§5.1).
        """
        if self._started:
            return
        self._started = True
        for relay in self.relays:
            relay.set_handler(partial(self._on_relay_message, relay))
            await relay.start()
            self._tasks.spawn(self._join_relay(relay), f"join[{relay.url}]")

    async def _join_relay(self, relay: TopicRelay) -> None:
        # The warm-up announcements only help once the relay is up: announcing into a socket that
        # is still connecting drops them and delays discovery to the next warm-up point.
        while not await relay.wait_connected(RELAY_CONNECT_WAIT_SECONDS):
            logger.info("relay %s is not reachable yet; still waiting", relay.url)
        # §5.1: self topic first, then root, then announce.
        await relay.subscribe(self.self_topic)
        await relay.subscribe(self.root_topic)
        self._schedule_announce(relay, 0)

    def _schedule_announce(self, relay: TopicRelay, index: int) -> None:
        schedule = self.timers.announce_schedule_seconds
        if index < len(schedule):
            delay = schedule[index] - (schedule[index - 1] if index else 0.0)
        else:
            delay = self.timers.announce_interval_seconds

        def fire() -> None:
            self._timers.discard(handle)
            if self._closed:
                return
            self._tasks.spawn(self._announce(relay), "announce")
            self._schedule_announce(relay, index + 1)

        handle = self._clock.call_later(delay, fire)
        self._timers.add(handle)

    async def _announce(self, relay: TopicRelay) -> None:
        await relay.publish(self.root_topic, messages.build_announce(self.self_id))

    async def close(self) -> None:
        """Stop announcing, unsubscribe, discard unfinished negotiations, close the relays.

        Idempotent; a concurrent second call waits for the first.
        """
        async with self._close_lock:
            if self._closed:
                return
            handles = await self._close_engine()
            await self._discard_all(handles)
            for relay in self.relays:
                try:
                    async with asyncio.timeout(UNSUBSCRIBE_TIMEOUT_SECONDS):
                        await relay.unsubscribe(self.root_topic)
                        await relay.unsubscribe(self.self_topic)
                except (TimeoutError, SignalingError, OSError) as exc:  # best effort on the way out
                    logger.debug("unsubscribe on %s failed: %s", relay.url, exc)
                await relay.close()

    # -- inbound -----------------------------------------------------------------------------------

    def _on_relay_message(self, relay: TopicRelay, topic: str, text: str) -> None:
        """Relay handler: validate (§5.3), drop echoes, hand the signal to the peer's worker."""
        if self._closed:
            return
        if topic not in (self.root_topic, self.self_topic):
            self._drop("message on foreign topic %s", topic)
            return
        try:
            signal = messages.parse_signal(text)
        except messages.SignalingMessageError as exc:
            self._drop("%s", exc)
            return
        if signal.peer_id == self.self_id:
            return  # our own publication echoed back (§5.1)

        async def handle(neg: _Negotiation) -> None:
            await self._handle_signal(relay, neg, signal)

        self._enqueue(signal.peer_id, handle)

    async def _handle_signal(self, relay: TopicRelay, neg: _Negotiation, signal: Signal) -> None:
        if self._factory.is_live(signal.peer_id):
            return  # §5.7: a healthy connection exists; the factory re-binds it (§8.1)
        if signal.kind == "announce":
            await self._on_announce(relay, neg)
        elif signal.kind == "offer":
            await self._on_offer(relay, neg, signal)
        elif signal.kind == "candidate":
            await self._on_candidate(neg, signal)
        else:
            await self._on_answer(neg, signal)

    async def _publish_to(self, relay: TopicRelay, peer_id: str, text: str) -> None:
        topic = names.self_topic(self.app_id, self.room_id, peer_id)
        if not await relay.publish(topic, text):
            logger.debug("relay %s is down; message to %s not sent", relay.url, peer_id)

    async def _on_announce(self, relay: TopicRelay, neg: _Negotiation) -> None:
        peer_id = neg.peer_id
        if neg.answering is not None or (neg.offer is not None and neg.offer.answered):
            return
        if self.self_id > peer_id:
            if neg.offer is None:  # §5.4: ask the smaller id to offer
                await self._publish_to(relay, peer_id, messages.build_announce(self.self_id))
            return
        if neg.offer is None:
            handle, sdp = await self._factory.create_offer(peer_id)
            if self._closed or neg.offer is not None or neg.answering is not None:
                await self._factory.discard(handle)
                return
            offer = _Offer(
                offer_id=names.gen_id(OFFER_ID_LENGTH), handle=handle, sealed=self._sealer.seal(sdp)
            )
            neg.offer = offer
            offer.timers.append(
                self._timer(self.timers.offer_ttl_seconds, peer_id, self._expire_offer(offer))
            )
        offer = neg.offer
        if relay in offer.offering_relays:
            return  # re-send only after the window (§5.5)
        offer.offering_relays.add(relay)
        window = self.timers.offer_resend_fraction * self.timers.announce_interval_seconds
        offer.timers.append(
            self._clock.call_later(window, partial(offer.offering_relays.discard, relay))
        )
        await self._publish_to(
            relay, peer_id, messages.build_offer(self.self_id, offer.offer_id, offer.sealed)
        )

    def _expire_offer(self, offer: _Offer) -> Event:
        async def expire(neg: _Negotiation) -> None:
            if neg.offer is offer and not offer.answered:
                logger.info("offer %s to %s expired unanswered", offer.offer_id, neg.peer_id)
                self._drop_offer(neg, discard=True)

        return expire

    async def _on_offer(self, relay: TopicRelay, neg: _Negotiation, signal: Signal) -> None:
        peer_id = neg.peer_id
        if neg.answering is not None:
            return  # duplicate (other relay / re-send) while answering (§5.7)
        if neg.offer is not None and (neg.offer.answered or self.self_id < peer_id):
            return  # our offer wins or already connected through it (§5.4)
        assert signal.sealed is not None
        sdp = self._unseal(peer_id, signal.sealed, "offer")
        if sdp is None:
            return
        self._drop_offer(neg, discard=True)  # glare: we are the larger id, answer theirs
        handle, answer_sdp = await self._factory.accept_offer(peer_id, sdp)
        if self._closed:
            await self._factory.discard(handle)
            return
        answering = _Answering(offer_id=signal.offer_id, handle=handle)
        neg.answering = answering
        answering.timers.append(
            self._timer(self.timers.answer_ttl_seconds, peer_id, self._expire_answering(answering))
        )
        await self._publish_to(
            relay,
            peer_id,
            messages.build_answer(self.self_id, self._sealer.seal(answer_sdp), signal.offer_id),
        )
        await self._flush_candidates(neg, signal.offer_id, handle)

    async def _on_candidate(self, neg: _Negotiation, signal: Signal) -> None:
        assert signal.sealed is not None
        text = self._unseal(neg.peer_id, signal.sealed, "candidate")
        if text is None:
            return
        candidate = messages.parse_candidate_json(text)
        if not candidate.candidate:
            return  # end-of-candidates as an empty candidate (Firefox, §5.2)
        offer_id = signal.offer_id
        if neg.answering is not None and offer_id in (None, neg.answering.offer_id):
            await self._add_candidate(neg, neg.answering.handle, candidate)
        elif neg.offer is not None and offer_id in (None, neg.offer.offer_id):
            # Before the answer the factory queues it until the remote description exists.
            await self._add_candidate(neg, neg.offer.handle, candidate)
        else:
            self._buffer_candidate(neg, offer_id, candidate)  # the offer has not arrived yet

    async def _on_answer(self, neg: _Negotiation, signal: Signal) -> None:
        offer = neg.offer
        if offer is None or offer.answered:
            return
        if signal.offer_id is not None and signal.offer_id != offer.offer_id:
            return  # an answer to an older offer
        assert signal.sealed is not None
        sdp = self._unseal(neg.peer_id, signal.sealed, "answer")
        if sdp is None:
            return
        offer.answered = True  # accept only once (§5.5)
        self._cancel(offer.timers)
        offer.offering_relays.clear()
        try:
            await self._factory.accept_answer(offer.handle, neg.peer_id, sdp)
        except NegotiationError as exc:  # a bad answer ends this attempt; the next one starts over
            logger.warning("cannot apply the answer from %s: %s", neg.peer_id, exc)
            self._drop_offer(neg, discard=True)
            return
        except Exception:  # a factory bug: log it with its traceback, end this attempt
            logger.exception("applying the answer from %s failed", neg.peer_id)
            self._drop_offer(neg, discard=True)
            return
        offer.timers.append(
            self._timer(
                self.timers.connect_timeout_seconds, neg.peer_id, self._connect_deadline(offer)
            )
        )
        await self._flush_candidates(neg, offer.offer_id, offer.handle)
