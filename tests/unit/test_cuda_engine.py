"""CudaEngine and its parts: SlotDecoder forward, GPU sampler, slot engine, on tiny random models.

The decoder, sampler and engine loop run on the CPU here (float32, no graphs): the same forward the
GPU runs. Tests that need CUDA (graphs, compiled helpers, bf16) skip only when no CUDA device is
present; they run on the lent GPU in the engine's verification.

Tests are plain functions that drive the engine with ``asyncio.run`` so that they also run where
pytest-asyncio is not installed (the GPU machine).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from bench.lab.fakes import CharTokenizer
from meshnode.errors import AdmissionError
from meshnode.generation.api import SamplingParams, TokenEngine, TokenStream
from meshnode.generation.cuda.backend import CudaEngine
from meshnode.generation.cuda.decoder import SlotDecoder, supports_model
from meshnode.generation.cuda.sampler import sample_row_exact, sample_rows, sample_rows_exact, seed_key
from meshnode.generation.engine import Engine
from meshnode.generation.torch_backend import TorchEngine
from tests.cudakit import (
    EagerGraph,
    hf_greedy,
    make_engine,
    needs_cuda,
    one_torch_thread,  # noqa: F401 - autouse fixture: one torch thread
    prompt,
    run,
    tiny_llama,
    tiny_qwen,
)

# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen], ids=["llama", "qwen2"])
def test_decoder_logits_match_transformers(factory: Any) -> None:
    """Prefill (in two chunks) + decode steps give the logits of transformers' full forward."""
    model = factory()
    ids = prompt(5) + prompt(2)
    with torch.inference_mode():
        reference = model(torch.tensor([ids])).logits[0].float()
        decoder = SlotDecoder(model, slots=4, max_len=64)
        slot = torch.tensor([2])
        cut = 9
        first = decoder.prefill(torch.tensor([ids[:cut]]), slot, [0], [cut])
        torch.testing.assert_close(first[0], reference[cut - 1], rtol=1e-4, atol=1e-4)
        second = decoder.prefill(torch.tensor([ids[cut:14]]), slot, [cut], [14 - cut])
        torch.testing.assert_close(second[0], reference[13], rtol=1e-4, atol=1e-4)
        # Decode the rest one token at a time in slot 2 of a batch of 4 (other rows idle).
        logits = torch.empty(4, decoder.vocab)
        for position in range(14, len(ids)):
            tokens = torch.tensor([0, 0, ids[position], 0])
            positions = torch.tensor([decoder.scratch, decoder.scratch, position, decoder.scratch])
            decoder.decode(tokens, positions, 32, logits)
            torch.testing.assert_close(logits[2], reference[position], rtol=1e-4, atol=1e-4)
    # Fusing repointed the module weights at views: transformers' forward is unchanged.
    with torch.inference_mode():
        again = model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(again, reference)


def test_batched_prefill_with_padding_matches_single() -> None:
    model = tiny_llama()
    prompts = [prompt(1), prompt(4), prompt(2)]
    with torch.inference_mode():
        decoder = SlotDecoder(model, slots=3, max_len=64)
        width = max(map(len, prompts))
        tokens = torch.zeros(3, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        batched = decoder.prefill(tokens, torch.tensor([0, 1, 2]), [0, 0, 0], list(map(len, prompts)))
        for i, p in enumerate(prompts):
            reference = model(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(batched[i], reference, rtol=1e-4, atol=1e-4)


def test_supports_model_refuses_other_architectures() -> None:
    class Fake:
        config = type("C", (), {"model_type": "gpt2"})()

    assert supports_model(tiny_llama()) is None
    assert "gpt2" in (supports_model(Fake()) or "")


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


def test_sampler_matches_exact_reference_row_by_row() -> None:
    torch.manual_seed(3)
    vocab, rows = 1000, 12
    settings = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.8),
        SamplingParams(temperature=2.0, top_k=1),
    ]
    for trial in range(4):
        logits = torch.randn(rows, vocab) * (1 + 3 * trial)
        params = [settings[(i + trial) % len(settings)] for i in range(rows)]
        keys = [seed_key(1000 * trial + i) for i in range(rows)]
        counters = [trial * 7 + i for i in range(rows)]
        ids, overflow = sample_rows(
            logits,
            torch.tensor([p.temperature for p in params]),
            torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params]),
            torch.tensor(keys),
            torch.tensor(counters),
            64,
        )
        for i, p in enumerate(params):
            exact = sample_row_exact(logits[i], p, keys[i], counters[i])
            if not overflow[i]:
                assert int(ids[i]) == exact, (trial, i, p)
            if p.top_k and p.top_k <= 64:
                assert not overflow[i]
            if p.greedy:
                assert exact == int(logits[i].argmax())


