"""meshnode's embedded NIP-01 relay (used by `meshnode demo`) with real clients."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from signaling.adapters.nostr import NostrRelay, build_event, process_key
from signaling.servers.nostr_relay import NostrRelayServer, check_event

pytestmark = pytest.mark.integration


async def test_pubsub_between_two_nostr_adapters() -> None:
    async with asyncio.timeout(20), NostrRelayServer() as server:
        a, b = NostrRelay(server.url), NostrRelay(server.url)
        got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        b.set_handler(lambda topic, payload: got.put_nowait((topic, payload)))
        try:
            for relay in (a, b):
                await relay.start()
                assert await relay.wait_connected(5)
            await b.subscribe("topic-one")
            assert await a.publish("topic-one", '{"peerId":"x"}')
            assert await a.publish("topic-two", "not for b")
            assert await got.get() == ("topic-one", '{"peerId":"x"}')
            await asyncio.sleep(0.2)  # a wrong-topic delivery would have arrived by now
            assert got.empty()
        finally:
            await a.close()
            await b.close()


async def test_forged_events_are_refused_and_garbage_survived() -> None:
    event = build_event(process_key(), "t", "hello", 1_700_000_000)
    assert check_event(event) is None
    assert check_event({**event, "content": "changed"}) == "invalid: event id does not match its content"
    forged = {**event, "sig": "0" * 128}
    assert check_event(forged) == "invalid: bad signature"
    async with asyncio.timeout(10), NostrRelayServer() as server, connect(server.url) as ws:
        await ws.send(json.dumps(["REQ", "s1", {"#x": ["t"]}]))
        assert json.loads(await ws.recv()) == ["EOSE", "s1"]
        await ws.send("{garbage")
        assert json.loads(await ws.recv())[0] == "NOTICE"
        await ws.send(json.dumps(["EVENT", forged]))
        assert json.loads(await ws.recv()) == ["OK", event["id"], False, "invalid: bad signature"]
        await ws.send(json.dumps(["EVENT", event]))
        replies = [json.loads(await ws.recv()) for _ in range(2)]
        assert ["OK", event["id"], True, ""] in replies
        assert ["EVENT", "s1", event] in replies
        assert server.events_relayed == 1
