"""The generation API, free of torch: what every backend takes and returns.

* :class:`SamplingParams` - validated per-request sampling settings;
* :class:`TokenStream` - what a backend returns: an async iterator of :class:`TokenChunk`;
* :class:`TokenEngine` - a local batch engine: token ids in, a stream out (the torch and CUDA
  engines, :mod:`meshnode.generation.engine`);
* :class:`Backend` - what the Legion service and the HTTP API use: a chat, text or id prompt in,
  a stream out, plus the text and the Codec map of what it serves. :class:`~meshnode.generation.local.LocalBackend`
  puts a tokenizer in front of a :class:`TokenEngine`; remote upstreams implement it directly.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, Self, runtime_checkable

from meshnode.errors import AdmissionError

__all__ = [
    "Backend",
    "CodecMapInfo",
    "Decoder",
    "FinishReason",
    "Prompt",
    "SamplingParams",
    "TextCodec",
    "TokenChunk",
    "TokenEngine",
    "TokenStream",
    "UpstreamReporter",
    "UpstreamStatus",
]

FinishReason = Literal["stop", "length", "cancel", "error"]
"""Why a stream ended: EOS/stop id/stop string, token limit, cancelled, or failed."""

MAX_TEMPERATURE = 100.0
"""Largest accepted ``temperature``."""
MAX_STOP_SEQUENCES = 16
"""Most stop strings per request."""
MAX_STOP_CHARS = 256
"""Longest accepted stop string, in characters."""
MAX_STOP_IDS = 64
"""Most stop ids per request."""
MAX_SEED = 2**64 - 1
"""Largest accepted seed (``torch.Generator.manual_seed`` takes unsigned 64-bit values)."""
DEFAULT_STREAM_BUFFER_CHUNKS = 64
"""Chunks a stream buffers before coalescing further ids into its last chunk."""


# --------------------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling settings, validated on construction.

    Raises:
        AdmissionError: A value is out of range; ``field`` names the offending attribute.
    """

    temperature: float = 1.0
    """Softmax temperature; ``0`` means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling mass in ``(0, 1]``; ``1`` disables it."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens; ``0`` disables it."""
    seed: int | None = None
    """Seed of this request's private RNG; ``None`` picks a random one."""
    max_tokens: int = 256
    """Most tokens to generate (stop tokens not counted)."""
    stop: tuple[str, ...] = ()
    """Stop strings; the stream ends before the first occurrence. A single ``str`` is accepted."""
    stop_ids: tuple[int, ...] = ()
    """Extra token ids that end the stream (the model's EOS ids always do)."""

    def __post_init__(self) -> None:
        """Validate every field and normalise ``stop``/``stop_ids`` to tuples."""
        _check_number("temperature", self.temperature, low=0.0, high=MAX_TEMPERATURE)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED)
        _check_int("max_tokens", self.max_tokens, low=1)

        stop: object = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (tuple, list)):
            raise AdmissionError("stop must be a string or a list of strings", field="stop")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise AdmissionError(f"at most {MAX_STOP_SEQUENCES} stop strings", field="stop")
        for item in stop:
            if not isinstance(item, str) or not item:
                raise AdmissionError("stop strings must be non-empty strings", field="stop")
            if len(item) > MAX_STOP_CHARS:
                raise AdmissionError(
                    f"stop strings must be at most {MAX_STOP_CHARS} characters", field="stop"
                )
        object.__setattr__(self, "stop", tuple(stop))

        stop_ids: object = self.stop_ids
        if not isinstance(stop_ids, (tuple, list)):
            raise AdmissionError("stop_ids must be a list of token ids", field="stop_ids")
        if len(stop_ids) > MAX_STOP_IDS:
            raise AdmissionError(f"at most {MAX_STOP_IDS} stop ids", field="stop_ids")
        for item in stop_ids:
            _check_int("stop_ids", item, low=0)
        object.__setattr__(self, "stop_ids", tuple(stop_ids))

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (``temperature == 0``)."""
        return self.temperature == 0


def _check_number(
    name: str, value: object, *, low: float, high: float, low_open: bool = False
) -> None:
    """Raise AdmissionError unless ``value`` is a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdmissionError(f"{name} must be a finite number", field=name)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        opening = "(" if low_open else "["
        raise AdmissionError(f"{name} must be in {opening}{low:g}, {high:g}], got {value!r}", field=name)


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    """Raise AdmissionError unless ``value`` is an int in range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdmissionError(f"{name} must be an integer, got {value!r}", field=name)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise AdmissionError(f"{name} must be {bound}, got {value!r}", field=name)


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """A piece of a token stream.

    ``finish_reason`` is set only on the last chunk of a stream (whose ``ids`` may be empty).
    ``frame`` is the exact Codec frame an upstream sent for these ids (a pass-through backend,
    :mod:`meshnode.generation.remote`); consumers that forward frames send these bytes unchanged.
    """

    ids: list[int]
    finish_reason: FinishReason | None = None
    frame: bytes | None = None


class TokenStream:
    """The result of :meth:`GenerationEngine.generate`: an async iterator of :class:`TokenChunk`.

    Consume it with ``async for chunk in stream`` (preferably inside ``async with stream:``, which
    cancels the request if the consumer leaves early). Cancelling the consuming task while it
    waits for a chunk, calling :meth:`cancel` or :meth:`aclose` all remove the request from the
    engine's batch at its next step.

    The buffer holds at most ``buffer_chunks`` chunks; beyond that, new ids are merged into the
    last buffered chunk (overflow policy ``coalesce``), so a slow consumer never stalls the engine
    and never loses ids.

    Chunks that carry an upstream's exact ``frame`` are never merged (their bytes must stay whole),
    so a pass-through producer uses the overflow policy ``block`` instead: it awaits
    :meth:`wait_room` before each :meth:`put`, and a slow consumer slows the upstream read.

    Engine implementations feed it with :meth:`put` from the stream's event-loop thread.
    """

    def __init__(
        self,
        *,
        request_id: int,
        prompt_tokens: int,
        loop: asyncio.AbstractEventLoop,
        buffer_chunks: int = DEFAULT_STREAM_BUFFER_CHUNKS,
        on_cancel: Any = None,
    ) -> None:
        """Create an empty stream.

        Args:
            request_id: Engine-unique id (for logs).
            prompt_tokens: Prompt length in tokens.
            loop: Event loop whose thread calls :meth:`put` and consumes the stream.
            buffer_chunks: Buffered chunks before coalescing.
            on_cancel: Called (from any thread) when the stream is cancelled for the first time.
        """
        self.request_id = request_id
        """Engine-unique request number."""
        self.prompt_tokens = prompt_tokens
        """Prompt length in tokens."""
        self.completion_tokens = 0
        """Ids handed to this stream so far (stop ids and held-back ids not counted)."""
        self.ttft_seconds: float | None = None
        """Seconds from ``generate()`` to the first generated token (queueing and prefill)."""
        self.finish_reason: FinishReason | None = None
        """Set when the final chunk is handed to the stream."""
        self.matched_stop: str | int | None = None
        """The stop string or stop id that ended the stream, if any."""
        self.error: str | None = None
        """Error description when ``finish_reason == "error"``."""
        self.submitted_at = time.perf_counter()
        """``time.perf_counter()`` when the request was submitted."""
        self.finished_at: float | None = None
        """``time.perf_counter()`` when the final chunk was handed over."""
        self.finished = asyncio.Event()
        """Set when the final chunk has been handed to the stream (not necessarily consumed)."""
        self._loop = loop
        self._buffer_chunks = max(1, buffer_chunks)
        self._chunks: deque[tuple[list[int], FinishReason | None, bytes | None]] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._cancel_requested = threading.Event()
        self._on_cancel = on_cancel
        self._exhausted = False

    # -- producer side (event-loop thread) ---------------------------------------------------------

    def put(
        self,
        ids: Sequence[int],
        finish_reason: FinishReason | None = None,
        *,
        matched_stop: str | int | None = None,
        error: str | None = None,
        frame: bytes | None = None,
    ) -> None:
        """Hand ids (and possibly the end of the stream) to the consumer.

        Must run on the stream's event-loop thread. Calls after the final chunk are ignored.

        Args:
            ids: New token ids (may be empty on the final chunk).
            finish_reason: Set on the final chunk only.
            matched_stop: The stop string or id that ended the stream.
            error: Error description for ``finish_reason == "error"``.
            frame: The upstream's exact frame bytes for these ids (never merged with others).
        """
        if self.finish_reason is not None:
            return
        self.completion_tokens += len(ids)
        last_has_frame = bool(self._chunks) and self._chunks[-1][2] is not None
        if frame is None and not last_has_frame and self._chunks and len(self._chunks) >= self._buffer_chunks:
            # Overflow policy "coalesce": merge into the newest buffered chunk.
            last_ids, _, _ = self._chunks.pop()
            last_ids.extend(ids)
            self._chunks.append((last_ids, finish_reason, None))
        else:
            self._chunks.append((list(ids), finish_reason, frame))
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.matched_stop = matched_stop
            self.error = error
            self.finished_at = time.perf_counter()
            self.finished.set()
        self._ready.set()

    @property
    def buffered(self) -> int:
        """Chunks handed over but not consumed yet."""
        return len(self._chunks)

    async def wait_room(self) -> None:
        """Wait until the buffer has room for one more chunk (overflow policy ``block``).

        Returns at once when there is room, and also once the consumer left (:meth:`aclose`) or the
        stream was cancelled, so a producer never waits on a consumer that is gone.
        """
        while len(self._chunks) >= self._buffer_chunks and not self._exhausted and not self.cancelled:
            self._room.clear()
            await self._room.wait()

    # -- consumer side -----------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop whose thread feeds and consumes this stream."""
        return self._loop

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel_requested.is_set()

    @property
    def done(self) -> bool:
        """Whether the final chunk has been handed to the stream."""
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step. Idempotent, thread-safe."""
        if self._cancel_requested.is_set() or self.finish_reason is not None:
            return
        self._cancel_requested.set()
        if self._on_cancel is not None:
            self._on_cancel()

    async def aclose(self) -> None:
        """Cancel the request if it is still running; the stream yields nothing more."""
        self.cancel()
        self._exhausted = True
        self._room.set()

    async def collect(self) -> list[int]:
        """Consume the whole stream and return all its ids."""
        ids: list[int] = []
        async for chunk in self:
            ids.extend(chunk.ids)
        return ids

    def __aiter__(self) -> Self:
        """Return the stream itself."""
        return self

    async def __anext__(self) -> TokenChunk:
        """Wait for the next chunk.

        Raises:
            StopAsyncIteration: After the final chunk, or after :meth:`aclose`.
            asyncio.CancelledError: Re-raised after cancelling the request.
        """
        if self._exhausted:
            raise StopAsyncIteration
        while not self._chunks:
            self._ready.clear()
            try:
                await self._ready.wait()
            except asyncio.CancelledError:
                # The consumer went away: free the batch slot, then propagate.
                self.cancel()
                raise
        ids, finish_reason, frame = self._chunks.popleft()
        self._room.set()
        if finish_reason is not None:
            self._exhausted = True
        return TokenChunk(ids, finish_reason, frame)

    async def __aenter__(self) -> Self:
        """Return the stream; leaving the block cancels it if it is still running."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel the request if it has not finished."""
        await self.aclose()

    def __repr__(self) -> str:
        """Short description for logs."""
        return (
            f"TokenStream(id={self.request_id}, prompt={self.prompt_tokens}, "
            f"completion={self.completion_tokens}, finish={self.finish_reason})"
        )


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class TokenEngine(Protocol):
    """A local engine: continuous batching of token-id prompts."""

    @property
    def model_id(self) -> str: ...

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> TokenStream:
        """Submit a request; must be called from a running event loop.

        Raises:
            AdmissionError: The request is refused (limits, busy, closed).
        """
        ...

    def load_info(self) -> dict[str, int]:
        """Current load: ``active``, ``queued``, ``max_concurrent`` and ``max_queue``."""
        ...

    async def close(self) -> None:
        """Stop; running streams end with ``finish_reason="cancel"``."""
        ...


