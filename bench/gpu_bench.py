"""GPU benchmark: meshnode's CudaEngine against transformers' own paths, all in one run.

Runs on one CUDA GPU with random-initialised models built from configs written in
``bench/gpu_shapes.py`` (no network, no downloads): Qwen2.5-0.5B, Llama-3-8B and Qwen2.5-7B shapes.
Phase 1, for each model in turn:

* **ours**: ``CudaEngine`` with a KV cache of ``--context-tokens`` (4096) positions per stream and
  its default prefix store; 1 / 64 / 256 concurrent streams as one burst and as a Poisson process
  (arrival rate = streams / the burst's median stream time, so the mean concurrency is about the
  stream count; ``--poisson-factor`` x as many streams in total, so they keep joining and
  leaving). The steady figures count tokens and inter-token gaps between the N-th and the last
  arrival. 128-token prompts, 256 new tokens, greedy (the sampler runs in the graph whatever the
  settings; ``--sampled`` adds a sampled run);
* **prefix TTFT**: requests whose prompt is a 1024-token shared prefix + a 64-token own suffix,
  arriving one by one, with the prefix cached (after one warming request) and uncached (every
  prefix different), idle and beside 32 decoding streams;
* the engine's warm-up breakdown, its calibrated step and chunk times, a kernel profile of one
  decode step (``--profile``), and a second start in a fresh process (``--warm-start MODEL``: what
  a restart costs with torch.compile's artifacts kept).

Phase 2, for each model: the baselines of ``bench/gpu_baselines.py`` (generate static+compile at
fixed batches, generate eager b1; then, for each model again, generate_batch, the slowest). The roofline is every weight read once per step
at the measured device-to-device copy bandwidth. Results go to ``--out`` (rewritten after every
part, so a run cut short still leaves what it measured); each part is bounded by
``--budget-seconds`` (a part that would not finish in time is skipped and says so) and failures are
recorded, not raised.

    python3 bench/gpu_bench.py --models qwen0.5b --profile --warm-start qwen0.5b --out $OUT/gpu_part1.json
    python3 bench/gpu_bench.py --models llama3-8b,qwen2.5-7b --out $OUT/gpu_part2.json
    python3 bench/gpu_bench.py --device cpu --models tiny --quick --out /tmp/gpu_dry.json   # CPU dry run
    python3 bench/gpu_plot.py $OUT/gpu_part1.json $OUT/gpu_part2.json --png bench/results/gpu_bench.png

``bench/gpu_run.sh`` runs the two parts on the lent GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu_baselines
from bench.gpu_shapes import MODELS, build_model, measure_bandwidth, roofline, weight_bytes

PROMPT_TOKENS = 128
NEW_TOKENS = 256
PREFIX_TOKENS = 1024
SUFFIX_TOKENS = 64
BACKGROUND_STREAMS = 32
"""Streams decoding beside the prefix-TTFT requests in its loaded variant."""
WATCHDOG_GRACE_SECONDS = 30.0
"""How long past the budget a part may run before the process writes its results and exits."""
ESTIMATE_SECONDS = {
    # (small model, 7B/8B model) seconds: a part is skipped when it would end past the budget.
    "ours": (120, 130), "warm_start": (45, 70), "generate_static_compile_b1": (35, 50),
    "generate_static_compile_b64": (65, 80), "generate_static_compile_b256": (15, 60), "generate_eager_b1": (30, 25),
    "generate_batch_64": (40, 70), "generate_batch_256": (45, 90),
}

log = logging.getLogger("gpu_bench")


def _now() -> float:
    return time.perf_counter()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _ms(value: float | None) -> float | None:
    return None if value is None else 1000 * value


def make_prompts(count: int, vocab: int, seed: int, length: int = PROMPT_TOKENS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(count)]


# --------------------------------------------------------------------------------------------------
# The run's record: checkpoints, budget, guarded parts
# --------------------------------------------------------------------------------------------------


class Run:
    """The results dict, written after every part, and the time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = _now()
        self.result: dict[str, Any] = {}
        self.lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return _now() - self.t0

    def checkpoint(self) -> None:
        if not self.args.out:
            return
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            text = json.dumps(self.result, indent=1, default=str)
        path.with_suffix(".tmp").write_text(text)
        os.replace(path.with_suffix(".tmp"), path)

    def guarded(self, label: str, into: dict[str, Any], key: str, estimate: float, fn: Callable[[], Any]) -> Any:
        """Run one part unless it would end past the budget; record its result or its error."""
        elapsed = self.elapsed
        if elapsed + estimate > self.args.budget_seconds:
            into[key] = {"skipped": f"time budget: at {elapsed:.0f} s a part of ~{estimate:.0f} s would end past "
                                    f"{self.args.budget_seconds:.0f} s"}
            log.warning("skip %s (budget)", label)
            self.checkpoint()
            return None
        log.info("start %s (t=%.0f s)", label, elapsed)
        started = _now()
        try:
            into[key] = fn()
        except Exception as exc:
            into[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-4000:]}
            log.exception("%s failed", label)
        if isinstance(into.get(key), dict):
            into[key]["part_s"] = _now() - started
        self.checkpoint()
        return into[key]

    def start_watchdog(self) -> None:
        """Past budget + grace, write what was measured and exit (a part that hangs loses only itself)."""
        def watch() -> None:
            time.sleep(max(0.0, self.args.budget_seconds + WATCHDOG_GRACE_SECONDS - self.elapsed))
            self.result["aborted"] = f"watchdog: still running at {self.elapsed:.0f} s"
            try:
                self.checkpoint()
            finally:
                os._exit(3)

        threading.Thread(target=watch, name="gpu-bench-watchdog", daemon=True).start()


