"""Python ↔ Python Trystero rooms over real aiortc on 127.0.0.1 (trystero-wire §5-§9).

Every strategy runs over a real local relay (meshnode's ws-relay, mosquitto, nostr-relay,
bittorrent-tracker) or the in-process MemoryHub, with ``host_addresses_mode="only"`` +
``["127.0.0.1"]`` and ``ice_servers=[]``, so nothing but loopback is touched. Every wait awaits an
event (a join, a message) under a bound; nothing sleeps to wait for state.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from meshnode.room import PeerEvent, Room, RoomClosed, RoomConfig
from signaling.adapters.memory import MemoryHub
from signaling.base import Backoff
from signaling.protocol.names import gen_id
from signaling.strategies.engine import StrategyTimers

pytestmark = pytest.mark.integration

JOIN_TIMEOUT = 25.0
"""Bound on discovery + ICE + handshake (2 shared cores; the torrent interval is 2 s here)."""
MESSAGE_TIMEOUT = 20.0
SMALL_PREFIX, LARGE_PREFIX = "0000", "zzzz"

TIMERS = StrategyTimers(announce_interval_seconds=1.0, tracker_announce_interval_seconds=2.0)

# kind -> (strategy, fixture, URL attribute); "memory" uses an in-process hub.
KINDS: dict[str, tuple[str, str, str] | None] = {
    "memory": None,
    "ws-relay": ("ws-relay", "wsrelay_server", "url"),
    "mqtt": ("mqtt", "mqtt_broker", "ws_url"),
    "nostr": ("nostr", "nostr_server", "url"),
    "torrent": ("torrent", "tracker_server", "url"),
}


def peer_id(prefix: str) -> str:
    return prefix + gen_id(16)


@dataclass
class Net:
    """Joins rooms on one relay for one test and leaves them all at the end."""

    kind: str
    app_id: str
    url: str | None
    hub: MemoryHub = field(default_factory=MemoryHub)
    rooms: list[Room] = field(default_factory=list)
    relay_factory: Callable[[], list[Any]] | None = None

    def config(self, **overrides: Any) -> RoomConfig:
        strategy = KINDS[self.kind][0] if KINDS[self.kind] else "memory"  # type: ignore[index]
        base = RoomConfig(
            strategy=strategy,
            relay_urls=[self.url] if self.url else [],
            app_id=self.app_id,
            room_id="room",
            ice_servers=[],
            timers=TIMERS,
        )
        return replace(base, **overrides)

    async def join(self, **overrides: Any) -> Room:
        config = self.config(**overrides)
        relays = None
        if self.relay_factory is not None:
            relays = self.relay_factory()
        elif self.url is None:
            relays = [self.hub.relay()]
        room = await Room.join(config, relays=relays)
        self.rooms.append(room)
        return room

    async def close(self) -> None:
        for room in self.rooms:
            await room.leave()


def unique_app(request: pytest.FixtureRequest) -> str:
    return "py-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[-60:] + "-" + gen_id(6)


@pytest.fixture(params=list(KINDS))
async def net(request: pytest.FixtureRequest) -> AsyncIterator[Net]:
    spec = KINDS[request.param]
    url = getattr(request.getfixturevalue(spec[1]), spec[2]) if spec else None
    network = Net(kind=request.param, app_id=unique_app(request), url=url)
    try:
        yield network
    finally:
        await network.close()


async def joined(*rooms: Room, count: int = 1) -> None:
    await asyncio.gather(*(room.wait_for_peers(count, JOIN_TIMEOUT) for room in rooms))


async def receive(action: Any) -> Any:
    async with asyncio.timeout(MESSAGE_TIMEOUT):
        return await action.receive()


async def next_event(room: Room, kind: str) -> PeerEvent:
    async with asyncio.timeout(MESSAGE_TIMEOUT):
        while True:
            event = await room.next_event()
            if event.kind == kind:
                return event


@pytest.mark.parametrize("order", ["first-smaller", "first-larger"])
async def test_join_exchange_leave(net: Net, order: str) -> None:
    first_prefix, second_prefix = (
        (SMALL_PREFIX, LARGE_PREFIX) if order == "first-smaller" else (LARGE_PREFIX, SMALL_PREFIX)
    )
    a = await net.join(self_id=peer_id(first_prefix))
    b = await net.join(self_id=peer_id(second_prefix))
    await joined(a, b)
    assert a.peers == [b.self_id] and b.peers == [a.self_id]

    a_cap, b_cap = a.make_action("cap"), b.make_action("cap")
    a_cf, b_cf = a.make_action("cf"), b.make_action("cf")
    a_txt, b_txt = a.make_action("txt"), b.make_action("txt")

    assert await a_cap.send({"a": 1, "list": [1.5, None, "é"]}) == [b.self_id]
    got = await receive(b_cap)
    assert (got.peer_id, got.payload, got.metadata) == (
        a.self_id,
        {"a": 1, "list": [1.5, None, "é"]},
        None,
    )
    await b_cap.send([1, 2], target=a.self_id, metadata={"m": True})
    got = await receive(a_cap)
    assert (got.payload, got.metadata) == ([1, 2], {"m": True})

    await a_cf.send(b"\x01\x02\x03")
    assert (await receive(b_cf)).payload == b"\x01\x02\x03"
    await b_txt.send("héllo ✓")
    assert (await receive(a_txt)).payload == "héllo ✓"
    await a_txt.send("")
    assert (await receive(b_txt)).payload == ""

    assert await a.ping(b.self_id, timeout=MESSAGE_TIMEOUT) > 0

    await a.leave()
    event = await next_event(b, "leave")
    assert event.peer_id == a.self_id
    assert b.peers == []
    with pytest.raises(RoomClosed):
        await a_cap.send({"late": True})


@pytest.mark.parametrize("direction", ["small-to-large", "large-to-small"])
async def test_one_megabyte_binary(direction: str) -> None:
    network = Net(kind="memory", app_id="py-binary-" + gen_id(6), url=None)
    try:
        sender = await network.join(
            self_id=peer_id(SMALL_PREFIX if direction == "small-to-large" else LARGE_PREFIX)
        )
        receiver = await network.join(
            self_id=peer_id(LARGE_PREFIX if direction == "small-to-large" else SMALL_PREFIX)
        )
        await joined(sender, receiver)
        blob = bytes(range(256)) * 4096  # 1 MiB: 65 chunks
        await sender.make_action("blob").send(blob, metadata={"name": "f.bin"})
        got = await receive(receiver.make_action("blob"))
        assert got.payload == blob and got.metadata == {"name": "f.bin"}
        # And the other way, after it, on the same connection.
        await receiver.make_action("blob").send(blob[::-1])
        assert (await receive(sender.make_action("blob"))).payload == blob[::-1]
    finally:
        await network.close()


@pytest.mark.parametrize("kind", ["memory", "ws-relay"])
async def test_password_room(kind: str, request: pytest.FixtureRequest) -> None:
    spec = KINDS[kind]
    url = getattr(request.getfixturevalue(spec[1]), spec[2]) if spec else None
    network = Net(kind=kind, app_id=unique_app(request), url=url)
    try:
        a = await network.join(self_id=peer_id(SMALL_PREFIX), password="s3cret")
        b = await network.join(self_id=peer_id(LARGE_PREFIX), password="s3cret")
        await joined(a, b)
        await b.make_action("cap").send({"pw": "ok"})
        assert (await receive(a.make_action("cap"))).payload == {"pw": "ok"}
    finally:
        await network.close()


@pytest.mark.parametrize("kind", ["memory", "ws-relay"])
async def test_wrong_password_never_joins(kind: str, request: pytest.FixtureRequest) -> None:
    spec = KINDS[kind]
    url = getattr(request.getfixturevalue(spec[1]), spec[2]) if spec else None
    network = Net(kind=kind, app_id=unique_app(request), url=url)
    try:
        errors: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        a = await network.join(self_id=peer_id(SMALL_PREFIX), password="right")
        b = await network.join(self_id=peer_id(LARGE_PREFIX), password="wrong")
        for room in (a, b):
            room.on_join_error(lambda p, r: errors.put_nowait((p, r)))
        async with asyncio.timeout(JOIN_TIMEOUT):
            peer, reason = await errors.get()
        assert "password" in reason
        assert peer in (a.self_id, b.self_id)
        assert a.peers == [] and b.peers == []
    finally:
        await network.close()


async def test_three_peers_all_join(net: Net) -> None:
    rooms = [await net.join() for _ in range(3)]
    await joined(*rooms, count=2)
    for room in rooms:
        assert sorted(room.peers) == sorted(r.self_id for r in rooms if r is not room)
    actions = [room.make_action("hi") for room in rooms]
    assert len(await actions[0].send("to all")) == 2
    for action in actions[1:]:
        message = await receive(action)
        assert (message.peer_id, message.payload) == (rooms[0].self_id, "to all")


async def test_leave_and_rejoin_with_fresh_id() -> None:
    network = Net(kind="memory", app_id="py-rejoin-" + gen_id(6), url=None)
    try:
        a = await network.join()
        b = await network.join()
        await joined(a, b)
        joins: list[str] = []
        a.on_peer_join(joins.append)  # replays the already-joined peer
        assert joins == [b.self_id]
        await b.leave()
        assert (await next_event(a, "leave")).peer_id == b.self_id
        c = await network.join()
        await joined(a, c)
        assert a.peers == [c.self_id] and joins == [b.self_id, c.self_id]
    finally:
        await network.close()


async def test_two_rooms_share_one_connection() -> None:
    network = Net(kind="memory", app_id="py-shared-" + gen_id(6), url=None)
    try:
        ids = (peer_id(SMALL_PREFIX), peer_id(LARGE_PREFIX))
        a1 = await network.join(self_id=ids[0], room_id="one")
        b1 = await network.join(self_id=ids[1], room_id="one")
        await joined(a1, b1)
        a2 = await network.join(self_id=ids[0], room_id="two", password="p")
        b2 = await network.join(self_id=ids[1], room_id="two", password="p")
        await joined(a2, b2)
        await a2.make_action("x").send("in two")
        assert (await receive(b2.make_action("x"))).payload == "in two"
        # Room-level demultiplexing: nothing leaked into room one.
        assert len(b1.make_action("x").mailbox) == 0
        from meshnode.room.mesh import AppMesh

        mesh = AppMesh.get(ids[0], network.app_id)
        assert list(mesh.live) == [ids[1]]  # one connection for both rooms
        # Leaving room two keeps room one's peer connected.
        await a2.leave()
        assert (await next_event(b2, "leave")).peer_id == ids[0]
        await a1.make_action("x").send("still here")
        assert (await receive(b1.make_action("x"))).payload == "still here"
    finally:
        await network.close()


async def test_a_second_connection_replaces_the_first() -> None:
    """Two negotiations that cross (torrent offers both ways) leave both sides on the newer
    connection, as Trystero does; keeping the older one left each side bound to a different one."""
    network = Net(kind="memory", app_id="py-replace-" + gen_id(6), url=None)
    try:
        ids = (peer_id(SMALL_PREFIX), peer_id(LARGE_PREFIX))
        a = await network.join(self_id=ids[0])
        b = await network.join(self_id=ids[1])
        await joined(a, b)
        mesh_a, mesh_b = a._mesh, b._mesh
        assert mesh_a is not None and mesh_b is not None
        first_a, first_b = mesh_a.live[ids[1]], mesh_b.live[ids[0]]
        # A second connection negotiated outside the strategies, as a crossed offer would be.
        offerer, answerer = mesh_a.new_link(a, ids[1]), mesh_b.new_link(b, ids[0])
        answer = await answerer.accept_offer(await offerer.create_offer())
        await offerer.accept_answer(answer)
        assert (await next_event(a, "leave")).peer_id == ids[1]
        assert (await next_event(a, "join")).peer_id == ids[1]
        assert (await next_event(b, "join")).peer_id == ids[0]
        assert mesh_a.live[ids[1]] is offerer and mesh_b.live[ids[0]] is answerer
        async with asyncio.timeout(MESSAGE_TIMEOUT):
            await asyncio.gather(first_a.closed, first_b.closed)
        await a.make_action("x").send("on the new connection")
        assert (await receive(b.make_action("x"))).payload == "on the new connection"
    finally:
        await network.close()


async def test_a_connection_without_a_handshake_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote that never sends @_hsready on a connection (it holds another one as its own) must
    not keep that connection alive: every signal from it would re-bind it and time out again."""
    network = Net(kind="memory", app_id="py-nohs-" + gen_id(6), url=None)
    try:
        ids = (peer_id(SMALL_PREFIX), peer_id(LARGE_PREFIX))
        a = await network.join(self_id=ids[0], handshake_timeout_seconds=1.5)
        b = await network.join(self_id=ids[1], handshake_timeout_seconds=60.0)
        silent = b._send_internal

        async def never_ready(binding: Any, name: str, payload: Any) -> None:
            if name != "@_hsready":
                await silent(binding, name, payload)

        monkeypatch.setattr(b, "_send_internal", never_ready)
        mesh_a = a._mesh
        assert mesh_a is not None
        failures: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        a.on_join_error(lambda peer, reason: failures.put_nowait((peer, reason, mesh_a.live.get(peer))))
        async with asyncio.timeout(JOIN_TIMEOUT):
            peer, reason, link = await failures.get()
            assert (peer, reason) == (ids[1], "handshake timed out") and link is not None
            await link.closed
        assert a.peers == []
    finally:
        await network.close()


