"""Issue 16 acceptance in a real browser: ``meshnode join --engine-url`` fronting real ``meshnode
serve-http`` processes (the embedded model), asked by Chromium tabs running real Trystero.

Two upstreams, each behind a recording proxy in this process (the proxy keeps each response body
exactly as the upstream sent it), and one node process given both proxies as ``--engine-url``:

* a plain tab (no HELLO, like the real core) gets, for a greedy call, the same ids and text as the
  upstream's own msgpack stream for the same request, and its ``cf`` messages are byte for byte the
  upstream frames of its call, one frame per message;
* a tab leaving mid-stream closes the upstream request (the upstream's /metrics counts the cancel);
* killing the upstream that serves a tab mid-stream gives the tab an ``error`` result, and the
  node's next call is served by the other upstream.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from bench.lab.browser import Tab
from meshnode.wire import legion
from meshnode.wire.frames import StreamDecoder
from meshnode.wire.maps import Detokenizer, parse_map
from tests.browser.conftest import TabFactory
from tests.browser.test_legion_tabs import NodeProcess, call_engine_run, join_tab, meshnode_join
from tests.integration.test_remote import (
    LONG,
    MESSAGES,
    RecordingProxy,
    Upstream,
    direct,
    metric,
    remote_at,
    serve_http,
    wait_ready,
)

pytestmark = [pytest.mark.browser, pytest.mark.model]

CANCELLED = 'meshnode_http_cancelled_total{endpoint="chat"}'
WAIT_SECONDS = 60.0
LONG_TOKENS = 200
"""A call that runs for many seconds on a CPU upstream (it is cut short)."""
POLL_SECONDS = 0.1


@dataclass
class Fronted:
    """The upstreams, their proxies (in the same order) and the node in front of them."""

    upstreams: list[Upstream]
    proxies: list[RecordingProxy]
    node: NodeProcess

    def serving(self, before: list[int]) -> int:
        """The index of the one upstream that got a request since `before` (request counts)."""
        grown = [i for i, proxy in enumerate(self.proxies) if len(proxy.bodies) > before[i]]
        assert len(grown) == 1, (before, [len(p.bodies) for p in self.proxies])
        return grown[0]

    def counts(self) -> list[int]:
        return [len(proxy.bodies) for proxy in self.proxies]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fronted(mqtt_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fronted]:
    tmp = tmp_path_factory.mktemp("fronted")
    with serve_http(tmp) as first_upstream, serve_http(tmp) as second_upstream:
        upstreams = [first_upstream, second_upstream]
        await asyncio.gather(*(wait_ready(upstream) for upstream in upstreams))
        async with RecordingProxy(upstreams[0].url) as first, RecordingProxy(upstreams[1].url) as second:
            flags = ("--engine-url", first.url, "--engine-url", second.url)
            # No call deadline: the long calls here are cut short on purpose, but on this 2-core
            # machine the node would refuse them as too slow to finish within 20 s.
            async with meshnode_join(mqtt_broker.ws_url, *flags,
                                     env={"MESHNODE_LEGION__CALL_DEADLINE_SECONDS": "0"}) as node:
                yield Fronted(upstreams, [first, second], node)


async def until(condition: Any, what: str, timeout: float = WAIT_SECONDS) -> None:
    """Wait (bounded) for an upstream's state, which only its /metrics shows."""
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(POLL_SECONDS)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f} s: {what}") from None


async def cf_bytes(tab: Tab, peer_id: str) -> list[bytes]:
    """Every cf message the tab got from `peer_id`, as the bytes that arrived."""
    messages = [m for m in await tab.get("messages") if m["action"] == "cf" and m["peerId"] == peer_id]
    assert all("b64" in m for m in messages), messages
    return [base64.b64decode(m["b64"]) for m in messages]


async def start_call(tab: Tab, peer_id: str, call_id: str, messages: list[dict[str, str]], max_tokens: int) -> None:
    args = {"user": messages[-1]["content"], "max_tokens": max_tokens, "temperature": 0}
    await tab.send_json("tc", legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id,
                                                tool_name="engine_run", args=args), target=peer_id)


async def streaming(tab: Tab, peer_id: str, call_id: str) -> None:
    """Wait until the tab's call is streaming (two cf messages, i.e. upstream frames, arrived) and
    has no result yet (a refusal would come instead of frames)."""
    state = await tab.wait("""([id, call]) => {
        const frames = T.messages.filter(m => m.action === 'cf' && m.peerId === id && m.done).length
        const result = T.messages.find(m => m.action === 'tc' && m.kind === 'json' && m.value
                                       && m.value.kind === 'result' && m.value.callId === call)
        return (frames >= 2 || result) && {frames, result: result ? result.value : null} }""",
                           [peer_id, call_id], WAIT_SECONDS)
    assert state["result"] is None, state["result"]["error"]


