"""Chromium running the meshnode web client ↔ a real meshnode (embedded SmolLM2) over real relays.

For each strategy — mqtt (mosquitto), nostr (nostr-relay), torrent (bittorrent-tracker) — one
``Node`` with ``start_web`` serves the client page (web/dist, bundled by scripts/build-client.sh);
tabs load it from the node's own origin, join the node's room and use the Legion protocol
(legion-mesh §5): cap, ``tc engine_run`` with a HELLO/READY/DATA/END envelope stream, ``/ai`` chat
with bare frames, END cancel, leaving mid-stream. The page detokenizes with the map the node serves
(sha256 verified with WebCrypto), so a greedy answer must equal what the engine generates locally.

One node, two tabs per strategy (module scope; the node and the browser share the session loop).
Waits are bounded and on page-side state (``window.meshClient.state``), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from meshnode.cli.config import load_settings
from meshnode.node.node import Node
from meshnode.wire.maps import Detokenizer
from tests.fixtures_model import embedded_loaded, local_text, make_backend  # noqa: F401

from .conftest import RELAY_FIXTURES, ROOT, _failed, _unavailable

pytestmark = [pytest.mark.browser, pytest.mark.model, pytest.mark.timeout(300)]

STRATEGIES = ("mqtt", "nostr", "torrent")
LOOPBACK = {"ice_servers": []}
MAX_TOKENS = 16
LONG_MAX_TOKENS = 24
JOIN_TIMEOUT_S = 45.0
"""Until a tab lists the node's cap (torrent offers wait for ICE gathering)."""
ANSWER_TIMEOUT_S = 120.0
"""Generous: the CPU is shared, and the embedded model may run at a few tokens per second."""
QUESTION = "What is the capital of France? Answer in one short sentence."
LONG_PROMPT = "Write a long story about a dragon who learns to bake bread. Make it very detailed."
NODE_NICK = "e2e-node"

DIST = ROOT / "web" / "dist"
CLIENT_INPUTS = [ROOT / "scripts" / "build-client.sh", ROOT / "web" / "package-lock.json"]


# ------------------------------------------------------------------------------------ helpers