def test_sampler_without_whole_vocabulary_rows_picks_the_same() -> None:
    """Skipping the whole-vocabulary noise (no row samples without top-k/top-p: the Legion
    default, temperature 0.7 with top_p 0.95) leaves every other row's pick unchanged."""
    from meshnode.generation.cuda.slots import samples_whole_vocabulary

    torch.manual_seed(5)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.95),
              SamplingParams(temperature=0.9, top_k=8), SamplingParams(temperature=1.2, top_k=20, top_p=0.5)]
    assert not any(samples_whole_vocabulary(p) for p in params)
    assert samples_whole_vocabulary(SamplingParams(temperature=0.7))
    for trial in range(3):
        logits = torch.randn(len(params), 3000) * (1 + trial)
        inputs = (logits, torch.tensor([p.temperature for p in params]), torch.tensor([p.top_k for p in params]),
                  torch.tensor([p.top_p for p in params]), torch.tensor([seed_key(7 + i) for i in range(len(params))]),
                  torch.tensor([trial] * len(params)), 64)
        full, full_overflow = sample_rows(*inputs)
        trimmed, trimmed_overflow = sample_rows(*inputs, whole_vocabulary=False)
        assert torch.equal(full, trimmed) and torch.equal(full_overflow, trimmed_overflow)


def test_batched_exact_sampler_matches_row_reference() -> None:
    torch.manual_seed(4)
    params = [
        SamplingParams(temperature=1.2, top_p=0.95),
        SamplingParams(temperature=0.8, top_k=300, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=500),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0),
    ]
    logits = torch.randn(len(params), 2000) * 2
    keys = [seed_key(50 + i) for i in range(len(params))]
    counters = [3, 1, 4, 1, 5]
    batched = sample_rows_exact(logits, params, keys, counters)
    single = [sample_row_exact(logits[i], p, keys[i], counters[i]) for i, p in enumerate(params)]
    assert batched == single


def test_sampler_flags_nucleus_beyond_candidates() -> None:
    logits = torch.zeros(1, 500)  # uniform: a 0.9 nucleus needs 450 tokens, more than 16
    _, overflow = sample_rows(
        logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.9]),
        torch.tensor([seed_key(1)]), torch.tensor([0]), 16,
    )
    assert bool(overflow[0])
    _, overflow = sample_rows(
        logits, torch.tensor([1.0]), torch.tensor([100]), torch.tensor([1.0]),
        torch.tensor([seed_key(1)]), torch.tensor([0]), 16,
    )
    assert bool(overflow[0])


