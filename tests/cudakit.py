"""Tiny random models and engine helpers shared by the CUDA-engine test modules.

The decoder, sampler and engine loop run on the CPU in unit tests (float32, no graphs): the same
forward the GPU runs. Engines are driven with ``asyncio.run`` (:func:`run`) so that the tests also
run where pytest-asyncio is not installed (the GPU machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bench.lab.fakes import CharTokenizer
from meshnode.generation.cuda.backend import CudaEngine

TIMEOUT_SECONDS = 60.0
"""Bound for each engine test (a shared 2-core machine; normally a few seconds)."""
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny models' ops are too small to share; one thread avoids OpenMP stalls on a busy host.
    Import it into a test module: an autouse fixture applies where it is imported."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT_SECONDS):
            return await coro

    return asyncio.run(bounded())


def tiny_llama(seed: int = 0, device: str = "cpu") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).to(device).eval()


def tiny_qwen(seed: int = 1, device: str = "cpu") -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
        max_position_embeddings=512,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # Qwen2 has q/k/v biases; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    return model.to(device)


def prompt(index: int, vocab: int = 4096) -> list[int]:
    """Prompts of different lengths, so batches are ragged."""
    return [(index * 7919 + j * 104729) % (vocab - 100) + 100 for j in range(3 + 2 * index)]


def hf_greedy(model: Any, ids: list[int], count: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=count,
            min_new_tokens=count,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def make_engine(model: Any, **kwargs: Any) -> CudaEngine:
    options: dict[str, Any] = {
        "model_id": "tiny",
        "max_concurrent": 8,
        "max_queue": 16,
        "max_prompt_tokens": 64,
        "max_tokens_limit": 64,
    }
    options.update(kwargs)
    return CudaEngine(model, CharTokenizer(), **options)


class EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: replay() runs the captured body."""

    def __init__(self, body: Any, *shape: int) -> None:
        self.body, self.shape = body, shape

    def replay(self) -> None:
        self.body(*self.shape)
