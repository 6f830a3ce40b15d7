"""LocalBackend: a tokenizer and a Codec map in front of a local :class:`TokenEngine`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Self

from meshnode.errors import AdmissionError
from meshnode.generation.api import CodecMapInfo, Prompt, SamplingParams, TextCodec, TokenEngine, TokenStream
from meshnode.generation.modelinfo import ModelInfo

__all__ = ["LocalBackend"]


class LocalBackend:
    """A :class:`~meshnode.generation.api.Backend` for an engine in this process.

    Prompts are tokenized (chat template included) off the event loop, so a long prompt never
    stalls the node's other peers; the map is built once, off the loop too.
    """

    def __init__(self, engine: TokenEngine, text: TextCodec, info: ModelInfo) -> None:
        self.engine = engine
        self.text = text
        self.info = info
        self._map: CodecMapInfo | None = None

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids (chat template applied to messages)."""
        if prompt.messages is not None:
            return self.text.encode_chat(prompt.messages)
        if prompt.text is not None:
            return self.text.encode_text(prompt.text)
        return list(prompt.ids or ())

    async def start(self, prompt: Prompt, params: SamplingParams) -> TokenStream:
        ids = self.encode(prompt) if prompt.ids is not None else await asyncio.to_thread(self.encode, prompt)
        try:
            return self.engine.generate(ids, params)
        except AdmissionError as exc:
            if exc.field == "prompt" and prompt.messages is not None:
                raise AdmissionError(str(exc), field="messages") from exc
            raise

    def decode(self, ids: Sequence[int]) -> str:
        return self.text.decode(ids)

    async def codec_map(self) -> CodecMapInfo:
        if self._map is None:
            info = self.info
            data = await asyncio.to_thread(lambda: info.map_bytes)
            self._map = CodecMapInfo(map_id=info.map_id, map_hash=info.map_hash, data=data)
        return self._map

    def load_info(self) -> dict[str, int]:
        return self.engine.load_info()

    async def close(self) -> None:
        await self.engine.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
