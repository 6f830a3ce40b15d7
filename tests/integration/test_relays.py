"""Relay adapters against real local relays: mosquitto (WebSocket and TCP), nostr-relay, meshnode's
ws-relay server and bittorrent-tracker (trystero-wire §6, test-harness §5).

Every wait is bounded and awaits an event (a received message, a connection state); relays are
killed and restarted through the function-scoped ``*_fresh`` fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bench.lab import relays
from signaling.adapters.mqtt import MqttRelay
from signaling.adapters.torrent import TrackerClient
from signaling.adapters.wsrelay import WsRelay
from signaling.base import Backoff, TopicRelay, TrackerRelay
from signaling.protocol.names import gen_id
from signaling.registry import get_adapter_class
from signaling.servers.wsrelay import WsRelayServer

pytestmark = pytest.mark.integration

WAIT_SECONDS = 15.0
"""Bound on every wait for a connection or a message (loaded 2-core CI hosts)."""

# kind -> (strategy name, relay fixture, attribute holding the URL)
TOPIC_KINDS: dict[str, tuple[str, str, str]] = {
    "mqtt-ws": ("mqtt", "mqtt_broker", "ws_url"),
    "mqtt-tcp": ("mqtt", "mqtt_broker", "tcp_url"),
    "nostr": ("nostr", "nostr_server", "url"),
    "ws-relay": ("ws-relay", "wsrelay_server", "url"),
}


def fast_backoff() -> Backoff:
    """Reconnect within tens of milliseconds in tests."""
    return Backoff(base_seconds=0.05, cap_seconds=0.5)


class RecordingBackoff(Backoff):
    """A fast backoff that records its delays and signals after `target` failures."""

    def __init__(self, target: int) -> None:
        super().__init__(base_seconds=0.01, cap_seconds=0.05)
        self.delays: list[float] = []
        self.target = target
        self.reached = asyncio.Event()

    def next_delay(self) -> float:
        delay = super().next_delay()
        self.delays.append(delay)
        if len(self.delays) >= self.target:
            self.reached.set()
        return delay


class Inbox:
    """Handler that records what an adapter delivers; tests await specific items."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._arrived = asyncio.Event()

    def __call__(self, *item: Any) -> None:
        self.items.append(item if len(item) > 1 else item[0])
        self._arrived.set()

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = WAIT_SECONDS) -> Any:
        """The first recorded item matching `predicate`, waiting up to `timeout` seconds for it."""
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for item in self.items[seen:]:
                    if predicate(item):
                        return item
                seen = len(self.items)
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_message(self, topic: str, payload: str) -> None:
        """Wait for (topic, payload)."""
        await self.wait_for(lambda item: item == (topic, payload))


def unique(prefix: str) -> str:
    """A topic no other test (or run) uses on the shared relays."""
    return f"{prefix}{uuid.uuid4().hex}"


@contextlib.asynccontextmanager
async def started(*adapters: TopicRelay | TrackerRelay) -> AsyncIterator[None]:
    """Start adapters (each start must return at once) and always close them."""
    try:
        for adapter in adapters:
            async with asyncio.timeout(1):
                await adapter.start()
        yield
    finally:
        for adapter in adapters:
            async with asyncio.timeout(10):
                await adapter.close()


def make_topic_relay(kind: str, url: str, backoff: Backoff | None = None) -> TopicRelay:
    strategy = TOPIC_KINDS[kind][0]
    adapter = get_adapter_class(strategy)(url, backoff=backoff or fast_backoff())
    assert isinstance(adapter, TopicRelay)
    return adapter


def relay_url(request: pytest.FixtureRequest, kind: str, *, fresh: bool = False) -> tuple[Any, str]:
    _, fixture, attribute = TOPIC_KINDS[kind]
    relay = request.getfixturevalue(fixture + ("_fresh" if fresh else ""))
    return relay, getattr(relay, attribute)


async def echo_barrier(adapter: TopicRelay, inbox: Inbox, topic: str) -> None:
    """Publish a probe on `topic` and await its self-echo: proves the relay applied our subscription
    (each relay handles one client's messages in order; ws-relay has no subscribe ack)."""
    probe = f"probe-{uuid.uuid4().hex}"
    assert await adapter.publish(topic, probe)
    await inbox.wait_message(topic, probe)


