"""Benchmark: continuous-batching engine vs sequential ``model.generate`` on the embedded model.

For each concurrency level C, the same C chat prompts are run

* through :class:`meshnode.generation.engine.TorchEngine` as C concurrent streams, and
* one after another through ``model.generate`` (greedy, KV cache),

both producing exactly ``--max-tokens`` tokens per prompt (EOS disabled, so the work is equal).
Aggregate tokens per second, time to first token and token agreement with the sequential run are
written as JSON together with the command that made them.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_bench.py            # 1/4/8/16 streams, bf16
    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_bench.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meshnode.generation.api import SamplingParams
from meshnode.generation.models import LoadedModel, cpu_has_native_bf16, resolve_model
from meshnode.generation.torch_backend import TorchEngine

QUESTIONS = [
    "Explain entropy in one sentence.",
    "What is a peer-to-peer network?",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Give three tips for writing clean Python code.",
    "What does a compiler do?",
    "Describe the water cycle briefly.",
    "How do vaccines work?",
    "What is the difference between TCP and UDP?",
    "Summarise the plot of Romeo and Juliet.",
    "What is a neural network?",
    "Name some uses of the Fourier transform.",
    "How does a refrigerator keep food cold?",
    "What is WebRTC used for?",
    "Explain recursion to a child.",
    "What causes the seasons on Earth?",
]


def _prompts(loaded: LoadedModel, count: int) -> list[list[int]]:
    """Chat-templated prompt ids for the first ``count`` questions (cycled)."""
    prompts = []
    for index in range(count):
        messages = [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]
        ids = loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        prompts.append([int(i) for i in ids])
    return prompts


class _FirstTokenTimer:
    """A ``generate`` streamer that notes when the first new token arrives (the 2nd ``put``)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self._puts = 0

    def put(self, value: Any) -> None:
        self._puts += 1
        if self._puts == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _sequential(loaded: LoadedModel, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Run ``model.generate`` on each prompt in turn."""
    outputs: list[list[int]] = []
    ttfts: list[float] = []
    # An empty EOS list makes generate run to max_new_tokens, exactly like the engine with no EOS.
    no_eos: dict[str, Any] = {"eos_token_id": [], "pad_token_id": 0}
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            inputs = torch.tensor([prompt], device=loaded.device)
            timer = _FirstTokenTimer()
            out = loaded.model.generate(
                inputs, max_new_tokens=max_tokens, do_sample=False, streamer=timer, **no_eos
            )
            if timer.first_token_at is not None:
                ttfts.append(timer.first_token_at - timer.started)
            outputs.append(out[0, len(prompt) :].tolist())
    elapsed = time.perf_counter() - started
    tokens = sum(len(o) for o in outputs)
    return {
        "seconds": round(elapsed, 3),
        "tokens": tokens,
        "tok_per_s": round(tokens / elapsed, 2),
        "ttft_median_s": round(statistics.median(ttfts), 4) if ttfts else None,
        "outputs": outputs,
    }


async def _engine_run(
    engine: TorchEngine, prompts: list[list[int]], max_tokens: int
) -> dict[str, Any]:
    """Submit every prompt at once and consume all streams concurrently."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    steps_before = engine.steps
    started = time.perf_counter()
    streams = [engine.generate(p, params) for p in prompts]
    outputs = await asyncio.gather(*(s.collect() for s in streams))
    elapsed = time.perf_counter() - started
    tokens = sum(len(o) for o in outputs)
    ttfts = [s.ttft_seconds for s in streams if s.ttft_seconds is not None]
    return {
        "seconds": round(elapsed, 3),
        "tokens": tokens,
        "tok_per_s": round(tokens / elapsed, 2),
        "ttft_median_s": round(statistics.median(ttfts), 4),
        "ttft_max_s": round(max(ttfts), 4),
        "decode_steps": engine.steps - steps_before,
        "finish_reasons": sorted({str(s.finish_reason) for s in streams}),
        "outputs": outputs,
    }


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two sets of outputs agree (prefix up to first divergence)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += len(x)
        for p, q in zip(x, y, strict=False):
            if p != q:
                break
            same += 1
    return round(same / total, 4) if total else 1.0


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    loaded = resolve_model(None, cache_dir=args.cache_dir, device="cpu", dtype=args.dtype)
    levels = [int(x) for x in args.concurrency.split(",")]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=2 * len(levels) + 1, desc="engine_bench", unit="run")
    async with TorchEngine(
        loaded.model,
        loaded.tokenizer,
        model_id=loaded.model_id,
        eos_ids=(),  # equal work: every stream generates exactly max_tokens
        max_concurrent=max(levels),
        max_queue=0,
        max_tokens_limit=max(args.max_tokens, 1),
    ) as engine:
        bar.set_postfix_str("warm-up")
        await _engine_run(engine, _prompts(loaded, 2), 8)
        _sequential(loaded, _prompts(loaded, 1), 8)
        bar.update(1)
        for level in levels:
            prompts = _prompts(loaded, level)
            bar.set_postfix_str(f"engine x{level}")
            eng = await _engine_run(engine, prompts, args.max_tokens)
            bar.update(1)
            bar.set_postfix_str(f"sequential x{level}")
            seq = await asyncio.to_thread(_sequential, loaded, prompts, args.max_tokens)
            bar.update(1)
            agreement = _agreement(seq.pop("outputs"), eng.pop("outputs"))
            results.append(
                {
                    "concurrency": level,
                    "engine": eng,
                    "sequential_generate": seq,
                    "speedup": round(eng["tok_per_s"] / seq["tok_per_s"], 2),
                    "token_agreement_with_sequential": agreement,
                }
            )
            tqdm.write(
                f"x{level:<3} engine {eng['tok_per_s']:7.1f} tok/s (ttft median "
                f"{eng['ttft_median_s']:.3f} s) | sequential generate {seq['tok_per_s']:6.1f} tok/s "
                f"| speedup {results[-1]['speedup']:.2f} | agreement {agreement:.3f}"
            )
    bar.close()
    return {
        "command": "HF_HUB_OFFLINE=1 " + " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu_native_bf16": cpu_has_native_bf16(),
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "model": loaded.model_id,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "max_tokens": args.max_tokens,
        "prompt_tokens": [len(p) for p in _prompts(loaded, max(levels))],
        "notes": (
            "Greedy; EOS disabled so every stream generates max_tokens. Engine: all streams "
            "submitted at once to TorchEngine (continuous batching, per-request prefill). "
            "Sequential: model.generate per prompt, one after another. The machine is shared, "
            "so absolute numbers vary with other load."
        ),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated stream counts")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per stream")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype")
    parser.add_argument("--cache-dir", default=None, help="converted-model cache (default: meshnode's)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON output (default bench/results/engine_cpu.json for bf16, engine_cpu_<dtype>.json else)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,4 streams, 16 tokens, no file")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens = "1,4", 16
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(_main(args))
    if args.output is None:
        suffix = "" if args.dtype in ("bfloat16", "bf16") else f"_{args.dtype}"
        args.output = ROOT / "bench" / "results" / f"engine_cpu{suffix}.json"
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
