"""TorchEngine: continuous batching, cancellation, sampling, stops and admission, on a tiny model.

The model is the tiny random Llama of test-harness §11.2 (float32, ``initializer_range=0.2`` so
greedy output varies instead of repeating one token). A character-level fake tokenizer stands in
for the real one: stop-string handling needs only ``decode``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.lab.fakes import CharTokenizer
from meshnode.errors import AdmissionError
from meshnode.generation import torch_backend as engine_module
from meshnode.generation.api import SamplingParams, TokenEngine, TokenStream
from meshnode.generation.text import HFText
from meshnode.generation.torch_backend import TorchEngine, sample_next_token

TIMEOUT_SECONDS = 20.0
"""Bound for every async test (the machine is shared; a run normally takes well under 1 s)."""

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny model's ops are too small to share; one thread avoids OpenMP stalls on a busy host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def make_engine(model: LlamaForCausalLM, **kwargs: Any) -> TorchEngine:
    options: dict[str, Any] = {"model_id": "tiny", "max_concurrent": 8, "max_queue": 8}
    options.update(kwargs)
    return TorchEngine(model, CharTokenizer(), **options)


@pytest.fixture
async def engine(tiny_model: LlamaForCausalLM) -> AsyncIterator[TorchEngine]:
    async with make_engine(tiny_model) as running:
        yield running


def prompt(index: int) -> list[int]:
    """Prompts of different lengths, so the batch is ragged."""
    return [(index * 7919 + j * 104729) % 49000 + 100 for j in range(3 + 2 * index)]


async def solo(engine: TorchEngine, ids: list[int], params: SamplingParams) -> list[int]:
    """The output of a request that has the engine to itself."""
    assert engine.load_info()["active"] == 0
    return await engine.generate(ids, params).collect()


async def test_engine_satisfies_protocol(engine: TorchEngine) -> None:
    assert isinstance(engine, TokenEngine)
    assert engine.model_id == "tiny"
    assert engine.load_info() == {"active": 0, "queued": 0, "max_concurrent": 8, "max_queue": 8}


async def test_solo_matches_model_generate(engine: TorchEngine, tiny_model: LlamaForCausalLM) -> None:
    """Naive reference (transformers' own generate) equals the engine at temperature 0."""
    async with asyncio.timeout(TIMEOUT_SECONDS):
        for index in (0, 3):
            ids = prompt(index)
            got = await solo(engine, ids, GREEDY)
            with torch.inference_mode():
                ref = tiny_model.generate(
                    torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0
                )
            assert got == ref[0, len(ids) :].tolist()


async def test_eight_concurrent_greedy_equal_alone(engine: TorchEngine) -> None:
    """Staggered joins, different prompt lengths and different leave times: same tokens as alone."""
    async with asyncio.timeout(TIMEOUT_SECONDS):
        params = [SamplingParams(temperature=0.0, max_tokens=12 + 3 * i) for i in range(8)]
        alone = [await solo(engine, prompt(i), params[i]) for i in range(8)]
        assert len({tuple(a) for a in alone}) == 8, "prompts should give distinct outputs"

        streams: list[TokenStream] = []
        firsts: list[list[int]] = []
        for i in range(8):
            streams.append(engine.generate(prompt(i), params[i]))
            if i % 2 == 1:
                # Wait until this one runs, so the next ones join a batch mid-flight.
                firsts.append((await anext(streams[-1])).ids)
            else:
                firsts.append([])
        rest = await asyncio.gather(*(s.collect() for s in streams))
        together = [f + r for f, r in zip(firsts, rest, strict=True)]
        assert together == alone
        assert all(s.finish_reason == "length" for s in streams)
        assert engine.load_info()["active"] == 0


async def test_cancel_stops_within_one_step_and_others_unchanged(engine: TorchEngine) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        params = SamplingParams(temperature=0.0, max_tokens=48)
        alone = [await solo(engine, prompt(i), params) for i in range(4)]

        streams = [engine.generate(prompt(i), params) for i in range(4)]
        victim = streams[1]
        received: list[int] = []
        async for chunk in victim:
            received.extend(chunk.ids)
            if len(received) >= 3:
                break
        delivered_at_cancel = victim.completion_tokens
        victim.cancel()
        others = await asyncio.gather(*(streams[i].collect() for i in (0, 2, 3)))
        await victim.finished.wait()

        assert victim.finish_reason == "cancel"
        assert victim.completion_tokens - delivered_at_cancel <= 1
        assert victim.completion_tokens < 48
        tail = await victim.collect()
        assert received + tail == alone[1][: len(received) + len(tail)]
        assert others == [alone[0], alone[2], alone[3]]


async def test_cancelling_the_consumer_task_cancels_the_request(engine: TorchEngine) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        stream = engine.generate(prompt(2), SamplingParams(temperature=0.0, max_tokens=400))
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                started.set()

        async with asyncio.TaskGroup() as group:
            task = group.create_task(consume(), name="test.consumer")
            await started.wait()
            task.cancel()
        await stream.finished.wait()
        assert stream.finish_reason == "cancel"
        assert stream.completion_tokens < 400


async def test_leaving_async_with_cancels(engine: TorchEngine) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        async with engine.generate(prompt(1), SamplingParams(temperature=0.0, max_tokens=400)) as stream:
            async for _ in stream:
                break
        await stream.finished.wait()
        assert stream.finish_reason == "cancel"


async def test_cancel_while_queued(tiny_model: LlamaForCausalLM) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS), make_engine(tiny_model, max_concurrent=1) as engine:
        running = engine.generate(prompt(0), SamplingParams(temperature=0.0, max_tokens=60))
        queued = engine.generate(prompt(1), GREEDY)
        queued.cancel()
        assert await queued.collect() == []
        assert queued.finish_reason == "cancel"
        assert len(await running.collect()) == 60