async def exchange(a: TopicRelay, inbox_a: Inbox, b: TopicRelay, inbox_b: Inbox, topic: str) -> None:
    """Both directions deliver, and each publisher gets its own message back."""
    await echo_barrier(a, inbox_a, topic)
    await echo_barrier(b, inbox_b, topic)
    hello = f"hello-from-a-{uuid.uuid4().hex}"
    assert await a.publish(topic, hello)
    await inbox_b.wait_message(topic, hello)
    await inbox_a.wait_message(topic, hello)  # relays echo to the publisher
    reply = '{"peerId":"b","text":"h\\u00e9llo \u00e9\u20ac"}'
    assert await b.publish(topic, reply)
    await inbox_a.wait_message(topic, reply)


# ---------------------------------------------------------------------------------------------
# topic relays: two adapters on one relay
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind_a", "kind_b"),
    [
        ("mqtt-ws", "mqtt-ws"),
        ("mqtt-tcp", "mqtt-tcp"),
        ("mqtt-ws", "mqtt-tcp"),
        ("nostr", "nostr"),
        ("ws-relay", "ws-relay"),
    ],
)
async def test_two_adapters_exchange_messages(
    request: pytest.FixtureRequest, kind_a: str, kind_b: str
) -> None:
    _, url_a = relay_url(request, kind_a)
    _, url_b = relay_url(request, kind_b)
    a, b = make_topic_relay(kind_a, url_a), make_topic_relay(kind_b, url_b)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.set_handler(inbox_a)
    b.set_handler(inbox_b)
    topic = unique("t")
    other = unique("o")
    async with started(a, b):
        assert await a.wait_connected(WAIT_SECONDS)
        assert await b.wait_connected(WAIT_SECONDS)
        await a.subscribe(topic)
        await b.subscribe(topic)
        await a.subscribe(other)
        await exchange(a, inbox_a, b, inbox_b, topic)
        # b never subscribed `other`: publishing there reaches only a.
        marker = f"only-a-{uuid.uuid4().hex}"
        assert await b.publish(other, marker)
        await inbox_a.wait_message(other, marker)
        # Unsubscribed topics are no longer delivered; the echo on a still-subscribed topic,
        # published after the one on the dropped topic, proves nothing was delivered in between.
        await a.unsubscribe(other)
        dropped = f"dropped-{uuid.uuid4().hex}"
        assert await b.publish(other, dropped)
        await echo_barrier(b, inbox_b, topic)
        await echo_barrier(a, inbox_a, topic)
        assert (other, dropped) not in inbox_a.items
        assert all(item[0] in (topic, other) for item in inbox_a.items + inbox_b.items)


async def test_many_topics_on_one_adapter(nostr_server: relays.Relay) -> None:
    """More topics than one Nostr filter holds (250) still all deliver."""
    a = make_topic_relay("nostr", nostr_server.url)
    b = make_topic_relay("nostr", nostr_server.url)
    inbox = Inbox()
    a.set_handler(inbox)
    topics = [unique("m") for _ in range(260)]
    async with started(a, b):
        assert await a.wait_connected(WAIT_SECONDS)
        assert await b.wait_connected(WAIT_SECONDS)
        for topic in topics:
            await a.subscribe(topic)
        for topic in (topics[0], topics[249], topics[250], topics[-1]):
            assert await b.publish(topic, topic)
            await inbox.wait_message(topic, topic)


async def test_in_process_wsrelay_server() -> None:
    """`WsRelayServer` as an async context manager on port 0, with two `WsRelay` clients."""
    async with WsRelayServer("127.0.0.1", 0) as server:
        assert server.port > 0
        assert server.url == f"ws://127.0.0.1:{server.port}"
        a, b = WsRelay(server.url, backoff=fast_backoff()), WsRelay(server.url, backoff=fast_backoff())
        inbox_a, inbox_b = Inbox(), Inbox()
        a.set_handler(inbox_a)
        b.set_handler(inbox_b)
        topic = unique("s")
        async with started(a, b):
            assert await a.wait_connected(WAIT_SECONDS)
            assert await b.wait_connected(WAIT_SECONDS)
            await a.subscribe(topic)
            await b.subscribe(topic)
            await exchange(a, inbox_a, b, inbox_b, topic)
            await server.close()
            assert await a.wait_disconnected(WAIT_SECONDS)
            await server.close()  # idempotent


