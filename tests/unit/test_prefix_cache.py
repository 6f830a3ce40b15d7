"""The CUDA backend's prefix store and the scheduling around it, on the CPU (eager path).

PrefixStore is checked on its own with position-coded fake caches (what is copied where, partial
blocks, LRU order, pins). The engine is then driven with the prefix store on against transformers'
greedy output (= the store off): concurrent requests sharing a prefix, prefixes diverging
mid-block, eviction from a tiny pool, a tab's next turn, and the continuing-chunk graph plumbing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from meshnode.errors import ModelError
from meshnode.generation.api import SamplingParams
from meshnode.generation.cuda import compilecache
from meshnode.generation.cuda.compilecache import CompileCache
from meshnode.generation.cuda.prefill import budget_table
from meshnode.generation.cuda.prefix import PrefixStore
from meshnode.generation.cuda.sizing import plan_kv
from tests.cudakit import (
    EagerGraph,
    hf_greedy,
    make_engine,
    one_torch_thread,  # noqa: F401 - autouse fixture: one torch thread
    run,
    tiny_llama,
)

BLOCK = 8
"""Prefix block of the engine tests (small, so short prompts span several blocks)."""


# --------------------------------------------------------------------------------------------------
# PrefixStore alone
# --------------------------------------------------------------------------------------------------


def coded_cache(slots: int = 3, positions: int = 40) -> torch.Tensor:
    """A ``[layers, slots, 2, kv_heads, positions, head_dim]`` cache whose values encode (layer, slot,
    k/v, position), so a copy's source can be read off its values."""
    layers, heads, dim = 2, 1, 2
    cache = torch.zeros(layers, slots, 2, heads, positions, dim)
    for layer in range(layers):
        for slot in range(slots):
            for kv in range(2):
                cache[layer, slot, kv, :, :, :] = (
                    1000 * layer + 100 * slot + 10 * kv + torch.arange(positions, dtype=torch.float32)[:, None] / 100)
    return cache


def store(blocks: int = 8) -> PrefixStore:
    return PrefixStore(layers=2, kv_heads=1, head_dim=2, blocks=blocks, block_tokens=4, device=torch.device("cpu"),
                       dtype=torch.float32)


def test_match_copies_the_cached_positions_into_the_slot() -> None:
    cache, prefix = coded_cache(), store()
    tokens = list(range(10, 23))  # 13 tokens: 3 full blocks of 4
    assert prefix.insert(tokens, cache, slot=1) == 3
    match = prefix.match([*tokens[:11], 99, 98], limit=12)
    assert match.tokens == 11  # two full blocks and 3 of the third
    prefix.copy_into(match, cache, slot=2)
    prefix.release(match)
    torch.testing.assert_close(cache[:, 2, :, :, :11], coded_cache()[:, 1, :, :, :11])
    torch.testing.assert_close(cache[:, 2, :, :, 11:], coded_cache()[:, 2, :, :, 11:])  # nothing beyond


def test_match_respects_the_limit_and_counts() -> None:
    cache, prefix = coded_cache(), store()
    tokens = list(range(10, 26))
    prefix.insert(tokens, cache, slot=0)
    match = prefix.match(tokens, limit=len(tokens) - 1)
    assert match.tokens == 15  # the last token is always prefilled
    prefix.count(match, len(tokens))
    prefix.release(match)
    miss = prefix.match([1, 2, 3, 4, 5], limit=4)
    assert miss.tokens == 0 and miss.nodes == []
    prefix.count(miss, 5)
    stats = prefix.stats()
    assert stats["prefix_lookups"] == 2 and stats["prefix_hits"] == 1
    assert stats["prefix_tokens_reused"] == 15 and stats["prefix_tokens_looked_up"] == 19
    assert stats["prefix_bytes_used"] == 4 * prefix.block_bytes
    assert stats["prefix_bytes"] == 8 * prefix.block_bytes


