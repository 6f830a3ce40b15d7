"""open_backend: the configured remote upstreams, or the configured model served by the right local engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from meshnode.generation.api import Backend
from meshnode.generation.engine import Engine
from meshnode.generation.local import LocalBackend
from meshnode.generation.modelinfo import ModelInfo
from meshnode.generation.placement import Placement, parse_max_memory
from meshnode.generation.remote.backend import RemoteBackend, RemoteSettings
from meshnode.generation.remote.tokenizer import LocalTokenizer
from meshnode.generation.remote.upstream import parse_upstream
from meshnode.generation.text import HFText
from meshnode.settings import EngineSettings, ModelSettings

__all__ = ["AUTO_MAX_CONCURRENT", "AUTO_MAX_CONCURRENT_CUDA", "open_backend", "open_remote", "resolve_max_concurrent"]

logger = logging.getLogger(__name__)

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


def build_engine(loaded: Any, engine: EngineSettings, *, progress: bool = True,
                 cache_dir: Path | None = None) -> Engine:
    """The engine for a loaded model: the slot engine where it supports the model (CUDA graphs on
    a GPU; fp16-packed weights on an x86 CPU), else the torch engine (MPS, other architectures, and
    a model that a device map spread over several devices: the slot cache and graphs assume one).

    ``cache_dir`` is meshnode's cache folder; the CUDA engine keeps torch.compile's artifacts in
    its ``compile`` subfolder (``engine.compile_cache``).
    """
    import torch  # noqa: PLC0415 - torch loads here

    from meshnode.generation.torch_backend import TorchEngine  # noqa: PLC0415

    limits: dict[str, Any] = {"max_queue": engine.max_queue, "max_prompt_tokens": engine.max_prompt_tokens,
                              "max_tokens_limit": engine.max_tokens, "max_batch_tokens": engine.max_batch_tokens}
    cuda = loaded.device.type == "cuda"
    if (cuda or loaded.device.type == "cpu") and loaded.device_map is None:
        from meshnode.generation.cuda.backend import CudaEngine  # noqa: PLC0415
        from meshnode.generation.cuda.decoder import fp16_packing_available, supports_model  # noqa: PLC0415

        fast_cpu = fp16_packing_available(loaded.device) and next(loaded.model.parameters()).dtype == torch.float32
        if supports_model(loaded.model) is None and (cuda or fast_cpu):
            # Its KV cache is preallocated per slot: admission is by free slot, not a token sum.
            limits.update(max_batch_tokens=0, progress=progress, context_tokens=engine.context_tokens,
                          prefill_budget_tokens=engine.prefill_budget_tokens or None, fp16_weights=not cuda,
                          max_concurrent=resolve_max_concurrent(engine.max_concurrent, cuda_engine=cuda))
            if cuda:  # the prefix store and compiled helpers are GPU features (off on the CPU path)
                limits.update(prefix_cache_bytes=engine.prefix_cache_mib << 20,
                              compile_cache=cache_dir / "compile" if engine.compile_cache and cache_dir else None)
            return CudaEngine.from_loaded(loaded, **limits)
    limits["max_concurrent"] = resolve_max_concurrent(engine.max_concurrent, cuda_engine=False)
    if engine.prefill_budget_tokens:
        limits["prefill_budget_tokens"] = engine.prefill_budget_tokens
    return TorchEngine.from_loaded(loaded, **limits)


def _load(model: ModelSettings, progress: bool) -> tuple[Any, Path]:
    """Load the configured model (worker thread); returns it and meshnode's cache folder."""
    from meshnode.generation.models import default_cache_dir, resolve_model  # noqa: PLC0415 - torch loads here

    cache_dir = Path(model.cache_dir).expanduser() if model.cache_dir else default_cache_dir()
    placement = Placement(device_map=model.device_map, max_memory=parse_max_memory(model.max_memory)
                          ) if model.device_map else None
    loaded = resolve_model(model.model, cache_dir=cache_dir, device=model.device, dtype=model.dtype, progress=progress,
                           placement=placement)
    return loaded, cache_dir


@contextlib.asynccontextmanager
async def open_backend(model: ModelSettings, engine: EngineSettings, *, progress: bool = True
                       ) -> AsyncIterator[Backend]:
    """Serve the configured remote upstreams (engine.upstreams; no local model is loaded then), or
    load the configured model (converting the embedded one on first use) and serve it."""
    if engine.upstreams:
        async with open_remote(engine) as remote:
            yield remote
        return
    loaded, cache_dir = await asyncio.to_thread(_load, model, progress)
    backend = LocalBackend(build_engine(loaded, engine, progress=progress, cache_dir=cache_dir),
                           HFText(loaded.tokenizer, loaded.model_id),
                           ModelInfo(model_id=loaded.model_id, tokenizer=loaded.tokenizer))
    try:
        yield backend
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def open_remote(engine: EngineSettings) -> AsyncIterator[RemoteBackend]:
    """The remote backend for engine.upstreams (and engine.tokenizer), opened and closed."""
    specs = [parse_upstream(url) for url in engine.upstreams]
    tokenizer = await asyncio.to_thread(LocalTokenizer, engine.tokenizer) if engine.tokenizer else None
    settings = RemoteSettings(timeout_seconds=engine.upstream_timeout_seconds, max_queue=engine.max_queue,
                              default_limit=engine.max_concurrent or AUTO_MAX_CONCURRENT)
    async with RemoteBackend(specs, tokenizer=tokenizer, settings=settings) as backend:
        yield backend
