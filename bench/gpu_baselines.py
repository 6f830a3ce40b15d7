"""transformers' own generation paths, the baselines of ``bench/gpu_bench.py``.

* ``generate`` eager (dynamic cache) at batch 1;
* ``generate(cache_implementation="static")`` (transformers compiles the forward) at fixed batches;
* ``generate_batch`` (transformers' continuous batching), where the installed version has it.

Every run is greedy and makes exactly ``new_tokens`` per row, on the same kind of random prompts
as the CUDA engine's runs.
"""

from __future__ import annotations

import random
import time
from typing import Any


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(count)]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0


def bench_generate(model: Any, vocab: int, batch: int, *, static: bool, prompt_tokens: int, new_tokens: int,
                   device: str, repeats: int = 2) -> dict[str, Any]:
    """``model.generate`` at a fixed batch; the first call (compilation for static) is timed apart."""
    import torch

    ids = torch.tensor(prompts(batch, prompt_tokens, vocab, 11), device=device)
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}
    if static:
        kwargs["cache_implementation"] = "static"
    _peak_reset(device)
    first = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    _sync(device)
    warm = time.perf_counter() - first
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - start)
    assert out is not None
    produced = (out.shape[1] - ids.shape[1]) * batch
    best = min(times)
    return {"batch": batch, "static_compile": static, "new_tokens": new_tokens, "first_call_s": warm,
            "wall_s": best, "aggregate_tok_s": produced / best, "per_stream_tok_s": produced / batch / best,
            "peak_memory_gib": _peak_gib(device)}


def bench_generate_batch(model: Any, vocab: int, requests: int, *, prompt_tokens: int, new_tokens: int,
                         device: str) -> dict[str, Any]:
    """transformers' continuous batching (``generate_batch``) on the same kind of prompts."""
    import torch
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"skipped": "this transformers has no generate_batch"}
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    _peak_reset(device)
    start = time.perf_counter()
    # Not under inference_mode: its worker thread updates tensors created here in place.
    with torch.no_grad():
        outputs = model.generate_batch(inputs=prompts(requests, prompt_tokens, vocab, 13), generation_config=config)
    wall = time.perf_counter() - start
    produced = sum(len(getattr(output, "generated_tokens", None) or ()) for output in outputs.values())
    return {"requests": requests, "new_tokens": new_tokens, "wall_s": wall, "tokens": produced,
            "aggregate_tok_s": produced / wall, "peak_memory_gib": _peak_gib(device),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}