async def test_a_tab_gets_the_upstream_frames_byte_for_byte_and_its_greedy_text(
        fronted: Fronted, new_tab: TabFactory) -> None:
    node, reference = fronted.node, fronted.upstreams[0]
    own_body, own_frames = await direct(reference, MESSAGES, 24)  # the upstream's own answer
    async with remote_at(reference.url) as remote:  # its map, as the node reads it
        codec_map = await remote.codec_map()
    detokenizer = Detokenizer(parse_map(codec_map.data, expected_sha256=codec_map.map_hash))
    own_text = "".join(detokenizer.render(f.ids, partial=not f.done) for f in own_frames)

    tab = await join_tab(new_tab, node, "plain", available=False)
    before = fronted.counts()
    result = await call_engine_run(tab, node.peer_id, "tc-remote-1",
                                   {"user": MESSAGES[0]["content"], "max_tokens": 24, "temperature": 0})
    assert result["status"] == "ok", result
    await tab.wait("""([id]) => T.messages.filter(m => m.action === 'cf' && m.peerId === id).every(m => m.done)""",
                   [node.peer_id])
    served = fronted.serving(before)
    body = fronted.proxies[served].bodies[-1]
    messages = await cf_bytes(tab, node.peer_id)
    # Byte for byte: the call's upstream body, recorded on the wire, is the tab's cf messages in
    # order, one upstream frame per message.
    assert b"".join(messages) == body, (len(b"".join(messages)), len(body))
    assert messages == [raw for _, raw in StreamDecoder().feed_raw(body)]
    # The same greedy answer as the upstream's own stream (a separate request: ids and text, not chunking).
    frames = [frame for message in messages for frame in StreamDecoder().feed(message)]
    assert [i for f in frames for i in f.ids] == [i for f in own_frames for i in f.ids] and own_body
    assert own_text.strip() and result["result"]["content"]["text"] == own_text
    print(f"\nupstream {served}: {len(messages)} frames, {len(body)} bytes, text {own_text!r}")


async def test_a_tab_leaving_mid_stream_closes_the_upstream_request(fronted: Fronted, new_tab: TabFactory) -> None:
    node = fronted.node
    cancelled = [await metric(u.url, CANCELLED) for u in fronted.upstreams]
    tab = await join_tab(new_tab, node, "leaver", available=False)
    before = fronted.counts()
    await start_call(tab, node.peer_id, "tc-leave-1", LONG, LONG_TOKENS)
    await streaming(tab, node.peer_id, "tc-leave-1")
    served = fronted.serving(before)
    await tab.leave()  # @_leave: the node cancels the call and closes its upstream request
    upstream = fronted.upstreams[served]

    async def counted() -> bool:
        return await metric(upstream.url, CANCELLED) >= cancelled[served] + 1

    async def idle() -> bool:
        return not await metric(upstream.url, "meshnode_active_streams")

    await until(counted, f"upstream {served} never counted a cancelled chat stream")
    await until(idle, f"upstream {served} still generating")


async def test_killing_the_upstream_mid_stream_is_an_error_and_the_other_serves(
        fronted: Fronted, new_tab: TabFactory) -> None:
    node = fronted.node
    tab = await join_tab(new_tab, node, "survivor", available=False)
    before = fronted.counts()
    await start_call(tab, node.peer_id, "tc-kill-1", LONG, LONG_TOKENS)
    await streaming(tab, node.peer_id, "tc-kill-1")
    served = fronted.serving(before)
    victim = fronted.upstreams[served]
    os.killpg(victim.process.pid, signal.SIGKILL)
    result = await tab.wait("""([id]) => { const m = T.messages.find(m => m.action === 'tc' && m.kind === 'json'
                                  && m.value && m.value.kind === 'result' && m.value.callId === id)
                               return m && m.value }""", ["tc-kill-1"], WAIT_SECONDS)
    assert result["status"] == "error" and fronted.proxies[served].url in result["error"], result
    frames = [f for message in await cf_bytes(tab, node.peer_id) for f in StreamDecoder().feed(message)]
    assert frames[-1].done and frames[-1].finish_reason == "error", frames[-3:]

    # The node serves its next call from the other upstream.
    before = fronted.counts()
    again = await call_engine_run(tab, node.peer_id, "tc-kill-2",
                                  {"user": MESSAGES[0]["content"], "max_tokens": 8, "temperature": 0})
    assert again["status"] == "ok" and again["result"]["content"]["tokens"] >= 1, again
    other = fronted.proxies[1 - served]
    assert len(other.bodies) > before[1 - served] and other.bodies[-1], fronted.counts()
    assert node.process.returncode is None
