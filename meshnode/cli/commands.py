"""What each CLI subcommand does, once settings are loaded (kept out of cli.py so it stays thin)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from meshnode.settings import Settings

logger = logging.getLogger("meshnode")

AUTO_MAX_CONCURRENT = 8
"""engine.max_concurrent = 0 on CPU/MPS: the batch step time grows with rows there."""
AUTO_MAX_CONCURRENT_CUDA = 64
"""engine.max_concurrent = 0 on the CUDA engine: 64 streams kept TTFT p95 at 40 ms on an H100
(0.5B shape, bench/results/gpu_qwen05b.json); the engine lowers it if the KV cache does not fit."""


def resolve_max_concurrent(configured: int, cuda_engine: bool) -> int:
    """engine.max_concurrent, with 0 (auto) replaced by the default for the engine in use."""
    if configured:
        return configured
    return AUTO_MAX_CONCURRENT_CUDA if cuda_engine else AUTO_MAX_CONCURRENT


@contextlib.asynccontextmanager
async def open_engine(settings: Settings, *, progress: bool = True) -> AsyncIterator[Any]:
    """Load the configured model (converting the embedded one on first use) and run an engine."""
    from meshnode.generation.engine import TorchEngine
    from meshnode.generation.models import resolve_model

    m = settings.model
    loaded = await asyncio.to_thread(
        resolve_model, m.model, cache_dir=Path(m.cache_dir) if m.cache_dir else None,
        device=m.device, dtype=m.dtype, progress=progress,
    )
    limits: dict[str, Any] = {
        "max_concurrent": settings.engine.max_concurrent,
        "max_queue": settings.engine.max_queue,
        "max_prompt_tokens": settings.engine.max_prompt_tokens,
        "max_tokens_limit": settings.engine.max_tokens,
        "max_batch_tokens": settings.engine.max_batch_tokens,
    }
    engine_class: Any = TorchEngine
    if loaded.device.type == "cuda":  # issue 6: slot KV cache + CUDA graphs where the model allows
        from meshnode.generation.cuda.engine import CudaEngine, supports_model

        if supports_model(loaded.model) is None:
            # Its KV cache is preallocated per slot: admission is by free slot, not a token sum.
            engine_class = CudaEngine
            limits.update(max_batch_tokens=0, progress=progress)
    limits["max_concurrent"] = resolve_max_concurrent(
        limits["max_concurrent"], cuda_engine=engine_class is not TorchEngine)
    engine = engine_class.from_loaded(loaded, **limits)
    async with engine:
        yield engine


def install_stop_signals(stop: asyncio.Event) -> list[signal.Signals]:
    """First SIGINT/SIGTERM asks for a graceful stop; a second SIGINT is a KeyboardInterrupt."""
    loop = asyncio.get_running_loop()
    installed = []

    def first(sig: signal.Signals) -> None:
        if stop.is_set() and sig == signal.SIGINT:
            loop.remove_signal_handler(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            return
        logger.info("%s: shutting down (again to force)", sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, first, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    return installed


def remove_stop_signals(installed: list[signal.Signals]) -> None:
    loop = asyncio.get_running_loop()
    for sig in installed:
        loop.remove_signal_handler(sig)


async def run(command: str, args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.transport.ice import quiet_connect_teardown

    quiet_connect_teardown(asyncio.get_running_loop())
    if command == "generate":
        return await generate(args, settings)
    if command == "serve-http":
        return await serve_http(settings)
    if command == "join":
        from meshnode.node.node import run_join

        return await run_join(args, settings)
    if command == "demo":
        from meshnode.node.demo import run_demo

        return await run_demo(args, settings)
    if command == "ask":
        from meshnode.legion.client import run_ask

        return await run_ask(args, settings)
    raise ValueError(f"unknown command {command}")


async def generate(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.http.requests import IncrementalText
    from meshnode.generation.engine import SamplingParams

    async with open_engine(settings) as engine:
        if args.raw:
            prompt_ids = engine.encode_text(args.prompt)
        else:
            messages = [{"role": "user", "content": args.prompt}]
            system = args.system or settings.legion.system_prompt
            if system:
                messages.insert(0, {"role": "system", "content": system})
            prompt_ids = engine.encode_chat(messages)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed, max_tokens=args.max_tokens, stop=tuple(args.stop or ()))
        text = IncrementalText(engine)
        count = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_at = None
        async with engine.generate(prompt_ids, params) as stream:
            async for chunk in stream:
                if chunk.ids and first_at is None:
                    first_at = loop.time()
                count += len(chunk.ids)
                sys.stdout.write(text.push(list(chunk.ids), final=chunk.finish_reason is not None))
                sys.stdout.flush()
                finish = chunk.finish_reason
        sys.stdout.write("\n")
        decode = loop.time() - (first_at or started)
        logger.info("%d tokens, finish=%s, first token after %.0f ms, %.1f tok/s",
                    count, finish, ((first_at or started) - started) * 1000, max(count - 1, 0) / max(decode, 1e-6))
    return 0


async def serve_http(settings: Settings) -> int:
    from aiohttp import web

    from meshnode.http.requests import Limits
    from meshnode.http.server import CodecHttpApp
    from meshnode.generation.modelinfo import ModelInfo

    async with open_engine(settings) as engine:
        info = ModelInfo(model_id=engine.model_id, tokenizer=engine.tokenizer)
        limits = Limits(max_prompt_tokens=settings.engine.max_prompt_tokens, max_tokens=settings.engine.max_tokens,
                        default_max_tokens=settings.engine.default_max_tokens)
        app = CodecHttpApp(engine, info, limits).make_app()
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, settings.http.host, settings.http.port)
        await site.start()
        logger.info("serving %s on http://%s:%d (map %s)", engine.model_id, settings.http.host,
                    settings.http.port, info.map_id)
        stop = asyncio.Event()
        installed = install_stop_signals(stop)
        try:
            await stop.wait()
        finally:
            remove_stop_signals(installed)
            await runner.cleanup()
    return 0
