"""The signalling engines (trystero-wire §5, §6.4) on MemoryHub relays with a fake peer factory."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from signaling.adapters.memory import MemoryHub, MemoryRelay
from signaling.protocol import messages, names
from signaling.protocol.messages import Candidate
from signaling.protocol.sealing import Sealer
from signaling.strategies.engine import StrategyTimers
from signaling.strategies.topic import TopicStrategy
from signaling.strategies.tracker import TrackerStrategy

APP, ROOM = "test-app", "strategy-room"
SMALL, LARGE = "0" * 19 + "a", "z" * 19 + "a"
TIMEOUT = 5.0

FAST = StrategyTimers(
    announce_schedule_seconds=(0.0,),
    announce_interval_seconds=0.05,
    offer_resend_fraction=0.9,
)


@dataclass(eq=False)
class FakeHandle:
    kind: str
    peer_id: str | None
    sdp: str
    remote_sdp: str | None = None
    candidates: list[Candidate] = field(default_factory=list)
    discarded: bool = False


class FakeFactory:
    """Records every call; connections never open unless a test marks the peer live."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.live: set[str] = set()
        self.handles: list[FakeHandle] = []
        self.calls: asyncio.Queue[tuple[str, FakeHandle]] = asyncio.Queue()
        self.checked: asyncio.Queue[str] = asyncio.Queue()  # one entry per signal handled
        self.counter = 0
        self.refused: set[str] = set()

    def is_live(self, peer_id: str) -> bool:
        self.checked.put_nowait(peer_id)
        return peer_id in self.live

    def accepts(self, peer_id: str) -> bool:
        return peer_id not in self.refused

    def _new(self, kind: str, peer_id: str | None) -> FakeHandle:
        self.counter += 1
        handle = FakeHandle(kind, peer_id, f"v=0 {kind} {self.name} #{self.counter}")
        self.handles.append(handle)
        self.calls.put_nowait((kind, handle))
        return handle

    async def create_offer(self, peer_id: str | None) -> tuple[FakeHandle, str]:
        handle = self._new("offer", peer_id)
        return handle, handle.sdp

    async def accept_offer(self, peer_id: str, sdp: str) -> tuple[FakeHandle, str]:
        handle = self._new("answer", peer_id)
        handle.remote_sdp = sdp
        return handle, handle.sdp

    async def accept_answer(self, handle: FakeHandle, peer_id: str, sdp: str) -> None:
        handle.peer_id = peer_id
        handle.remote_sdp = sdp
        self.calls.put_nowait(("accepted", handle))

    async def add_candidate(self, handle: FakeHandle, candidate: Candidate) -> None:
        handle.candidates.append(candidate)
        self.calls.put_nowait(("candidate", handle))

    async def discard(self, handle: FakeHandle) -> None:
        handle.discarded = True
        self.calls.put_nowait(("discard", handle))

    async def next(self, kind: str) -> FakeHandle:
        """The next recorded call of `kind` (other calls are skipped)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                got, handle = await self.calls.get()
                if got == kind:
                    return handle


class Errors(list[tuple[str, str]]):
    """Join errors reported by a strategy, with an awaitable arrival."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def __call__(self, peer_id: str, reason: str) -> None:
        self.append((peer_id, reason))
        self.arrived.set()

    async def wait(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            await self.arrived.wait()


class Listener:
    """A raw relay client that plays a remote Trystero peer by hand."""

    def __init__(self, hub: MemoryHub, peer_id: str, password: str = "") -> None:
        self.peer_id = peer_id
        self.relay = hub.relay(f"memory://listener-{peer_id}")
        self.sealer = Sealer(names.signalling_key(password, APP, ROOM))
        self.inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.root = names.root_topic(APP, ROOM)
        self.self_topic = names.self_topic(APP, ROOM, peer_id)

    async def start(self) -> None:
        self.relay.set_handler(lambda topic, text: self.inbox.put_nowait((topic, json.loads(text))))
        await self.relay.start()
        await self.relay.subscribe(self.self_topic)
        await self.relay.subscribe(self.root)

    async def heard(self, peer_id: str) -> None:
        """Wait for `peer_id`'s announce on the root topic (it has subscribed by then, §5.1)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                topic, message = await self.inbox.get()
                if topic == self.root and message == {"peerId": peer_id}:
                    return

    async def publish_to(self, peer_id: str, text: str) -> None:
        await self.relay.publish(names.self_topic(APP, ROOM, peer_id), text)

    async def announce(self) -> None:
        await self.relay.publish(self.root, messages.build_announce(self.peer_id))

    async def expect(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT):
            while True:
                topic, message = await self.inbox.get()
                if topic == self.self_topic and predicate(message):
                    return message


def make_strategy(
    relays: list[MemoryRelay],
    self_id: str,
    factory: FakeFactory,
    *,
    password: str = "",
    timers: StrategyTimers = FAST,
    errors: Errors | None = None,
) -> TopicStrategy:
    return TopicStrategy(
        list(relays),
        app_id=APP,
        room_id=ROOM,
        self_id=self_id,
        factory=factory,
        password=password,
        timers=timers,
        on_join_error=errors,
    )


@pytest.fixture
async def hub() -> AsyncIterator[MemoryHub]:
    yield MemoryHub("unit")


async def test_subscribes_self_then_root_then_announces(hub: MemoryHub) -> None:
    relay = hub.relay()
    strategy = make_strategy([relay], SMALL, FakeFactory("a"))
    listener = Listener(hub, "watcher")
    await listener.start()
    await listener.relay.subscribe(listener.root)
    await strategy.start()
    async with asyncio.timeout(TIMEOUT):
        while True:
            topic, message = await listener.inbox.get()
            if topic == listener.root and message == {"peerId": SMALL}:
                break
    assert relay.subscribe_order[:2] == [strategy.self_topic, strategy.root_topic]
    await strategy.close()
    assert not relay.connected


@pytest.mark.parametrize("a_id, b_id", [(SMALL, LARGE), (LARGE, SMALL)])
async def test_two_peers_smaller_offers_larger_answers(
    hub: MemoryHub, a_id: str, b_id: str
) -> None:
    fa, fb = FakeFactory("a"), FakeFactory("b")
    a = make_strategy([hub.relay()], a_id, fa)
    b = make_strategy([hub.relay()], b_id, fb)
    await a.start()
    await b.start()
    offerer, answerer = (fa, fb) if a_id < b_id else (fb, fa)
    offer = await offerer.next("offer")
    answer = await answerer.next("answer")
    assert answer.remote_sdp == offer.sdp  # the SDP went through sealing intact
    accepted = await offerer.next("accepted")
    assert accepted is offer and offer.remote_sdp == answer.sdp
    assert all(h.kind == "answer" for h in answerer.handles)  # the larger id never offers
    await a.close()
    await b.close()


async def test_larger_id_counter_announces_to_smaller(hub: MemoryHub) -> None:
    factory = FakeFactory("big")
    strategy = make_strategy([hub.relay()], LARGE, factory)
    remote = Listener(hub, SMALL)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    await remote.announce()
    message = await remote.expect(lambda m: True)
    assert message == {"peerId": LARGE}  # a bare counter-announce on our self topic
    assert factory.calls.empty()
    await strategy.close()


@pytest.mark.parametrize("self_id, other", [(SMALL, LARGE), (LARGE, SMALL)])
async def test_a_peer_the_factory_refuses_gets_no_signal_at_all(hub: MemoryHub, self_id: str, other: str) -> None:
    """RoomConfig.peer_filter: neither an offer nor a counter-announce goes to a refused peer."""
    factory = FakeFactory("picky")
    factory.refused.add(other)
    strategy = make_strategy([hub.relay()], self_id, factory)
    remote = Listener(hub, other)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    for _ in range(3):
        await remote.announce()
    await asyncio.sleep(0.3)  # several of the strategy's announce periods
    assert all(topic != remote.self_topic for topic, _ in list(remote.inbox._queue))  # type: ignore[attr-defined]
    assert factory.calls.empty() and not factory.handles
    await strategy.close()


async def test_smaller_id_offers_and_applies_answer(hub: MemoryHub) -> None:
    factory = FakeFactory("small")
    strategy = make_strategy([hub.relay()], SMALL, factory)
    remote = Listener(hub, LARGE)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    await remote.announce()
    offer = await remote.expect(lambda m: "offer" in m)
    assert list(offer) == ["peerId", "offerId", "offer"]
    assert len(offer["offerId"]) == 12
    assert remote.sealer.unseal(offer["offer"]) == factory.handles[0].sdp
    # An answer to another offer id is ignored, the right one is applied once.
    await remote.publish_to(
        SMALL, messages.build_answer(LARGE, remote.sealer.seal("nope"), "x" * 12)
    )
    sealed = remote.sealer.seal("v=0 answer")
    for _ in range(2):
        await remote.publish_to(SMALL, messages.build_answer(LARGE, sealed, offer["offerId"]))
    accepted = await factory.next("accepted")
    assert accepted.remote_sdp == "v=0 answer"
    await strategy.close()
    assert sum(1 for h in factory.handles if h.remote_sdp is not None) == 1


async def test_offer_resent_identically_after_window(hub: MemoryHub) -> None:
    factory = FakeFactory("small")
    strategy = make_strategy([hub.relay()], SMALL, factory)
    remote = Listener(hub, LARGE)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    await remote.announce()
    first = await remote.expect(lambda m: "offer" in m)
    await remote.announce()  # within the re-send window: no new offer
    async with asyncio.timeout(TIMEOUT):
        while True:  # each announce after the window re-sends the same offer
            await remote.announce()
            try:
                second = await asyncio.wait_for(remote.expect(lambda m: "offer" in m), 0.2)
                break
            except TimeoutError:
                continue
    assert second == first
    assert len(factory.handles) == 1
    await strategy.close()
    assert factory.handles[0].discarded  # unfinished negotiations are discarded on close


async def test_duplicate_offers_across_relays_answered_once_on_arrival_relay() -> None:
    hubs = [MemoryHub(f"h{i}") for i in range(3)]
    factory = FakeFactory("big")
    strategy = make_strategy([h.relay() for h in hubs], LARGE, factory)
    remotes = [Listener(h, SMALL) for h in hubs]
    for remote in remotes:
        await remote.start()
    await strategy.start()
    for remote in remotes:
        await remote.heard(strategy.self_id)
    sealed = remotes[0].sealer.seal("v=0 offer")
    text = messages.build_offer(SMALL, "OFFERID12345", sealed)
    await remotes[1].publish_to(LARGE, text)  # arrives first on relay 1
    answer = await remotes[1].expect(lambda m: "answer" in m)
    for remote in (remotes[0], remotes[2], remotes[1]):
        await remote.publish_to(LARGE, text)
    assert list(answer) == ["peerId", "answer", "offerId"]
    assert answer["offerId"] == "OFFERID12345"
    handle = await factory.next("answer")
    assert handle.remote_sdp == "v=0 offer"
    await strategy.close()
    assert sum(1 for h in factory.handles if h.kind == "answer") == 1
    for i in (0, 2):  # no answer went out on the other relays
        assert not any("answer" in p for _, _, p in hubs[i].published)


async def test_candidates_before_offer_are_buffered_and_deduplicated(hub: MemoryHub) -> None:
    factory = FakeFactory("big")
    strategy = make_strategy([hub.relay(), MemoryHub("other").relay()], LARGE, factory)
    remote = Listener(hub, SMALL)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    lines = [f"candidate:{i} 1 udp 2130706431 192.0.2.{i} 9 typ host" for i in (1, 2)]
    for line in [*lines, lines[0], ""]:  # a duplicate and an end-of-candidates
        plain = messages.build_candidate_json(Candidate(line, "0", 0, "uf"))
        await remote.publish_to(
            LARGE,
            messages.build_offerer_candidate(SMALL, "OFFERID12345", remote.sealer.seal(plain)),
        )
    await remote.publish_to(
        LARGE, messages.build_offer(SMALL, "OFFERID12345", remote.sealer.seal("v=0 offer"))
    )
    await remote.expect(lambda m: "answer" in m)
    handle = factory.handles[0]
    for _ in lines:
        await factory.next("candidate")
    assert [c.candidate for c in handle.candidates] == lines
    # A late candidate goes straight to the handle.
    late = messages.build_candidate_json(Candidate("candidate:3 1 udp 1 192.0.2.3 9 typ host"))
    await remote.publish_to(
        LARGE, messages.build_offerer_candidate(SMALL, "OFFERID12345", remote.sealer.seal(late))
    )
    await factory.next("candidate")
    assert len(handle.candidates) == 3
    await strategy.close()


async def test_answerer_candidates_before_answer_reach_offer_handle(hub: MemoryHub) -> None:
    factory = FakeFactory("small")
    strategy = make_strategy([hub.relay()], SMALL, factory)
    remote = Listener(hub, LARGE)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    await remote.announce()
    offer = await remote.expect(lambda m: "offer" in m)
    plain = messages.build_candidate_json(
        Candidate("candidate:1 1 udp 1 192.0.2.9 9 typ host", "0", 0)
    )
    await remote.publish_to(
        SMALL, messages.build_answerer_candidate(LARGE, remote.sealer.seal(plain), offer["offerId"])
    )
    handle = await factory.next("candidate")  # the factory queues it until the answer is set
    assert handle.remote_sdp is None and handle.candidates[0].sdp_mid == "0"
    await strategy.close()


async def test_own_echoes_are_ignored(hub: MemoryHub) -> None:
    factory = FakeFactory("solo")
    relay = hub.relay()
    strategy = make_strategy([relay], SMALL, factory)
    watcher = Listener(hub, "w")
    await watcher.start()
    await watcher.relay.subscribe(watcher.root)
    await strategy.start()
    seen = 0
    async with asyncio.timeout(TIMEOUT):
        while seen < 3:  # several announce rounds, each echoed back to the strategy too
            _, message = await watcher.inbox.get()
            seen += message == {"peerId": SMALL}
    await strategy.close()
    assert factory.handles == []
    assert factory.checked.empty()  # no echo ever reached the state machine
    ours = [topic for url, topic, _ in hub.published if url == relay.url]
    assert ours and set(ours) == {strategy.root_topic}


async def test_wrong_password_offer_is_dropped_with_warning(
    hub: MemoryHub, caplog: pytest.LogCaptureFixture
) -> None:
    factory = FakeFactory("big")
    errors = Errors()
    strategy = make_strategy([hub.relay()], LARGE, factory, password="right", errors=errors)
    remote = Listener(hub, SMALL, password="wrong")
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    caplog.set_level(logging.WARNING, logger="signaling.strategies")
    text = messages.build_offer(SMALL, "OFFERID12345", remote.sealer.seal("v=0 offer"))
    await remote.publish_to(LARGE, text)
    await remote.publish_to(LARGE, messages.build_announce(SMALL))  # a marker after the offer
    await errors.wait()
    assert errors == [(SMALL, "incorrect room password (undecryptable offer)")]
    assert "wrong room password?" in caplog.text
    assert factory.handles == []
    await strategy.close()


async def test_wrong_password_answer_is_dropped(hub: MemoryHub) -> None:
    factory = FakeFactory("small")
    errors = Errors()
    strategy = make_strategy([hub.relay()], SMALL, factory, password="right", errors=errors)
    remote = Listener(hub, LARGE, password="wrong")
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    await remote.announce()
    offer = await remote.expect(lambda m: "offer" in m)
    await remote.publish_to(
        SMALL, messages.build_answer(LARGE, remote.sealer.seal("x"), offer["offerId"])
    )
    await errors.wait()
    assert errors[0][1] == "incorrect room password (undecryptable answer)"
    assert factory.handles[0].remote_sdp is None
    await strategy.close()


async def test_signals_from_live_peer_are_ignored(hub: MemoryHub) -> None:
    factory = FakeFactory("big")
    factory.live.add(SMALL)
    strategy = make_strategy([hub.relay()], LARGE, factory)
    remote = Listener(hub, SMALL)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    await remote.publish_to(LARGE, messages.build_offer(SMALL, "O" * 12, remote.sealer.seal("v=0")))
    await remote.announce()
    async with asyncio.timeout(TIMEOUT):
        for _ in range(2):  # both signals were handled (and ignored) while live
            await factory.checked.get()
    factory.live.clear()  # the connection died: the next announce gets a counter-announce
    await remote.announce()
    assert await remote.expect(lambda m: True) == {"peerId": LARGE}
    assert factory.handles == []
    await strategy.close()


async def test_unanswered_offer_expires_and_connect_deadline_discards(hub: MemoryHub) -> None:
    timers = StrategyTimers(
        announce_schedule_seconds=(0.0,),
        announce_interval_seconds=10.0,
        offer_ttl_seconds=0.05,
        connect_timeout_seconds=0.05,
    )
    factory = FakeFactory("small")
    errors = Errors()
    strategy = make_strategy([hub.relay()], SMALL, factory, timers=timers, errors=errors)
    remote = Listener(hub, LARGE)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    await remote.announce()
    await remote.expect(lambda m: "offer" in m)
    expired = await factory.next("discard")
    assert expired is factory.handles[0]
    # A fresh offer (new id), answered, but the connection never opens: deadline discards it.
    await remote.announce()
    offer = await remote.expect(lambda m: "offer" in m)
    await remote.publish_to(
        SMALL, messages.build_answer(LARGE, remote.sealer.seal("v=0 a"), offer["offerId"])
    )
    await factory.next("accepted")
    discarded = await factory.next("discard")
    assert discarded is factory.handles[1]
    assert errors and errors[-1][1].startswith("could not connect")
    await strategy.close()


async def test_release_keeps_connected_handle(hub: MemoryHub) -> None:
    factory = FakeFactory("small")
    strategy = make_strategy([hub.relay()], SMALL, factory)
    remote = Listener(hub, LARGE)
    await remote.start()
    await strategy.start()
    await remote.heard(strategy.self_id)
    await remote.announce()
    offer = await remote.expect(lambda m: "offer" in m)
    await remote.publish_to(
        SMALL, messages.build_answer(LARGE, remote.sealer.seal("v=0 a"), offer["offerId"])
    )
    handle = await factory.next("accepted")
    factory.live.add(LARGE)
    strategy.release(LARGE, handle)
    await strategy.close()
    assert not handle.discarded  # the factory owns it now


# -- torrent ---------------------------------------------------------------------------------------


class FakeTracker:
    """A TrackerRelay double: records sent messages, lets the test inject tracker messages."""

    kind = "tracker"

    def __init__(self, url: str = "ws://tracker.invalid") -> None:
        self.url = url
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.handler: Callable[[dict[str, Any]], None] | None = None
        self.closed = False

    def set_handler(self, handler: Callable[[dict[str, Any]], None]) -> None:
        self.handler = handler

    @property
    def connected(self) -> bool:
        return not self.closed

    async def start(self) -> None:
        pass

    async def wait_connected(self, timeout: float) -> bool:
        return True

    async def send(self, message: dict[str, Any]) -> bool:
        self.sent.put_nowait(message)
        return True

    async def close(self) -> None:
        self.closed = True

    def inject(self, message: dict[str, Any]) -> None:
        assert self.handler is not None
        self.handler(message)

    async def next_sent(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT):
            while True:
                message = await self.sent.get()
                if predicate(message):
                    return message


def make_tracker_strategy(
    tracker: FakeTracker, self_id: str, factory: FakeFactory
) -> TrackerStrategy:
    return TrackerStrategy(
        [tracker],  # type: ignore[list-item]
        app_id=APP,
        room_id=ROOM,
        self_id=self_id,
        factory=factory,
        timers=StrategyTimers(
            announce_schedule_seconds=(0.0,), tracker_announce_interval_seconds=10.0
        ),
    )


async def test_torrent_announces_three_offers() -> None:
    tracker, factory = FakeTracker(), FakeFactory("t")
    strategy = make_tracker_strategy(tracker, SMALL, factory)
    await strategy.start()
    announce = await tracker.next_sent(lambda m: True)
    assert list(announce) == ["action", "info_hash", "peer_id", "numwant", "offers"]
    assert announce["info_hash"] == names.info_hash(names.root_topic(APP, ROOM))
    assert announce["peer_id"] == SMALL and announce["numwant"] == 3
    assert len(announce["offers"]) == 3
    sealer = Sealer(names.signalling_key("", APP, ROOM))
    for entry, handle in zip(announce["offers"], factory.handles, strict=True):
        assert len(entry["offer_id"]) == 20
        assert entry["offer"]["type"] == "offer"
        assert sealer.unseal(entry["offer"]["sdp"]) == handle.sdp
    await strategy.close()
    assert all(h.discarded for h in factory.handles)


async def test_torrent_answer_to_pooled_offer() -> None:
    tracker, factory = FakeTracker(), FakeFactory("t")
    strategy = make_tracker_strategy(tracker, SMALL, factory)
    await strategy.start()
    announce = await tracker.next_sent(lambda m: True)
    offer_id = announce["offers"][1]["offer_id"]
    sealer = Sealer(names.signalling_key("", APP, ROOM))
    answer = {
        "action": "announce",
        "answer": {"type": "answer", "sdp": sealer.seal("v=0 ans")},
        "offer_id": offer_id,
        "peer_id": LARGE,
        "info_hash": strategy.info_hash,
    }
    tracker.inject(answer)
    tracker.inject(answer)  # duplicate within the dedupe window
    tracker.inject({**answer, "offer_id": "unknown-offer-id-000"})
    handle = await factory.next("accepted")
    assert (
        handle is factory.handles[1] and handle.peer_id == LARGE and handle.remote_sdp == "v=0 ans"
    )
    await strategy.close()
    assert sum(1 for h in factory.handles if h.remote_sdp) == 1


@pytest.mark.parametrize("remote, answers", [(LARGE, False), (SMALL, True)])
async def test_torrent_glare_only_larger_id_answers(remote: str, answers: bool) -> None:
    me = "m" * 20
    tracker, factory = FakeTracker(), FakeFactory("t")
    strategy = make_tracker_strategy(tracker, me, factory)
    await strategy.start()
    await tracker.next_sent(lambda m: "offers" in m)  # our pool exists now
    sealer = Sealer(names.signalling_key("", APP, ROOM))
    tracker.inject(
        {
            "action": "announce",
            "offer": {"type": "offer", "sdp": sealer.seal("v=0 off")},
            "offer_id": "R" * 20,
            "peer_id": remote,
            "info_hash": strategy.info_hash,
        }
    )
    if answers:
        reply = await tracker.next_sent(lambda m: "answer" in m)
        assert list(reply) == ["action", "info_hash", "peer_id", "answer", "offer_id", "to_peer_id"]
        assert reply["to_peer_id"] == remote and reply["offer_id"] == "R" * 20
        assert sealer.unseal(reply["answer"]["sdp"]) == factory.handles[-1].sdp
    else:
        # The same peer's answer to one of our offers is handled after its offer (FIFO per peer).
        offer_id = factory.handles and announce_ids(tracker, strategy)
        tracker.inject(
            {
                "action": "announce",
                "answer": {"type": "answer", "sdp": sealer.seal("v=0 a")},
                "offer_id": offer_id,
                "peer_id": remote,
                "info_hash": strategy.info_hash,
            }
        )
        await factory.next("accepted")
        assert not any(h.kind == "answer" for h in factory.handles)
        # Ignoring the newcomer's offer re-announced ours at once, so it can answer them.
        await tracker.next_sent(lambda m: "offers" in m)
    await strategy.close()


def tracker_signal(
    strategy: TrackerStrategy, kind: str, offer_id: str, peer_id: str, sdp: str
) -> dict[str, Any]:
    sealer = Sealer(names.signalling_key("", APP, ROOM))
    return {"action": "announce", kind: {"type": kind, "sdp": sealer.seal(sdp)}, "offer_id": offer_id,
            "peer_id": peer_id, "info_hash": strategy.info_hash}


@pytest.mark.parametrize("me, ours_wins", [("a" * 20, True), ("z" * 20, False)])
async def test_torrent_crossed_offers_resolve_to_the_smaller_ids_offer(me: str, ours_wins: bool) -> None:
    """We answered their offer and they answered ours: the smaller id's offer wins on both sides
    (dropping both left neither connection up until the answer expired)."""
    remote = "m" * 20
    tracker, factory = FakeTracker(), FakeFactory("t")
    strategy = make_tracker_strategy(tracker, me, factory)
    await strategy.start()
    await tracker.next_sent(lambda m: "offers" in m)
    pool = strategy._pools[tracker]
    saved = dict(pool)
    pool.clear()
    tracker.inject(tracker_signal(strategy, "offer", "R" * 20, remote, "v=0 their offer"))
    await tracker.next_sent(lambda m: "answer" in m)
    answering = factory.handles[-1]
    assert answering.kind == "answer"
    pool.update(saved)
    ours = next(iter(saved.values()))
    tracker.inject(tracker_signal(strategy, "answer", ours.offer_id, remote, "v=0 their answer"))
    if ours_wins:
        seen: dict[str, FakeHandle] = {}
        async with asyncio.timeout(TIMEOUT):
            while len(seen) < 2:
                kind, handle = await factory.calls.get()
                if kind in ("accepted", "discard"):
                    seen[kind] = handle
        assert seen == {"accepted": ours.handle, "discard": answering}
    else:
        assert await factory.next("discard") is ours.handle
        assert not answering.discarded and ours.handle.remote_sdp is None
    await strategy.close()


async def test_torrent_a_newer_offer_supersedes_an_unused_answer() -> None:
    """A tracker forwards one re-announced offer to two peers; the offerer keeps the first answer.
    The loser must not ignore that peer's other offers until its own answer expires (~23 s)."""

    class Clock:
        now = 0.0

        def time(self) -> float:
            return self.now

        def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
            return asyncio.get_running_loop().call_later(delay, callback)

    clock = Clock()
    tracker, factory = FakeTracker(), FakeFactory("t")
    strategy = TrackerStrategy([tracker], app_id=APP, room_id=ROOM, self_id=LARGE,  # type: ignore[list-item]
                               factory=factory, clock=clock,
                               timers=StrategyTimers(announce_schedule_seconds=(0.0,)))
    await strategy.start()
    await tracker.next_sent(lambda m: "offers" in m)
    tracker.inject(tracker_signal(strategy, "offer", "1" * 20, SMALL, "v=0 first"))
    await tracker.next_sent(lambda m: "answer" in m)
    first = factory.handles[-1]
    # A second offer soon after is ignored: the first answer may still connect.
    clock.now = strategy.timers.tracker_answer_supersede_seconds / 2
    tracker.inject(tracker_signal(strategy, "offer", "2" * 20, SMALL, "v=0 second"))
    for _ in range(2):
        async with asyncio.timeout(TIMEOUT):
            assert await factory.checked.get() == SMALL
    assert not first.discarded and factory.handles[-1] is first
    # Later, a different offer replaces the unused answer.
    clock.now = strategy.timers.tracker_answer_supersede_seconds + 1
    tracker.inject(tracker_signal(strategy, "offer", "3" * 20, SMALL, "v=0 third"))
    reply = await tracker.next_sent(lambda m: "answer" in m)
    assert reply["offer_id"] == "3" * 20
    assert await factory.next("discard") is first
    assert factory.handles[-1].remote_sdp == "v=0 third"
    await strategy.close()


def announce_ids(tracker: FakeTracker, strategy: TrackerStrategy) -> str:
    """An offer id currently in the strategy's pool."""
    return next(iter(strategy._pools[tracker]))


def test_torrent_requires_20_char_ids() -> None:
    with pytest.raises(ValueError, match="20"):
        make_tracker_strategy(FakeTracker(), "short", FakeFactory("t"))