def build_client() -> Path:
    """Run scripts/build-client.sh when web/dist is missing or older than web/client/*."""
    inputs = [p for p in CLIENT_INPUTS + sorted((ROOT / "web" / "client").glob("*")) if p.exists()]
    newest = max(p.stat().st_mtime for p in inputs)
    built = DIST / "app.js"
    if not built.exists() or built.stat().st_mtime < newest or not (DIST / "index.html").exists():
        if not (ROOT / "web" / "node_modules" / ".bin" / "esbuild").exists():
            _unavailable("web/node_modules missing: run `cd web && npm ci` (scripts/setup.sh --test)")
        proc = subprocess.run([str(ROOT / "scripts" / "build-client.sh")], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"scripts/build-client.sh failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return DIST


def python_cap_problem(cap: Any) -> str | None:
    """The browser cap guard of legion-mesh §5.3, re-implemented independently of meshnode."""

    def is_obj(v: Any) -> bool:
        return isinstance(v, dict)

    def is_str_list(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(s, str) for s in v)

    if not is_obj(cap):
        return "not an object"
    if cap.get("v") != 1 or isinstance(cap.get("v"), bool):
        return "v"
    if not isinstance(cap.get("ts"), int | float) or isinstance(cap.get("ts"), bool):
        return "ts"
    for key in ("nick", "modelId", "systemPromptSummary"):
        if not isinstance(cap.get(key), str):
            return key
    if not isinstance(cap.get("available"), bool):
        return "available"
    if not is_str_list(cap.get("skills")):
        return "skills"
    tools = cap.get("tools")
    if not isinstance(tools, list):
        return "tools"
    for tool in tools:
        if not (is_obj(tool) and isinstance(tool.get("name"), str) and isinstance(tool.get("description"), str)
                and is_obj(tool.get("inputSchema"))):
            return f"tool {tool!r}"
    for key in ("authoritative", "delegating"):
        if key in cap and not is_str_list(cap[key]):
            return key
    if "stageHost" in cap:
        return "stageHost must be omitted by meshnode"
    if len(cap.get("systemPromptSummary", "")) > 120:
        return "systemPromptSummary longer than senders cut it (120)"
    return None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll a Python-side condition (node counters) with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


class ClientTab:
    """One page of the meshnode client, driven through window.meshClient."""

    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.name = name
        self.console: list[str] = []
        self.closed = False
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda err: self.console.append(f"pageerror: {err}"))

    async def wait(self, expression: str, arg: Any = None, timeout: float = ANSWER_TIMEOUT_S) -> Any:
        handle = await self.page.wait_for_function(expression, arg=arg, timeout=timeout * 1000, polling=50)
        try:
            return await handle.json_value()
        finally:
            await handle.dispose()

    async def eval(self, expression: str, arg: Any = None) -> Any:
        return await asyncio.wait_for(self.page.evaluate(expression, arg), ANSWER_TIMEOUT_S)

    async def state(self, key: str) -> Any:
        return await self.eval(f"() => meshClient.state.{key}")

    async def wait_peer(self, peer_id: str, timeout: float = JOIN_TIMEOUT_S) -> dict[str, Any]:
        return await self.wait("id => { const p = meshClient.state.peers[id]; return p && p.capOk && p }",
                               peer_id, timeout)

    async def ask(self, prompt: str, peer_id: str, max_tokens: int = MAX_TOKENS, temperature: float = 0,
                  history: bool = False) -> str:
        return await self.eval(
            "([p, id, n, t, h]) => meshClient.ask(p, {peerId: id, maxTokens: n, temperature: t, history: h})",
            [prompt, peer_id, max_tokens, temperature, history])

    async def finished(self, call_id: str, timeout: float = ANSWER_TIMEOUT_S) -> dict[str, Any]:
        return await self.wait("id => { const c = meshClient.state.calls[id]; return c && c.finished && c }",
                               call_id, timeout)

    async def cf_from(self, peer_id: str) -> list[dict[str, Any]]:
        log = await self.state("cfLog")
        return [e for e in log if e["peerId"] == peer_id]

    async def barrier(self, peer_id: str) -> None:
        """A ping round trip to the node: everything it sent us before arrives before the result."""
        result = await self.eval("id => meshClient.callTool(id, 'ping', {payload: 'barrier'})", peer_id)
        assert result["status"] == "ok", result

    async def diagnostics(self) -> str:
        lines = [f"===== client tab {self.name} ====="] + [f"console {c}" for c in self.console[-80:]]
        if not self.closed:
            try:
                state = await asyncio.wait_for(self.page.evaluate(
                    "() => ({selfId: meshClient.state.selfId, relays: meshClient.state.relays, errors: meshClient.state.errors,"
                    " relayCheckError: meshClient.state.relayCheckError,"
                    " peers: Object.values(meshClient.state.peers).map(p => ({id: p.id, nick: p.nick, capOk: p.capOk, capError: p.capError})),"
                    " calls: meshClient.state.calls, cf: meshClient.state.cfLog.slice(-40)})"), 5)
                lines.append(json.dumps(state, indent=1)[:8000])
            except Exception as exc:  # diagnostics must not mask the failure
                lines.append(f"(page state unavailable: {exc!r})")
        return "\n".join(lines)