async def test_seed_reproducibility(engine: TorchEngine) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_tokens=20)
        first = await solo(engine, prompt(2), params)
        again = await solo(engine, prompt(2), params)
        other = await solo(engine, prompt(2), SamplingParams(temperature=1.0, seed=1235, max_tokens=20))
        assert first == again
        assert first != other
        # The private RNG makes batch company irrelevant too.
        streams = [engine.generate(prompt(i), params) for i in range(4)]
        together = await asyncio.gather(*(s.collect() for s in streams))
        assert together[2] == first


async def test_max_tokens(engine: TorchEngine) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        stream = engine.generate(prompt(0), SamplingParams(temperature=0.0, max_tokens=7))
        ids = await stream.collect()
        assert len(ids) == 7
        assert stream.finish_reason == "length"
        assert stream.completion_tokens == 7
        assert stream.ttft_seconds is not None and stream.ttft_seconds > 0


async def test_stop_ids_and_eos(tiny_model: LlamaForCausalLM) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        async with make_engine(tiny_model) as engine:
            full = await solo(engine, prompt(4), GREEDY)
        cut = next(i for i in range(3, len(full)) if full[i] not in full[:i])
        stop_id = full[cut]

        async with make_engine(tiny_model) as engine:
            stream = engine.generate(
                prompt(4), SamplingParams(temperature=0.0, max_tokens=24, stop_ids=(stop_id,))
            )
            assert await stream.collect() == full[:cut]
            assert (stream.finish_reason, stream.matched_stop) == ("stop", stop_id)

        async with make_engine(tiny_model, eos_ids=(stop_id,)) as engine:
            stream = engine.generate(prompt(4), GREEDY)
            assert await stream.collect() == full[:cut]
            assert stream.finish_reason == "stop"


async def test_stop_strings(engine: TorchEngine) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        tokenizer = CharTokenizer()
        full = await solo(engine, prompt(5), GREEDY)
        text = tokenizer.decode(full)
        start = len(tokenizer.decode(full[:6])) + 1
        stop = text[start : start + 3]
        at = text.find(stop)
        expected = max(j for j in range(len(full) + 1) if len(tokenizer.decode(full[:j])) <= at)

        stream = engine.generate(
            prompt(5), SamplingParams(temperature=0.0, max_tokens=24, stop=("zzzzzz", stop))
        )
        chunks = [chunk async for chunk in stream]
        ids = [i for c in chunks for i in c.ids]
        assert ids == full[:expected]
        assert stop not in tokenizer.decode(ids)
        assert (stream.finish_reason, stream.matched_stop) == ("stop", stop)
        assert chunks[-1].finish_reason == "stop"