def _estimate(name: str, part: str) -> float:
    small, large = ESTIMATE_SECONDS.get(part, (60, 90))
    return small if MODELS[name]["hidden_size"] < 2048 else large


def _cuda_free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


# --------------------------------------------------------------------------------------------------
# Ours: stream runs
# --------------------------------------------------------------------------------------------------


async def stream_run(engine: Any, prompts: list[list[int]], arrivals: list[float], params: Any) -> dict[str, Any]:
    """Submit each prompt at its arrival offset; record every chunk's arrival and the running rows."""
    records: list[dict[str, Any]] = []
    load: list[tuple[float, int]] = []
    started = _now()
    done = asyncio.Event()

    async def sample_load() -> None:
        while not done.is_set():
            load.append((_now(), int(engine.load_info().get("active", 0))))
            await asyncio.sleep(0.01)

    async def one(ids: list[int], delay: float) -> None:
        await asyncio.sleep(max(0.0, started + delay - _now()))
        submit = _now()
        stream = engine.generate(ids, params)
        chunks: list[tuple[float, int]] = []
        async for chunk in stream:
            if chunk.ids:
                chunks.append((_now(), len(chunk.ids)))
        records.append({"submit": submit, "chunks": chunks, "finish": _now(), "reason": stream.finish_reason})

    sampler = asyncio.create_task(sample_load())
    try:
        await asyncio.gather(*(one(p, a) for p, a in zip(prompts, arrivals, strict=True)))
    finally:
        done.set()
        await sampler
    return {"started": started, "records": records, "ended": _now(), "load": load}


def _gaps(records: list[dict[str, Any]], window: tuple[float, float] | None = None) -> list[float]:
    """Per-token inter-token gaps (a chunk of n ids spreads its gap over n), optionally in a window."""
    gaps: list[float] = []
    for record in records:
        previous = None
        for t, n in record["chunks"]:
            if previous is not None and (window is None or window[0] <= t <= window[1]):
                gaps.extend([(t - previous) / n] * n)
            previous = t
    return gaps


