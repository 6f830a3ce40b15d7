"""`meshnode demo`: the whole system on one offline machine, in one process.

An embedded Nostr relay on 127.0.0.1 (Trystero's Nostr strategy runs in every browser), a meshnode
serving the model in a room on it, and the browser client page configured for that relay and room.
Nothing else needs to run and nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from pathlib import Path

from aiohttp import web

from meshnode.generation.api import Backend
from meshnode.legion.client import AskError, ask
from meshnode.node.assembly import room_config
from meshnode.node.node import Node
from meshnode.node.webapp import bound_url, start_web
from meshnode.room import Room
from meshnode.settings import Settings
from signaling.servers.nostr_relay import NostrRelayServer

__all__ = ["DEMO_APP_ID", "DEMO_ROOM", "Demo", "demo_settings", "print_now"]

logger = logging.getLogger(__name__)

DEMO_APP_ID = "meshnode-demo"
DEMO_ROOM = "demo"
ASK_TIMEOUT_SECONDS = 120.0


def demo_settings(settings: Settings, relay_url: str, host_addresses_mode: str = "append") -> Settings:
    """The node's settings for the demo room: local relay, no STUN, loopback always gatherable."""
    room = dataclasses.replace(settings.room, strategy="nostr", relays=[relay_url], app_id=DEMO_APP_ID, room=DEMO_ROOM)
    # aioice never offers 127.0.0.1 by itself; on an offline box it may be the only address.
    webrtc = dataclasses.replace(settings.webrtc, ice_servers=[], host_addresses_mode=host_addresses_mode,
                                 host_addresses=["127.0.0.1"])
    return dataclasses.replace(settings, room=room, webrtc=webrtc)


def print_now(text: str) -> None:
    """Write streamed text to the terminal as it arrives."""
    sys.stdout.write(text)
    sys.stdout.flush()


class Demo:
    """Relay + node + page. `start()` brings everything up; `close()` takes it down (idempotent)."""

    def __init__(self, settings: Settings, backend: Backend, *, web_port: int = 0, relay_port: int = 0,
                 host_addresses_mode: str = "append") -> None:
        self.base_settings = settings
        self.host_addresses_mode = host_addresses_mode
        self.backend = backend
        self.relay = NostrRelayServer("127.0.0.1", relay_port)
        self.web_port = web_port
        self.node: Node | None = None
        self.web_runner: web.AppRunner | None = None
        self.url = ""
        self.stop = asyncio.Event()
        """Set to make :meth:`wait` return (the node drains and leaves)."""
        self._node_task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        await self.relay.start()
        settings = demo_settings(self.base_settings, self.relay.url, self.host_addresses_mode)
        self.node = Node(settings, self.backend)
        self._node_task = asyncio.create_task(self.node.run(self.stop), name="demo.node")
        started = asyncio.create_task(self.node.started.wait(), name="demo.started")
        try:
            await asyncio.wait([started, self._node_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if self._node_task.done():
            self._node_task.result()  # surfaces why the node could not start
        self.web_runner = await start_web(self.node, settings, self.web_port)
        self.url = bound_url(self.web_runner) + "/"
        return self.url

    async def wait(self) -> None:
        assert self._node_task is not None
        await self._node_task

    async def ask(self, question: str, cache_dir: Path) -> None:
        """Ask the demo node through the mesh (relay, WebRTC, Codec frames) and print the answer."""
        assert self.node is not None
        room = await Room.join(room_config(self.node.settings))
        print(f"  asking the node through the mesh: {question}\n", flush=True)
        try:
            content = await ask(room, question, system=None, max_tokens=128, temperature=0.0,
                                timeout=ASK_TIMEOUT_SECONDS, cache_dir=cache_dir,
                                write=print_now)
            print(f"\n\n  ({content.get('tokens')} tokens, first after {content.get('ttft_ms')} ms)\n", flush=True)
        except AskError as exc:
            logger.error("the demo question failed: %s", exc)
        finally:
            await room.leave()

    async def close(self) -> None:
        self.stop.set()
        if self._node_task is not None:
            with contextlib.suppress(Exception):
                await self._node_task
        if self.web_runner is not None:
            await self.web_runner.cleanup()
            self.web_runner = None
        await self.relay.close()