class SentencePieceLikeTokenizer(CharTokenizer):
    """Every fourth id starts a word with a space, and decoding drops the leading space."""

    @staticmethod
    def piece(token: int) -> str:
        return (" " if token % 4 == 0 else "") + CharTokenizer.piece(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.piece(i) for i in ids).lstrip(" ")


async def test_stop_string_at_a_word_start(tiny_model: LlamaForCausalLM) -> None:
    """A stop string starting with a space is found even when the tail is decoded alone."""
    async with asyncio.timeout(TIMEOUT_SECONDS):
        tokenizer = SentencePieceLikeTokenizer()
        async with TorchEngine(tiny_model, tokenizer, model_id="tiny") as engine:
            for index in range(8):
                full = await solo(engine, prompt(index), GREEDY)
                starts = [j for j in range(2, len(full) - 1) if full[j] % 4 == 0]
                if starts:
                    break
            else:
                pytest.skip("no word start in the greedy outputs")
            j = starts[0]
            stop = tokenizer.piece(full[j]) + tokenizer.piece(full[j + 1])[0]
            text = tokenizer.decode(full)
            at = text.find(stop)
            expected = max(k for k in range(len(full) + 1) if len(tokenizer.decode(full[:k])) <= at)
            stream = engine.generate(
                prompt(index), SamplingParams(temperature=0.0, max_tokens=24, stop=stop)
            )
            assert await stream.collect() == full[:expected]
            assert (stream.finish_reason, stream.matched_stop) == ("stop", stop)


async def test_held_back_stop_prefix_is_flushed_at_length(engine: TorchEngine) -> None:
    """Ids held back because they might start a stop string are emitted when it never completes."""
    async with asyncio.timeout(TIMEOUT_SECONDS):
        tokenizer = CharTokenizer()
        full = await solo(engine, prompt(6), GREEDY)
        stop = tokenizer.decode(full)[-1] + "QQ"  # the last character starts it; never completes
        stream = engine.generate(prompt(6), SamplingParams(temperature=0.0, max_tokens=24, stop=stop))
        chunks = [chunk async for chunk in stream]
        assert [i for c in chunks for i in c.ids] == full
        assert stream.finish_reason == "length"
        assert chunks[-1].ids, "the held-back ids arrive with the final chunk"


async def test_slow_consumer_coalesces(tiny_model: LlamaForCausalLM) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        async with make_engine(tiny_model, stream_buffer_chunks=2) as engine:
            full = await solo(engine, prompt(3), GREEDY)
            stream = engine.generate(prompt(3), GREEDY)
            await stream.finished.wait()
            chunks = [chunk async for chunk in stream]
        assert len(chunks) <= 2
        assert [i for c in chunks for i in c.ids] == full
        assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop"),
        ({"stop": ("x",) * 17}, "stop"),
        ({"stop_ids": (-1,)}, "stop_ids"),
    ],
)
def test_sampling_params_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(AdmissionError) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field == field


def test_sampling_params_normalise_stop() -> None:
    params = SamplingParams(stop="END", stop_ids=[5, 6])  # type: ignore[arg-type]
    assert params.stop == ("END",)
    assert params.stop_ids == (5, 6)