def summarise(raw: dict[str, Any], concurrency: int, mode: str) -> dict[str, Any]:
    records = raw["records"]
    tokens = sum(n for r in records for _, n in r["chunks"])
    first_submit = min(r["submit"] for r in records)
    last_finish = max(r["finish"] for r in records)
    ttft = [r["chunks"][0][0] - r["submit"] for r in records if r["chunks"]]
    gaps = _gaps(records)
    per_stream = []
    for r in records:
        produced = sum(n for _, n in r["chunks"])
        span = r["chunks"][-1][0] - r["chunks"][0][0] if r["chunks"] else 0
        if produced > 1 and span > 0:
            per_stream.append((produced - r["chunks"][0][1]) / span)
    out: dict[str, Any] = {
        "mode": mode, "streams_target": concurrency, "streams_total": len(records), "tokens": tokens,
        "wall_s": last_finish - first_submit, "aggregate_tok_s": tokens / (last_finish - first_submit),
        "per_stream_tok_s_median": statistics.median(per_stream) if per_stream else None,
        "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p95_ms": _ms(_pct(ttft, 95)),
        "inter_token_p50_ms": _ms(_pct(gaps, 50)), "inter_token_p95_ms": _ms(_pct(gaps, 95)),
        "inter_token_p99_ms": _ms(_pct(gaps, 99)),
        "finish_reasons": sorted({str(r["reason"]) for r in records}),
    }
    if mode == "poisson" and len(records) > concurrency:
        submits = sorted(r["submit"] for r in records)
        lo, hi = submits[concurrency - 1], submits[-1]
        if hi - lo > 0.05:
            inside = sum(n for r in records for t, n in r["chunks"] if lo <= t <= hi)
            window_gaps = _gaps(records, (lo, hi))
            active = [a for t, a in raw["load"] if lo <= t <= hi]
            out.update({
                "steady_window_s": hi - lo, "steady_tok_s": inside / (hi - lo),
                "steady_inter_token_p50_ms": _ms(_pct(window_gaps, 50)),
                "steady_inter_token_p95_ms": _ms(_pct(window_gaps, 95)),
                "steady_mean_active": statistics.mean(active) if active else None,
            })
    return out


def poisson_arrivals(count: int, total: int, span: float, seed: int) -> list[float]:
    """``total`` arrival offsets of a Poisson process whose rate keeps about ``count`` streams running
    when each lasts ``span`` seconds (Little's law)."""
    rng = random.Random(seed)
    rate = count / max(span, 1e-3)
    clock, arrivals = 0.0, []
    for _ in range(total):
        arrivals.append(clock)
        clock += rng.expovariate(rate)
    return arrivals


async def prefix_ttft(engine: Any, vocab: int, *, requests: int, background: int, spacing: float) -> dict[str, Any]:
    """TTFT of 1k-shared-prefix requests arriving one by one: cached prefix against uncached ones."""
    from meshnode.generation.api import SamplingParams

    rng = random.Random(17 + background)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    shared = [rng.randrange(100, vocab) for _ in range(PREFIX_TOKENS)]

    def suffix() -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(SUFFIX_TOKENS)]

    side = [engine.generate(p, SamplingParams(temperature=0.0, max_tokens=2 * NEW_TOKENS))
            for p in make_prompts(background, vocab, 31)]
    for stream in side:
        await anext(stream)  # every background stream is decoding before the timed requests come

    async def timed(prompts: list[list[int]]) -> dict[str, Any]:
        before = dict(engine.load_info())
        ttfts: list[float] = []
        start = _now()

        async def one(ids: list[int], delay: float) -> None:
            await asyncio.sleep(max(0.0, start + delay - _now()))
            submit = _now()
            stream = engine.generate(ids, params)
            first = await anext(stream)
            assert first.ids or first.finish_reason
            ttfts.append(_now() - submit)
            await stream.collect()

        await asyncio.gather(*(one(p, i * spacing) for i, p in enumerate(prompts)))
        after = engine.load_info()
        return {"requests": len(prompts), "ttft_p50_ms": _ms(_pct(ttfts, 50)), "ttft_p95_ms": _ms(_pct(ttfts, 95)),
                "ttft_mean_ms": _ms(statistics.mean(ttfts)),
                "prefix_hits": after.get("prefix_hits", 0) - before.get("prefix_hits", 0),
                "prefix_tokens_reused": after.get("prefix_tokens_reused", 0) - before.get("prefix_tokens_reused", 0)}

    try:
        uncached = await timed([[rng.randrange(100, vocab) for _ in range(PREFIX_TOKENS)] + suffix()
                                for _ in range(requests)])
        await engine.generate(shared + suffix(), params).collect()  # warms the prefix (not timed)
        cached = await timed([shared + suffix() for _ in range(requests)])
    finally:
        for stream in side:
            stream.cancel()
        for stream in side:
            await stream.finished.wait()
    return {"prefix_tokens": PREFIX_TOKENS, "suffix_tokens": SUFFIX_TOKENS, "background_streams": background,
            "spacing_ms": 1000 * spacing, "uncached": uncached, "cached": cached}


