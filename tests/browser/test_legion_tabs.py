"""``meshnode join`` as users run it (a real CLI process, the embedded model) and real Trystero tabs.

The tabs behave like real Legion tabs (the real core): they send a cap, no envelope HELLO, call
``engine_run`` on ``tc`` and decode exactly one msgpack object per ``cf`` message. The node process
is given only ``--ice-host-address 127.0.0.1`` (no mode): inside the loopback-only namespace that
address is the only one there is, so a tab connects only if the node uses it (issue 12.1).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from bench.lab.browser import Tab
from meshnode.wire import legion
from tests.browser.conftest import TabFactory

pytestmark = pytest.mark.browser

START_TIMEOUT_S = 90.0
"""The node process: import, load the embedded model (converted once per machine), join."""
ANSWER_TIMEOUT_S = 60.0
TAB_ACTIONS = ("cap", "cm", "cf", "tc")
MAX_TOKENS = 32
SERVING = re.compile(r"serving .* \(peer (?P<peer>\w+)\) .*ICE host candidates: (?P<ice>.*)$")


@dataclass
class NodeProcess:
    process: asyncio.subprocess.Process
    app_id: str
    room: str
    relay_url: str
    peer_id: str = ""
    ice: str = ""
    log: list[str] = field(default_factory=list)


async def _read_log(node: NodeProcess, serving: asyncio.Future[None]) -> None:
    assert node.process.stderr is not None
    async for raw in node.process.stderr:
        line = raw.decode(errors="replace").rstrip()
        node.log.append(line)
        match = SERVING.search(line)
        if match and not serving.done():
            node.peer_id, node.ice = match["peer"], match["ice"]
            serving.set_result(None)


@contextlib.asynccontextmanager
async def meshnode_join(relay_url: str, *flags: str, env: dict[str, str] | None = None) -> AsyncIterator[NodeProcess]:
    """``meshnode join`` in a child process on the local relay; stopped with SIGTERM (as a user would)."""
    app_id, room = f"tabs-{os.getpid()}-{time.monotonic_ns() % 10**9}", "legion-tabs"
    command = [sys.executable, "-m", "meshnode", "join", "--strategy", "mqtt", "--relay", relay_url,
               "--app-id", app_id, "--room", room, "--nick", "cli-node", "--ice-host-address", "127.0.0.1", *flags]
    environment = {**os.environ, "MESHNODE_WEBRTC__ICE_SERVERS": "[]",
                   "MESHNODE_ENGINE__DEFAULT_MAX_TOKENS": str(MAX_TOKENS), **(env or {})}
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE, env=environment)
    node = NodeProcess(process=process, app_id=app_id, room=room, relay_url=relay_url)
    serving: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    reader = asyncio.create_task(_read_log(node, serving))
    try:
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.wait([serving, reader], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        if not serving.done():
            pytest.fail("meshnode join did not start serving:\n" + "\n".join(node.log[-60:]), pytrace=False)
        yield node
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def tab_cap(nick: str, *, available: bool, tools: tuple[str, ...] = ("current_time", "ping")) -> dict[str, Any]:
    """The cap a real Legion tab sends (its default persona: a local model and a few tools)."""
    cap = legion.build_cap(ts_ms=int(time.time() * 1000), nick=nick, model_id="onnx-community/Qwen2.5-0.5B-Instruct",
                           available=available, skills=["chat"], system_prompt_summary="a browser tab",
                           tools=[legion.tool_descriptor(name, name, {"type": "object"}) for name in tools])
    cap.pop("agent")  # a tab is not a meshnode
    return cap


async def join_tab(new_tab: TabFactory, node: NodeProcess, name: str, *, available: bool) -> Tab:
    tab = await new_tab(name)
    await tab.join("mqtt", [node.relay_url], node.app_id, node.room, actions=TAB_ACTIONS)
    await tab.wait_peer(node.peer_id, timeout=30)
    await tab.send_json("cap", tab_cap(name, available=available))
    await tab.wait_messages("cap", 1, node.peer_id, timeout=20)  # the node's cap to the newcomer
    return tab


async def cf_objects(tab: Tab, peer_id: str) -> list[list[Any]]:
    """Every cf message from `peer_id`, each decoded into the msgpack objects it holds."""
    messages = [m for m in await tab.get("messages") if m["action"] == "cf" and m["peerId"] == peer_id]
    decoded = []
    for message in messages:
        assert "b64" in message, message  # cf frames are a few bytes
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(base64.b64decode(message["b64"]))
        decoded.append(list(unpacker))
    return decoded


async def call_engine_run(tab: Tab, peer_id: str, call_id: str, args: dict[str, Any]) -> dict[str, Any]:
    """A real core's callTool: send the call, read only the final result."""
    await tab.send_json("tc", legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id,
                                                tool_name="engine_run", args=args), target=peer_id)
    return await tab.wait(
        """([id]) => { const m = T.messages.find(m => m.action === 'tc' && m.kind === 'json'
                          && m.value && m.value.kind === 'result' && m.value.callId === id)
                       return m && m.value }""", [call_id], ANSWER_TIMEOUT_S)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def node(mqtt_broker: Any) -> AsyncIterator[NodeProcess]:
    async with meshnode_join(mqtt_broker.ws_url) as process:
        yield process


