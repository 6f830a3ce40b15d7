"""Fixtures for real-browser tests: bundled Trystero, a static page server, headless Chromium.

* ``trystero_bundles`` (session) runs ``scripts/build-web.sh`` when a bundle in
  ``tests/browser/www/lib/`` is missing or older than its inputs (test-harness §6).
* ``page_server`` (session) serves ``tests/browser/www`` on 127.0.0.1 (a secure context, so WebCrypto
  works) from a thread; stopped at the end.
* ``browser`` (session) is Debian's Chromium driven by Playwright's async API with the recommended flag
  set of test-harness §4.2 (gathers 127.0.0.1 candidates inside a loopback-only namespace) and a fresh
  ``TMPDIR`` removed at the end. One browser per session; each test gets a fresh context and page.
* ``tab`` / ``new_tab`` give :class:`Tab` objects driving ``www/trystero.html`` (``window.T``, see
  ``www/harness.js``); on failure their page log, events and data-channel frames are printed.

Chromium missing → skip with a reason; with ``CI=true`` → fail (STYLE §13.3). All browser tests run on
the session event loop (the browser lives there).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pytest_asyncio import is_async_test

from bench.lab.browser import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    DEFAULT_WAIT_SECONDS,
    WWW,
    QuietHandler,
    Tab,
)

ROOT = Path(__file__).resolve().parents[2]
LIB = WWW / "lib"
STRATEGIES = ("mqtt", "nostr", "torrent")



def _unavailable(reason: str) -> None:
    """Skip, or fail when CI=true (STYLE §13.3)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------- hooks


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every async test under tests/browser on the session loop, where the browser lives."""
    here = Path(__file__).resolve().parent
    marker = pytest.mark.asyncio(loop_scope="session")
    for item in items:
        if is_async_test(item) and here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker, append=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"_browser_rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "_browser_rep_call", None)
    setup = getattr(request.node, "_browser_rep_setup", None)
    return bool((rep is not None and rep.failed) or (setup is not None and setup.failed))


# ---------------------------------------------------------------------------------------- helpers


def pattern_bytes(size: int, seed: int = 0) -> bytes:
    """The page's ``patternBytes`` (www/harness.js): deterministic test payloads."""
    return bytes((seed + i * 131 + (i >> 11)) & 0xFF for i in range(size))


def assert_loopback_pair(pair: dict[str, Any] | None) -> None:
    """The selected ICE pair of ``Tab.stats()`` runs 127.0.0.1 ↔ 127.0.0.1.

    Chromium's stats hide the address of a peer-reflexive remote candidate (``address == ""``),
    which happens when a connectivity check arrives before the trickled candidate; accept that.
    """
    assert pair is not None and pair["local"] and pair["remote"], pair
    assert pair["local"]["address"] == "127.0.0.1", pair
    remote = pair["remote"]
    assert remote["address"] == "127.0.0.1" or (remote["address"] == "" and remote["type"] == "prflx"), pair


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unique_name(request: pytest.FixtureRequest, suffix: str = "") -> str:
    """A unique appId/room per test (test name + time + pid), like aiomqtt's unique_topic()."""
    base = request.node.name.replace("[", "-").replace("]", "")
    return f"mn-{base}{suffix}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


# ---------------------------------------------------------------------------------------- bundles


def _bundle_inputs() -> list[Path]:
    inputs = [ROOT / "scripts" / "build-web.sh", ROOT / "web" / "package-lock.json"]
    inputs += sorted((ROOT / "web" / "src").glob("trystero-*.js"))
    inputs += [ROOT / "web" / "node_modules" / "@trystero-p2p" / s / "package.json" for s in STRATEGIES]
    inputs += [ROOT / "web" / "node_modules" / "@trystero-p2p" / "core" / "package.json"]
    return [p for p in inputs if p.exists()]