def profile_decode(engine: Any, batches: list[int]) -> dict[str, Any]:
    """Kernel time of one decode step per batch bucket (L = 512): replayed graph and eager body."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from meshnode.generation.cuda.slots import bucket

    graphs = engine.batch.graphs
    length = bucket(graphs.length_buckets, min(512, graphs.length_buckets[-1]))
    out: dict[str, Any] = {"length": length}
    for wanted in batches:
        batch = bucket(graphs.batch_buckets, min(wanted, graphs.batch_buckets[-1]))
        entry: dict[str, Any] = {}
        for label, step in (("graph", lambda b=batch: graphs.graphs[(b, length)].replay()),
                            ("eager", lambda b=batch: graphs.step_body(b, length))):
            with torch.inference_mode():
                step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
            kernels = []
            for item in prof.key_averages():
                own = getattr(item, "self_device_time_total", None) or getattr(item, "self_cuda_time_total", 0)
                if own > 0:
                    kernels.append((own / 5, item.count // 5, item.key))
            kernels.sort(reverse=True)
            entry[label] = {"step_us": sum(k[0] for k in kernels), "kernels_per_step": sum(k[1] for k in kernels),
                            "top": [{"us": round(us, 1), "count": n, "name": name[:120]} for us, n, name in kernels[:25]]}
        out[str(batch)] = entry
    return out


async def bench_ours(model: Any, name: str, run: Run) -> dict[str, Any]:
    import torch

    from meshnode.generation.api import SamplingParams
    from meshnode.generation.cuda.backend import CudaEngine

    args = run.args
    vocab = MODELS[name]["vocab_size"]
    counts = [int(c) for c in args.streams.split(",")]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    built = _now()
    engine = CudaEngine(model, None, model_id=name, eos_ids=(), max_concurrent=max(counts),
                        max_queue=8 * max(counts) + 64, max_prompt_tokens=args.max_prompt_tokens,
                        max_tokens_limit=args.max_tokens_limit, context_tokens=args.context_tokens,
                        progress=args.device == "cuda", use_compile=not args.no_compile,
                        prefix_cache_bytes=None if args.prefix_cache_mib < 0 else args.prefix_cache_mib << 20,
                        compile_cache=Path(args.compile_cache) / "compile" if args.compile_cache else None)
    batch = engine.batch
    result: dict[str, Any] = {"slots": engine.max_concurrent, "max_len": engine.max_len,
                              "kv_cache_gib": engine.kv_cache_bytes / 2**30,
                              "prefix_store_gib": batch.plan.prefix_bytes / 2**30, "runs": []}
    run.result["models"][name]["ours"] = result  # visible in checkpoints while it runs
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    async with engine:
        result["warmup_s"] = await engine.wait_ready()
        result.update({
            "warmup_breakdown": dict(engine.warmup_breakdown), "ready_after_s": _now() - built,
            "compiled": batch.use_compile, "graphs": len(batch.graphs.graphs),
            "prefill_graphs": len(batch.graphs.prefill_graphs), "cached_prefill_graphs": len(batch.graphs.cached_graphs),
            "graph_step_ms": {str(k): v for k, v in batch.graphs.step_ms.items()},
            "prefill_chunk_ms": {str(k): v for k, v in batch.graphs.prefill_ms.items()},
            "prefill_budget_by_batch": {str(k): v for k, v in batch.prefiller.budgets.items()},
            "memory_after_warmup_gib": torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0,
        })
        run.checkpoint()
        await stream_run(engine, make_prompts(4, vocab, 99), [0.0] * 4, SamplingParams(temperature=0.0, max_tokens=8))
        for count in counts:
            for mode in args.modes.split(","):
                if run.elapsed > args.budget_seconds:
                    result["runs"].append({"mode": mode, "streams_target": count, "skipped": "time budget"})
                    continue
                steps_before = batch.steps
                if mode == "burst":
                    raw = await stream_run(engine, make_prompts(count, vocab, count), [0.0] * count, greedy)
                else:
                    span = result.get("burst_span_s", {}).get(str(count))
                    if span is None:
                        continue  # the rate comes from the burst run of the same count
                    total = max(8, args.poisson_factor * count)
                    if count > 64:
                        total = min(total, 3 * count)  # keeps the 256-stream run within a few seconds
                    arrivals = poisson_arrivals(count, total, span, 1000 + count)
                    raw = await stream_run(engine, make_prompts(total, vocab, 7 * count), arrivals, greedy)
                summary = summarise(raw, count, mode)
                summary["decode_steps"] = batch.steps - steps_before
                if mode == "burst":
                    result.setdefault("burst_span_s", {})[str(count)] = statistics.median(
                        r["finish"] - r["submit"] for r in raw["records"])
                result["runs"].append(summary)
                log.info("ours %s %s x%d: %.0f tok/s (steady %s), ttft p50 %.1f ms, itl p50/p95 %.2f/%.2f ms", name,
                         mode, count, summary["aggregate_tok_s"], summary.get("steady_tok_s"), summary["ttft_p50_ms"],
                         summary["inter_token_p50_ms"] or 0, summary["inter_token_p95_ms"] or 0)
                run.checkpoint()
        if not args.no_prefix and run.elapsed < args.budget_seconds:
            prefix: dict[str, Any] = {}
            result["prefix_ttft"] = prefix
            for background in (0, BACKGROUND_STREAMS):
                try:
                    prefix["idle" if background == 0 else "loaded"] = await prefix_ttft(
                        engine, vocab, requests=args.prefix_requests, background=background, spacing=0.04)
                except Exception as exc:
                    prefix["idle" if background == 0 else "loaded"] = {"error": f"{type(exc).__name__}: {exc}",
                                                                       "trace": traceback.format_exc()[-3000:]}
                run.checkpoint()
            idle = prefix.get("idle", {})
            if "cached" in idle:  # the headline pair, for the table and the plot
                prefix["cached"], prefix["uncached"] = idle["cached"], idle["uncached"]
        if args.sampled and 64 in counts and run.elapsed < args.budget_seconds:
            sampled = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=NEW_TOKENS, seed=1)
            raw = await stream_run(engine, make_prompts(64, vocab, 5), [0.0] * 64, sampled)
            summary = summarise(raw, 64, "burst-sampled")
            summary.update(sampling="temperature 0.8, top_p 0.95, top_k 50", overflow_rows=engine.overflow_rows)
            result["runs"].append(summary)
        if args.profile and args.device == "cuda" and run.elapsed < args.budget_seconds:
            try:
                result["profile"] = profile_decode(engine, [1, 64])
            except Exception as exc:
                result["profile"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        result["load_info"] = engine.load_info()
    result["peak_memory_gib"] = _peak_gib()
    del engine, batch
    _cuda_free()
    return result


# --------------------------------------------------------------------------------------------------
# A second start in a fresh process
# --------------------------------------------------------------------------------------------------


def warm_start(name: str, run: Run, slots: int) -> dict[str, Any]:
    """Time building and warming an engine in a new process, with the compile cache the first left."""
    args = run.args
    command = [sys.executable, str(Path(__file__).resolve()), "--warm-start-probe", "--models", name,
               "--device", args.device, "--probe-slots", str(slots), "--context-tokens", str(args.context_tokens),
               "--max-prompt-tokens", str(args.max_prompt_tokens), "--max-tokens-limit", str(args.max_tokens_limit),
               "--compile-cache", args.compile_cache or ""]
    timeout = max(30.0, min(180.0, args.budget_seconds - run.elapsed))
    started = _now()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"probe exited {done.returncode}", "stderr": done.stderr[-3000:]}
    return {**json.loads(lines[-1]), "process_s": _now() - started}


def warm_start_probe(args: argparse.Namespace) -> int:
    """The child of :func:`warm_start`: build, warm up, print one JSON line."""
    import torch

    from meshnode.generation.cuda.backend import CudaEngine

    name = args.models.split(",")[0]
    started = _now()
    model = build_model(name, args.device)
    built = _now() - started
    engine = CudaEngine(model, None, model_id=name, max_concurrent=args.probe_slots,
                        max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                        context_tokens=args.context_tokens,
                        compile_cache=Path(args.compile_cache) / "compile" if args.compile_cache else None)
    scope = torch.cuda.device(engine.device) if engine.device.type == "cuda" else None
    with torch.inference_mode():
        if scope is not None:
            with scope:
                warm = engine.warm_up()
        else:
            warm = engine.warm_up()
    print(json.dumps({"build_model_s": built, "warmup_s": warm, "warmup_breakdown": engine.warmup_breakdown,
                      "slots": engine.max_concurrent, "graphs": len(engine.batch.graphs.graphs)}))
    return 0


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_ours(name: str, run: Run) -> None:
    part: dict[str, Any] = run.result["models"].setdefault(name, {"shape": MODELS[name]})
    model = build_model(name, run.args.device)
    part["weight_bytes"] = weight_bytes(model)
    part["roofline"] = roofline(part["weight_bytes"], run.result["hbm_copy_bytes_per_s"])
    run.checkpoint()
    if not run.args.skip_ours:
        run.guarded(f"{name} ours", part, "ours", _estimate(name, "ours"),
                    lambda: asyncio.run(bench_ours(model, name, run)))
    model = None  # free the weights before the next shape
    _cuda_free()


def run_baselines(name: str, run: Run, *, primary: bool) -> None:
    """transformers' paths for one model: the primary pass runs the fixed-batch ones (static+compile,
    eager) and the warm start; the secondary pass runs generate_batch (slow, so it goes last)."""
    args = run.args
    part = run.result["models"].setdefault(name, {"shape": MODELS[name]})
    baselines: dict[str, Any] = part.setdefault("baselines", {})
    ours = part.get("ours", {})
    if primary and name in args.warm_start.split(",") and isinstance(ours, dict) and "slots" in ours:
        run.guarded(f"{name} warm start", ours, "warm_start", _estimate(name, "warm_start"),
                    lambda: warm_start(name, run, int(ours["slots"])))
    vocab = MODELS[name]["vocab_size"]
    wanted: list[tuple[str, Callable[[Any], dict[str, Any]]]] = []
    if primary:
        for batch in [int(b) for b in args.static_batches.split(",") if b]:
            wanted.append((f"generate_static_compile_b{batch}", lambda m, b=batch: gpu_baselines.bench_generate(
                m, vocab, b, static=True, prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, device=args.device)))
        if args.eager:
            wanted.append(("generate_eager_b1", lambda m: gpu_baselines.bench_generate(
                m, vocab, 1, static=False, prompt_tokens=PROMPT_TOKENS, new_tokens=args.eager_tokens,
                device=args.device, repeats=1)))
    else:
        for requests in [int(r) for r in args.batch_requests.split(",") if r]:
            wanted.append((f"generate_batch_{requests}", lambda m, r=requests: gpu_baselines.bench_generate_batch(
                m, vocab, r, prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, device=args.device)))
    # Build the model only when the first of these parts still fits the budget.
    if not wanted or run.elapsed + _estimate(name, wanted[0][0]) > args.budget_seconds:
        for key, _ in wanted:
            baselines.setdefault(key, {"skipped": f"time budget at {run.elapsed:.0f} s"})
        run.checkpoint()
        return
    model = build_model(name, args.device)
    for key, fn in wanted:
        run.guarded(f"{name} {key}", baselines, key, _estimate(name, key), lambda fn=fn: fn(model))
        _cuda_free()
    model = None
    _cuda_free()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen0.5b", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--modes", default="burst,poisson")
    parser.add_argument("--poisson-factor", type=int, default=4, help="Poisson streams per target stream")
    parser.add_argument("--context-tokens", type=int, default=4096, help="KV positions per stream")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens-limit", type=int, default=1024)
    parser.add_argument("--compile-cache", default="/tmp/meshnode-gpu-bench",
                        help="cache folder (its compile/ subfolder keeps torch.compile's artifacts); '' = none")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--no-prefix", action="store_true", help="skip the shared-prefix TTFT part")
    parser.add_argument("--prefix-requests", type=int, default=24)
    parser.add_argument("--prefix-cache-mib", type=int, default=-1,
                        help="the engine's prefix store; -1 = its default (8 GiB on CUDA; 64 MiB on a CPU dry run)")
    parser.add_argument("--warm-start", default="", help="models (comma-separated) whose second start is timed "
                        "in a fresh process, with the compile cache the first start left")
    parser.add_argument("--profile", action="store_true", help="kernel profile of one decode step (b1, b64)")
    parser.add_argument("--sampled", action="store_true", help="one extra 64-stream run with sampling")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="generate eager batch-1 baseline")
    parser.add_argument("--eager-tokens", type=int, default=64)
    parser.add_argument("--static-batches", default="1,64,256", help="generate static+compile batches")
    parser.add_argument("--batch-requests", default="64,256", help="generate_batch request counts")
    parser.add_argument("--budget-seconds", type=float, default=480.0,
                        help="parts that would end after this are skipped; the run stops soon after it")
    parser.add_argument("--quick", action="store_true", help="a short run: 1 and 64 streams, fewer requests and "
                        "baselines (also what a CPU dry run uses)")
    parser.add_argument("--out", default="")
    parser.add_argument("--png", default="", help="also draw this PNG from --out at the end")
    parser.add_argument("--invoked-by", default="", help="recorded with the command (e.g. bash bench/gpu_run.sh 1)")
    parser.add_argument("--device", default="cuda", help="cpu = dry run of this script (--models tiny)")
    parser.add_argument("--warm-start-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-slots", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.streams = "1,64" if args.streams == "1,64,256" else args.streams
        args.poisson_factor = 2
        args.prefix_requests = 8
        args.static_batches = "1" if args.static_batches == "1,64,256" else args.static_batches
        args.batch_requests = "" if args.batch_requests == "64,256" else args.batch_requests
        args.eager_tokens = 16
    if args.device == "cpu" and args.prefix_cache_mib < 0:
        args.prefix_cache_mib = 64  # the engine keeps no prefix store on a CPU unless asked
    if args.no_baselines:
        args.static_batches, args.batch_requests, args.eager = "", "", False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.warm_start_probe:
        return warm_start_probe(args)
    import torch
    import transformers

    if args.device == "cpu":
        torch.set_num_threads(1)  # a dry run on a shared machine: avoid OpenMP stalls
    torch.backends.cuda.matmul.allow_tf32 = True
    run = Run(args)
    run.start_watchdog()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    run.result.update({
        "command": "python3 " + " ".join(sys.argv), "invoked_by": args.invoked_by,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "context_tokens": args.context_tokens,
        "budget_seconds": args.budget_seconds, "models": {},
    })
    run.result["hbm_copy_bytes_per_s"] = measure_bandwidth(args.device)
    run.checkpoint()
    names = args.models.split(",")
    for name in names:
        run_ours(name, run)
    for primary in (True, False):
        for name in names:
            run_baselines(name, run, primary=primary)
    run.result["total_s"] = run.elapsed
    run.result["acceptance"] = acceptance(run.result)
    run.checkpoint()
    print_table(run.result)
    print("\n== issue 17 acceptance figures")
    for name, entry in run.result["acceptance"].items():
        print(f"   {name}: {_round(entry)}")
    if args.png and args.out:
        from bench.gpu_plot import plot

        try:
            plot([args.out], args.png)
        except Exception:
            log.exception("plot failed")
    return 0


def acceptance(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 17's acceptance figures, read off the results (None where a part did not run)."""
    out: dict[str, Any] = {}
    for name, part in result.get("models", {}).items():
        ours, roof = part.get("ours", {}), part.get("roofline", {}).get("batch1_tok_s")
        runs = {(r.get("mode"), r.get("streams_target")): r for r in ours.get("runs", []) if "aggregate_tok_s" in r}
        b1, p64, b64, p256 = (runs.get(("burst", 1)), runs.get(("poisson", 64)), runs.get(("burst", 64)),
                              runs.get(("poisson", 256)))
        entry: dict[str, Any] = {
            "b1_share_of_roofline": b1["aggregate_tok_s"] / roof if b1 and roof else None,
            "burst64_tok_s": b64["aggregate_tok_s"] if b64 else None,
            "steady64_tok_s": p64.get("steady_tok_s") if p64 else None,
            "steady64_itl_p95_over_p50": (p64["steady_inter_token_p95_ms"] / p64["steady_inter_token_p50_ms"]
                                          if p64 and p64.get("steady_inter_token_p50_ms") else None),
            "steady256_tok_s": p256.get("steady_tok_s") if p256 else None,
        }
        prefix = ours.get("prefix_ttft") or {}
        if "cached" in prefix:
            entry["prefix1k_ttft_p50_ms_cached"] = prefix["cached"]["ttft_p50_ms"]
            entry["prefix1k_ttft_p50_ms_uncached"] = prefix["uncached"]["ttft_p50_ms"]
        warm = ours.get("warm_start") or {}
        if "warmup_breakdown" in warm:
            entry["warm_start_capture_s"] = sum(v for k, v in warm["warmup_breakdown"].items() if k.startswith("capture"))
            entry["warm_start_warmup_s"] = warm.get("warmup_s")
        out[name] = entry
    return out


