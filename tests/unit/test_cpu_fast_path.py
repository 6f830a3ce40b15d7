"""The CPU fast path: the slot engine with fbgemm fp16-packed weights (issue 15), on tiny models."""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

import pytest
import torch

from bench.lab.fakes import CharTokenizer
from meshnode.generation.api import SamplingParams
from meshnode.generation.cuda.backend import CudaEngine
from meshnode.generation.cuda.decoder import SlotDecoder, fp16_packing_available
from meshnode.generation.factory import build_engine
from meshnode.generation.models import LoadedModel
from meshnode.generation.torch_backend import TorchEngine
from meshnode.settings import EngineSettings
from tests.unit.test_cuda_engine import prompt, run, tiny_llama, tiny_qwen

pytestmark = pytest.mark.skipif(not fp16_packing_available(torch.device("cpu")), reason="needs fbgemm (x86 CPU)")


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen], ids=["llama", "qwen2"])
def test_fp16_packed_logits_stay_close_to_float32(factory: Any) -> None:
    exact = SlotDecoder(factory(), slots=2, max_len=64)
    model = factory()
    packed = SlotDecoder(model, slots=2, max_len=64)
    freed = packed.pack_fp16(model)
    assert freed > 0 and all(layer.mlp.down_proj.weight.numel() == 0 for layer in model.model.layers)
    tokens = torch.tensor([prompt(3)])
    with torch.no_grad():
        a = exact.prefill(tokens, torch.tensor([0]), [0], [tokens.shape[1]])
        b = packed.prefill(tokens, torch.tensor([0]), [0], [tokens.shape[1]])
        step_a = exact.decode(torch.tensor([5, 0]), torch.tensor([tokens.shape[1], 64]), tokens.shape[1] + 1,
                              torch.empty(2, exact.vocab))
        step_b = packed.decode(torch.tensor([5, 0]), torch.tensor([tokens.shape[1], 64]), tokens.shape[1] + 1,
                               torch.empty(2, packed.vocab))
    scale = a.abs().max()
    assert (a - b).abs().max() < 0.01 * scale  # fp16 weights, fp32 accumulation
    assert (step_a[0] - step_b[0]).abs().max() < 0.01 * scale
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_packing_refuses_what_fbgemm_cannot_run() -> None:
    from meshnode.errors import ModelError

    model = tiny_llama().to(torch.float64)
    with pytest.raises(ModelError, match="float32"):
        SlotDecoder(model, slots=1, max_len=32).pack_fp16(model)


def test_fp16_engine_batches_like_it_runs_alone() -> None:
    """Continuous batching on the packed weights: each stream's greedy tokens are the same as
    when it runs alone (rows do not leak into each other)."""

    async def collect(engine: CudaEngine, ids: list[int]) -> list[int]:
        out: list[int] = []
        async with engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=12)) as stream:
            async for chunk in stream:
                out.extend(chunk.ids)
        return out

    async def main() -> tuple[list[list[int]], list[list[int]]]:
        engine = CudaEngine(tiny_llama(), CharTokenizer(), model_id="tiny", max_concurrent=4, max_queue=8,
                            max_prompt_tokens=64, max_tokens_limit=64, fp16_weights=True)
        try:
            alone = [await collect(engine, prompt(i)) for i in range(3)]
            together = list(await asyncio.gather(*(collect(engine, prompt(i)) for i in range(3))))
        finally:
            await engine.close()
        assert engine.batch.fp16_weights
        return alone, together

    alone, together = run(main())
    assert together == alone and all(len(ids) == 12 for ids in alone)


def test_the_factory_picks_the_fast_path_on_a_cpu() -> None:
    def loaded(model: Any) -> LoadedModel:
        return LoadedModel(model=model, tokenizer=CharTokenizer(), model_id="tiny", device=torch.device("cpu"),
                           dtype=next(model.parameters()).dtype, eos_ids=())

    settings = EngineSettings(max_prompt_tokens=64, max_tokens=64)
    fast = build_engine(loaded(tiny_llama()), settings, progress=False)
    assert isinstance(fast, CudaEngine) and fast.batch.fp16_weights and fast.max_concurrent == 8
    other = build_engine(loaded(tiny_llama().to(torch.float64)), settings, progress=False)
    assert isinstance(other, TorchEngine)  # nothing fbgemm can pack: the torch engine, unchanged