async def test_admission_errors(tiny_model: LlamaForCausalLM) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        async with make_engine(tiny_model, max_prompt_tokens=16, max_tokens_limit=32) as engine:
            cases: list[tuple[list[Any], SamplingParams, str]] = [
                ([], GREEDY, "prompt"),
                (list(range(100, 117)), GREEDY, "prompt"),
                ([1, 2, 49152], GREEDY, "prompt"),
                ([1, "2"], GREEDY, "prompt"),
                ([1, 2], SamplingParams(max_tokens=33), "max_tokens"),
            ]
            for ids, params, field in cases:
                with pytest.raises(AdmissionError) as caught:
                    engine.generate(ids, params)
                assert caught.value.field == field, ids
            assert "limit is 16" in str(
                pytest.raises(AdmissionError, engine.generate, list(range(100, 117))).value
            )
        no_tokenizer = TorchEngine(tiny_model, None)
        with pytest.raises(AdmissionError) as caught:
            no_tokenizer.generate([1, 2], SamplingParams(stop=("x",)))
        assert caught.value.field == "stop"
        await no_tokenizer.close()


async def test_queueing_and_queue_full(tiny_model: LlamaForCausalLM) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        params = SamplingParams(temperature=0.0, max_tokens=30)
        async with make_engine(tiny_model, max_concurrent=2, max_queue=2) as engine:
            alone = [await solo(engine, prompt(i), params) for i in range(4)]
            streams = [engine.generate(prompt(i), params) for i in range(4)]
            info = engine.load_info()
            assert info["active"] + info["queued"] == 4
            assert info["active"] <= 2
            with pytest.raises(AdmissionError) as caught:
                engine.generate(prompt(5), params)
            assert caught.value.field is None
            assert "busy" in str(caught.value)
            assert await asyncio.gather(*(s.collect() for s in streams)) == alone
            assert engine.load_info()["active"] == engine.load_info()["queued"] == 0


async def test_error_in_one_request_fails_only_that_one(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        alone = [await solo(engine, prompt(i), GREEDY) for i in range(2)]
        real = engine_module.sample_next_token

        def flaky(logits: torch.Tensor, params: SamplingParams, generator: Any) -> int:
            if params.seed == 666 and generator is not None and params.max_tokens == 23:
                raise RuntimeError("injected failure")
            return real(logits, params, generator)

        monkeypatch.setattr(engine_module, "sample_next_token", flaky)
        bad = engine.generate(prompt(3), SamplingParams(temperature=1.0, seed=666, max_tokens=23))
        good = [engine.generate(prompt(i), GREEDY) for i in range(2)]
        assert await asyncio.gather(*(s.collect() for s in good)) == alone
        assert await bad.collect() == []
        assert bad.finish_reason == "error"
        assert bad.error is not None and "injected failure" in bad.error
        assert engine.load_info()["active"] == 0


async def test_close_cancels_running_and_refuses_new(tiny_model: LlamaForCausalLM) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        engine = make_engine(tiny_model)
        stream = engine.generate(prompt(1), SamplingParams(temperature=0.0, max_tokens=500))
        await anext(stream)
        await asyncio.gather(engine.close(), engine.close())
        await stream.finished.wait()
        assert stream.finish_reason == "cancel"
        with pytest.raises(AdmissionError):
            engine.generate(prompt(1), GREEDY)
        await engine.close()


def test_text_codec_helpers() -> None:
    text = HFText(CharTokenizer())
    assert text.encode_chat([{"role": "user", "content": "hi"}])[-1] == 1
    assert text.encode_text("ab") == [97, 98]
    assert text.decode([0, 1]) == "aab"
    for bad in ([], [{"content": "no role"}], "text"):
        with pytest.raises(AdmissionError) as caught:
            text.encode_chat(bad)  # type: ignore[arg-type]
        assert caught.value.field == "messages"
    with pytest.raises(AdmissionError):
        text.encode_chat([{"role": "user", "content": "boom"}])


def test_sample_next_token_filters() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, SamplingParams(temperature=0.0), None) == 1
    picks = {sample_next_token(logits, SamplingParams(top_k=1), rng) for _ in range(20)}
    assert picks == {1}
    picks = {sample_next_token(logits, SamplingParams(top_p=0.01), rng) for _ in range(20)}
    assert picks == {1}
    picks = {sample_next_token(logits, SamplingParams(top_k=2, temperature=5.0), rng) for _ in range(200)}
    assert picks == {1, 2}