def print_table(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(f"\n== {machine['gpu']}  torch {machine['torch']}  transformers {machine['transformers']}  "
          f"copy {result['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s  ({result.get('total_s', 0):.0f} s)")
    for name, part in result["models"].items():
        roof = part.get("roofline", {})
        print(f"-- {name}: weights {part.get('weight_bytes', 0) / 1e9:.2f} GB, roofline b1 "
              f"{roof.get('batch1_tok_s', 0):.0f} tok/s")
        ours = part.get("ours", {})
        if "runs" in ours:
            print(f"   ours: warm-up {ours.get('warmup_s') or 0:.1f} s {_round(ours.get('warmup_breakdown'))}; 2nd start "
                  f"{_round(ours.get('warm_start'))}; {ours.get('graphs')}+{ours.get('prefill_graphs')}+"
                  f"{ours.get('cached_prefill_graphs')} graphs, {ours.get('slots')} slots x {ours.get('max_len')}, KV "
                  f"{ours.get('kv_cache_gib', 0):.1f} GiB + prefix {ours.get('prefix_store_gib', 0):.1f} GiB, peak "
                  f"{ours.get('peak_memory_gib', 0):.1f} GiB")
            print(f"   step ms {_round(ours.get('graph_step_ms'))}  chunk budget {ours.get('prefill_budget_by_batch')}")
            for run in ours["runs"]:
                if "aggregate_tok_s" not in run:
                    print(f"   {run}")
                    continue
                b1 = f" ({100 * run['aggregate_tok_s'] / roof['batch1_tok_s']:.0f}% roof)" if (
                    run["streams_target"] == 1 and run["mode"] == "burst" and roof.get("batch1_tok_s")) else ""
                steady = (f" steady {run['steady_tok_s']:.0f} (itl p50/p95 {run['steady_inter_token_p50_ms']:.2f}/"
                          f"{run['steady_inter_token_p95_ms']:.2f}, rows {run.get('steady_mean_active') or 0:.0f})"
                          if "steady_tok_s" in run else "")
                print(f"   {run['mode']:>13} x{run['streams_target']:<4} {run['aggregate_tok_s']:8.0f} tok/s{b1}{steady}"
                      f"  ttft p50/p95 {run['ttft_p50_ms'] or 0:.1f}/{run['ttft_p95_ms'] or 0:.1f}"
                      f"  itl p50/p95 {run['inter_token_p50_ms'] or 0:.2f}/{run['inter_token_p95_ms'] or 0:.2f} ms")
            for label, entry in (ours.get("prefix_ttft") or {}).items():
                if label in ("idle", "loaded") and isinstance(entry, dict) and "cached" in entry:
                    print(f"   prefix 1k {label:>6}: TTFT p50 cached {entry['cached']['ttft_p50_ms']:.1f} ms vs uncached "
                          f"{entry['uncached']['ttft_p50_ms']:.1f} ms (hits {entry['cached']['prefix_hits']})")
                elif label in ("idle", "loaded"):
                    print(f"   prefix 1k {label}: {str(entry)[:300]}")
        elif ours:
            print(f"   ours: {str(ours)[:600]}")
        for key, value in part.get("baselines", {}).items():
            if "aggregate_tok_s" in value:
                print(f"   {key:>30}: {value['aggregate_tok_s']:9.0f} tok/s (first call {value.get('first_call_s', 0):.1f} s)")
            else:
                print(f"   {key:>30}: {str(value)[:300]}")


def _round(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items() if k not in ("stderr",)}
    return round(value, 2) if isinstance(value, float) else value


if __name__ == "__main__":
    raise SystemExit(main())
