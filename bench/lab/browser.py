"""Chromium with real Trystero, for the browser tests and the browser benches (test-harness §4, §6).

:class:`Tab` drives one page of ``tests/browser/www/trystero.html`` (``window.T``, see
``tests/browser/www/harness.js``); the pytest fixtures that start the browser and serve the page
live in ``tests/browser/conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import socket
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WWW = ROOT / "tests" / "browser" / "www"
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

def loopback_only() -> bool:
    """True inside a loopback-only network namespace (the only interface is ``lo``)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
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
