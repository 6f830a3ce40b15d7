"""``meshnode join --uplink …`` with real Trystero tabs on a shaped link (issue 14).

The loopback link of this namespace is shaped (tc tbf, 1 Mbit/s) and the node is given an uplink
budget that holds two plain tabs' streams. Three real tabs (the real core's behaviour: no HELLO,
one msgpack object per ``cf`` message) ask at once: two are served, paced, every message one
object; the third gets a ``denied`` result that says why, and a fresh cap saying ``available:
false``.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bench.lab.browser import loopback_only
from tests.browser.conftest import TabFactory
from tests.browser.test_legion_tabs import NodeProcess, call_engine_run, cf_objects, join_tab, meshnode_join

pytestmark = pytest.mark.browser

UPLINK = "2800B/s"
"""Two plain streams fit with three tabs connected (the Pacer's cost model at its 30 tok/s prior)."""
LINK = ["tbf", "rate", "1mbit", "burst", "16kb", "latency", "200ms"]
MTU = "1500"
"""lo's own MTU (64 KiB) exceeds any sane bucket: packets larger than the burst would never pass."""
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def shaped_loopback() -> Iterator[None]:
    """Everything on lo goes through a 1 Mbit/s token bucket while this module runs."""
    if not loopback_only():
        pytest.skip("shapes lo: needs the test suite's own network namespace (scripts/test.sh)")
    mtu = Path("/sys/class/net/lo/mtu").read_text().strip()
    subprocess.run(["ip", "link", "set", "lo", "mtu", MTU], check=True, timeout=10)
    subprocess.run(["tc", "qdisc", "replace", "dev", "lo", "root", *LINK], check=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, timeout=10)
        subprocess.run(["ip", "link", "set", "lo", "mtu", mtu], check=False, timeout=10)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def paced_node(shaped_loopback: None, mqtt_broker: Any) -> AsyncIterator[NodeProcess]:
    async with meshnode_join(mqtt_broker.ws_url, "--uplink", UPLINK) as process:
        yield process


async def test_a_tab_beyond_the_uplink_is_told_why_and_the_others_get_one_object_per_message(
        paced_node: NodeProcess, new_tab: TabFactory) -> None:
    node = paced_node
    assert any("uplink 2800 B/s, paced" in line for line in node.log), node.log[-5:]
    tabs = await asyncio.gather(*(join_tab(new_tab, node, f"tab-{i}", available=False) for i in range(3)))
    args = {"user": "Count from one to twenty.", "max_tokens": MAX_TOKENS, "temperature": 0}
    results = await asyncio.gather(*(call_engine_run(tab, node.peer_id, f"tc-uplink-{i}", args)
                                     for i, tab in enumerate(tabs)))
    statuses = sorted(r["status"] for r in results)
    assert statuses == ["denied", "ok", "ok"], results
    refused = next(tab for tab, r in zip(tabs, results, strict=True) if r["status"] == "denied")
    denial = next(r for r in results if r["status"] == "denied")
    assert "link budget" in denial["error"] and "cap.available" in denial["error"], denial
    # The refused tab gets a fresh cap, after its refusal, that says the node is full.
    await refused.wait("""([id]) => T.messages.some(m => m.action === 'cap' && m.peerId === id
                              && m.value && m.value.available === false)""", [node.peer_id])
    assert await cf_objects(refused, node.peer_id) == []
    for tab, result in zip(tabs, results, strict=True):
        if result["status"] != "ok":
            continue
        await tab.wait("""([id]) => T.messages.some(m => m.action === 'cf' && m.peerId === id && m.b64
                              && atob(m.b64).includes('finish_reason'))""", [node.peer_id])
        messages = await cf_objects(tab, node.peer_id)
        assert messages and all(len(objects) == 1 for objects in messages), messages
        frames = [objects[0] for objects in messages]
        assert sum(len(f["ids"]) for f in frames) == result["result"]["content"]["tokens"]
        assert frames[-1]["done"] and result["result"]["content"]["text"].strip()
