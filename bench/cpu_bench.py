"""CPU benchmark (issue 15): meshnode's CPU engine against transformers and llama.cpp, one run.

Same model (the embedded SmolLM2-135M-Instruct: the shipped Q4_1 GGUF, which transformers
dequantizes to fp32 and llama.cpp runs as is), same token ids (the HF tokenizer's chat template),
greedy, same machine. Each path runs in a process of its own, so its memory is its own:

* ``meshnode``: the default CPU engine (``build_engine``: the slot engine with fbgemm fp16-packed
  weights), driven through the engine API exactly as the node drives it (continuous batching);
* ``meshnode-fp32``: the same engine on the model's own fp32 weights (the exact path);
* ``torch-engine``: the previous CPU engine (transformers forward with a batched cache);
* ``transformers``: ``model.generate`` (fp32, dynamic cache; rows batched with left padding);
* ``llama.cpp``: llama-cpp-python's low-level API on the GGUF (one sequence per row in one
  ``llama_batch``), when ``--llama-python`` names an interpreter that has it (it has only a source
  distribution here: ``pip install llama-cpp-python`` builds for about 7 minutes on 2 cores).

Measured: decode tok/s at 1, 4, 8, 16 concurrent streams (rows × new tokens after the first, over
the decode time; 128 new tokens, EOS ignored so every row runs the full length), TTFT of one
32-token and one 512-token prompt, peak RSS and the RSS after the runs with the model still
loaded (what a node left running holds), and greedy agreement with fp32 transformers (first
differing token of 64, on 8 prompts). Every timing is the best of ``--repeats`` runs (the machine
is shared). Results: JSON with the command, and a PNG.

    .venv/bin/python bench/cpu_bench.py --llama-python /path/to/python-with-llama_cpp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "cpu_bench"
PROMPTS = [
    "Explain entropy in one sentence.",
    "Write a haiku about rain.",
    "What is the capital of France and why is it famous?",
    "List three uses of a paperclip.",
    "Describe a peer-to-peer network to a child.",
    "Why is the sky blue?",
    "Give me a tip for learning a language.",
    "Summarise the plot of Hamlet briefly.",
]
NEW_TOKENS = 128
AGREE_TOKENS = 64
ROWS = (1, 4, 8, 16)
PATHS = ("meshnode", "meshnode-fp32", "torch-engine", "transformers", "llama.cpp")


def peak_rss_mb(field: str = "VmHWM") -> float:
    """The process's peak resident memory (``VmRSS``: its resident memory now), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# -- the inputs every path gets ----------------------------------------------------------------------


def make_inputs() -> dict[str, Any]:
    """Token ids (chat template), a 512-token prompt, the GGUF path and the fp32 reference."""
    import torch

    from meshnode.generation.models import embedded_gguf_path, resolve_model
    from meshnode.generation.text import HFText

    loaded = resolve_model(None, device="cpu", progress=False)
    text = HFText(loaded.tokenizer, loaded.model_id)
    prompts = [text.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    filler = " ".join(f"Fact {i}: meshes of browser tabs share models over relays." for i in range(80))
    long = text.encode_chat([{"role": "user", "content": filler + " Summarise."}])[-512:]
    short = prompts[0][:32] if len(prompts[0]) >= 32 else (prompts[0] * 2)[:32]
    reference = []
    with torch.inference_mode():
        for ids in prompts:
            out = loaded.model.generate(
                torch.tensor([ids]),
                max_new_tokens=AGREE_TOKENS,
                min_new_tokens=AGREE_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
            reference.append(out[0, len(ids) :].tolist())
    return {
        "prompts": prompts,
        "long": long,
        "short": short,
        "reference": reference,
        "gguf": str(embedded_gguf_path()),
        "model_id": loaded.model_id,
    }


def agreement(rows: list[list[int]], reference: list[list[int]]) -> list[int]:
    """Per prompt, the index of the first token that differs from the reference (64 = identical)."""
    out = []
    for got, want in zip(rows, reference, strict=True):
        index = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        out.append(index)
    return out


# -- meshnode engines ------------------------------------------------------------------------------


def run_engine(path: str, inputs: dict[str, Any], repeats: int) -> dict[str, Any]:
    import dataclasses

    from meshnode.generation.api import SamplingParams
    from meshnode.generation.cuda.backend import CudaEngine
    from meshnode.generation.factory import build_engine
    from meshnode.generation.models import resolve_model
    from meshnode.generation.torch_backend import TorchEngine
    from meshnode.settings import EngineSettings

    loaded = dataclasses.replace(resolve_model(None, device="cpu", progress=False), eos_ids=())  # full length
    limits = {"max_concurrent": 16, "max_queue": 64, "max_prompt_tokens": 1024, "max_tokens_limit": 512}
    if path == "meshnode":
        engine: Any = build_engine(
            loaded,
            EngineSettings(max_concurrent=16, max_queue=64, max_prompt_tokens=1024, max_tokens=512),
            progress=False,
        )
    elif path == "meshnode-fp32":
        engine = CudaEngine.from_loaded(loaded, max_batch_tokens=0, fp16_weights=False, **limits)
    else:
        engine = TorchEngine.from_loaded(loaded, **limits)
    kind = f"{type(engine).__name__}" + (
        " fp16-packed" if getattr(getattr(engine, "batch", None), "fp16_weights", False) else ""
    )

    async def stream(ids: list[int], tokens: int) -> tuple[list[int], float, float]:
        got: list[int] = []
        started = time.perf_counter()
        first = None
        async with engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=tokens)) as s:
            async for chunk in s:
                if chunk.ids and first is None:
                    first = time.perf_counter()
                got.extend(chunk.ids)
        assert first is not None
        return got, first - started, time.perf_counter() - first

    async def main() -> dict[str, Any]:
        await asyncio.gather(stream(inputs["short"], 4))  # start the worker, touch every path once
        result: dict[str, Any] = {"engine": kind, "decode_tok_s": {}, "ttft_ms": {}}
        for rows in ROWS:
            best = 0.0
            for _ in range(repeats):
                outs = await asyncio.gather(*(stream(inputs["prompts"][i % 8], NEW_TOKENS) for i in range(rows)))
                decode = max(o[2] for o in outs)
                best = max(best, rows * (NEW_TOKENS - 1) / decode)
            result["decode_tok_s"][str(rows)] = round(best, 1)
        for name in ("short", "long"):
            result["ttft_ms"][str(len(inputs[name]))] = round(
                min([(await stream(inputs[name], 1))[1] for _ in range(repeats)]) * 1000, 1
            )
        rows_out = [(await stream(p, AGREE_TOKENS))[0] for p in inputs["prompts"]]
        result["agreement"] = agreement(rows_out, inputs["reference"])
        result["rss_mb"] = peak_rss_mb("VmRSS")  # what a node left running holds
        await engine.close()
        return result

    return asyncio.run(main())