# ---------------------------------------------------------------------------------------------
# topic relays: relay dies and comes back
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TOPIC_KINDS))
async def test_reconnect_and_resubscribe_after_relay_restart(
    request: pytest.FixtureRequest, kind: str
) -> None:
    relay, url = relay_url(request, kind, fresh=True)
    a, b = make_topic_relay(kind, url), make_topic_relay(kind, url)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.set_handler(inbox_a)
    b.set_handler(inbox_b)
    topic = unique("r")
    async with started(a, b):
        assert await a.wait_connected(WAIT_SECONDS)
        assert await b.wait_connected(WAIT_SECONDS)
        await a.subscribe(topic)
        await b.subscribe(topic)
        await exchange(a, inbox_a, b, inbox_b, topic)

        await relay.astop()
        assert await a.wait_disconnected(WAIT_SECONDS)  # type: ignore[attr-defined]
        assert await b.wait_disconnected(WAIT_SECONDS)  # type: ignore[attr-defined]
        assert not a.connected
        assert await a.publish(topic, "lost") is False  # dropped while disconnected

        await relay.arestart()
        assert await a.wait_connected(WAIT_SECONDS)
        assert await b.wait_connected(WAIT_SECONDS)
        # The topics were re-subscribed on the new connection without being asked again.
        await exchange(a, inbox_a, b, inbox_b, topic)


# ---------------------------------------------------------------------------------------------
# unreachable relays
# ---------------------------------------------------------------------------------------------


async def test_unreachable_relays_retry_without_raising() -> None:
    """Nothing listens: start() returns at once, connected stays False, attempts repeat with
    backoff, and neither subscribe nor publish nor close raises."""
    dead = [relays.free_port() for _ in range(5)]
    backoffs = [RecordingBackoff(target=3) for _ in dead]
    adapters: list[TopicRelay | TrackerRelay] = [
        MqttRelay(f"ws://127.0.0.1:{dead[0]}/mqtt", backoff=backoffs[0]),
        MqttRelay(f"mqtt://127.0.0.1:{dead[1]}", backoff=backoffs[1]),
        get_adapter_class("nostr")(f"ws://127.0.0.1:{dead[2]}", backoff=backoffs[2]),
        WsRelay(f"ws://127.0.0.1:{dead[3]}", backoff=backoffs[3]),
        TrackerClient(f"ws://127.0.0.1:{dead[4]}", backoff=backoffs[4]),
    ]
    async with started(*adapters):
        for adapter in adapters:
            assert not adapter.connected
        async with asyncio.timeout(WAIT_SECONDS):
            await asyncio.gather(*(backoff.reached.wait() for backoff in backoffs))
        for adapter, backoff in zip(adapters, backoffs, strict=True):
            assert not adapter.connected
            assert not await adapter.wait_connected(0.01)
            assert all(0 <= delay <= 0.05 for delay in backoff.delays)
            if isinstance(adapter, TopicRelay):
                await adapter.subscribe("remembered")
                assert await adapter.publish("remembered", "x") is False
            else:
                assert await adapter.send({"action": "announce"}) is False


def make_any_adapter(kind: str, port: int, backoff: Backoff) -> TopicRelay | TrackerRelay:
    urls = {
        "mqtt-ws": f"ws://127.0.0.1:{port}/mqtt",
        "mqtt-tcp": f"mqtt://127.0.0.1:{port}",
        "nostr": f"ws://127.0.0.1:{port}",
        "ws-relay": f"ws://127.0.0.1:{port}",
        "torrent": f"ws://127.0.0.1:{port}",
    }
    if kind == "torrent":
        return TrackerClient(urls[kind], backoff=backoff)
    return make_topic_relay(kind, urls[kind], backoff)


