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
import base64
import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
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

ROOT = Path(__file__).resolve().parents[2]
WWW = Path(__file__).resolve().parent / "www"
LIB = WWW / "lib"
STRATEGIES = ("mqtt", "nostr", "torrent")
CHROMIUM = os.environ.get("MESHNODE_CHROMIUM", "/usr/bin/chromium")

BASE_FLAGS = [
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WEBRTC_FLAGS = [
    "--allow-loopback-in-peer-connection",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
CHROMIUM_FLAGS = BASE_FLAGS + WEBRTC_FLAGS

DEFAULT_WAIT_SECONDS = 20.0


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


def loopback_only() -> bool:
    """True inside a loopback-only network namespace (the only interface is ``lo``)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


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


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
    }

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@pytest.fixture(scope="session")
def page_server(trystero_bundles: list[Path]) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:<port>``) of a static server for tests/browser/www."""
    handler = functools.partial(_QuietHandler, directory=str(WWW))
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


class Tab:
    """One page running www/trystero.html; thin async wrappers over ``window.T``."""

    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.name = name
        self.console: list[str] = []
        self.self_id: str | None = None
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda err: self.console.append(f"pageerror: {err}"))

    # -- lifecycle

    async def join(
        self,
        strategy: str,
        relay_urls: list[str],
        app_id: str,
        room_id: str,
        password: str = "",
        *,
        debug: bool = False,
        actions: tuple[str, ...] = ("json", "bin", "text"),
    ) -> str:
        local = ("ws://127.0.0.1:", "wss://127.0.0.1:")
        assert relay_urls and all(u.startswith(local) for u in relay_urls), relay_urls
        result = await self.page.evaluate(
            "args => T.join(args)",
            {
                "strategy": strategy,
                "relayUrls": relay_urls,
                "appId": app_id,
                "roomId": room_id,
                "password": password,
                "debug": debug,
                "actions": list(actions),
            },
        )
        self.self_id = result["selfId"]
        return self.self_id

    async def leave(self, room_id: str | None = None) -> None:
        """Leave `room_id`, or every room of the page."""
        await self.page.evaluate("id => T.leave(id)", room_id)

    # -- waiting (always bounded, always on a page-side condition)

    async def wait(self, expression: str, arg: Any = None, timeout: float = DEFAULT_WAIT_SECONDS) -> Any:
        """Wait until ``expression`` (a JS function of ``arg``) is truthy; return its value."""
        handle = await self.page.wait_for_function(expression, arg=arg, timeout=timeout * 1000, polling=50)
        try:
            return await handle.json_value()
        finally:
            await handle.dispose()

    async def wait_peer(
        self, peer_id: str | None = None, timeout: float = DEFAULT_WAIT_SECONDS, room_id: str | None = None
    ) -> str:
        """Wait for a join event (of ``peer_id`` / in ``room_id`` if given); returns the peer id."""
        return await self.wait(
            """([id, room]) => {
                 const e = T.events.find(e => e.type === 'join' && (!id || e.peerId === id)
                                              && (!room || e.roomId === room))
                 return e && e.peerId
               }""",
            [peer_id, room_id],
            timeout,
        )

    async def wait_leave(
        self, peer_id: str, timeout: float = DEFAULT_WAIT_SECONDS, room_id: str | None = None
    ) -> None:
        await self.wait(
            """([id, room]) => T.events.some(e => e.type === 'leave' && e.peerId === id
                                                  && (!room || e.roomId === room))""",
            [peer_id, room_id],
            timeout,
        )

    async def wait_messages(
        self,
        action: str,
        count: int = 1,
        peer_id: str | None = None,
        timeout: float = DEFAULT_WAIT_SECONDS,
        room_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` complete messages arrived on ``action``; return them in order."""
        return await self.wait(
            """([action, count, id, room]) => {
                 const m = T.messages.filter(m => m.action === action && (!id || m.peerId === id)
                                                  && (!room || m.roomId === room))
                 return m.length >= count && m.every(x => x.done) && m
               }""",
            [action, count, peer_id, room_id],
            timeout,
        )

    # -- actions

    async def send(
        self,
        action: str,
        data: dict[str, Any],
        target: str | None = None,
        timeout: float = 60.0,
        room_id: str | None = None,
    ) -> Any:
        """``T.send``: `data` is a payload descriptor (www/harness.js ``toPayload``)."""
        return await asyncio.wait_for(
            self.page.evaluate("([a, d, t, r]) => T.send(a, d, t, r)", [action, data, target, room_id]),
            timeout,
        )

    async def send_json(
        self, action: str, value: Any, target: str | None = None, room_id: str | None = None
    ) -> Any:
        return await self.send(action, {"kind": "json", "value": value}, target, room_id=room_id)

    async def send_string(
        self, action: str, value: str, target: str | None = None, room_id: str | None = None
    ) -> Any:
        return await self.send(action, {"kind": "string", "value": value}, target, room_id=room_id)

    async def send_bytes(
        self, action: str, data: bytes, target: str | None = None, room_id: str | None = None
    ) -> Any:
        descriptor = {"kind": "binary", "b64": base64.b64encode(data).decode()}
        return await self.send(action, descriptor, target, room_id=room_id)

    async def send_pattern(
        self, action: str, size: int, seed: int = 0, target: str | None = None, room_id: str | None = None
    ) -> Any:
        descriptor = {"kind": "binary", "size": size, "seed": seed}
        return await self.send(action, descriptor, target, room_id=room_id)

    # -- inspection

    async def get(self, what: str) -> Any:
        """``T.<what>`` as JSON (events, messages, frames, wsLog, pcLog, peers, selfId)."""
        return await self.page.evaluate(f"() => T.{what}")

    async def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        events = await self.get("events")
        return [e for e in events if type_ is None or e["type"] == type_]

    async def stats(self) -> dict[str, Any]:
        return await self.page.evaluate("() => T.stats()")

    async def diagnostics(self, frames: int = 60) -> str:
        """Console, events, connection states, the last data-channel frames and relay traffic."""
        lines = [f"===== tab {self.name} selfId={self.self_id} ====="]
        lines += [f"console {c}" for c in self.console[-100:]]
        try:
            state = await asyncio.wait_for(
                self.page.evaluate(
                    "n => ({events: T.events, messages: T.messages.map(m => ({...m, b64: undefined})),"
                    " pcLog: T.pcLog.slice(-40), frames: T.frames.slice(-n), wsLog: T.wsLog.slice(-200),"
                    " peers: T.peers})",
                    frames,
                ),
                5,
            )
        except Exception as exc:  # the page may be gone; diagnostics must not mask the failure
            lines.append(f"(page state unavailable: {exc!r})")
            return "\n".join(lines)
        lines.append(f"peers {state['peers']}")
        for key in ("events", "messages", "pcLog", "frames", "wsLog"):
            for entry in state[key]:
                lines.append(f"{key} {json.dumps(entry, separators=(',', ':'))[:600]}")
        return "\n".join(lines)


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
