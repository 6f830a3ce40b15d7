"""Benchmark (issue 16, part 3): ``[model] device_map`` on a model larger than the memory it may use.

A random-initialised Llama shape (default: Llama-3.2-3B, bf16, ~6.4 GB of weights; no download)
is saved once, then loaded by meshnode's own loader twice in one run:

* ``one-gpu``: the whole model on GPU 0, served by the engine ``join`` picks for it (the
  CUDA-graph engine);
* ``split``: ``device_map=auto`` with ``--max-memory`` (default ``0=3GiB,cpu=64GiB``), so about
  half of the layers live on the CPU and accelerate moves them to the GPU for every forward.

Each is served by the engine ``meshnode join --device-map`` builds (``build_engine``: the torch
engine with continuous batching) at 1 and 8 concurrent greedy streams: decode tok/s, TTFT, load
time, and memory per device. JSON with the command.

    python bench/placement_bench.py --out $OUT/placement.json      # on a GPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from meshnode.generation.api import SamplingParams
from meshnode.generation.factory import build_engine
from meshnode.generation.models import resolve_model
from meshnode.generation.placement import Placement, parse_max_memory
from meshnode.settings import EngineSettings

SHAPES = {  # Llama-3.2-3B and -1B (public configs), vocabulary trimmed to keep the files small
    "llama3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                    "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 32000},
    "llama3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
}
PROMPT = list(range(100, 228))  # 128 prompt tokens


def save_model(shape: str, folder: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, 256)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
                            ).save_pretrained(folder)


async def serve(engine: Any, rows: int, tokens: int) -> dict[str, float]:
    finishes: list[str] = []

    async def one() -> tuple[float, float, int]:
        started = time.perf_counter()
        first = None
        count = 0
        async with engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=tokens)) as stream:
            async for chunk in stream:
                if chunk.ids and first is None:
                    first = time.perf_counter()
                count += len(chunk.ids)
                if chunk.finish_reason:
                    finishes.append(chunk.finish_reason)
        assert first is not None
        return first - started, time.perf_counter() - first, count

    outs = await asyncio.gather(*(one() for _ in range(rows)))
    if any(reason != "length" for reason in finishes):
        raise RuntimeError(f"streams ended early: {finishes}")
    decode = max(o[1] for o in outs)
    return {"decode_tok_s": round(sum(o[2] - 1 for o in outs) / decode, 1),
            "ttft_ms_median": round(sorted(o[0] for o in outs)[rows // 2] * 1000, 1)}


def measure(folder: Path, placement: Placement | None, tokens: int) -> dict[str, Any]:
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loaded = dataclasses.replace(resolve_model(str(folder), device="auto" if placement else "cuda", dtype="bfloat16",
                                               progress=False, placement=placement), eos_ids=())  # full length
    load_s = time.perf_counter() - started
    engine = build_engine(loaded, EngineSettings(max_concurrent=8, max_prompt_tokens=512, max_tokens=tokens),
                          progress=False)
    devices = sorted({str(v) for v in (loaded.device_map or {}).values()}) or [str(loaded.device)]
    result: dict[str, Any] = {"engine": type(engine).__name__, "load_s": round(load_s, 1), "devices": devices,
                              "gpu0_allocated_gib": round(torch.cuda.memory_allocated(0) / 2**30, 2)}

    async def run() -> None:
        await serve(engine, 1, 4)
        for rows in (1, 8):
            result[f"streams_{rows}"] = await serve(engine, rows, tokens)
        await engine.close()

    asyncio.run(run())
    result["gpu0_peak_gib"] = round(torch.cuda.max_memory_allocated(0) / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-3b")
    parser.add_argument("--max-memory", default="0=3GiB,cpu=64GiB", help="the split row's budget")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per stream (default 32)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    document: dict[str, Any] = {"command": "python bench/placement_bench.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])), "shape": {args.shape: SHAPES[args.shape]},
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.shape
        started = time.perf_counter()
        save_model(args.shape, folder)
        document["save_s"] = round(time.perf_counter() - started, 1)
        document["weights_gib"] = round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30, 2)
        for name, placement in (("one-gpu", None), ("split", Placement(device_map="auto", max_memory=parse_max_memory(
                args.max_memory)))):
            print(f"== {name}", flush=True)
            document["rows"][name] = measure(folder, placement, args.tokens)
            gc.collect()
            torch.cuda.empty_cache()  # the row's engine and model are gone with measure()
            print(json.dumps(document["rows"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