# -- transformers generate --------------------------------------------------------------------------


def run_transformers(inputs: dict[str, Any], repeats: int) -> dict[str, Any]:
    import torch

    from meshnode.generation.models import resolve_model

    loaded = resolve_model(None, device="cpu", progress=False)
    model = loaded.model
    result: dict[str, Any] = {"engine": "model.generate fp32 (dynamic cache)", "decode_tok_s": {}, "ttft_ms": {}}

    def generate(rows: list[list[int]], tokens: int) -> tuple[list[list[int]], float]:
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
        return out[:, width:].tolist(), time.perf_counter() - started

    for name in ("short", "long"):
        result["ttft_ms"][str(len(inputs[name]))] = round(
            min(generate([inputs[name]], 1)[1] for _ in range(repeats)) * 1000, 1
        )
    prefill = {
        rows: min(generate([inputs["prompts"][i % 8] for i in range(rows)], 1)[1] for _ in range(repeats))
        for rows in ROWS
    }
    for rows in ROWS:
        wall = min(generate([inputs["prompts"][i % 8] for i in range(rows)], NEW_TOKENS)[1] for _ in range(repeats))
        result["decode_tok_s"][str(rows)] = round(rows * (NEW_TOKENS - 1) / max(1e-6, wall - prefill[rows]), 1)
    result["agreement"] = agreement([generate([p], AGREE_TOKENS)[0][0] for p in inputs["prompts"]], inputs["reference"])
    result["rss_mb"] = peak_rss_mb("VmRSS")
    return result


# -- llama.cpp (run by an interpreter that has llama_cpp) -------------------------------------------


LLAMA_SCRIPT = r'''
import json, sys, time
import llama_cpp as L
import numpy as np
args = json.loads(sys.stdin.read())

def peak(field="VmHWM"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return round(int(line.split()[1]) / 1024, 1)

L.llama_backend_init()
model = L.llama_model_load_from_file(args["gguf"].encode(), L.llama_model_default_params())
vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
rows_max = max(args["rows"])

def context(seqs):
    p = L.llama_context_default_params()
    p.n_ctx = 1024 * max(1, seqs)
    p.n_batch = p.n_ubatch = 512
    p.n_seq_max = seqs
    p.n_threads = p.n_threads_batch = args["threads"]
    return L.llama_init_from_model(model, p)

def argmax(ctx, index):
    return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, index), shape=(vocab,)).argmax())

def run(prompts, tokens):
    """Prefill each row (its own sequence), then decode all rows in one batch per step."""
    ctx = context(len(prompts))
    batch = L.llama_batch_init(512, 0, len(prompts))
    nexts, positions = [], []
    started = time.perf_counter()
    for seq, ids in enumerate(prompts):
        for start in range(0, len(ids), 512):
            part = ids[start:start + 512]
            batch.n_tokens = len(part)
            for j, tok in enumerate(part):
                batch.token[j] = tok; batch.pos[j] = start + j; batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = seq; batch.logits[j] = j == len(part) - 1
            assert L.llama_decode(ctx, batch) == 0
        nexts.append(argmax(ctx, len(part) - 1)); positions.append(len(ids))
    first = time.perf_counter()
    out = [[n] for n in nexts]
    for _ in range(tokens - 1):
        batch.n_tokens = len(prompts)
        for seq in range(len(prompts)):
            batch.token[seq] = out[seq][-1]; batch.pos[seq] = positions[seq]; batch.n_seq_id[seq] = 1
            batch.seq_id[seq][0] = seq; batch.logits[seq] = True
            positions[seq] += 1
        assert L.llama_decode(ctx, batch) == 0
        for seq in range(len(prompts)):
            out[seq].append(argmax(ctx, seq))
    done = time.perf_counter()
    L.llama_batch_free(batch); L.llama_free(ctx)
    return out, first - started, done - first

result = {"engine": f"llama-cpp-python {L.__version__}, {args['threads']} threads", "decode_tok_s": {}, "ttft_ms": {}}
for rows in args["rows"]:
    best = 0.0
    for _ in range(args["repeats"]):
        _, _, decode = run([args["prompts"][i % len(args["prompts"])] for i in range(rows)], args["tokens"])
        best = max(best, rows * (args["tokens"] - 1) / decode)
    result["decode_tok_s"][str(rows)] = round(best, 1)
for name in ("short", "long"):
    result["ttft_ms"][str(len(args[name]))] = round(min(run([args[name]], 1)[1] for _ in range(args["repeats"])) * 1000, 1)
result["rows_out"] = [run([p], args["agree"])[0][0] for p in args["prompts"]]
result["rss_mb"] = peak("VmRSS")
result["peak_rss_mb"] = peak()
print(json.dumps(result))
'''


