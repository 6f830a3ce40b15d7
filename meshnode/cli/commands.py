"""What each CLI subcommand does, once settings are loaded (kept out of main.py so it stays thin)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import webbrowser
from pathlib import Path

from meshnode.settings import Settings

logger = logging.getLogger("meshnode")


async def run(command: str, args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.transport.ice import quiet_connect_teardown

    quiet_connect_teardown(asyncio.get_running_loop())
    handlers = {"generate": generate, "serve-http": serve_http, "join": join, "demo": demo, "ask": ask}
    return await handlers[command](args, settings)


def _cache_dir(settings: Settings) -> Path:
    from meshnode.generation.models import default_cache_dir

    return Path(settings.model.cache_dir) if settings.model.cache_dir else default_cache_dir()


async def generate(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.generation.api import Prompt, SamplingParams
    from meshnode.generation.factory import open_backend
    from meshnode.generation.text import IncrementalText

    async with open_backend(settings.model, settings.engine) as backend:
        if args.raw:
            prompt = Prompt(text=args.prompt)
        else:
            messages = [{"role": "user", "content": args.prompt}]
            system = args.system or settings.legion.system_prompt
            if system:
                messages.insert(0, {"role": "system", "content": system})
            prompt = Prompt.chat(messages)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens, stop=tuple(args.stop or ()))
        text = IncrementalText(backend)
        count = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_at = None
        finish = None
        async with await backend.start(prompt, params) as stream:
            async for chunk in stream:
                if chunk.ids and first_at is None:
                    first_at = loop.time()
                count += len(chunk.ids)
                sys.stdout.write(text.push(list(chunk.ids), final=chunk.finish_reason is not None))
                sys.stdout.flush()
                finish = chunk.finish_reason
        sys.stdout.write("\n")
        decode = loop.time() - (first_at or started)
        logger.info("%d tokens, finish=%s, first token after %.0f ms, %.1f tok/s", count, finish,
                    ((first_at or started) - started) * 1000, max(count - 1, 0) / max(decode, 1e-6))
    return 0


async def serve_http(args: argparse.Namespace, settings: Settings) -> int:  # noqa: ARG001 - one signature
    from aiohttp import web

    from meshnode.cli.signals import stop_on_signals
    from meshnode.generation.factory import open_backend
    from meshnode.http.requests import Limits
    from meshnode.http.server import CodecHttpApp

    async with open_backend(settings.model, settings.engine) as backend:
        limits = Limits(max_tokens=settings.engine.max_tokens, default_max_tokens=settings.engine.default_max_tokens)
        runner = web.AppRunner(CodecHttpApp(backend, limits).make_app())
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.http.host, settings.http.port).start()
            codec_map = await backend.codec_map()
            logger.info("serving %s on http://%s:%d (map %s)", backend.model_id, settings.http.host,
                        settings.http.port, codec_map.map_id)
            stop = asyncio.Event()
            with stop_on_signals(stop):
                await stop.wait()
        finally:
            await runner.cleanup()
    return 0


async def join(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.cli.signals import stop_on_signals
    from meshnode.generation.factory import open_backend
    from meshnode.node.node import Node
    from meshnode.node.webapp import start_web

    async with open_backend(settings.model, settings.engine) as backend:
        node = Node(settings, backend)
        stop = asyncio.Event()
        web_runner = None
        with stop_on_signals(stop):
            try:
                if args.web is not None:
                    web_runner = await start_web(node, settings, args.web)
                await node.run(stop)
            finally:
                if web_runner is not None:
                    await web_runner.cleanup()
    return 0


async def demo(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.cli.signals import stop_on_signals
    from meshnode.generation.factory import open_backend
    from meshnode.node.demo import DEMO_ROOM, Demo

    async with open_backend(settings.model, settings.engine) as backend:
        session = Demo(settings, backend, web_port=args.web_port)
        with stop_on_signals(session.stop):
            try:
                url = await session.start()
                print(f"\n  meshnode demo is ready: open {url}\n  (model {backend.model_id}, room {DEMO_ROOM!r} on "
                      f"the embedded relay {session.relay.url}; Ctrl-C stops everything)\n", flush=True)
                if args.ask:
                    await session.ask(args.ask, _cache_dir(settings) / "maps")
                if args.open:
                    webbrowser.open(url)
                await session.wait()
            finally:
                await session.close()
    return 0


async def ask(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.legion.client import AskError, ask
    from meshnode.node.assembly import ice_policy, room_config
    from meshnode.node.demo import print_now
    from meshnode.room import Room
    from meshnode.transport.ice import apply_ice_policy

    apply_ice_policy(ice_policy(settings.webrtc))
    room = await Room.join(room_config(settings))
    try:
        content = await ask(room, args.prompt, system=args.system, max_tokens=args.max_tokens,
                            temperature=args.temperature, timeout=args.timeout, cache_dir=_cache_dir(settings) / "maps",
                            write=print_now)
    except AskError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        await room.leave()
    sys.stdout.write("\n")
    logger.info("%s tokens, finish=%s, first token after %s ms", content.get("tokens"), content.get("finish_reason"),
                content.get("ttft_ms"))
    return 0