def test_the_cpu_worker_prefills_on_every_core_and_decodes_on_all_but_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine worker on a CPU decodes on all usable cores but one (at least one): its OpenMP
    teams started from a second thread were 2-3x slower with every core; prefill keeps every core
    (meshnode/generation/cputhreads.py). Thread counts are set only when they change."""
    from meshnode.generation import cputhreads

    calls: list[int] = []
    monkeypatch.setattr(cputhreads.torch, "set_num_threads", calls.append)
    for cores, decode in ((set(range(8)), 7), ({0, 1}, 1), ({0}, 1)):
        monkeypatch.setattr(cputhreads.os, "sched_getaffinity", lambda _pid, cores=cores: cores)
        threads = cputhreads.WorkerThreads(torch.device("cpu"))
        calls.clear()
        threads.prefill()
        threads.decode()
        threads.decode()
        threads.prefill()
        expected = [len(cores), decode, len(cores)] if decode != len(cores) else [1]
        assert calls == expected, (cores, calls)
    calls.clear()
    gpu = cputhreads.WorkerThreads(torch.device("meta"))  # not a CPU: the GPU engines keep theirs
    gpu.prefill()
    gpu.decode()
    assert calls == []


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_the_cpu_kv_cache_takes_memory_only_where_written() -> None:
    """lazy_zeros: a 256 MiB cache reads as zeros, costs resident memory only for the pages
    written, and outlives every reference to its mapping but the tensor's."""
    from meshnode.generation.cpumemory import lazy_zeros

    before = _resident_bytes()
    cache = lazy_zeros((64, 1024, 1024), torch.float32, torch.device("cpu"))
    assert cache.shape == (64, 1024, 1024) and cache.dtype == torch.float32
    assert not cache[::7, ::97].any()  # reading maps the zero page, nothing is allocated
    cache[3, :16] = 1.5  # 64 KiB written
    gc.collect()
    assert _resident_bytes() - before < 32 << 20
    assert cache[3, :16].eq(1.5).all() and cache.sum().item() == 1.5 * 16 * 1024


def test_a_packed_decoder_on_its_lazy_cache_writes_only_the_rows_it_runs() -> None:
    """The fast path's KV cache (a lazily zero-filled mapping) starts as zeros; packing layer by
    layer keeps the decoder's output (prefill argmax equal to an unpacked twin's)."""
    model = tiny_llama()
    decoder = SlotDecoder(model, slots=2, max_len=64)
    assert not decoder.kv.any()
    exact = SlotDecoder(tiny_llama(), slots=2, max_len=64)
    decoder.pack_fp16(model)
    tokens = torch.tensor([prompt(2)])
    with torch.no_grad():
        assert torch.equal(decoder.prefill(tokens, torch.tensor([1]), [0], [tokens.shape[1]]).argmax(-1),
                           exact.prefill(tokens, torch.tensor([1]), [0], [tokens.shape[1]]).argmax(-1))
    assert decoder.kv[:, 1].abs().sum() > 0 and not decoder.kv[:, 0].any()  # only row 1 was written


def test_all_greedy_steps_take_the_argmax_and_agree_with_the_sampler() -> None:
    """A step whose rows are all greedy skips the sampler (its argmax path); with a sampling row
    beside it the same greedy row goes through the sampler, and its tokens are the same."""

    async def collect(engine: CudaEngine, ids: list[int], params: SamplingParams) -> list[int]:
        out: list[int] = []
        async with engine.generate(ids, params) as stream:
            async for chunk in stream:
                out.extend(chunk.ids)
        return out

    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    sampled = SamplingParams(temperature=0.9, max_tokens=16, seed=5)

    async def main() -> tuple[list[int], list[list[int]]]:
        engine = CudaEngine(tiny_llama(), CharTokenizer(), model_id="tiny", max_concurrent=4, max_queue=8,
                            max_prompt_tokens=64, max_tokens_limit=64, fp16_weights=True)
        try:
            alone = await collect(engine, prompt(0), greedy)
            mixed = list(await asyncio.gather(collect(engine, prompt(0), greedy), collect(engine, prompt(1), sampled)))
        finally:
            await engine.close()
        return alone, mixed

    alone, (beside, other) = run(main())
    assert beside == alone and len(alone) == 16 and len(other) == 16
