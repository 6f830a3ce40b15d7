"""Session-scoped access to the embedded SmolLM2 model (converted once into the user cache)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def embedded_loaded() -> Any:
    from meshnode.generation.models import resolve_model

    return resolve_model(None, device="cpu", dtype="bfloat16", progress=False)


def make_engine(loaded: Any, **limits: Any) -> Any:
    from meshnode.generation.torch_backend import TorchEngine

    return TorchEngine.from_loaded(loaded, **limits)


def make_backend(loaded: Any, **limits: Any) -> Any:
    """The embedded model served the way ``meshnode join`` serves it (engine, tokenizer, map)."""
    from meshnode.generation.local import LocalBackend
    from meshnode.generation.modelinfo import ModelInfo
    from meshnode.generation.text import HFText

    return LocalBackend(make_engine(loaded, **limits), HFText(loaded.tokenizer, loaded.model_id),
                        ModelInfo(model_id=loaded.model_id, tokenizer=loaded.tokenizer))


async def local_text(backend: Any, prompt: str, max_tokens: int) -> str:
    """What the backend answers to `prompt` greedily, generated in this process (the reference)."""
    from meshnode.generation.api import Prompt, SamplingParams

    stream = await backend.start(Prompt.chat([{"role": "user", "content": prompt}]),
                                 SamplingParams(temperature=0, max_tokens=max_tokens))
    async with stream:
        ids = await stream.collect()
    return str(backend.decode(ids))