def build_bundles(force: bool = False) -> list[Path]:
    """Build www/lib/trystero-<strategy>.js when missing or outdated; return the bundle paths."""
    bundles = [LIB / f"trystero-{s}.js" for s in STRATEGIES]
    newest_input = max((p.stat().st_mtime for p in _bundle_inputs()), default=0.0)
    if force or any(not b.exists() or b.stat().st_mtime < newest_input for b in bundles):
        if not (ROOT / "web" / "node_modules" / ".bin" / "esbuild").exists():
            _unavailable("web/node_modules missing: run `cd web && npm ci` (scripts/setup.sh --test)")
        proc = subprocess.run(
            [str(ROOT / "scripts" / "build-web.sh")], capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            pytest.fail(f"scripts/build-web.sh failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return bundles


@pytest.fixture(scope="session")
def trystero_bundles() -> list[Path]:
    return build_bundles()


# ---------------------------------------------------------------------------------------- page server


@pytest.fixture(scope="session")
def page_server(trystero_bundles: list[Path]) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:<port>``) of a static server for tests/browser/www."""
    handler = functools.partial(QuietHandler, directory=str(WWW))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="browser-page-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------------------- Chromium


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Set one environment variable for the duration of the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    """One headless Chromium for the whole session (Debian's binary; Playwright never downloads).

    The Playwright driver and Chromium get a private ``TMPDIR`` (killed runs leave
    ``playwright-artifacts-*`` there), removed at the end; this process's own ``TMPDIR`` is only
    changed while the driver starts (it copies the environment), so ``tempfile`` elsewhere is unaffected.
    """
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set MESHNODE_CHROMIUM)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-chromium-"))
    try:
        with _environ("TMPDIR", str(tmp)):
            playwright = await async_playwright().start()
        try:
            chromium = await playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                env={**os.environ, "TMPDIR": str(tmp)},
                timeout=30_000,
            )
            try:
                yield chromium
            finally:
                await chromium.close()
        finally:
            await playwright.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- relays

RELAY_FIXTURES = {"mqtt": "mqtt_broker", "nostr": "nostr_server", "torrent": "tracker_server"}
"""Strategy → session relay fixture of tests/conftest.py (each has ``.url``, a ws://127.0.0.1 URL)."""


class RelayUrls(dict[str, list[str]]):
    """``relay_urls["mqtt"]`` → ``["ws://127.0.0.1:P"]``; starts only the relays a test asks for."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        super().__init__()
        self._request = request

    def __missing__(self, strategy: str) -> list[str]:
        relay = self._request.getfixturevalue(RELAY_FIXTURES[strategy])
        urls = [relay.url]
        self[strategy] = urls
        return urls


@pytest.fixture
def relay_urls(request: pytest.FixtureRequest) -> RelayUrls:
    """Lazy strategy → local relay URL list (the shared session relays of tests/conftest.py)."""
    return RelayUrls(request)


# ---------------------------------------------------------------------------------------- tabs


TabFactory = Callable[[str], Awaitable[Tab]]


@pytest_asyncio.fixture(loop_scope="session")
async def new_tab(
    browser: Any, page_server: str, request: pytest.FixtureRequest
) -> AsyncIterator[TabFactory]:
    """Factory of fresh tabs (own browser context each, hence own Trystero selfId)."""
    contexts: list[Any] = []
    tabs: list[Tab] = []

    async def make(name: str = "tab") -> Tab:
        context = await browser.new_context()
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(DEFAULT_WAIT_SECONDS * 1000)
        tab = Tab(page, name)
        tabs.append(tab)
        await page.goto(f"{page_server}/trystero.html")
        await page.wait_for_function("() => window.T && document.body.dataset.ready === '1'", timeout=10_000)
        return tab

    try:
        yield make
    finally:
        if _failed(request):
            for tab in tabs:
                print(await tab.diagnostics())
        for context in contexts:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.close(), 10)


@pytest_asyncio.fixture(loop_scope="session")
async def tab(new_tab: TabFactory) -> Tab:
    """A fresh page with the Trystero test page loaded (not joined)."""
    return await new_tab("tab")


# ---------------------------------------------------------------------------------------- Python peer

PY_JOIN_TIMEOUT_SECONDS = 20.0
PY_LEAVE_TIMEOUT_SECONDS = 10.0

PyRoomFactory = Callable[..., Awaitable[Any]]


@pytest_asyncio.fixture(loop_scope="session")
async def py_room(request: pytest.FixtureRequest) -> AsyncIterator[PyRoomFactory]:
    """Factory joining meshnode ``Room``s for loopback tests; every room is left at teardown.

    ``await py_room(strategy=..., relay_urls=[...], app_id=..., room_id=..., password=..., **more)``
    always adds ``ice_servers=[]`` and the aioice override ``only ["127.0.0.1"]`` (test-harness §9),
    so it works inside a loopback-only namespace and on a host network alike.
    """
    from meshnode.room import Room, RoomConfig

    rooms: list[Any] = []

    async def join(**settings: Any) -> Any:
        loopback = {"ice_servers": []}
        settings = {**loopback, **settings}
        room = await asyncio.wait_for(Room.join(RoomConfig(**settings)), PY_JOIN_TIMEOUT_SECONDS)
        rooms.append(room)
        return room

    try:
        yield join
    finally:
        if _failed(request):
            for room in rooms:
                print(
                    f"===== python room {room.config.room_id!r} selfId={room.self_id} ====="
                    f"\npeers {room.peers}\njoin_errors {list(room.join_errors)}"
                )
        for room in rooms:
            try:
                await asyncio.wait_for(room.leave(), PY_LEAVE_TIMEOUT_SECONDS)
            except TimeoutError:
                print(f"python room {room.self_id} did not leave within {PY_LEAVE_TIMEOUT_SECONDS} s")