def run_llama(python: str, inputs: dict[str, Any], repeats: int, threads: int) -> dict[str, Any]:
    payload = {
        "gguf": inputs["gguf"],
        "prompts": inputs["prompts"],
        "short": inputs["short"],
        "long": inputs["long"],
        "rows": list(ROWS),
        "tokens": NEW_TOKENS,
        "agree": AGREE_TOKENS,
        "repeats": repeats,
        "threads": threads,
    }
    done = subprocess.run(
        [python, "-c", LLAMA_SCRIPT],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["agreement"] = agreement(result.pop("rows_out"), inputs["reference"])
    return result


# -- driver -----------------------------------------------------------------------------------------


def child(path: str, inputs_file: Path, repeats: int) -> None:
    """One path in this process; prints its JSON (with the process's peak RSS) on the last line."""
    import torch

    torch.set_num_threads(int(os.environ.get("CPU_BENCH_THREADS", "2")))
    inputs = json.loads(inputs_file.read_text())
    result = run_transformers(inputs, repeats) if path == "transformers" else run_engine(path, inputs, repeats)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    parser.add_argument("--llama-python", help="a Python with llama_cpp (llama-cpp-python) for the llama.cpp path")
    parser.add_argument("--threads", type=int, default=2, help="threads for every path (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best counts (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.png")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.inputs, args.repeats)
        return 0
    command = "python bench/cpu_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    inputs_file = args.out.with_suffix(".inputs.json")
    inputs_file.parent.mkdir(parents=True, exist_ok=True)
    print("preparing inputs (fp32 transformers reference)...", flush=True)
    inputs = make_inputs()
    inputs_file.write_text(json.dumps(inputs))
    results: dict[str, Any] = {}
    env = {**os.environ, "CPU_BENCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    for path in paths:
        print(f"== {path}", flush=True)
        started = time.monotonic()
        if path == "llama.cpp":
            results[path] = (
                run_llama(args.llama_python, inputs, args.repeats, args.threads)
                if args.llama_python
                else {"skipped": "no --llama-python (llama-cpp-python has only a source build here)"}
            )
        else:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    path,
                    "--inputs",
                    str(inputs_file),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=3600,
                check=False,
            )
            lines = done.stdout.strip().splitlines()
            results[path] = (
                json.loads(lines[-1])
                if done.returncode == 0 and lines
                else {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
            )
        results[path]["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(results[path]), flush=True)
    inputs_file.unlink(missing_ok=True)
    document = {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": inputs["model_id"],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "new_tokens": NEW_TOKENS,
        "prompt_tokens": [len(p) for p in inputs["prompts"]],
        "ttft_prompt_tokens": [len(inputs["short"]), len(inputs["long"])],
        "results": results,
    }
    args.out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    plot(document, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return 0


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, result in document["results"].items():
        rates = result.get("decode_tok_s")
        if rates:
            left.plot([int(k) for k in rates], list(rates.values()), marker="o", label=name)
    left.set_xlabel("concurrent streams")
    left.set_ylabel("aggregate decode tok/s")
    left.set_xticks(list(ROWS))
    left.set_title(f"{document['model']} on {document['machine']['cpus']} CPU cores")
    left.legend(fontsize=8)
    names = [n for n, r in document["results"].items() if r.get("ttft_ms")]
    long = str(document["ttft_prompt_tokens"][1])
    right.bar(names, [document["results"][n]["ttft_ms"].get(long, 0) for n in names])
    right.set_ylabel(f"TTFT of a {long}-token prompt, ms")
    right.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