async def test_an_address_named_alone_is_used_and_tabs_connect(node: NodeProcess, new_tab: TabFactory) -> None:
    """12.1: ``--ice-host-address 127.0.0.1`` with no mode: ICE uses it (the join log says so) and a
    tab in this loopback-only namespace connects and gets the node's cap."""
    assert "127.0.0.1" in node.ice, node.ice
    tab = await join_tab(new_tab, node, "addr", available=False)
    (cap,) = [m["value"] for m in await tab.get("messages") if m["action"] == "cap" and m["peerId"] == node.peer_id]
    assert cap["agent"] == "meshnode" and "engine_run" in [t["name"] for t in cap["tools"]]
    assert not [line for line in node.log if "has no ICE candidates" in line]


async def test_broadcast_ai_follows_the_real_responder_rule(node: NodeProcess, new_tab: TabFactory) -> None:
    """12.2: a sender whose cap says available (its own model answers; its tools: current_time,
    ping) gets no answer; an unavailable sender gets exactly one stream, to itself only."""
    busy, idle = await asyncio.gather(join_tab(new_tab, node, "has-model", available=True),
                                      join_tab(new_tab, node, "no-model", available=False))
    for tab in (busy, idle):
        chat = legion.build_chat(ts_ms=int(time.time() * 1000), from_id=tab.self_id or "", to="",
                                 text="/ai Name one primary color.")
        await tab.send_json("cm", chat)
    # The idle tab's whole answer arrives; the node took both messages in order, so an answer to
    # the busy tab would have started (and reached it) before this one ended.
    await idle.wait("""([id]) => T.messages.some(m => m.action === 'cf' && m.peerId === id && m.b64
                          && atob(m.b64).includes('done') && atob(m.b64).includes('finish_reason'))""",
                    [node.peer_id], ANSWER_TIMEOUT_S)
    assert await cf_objects(busy, node.peer_id) == []
    frames = [obj for message in await cf_objects(idle, node.peer_id) for obj in message]
    assert frames and frames[-1]["done"] and sum(len(f["ids"]) for f in frames) >= 1


async def test_a_tab_without_hello_gets_one_object_per_message(node: NodeProcess, new_tab: TabFactory) -> None:
    """12.5: bare frames, exactly one msgpack object per cf message, whatever the coalescing did;
    the ids add up to the result's token count."""
    tab = await join_tab(new_tab, node, "plain", available=False)
    result = await call_engine_run(tab, node.peer_id, "tc-plain-1",
                                   {"user": "Count from one to twenty.", "max_tokens": MAX_TOKENS, "temperature": 0})
    assert result["status"] == "ok", result
    await tab.wait("""([id]) => T.messages.filter(m => m.action === 'cf' && m.peerId === id).every(m => m.done)""",
                   [node.peer_id])
    messages = await cf_objects(tab, node.peer_id)
    assert messages and all(len(objects) == 1 for objects in messages), messages
    frames = [objects[0] for objects in messages]
    assert all(set(f) <= {"ids", "done", "finish_reason"} for f in frames)
    assert sum(len(f["ids"]) for f in frames) == result["result"]["content"]["tokens"]
    assert frames[-1]["done"] and not any(f["done"] for f in frames[:-1])


HONEST_PROMPT = "Write a story about a lighthouse keeper."
HONEST_TOKENS = 64
"""Greedy, the embedded model runs this prompt to the limit: the rate spans 63 gaps, not a dozen
(a short answer's rate is mostly noise of the shared host)."""


