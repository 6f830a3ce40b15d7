"""What peers need to know about the served model: its id, tokenizer map and vocabulary size."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from meshnode.wire.maps import build_map, family_for_model_id, map_bytes, map_sha256

logger = logging.getLogger(__name__)

CODEC_VERSION = "0.4"


def map_index(map_id: str, map_hash: str) -> dict[str, Any]:
    """`/.well-known/codec/index.json` listing one map served from the same origin (legion-mesh §4.4)."""
    entry = {"id": map_id, "url": f"/.well-known/codec/maps/{map_id}.json", "hash": map_hash}
    return {"codec_version": CODEC_VERSION, "maps": [entry]}


@dataclass
class ModelInfo:
    """The model id browsers see in `cap.modelId` and the Codec map generated from its tokenizer.

    The map document is built lazily (about a second for a 50k vocabulary) and cached.
    """

    model_id: str
    tokenizer: Any

    @property
    def map_id(self) -> str:
        # legion-mesh §4.5: browsers resolve the map from modelId; serve the same family id.
        return family_for_model_id(self.model_id)

    @cached_property
    def map_document(self) -> dict[str, Any]:
        return build_map(self.tokenizer, self.map_id)

    @cached_property
    def map_bytes(self) -> bytes:
        return map_bytes(self.map_document)

    @cached_property
    def map_hash(self) -> str:
        return map_sha256(self.map_bytes)

    @cached_property
    def vocab_size(self) -> int:
        return len(self.tokenizer)
