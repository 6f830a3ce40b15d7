"""Unit tests (no sockets) for `signaling.base.Backoff`, the adapter registry and the adapters' pure
parts: Nostr events and REQ batching, MQTT URL handling, frame filtering."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from importlib import metadata
from typing import Any

import pytest
from coincurve import PrivateKey, PublicKeyXOnly

from signaling import registry
from signaling.adapters.mqtt import MqttRelay
from signaling.adapters.nostr import NostrRelay, build_event, event_id, nostr_kind, process_key
from signaling.adapters.torrent import TrackerClient
from signaling.adapters.wsrelay import WsRelay
from signaling.base import Backoff, SignalingError, TopicRelay, TrackerRelay
from signaling.registry import (
    BUILTIN_ADAPTERS,
    DEFAULT_RELAYS,
    AdapterLoadError,
    UnknownAdapterError,
    adapter_names,
    get_adapter_class,
)

# ---------------------------------------------------------------------------------------------
# Backoff
# ---------------------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    class MaxRandom(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    backoff = Backoff(base_seconds=1.0, cap_seconds=10.0, rng=MaxRandom())
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_full_jitter_stays_in_range() -> None:
    backoff = Backoff(base_seconds=0.5, cap_seconds=4.0, rng=random.Random(7))
    for failures in range(40):
        ceiling = min(4.0, 0.5 * 2**failures)
        assert 0.0 <= backoff.next_delay() <= ceiling


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    first = Backoff(rng=random.Random(42))
    second = Backoff(rng=random.Random(42))
    assert [first.next_delay() for _ in range(10)] == [second.next_delay() for _ in range(10)]


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=60.0, rng=random.Random(1))
    for _ in range(5):
        backoff.next_delay()
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_delay() <= 1.0


def test_backoff_failure_count_is_bounded() -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=60.0)
    for _ in range(100):
        assert backoff.next_delay() <= 60.0
    assert backoff.failures == 32


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


class FakeRelay:
    """A third-party adapter for the entry-point tests."""

    kind = "topic"

    def __init__(self, url: str, *, backoff: Backoff | None = None) -> None:
        self.url = url
        self.backoff = backoff


NOT_A_CLASS = object()


def fake_entry_points(*entries: tuple[str, str]) -> Any:
    points = [metadata.EntryPoint(name, value, registry.ENTRY_POINT_GROUP) for name, value in entries]

    def entry_points(*, group: str) -> list[metadata.EntryPoint]:
        return points if group == registry.ENTRY_POINT_GROUP else []

    return entry_points


@pytest.mark.parametrize(
    ("name", "cls"),
    [("mqtt", MqttRelay), ("nostr", NostrRelay), ("ws-relay", WsRelay), ("torrent", TrackerClient)],
)
def test_builtin_adapters(name: str, cls: type) -> None:
    assert get_adapter_class(name) is cls


def test_builtin_adapters_satisfy_the_protocols() -> None:
    assert isinstance(MqttRelay("mqtt://127.0.0.1:1"), TopicRelay)
    assert isinstance(NostrRelay("ws://127.0.0.1:1"), TopicRelay)
    assert isinstance(WsRelay("ws://127.0.0.1:1"), TopicRelay)
    assert isinstance(TrackerClient("ws://127.0.0.1:1"), TrackerRelay)


def test_memory_is_registered_lazily() -> None:
    assert BUILTIN_ADAPTERS["memory"] == "signaling.adapters.memory:MemoryRelay"
    assert "memory" in adapter_names()


def test_importing_the_registry_imports_no_adapter() -> None:
    code = (
        "import sys, signaling.registry as r; r.adapter_names(); "
        "bad = [m for m in ('signaling.adapters.mqtt', 'signaling.adapters.nostr', 'aiomqtt', 'websockets') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_name_lists_known_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points(("fake", "x:Y")))
    with pytest.raises(UnknownAdapterError) as info:
        get_adapter_class("carrier-pigeon")
    assert isinstance(info.value, SignalingError)
    assert isinstance(info.value, LookupError)
    message = str(info.value)
    assert "carrier-pigeon" in message
    for name in ("mqtt", "nostr", "ws-relay", "torrent", "memory", "fake"):
        assert name in message
    assert info.value.known == adapter_names()


def test_third_party_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        metadata,
        "entry_points",
        fake_entry_points(("fake", f"{__name__}:FakeRelay")),
    )
    assert adapter_names() == [*BUILTIN_ADAPTERS, "fake"]
    cls = get_adapter_class("fake")
    assert cls is FakeRelay
    backoff = Backoff()
    adapter = cls("fake://relay", backoff=backoff)
    assert adapter.url == "fake://relay"
    assert adapter.backoff is backoff


def test_entry_point_cannot_replace_a_builtin(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        metadata,
        "entry_points",
        fake_entry_points(("mqtt", f"{__name__}:FakeRelay"), ("nostr", "signaling.adapters.nostr:NostrRelay")),
    )
    assert get_adapter_class("mqtt") is MqttRelay
    assert adapter_names() == list(BUILTIN_ADAPTERS)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("mqtt" in r.getMessage() for r in warnings)
    assert not any("nostr" in r.getMessage() for r in warnings)  # our own pyproject registration


@pytest.mark.parametrize(
    ("value", "cause"),
    [("no_such_module_xyz:Relay", ImportError), (f"{__name__}:Missing", AttributeError)],
)
def test_entry_point_that_fails_to_load(
    monkeypatch: pytest.MonkeyPatch, value: str, cause: type[BaseException]
) -> None:
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points(("broken", value)))
    with pytest.raises(AdapterLoadError) as info:
        get_adapter_class("broken")
    assert isinstance(info.value.__cause__, cause)
    assert value in str(info.value)


def test_entry_point_that_is_not_a_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        metadata, "entry_points", fake_entry_points(("odd", f"{__name__}:NOT_A_CLASS"))
    )
    with pytest.raises(AdapterLoadError, match="not a class"):
        get_adapter_class("odd")


def test_default_relays() -> None:
    assert DEFAULT_RELAYS["mqtt"] == [
        "wss://broker.emqx.io:8084/mqtt",
        "wss://public:public@public.cloud.shiftr.io",
        "wss://broker.hivemq.com:8884/mqtt",
    ]
    assert DEFAULT_RELAYS["torrent"] == [
        "wss://open.ftorrent.com",
        "wss://tracker.webtorrent.dev",
        "wss://tracker.openwebtorrent.com",
    ]
    assert DEFAULT_RELAYS["nostr"]
    assert DEFAULT_RELAYS["ws-relay"] == []
    assert set(DEFAULT_RELAYS) <= set(BUILTIN_ADAPTERS)
    for urls in DEFAULT_RELAYS.values():
        assert all(url.startswith("wss://") for url in urls)


# ---------------------------------------------------------------------------------------------
# Nostr: kinds, event ids, signatures, REQ batching (trystero-wire §3.1, §3.2, §6.3)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("z564c132g302c6qki3c2z374n12711k3x245f", 22637),
        ("3a4p24x3u1y5oz3e6b5a4f63n2b473vpn6m", 22790),
        ("74g3j4p4g1b3j385c3aw4m4q175n5i454j1b6f", 22833),
        ("", 20000),
        ("\U0001f600", 20000 + (0xD83D + 0xDE00) % 10000),  # two UTF-16 code units
    ],
)
def test_nostr_kind(topic: str, kind: int) -> None:
    assert nostr_kind(topic) == kind


def test_event_id_and_signature() -> None:
    key = PrivateKey(bytes.fromhex("01" * 32))
    event = build_event(key, "z564c132g302c6qki3c2z374n12711k3x245f", '{"peerId":"x"}', 1795616429)
    assert list(event) == ["kind", "tags", "created_at", "content", "pubkey", "id", "sig"]
    assert event["kind"] == 22637
    assert event["tags"] == [["x", "z564c132g302c6qki3c2z374n12711k3x245f"]]
    assert event["pubkey"] == key.public_key_xonly.format().hex()
    assert len(event["pubkey"]) == 64
    serialised = (
        f'[0,"{event["pubkey"]}",1795616429,22637,[["x","z564c132g302c6qki3c2z374n12711k3x245f"]],'
        '"{\\"peerId\\":\\"x\\"}"]'
    )
    assert event["id"] == hashlib.sha256(serialised.encode()).hexdigest()
    signature = bytes.fromhex(event["sig"])
    assert len(signature) == 64
    public = PublicKeyXOnly(bytes.fromhex(event["pubkey"]))
    assert public.verify(signature, bytes.fromhex(event["id"]))


def test_event_id_keeps_non_ascii_content() -> None:
    content = "h\u00e9llo \u20ac\n\"q\""
    expected = json.dumps([0, "ab", 5, 20001, [["x", "t"]], content], separators=(",", ":"), ensure_ascii=False)
    assert "\u00e9" in expected and "\\n" in expected
    assert event_id("ab", 5, 20001, [["x", "t"]], content) == hashlib.sha256(expected.encode()).hexdigest()


def test_process_key_is_shared_and_injectable() -> None:
    assert NostrRelay("ws://127.0.0.1:1").pubkey == NostrRelay("ws://127.0.0.1:2").pubkey
    assert NostrRelay("ws://127.0.0.1:1").pubkey == process_key().public_key_xonly.format().hex()
    own = PrivateKey()
    for given in (own, own.secret, own.secret.hex()):
        relay = NostrRelay("ws://127.0.0.1:1", private_key=given)
        assert relay.pubkey == own.public_key_xonly.format().hex()


def kinds_of(topics: list[str]) -> list[int]:
    return list(dict.fromkeys(nostr_kind(topic) for topic in topics))


def test_req_batches_of_at_most_250_topics() -> None:
    relay = NostrRelay("ws://127.0.0.1:1", clock=lambda: 1000.9)
    topics = [f"topic{i}" for i in range(600)]
    for topic in topics:
        relay._topics[topic] = None
    frames, awaited = relay._plan()
    messages = [json.loads(frame) for frame in frames]
    assert [m[0] for m in messages] == ["REQ", "REQ", "REQ"]
    assert awaited == [m[1] for m in messages]
    assert all(len(m[1]) == 64 for m in messages)
    assert len({m[1] for m in messages}) == 3
    assert [m[2]["#x"] for m in messages] == [topics[0:250], topics[250:500], topics[500:600]]
    for message in messages:
        query = message[2]
        assert list(query) == ["kinds", "since", "#x"]
        assert query["since"] == 1000
        assert query["kinds"] == kinds_of(query["#x"])
    # Nothing changed: nothing to send.
    assert relay._plan() == ([], [])
    # Appending touches only the last batch, under the same id.
    relay._topics["extra"] = None
    frames, awaited = relay._plan()
    assert [json.loads(f)[1] for f in frames] == [messages[2][1]]
    # Dropping to one batch re-sends it and closes the superfluous ids.
    for topic in topics[100:] + ["extra"]:
        del relay._topics[topic]
    frames, _ = relay._plan()
    assert [json.loads(f) for f in frames] == [
        ["REQ", messages[0][1], {"kinds": kinds_of(topics[:100]), "since": 1000, "#x": topics[:100]}],
        ["CLOSE", messages[1][1]],
        ["CLOSE", messages[2][1]],
    ]


def _inbox(items: list[Any]) -> Any:
    return lambda *item: items.append(item)


def test_nostr_receives_only_our_subscriptions_and_topics() -> None:
    relay = NostrRelay("ws://127.0.0.1:1")
    received: list[Any] = []
    relay.set_handler(_inbox(received))
    relay._topics["t1"] = None
    frames, _ = relay._plan()
    sub = json.loads(frames[0])[1]
    event = build_event(PrivateKey(), "t1", "hi", 1)
    relay._on_text(json.dumps(["EVENT", sub, event]))
    relay._on_text(json.dumps(["EVENT", "other-sub", event]))
    relay._on_text(json.dumps(["EVENT", sub, build_event(PrivateKey(), "t2", "no", 1)]))
    relay._on_text(json.dumps(["EVENT", sub, event]))
    second = build_event(PrivateKey(), "t1", "again", 2)
    second["tags"] = [["p", "x"], ["x", "t1"], ["x", "t2"]]  # the first x tag names the topic
    relay._on_text(json.dumps(["EVENT", sub, second]))
    for garbage in ("nope", "{}", "[]", "[1]", '["EVENT"]', f'["EVENT","{sub}",5]', '["NOTICE","slow down"]',
                    '["OK","id",false,"duplicate: same"]', '["OK","id",false,"blocked"]', f'["EOSE","{sub}"]',
                    f'["CLOSED","{sub}","bye"]', '["AUTH","c"]'):
        relay._on_text(garbage)
    assert received == [("t1", "hi"), ("t1", "again")]


def test_handler_failure_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    relay = WsRelay("ws://127.0.0.1:1")
    relay._topics["t"] = None

    def explode(topic: str, payload: str) -> None:
        raise RuntimeError("boom")

    relay.set_handler(explode)
    relay._on_text('{"topic":"t","payload":"p"}')
    assert any(r.levelname == "ERROR" for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# ws-relay and tracker frame filtering
# ---------------------------------------------------------------------------------------------


def test_wsrelay_client_filters_frames() -> None:
    relay = WsRelay("ws://127.0.0.1:1")
    received: list[Any] = []
    relay.set_handler(_inbox(received))
    relay._topics["t"] = None
    for frame in (
        '{"topic":"t","payload":"text"}',
        '{"topic":"t","payload":{"peerId":"\u00e9"}}',
        '{"topic":"u","payload":"unsubscribed"}',
        '{"topic":"t"}',
        '{"topic":"t","payload":5}',
        '{"topic":1,"payload":"x"}',
        '["t","x"]',
        "not json",
    ):
        relay._on_text(frame)
    assert received == [("t", "text"), ("t", '{"peerId":"\u00e9"}')]


def test_tracker_client_drops_non_objects() -> None:
    client = TrackerClient("ws://127.0.0.1:1")
    received: list[Any] = []
    client.set_handler(received.append)
    for frame in ('{"action":"announce","interval":120}', "[1,2]", '"text"', "null", "garbage", "{}"):
        client._on_text(frame)
    assert received == [{"action": "announce", "interval": 120}, {}]


# ---------------------------------------------------------------------------------------------
# MQTT URLs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "transport", "host", "port", "path", "tls", "user", "password"),
    [
        ("wss://broker.emqx.io:8084/mqtt", "websockets", "broker.emqx.io", 8084, "/mqtt", True, None, None),
        ("wss://public:public@public.cloud.shiftr.io", "websockets", "public.cloud.shiftr.io", 443, "/", True, "public", "public"),
        ("ws://127.0.0.1:8080", "websockets", "127.0.0.1", 8080, "/", False, None, None),
        ("ws://127.0.0.1/a/b?x=1", "websockets", "127.0.0.1", 80, "/a/b?x=1", False, None, None),
        ("mqtt://u%40x:p%3Aw@127.0.0.1", "tcp", "127.0.0.1", 1883, None, False, "u@x", "p:w"),
        ("tcp://127.0.0.1:1884", "tcp", "127.0.0.1", 1884, None, False, None, None),
        ("mqtts://example.org", "tcp", "example.org", 8883, None, True, None, None),
    ],
)
def test_mqtt_url(
    url: str, transport: str, host: str, port: int, path: str | None, tls: bool, user: str | None, password: str | None
) -> None:
    relay = MqttRelay(url)
    assert relay._transport == transport
    assert relay._hostname == host
    assert relay._port == port
    assert relay._websocket_path == path
    assert (relay._tls_context is not None) is tls
    assert relay._username == user
    assert relay._password == password


def test_mqtt_client_id() -> None:
    relay = MqttRelay("mqtt://127.0.0.1")
    assert relay.client_id.startswith("meshnode_")
    assert len(relay.client_id) == len("meshnode_") + 8
    int(relay.client_id.removeprefix("meshnode_"), 16)
    assert MqttRelay("mqtt://127.0.0.1", client_id="mine").client_id == "mine"


@pytest.mark.parametrize("url", ["http://127.0.0.1", "wss://", "127.0.0.1:1883"])
def test_mqtt_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="MQTT URL"):
        MqttRelay(url)


@pytest.mark.parametrize("cls", [WsRelay, NostrRelay, TrackerClient])
def test_websocket_adapters_reject_bad_urls(cls: type) -> None:
    with pytest.raises(ValueError, match="ws://"):
        cls("mqtt://127.0.0.1")


@pytest.mark.parametrize("topic", ["", "a/+", "#", "a\0"])
async def test_mqtt_rejects_wildcard_topics(topic: str) -> None:
    relay = MqttRelay("mqtt://127.0.0.1:1")
    with pytest.raises(ValueError, match="topic"):
        await relay.subscribe(topic)
    with pytest.raises(ValueError, match="topic"):
        await relay.publish(topic, "x")