def test_diverging_prefixes_share_their_common_blocks() -> None:
    cache, prefix = coded_cache(), store()
    first = list(range(10, 22))  # blocks A B C
    second = first[:6] + [77] * 6  # A, then B' diverging at its 3rd token
    assert prefix.insert(first, cache, slot=0) == 3
    assert prefix.insert(second, cache, slot=1) == 2  # B' and C' are new, A is shared
    assert prefix.blocks_used == 5
    match = prefix.match(second + [1], limit=12)
    assert match.tokens == 12
    prefix.copy_into(match, cache, slot=2)
    torch.testing.assert_close(cache[:, 2, :, :, :4], coded_cache()[:, 0, :, :, :4])  # A came from slot 0
    torch.testing.assert_close(cache[:, 2, :, :, 4:12], coded_cache()[:, 1, :, :, 4:12])


def test_lru_evicts_leaves_and_never_pinned_blocks() -> None:
    cache, prefix = coded_cache(), store(blocks=3)
    old = [1, 2, 3, 4, 5, 6, 7, 8]  # two blocks: a chain root -> leaf
    prefix.insert(old, cache, slot=0)
    pinned = prefix.match([9, 9, 9, 9, 0], limit=4)  # a miss pins nothing
    assert pinned.tokens == 0
    newer = [50, 51, 52, 53, 54]
    prefix.insert(newer, cache, slot=1)  # fills the pool
    held = prefix.match(old + [0], limit=8)  # pins the old chain and makes it the most recent
    assert held.tokens == 8
    assert prefix.insert([60, 61, 62, 63], cache, slot=2) == 1  # evicts `newer`, the only unpinned leaf
    assert prefix.stats()["prefix_evictions"] == 1
    assert prefix.match(newer, limit=4).tokens == 0
    assert prefix.insert([70, 71, 72, 73], cache, slot=2) == 1  # evicts [60..63], the unpinned leaf
    assert prefix.match([60, 61, 62, 63, 0], limit=4).tokens == 0
    also_held = prefix.match([70, 71, 72, 73, 0], limit=4)
    assert also_held.tokens == 4
    assert prefix.insert([80, 81, 82, 83], cache, slot=2) == 0  # every block pinned: nothing stored
    prefix.release(held)
    prefix.release(held)  # idempotent
    assert prefix.insert([80, 81, 82, 83], cache, slot=2) == 1  # the old chain's leaf goes first
    assert prefix.match(old, limit=8).tokens == 4  # its root block stayed (a parent outlives its children)
    prefix.release(also_held)
    assert prefix.stats()["prefix_evictions"] == 3


def test_store_refuses_an_empty_pool() -> None:
    with pytest.raises(ValueError, match="blocks"):
        store(blocks=0)


# --------------------------------------------------------------------------------------------------
# Sizing, calibration, compile cache
# --------------------------------------------------------------------------------------------------


def test_plan_splits_the_budget_between_prefix_and_slots() -> None:
    per_position, positions = 1000, 99
    plan = plan_kv(budget_bytes=10 * 100 * 1000 + 5, bytes_per_position=per_position, positions=positions,
                   slots_wanted=64, prefix_bytes_wanted=4 * 64 * 1000, block_tokens=64)
    assert plan.prefix_blocks == 3  # a quarter of the budget at most: 250 000 bytes / 64 000
    assert plan.slots == (10 * 100 * 1000 + 5 - 3 * 64 * 1000) // (100 * 1000)
    assert plan_kv(budget_bytes=None, bytes_per_position=per_position, positions=positions, slots_wanted=5,
                   prefix_bytes_wanted=0, block_tokens=64).slots == 5
    with pytest.raises(ModelError, match="even one"):
        plan_kv(budget_bytes=50_000, bytes_per_position=per_position, positions=positions, slots_wanted=4,
                prefix_bytes_wanted=0, block_tokens=64)


