"""GPU benchmark: :class:`meshnode.generation.cuda.engine.CudaEngine` against transformers' own paths.

Runs on one CUDA GPU with random-initialised models built from configs written here (no network,
no downloads): SmolLM2-135M shape, Qwen2.5-0.5B shape, optionally Qwen2.5-7B shape. For each model,
in one process:

* **ours**: ``CudaEngine`` with 1, 8, 64, 256 concurrent streams, arriving as one burst and as a
  Poisson process (mean concurrency = the stream count, twice as many streams in total, so
  streams keep joining and leaving); 128-token prompts, 256 new tokens, greedy (the sampler runs
  in the graph whatever the settings; one extra run samples with temperature/top-p/top-k);
* **generate eager**: ``model.generate`` at batch 1 (dynamic cache);
* **generate static+compile**: ``model.generate(cache_implementation="static")`` (transformers
  compiles the forward) at fixed batch sizes;
* **generate_batch**: transformers' continuous batching with the same prompts;
* **roofline**: weight bytes / measured HBM bandwidth (a device-to-device copy).

Metrics: aggregate decode tok/s (overall and, for Poisson, in the steady window between the N-th
and the last arrival), per-stream tok/s, TTFT p50/p95 (consumer side, from submit to the first
chunk), inter-token p95, GPU memory, warm-up time. Results go to a JSON file (rewritten after each
part, so a run cut short still leaves what it measured); ``--plot`` draws the PNG from JSON files.

    python3 bench/gpu_bench.py --models qwen0.5b --out bench/results/gpu_qwen05b.json
    python3 bench/gpu_bench.py --plot bench/results/gpu_*.json --png bench/results/gpu_bench.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "family": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "qwen0.5b": {
        "family": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "qwen7b": {
        "family": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
}
MODELS["tiny"] = {  # for a CPU dry run of this script (--device cpu --models tiny)
    "family": "llama", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
PROMPT_TOKENS = 128
NEW_TOKENS = 256
DEVICE = "cuda"

log = logging.getLogger("gpu_bench")


def _now() -> float:
    return time.perf_counter()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def build_model(name: str, seed: int = 0) -> Any:
    """A random-initialised bf16 model of the named shape, built directly on the GPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(MODELS[name])
    family = spec.pop("family")
    theta = spec.pop("rope_theta")
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    try:
        config = config_cls(**spec, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        config = config_cls(**spec, rope_theta=theta)
    config.eos_token_id = None
    config.bos_token_id = None
    config.pad_token_id = 0
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    return total


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 20."""
    import torch

    if DEVICE != "cuda":
        return 50e9
    source = torch.randn(512 * 2**20, device="cuda", dtype=torch.float32)  # 2 GiB
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del source, target
    _cuda().empty_cache()
    return 2 * 512 * 2**20 * 4 / statistics.median(times)


def make_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


# --------------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------------


async def _stream_run(engine: Any, prompts: list[list[int]], arrivals: list[float], params: Any) -> dict[str, Any]:
    """Submit each prompt at its arrival offset; record per-chunk arrival times."""
    loop = asyncio.get_running_loop()
    records: list[dict[str, Any]] = []
    started = _now()

    async def one(ids: list[int], delay: float) -> None:
        await asyncio.sleep(max(0.0, started + delay - _now()))
        submit = _now()
        stream = engine.generate(ids, params)
        chunks: list[tuple[float, int]] = []
        async for chunk in stream:
            if chunk.ids:
                chunks.append((_now(), len(chunk.ids)))
        records.append({"submit": submit, "chunks": chunks, "finish": _now(), "reason": stream.finish_reason})

    del loop
    await asyncio.gather(*(one(p, a) for p, a in zip(prompts, arrivals, strict=True)))
    return {"started": started, "records": records, "ended": _now()}


def _summarise(raw: dict[str, Any], concurrency: int, mode: str) -> dict[str, Any]:
    records = raw["records"]
    tokens = sum(n for r in records for _, n in r["chunks"])
    first_submit = min(r["submit"] for r in records)
    last_finish = max(r["finish"] for r in records)
    ttft = [r["chunks"][0][0] - r["submit"] for r in records if r["chunks"]]
    gaps: list[float] = []
    per_stream: list[float] = []
    for r in records:
        previous = None
        for t, n in r["chunks"]:
            if previous is not None:
                gaps.extend([(t - previous) / n] * n)
            previous = t
        produced = sum(n for _, n in r["chunks"])
        span = r["chunks"][-1][0] - r["chunks"][0][0] if r["chunks"] else 0
        if produced > 1 and span > 0:
            per_stream.append((produced - r["chunks"][0][1]) / span)
    out: dict[str, Any] = {
        "mode": mode,
        "streams_target": concurrency,
        "streams_total": len(records),
        "tokens": tokens,
        "wall_s": last_finish - first_submit,
        "aggregate_tok_s": tokens / (last_finish - first_submit),
        "per_stream_tok_s_median": statistics.median(per_stream) if per_stream else None,
        "ttft_p50_ms": 1000 * (_pct(ttft, 50) or 0),
        "ttft_p95_ms": 1000 * (_pct(ttft, 95) or 0),
        "inter_token_p50_ms": 1000 * (_pct(gaps, 50) or 0),
        "inter_token_p95_ms": 1000 * (_pct(gaps, 95) or 0),
        "finish_reasons": sorted({str(r["reason"]) for r in records}),
    }
    if mode == "poisson" and len(records) > concurrency:
        submits = sorted(r["submit"] for r in records)
        lo, hi = submits[concurrency - 1], submits[-1]
        if hi - lo > 0.05:
            inside = sum(n for r in records for t, n in r["chunks"] if lo <= t <= hi)
            out["steady_window_s"] = hi - lo
            out["steady_tok_s"] = inside / (hi - lo)
    return out


async def bench_ours(model: Any, name: str, counts: list[int], modes: list[str], args: argparse.Namespace) -> dict[str, Any]:

    from meshnode.generation.api import SamplingParams
    from meshnode.generation.cuda.backend import CudaEngine

    vocab = MODELS[name]["vocab_size"]
    _cuda().reset_peak_memory_stats()
    built = _now()
    engine = CudaEngine(
        model,
        None,
        model_id=name,
        eos_ids=(),
        max_concurrent=max(counts),
        max_queue=8 * max(counts) + 64,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        progress=True,
        use_compile=not args.no_compile,
    )
    result: dict[str, Any] = {
        "slots": engine.max_concurrent,
        "max_len": engine.max_len,
        "kv_cache_gib": engine.kv_cache_bytes / 2**30,
        "runs": [],
    }
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    async with engine:
        warm = await engine.wait_ready()
        result["warmup_s"] = warm
        result["warmup_breakdown"] = dict(engine.warmup_breakdown)
        result["ready_after_s"] = _now() - built
        result["compiled"] = engine.use_compile
        result["graphs"] = len(engine._graphs)
        result["prefill_graphs"] = len(engine._prefill_graphs)
        result["memory_after_warmup_gib"] = _cuda().memory_allocated() / 2**30
        # A short run so first-use costs stay out of the numbers.
        await _stream_run(engine, make_prompts(4, vocab, 99), [0.0] * 4, SamplingParams(temperature=0.0, max_tokens=8))
        durations: dict[int, float] = {}
        for count in counts:
            for mode in modes:
                if mode == "poisson" and count not in durations:
                    continue
                steps_before = engine.steps
                if mode == "burst":
                    prompts = make_prompts(count, vocab, count)
                    arrivals = [0.0] * count
                else:
                    total = max(2 * count, 8)
                    rate = count / durations[count]
                    rng = random.Random(1000 + count)
                    clock, arrivals = 0.0, []
                    for _ in range(total):
                        arrivals.append(clock)
                        clock += rng.expovariate(rate)
                    prompts = make_prompts(total, vocab, 7 * count)
                raw = await _stream_run(engine, prompts, arrivals, greedy)
                summary = _summarise(raw, count, mode)
                summary["decode_steps"] = engine.steps - steps_before
                if mode == "burst":
                    spans = [r["finish"] - r["submit"] for r in raw["records"]]
                    durations[count] = statistics.median(spans)
                result["runs"].append(summary)
                log.info("ours %s %s x%d: %.0f tok/s agg, ttft p95 %.1f ms, itl p95 %.2f ms", name, mode, count,
                         summary["aggregate_tok_s"], summary["ttft_p95_ms"], summary["inter_token_p95_ms"])
                _checkpoint(args)
        if args.sampled and 64 in counts:
            sampled = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=NEW_TOKENS, seed=1)
            raw = await _stream_run(engine, make_prompts(64, vocab, 5), [0.0] * 64, sampled)
            summary = _summarise(raw, 64, "burst-sampled")
            summary["sampling"] = "temperature 0.8, top_p 0.95, top_k 50"
            summary["overflow_rows"] = engine.overflow_rows
            result["runs"].append(summary)
        result["graph_step_ms"] = _graph_step_times(engine)
    result["peak_memory_gib"] = _cuda().max_memory_allocated() / 2**30
    del engine
    if args.rewarm:
        # A second start in the same process: compiled kernels come from inductor's caches.
        import gc

        gc.collect()
        _cuda().empty_cache()
        again = CudaEngine(
            model, None, model_id=name, max_concurrent=max(counts),
            max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
        )
        async with again:
            result["warmup_second_start_s"] = await again.wait_ready()
        del again
    return result


def _graph_step_times(engine: Any) -> dict[str, float]:
    """Pure device time of one captured decode step per batch bucket (idle engine, L = 512)."""
    import torch

    times: dict[str, float] = {}
    if DEVICE != "cuda":
        return times
    length = next((n for n in engine._length_buckets if n >= 512), engine._length_buckets[-1])
    for batch in engine._batch_buckets:
        graph = engine._graphs.get((batch, length))
        if graph is None:
            continue
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        times[str(batch)] = start.elapsed_time(end) / 20
    return times


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def bench_generate(model: Any, name: str, batch: int, *, static: bool, new_tokens: int) -> dict[str, Any]:
    """``model.generate`` at a fixed batch (greedy, every row makes ``new_tokens``)."""
    import torch

    vocab = MODELS[name]["vocab_size"]
    ids = torch.tensor(make_prompts(batch, vocab, 11), device=DEVICE)
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}
    if static:
        kwargs["cache_implementation"] = "static"
    _cuda().reset_peak_memory_stats()
    first = _now()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    _cuda().synchronize()
    warm = _now() - first
    times = []
    for _ in range(2 if static else 1):
        start = _now()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        _cuda().synchronize()
        times.append(_now() - start)
    produced = (out.shape[1] - ids.shape[1]) * batch
    best = min(times)
    return {
        "batch": batch,
        "static_compile": static,
        "new_tokens": new_tokens,
        "first_call_s": warm,
        "wall_s": best,
        "aggregate_tok_s": produced / best,
        "per_stream_tok_s": produced / batch / best,
        "peak_memory_gib": _cuda().max_memory_allocated() / 2**30,
    }


def bench_generate_batch(model: Any, name: str, requests: int, new_tokens: int) -> dict[str, Any]:
    """transformers' continuous batching (``generate_batch``) on the same kind of prompts."""
    import torch
    from transformers import GenerationConfig

    vocab = MODELS[name]["vocab_size"]
    prompts = make_prompts(requests, vocab, 13)
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    _cuda().reset_peak_memory_stats()
    start = _now()
    # Not under inference_mode: its worker thread updates tensors created here in place.
    with torch.no_grad():
        outputs = model.generate_batch(inputs=prompts, generation_config=config)
    wall = _now() - start
    produced = 0
    for output in outputs.values():
        generated = getattr(output, "generated_tokens", None)
        produced += len(generated) if generated is not None else 0
    return {
        "requests": requests,
        "new_tokens": new_tokens,
        "wall_s": wall,
        "tokens": produced,
        "aggregate_tok_s": produced / wall,
        "peak_memory_gib": _cuda().max_memory_allocated() / 2**30,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

RESULT: dict[str, Any] = {}


class _NoCuda:
    """Stand-ins for torch.cuda memory/sync calls on a CPU dry run."""

    @staticmethod
    def reset_peak_memory_stats() -> None: ...

    @staticmethod
    def max_memory_allocated() -> int:
        return 0

    @staticmethod
    def memory_allocated() -> int:
        return 0

    @staticmethod
    def synchronize() -> None: ...

    @staticmethod
    def empty_cache() -> None: ...

    @staticmethod
    def get_device_name() -> str:
        return "cpu (dry run)"


def _cuda() -> Any:
    import torch

    return torch.cuda if DEVICE == "cuda" else _NoCuda


def _checkpoint(args: argparse.Namespace) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(RESULT, indent=1, default=str))


def _guarded(args: argparse.Namespace, label: str, part: dict[str, Any], key: str, fn: Any) -> None:
    elapsed = _now() - args.t0
    if elapsed > args.budget_s:
        part[key] = {"skipped": f"time budget ({elapsed:.0f} s > {args.budget_s} s)"}
        log.warning("skip %s: over budget", label)
        return
    log.info("start %s (t=%.0f s)", label, elapsed)
    try:
        part[key] = fn()
    except Exception as exc:
        part[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        log.exception("%s failed", label)
    _checkpoint(args)


def run_model(name: str, args: argparse.Namespace) -> None:

    part: dict[str, Any] = {"shape": MODELS[name]}
    RESULT["models"][name] = part
    model = build_model(name)
    part["weight_bytes"] = weight_bytes(model)
    bw = RESULT["hbm_copy_bytes_per_s"]
    part["roofline"] = {
        "step_floor_ms": 1000 * part["weight_bytes"] / bw,
        "batch1_tok_s": bw / part["weight_bytes"],
        "batch1_tok_s_datasheet_3.35TBps": 3.35e12 / part["weight_bytes"],
    }
    counts = [int(c) for c in args.streams.split(",")]
    modes = args.modes.split(",")
    if not args.skip_ours:
        _guarded(args, f"{name} ours", part, "ours", lambda: asyncio.run(bench_ours(model, name, counts, modes, args)))
    import gc

    gc.collect()
    _cuda().empty_cache()
    baselines: dict[str, Any] = {}
    part["baselines"] = baselines
    if args.eager:
        _guarded(args, f"{name} generate eager b1", baselines, "generate_eager_b1",
                 lambda: bench_generate(model, name, 1, static=False, new_tokens=args.eager_tokens))
    for batch in [int(b) for b in args.static_batches.split(",") if b]:
        _guarded(args, f"{name} generate static+compile b{batch}", baselines, f"generate_static_compile_b{batch}",
                 lambda batch=batch: bench_generate(model, name, batch, static=True, new_tokens=NEW_TOKENS))
        _cuda().empty_cache()
    for requests in [int(r) for r in args.batch_requests.split(",") if r]:
        _guarded(args, f"{name} generate_batch x{requests}", baselines, f"generate_batch_{requests}",
                 lambda requests=requests: bench_generate_batch(model, name, requests, NEW_TOKENS))
        _cuda().empty_cache()
    model = None  # free it before the next shape
    gc.collect()
    _cuda().empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen0.5b")
    parser.add_argument("--streams", default="1,8,64,256")
    parser.add_argument("--modes", default="burst,poisson")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens-limit", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--rewarm", action="store_true", help="time a second engine start (warm caches)")
    parser.add_argument("--sampled", action="store_true", help="one extra 64-stream run with sampling")
    parser.add_argument("--eager", action="store_true", help="generate eager batch 1 baseline")
    parser.add_argument("--eager-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--static-batches", default="", help="e.g. 1,64,256")
    parser.add_argument("--batch-requests", default="", help="generate_batch request counts, e.g. 64,256")
    parser.add_argument("--budget-s", type=float, default=520.0, help="skip parts that start after this")
    parser.add_argument("--out", default="")
    parser.add_argument("--device", default="cuda", help="cpu = dry run of this script (--models tiny)")
    parser.add_argument("--plot", nargs="*", default=None, help="draw a PNG from these JSON files")
    parser.add_argument("--png", default="bench/results/gpu_bench.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.plot is not None:
        plot(args.plot, args.png)
        return 0
    args.t0 = _now()
    global DEVICE  # noqa: PLW0603 - set once from the command line
    DEVICE = args.device
    import torch
    import transformers

    if DEVICE == "cpu":
        torch.set_num_threads(1)  # a dry run on a shared machine: avoid OpenMP stalls
    torch.backends.cuda.matmul.allow_tf32 = True
    RESULT.update({
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "gpu": _cuda().get_device_name(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "hbm_copy_bytes_per_s": measure_bandwidth(),
        "models": {},
    })
    _checkpoint(args)
    for name in args.models.split(","):
        run_model(name, args)
    RESULT["total_s"] = _now() - args.t0
    _checkpoint(args)
    print_table(RESULT)
    return 0


def print_table(result: dict[str, Any]) -> None:
    print(f"\n== {result['machine']['gpu']}  torch {result['machine']['torch']}  "
          f"transformers {result['machine']['transformers']}  HBM copy {result['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s")
    for name, part in result["models"].items():
        roof = part.get("roofline", {})
        print(f"-- {name}: weights {part.get('weight_bytes', 0) / 1e9:.2f} GB, roofline b1 {roof.get('batch1_tok_s', 0):.0f} tok/s")
        ours = part.get("ours", {})
        if "runs" in ours:
            print(f"   ours: warm-up {ours.get('warmup_s', 0):.1f} s {ours.get('warmup_breakdown')} (2nd start {ours.get('warmup_second_start_s')}), {ours.get('graphs')}+{ours.get('prefill_graphs')} graphs, compiled={ours.get('compiled')}, "
                  f"KV {ours.get('kv_cache_gib', 0):.1f} GiB, peak {ours.get('peak_memory_gib', 0):.1f} GiB")
            if ours.get("graph_step_ms"):
                print("   graph step ms (L=512): " + ", ".join(f"b{b}={t:.2f}" for b, t in ours["graph_step_ms"].items()))
            for run in ours["runs"]:
                steady = f" steady {run['steady_tok_s']:.0f}" if "steady_tok_s" in run else ""
                print(f"   {run['mode']:>14} x{run['streams_target']:<4} agg {run['aggregate_tok_s']:9.0f}{steady} tok/s  "
                      f"stream {run['per_stream_tok_s_median'] or 0:7.1f}  ttft p50/p95 {run['ttft_p50_ms']:6.1f}/{run['ttft_p95_ms']:6.1f} ms  "
                      f"itl p95 {run['inter_token_p95_ms']:5.2f} ms")
        elif ours:
            print(f"   ours: {ours}")
        for key, value in part.get("baselines", {}).items():
            if "aggregate_tok_s" in value:
                print(f"   {key:>34}: {value['aggregate_tok_s']:9.0f} tok/s (first call {value.get('first_call_s', 0):.1f} s)")
            else:
                print(f"   {key:>34}: {str(value)[:300]}")


def plot(paths: list[str], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models: dict[str, Any] = {}
    gpu = ""
    for path in paths:
        data = json.loads(Path(path).read_text())
        gpu = data["machine"]["gpu"]
        models.update(data["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (name, part) in zip(axes[0], models.items(), strict=False):
        runs = part.get("ours", {}).get("runs", [])
        for mode, marker in (("burst", "o"), ("poisson", "s")):
            points = [(r["streams_target"], r.get("steady_tok_s", r["aggregate_tok_s"])) for r in runs if r["mode"] == mode]
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, label=f"CudaEngine {mode}")
        base = part.get("baselines", {})
        static = [(v["batch"], v["aggregate_tok_s"]) for k, v in base.items() if k.startswith("generate_static") and "aggregate_tok_s" in v]
        if static:
            ax.plot(*zip(*sorted(static), strict=True), marker="^", linestyle="--", label="generate static+compile (fixed batch)")
        batch = [(v["requests"], v["aggregate_tok_s"]) for k, v in base.items() if k.startswith("generate_batch") and "aggregate_tok_s" in v]
        if batch:
            ax.plot(*zip(*sorted(batch), strict=True), marker="v", linestyle=":", label="generate_batch")
        eager = base.get("generate_eager_b1", {})
        if "aggregate_tok_s" in eager:
            ax.scatter([1], [eager["aggregate_tok_s"]], marker="x", color="k", label="generate eager b1", zorder=5)
        roof = part.get("roofline", {}).get("batch1_tok_s")
        if roof:
            ax.axhline(roof, color="grey", linewidth=0.8, label="weight-read roofline (b1)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams / batch")
        ax.set_ylabel("aggregate decode tok/s")
        ax.set_title(f"{name} shape")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"meshnode CudaEngine vs transformers, {gpu}, 128-token prompts, 256 new tokens")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
