"""`meshnode demo`: the whole system on one offline machine, in one process.

An embedded Nostr relay on 127.0.0.1 (Trystero's Nostr strategy runs in every browser), a meshnode
serving the embedded model in a room on it, and the browser client page configured for that relay
and room. Nothing else needs to run and nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import webbrowser
from typing import Any

from aiohttp import web

from meshnode.node.node import Node
from meshnode.settings import Settings
from signaling.servers.nostr_relay import NostrRelayServer

logger = logging.getLogger(__name__)

DEMO_APP_ID = "meshnode-demo"
DEMO_ROOM = "demo"


def demo_settings(settings: Settings, relay_url: str, host_addresses_mode: str = "append") -> Settings:
    """The node's settings for the demo room: local relay, no STUN, loopback always gatherable."""
    room = dataclasses.replace(settings.room, strategy="nostr", relays=[relay_url],
                               app_id=DEMO_APP_ID, room=DEMO_ROOM)
    # aioice never offers 127.0.0.1 by itself; on an offline box it may be the only address.
    webrtc = dataclasses.replace(settings.webrtc, ice_servers=[], host_addresses_mode=host_addresses_mode,
                                 host_addresses=["127.0.0.1"])
    return dataclasses.replace(settings, room=room, webrtc=webrtc)


class Demo:
    """Relay + node + page. `start()` brings everything up; `close()` takes it down (idempotent)."""

    def __init__(self, settings: Settings, engine: Any, *, web_port: int = 0, relay_port: int = 0,
                 host_addresses_mode: str = "append") -> None:
        self.base_settings = settings
        self.host_addresses_mode = host_addresses_mode
        self.engine = engine
        self.relay = NostrRelayServer("127.0.0.1", relay_port)
        self.web_port = web_port
        self.node: Node | None = None
        self.web_runner: web.AppRunner | None = None
        self.url = ""
        self._stop = asyncio.Event()
        self._node_task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        from meshnode.node.webapp import bound_url, start_web

        await self.relay.start()
        settings = demo_settings(self.base_settings, self.relay.url, self.host_addresses_mode)
        self.node = Node(settings, self.engine)
        self._node_task = asyncio.create_task(self.node.run(self._stop), name="demo.node")
        started = asyncio.create_task(self.node.started.wait())
        await asyncio.wait([started, self._node_task], return_when=asyncio.FIRST_COMPLETED)
        if self._node_task.done():
            started.cancel()
            self._node_task.result()  # surfaces why the node could not start
        self.web_runner = await start_web(self.node, settings, self.web_port)
        self.url = bound_url(self.web_runner) + "/"
        return self.url

    async def restart_relay(self) -> None:
        """Stop the relay and bring it back on the same port (fault drills and tests)."""
        await self.relay.close()
        await self.relay.start()

    async def wait(self) -> None:
        assert self._node_task is not None
        await self._node_task

    def request_stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        self._stop.set()
        if self._node_task is not None:
            with contextlib.suppress(Exception):
                await self._node_task
        if self.web_runner is not None:
            await self.web_runner.cleanup()
            self.web_runner = None
        await self.relay.close()


async def demo_ask(demo: Demo, question: str) -> None:
    """Ask the demo node through the mesh (relay, WebRTC, Codec frames) and print the answer."""
    import sys

    from meshnode.legion.client import AskError, ask
    from meshnode.generation.models import default_cache_dir
    from meshnode.node.node import room_config
    from meshnode.room import Room

    assert demo.node is not None
    room = await Room.join(room_config(demo.node.settings))
    print(f"  asking the node through the mesh: {question}\n", flush=True)
    try:
        content = await ask(room, question, system=None, max_tokens=128, temperature=0.0, timeout=120,
                            cache_dir=default_cache_dir() / "maps",
                            write=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        print(f"\n\n  ({content.get('tokens')} tokens, first after {content.get('ttft_ms')} ms)\n", flush=True)
    except AskError as exc:
        logger.error("the demo question failed: %s", exc)
    finally:
        await room.leave()


async def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.cli.commands import install_stop_signals, open_engine, remove_stop_signals

    async with open_engine(settings) as engine:
        demo = Demo(settings, engine, web_port=args.web_port)
        installed = install_stop_signals(demo._stop)
        try:
            url = await demo.start()
            print(f"\n  meshnode demo is ready: open {url}\n  (model {engine.model_id}, room {DEMO_ROOM!r} on "
                  f"the embedded relay {demo.relay.url}; Ctrl-C stops everything)\n", flush=True)
            if args.ask:
                await demo_ask(demo, args.ask)
            if args.open:
                webbrowser.open(url)
            await demo.wait()
        finally:
            remove_stop_signals(installed)
            await demo.close()
    return 0