def test_budget_table_picks_the_widest_chunk_within_a_step() -> None:
    steps = {1: 1.0, 64: 2.0, 256: 4.0}
    chunks = {16: 0.3, 64: 0.7, 256: 1.4, 1024: 2.9, 4096: 11.0}
    assert budget_table(steps, chunks, ratio=0.75, slack=1.25) == {1: 64, 64: 256, 256: 1024}
    assert budget_table({1: 0.1}, chunks, ratio=0.75, slack=1.25) == {1: 16}  # never below the narrowest
    assert budget_table(steps, {}) == {}
    # A large model: every chunk pays a weight read (~one step), so the chunks as cheap as the
    # cheapest one are allowed even though none fits 75 % of a step.
    weight_bound = {16: 4.0, 64: 4.1, 128: 4.4, 256: 5.6, 1024: 20.0}
    assert budget_table({1: 4.5, 64: 8.0}, weight_bound, ratio=0.75, slack=1.25) == {1: 128, 64: 256}


def test_compile_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[bytes] = []
    monkeypatch.setattr(compilecache.torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", object()))
    monkeypatch.setattr(compilecache.torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data) or {})
    cache = CompileCache(tmp_path / "compile", signature="gpu|bf16|shape")
    assert not cache.load()
    assert cache.save() == len(b"artifacts")
    assert cache.load() and loaded == [b"artifacts"]
    assert CompileCache(tmp_path / "compile", signature="other").path != cache.path
    monkeypatch.setattr(compilecache.torch.compiler, "save_cache_artifacts", lambda: None)
    assert cache.save() == 0 and cache.path.read_bytes() == b"artifacts"  # nothing compiled: kept


def test_compile_cache_survives_a_bad_file(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path, signature="x")
    cache.path.write_bytes(b"not a torch artifact blob")
    assert not cache.load()


# --------------------------------------------------------------------------------------------------
# The engine with the prefix store on
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def reference_model() -> LlamaForCausalLM:
    return tiny_llama()


SHARED = [(j * 2654435761) % 3900 + 150 for j in range(29)]
"""A 29-token "system prompt": 3 full blocks of 8 and 5 tokens of a fourth."""


def suffix(index: int, length: int = 6) -> list[int]:
    return [(index * 7919 + j * 104729) % 3900 + 150 for j in range(length)]


def cached_engine(model: Any, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"prefix_cache_bytes": 64 * BLOCK * 512, "prefix_block_tokens": BLOCK}
    options.update(kwargs)
    return make_engine(model, **options)


def collect_all(engine: Any, prompts: list[list[int]], params: list[SamplingParams]) -> Any:
    async def scenario() -> list[list[int]]:
        async with engine:
            streams = [engine.generate(p, s) for p, s in zip(prompts, params, strict=True)]
            return list(await asyncio.gather(*(s.collect() for s in streams)))

    return run(scenario())


def test_concurrent_requests_sharing_a_prefix_equal_transformers(engine_model: Any, reference_model: Any) -> None:
    prompts = [SHARED + suffix(i, 3 + i) for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 2 * i) for i in range(6)]
    expected = [hf_greedy(reference_model, p, s.max_tokens) for p, s in zip(prompts, params, strict=True)]
    engine = cached_engine(engine_model)
    assert collect_all(engine, prompts, params) == expected
    info = engine.load_info()
    # Prompts after the first reuse the shared head (one waited a step for it rather than recompute).
    assert info["prefix_hits"] >= 5 and info["prefix_tokens_reused"] >= 5 * len(SHARED)
    assert engine.batch.prefiller.deferred >= 1
    assert info["prefix_bytes_used"] > 0 and info["prefix_bytes"] == 64 * BLOCK * 512


