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
from functools import partial

from signaling.base import SignalingError, TopicRelay
from signaling.protocol import messages, names
from signaling.protocol.messages import Signal
from signaling.strategies.engine import (
    OFFER_ID_LENGTH,
    UNSUBSCRIBE_TIMEOUT_SECONDS,
    Answering,
    Clock,
    Event,
    JoinErrorHandler,
    Negotiation,
    NegotiationEngine,
    NegotiationError,
    Offer,
    PeerFactory,
    StrategyTimers,
)

__all__ = ["TopicStrategy"]

logger = logging.getLogger(__name__)

class TopicStrategy(NegotiationEngine):
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

    async def start(self) -> None:
        """Start the relays, subscribe (self topic, then root) and begin announcing.

        Returns once every relay was asked to connect; subscriptions and announcements proceed in
        the background, so one dead relay never blocks the others (§5.1).
        """
        await self._start_relays(self.relays, self._on_relay_message, self._join_relay, "relay")

    async def _join_relay(self, relay: TopicRelay) -> None:
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
        if not self._factory.accepts(signal.peer_id):
            return  # not even a counter-announce: no signalling with peers we will not connect to

        async def handle(neg: Negotiation) -> None:
            await self._handle_signal(relay, neg, signal)

        self._enqueue(signal.peer_id, handle)

    async def _handle_signal(self, relay: TopicRelay, neg: Negotiation, signal: Signal) -> None:
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

    async def _on_announce(self, relay: TopicRelay, neg: Negotiation) -> None:
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
            offer = Offer(
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

    def _expire_offer(self, offer: Offer) -> Event:
        async def expire(neg: Negotiation) -> None:
            if neg.offer is offer and not offer.answered:
                logger.info("offer %s to %s expired unanswered", offer.offer_id, neg.peer_id)
                self._drop_offer(neg, discard=True)

        return expire

    async def _on_offer(self, relay: TopicRelay, neg: Negotiation, signal: Signal) -> None:
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
        answering = Answering(offer_id=signal.offer_id, handle=handle)
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

    async def _on_candidate(self, neg: Negotiation, signal: Signal) -> None:
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

    async def _on_answer(self, neg: Negotiation, signal: Signal) -> None:
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
