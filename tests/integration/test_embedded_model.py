"""The embedded SmolLM2-135M-Instruct end to end: convert (first run only), load, chat greedily.

The converted copy lives in meshnode's default cache folder (``$MESHNODE_CACHE_DIR``, else
``$XDG_CACHE_HOME/meshnode``, else ``~/.cache/meshnode``), so only the very first run pays for the
GGUF conversion (tens of seconds); later runs load the cache in a few seconds.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from meshnode.generation.api import SamplingParams
from meshnode.generation.models import EMBEDDED_MODEL_ID, LoadedModel, default_cache_dir, resolve_model
from meshnode.generation.text import HFText
from meshnode.generation.torch_backend import TorchEngine

pytestmark = pytest.mark.model

TIMEOUT_SECONDS = 120.0
"""Greedy chat of ~50 tokens; generous because the CPU is shared."""
SECOND_LOAD_LIMIT_SECONDS = 10.0
"""A load from the converted cache must be well under this (about 2-4 s measured)."""


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """Convert on the first run, then load from the cache."""
    return resolve_model(None, cache_dir=default_cache_dir(), device="cpu", progress=False)


async def test_greedy_chat_is_english_about_entropy_and_stops_on_eos(loaded: LoadedModel) -> None:
    assert loaded.model_id == EMBEDDED_MODEL_ID
    assert 2 in loaded.eos_ids  # <|im_end|>
    text_codec = HFText(loaded.tokenizer)
    async with asyncio.timeout(TIMEOUT_SECONDS), TorchEngine.from_loaded(loaded) as engine:
        prompt = text_codec.encode_chat([{"role": "user", "content": "Explain entropy in one sentence."}])
        stream = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=120))
        ids = await stream.collect()
    text = text_codec.decode(ids)
    assert stream.finish_reason == "stop", text
    assert stream.matched_stop == 2
    assert 10 <= len(ids) < 120
    assert 2 not in ids
    words = re.findall(r"[a-z]+", text.lower())
    assert "entropy" in words, text
    assert {"disorder", "randomness", "uncertainty", "energy", "system", "measure"} & set(words), text
    assert sum(c.isascii() for c in text) / len(text) > 0.95, text
    assert stream.ttft_seconds is not None


def test_second_load_from_cache_is_fast(loaded: LoadedModel) -> None:
    started = time.perf_counter()
    again = resolve_model(None, cache_dir=default_cache_dir(), device="cpu", progress=False)
    elapsed = time.perf_counter() - started
    assert again.source == loaded.source
    assert elapsed < SECOND_LOAD_LIMIT_SECONDS, f"cache load took {elapsed:.1f} s"
