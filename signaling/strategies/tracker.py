"""The Trystero signalling engine for WebTorrent trackers (trystero-wire §6.4).

Not a topic strategy: there are no announce-only messages and no self topics. Each tracker socket
gets an announce carrying a small pool of complete (non-trickle) sealed offers; the tracker forwards
each offer to one random member of the swarm, whose answer comes back with the ``offer_id``. We
answer offers forwarded to us on the same tracker socket with ``to_peer_id``.

aiortc gathers every candidate before returning a description (P4), so our SDPs are complete as the
torrent path requires. Ids must be exactly 20 characters (P20).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from signaling.base import TrackerRelay
from signaling.protocol import messages, names
from signaling.protocol.messages import (
    TrackerAnnounceReply,
    TrackerAnswer,
    TrackerNotice,
    TrackerOffer,
)
from signaling.strategies.engine import (
    Answering,
    Clock,
    JoinErrorHandler,
    Negotiation,
    NegotiationEngine,
    NegotiationError,
    Offer,
    PeerFactory,
    StrategyTimers,
    TimerHandle,
)

__all__ = ["TORRENT_ID_LENGTH", "TrackerStrategy"]

logger = logging.getLogger(__name__)

TORRENT_ID_LENGTH = 20
"""Trackers require 20-character ``peer_id``, ``info_hash`` and (Trystero) ``offer_id``."""
DEFAULT_OFFERS_PER_ANNOUNCE = 3
DEDUPE_CAPACITY = 1024


@dataclass(eq=False)
class _PooledOffer:
    offer_id: str
    handle: Any
    sealed: str
    timers: list[TimerHandle] = field(default_factory=list)


class TrackerStrategy(NegotiationEngine):
    """Trystero signalling over one or more WebTorrent trackers for one room.

    Args:
        relays: tracker adapters (one per URL); the strategy owns them and closes them.
        app_id: Trystero appId.
        room_id: Trystero roomId.
        self_id: our 20-character peer id.
        factory: the WebRTC side (see :class:`~signaling.strategies.topic.PeerFactory`).
        password: room password ("" for none).
        timers: timer values (defaults are Trystero 0.25.3's).
        clock: time source (the event loop by default).
        on_join_error: called with (peer_id, reason) for wrong passwords and connect timeouts.
        offers_per_announce: offers kept outstanding per tracker (0 = answer only).
        numwant: ``numwant`` field; defaults to `offers_per_announce` (or 3 when that is 0).
    """

    def __init__(
        self,
        relays: list[TrackerRelay],
        *,
        app_id: str,
        room_id: str,
        self_id: str,
        factory: PeerFactory,
        password: str = "",
        timers: StrategyTimers | None = None,
        clock: Clock | None = None,
        on_join_error: JoinErrorHandler | None = None,
        offers_per_announce: int = DEFAULT_OFFERS_PER_ANNOUNCE,
        numwant: int | None = None,
    ) -> None:
        if len(self_id) != TORRENT_ID_LENGTH:
            raise ValueError("torrent peer ids must be exactly 20 characters")
        if not relays:
            raise ValueError("at least one tracker is needed")
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
        self.relays = list(relays)
        self.info_hash = names.info_hash(self.root_topic)
        self.offers_per_announce = max(0, offers_per_announce)
        self.numwant = numwant if numwant is not None else (self.offers_per_announce or 3)
        self._pools: dict[TrackerRelay, dict[str, _PooledOffer]] = {r: {} for r in self.relays}
        self._intervals: dict[TrackerRelay, float] = {}
        self._announcing: set[TrackerRelay] = set()
        self._nudged: set[str] = set()
        self._seen: dict[tuple[str, str, str], float] = {}
        self._notices: set[str] = set()

    async def start(self) -> None:
        """Start the trackers and the announce schedule (returns without waiting for sockets)."""
        await self._start_relays(self.relays, self._on_tracker_message, self._join_tracker, "tracker")

    async def _join_tracker(self, relay: TrackerRelay) -> None:
        self._schedule_announce(relay, 0)

    async def close(self) -> None:
        """Stop announcing, discard pooled offers and negotiations, close the trackers."""
        async with self._close_lock:
            if self._closed:
                return
            handles = await self._close_engine()
            for pool in self._pools.values():
                for pooled in pool.values():
                    self._cancel(pooled.timers)
                    handles.append(pooled.handle)
                pool.clear()
            await self._discard_all(handles)
            for relay in self.relays:
                await relay.close()

    # -- announcing --------------------------------------------------------------------------------

    def _schedule_announce(self, relay: TrackerRelay, index: int) -> None:
        schedule = self.timers.announce_schedule_seconds
        if index < len(schedule):
            delay = schedule[index] - (schedule[index - 1] if index else 0.0)
        else:
            delay = self._intervals.get(relay, self.timers.tracker_announce_interval_seconds)

        def fire() -> None:
            self._timers.discard(handle)
            if self._closed:
                return
            self._announce_now(relay)
            self._schedule_announce(relay, index + 1)

        handle = self._clock.call_later(delay, fire)
        self._timers.add(handle)

    def _announce_now(self, relay: TrackerRelay) -> None:
        if relay not in self._announcing:
            self._announcing.add(relay)
            self._tasks.spawn(self._announce(relay), "announce")

    async def _announce(self, relay: TrackerRelay) -> None:
        try:
            if not relay.connected:
                return
            pool = self._pools[relay]
            while len(pool) < self.offers_per_announce and not self._closed:
                handle, sdp = await self._factory.create_offer(None)
                pooled = _PooledOffer(
                    offer_id=names.gen_id(TORRENT_ID_LENGTH),
                    handle=handle,
                    sealed=self._sealer.seal(sdp),
                )
                pooled.timers.append(
                    self._clock.call_later(
                        self.timers.tracker_offer_ttl_seconds,
                        partial(self._expire_pooled, relay, pooled),
                    )
                )
                pool[pooled.offer_id] = pooled
            offers = [(p.offer_id, p.sealed) for p in pool.values()]
            await relay.send(
                messages.build_tracker_announce(
                    self.info_hash, self.self_id, offers, numwant=self.numwant
                )
            )
        finally:
            self._announcing.discard(relay)

    def _expire_pooled(self, relay: TrackerRelay, pooled: _PooledOffer) -> None:
        pool = self._pools.get(relay, {})
        if pool.get(pooled.offer_id) is pooled:
            del pool[pooled.offer_id]
            self._discard_later(pooled.handle)

    # -- inbound -----------------------------------------------------------------------------------

    def _on_tracker_message(self, relay: TrackerRelay, obj: dict[str, Any]) -> None:
        if self._closed:
            return
        try:
            message = messages.parse_tracker_message(obj)
        except messages.SignalingMessageError as exc:
            self._drop("tracker %s: %s", relay.url, exc)
            return
        if message.info_hash is not None and message.info_hash != self.info_hash:
            return  # another swarm on a shared socket
        if isinstance(message, TrackerNotice):
            if message.text not in self._notices:
                self._notices.add(message.text)
                logger.warning("tracker %s says: %s", relay.url, message.text)
        elif isinstance(message, TrackerAnnounceReply):
            if message.interval is not None:
                self._intervals[relay] = min(
                    message.interval, self.timers.tracker_interval_cap_seconds
                )
        elif message.peer_id == self.self_id or self._duplicate(message):
            return
        elif isinstance(message, TrackerOffer):

            async def on_offer(neg: Negotiation) -> None:
                await self._on_offer(relay, neg, message)

            self._enqueue(message.peer_id, on_offer)
        else:
            pooled = self._take_pooled(message)
            if pooled is None:
                # Usually an offer the tracker also forwarded to someone else, who answered
                # first: this peer still wants to connect, so give it fresh offers soon.
                self._drop("answer for unknown offer %s", message.offer_id)
                self._nudge(relay, message.peer_id)
                return

            async def on_answer(neg: Negotiation) -> None:
                await self._on_answer(neg, message, pooled)

            self._enqueue(message.peer_id, on_answer)

    def _duplicate(self, message: TrackerOffer | TrackerAnswer) -> bool:
        """Drop repeats of (type, offer_id, peer_id) within the dedupe window (§6.4)."""
        now = self._clock.time()
        window = self.timers.tracker_dedupe_seconds
        if len(self._seen) > DEDUPE_CAPACITY:
            self._seen = {k: t for k, t in self._seen.items() if now - t < window}
        key = (type(message).__name__, message.offer_id, message.peer_id)
        seen_at = self._seen.get(key)
        self._seen[key] = now
        return seen_at is not None and now - seen_at < window

    def _nudge(self, relay: TrackerRelay, peer_id: str) -> None:
        """Re-announce now, once per peer, so the tracker forwards our offers sooner."""
        if peer_id not in self._nudged:
            if len(self._nudged) >= DEDUPE_CAPACITY:
                self._nudged.clear()
            self._nudged.add(peer_id)
            self._announce_now(relay)

    def _take_pooled(self, answer: TrackerAnswer) -> _PooledOffer | None:
        for pool in self._pools.values():
            pooled = pool.pop(answer.offer_id, None)
            if pooled is not None:
                self._cancel(pooled.timers)
                return pooled
        return None

    async def _on_offer(self, relay: TrackerRelay, neg: Negotiation, offer: TrackerOffer) -> None:
        peer_id = neg.peer_id
        if not self._factory.accepts(peer_id) or self._factory.is_live(peer_id) or neg.offer is not None:
            return
        if neg.answering is not None:
            waited = self._clock.time() - neg.answering.started
            if (neg.answering.offer_id == offer.offer_id
                    or waited < self.timers.tracker_answer_supersede_seconds):
                return
            # The offer we answered also went to another peer, whose answer was taken: ours will
            # never be applied. This newer offer is the one to answer.
            logger.debug("answering %s's newer offer; our answer of %.1f s ago went unused",
                         peer_id, waited)
            self._drop_answering(neg, discard=True)
        if self.self_id < peer_id and self._pools[relay]:
            # Glare: our outstanding offers win when our id is smaller (§6.4). A newcomer whose
            # offers reach us may have missed ours: re-announce now (once per newcomer) so the
            # tracker forwards them, instead of waiting for the next scheduled announce.
            self._nudge(relay, peer_id)
            return
        sdp = self._unseal(peer_id, offer.sealed, "offer")
        if sdp is None:
            return
        handle, answer_sdp = await self._factory.accept_offer(peer_id, sdp)
        if self._closed:
            await self._factory.discard(handle)
            return
        answering = Answering(offer_id=offer.offer_id, handle=handle, started=self._clock.time())
        neg.answering = answering
        answering.timers.append(
            self._timer(self.timers.answer_ttl_seconds, peer_id, self._expire_answering(answering))
        )
        await relay.send(
            messages.build_tracker_answer(
                self.info_hash,
                self.self_id,
                offer.offer_id,
                peer_id,
                self._sealer.seal(answer_sdp),
            )
        )

    async def _on_answer(
        self, neg: Negotiation, answer: TrackerAnswer, pooled: _PooledOffer
    ) -> None:
        peer_id = neg.peer_id
        if not self._factory.accepts(peer_id) or self._factory.is_live(peer_id) or neg.offer is not None:
            await self._factory.discard(pooled.handle)  # refused, already connected or connecting
            return
        if neg.answering is not None:
            # Crossed: we answered their offer (our pool was still empty, or theirs reached us
            # first) and they answered ours. Both sides settle it the same way, by §5.4's rule:
            # the smaller id's offer wins. Dropping both (as before) left neither connection up
            # until the answer expired.
            if self.self_id > peer_id:
                await self._factory.discard(pooled.handle)
                return
            logger.debug("crossed offers with %s: ours wins, dropping our answer", peer_id)
            self._drop_answering(neg, discard=True)
        sdp = self._unseal(peer_id, answer.sealed, "answer")
        if sdp is None:
            await self._factory.discard(pooled.handle)
            return
        offer = Offer(
            offer_id=pooled.offer_id, handle=pooled.handle, sealed=pooled.sealed, answered=True
        )
        neg.offer = offer
        try:
            await self._factory.accept_answer(offer.handle, peer_id, sdp)
        except NegotiationError as exc:  # a bad answer ends this attempt; the next one starts over
            logger.warning("cannot apply the answer from %s: %s", peer_id, exc)
            self._drop_offer(neg, discard=True)
            return
        except Exception:  # a factory bug: log it with its traceback, end this attempt
            logger.exception("applying the answer from %s failed", peer_id)
            self._drop_offer(neg, discard=True)
            return
        offer.timers.append(
            self._timer(self.timers.connect_timeout_seconds, peer_id, self._connect_deadline(offer))
        )