def test_prefixes_diverging_mid_block_and_later_arrivals(engine_model: Any, reference_model: Any) -> None:
    """A request that shares 13 tokens (1 block + 5) with the cached one reuses exactly those 13."""
    first = SHARED[:13] + suffix(1, 12)
    second = SHARED[:13] + suffix(2, 9)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    expected = [hf_greedy(reference_model, p, 10) for p in (first, second)]

    async def scenario(engine: Any) -> list[list[int]]:
        async with engine:
            one = await engine.generate(first, params).collect()
            reused = engine.load_info()["prefix_tokens_reused"]
            two = await engine.generate(second, params).collect()
            assert engine.load_info()["prefix_tokens_reused"] - reused == 13
            return [one, two]

    assert run(scenario(cached_engine(engine_model))) == expected


def test_outputs_unchanged_after_evictions(engine_model: Any, reference_model: Any) -> None:
    """A pool of 4 blocks with many different prefixes: blocks are evicted and reused for others
    while requests run, and every output still equals transformers'."""
    prompts = [suffix(100 + i, 20) + suffix(i, 4) for i in range(8)] + [suffix(100, 20) + suffix(50, 5)]
    params = [SamplingParams(temperature=0.0, max_tokens=6) for _ in prompts]
    expected = [hf_greedy(reference_model, p, 6) for p in prompts]
    engine = cached_engine(engine_model, prefix_cache_bytes=4 * BLOCK * 512, max_concurrent=3)
    assert collect_all(engine, prompts, params) == expected
    assert engine.load_info()["prefix_evictions"] > 0
    assert engine.load_info()["prefix_blocks_used"] <= 4


def test_a_tabs_next_turn_reuses_its_earlier_turn(engine_model: Any, reference_model: Any) -> None:
    """Turn 2 = turn 1's prompt + its answer + a new message: the answer's KV (written by decode
    steps) is reused too."""
    turn_one = SHARED + suffix(3, 4)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    answer = hf_greedy(reference_model, turn_one, 20)
    turn_two = turn_one + answer + suffix(4, 5)
    expected = hf_greedy(reference_model, turn_two, 8)

    async def scenario(engine: Any) -> list[int]:
        async with engine:
            assert await engine.generate(turn_one, params).collect() == answer
            before = engine.load_info()["prefix_tokens_reused"]
            ids = await engine.generate(turn_two, SamplingParams(temperature=0.0, max_tokens=8)).collect()
            reused = engine.load_info()["prefix_tokens_reused"] - before
            # Everything up to the last answer token whose KV was final is reused.
            assert reused >= (len(turn_one) + len(answer) - 1) // BLOCK * BLOCK
            return list(ids)

    assert run(scenario(cached_engine(engine_model))) == expected


def test_sampled_streams_do_not_depend_on_the_store(engine_model: Any) -> None:
    prompts = [SHARED + suffix(i, 5) for i in range(4)]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=70 + i, max_tokens=10) for i in range(4)]
    with_store = collect_all(cached_engine(engine_model), prompts, params)
    without = collect_all(make_engine(engine_model), prompts, params)
    assert with_store == without


def test_continuing_chunk_graphs_with_eager_replays(engine_model: Any, reference_model: Any) -> None:
    """The static-buffer path of the cached-prefill graphs (rows/width/span buckets, padding rows)."""
    prompts = [SHARED + suffix(i, 2 + 3 * i) for i in range(7)]
    params = [SamplingParams(temperature=0.0, max_tokens=5 + i) for i in range(7)]
    expected = [hf_greedy(reference_model, p, s.max_tokens) for p, s in zip(prompts, params, strict=True)]
    engine = cached_engine(engine_model, prefill_budget_tokens=32)
    graphs = engine.batch.graphs
    graphs.graphs = {(b, n): EagerGraph(graphs.step_body, b, n)
                     for b in graphs.batch_buckets for n in graphs.length_buckets}
    graphs.prefill_graphs = {shape: EagerGraph(graphs.prefill_body, *shape) for shape in graphs.prefill_shapes}
    calls: list[tuple[int, ...]] = []
    cached_body = graphs.cached_body
    graphs.cached_body = lambda *shape: (calls.append(shape), cached_body(*shape))[1]
    graphs.cached_graphs = {shape: EagerGraph(graphs.cached_body, *shape) for shape in graphs.cached_shapes}
    assert collect_all(engine, prompts, params) == expected
    assert calls and any(rows > 1 for rows, _, _ in calls)  # several newcomers continued in one replay