def fast_backoff() -> Backoff:
    return Backoff(base_seconds=0.05, cap_seconds=0.5)


@pytest.mark.parametrize("kind", ["ws-relay", "mqtt", "nostr", "torrent", "memory"])
async def test_relay_restart_keeps_channels_and_admits_new_peer(
    kind: str, request: pytest.FixtureRequest
) -> None:
    from signaling.registry import get_adapter_class

    if kind == "memory":
        network = Net(kind="memory", app_id=unique_app(request), url=None)
        relays: list[Any] = []

        def build() -> list[Any]:
            relay = network.hub.relay()
            relays.append(relay)
            return [relay]

        async def kill() -> None:
            for relay in relays:
                relay.disconnect()

        async def revive() -> None:
            for relay in relays:
                relay.reconnect()
    else:
        fixture = {
            "ws-relay": "wsrelay_server_fresh",
            "mqtt": "mqtt_broker_fresh",
            "nostr": "nostr_server_fresh",
            "torrent": "tracker_server_fresh",
        }[kind]
        server = request.getfixturevalue(fixture)
        url = server.url
        network = Net(kind=kind, app_id=unique_app(request), url=url)
        adapter = get_adapter_class(KINDS[kind][0])  # type: ignore[index]

        def build() -> list[Any]:
            return [adapter(url, backoff=fast_backoff())]

        kill, revive = server.astop, server.arestart
    network.relay_factory = build
    try:
        a = await network.join()
        b = await network.join()
        await joined(a, b)
        await kill()
        await a.make_action("m").send({"during": "outage"})
        assert (await receive(b.make_action("m"))).payload == {"during": "outage"}
        await revive()
        c = await network.join()
        await joined(c, count=2)
        await joined(a, b, count=2)
        await c.make_action("m").send("new")
        assert (await receive(a.make_action("m"))).payload == "new"
        assert (await receive(b.make_action("m"))).payload == "new"
    finally:
        await network.close()