ALL_KINDS = [*TOPIC_KINDS, "torrent"]


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_relay_answering_http_404_is_retried(kind: str) -> None:
    """A server that refuses the WebSocket upgrade (or speaks no MQTT) is retried with backoff."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await reader.read(1024)
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        backoff = RecordingBackoff(target=3)
        adapter = make_any_adapter(kind, port, backoff)
        async with started(adapter):
            async with asyncio.timeout(WAIT_SECONDS):
                await backoff.reached.wait()
            assert not adapter.connected


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_close_during_a_hanging_connect(kind: str) -> None:
    """close() returns promptly while the relay accepted TCP but never answers."""
    accepted = asyncio.Event()
    release = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        adapter = make_any_adapter(kind, port, fast_backoff())
        try:
            async with started(adapter):
                async with asyncio.timeout(WAIT_SECONDS):
                    await accepted.wait()
                assert not adapter.connected
        finally:
            release.set()


@pytest.mark.parametrize("kind", list(TOPIC_KINDS))
async def test_relay_that_comes_up_later(request: pytest.FixtureRequest, kind: str) -> None:
    """Topics subscribed while the relay is down are subscribed once it comes up."""
    relay, url = relay_url(request, kind, fresh=True)
    await relay.astop()
    backoff = RecordingBackoff(target=2)
    a, b = make_topic_relay(kind, url, backoff), make_topic_relay(kind, url)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.set_handler(inbox_a)
    b.set_handler(inbox_b)
    topic = unique("l")
    async with started(a, b):
        await a.subscribe(topic)
        await b.subscribe(topic)
        async with asyncio.timeout(WAIT_SECONDS):
            await backoff.reached.wait()
        assert not a.connected
        await relay.arestart()
        assert await a.wait_connected(WAIT_SECONDS)
        assert await b.wait_connected(WAIT_SECONDS)
        await exchange(a, inbox_a, b, inbox_b, topic)


# ---------------------------------------------------------------------------------------------
# WebTorrent tracker
# ---------------------------------------------------------------------------------------------


def announce(info_hash: str, peer_id: str, **fields: Any) -> dict[str, Any]:
    return {"action": "announce", "info_hash": info_hash, "peer_id": peer_id, "numwant": 3, **fields}


def is_reply(info_hash: str) -> Callable[[Any], bool]:
    return lambda m: m.get("info_hash") == info_hash and "interval" in m


_offer_counter = itertools.count()


async def offer_and_answer(a: TrackerClient, inbox_a: Inbox, b: TrackerClient, inbox_b: Inbox) -> None:
    """a and b join one swarm; b's offer is forwarded to a, a's answer is routed back to b."""
    info_hash, peer_a, peer_b = gen_id(20), gen_id(20), gen_id(20)
    assert await a.send(announce(info_hash, peer_a, offers=[]))
    await inbox_a.wait_for(is_reply(info_hash))  # a is in the swarm now
    offer_id = gen_id(20)
    offer = {"type": "offer", "sdp": f"x{next(_offer_counter)}"}
    assert await b.send(announce(info_hash, peer_b, offers=[{"offer_id": offer_id, "offer": offer}]))
    forwarded = await inbox_a.wait_for(lambda m: m.get("offer_id") == offer_id and "offer" in m)
    assert forwarded["offer"] == offer
    assert forwarded["peer_id"] == peer_b
    assert forwarded["info_hash"] == info_hash
    answer = {"type": "answer", "sdp": "y"}
    assert await a.send(
        {
            "action": "announce",
            "info_hash": info_hash,
            "peer_id": peer_a,
            "answer": answer,
            "offer_id": offer_id,
            "to_peer_id": peer_b,
        }
    )
    routed = await inbox_b.wait_for(lambda m: m.get("offer_id") == offer_id and "answer" in m)
    assert routed["answer"] == answer
    assert routed["peer_id"] == peer_a
    assert routed["info_hash"] == info_hash


async def test_tracker_forwards_offer_and_routes_answer(tracker_server: relays.Relay) -> None:
    a = get_adapter_class("torrent")(tracker_server.url, backoff=fast_backoff())
    b = TrackerClient(tracker_server.url, backoff=fast_backoff())
    assert isinstance(a, TrackerClient)
    assert isinstance(a, TrackerRelay)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.set_handler(inbox_a)
    b.set_handler(inbox_b)
    async with started(a, b):
        assert await a.wait_connected(WAIT_SECONDS)
        assert await b.wait_connected(WAIT_SECONDS)
        await offer_and_answer(a, inbox_a, b, inbox_b)
        assert all(isinstance(item, dict) for item in inbox_a.items + inbox_b.items)


async def test_tracker_reconnects_after_restart(tracker_server_fresh: relays.Relay) -> None:
    url = tracker_server_fresh.url
    a, b = TrackerClient(url, backoff=fast_backoff()), TrackerClient(url, backoff=fast_backoff())
    inbox_a, inbox_b = Inbox(), Inbox()
    a.set_handler(inbox_a)
    b.set_handler(inbox_b)
    async with started(a, b):
        assert await a.wait_connected(WAIT_SECONDS)
        assert await b.wait_connected(WAIT_SECONDS)
        await offer_and_answer(a, inbox_a, b, inbox_b)
        await tracker_server_fresh.astop()
        assert await a.wait_disconnected(WAIT_SECONDS)
        assert await b.wait_disconnected(WAIT_SECONDS)
        assert await a.send({"action": "announce"}) is False
        await tracker_server_fresh.arestart()
        assert await a.wait_connected(WAIT_SECONDS)
        assert await b.wait_connected(WAIT_SECONDS)
        await offer_and_answer(a, inbox_a, b, inbox_b)