@dataclass
class Mesh:
    strategy: str
    node: Node
    engine: Any
    base_url: str
    relay_url: str
    node_id: str
    browser: Any
    contexts: list[Any] = field(default_factory=list)
    tabs: list[ClientTab] = field(default_factory=list)

    async def open_tab(self, name: str, query: str = "", wait_node: bool = True) -> ClientTab:
        context = await self.browser.new_context()
        self.contexts.append(context)
        page = await context.new_page()
        tab = ClientTab(page, name)
        self.tabs.append(tab)
        await page.goto(f"{self.base_url}/?nick={name}{query}")
        await tab.wait("() => window.meshClient && meshClient.ready", timeout=15)
        if wait_node:
            await tab.wait("() => meshClient.state.joined", timeout=15)
            await tab.wait_peer(self.node_id)
        return tab

    async def close_tab(self, tab: ClientTab) -> None:
        """Close the page the way a browser closes a tab (beforeunload handlers run)."""
        tab.closed = True
        await asyncio.wait_for(tab.page.close(run_before_unload=True), 15)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def client_dist() -> Path:
    return build_client()


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=STRATEGIES)
async def mesh(request: pytest.FixtureRequest, embedded_loaded: Any, browser: Any,
               client_dist: Path) -> AsyncIterator[Mesh]:
    """A node with the embedded model serving the client page, in a fresh room on the local relay."""
    from meshnode.node.webapp import bound_url, start_web

    strategy = request.param
    relay = request.getfixturevalue(RELAY_FIXTURES[strategy])
    suffix = f"{strategy}-{time.monotonic_ns() % 10**9}"
    settings, _ = load_settings(None, env={}, flags={
        ("room", "strategy"): strategy, ("room", "relays"): [relay.url], ("room", "room"): f"e2e-{suffix}",
        ("room", "app_id"): "meshnode-e2e", ("webrtc", "ice_servers"): [], ("webrtc", "host_addresses"): ["127.0.0.1"], ("legion", "nick"): NODE_NICK,
        ("engine", "default_max_tokens"): MAX_TOKENS})
    async with contextlib.AsyncExitStack() as stack:
        engine = make_backend(embedded_loaded, max_concurrent=4)
        await stack.enter_async_context(engine)
        node = Node(settings, engine, room_overrides=LOOPBACK)
        stop = asyncio.Event()
        serving = asyncio.create_task(node.run(stop, drain_seconds=2), name=f"e2e-node-{strategy}")

        async def stop_node() -> None:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 20)

        stack.push_async_callback(stop_node)
        await asyncio.wait_for(node.started.wait(), 30)
        runner = await start_web(node, settings, 0, dist=client_dist)
        stack.push_async_callback(runner.cleanup)
        assert node.room is not None
        mesh = Mesh(strategy=strategy, node=node, engine=engine, base_url=bound_url(runner),
                    relay_url=relay.url, node_id=node.room.self_id, browser=browser)

        async def close_contexts() -> None:
            for context in mesh.contexts:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(context.close(), 10)

        stack.push_async_callback(close_contexts)
        yield mesh


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tabs(mesh: Mesh) -> tuple[ClientTab, ClientTab]:
    """Two tabs in the node's room (shared by the tests of one strategy)."""
    a, b = await asyncio.gather(mesh.open_tab("alice"), mesh.open_tab("bob"))
    return a, b