async def test_async_with_and_idempotent_leave() -> None:
    hub = MemoryHub()
    config = RoomConfig(
        strategy="memory",
        app_id="py-ctx-" + gen_id(6),
        room_id="r",
        ice_servers=[],
    )
    async with await Room.join(config, relays=[hub.relay()]) as room:
        assert not room.closed
    assert room.closed
    await asyncio.gather(room.leave(), room.leave())
    with pytest.raises(RoomClosed):
        await room.next_event()


# -- PeerLink: the browser-shaped paths Python↔Python rooms do not exercise ------------------------


def _split_candidates(sdp: str) -> tuple[str, list[str]]:
    lines = sdp.splitlines()
    candidates = [line[2:] for line in lines if line.startswith("a=candidate:")]
    kept = [line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))]
    return "\r\n".join(kept) + "\r\n", candidates


def _ufrag(sdp: str) -> str:
    return next(
        line.split(":", 1)[1] for line in sdp.splitlines() if line.startswith("a=ice-ufrag:")
    )


@pytest.mark.parametrize("early", [True, False])
async def test_peerlink_trickled_answer_candidates(early: bool) -> None:
    """A browser answers before gathering and trickles candidates, possibly before the answer."""
    from meshnode.transport.ice import install_host_address_override
    from meshnode.transport.peer import PeerLink

    install_host_address_override("only", ["127.0.0.1"])
    received: asyncio.Queue[bytes] = asyncio.Queue()
    offerer = PeerLink(ice_servers=[], peer_id="answerer")
    answerer = PeerLink(ice_servers=[], peer_id="offerer", on_message=received.put_nowait)
    try:
        offer = await offerer.create_offer()
        answer = await answerer.accept_offer(offer)
        bare, candidates = _split_candidates(answer)
        assert candidates and "a=candidate" not in bare
        trickled = [(c, "0", 0, _ufrag(answer)) for c in candidates]
        trickled.insert(0, ("", "0", 0, None))  # end-of-candidates as an empty candidate: skipped
        trickled.append((candidates[0].replace("127.0.0.1", "192.0.2.1"), "0", 0, "other-ufrag"))
        if early:  # candidates before the answer are queued until it is applied
            for item in trickled:
                await offerer.add_candidate(*item)
            await offerer.accept_answer(bare)
        else:
            await offerer.accept_answer(bare)
            for item in trickled:
                await offerer.add_candidate(*item)
        async with asyncio.timeout(MESSAGE_TIMEOUT):
            await offerer.opened.wait()
        await offerer.send(b"over trickle")
        async with asyncio.timeout(MESSAGE_TIMEOUT):
            assert await received.get() == b"over trickle"
        with pytest.raises(TypeError):
            await offerer.send("text")  # type: ignore[arg-type]  # never a text message (P2)
    finally:
        await offerer.close()
        async with asyncio.timeout(MESSAGE_TIMEOUT):
            await answerer.closed  # the remote side notices the close
        await answerer.close()


def test_host_address_override_modes() -> None:
    import aioice.ice

    from meshnode.transport import ice as peer

    before = peer._installed_override
    try:
        peer.install_host_address_override("only", ["127.0.0.1", "::1"])
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1", "::1"]
        peer.install_host_address_override("append", ["127.0.0.1"])
        base = peer._original_get_host_addresses(True, False)
        assert aioice.ice.get_host_addresses(True, False) == [*base, "127.0.0.1"]
        peer.install_host_address_override("auto", [])
        assert aioice.ice.get_host_addresses is peer._original_get_host_addresses
        with pytest.raises(ValueError):
            peer.install_host_address_override("sometimes", [])  # type: ignore[arg-type]
    finally:
        peer.install_host_address_override(*before)  # type: ignore[arg-type]
