"""Harness smoke test: two Chromium tabs running real Trystero meet over the local mosquitto.

Proves the page, the bundles, the Chromium flags (127.0.0.1 candidates inside a loopback-only
namespace) and the relay fixture before any Python peer is involved. One strategy only (MQTT).
"""

from __future__ import annotations

import pytest

from bench.lab.browser import Tab, loopback_only
from tests.browser.conftest import (
    TabFactory,
    assert_loopback_pair,
    pattern_bytes,
    sha256_hex,
    unique_name,
)

pytestmark = pytest.mark.browser


async def test_two_tabs_join_and_exchange(
    new_tab: TabFactory, relay_urls: dict[str, list[str]], request: pytest.FixtureRequest
) -> None:
    a: Tab = await new_tab("a")
    b: Tab = await new_tab("b")
    app_id, room_id = unique_name(request, "-app"), "smoke"
    id_a = await a.join("mqtt", relay_urls["mqtt"], app_id, room_id, password="pw")
    id_b = await b.join("mqtt", relay_urls["mqtt"], app_id, room_id, password="pw")
    assert id_a != id_b and len(id_a) == len(id_b) == 20

    assert await a.wait_peer(id_b) == id_b
    assert await b.wait_peer(id_a) == id_a

    await a.send_json("json", {"hello": "from a", "n": [1, 2.5, None, True]})
    await b.send_string("text", "héllo from b")
    await a.send_pattern("bin", 100_000, seed=7)

    (msg_b,) = await b.wait_messages("json", 1)
    assert (msg_b["peerId"], msg_b["kind"]) == (id_a, "json")
    assert msg_b["value"] == {"hello": "from a", "n": [1, 2.5, None, True]}
    (msg_a,) = await a.wait_messages("text", 1)
    assert (msg_a["peerId"], msg_a["kind"], msg_a["value"]) == (id_b, "string", "héllo from b")
    (blob,) = await b.wait_messages("bin", 1)
    expected = sha256_hex(pattern_bytes(100_000, 7))
    assert (blob["kind"], blob["size"], blob["sha256"]) == ("binary", 100_000, expected)

    # Wire-level tags seen by the receiver (trystero-wire §8.3): JSON 0x09, string 0x01, binary 0x0c/0x0d.
    frames = await b.get("frames")
    tags = {(f["name"], f["tag"]) for f in frames if f["dir"] == "in" and f["frame"] == "room"}
    assert ("json", 0x09) in tags and ("bin", 0x0D) in tags and ("bin", 0x0C) in tags

    # The selected ICE pair is loopback on both ends in a loopback-only namespace; on a host network
    # Chromium may pick another local interface, so there only assert that a pair was selected.
    pair = (await a.stats())[id_b]
    assert pair is not None and pair["local"] and pair["remote"], pair
    if loopback_only():
        assert_loopback_pair(pair)

    await b.leave()
    await a.wait_leave(id_b)