@pytest_asyncio.fixture(loop_scope="session", autouse=True)
async def dump_on_failure(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    yield
    if _failed(request) and "mesh" in request.fixturenames:
        mesh: Mesh = request.getfixturevalue("mesh")
        for tab in mesh.tabs:
            print(await tab.diagnostics())
        service = mesh.node.service
        if service is not None:
            print(f"node {mesh.node_id}: cancelled={service.cancelled_calls} completed={service.completed_calls} "
                  f"roster={list(service.roster.entries)} calls={list(service.calls)}")


# ------------------------------------------------------------------------------------ tests


async def test_page_lists_the_node_and_its_cap_passes_the_guard(mesh: Mesh, tabs: tuple[ClientTab, ClientTab]) -> None:
    alice, bob = tabs
    peer = await alice.wait_peer(mesh.node_id)
    cap = peer["cap"]
    # The browser's own guard (the real consumer) and an independent Python re-implementation.
    assert await alice.eval("cap => meshClient.guardCap(cap)", cap) == {"ok": True, "reason": None}
    assert python_cap_problem(cap) is None, python_cap_problem(cap)
    assert peer["nick"] == NODE_NICK and peer["modelId"] == mesh.engine.model_id
    assert peer["available"] is True and peer["engine"] is True
    assert set(peer["load"]) == {"active", "queued", "max"}
    assert peer["mapId"] == mesh.node.codec_map.map_id and peer["mapHash"] == mesh.node.codec_map.map_hash
    # A stageHost block, a non-string nick or a bad tool are rejected by the page's guard.
    for bad in ({**cap, "nick": 5}, {**cap, "tools": [{"name": "x"}]}, {**cap, "stageHost": 1},
                {**cap, "authoritative": [1]}, {**cap, "v": 2}):
        verdict = await alice.eval("cap => meshClient.guardCap(cap)", bad)
        assert verdict["ok"] is False and python_cap_problem(bad) is not None
    # The peer list renders nick, model and load.
    row = await alice.wait("id => { const r = document.querySelector(`tr[data-peer='${id}']`); return r && r.innerText }",
                           mesh.node_id, timeout=10)
    assert NODE_NICK in row and mesh.engine.model_id in row and "max" in row and "available" in row
    # Relay state is seen as open (no false "relay down"); the node knows both tabs' caps.
    relays = await alice.wait("() => { const r = meshClient.state.relays; return Object.values(r).includes('open') && r }",
                              timeout=10)
    assert set(relays) == {mesh.relay_url}, relays
    assert await alice.state("relayProblem") is None
    service = mesh.node.service
    assert service is not None
    bob_id = await bob.state("selfId")
    await until(lambda: bob_id in service.roster, 20, "the node to record bob's cap")
    entry = service.roster.get(bob_id)
    assert entry is not None and entry.cap.available is False


async def test_greedy_engine_run_from_the_ui_streams_to_the_asker_only(
    mesh: Mesh, tabs: tuple[ClientTab, ClientTab]
) -> None:
    alice, bob = tabs
    expected = await local_text(mesh.engine, QUESTION, MAX_TOKENS)
    assert expected
    page = alice.page
    # Through the UI: pick the node, greedy, no history, type and press Enter.
    await page.select_option("#target", mesh.node_id)
    await page.fill("#max-tokens", str(MAX_TOKENS))
    await page.fill("#temperature", "0")
    await page.uncheck("#history")
    await page.fill("#message", QUESTION)
    await page.press("#message", "Enter")
    call_id = await alice.wait("() => Object.keys(meshClient.state.calls).at(-1)", timeout=10)
    call = await alice.finished(call_id)
    assert call["status"] == "ok", call
    assert call["mode"] == "envelope" and call["peerId"] == mesh.node_id
    assert call["text"] == expected
    assert call["resultText"] == expected
    assert call["result"]["result"]["content"]["tokens"] == call["tokens"] >= 1
    assert call["ttftMs"] is not None and call["ttftMs"] > 0
    assert call["bytesPerToken"] is not None and call["bytesPerToken"] > 0
    # The rendered bubble shows the text and the stats line.
    bubble = await alice.wait(
        "id => { const m = [...document.querySelectorAll('#log li.assistant')].at(-1);"
        " return m && !m.classList.contains('streaming') && m.querySelector('.stats').textContent && m.innerText }",
        call_id, timeout=10)
    assert expected in bubble and "tok" in bubble
    # Frames came as READY, DATA…, END envelopes carrying this call's id, nothing else.
    frames = await alice.cf_from(mesh.node_id)
    ours = [f for f in frames if f.get("stream") == call_id]
    kinds = [f["kind"] for f in ours]
    assert kinds[0] == "ready" and kinds[-1] == "end" and set(kinds[1:-1]) == {"data"}, kinds
    assert sum(f.get("ids", 0) for f in ours) == call["tokens"]
    # Bob, in the same room, got no cf frame at all (a ping round trip orders the check).
    await bob.barrier(mesh.node_id)
    assert await bob.cf_from(mesh.node_id) == []


async def test_ai_chat_answers_with_bare_frames_to_the_asker(mesh: Mesh, tabs: tuple[ClientTab, ClientTab]) -> None:
    alice, bob = tabs
    before = len(await alice.state("aiStreams"))
    await alice.eval("t => meshClient.ai(t)", "/ai Name one primary color.")
    stream = await alice.wait(
        "n => { const s = meshClient.state.aiStreams; return s.length > n && s[s.length - 1].done && s[s.length - 1] }",
        before)
    assert stream["peerId"] == mesh.node_id and stream["nick"] == NODE_NICK
    assert stream["text"].strip(), stream
    assert 1 <= stream["tokens"] <= MAX_TOKENS
    assert stream["finishReason"] in {"stop", "length"}
    frames = await alice.cf_from(mesh.node_id)
    assert [f for f in frames if f["kind"] == "frame"], "no bare frames reached the asker"
    await bob.barrier(mesh.node_id)
    assert await bob.cf_from(mesh.node_id) == []
    assert await bob.state("aiStreams") == []


async def test_two_tabs_asking_at_once_each_get_only_their_own_tokens(
    mesh: Mesh, tabs: tuple[ClientTab, ClientTab]
) -> None:
    alice, bob = tabs
    seen_a = len(await alice.cf_from(mesh.node_id))
    seen_b = len(await bob.cf_from(mesh.node_id))
    id_a, id_b = await asyncio.gather(
        alice.ask("Count from one to five.", mesh.node_id),
        bob.ask("Name three fruits.", mesh.node_id))
    call_a, call_b = await asyncio.gather(alice.finished(id_a), bob.finished(id_b))
    for call in (call_a, call_b):
        assert call["status"] == "ok", call
        assert call["text"] == call["resultText"] and call["text"]
    assert call_a["text"] != call_b["text"]
    await asyncio.gather(alice.barrier(mesh.node_id), bob.barrier(mesh.node_id))
    new_a = (await alice.cf_from(mesh.node_id))[seen_a:]
    new_b = (await bob.cf_from(mesh.node_id))[seen_b:]
    assert new_a and {f.get("stream") for f in new_a} == {id_a}, new_a
    assert new_b and {f.get("stream") for f in new_b} == {id_b}, new_b
    assert not any(f.get("stray") for f in new_a + new_b)


async def test_stop_button_cancels_the_generation(mesh: Mesh, tabs: tuple[ClientTab, ClientTab]) -> None:
    alice, _ = tabs
    service = mesh.node.service
    assert service is not None
    before = service.cancelled_calls
    earlier = [c for c in (await alice.state("calls")).values() if c["status"] == "ok"]
    call_id = await alice.ask(LONG_PROMPT, mesh.node_id, max_tokens=LONG_MAX_TOKENS, temperature=0, history=True)
    # With history, earlier completed turns with this node go along as `messages` (meshnode's schema).
    args = (await alice.state(f"calls['{call_id}']"))["args"]
    expected_turns = [m for c in earlier for m in ({"role": "user", "content": c["prompt"]},
                                                   {"role": "assistant", "content": c["text"]})]
    assert args.get("messages", []) == expected_turns[-20:]
    await alice.wait("id => meshClient.state.calls[id].tokens > 0", call_id)
    await alice.page.click("#stop")
    call = await alice.finished(call_id, timeout=10)
    assert call["finishReason"] == "cancel" and call["error"] is None
    await until(lambda: service.cancelled_calls == before + 1, 15, "the node to cancel the call")
    assert call["tokens"] < LONG_MAX_TOKENS


@pytest.mark.parametrize("how", ["leave", "close"])
async def test_a_tab_that_leaves_mid_stream_stops_its_generation(mesh: Mesh, how: str) -> None:
    service = mesh.node.service
    assert service is not None
    carol = await mesh.open_tab(f"carol-{how}")
    before = service.cancelled_calls
    call_id = await carol.ask(LONG_PROMPT, mesh.node_id, max_tokens=LONG_MAX_TOKENS, temperature=0)
    await carol.wait("id => meshClient.state.calls[id].tokens > 0", call_id)
    if how == "leave":
        await carol.eval("() => meshClient.leave()")
    else:
        await mesh.close_tab(carol)
    await until(lambda: service.cancelled_calls == before + 1, 20, f"the node to cancel after the tab's {how}")
    await until(lambda: not any(cid == call_id for _, cid in service.calls), 5, "the call to be gone")
    if how == "leave":
        call = await carol.state(f"calls['{call_id}']")
        assert call["finished"] and call["tokens"] < LONG_MAX_TOKENS


async def test_errors_are_shown_plainly(mesh: Mesh, tabs: tuple[ClientTab, ClientTab]) -> None:
    alice, _ = tabs
    # Denied: a tool the node does not expose.
    result = await alice.eval("id => meshClient.callTool(id, 'no_such_tool', {})", mesh.node_id)
    assert result["status"] == "denied" and "not exposed" in result["error"]
    # Busy: the node allows two open engine_run calls per peer; a third is refused and shown.
    errors_before = len(await alice.state("errors"))
    ids = [await alice.ask(f"Say the number {n}.", mesh.node_id, max_tokens=4) for n in range(3)]
    calls = await asyncio.gather(*(alice.finished(i) for i in ids))
    denied = [c for c in calls if c["status"] == "denied"]
    assert len(denied) == 1 and "busy" in denied[0]["error"], calls
    errors = (await alice.state("errors"))[errors_before:]
    assert any(e["kind"] == "denied" and "refused" in e["message"] for e in errors), errors
    shown = await alice.wait("() => [...document.querySelectorAll('#log li.error')].map(e => e.innerText).join('\\n')",
                             timeout=10)
    assert "refused" in shown
    # No peer: an empty room.
    dave = await mesh.open_tab("dave", f"&room=empty-{random.randrange(10**9)}", wait_node=False)
    await dave.wait("() => meshClient.state.joined", timeout=15)
    with pytest.raises(Exception, match="no peer serving engine_run"):
        await dave.eval("() => meshClient.ask('hello?')")
    assert (await dave.state("errors"))[-1]["kind"] == "no-peer"
    # Relay down: nothing listens on the relay port.
    port = closed_port()
    erin = await mesh.open_tab("erin", f"&room=down&relay=ws://127.0.0.1:{port}/&relayGraceMs=1500", wait_node=False)
    error = await erin.wait("() => meshClient.state.errors.find(e => e.kind === 'relay')", timeout=20)
    assert f"127.0.0.1:{port}" in error["message"] and "unreachable" in error["message"]
    assert "unreachable" in await erin.page.inner_text("#log")


async def test_page_detokenizer_matches_python(mesh: Mesh, tabs: tuple[ClientTab, ClientTab]) -> None:
    """legion-mesh §4.3 in JS vs meshnode.wire.maps.Detokenizer on the served map: multi-byte characters
    split across frames, special and unknown ids, a flush at the end."""
    if mesh.strategy != STRATEGIES[0]:
        pytest.skip("strategy-independent; checked once")
    alice, _ = tabs
    doc = mesh.engine.info.map_document
    vocab_size = max(doc["vocab"].values()) + 1
    rng = random.Random(1234)
    samples = [mesh.engine.text.encode_text("Ünïcødé ✓ — naïve café 北京 🙂 done"), list(range(0, 20))]
    samples += [[rng.randrange(vocab_size + 5) for _ in range(rng.randrange(1, 40))] for _ in range(30)]
    for ids in samples:
        cuts = sorted(rng.sample(range(1, len(ids)), min(len(ids) - 1, 4))) if len(ids) > 1 else []
        chunks = [ids[i:j] for i, j in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
        py = Detokenizer(doc)
        expected = [py.render(c, partial=k < len(chunks) - 1) for k, c in enumerate(chunks)]
        got = await alice.eval("([m, c]) => meshClient.detokenize(m, c)", [mesh.engine.info.map_id, chunks])
        assert got == expected, (ids, chunks)