def test_long_prompt_in_chunks_with_the_store(engine_model: Any, reference_model: Any) -> None:
    """A prompt longer than the budget is prefilled in continuing chunks after its cached head."""
    long_prompt = SHARED + suffix(9, 30)
    short = SHARED + suffix(8, 3)
    params = SamplingParams(temperature=0.0, max_tokens=7)
    expected = [hf_greedy(reference_model, p, 7) for p in (short, long_prompt)]

    async def scenario(engine: Any) -> list[list[int]]:
        async with engine:
            first = engine.generate(short, SamplingParams(temperature=0.0, max_tokens=40))
            await anext(first)  # decoding: the budget applies
            got = [await engine.generate(p, params).collect() for p in (short, long_prompt)]
            await first.collect()
            return got

    assert run(scenario(cached_engine(engine_model, prefill_budget_tokens=16))) == expected


def test_build_engine_passes_the_cuda_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """engine.context_tokens / prefill_budget_tokens / prefix_cache_mib / compile_cache reach the
    CUDA engine; the CPU slot engine (fp16 weights) gets no prefix store and no compile cache, and
    the torch engine none of them."""
    from types import SimpleNamespace

    from meshnode.generation import factory
    from meshnode.generation.cuda.backend import CudaEngine
    from meshnode.generation.torch_backend import TorchEngine
    from meshnode.settings import EngineSettings

    seen: dict[str, Any] = {}
    monkeypatch.setattr(CudaEngine, "from_loaded", classmethod(lambda cls, loaded, **limits: seen.update(limits)))
    model = tiny_llama()
    loaded = SimpleNamespace(device=torch.device("cuda"), model=model, device_map=None)
    settings = EngineSettings(context_tokens=4096, prefix_cache_mib=16, prefill_budget_tokens=0)
    factory.build_engine(loaded, settings, progress=False, cache_dir=tmp_path)
    assert seen["context_tokens"] == 4096 and seen["prefix_cache_bytes"] == 16 << 20
    assert seen["prefill_budget_tokens"] is None  # 0 = measured at warm-up
    assert seen["compile_cache"] == tmp_path / "compile" and seen["max_batch_tokens"] == 0
    assert seen["fp16_weights"] is False
    seen.clear()
    factory.build_engine(SimpleNamespace(device=torch.device("cpu"), model=model, device_map=None), settings,
                         progress=False, cache_dir=tmp_path)
    assert seen["fp16_weights"] is True and "prefix_cache_bytes" not in seen and "compile_cache" not in seen
    seen.clear()
    monkeypatch.setattr(TorchEngine, "from_loaded", classmethod(lambda cls, loaded, **limits: seen.update(limits)))
    factory.build_engine(SimpleNamespace(device=torch.device("cpu"), model=tiny_llama().to(torch.float64),
                                         device_map=None), settings, progress=False)
    assert set(seen) == {"max_queue", "max_prompt_tokens", "max_tokens_limit", "max_batch_tokens", "max_concurrent"}


def test_prefill_budget_follows_the_running_batch(engine_model: Any) -> None:
    prefiller = make_engine(engine_model).batch.prefiller
    assert prefiller.budget(0) == prefiller.capacity == 4 * 4096  # nothing decodes: nobody waits
    assert prefiller.budget(3) == 4096  # not calibrated (no GPU): the default
    prefiller.budgets = {1: 64, 8: 256}
    assert (prefiller.budget(1), prefiller.budget(3), prefiller.budget(8)) == (64, 256, 256)
    fixed = make_engine(engine_model, prefill_budget_tokens=32).batch.prefiller
    fixed.budgets = {1: 64}
    assert (fixed.budget(0), fixed.budget(5)) == (128, 32)  # a configured budget wins