class Decoder(Protocol):
    """Token ids back to text."""

    def decode(self, ids: Sequence[int]) -> str: ...


class TextCodec(Decoder, Protocol):
    """Text on both sides of a model: chat template and tokenizer, and back."""

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """What to continue: chat messages, plain text, or token ids (exactly one of them)."""

    messages: tuple[Mapping[str, Any], ...] | None = None
    text: str | None = None
    ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if sum(part is not None for part in (self.messages, self.text, self.ids)) != 1:
            raise ValueError("a prompt is exactly one of messages, text or ids")

    @classmethod
    def chat(cls, messages: Sequence[Mapping[str, Any]]) -> Prompt:
        return cls(messages=tuple(messages))


@dataclass(frozen=True)
class CodecMapInfo:
    """The Codec tokenizer map that detokenizes a backend's frames (legion-mesh §4)."""

    map_id: str
    map_hash: str
    """``sha256:<hex>`` of exactly the bytes of :attr:`data`."""
    data: bytes


@runtime_checkable
class Backend(Protocol):
    """What serves generations to the Legion service and the HTTP API."""

    @property
    def model_id(self) -> str: ...

    async def start(self, prompt: Prompt, params: SamplingParams) -> TokenStream:
        """Begin generating; the stream yields the ids.

        Raises:
            AdmissionError: refused (prompt too long, busy, bad parameters); ``field`` names the input.
        """
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated ids (special tokens skipped)."""
        ...

    async def codec_map(self) -> CodecMapInfo:
        """The map of this backend's token ids (built or fetched once, then cached)."""
        ...

    def load_info(self) -> dict[str, int]:
        """``active``, ``queued``, ``max_concurrent``, ``max_queue`` summed over what serves."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class UpstreamStatus:
    """One remote upstream of a backend, as ``/metrics`` shows it."""

    url: str
    dialect: str
    healthy: bool
    active: int
    """Calls streaming from it now."""
    limit: int
    """Calls it takes at once (configured, discovered, or the default)."""
    requests: int
    """Calls dispatched to it."""
    failures: int
    """Calls or health checks that failed on it (connection errors, timeouts, 5xx, bad bytes)."""


@runtime_checkable
class UpstreamReporter(Protocol):
    """A backend that serves from remote upstreams and reports each one."""

    def upstreams(self) -> list[UpstreamStatus]: ...