async def _honest_call(tab: Tab, peer_id: str, call_id: str) -> dict[str, Any]:
    """One greedy engine_run as the real core makes it; returns its text, tokens and decode rate
    (tokens per second between the first and the last cf message of the call, tab-side clock)."""
    before = len([m for m in await tab.get("messages") if m["action"] == "cf" and m["peerId"] == peer_id])
    result = await call_engine_run(tab, peer_id, call_id, {"user": HONEST_PROMPT,
                                                           "max_tokens": HONEST_TOKENS, "temperature": 0})
    assert result["status"] == "ok", result
    await tab.wait("([id, n]) => T.messages.filter(m => m.action === 'cf' && m.peerId === id).slice(n).some("
                   "m => m.b64 && atob(m.b64).includes('finish_reason'))", [peer_id, before], ANSWER_TIMEOUT_S)
    messages = [m for m in await tab.get("messages") if m["action"] == "cf" and m["peerId"] == peer_id][before:]
    frames = []
    for message in messages:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(base64.b64decode(message["b64"]))
        frames += [(message["t"], frame) for frame in unpacker]
    content = result["result"]["content"]
    carrying = [t for t, frame in frames if frame["ids"]]
    span = (carrying[-1] - carrying[0]) / 1000 if len(carrying) > 1 else 0.0
    rate = (content["tokens"] - 1) / span if span > 0 else float("inf")
    return {"text": content["text"], "tokens": content["tokens"], "frame_tokens": sum(len(f["ids"]) for _, f in frames),
            "rate": rate}


ATTACKS = {
    # A fresh identity each; every one ends with the node dropping (or ignoring) the attacker.
    "garbage": """async ([node]) => { const bad = [1, 'x', {kind: 'call'}, {kind: 'call', v: 1, ts: 1}]
        for (let i = 0; i < 600; i++) T.send('tc', {kind: 'json', value: bad[i % bad.length]}, node).catch(() => {})
        for (let i = 0; i < 200; i++) T.send('cf', {kind: 'binary', size: 64, seed: i}, node).catch(() => {}) }""",
    "calls": """async ([node]) => {
        for (let i = 0; i < 300; i++) T.send('tc', {kind: 'json', value: {kind: 'call', v: 1, ts: Date.now(),
            callId: 'x' + i, toolName: 'engine_run', args: {user: 'y'.repeat(50000), max_tokens: 4000}}}, node).catch(() => {}) }""",
    "ai-flood+forged-cap": """async ([node, honest]) => {
        await T.send('cap', {kind: 'json', value: {v: 1, ts: Date.now(), nick: 'meshnode-fake', modelId: 'x/y',
            available: true, skills: [], systemPromptSummary: '', agent: 'meshnode',
            load: {active: 0, queued: 0, max: 64}, tools: [{name: 'engine_run', description: '', inputSchema: {}}]}})
        for (let i = 0; i < 200; i++) T.send('cm', {kind: 'json', value: {v: 1, ts: Date.now(), from: honest, to: '',
            bodyKind: 'text', text: '/ai flood ' + i}}).catch(() => {}) }""",
    "huge": """async ([node]) => { await T.send('tc', {kind: 'binary', size: 20 * 1024 * 1024, seed: 7}, node).catch(() => {}) }""",
}


async def test_a_hostile_tab_cannot_hurt_an_honest_one(node: NodeProcess, new_tab: TabFactory) -> None:
    """Issue 13 in a real browser: an honest tab asks while hostile tabs (fresh identities) flood
    garbage, oversized calls, /ai with a forged cap, and a 20 MiB action. The honest answers stay
    exactly the unattacked one, none is lost (frames add up to each result), its decode rate stays
    at half the unattacked one or more, and the node still serves a newcomer afterwards."""
    honest = await join_tab(new_tab, node, "honest", available=False)
    baseline = [await _honest_call(honest, node.peer_id, f"tc-calm-{i}") for i in range(2)]
    assert baseline[0]["text"] == baseline[1]["text"] and baseline[0]["text"].strip()
    assert baseline[0]["tokens"] == HONEST_TOKENS
    calm_rate = min(b["rate"] for b in baseline)
    attacked = []
    for index, (name, script) in enumerate(ATTACKS.items()):
        hostile = await join_tab(new_tab, node, f"hostile-{name}", available=False)
        attack = asyncio.ensure_future(hostile.page.evaluate(script, [node.peer_id, honest.self_id]))
        attacked.append(await _honest_call(honest, node.peer_id, f"tc-attacked-{index}"))
        with contextlib.suppress(Exception):  # the node may have dropped the attacker meanwhile
            await asyncio.wait_for(attack, 30)
    print({"calm_rate": calm_rate, "attacked": {name: round(call["rate"], 1) for name, call in zip(ATTACKS, attacked, strict=True)}})
    for call in attacked:
        assert call["text"] == baseline[0]["text"], call
        assert call["frame_tokens"] == call["tokens"] == baseline[0]["tokens"], call
        assert call["rate"] >= 0.5 * calm_rate, (call, calm_rate)
    survivor = await join_tab(new_tab, node, "after", available=False)
    after = await _honest_call(survivor, node.peer_id, "tc-after")
    assert after["text"] == baseline[0]["text"]
    assert node.process.returncode is None