def test_sampler_distribution_follows_softmax() -> None:
    """Counter-based Gumbel noise draws from softmax(logits / T) (chi-square-ish bound)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 0.2, -3.0, 1.5]]).repeat(4000, 1)
    temperature = torch.full((4000,), 0.8)
    ids, _ = sample_rows(
        logits, temperature, torch.zeros(4000, dtype=torch.long), torch.ones(4000),
        torch.full((4000,), seed_key(7)), torch.arange(4000), 8,
    )
    counts = torch.bincount(ids, minlength=8).float() / 4000
    expected = torch.softmax(logits[0] / 0.8, dim=-1)
    assert (counts - expected).abs().max() < 0.03


# --------------------------------------------------------------------------------------------------
# Engine on the CPU (eager forward, same loop)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def reference_model() -> LlamaForCausalLM:
    return tiny_llama()  # same seed, separate instance (the engine fuses its model's weights)


def test_engine_satisfies_protocol_and_reports_load(engine_model: Any) -> None:
    engine = make_engine(engine_model)
    assert isinstance(engine, TokenEngine)
    info = engine.load_info()
    assert {k: info[k] for k in ("active", "queued", "max_concurrent", "max_queue")} == {
        "active": 0, "queued": 0, "max_concurrent": 8, "max_queue": 16}
    assert info["kv_slots"] == 8 and info["kv_positions"] == 128
    assert "prefix_hits" not in info  # the prefix store is off on the CPU unless asked for
    assert engine.max_len == 128
    assert not engine.batch.use_graphs


def test_greedy_streams_join_and_leave_equal_transformers(
    engine_model: Any, reference_model: Any
) -> None:
    """Staggered joins, ragged prompts, different leave times, more requests than slots."""
    count = 12
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 3 * i) for i in range(count)]
    expected = [hf_greedy(reference_model, prompt(i), params[i].max_tokens) for i in range(count)]

    async def scenario() -> list[list[int]]:
        async with make_engine(engine_model, max_concurrent=5, prefill_budget_tokens=16) as engine:
            streams: list[TokenStream] = []
            firsts: list[list[int]] = []
            for i in range(count):
                streams.append(engine.generate(prompt(i), params[i]))
                if i % 3 == 1:
                    firsts.append((await anext(streams[-1])).ids)  # next ones join mid-flight
                else:
                    firsts.append([])
            rest = await asyncio.gather(*(s.collect() for s in streams))
            assert all(s.finish_reason == "length" for s in streams)
            assert all(s.ttft_seconds is not None for s in streams)
            assert engine.load_info()["active"] == 0
            assert engine.batch.prefill_steps >= 3
            return [f + r for f, r in zip(firsts, rest, strict=True)]

    assert run(scenario()) == expected


def test_seeded_sampling_independent_of_batch(engine_model: Any) -> None:
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=42 + i, max_tokens=10) for i in range(4)]

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        async with make_engine(engine_model) as engine:
            alone = [await engine.generate(prompt(i), params[i]).collect() for i in range(4)]
            together = await asyncio.gather(
                *(engine.generate(prompt(i), params[i]).collect() for i in range(4))
            )
            return alone, list(together)

    alone, together = run(scenario())
    assert alone == together
    assert len({tuple(a) for a in alone}) == 4


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=12),
        SamplingParams(temperature=1.5, top_p=0.99, seed=12, max_tokens=12),  # nucleus > candidates
        SamplingParams(temperature=1.0, seed=13, max_tokens=12),
    ],
    ids=["top-k", "top-p-overflow", "plain"],
)
def test_sampled_tokens_follow_the_reference_sampler(
    engine_model: Any, reference_model: Any, params: SamplingParams
) -> None:
    """Each sampled id is sample_row_exact(transformers' logits, seed, token index): the counter-based
    draw is a pure function of the request, also on the overflow path (resampled exactly)."""

    async def scenario() -> tuple[list[int], int]:
        async with make_engine(engine_model) as engine:
            others = [engine.generate(prompt(i), params.__class__(temperature=0.0, max_tokens=12)) for i in (2, 3)]
            ids = await engine.generate(prompt(1), params).collect()
            await asyncio.gather(*(o.collect() for o in others))
            return ids, engine.batch.overflow_rows

    ids, overflows = run(scenario())
    assert len(ids) == 12
    key = seed_key(params.seed or 0)
    with torch.inference_mode():
        for index in range(len(ids)):
            logits = reference_model(torch.tensor([prompt(1) + ids[:index]])).logits[0, -1]
            assert ids[index] == sample_row_exact(logits, params, key, index), index
    if params.top_p < 1:
        assert overflows >= 12


def test_cancel_frees_the_slot_and_others_unchanged(engine_model: Any, reference_model: Any) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=30)
    expected = [hf_greedy(reference_model, prompt(i), 30) for i in (0, 2)]

    async def scenario() -> None:
        async with make_engine(engine_model, max_concurrent=2) as engine:
            victim = engine.generate(prompt(1), SamplingParams(temperature=0.0, max_tokens=60))
            first = engine.generate(prompt(0), params)
            await anext(victim)
            victim.cancel()
            second = engine.generate(prompt(2), params)  # needs the victim's slot
            got = await asyncio.gather(first.collect(), second.collect())
            await victim.finished.wait()
            assert victim.finish_reason == "cancel"
            assert list(got) == expected
            assert engine.load_info()["active"] == 0

    run(scenario())


def test_stop_ids_and_strings(engine_model: Any, reference_model: Any) -> None:
    full = hf_greedy(reference_model, prompt(3), 20)
    stop_id = full[5]
    text = CharTokenizer().decode(full)
    stop_text = text[len(CharTokenizer().decode(full[:8])) :][:3]

    async def scenario() -> None:
        async with make_engine(engine_model) as engine:
            by_id = engine.generate(prompt(3), SamplingParams(temperature=0.0, max_tokens=20, stop_ids=(stop_id,)))
            assert await by_id.collect() == full[: full.index(stop_id)]
            assert by_id.finish_reason == "stop"
            by_text = engine.generate(prompt(3), SamplingParams(temperature=0.0, max_tokens=20, stop=stop_text))
            ids = await by_text.collect()
            assert by_text.finish_reason == "stop"
            assert stop_text not in CharTokenizer().decode(ids)
            assert ids == full[: len(ids)]

    run(scenario())


def test_admission_checks_slot_capacity(engine_model: Any) -> None:
    async def scenario() -> None:
        # The model's context (512) caps a slot below max_prompt_tokens + max_tokens_limit.
        async with make_engine(engine_model, max_prompt_tokens=400, max_tokens_limit=400) as engine:
            assert engine.max_len == 512
            with pytest.raises(AdmissionError) as caught:
                engine.generate(list(range(100, 400)), SamplingParams(max_tokens=300, temperature=0.0))
            assert caught.value.field == "max_tokens"
            ok = engine.generate(list(range(100, 110)), SamplingParams(max_tokens=4, temperature=0.0))
            assert len(await ok.collect()) == 4

    run(scenario())


def test_kv_memory_limits_the_slots(engine_model: Any) -> None:
    per_row = SlotDecoder.kv_bytes_per_position(engine_model) * 129
    engine = make_engine(engine_model, max_concurrent=8, kv_memory_bytes=3 * per_row + 1)
    assert engine.max_concurrent == 3
    assert engine.load_info()["max_concurrent"] == 3


def test_compaction_keeps_outputs(engine_model: Any, reference_model: Any) -> None:
    """Rows leave from the bottom slots while top ones run on: they move down, outputs unchanged."""
    lengths = [2, 2, 2, 2, 2, 2, 40, 40]
    expected = [hf_greedy(reference_model, prompt(i), n) for i, n in enumerate(lengths)]

    async def scenario() -> list[list[int]]:
        async with make_engine(engine_model) as engine:
            streams = [
                engine.generate(prompt(i), SamplingParams(temperature=0.0, max_tokens=n))
                for i, n in enumerate(lengths)
            ]
            return list(await asyncio.gather(*(s.collect() for s in streams)))

    assert run(scenario()) == expected


def test_graph_plumbing_with_eager_replays(engine_model: Any, reference_model: Any) -> None:
    """The static-buffer paths the graphs replay (bucketed rows/widths, padding rows) on the CPU."""
    count = 7
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i) for i in range(count)]
    expected = [hf_greedy(reference_model, prompt(i), params[i].max_tokens) for i in range(count)]

    async def scenario() -> list[list[int]]:
        engine = make_engine(engine_model, prefill_budget_tokens=32)
        graphs = engine.batch.graphs
        graphs.graphs = {(b, n): EagerGraph(graphs.step_body, b, n)
                         for b in graphs.batch_buckets for n in graphs.length_buckets}
        graphs.prefill_graphs = {shape: EagerGraph(graphs.prefill_body, *shape) for shape in graphs.prefill_shapes}
        async with engine:
            streams = [engine.generate(prompt(i), params[i]) for i in range(count)]
            return list(await asyncio.gather(*(s.collect() for s in streams)))

    assert run(scenario()) == expected


# --------------------------------------------------------------------------------------------------
# CUDA only (graphs, compiled helpers): skipped without a GPU, run on the lent GPU
# --------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "graphs+compile"])
def test_cuda_graph_engine_matches_transformers_fp32(compiled: bool) -> None:
    model = tiny_qwen(device="cuda")
    reference = tiny_qwen(device="cuda")
    count = 10
    params = [SamplingParams(temperature=0.0, max_tokens=5 + 4 * i) for i in range(count)]
    expected = [hf_greedy(reference, prompt(i), params[i].max_tokens) for i in range(count)]

    async def scenario() -> list[list[int]]:
        engine = make_engine(model, max_concurrent=8, use_compile=compiled, prefill_budget_tokens=16)
        async with engine:
            await engine.wait_ready()
            assert engine.batch.use_graphs and len(engine.batch.graphs.graphs) > 0
            assert len(engine.batch.graphs.prefill_graphs) > 0
            assert engine.batch.use_compile == compiled  # compiled helpers did not fall back
            streams = [engine.generate(prompt(i), params[i]) for i in range(count)]
            return list(await asyncio.gather(*(s.collect() for s in streams)))

    torch.backends.cuda.matmul.allow_tf32 = False
    assert run(scenario()) == expected


@needs_cuda
def test_cuda_bf16_sampled_streams_are_reproducible() -> None:
    model = tiny_llama(device="cuda").to(torch.bfloat16)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=5 + i, max_tokens=24) for i in range(6)]

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        async with make_engine(model, max_concurrent=8) as engine:
            await engine.wait_ready()
            together = list(
                await asyncio.gather(*(engine.generate(prompt(i), params[i]).collect() for i in range(6)))
            )
            alone = [await engine.generate(prompt(i), params[i]).collect() for i in range(6)]
            return together, alone

    together, alone = run(scenario())
    assert together == alone
    assert all(len(ids) == 24 for ids in alone)


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "graphs+compile"])
def test_cuda_prefix_reuse_equals_transformers_without_host_syncs(compiled: bool, tmp_path: Any) -> None:
    """With the prefix store on, replayed first-chunk and continuing-chunk graphs give transformers'
    greedy ids; once warm, serving makes no synchronising CUDA call (sync debug mode "error" turns
    any into a failed request); the compile cache is written after a compiled warm-up."""
    model = tiny_qwen(device="cuda")
    reference = tiny_qwen(device="cuda")
    shared = prompt(20)
    prompts = [shared + prompt(i)[: 3 + i] for i in range(10)]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 3 * i) for i in range(10)]
    torch.backends.cuda.matmul.allow_tf32 = False
    expected = [hf_greedy(reference, p, s.max_tokens) for p, s in zip(prompts, params, strict=True)]

    async def scenario() -> list[list[int]]:
        engine = make_engine(model, max_concurrent=8, use_compile=compiled, prefill_budget_tokens=32,
                             prefix_cache_bytes=1 << 20, prefix_block_tokens=8,
                             compile_cache=tmp_path if compiled else None)
        async with engine:
            await engine.wait_ready()
            assert engine.batch.graphs.cached_graphs and engine.batch.use_compile == compiled
            torch.cuda.set_sync_debug_mode("error")
            try:
                streams = [engine.generate(p, s) for p, s in zip(prompts[:5], params[:5], strict=True)]
                firsts = [(await anext(streams[0])).ids] + [[] for _ in range(4)]
                for p, s in zip(prompts[5:], params[5:], strict=True):  # arrivals while others decode
                    streams.append(engine.generate(p, s))
                    firsts.append((await anext(streams[-1])).ids)
                rest = await asyncio.gather(*(stream.collect() for stream in streams))
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert all(stream.finish_reason == "length" for stream in streams), [s.error for s in streams]
            assert engine.load_info()["prefix_hits"] >= 8
        return [first + list(ids) for first, ids in zip(firsts, rest, strict=True)]

    assert run(scenario()) == expected
    if compiled:
        assert list(tmp_path.glob("inductor-*.bin"))


def test_torch_engine_is_unchanged_on_cpu(engine_model: Any) -> None:
    """The CPU path stays TorchEngine: both are Engines over their own backend, the CUDA one chosen
    only for CUDA devices."""
    assert CudaEngine is not TorchEngine
    assert issubclass(CudaEngine, Engine) and issubclass(TorchEngine, Engine)
    assert not issubclass(CudaEngine, TorchEngine)
