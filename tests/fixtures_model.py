"""Session-scoped access to the embedded SmolLM2 model (converted once into the user cache)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def embedded_loaded() -> Any:
    from meshnode.generation.models import resolve_model

    return resolve_model(None, device="cpu", dtype="bfloat16", progress=False)


def make_engine(loaded: Any, **limits: Any) -> Any:
    from meshnode.generation.engine import TorchEngine

    return TorchEngine.from_loaded(loaded, **limits)
