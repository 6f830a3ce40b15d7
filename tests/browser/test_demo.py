"""`meshnode demo` end to end: embedded Nostr relay + node + chat page, driven in Chromium.

The demo runs in-process (the same `Demo` object the CLI runs) with the embedded model. The page is
used the way a person uses it: type a question, press Enter, watch the answer stream in. The
screenshot it takes is the one in docs/ and the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from meshnode.cli.config import load_settings
from meshnode.node.demo import Demo
from tests.browser.test_legion_e2e import ClientTab, build_client
from tests.fixtures_model import embedded_loaded, make_backend  # noqa: F401

from .conftest import ROOT

pytestmark = [pytest.mark.browser, pytest.mark.model, pytest.mark.timeout(300)]

SCREENSHOT = ROOT / "docs" / "demo.png"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def demo(embedded_loaded: Any) -> AsyncIterator[Demo]:
    build_client()
    settings, _ = load_settings(None, env={}, flags={("engine", "default_max_tokens"): 24})
    async with make_backend(embedded_loaded, max_concurrent=4) as engine:
        # The CI namespace has only 127.0.0.1: gather exactly that (the CLI demo appends it).
        demo = Demo(settings, engine, host_addresses_mode="only")
        await demo.start()
        try:
            yield demo
        finally:
            await demo.close()


async def open_page(browser: Any, url: str, name: str, contexts: list[Any]) -> ClientTab:
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    contexts.append(context)
    page = await context.new_page()
    tab = ClientTab(page, name)
    await page.goto(f"{url}?nick={name}&relayGraceMs=1000")
    await tab.wait("() => window.meshClient && meshClient.ready && meshClient.state.joined", timeout=20)
    return tab


async def type_question(tab: ClientTab, text: str) -> None:
    await tab.page.fill("#max-tokens", "24")
    await tab.page.fill("#temperature", "0")
    await tab.page.fill("#message", text)
    await tab.page.press("#message", "Enter")


async def last_answer(tab: ClientTab, count: int) -> dict[str, Any]:
    """Wait until `count` calls have finished; return the newest."""
    return await tab.wait(
        "n => { const c = Object.values(meshClient.state.calls).filter(c => c.finished);"
        " return c.length >= n && c[c.length - 1] }", count)


async def test_demo_page_chat_two_tabs_and_relay_restart(demo: Demo, browser: Any) -> None:
    assert demo.node is not None and demo.node.room is not None
    node_id = demo.node.room.self_id
    contexts: list[Any] = []
    try:
        alice = await open_page(browser, demo.url, "alice", contexts)
        await alice.wait_peer(node_id)

        # A person's question: typed, Enter, streamed answer in the log.
        await type_question(alice, "What is the capital of France?")
        answer = await last_answer(alice, 1)
        assert answer["status"] == "ok" and answer["text"].strip(), answer
        await alice.wait("t => document.querySelector('#log').innerText.includes(t)", answer["text"].strip()[:20])
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shot = Path(str(SCREENSHOT) + ".tmp.png")
        await alice.page.screenshot(path=str(shot), full_page=True)
        shutil.move(shot, SCREENSHOT)

        # Two tabs at once: each sees only its own stream.
        bob = await open_page(browser, demo.url, "bob", contexts)
        await bob.wait_peer(node_id)
        await asyncio.gather(type_question(alice, "Name a color."), type_question(bob, "Name an animal."))
        a2, b2 = await asyncio.gather(last_answer(alice, 2), last_answer(bob, 1))
        a_streams = {e.get("stream") for e in await alice.cf_from(node_id) if e.get("stream")}
        b_streams = {e.get("stream") for e in await bob.cf_from(node_id) if e.get("stream")}
        assert a_streams and b_streams and not a_streams & b_streams
        assert a2["callId"] in a_streams and b2["callId"] in b_streams

        # The relay dies: the page says so plainly; it comes back: the page recovers and chats.
        await demo.relay.close()
        problem = await alice.wait("() => meshClient.state.relayProblem", timeout=30)
        assert "relay" in problem
        assert await alice.page.get_attribute("#status", "data-state") == "problem"
        await demo.relay.start()
        await alice.wait("() => meshClient.state.relayProblem === null", timeout=60)
        await type_question(alice, "Say hello.")
        a3 = await last_answer(alice, 3)
        assert a3["status"] == "ok" and a3["text"].strip()
    finally:
        for context in contexts:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.close(), 10)
