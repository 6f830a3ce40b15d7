"""Fakes with real timing for the hardening tests and `bench/soak.py` (issue 8).

`TimedEngine` stands in for a local engine where the model is irrelevant (abuse, faults, soak):
every stream yields the ids ``first_id, first_id + 1, …`` at ``rate`` tokens per second on a fixed
schedule, so a receiver can check that nothing was lost, and timings (time to first token, tokens
per second) are real wall-clock figures; :func:`fake_backend` serves it the way the node serves a
real engine.

Knobs for fault injection: a prompt containing ``FAIL_MARKER`` makes its stream fail after
``fail_after`` tokens (an engine error in one request); ``generate`` refuses as busy beyond
``max_concurrent + max_queue`` streams or ``max_batch_tokens`` reserved tokens, like the real engine.
With ``slots=True`` only ``max_concurrent`` streams decode at once and the rest wait their turn in
arrival order, as in a real engine's queue (otherwise every admitted stream runs at ``rate``).

`CharTokenizer` is the tokenizer of the engine unit tests' tiny random models.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshnode.errors import AdmissionError, MeshError
from meshnode.generation.modelinfo import ModelInfo

FAIL_MARKER = "<<engine-fault>>"
SLOT_POLL_SECONDS = 0.005
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class EngineFault(MeshError):
    """The injected engine error."""


@dataclass(frozen=True)
class Chunk:
    ids: list[int]
    finish_reason: str | None


class TimedStream:
    """One generation: ids due at ``start + k / rate`` (k = 0, 1, …), then a final chunk."""

    prompt_tokens = 0

    def __init__(self, engine: TimedEngine, count: int, first_id: int, fail_after: int | None, reserve: int) -> None:
        self.engine = engine
        self.count = count
        self.first_id = first_id
        self.fail_after = fail_after
        self.reserve = reserve
        self.sent = 0
        self.start = time.monotonic()
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        if not self.cancelled and not self.finished:
            self.cancelled = True
        self._release()

    def _release(self) -> None:
        if self in self.engine.streams:
            self.engine.streams.remove(self)
            self.engine.reserved -= self.reserve

    async def _wait_for_slot(self) -> None:
        """Queued (slots=True): wait until this stream is among the first max_concurrent; its
        schedule starts then."""
        while not self.cancelled and self in self.engine.streams and \
                self.engine.streams.index(self) >= self.engine.max_concurrent:
            await asyncio.sleep(SLOT_POLL_SECONDS)
        self.start = time.monotonic()

    def __aiter__(self) -> TimedStream:
        return self

    async def __anext__(self) -> Chunk:
        if self.cancelled or self.finished:
            raise StopAsyncIteration
        if self.engine.slots and not self.sent:
            await self._wait_for_slot()
            if self.cancelled:
                raise StopAsyncIteration
        if self.fail_after is not None and self.sent >= self.fail_after:
            self.finished = True
            self._release()
            raise EngineFault("injected engine fault")
        now = time.monotonic()
        due = min(self.count, int((now - self.start) * self.engine.rate) + 1)
        if due <= self.sent:
            await asyncio.sleep(max(0.0, self.start + self.sent / self.engine.rate - now))
            due = min(self.count, int((time.monotonic() - self.start) * self.engine.rate) + 1)
            due = max(due, self.sent + 1)
        if self.fail_after is not None:
            due = min(due, self.fail_after)
        ids = list(range(self.first_id + self.sent, self.first_id + due))
        self.sent = due
        last = self.sent >= self.count
        if last:
            self.finished = True
            self.engine.completed += 1
            self._release()
        return Chunk(ids, "length" if last else None)


class TimedEngine:
    """A GenerationEngine look-alike with real timing (see the module docstring)."""

    model_id = MODEL_ID
    tokenizer = None

    def __init__(self, *, rate: float = 50.0, tokens: int = 64, max_concurrent: int = 64, max_queue: int = 0,
                 max_batch_tokens: int = 0, fail_after: int = 3, max_prompt_tokens: int = 4096,
                 slots: bool = False) -> None:
        self.slots = slots
        self.max_prompt_tokens = max_prompt_tokens
        self.rate = rate
        self.tokens = tokens
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.fail_after = fail_after
        self.streams: list[TimedStream] = []
        self.reserved = 0
        self.started = 0
        self.completed = 0

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        text = "".join(str(m.get("content", "")) for m in messages)
        ids = [1] * max(1, len(text) // 4)  # about four characters per token, like a real tokenizer
        if FAIL_MARKER in text:
            ids[0] = 0  # remembered by generate()
        return ids

    def encode_text(self, text: str) -> list[int]:
        return self.encode_chat([{"content": text}])

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids)

    def load_info(self) -> dict[str, int]:
        active = min(len(self.streams), self.max_concurrent) if self.slots else len(self.streams)
        return {"active": active, "queued": len(self.streams) - active, "max_concurrent": self.max_concurrent,
                "max_queue": self.max_queue}

    def generate(self, prompt_ids: Sequence[int], params: Any) -> TimedStream:
        if len(prompt_ids) > self.max_prompt_tokens:
            raise AdmissionError(f"prompt has {len(prompt_ids)} tokens; this node's limit is {self.max_prompt_tokens}",
                                 field="prompt")
        if len(self.streams) >= self.max_concurrent + self.max_queue:
            raise AdmissionError(f"busy: {len(self.streams)} streams running; retry later")
        count = min(self.tokens, int(getattr(params, "max_tokens", self.tokens)))
        reserve = len(prompt_ids) + count
        if self.max_batch_tokens and self.reserved + reserve > self.max_batch_tokens:
            raise AdmissionError(f"busy: batch token budget {self.reserved}/{self.max_batch_tokens} in use, "
                                 f"this request needs {reserve}; retry later")
        self.started += 1
        stream = TimedStream(self, count, first_id=1000, fail_after=self.fail_after if prompt_ids[0] == 0 else None,
                             reserve=reserve)
        self.reserved += reserve
        self.streams.append(stream)
        return stream

    async def close(self) -> None:
        for stream in list(self.streams):
            stream.cancel()


def expected_ids(count: int) -> list[int]:
    """The ids a TimedEngine stream of `count` tokens carries."""
    return list(range(1000, 1000 + count))


def fake_backend(engine: Any) -> Any:
    """A fake engine served like a real one: it is its own text codec, with a stub map."""
    from meshnode.generation.local import LocalBackend

    return LocalBackend(engine, engine, stub_model_info(engine))


def stub_model_info(engine: Any) -> ModelInfo:
    """A ModelInfo whose (lazily built) map is pre-filled: fake engines have no tokenizer."""
    info = ModelInfo(model_id=engine.model_id, tokenizer=None)
    info.__dict__["map_document"] = {"schema": "fake", "vocab": []}
    info.__dict__["map_bytes"] = b"{}"
    info.__dict__["map_hash"] = "sha256:" + "0" * 64
    return info


class CharTokenizer:
    """Decodes id ``i`` to one or two letters; enough for stop strings and chat encoding."""

    chat_template = "fake"

    @staticmethod
    def piece(token: int) -> str:
        first = chr(97 + token % 26)
        return first if token % 3 else first + chr(97 + (token // 26) % 26)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.piece(i) for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        if any(m.get("content") == "boom" for m in messages):
            raise ValueError("template exploded")
        return [ord(c) for m in messages for c in f"<{m['role']}>{m.get('content', '')}"] + [1]
