"""Generation engine: continuous batching of token-id streams over a transformers causal LM.

The public surface is small so that other backends (a remote vLLM, a llama.cpp server) can stand
in for the local one later:

* :class:`SamplingParams` - validated per-request sampling settings;
* :class:`GenerationEngine` - the protocol every backend implements (``generate``, ``encode_chat``,
  ``encode_text``, ``decode``, ``load_info``, ``close``);
* :class:`TokenStream` - what ``generate`` returns: an async iterator of :class:`TokenChunk`;
* :class:`TorchEngine` - the local backend.

How :class:`TorchEngine` works:

* One worker thread owns the model and runs the torch loop; the event loop never blocks on it.
  Results go back with ``loop.call_soon_threadsafe`` once per step into each stream's bounded
  buffer (overflow policy ``coalesce``: when a consumer falls behind, new ids are merged into its
  last pending chunk, so the worker never waits on a slow consumer).
* The running batch is left-padded: each row's KV cache occupies the right-most columns of a
  shared ``DynamicCache``; a 2D attention mask hides the padding and explicit per-row position
  ids keep RoPE positions exact. A newcomer is prefilled alone (batch 1, no padding) between two
  decode steps, and its KV is then padded and concatenated into the batch. Finished or cancelled
  rows are removed with an index select, and columns that became padding in every row are
  trimmed. Because no row ever sees padding in its own attention, a row's tokens do not depend on
  which other rows share its batch (exactly, in float32).
* Every request samples with its own ``torch.Generator`` (seeded from ``SamplingParams.seed``,
  or randomly), never the global RNG.
* Stop ids (EOS included) end a stream with ``finish_reason="stop"`` and are not emitted. Stop
  strings are searched in the incrementally decoded text; ids whose text could still be the start
  of a stop string are held back, and on a match only the ids whose text lies entirely before the
  stop string are emitted.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, Self, runtime_checkable

import torch

from meshnode.errors import AdmissionError, ModelError

__all__ = [
    "FinishReason",
    "GenerationEngine",
    "SamplingParams",
    "TokenChunk",
    "TokenStream",
    "TorchEngine",
    "sample_next_token",
]

logger = logging.getLogger(__name__)

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
STOP_CONTEXT_TOKENS = 4
"""Already-emitted ids decoded as left context when searching stop strings."""
DEFAULT_PREFILL_BUDGET_TOKENS = 1024
"""Prompt tokens prefilled between two decode steps (at least one request is always admitted)."""


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
    """

    ids: list[int]
    finish_reason: FinishReason | None = None


class TokenStream:
    """The result of :meth:`GenerationEngine.generate`: an async iterator of :class:`TokenChunk`.

    Consume it with ``async for chunk in stream`` (preferably inside ``async with stream:``, which
    cancels the request if the consumer leaves early). Cancelling the consuming task while it
    waits for a chunk, calling :meth:`cancel` or :meth:`aclose` all remove the request from the
    engine's batch at its next step.

    The buffer holds at most ``buffer_chunks`` chunks; beyond that, new ids are merged into the
    last buffered chunk (overflow policy ``coalesce``), so a slow consumer never stalls the engine
    and never loses ids.

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
        self._chunks: deque[tuple[list[int], FinishReason | None]] = deque()
        self._ready = asyncio.Event()
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
    ) -> None:
        """Hand ids (and possibly the end of the stream) to the consumer.

        Must run on the stream's event-loop thread. Calls after the final chunk are ignored.

        Args:
            ids: New token ids (may be empty on the final chunk).
            finish_reason: Set on the final chunk only.
            matched_stop: The stop string or id that ended the stream.
            error: Error description for ``finish_reason == "error"``.
        """
        if self.finish_reason is not None:
            return
        self.completion_tokens += len(ids)
        if self._chunks and len(self._chunks) >= self._buffer_chunks:
            # Overflow policy "coalesce": merge into the newest buffered chunk.
            last_ids, _ = self._chunks.pop()
            last_ids.extend(ids)
            self._chunks.append((last_ids, finish_reason))
        else:
            self._chunks.append((list(ids), finish_reason))
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.matched_stop = matched_stop
            self.error = error
            self.finished_at = time.perf_counter()
            self.finished.set()
        self._ready.set()

    # -- consumer side -----------------------------------------------------------------------------

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
        ids, finish_reason = self._chunks.popleft()
        if finish_reason is not None:
            self._exhausted = True
        return TokenChunk(ids, finish_reason)

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
# The backend interface
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class GenerationEngine(Protocol):
    """What the HTTP, CLI and mesh layers need from a generation backend."""

    @property
    def model_id(self) -> str:
        """Public model name."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The backend's tokenizer (``None`` when it has none)."""
        ...

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None
    ) -> TokenStream:
        """Submit a request; must be called from a running event loop.

        Raises:
            AdmissionError: The request is refused (limits, busy, closed).
        """
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Apply the chat template with the generation prompt and tokenize."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """Tokenize plain text."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Turn ids into text, special tokens skipped."""
        ...

    def load_info(self) -> dict[str, int]:
        """Current load: ``active``, ``queued``, ``max_concurrent`` (and ``max_queue``)."""
        ...

    async def close(self) -> None:
        """Stop the backend; running streams end with ``finish_reason="cancel"``."""
        ...


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row of logits.

    Args:
        logits: ``[vocab]`` scores.
        params: Temperature, top-k and top-p settings.
        generator: The request's RNG (unused when greedy).

    Returns:
        The chosen token id.
    """
    if params.greedy:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# --------------------------------------------------------------------------------------------------
# The local torch backend
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    """Worker-side state of one request."""

    stream: TokenStream
    prompt: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    position: int = 0
    next_token: int = -1
    admitted: bool = False
    finished: bool = False
    reserved: int = 0
    """KV positions reserved for this request (prompt + max_tokens) under ``max_batch_tokens``."""


@dataclass(frozen=True, slots=True)
class _Delivery:
    """One ``TokenStream.put`` call to make on the stream's loop."""

    stream: TokenStream
    ids: list[int]
    finish_reason: FinishReason | None
    matched_stop: str | int | None = None
    error: str | None = None


def _deliver_all(items: list[_Delivery]) -> None:
    """Run on the event loop: hand one worker step's results to their streams."""
    for item in items:
        item.stream.put(
            item.ids, item.finish_reason, matched_stop=item.matched_stop, error=item.error
        )


class TorchEngine:
    """Continuous-batching generation over a local transformers causal LM.

    Use it as an async context manager (or call :meth:`start` and :meth:`close`)::

        async with TorchEngine.from_loaded(resolve_model(None)) as engine:
            ids = engine.encode_chat([{"role": "user", "content": "Hi"}])
            async with engine.generate(ids, SamplingParams(temperature=0)) as stream:
                async for chunk in stream:
                    ...
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        model_id: str = "local",
        eos_ids: Sequence[int] = (),
        max_concurrent: int = 8,
        max_queue: int = 32,
        max_prompt_tokens: int = 4096,
        max_tokens_limit: int = 2048,
        stream_buffer_chunks: int = DEFAULT_STREAM_BUFFER_CHUNKS,
        prefill_budget_tokens: int = DEFAULT_PREFILL_BUDGET_TOKENS,
        max_batch_tokens: int = 0,
        name: str = "engine",
    ) -> None:
        """Wrap a loaded model; the worker thread starts on :meth:`start` or the first request.

        Args:
            model: A transformers causal LM in eval mode (full-attention layers only).
            tokenizer: Its tokenizer; ``None`` allows id-only use (no stop strings, no encode).
            model_id: Public model name.
            eos_ids: Ids that always end a stream with ``"stop"``.
            max_concurrent: Rows in the running batch; further requests queue.
            max_queue: Queued requests beyond ``max_concurrent`` before refusing.
            max_prompt_tokens: Longest accepted prompt.
            max_tokens_limit: Largest accepted ``SamplingParams.max_tokens``.
            stream_buffer_chunks: Per-stream buffered chunks before coalescing.
            prefill_budget_tokens: Prompt tokens prefilled between two decode steps, so a burst
                of long prompts does not stall running streams for long (one request is always
                admitted per step).
            max_batch_tokens: Memory admission control: the sum of ``len(prompt) + max_tokens``
                over running and queued requests may not exceed this (the KV cache of the batch
                is bounded by it, up to left padding); a request that would exceed it is refused
                as busy instead of risking an out-of-memory failure of the whole batch. 0 = no
                budget beyond ``max_concurrent`` / ``max_queue``.
            name: Used in the worker thread's name and in logs.

        Raises:
            ModelError: The model's cache is not a plain full-attention dynamic cache.
            ValueError: A limit is not positive.
        """
        for label, value in (
            ("max_concurrent", max_concurrent),
            ("max_prompt_tokens", max_prompt_tokens),
            ("max_tokens_limit", max_tokens_limit),
        ):
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_batch_tokens < 0:
            raise ValueError(f"max_batch_tokens must be >= 0, got {max_batch_tokens}")
        self._model = model
        self._tokenizer = tokenizer
        self._model_id = model_id
        self.eos_ids: tuple[int, ...] = tuple(eos_ids)
        """Ids that always end a stream."""
        self.max_concurrent = max_concurrent
        """Rows in the running batch."""
        self.max_queue = max_queue
        """Queued requests allowed beyond ``max_concurrent``."""
        self.max_prompt_tokens = max_prompt_tokens
        """Longest accepted prompt, in tokens."""
        self.max_tokens_limit = max_tokens_limit
        """Largest accepted ``max_tokens``."""
        self.max_batch_tokens = max_batch_tokens
        """Budget of reserved KV positions over running + queued requests (0 = none)."""
        self._reserved_tokens = 0
        self._buffer_chunks = stream_buffer_chunks
        self._prefill_budget = max(1, prefill_budget_tokens)
        self._name = name

        config = model.config
        self.device: torch.device = next(model.parameters()).device
        """Where the model runs."""
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._check_cache_layout()

        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._active = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._next_id = 0
        self._close_started = False
        self._closed = asyncio.Event()

        # Worker-thread state (touched only by the worker).
        self._rows: list[_Request] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._outbox: list[_Delivery] = []
        self.steps = 0
        """Batched decode steps run so far (worker-updated; for stats and tests)."""

    @classmethod
    def from_loaded(cls, loaded: Any, **limits: Any) -> Self:
        """Build an engine from a :class:`meshnode.generation.models.LoadedModel`.

        Args:
            loaded: The loaded model bundle.
            **limits: Constructor keyword arguments (``max_concurrent``, ``max_queue``, ...).

        Returns:
            The engine (not started).
        """
        return cls(
            loaded.model,
            loaded.tokenizer,
            model_id=loaded.model_id,
            eos_ids=loaded.eos_ids,
            **limits,
        )

    # -- properties and helpers ------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """Public model name."""
        return self._model_id

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, or ``None`` for an id-only engine."""
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The underlying transformers model (owned by the worker thread while running)."""
        return self._model

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Apply the chat template (with the generation prompt) and tokenize.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.

        Returns:
            Prompt ids.

        Raises:
            AdmissionError: The messages are malformed or the template rejects them
                (``field="messages"``).
            ModelError: The engine has no tokenizer or the tokenizer has no chat template.
        """
        tokenizer = self._require_tokenizer()
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
            raise AdmissionError("messages must be a non-empty list", field="messages")
        for message in messages:
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise AdmissionError("each message needs a string 'role'", field="messages")
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(f"{self._model_id} has no chat template")
        try:
            ids = tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        except Exception as exc:
            # Jinja templates raise arbitrary errors (TemplateError, TypeError, raise_exception).
            raise AdmissionError(f"chat template rejected the messages: {exc}", field="messages") from exc
        if isinstance(ids, Mapping):  # some tokenizers still return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode_text(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Tokenize plain text (no chat template).

        Raises:
            ModelError: The engine has no tokenizer.
        """
        tokenizer = self._require_tokenizer()
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Turn ids into text.

        Raises:
            ModelError: The engine has no tokenizer.
        """
        tokenizer = self._require_tokenizer()
        return str(tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def reserved_tokens(self) -> int:
        """KV positions reserved by running and queued requests (see ``max_batch_tokens``)."""
        with self._cv:
            return self._reserved_tokens

    def load_info(self) -> dict[str, int]:
        """Current load: ``active``, ``queued``, ``max_concurrent``, ``max_queue``."""
        with self._cv:
            return {
                "active": self._active,
                "queued": len(self._pending),
                "max_concurrent": self.max_concurrent,
                "max_queue": self.max_queue,
            }

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise ModelError("this engine has no tokenizer")
        return self._tokenizer

    def _check_cache_layout(self) -> None:
        """Refuse models whose cache is not made of plain full-attention dynamic layers."""
        from transformers import DynamicCache  # noqa: PLC0415 - keep module import light
        from transformers.cache_utils import DynamicLayer  # noqa: PLC0415

        probe = DynamicCache(config=self._model.config)
        odd = {type(layer).__name__ for layer in probe.layers if type(layer) is not DynamicLayer}
        if odd:
            raise ModelError(
                f"{self._model_id}: continuous batching supports full-attention models only "
                f"(cache layers {sorted(odd)})"
            )

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent).

        Raises:
            AdmissionError: The engine is closed.
        """
        with self._cv:
            if self._closing:
                raise AdmissionError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"meshnode-{self._name}", daemon=True
                )
                self._thread.start()
                logger.info(
                    "%s started: model %s on %s, max_concurrent=%d",
                    self._name,
                    self._model_id,
                    self.device,
                    self.max_concurrent,
                )

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker thread and wait for it (blocking; prefer :meth:`close` in async code).

        Running and queued streams end with ``finish_reason="cancel"``.
        """
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    async def close(self) -> None:
        """Stop the worker; idempotent, and concurrent callers wait for the same close."""
        if self._close_started:
            await self._closed.wait()
            return
        self._close_started = True
        try:
            await asyncio.to_thread(self.stop)
            logger.info("%s stopped", self._name)
        finally:
            self._closed.set()

    async def __aenter__(self) -> Self:
        """Start the worker thread."""
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the engine."""
        await self.close()

    # -- submission --------------------------------------------------------------------------------

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None
    ) -> TokenStream:
        """Submit a request; call from a running event loop.

        Args:
            prompt_ids: Prompt token ids (e.g. from :meth:`encode_chat`).
            params: Sampling settings; defaults to ``SamplingParams()``.

        Returns:
            The stream of generated ids.

        Raises:
            AdmissionError: Prompt empty/too long/out of vocabulary (``field="prompt"``),
                ``max_tokens`` above the ceiling (``field="max_tokens"``), stop strings without a
                tokenizer (``field="stop"``), queue full or engine closed (``field=None``).
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, not {type(params).__name__}")
        prompt = self._check_prompt(prompt_ids)
        if params.max_tokens > self.max_tokens_limit:
            raise AdmissionError(
                f"max_tokens {params.max_tokens} exceeds this node's limit of {self.max_tokens_limit}",
                field="max_tokens",
            )
        if params.stop and self._tokenizer is None:
            raise AdmissionError("stop strings need a tokenizer", field="stop")
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._closing:
                raise AdmissionError("the engine is closed")
            waiting = self._active + len(self._pending)
            if waiting >= self.max_concurrent + self.max_queue:
                raise AdmissionError(
                    f"busy: {self._active} requests running and {len(self._pending)} queued "
                    f"(limits {self.max_concurrent} + {self.max_queue}); retry later"
                )
            reserve = len(prompt) + params.max_tokens
            if self.max_batch_tokens and self._reserved_tokens + reserve > self.max_batch_tokens:
                if reserve > self.max_batch_tokens:
                    raise AdmissionError(
                        f"prompt + max_tokens = {reserve} tokens exceeds this node's batch budget of "
                        f"{self.max_batch_tokens}",
                        field="max_tokens",
                    )
                raise AdmissionError(
                    f"busy: batch token budget {self._reserved_tokens}/{self.max_batch_tokens} in use, "
                    f"this request needs {reserve}; retry later"
                )
            self._reserved_tokens += reserve
            self._next_id += 1
            stream = TokenStream(
                request_id=self._next_id,
                prompt_tokens=len(prompt),
                loop=loop,
                buffer_chunks=self._buffer_chunks,
                on_cancel=self._wake,
            )
            self._pending.append(
                _Request(
                    stream=stream,
                    prompt=prompt,
                    params=params,
                    stop_token_ids=frozenset(self.eos_ids) | frozenset(params.stop_ids),
                    reserved=reserve,
                )
            )
            self._cv.notify_all()
        self.start()
        logger.debug("request %d queued: %d prompt tokens", stream.request_id, len(prompt))
        return stream

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """Validate prompt ids against the limits and the vocabulary."""
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
            raise AdmissionError("prompt must be a list of token ids", field="prompt")
        if not prompt_ids:
            raise AdmissionError("prompt is empty", field="prompt")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise AdmissionError(
                f"prompt has {len(prompt_ids)} tokens; this node accepts at most "
                f"{self.max_prompt_tokens}",
                field="prompt",
            )
        if self._max_positions is not None and len(prompt_ids) >= self._max_positions:
            raise AdmissionError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self._max_positions}",
                field="prompt",
            )
        prompt: list[int] = []
        for token in prompt_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self._vocab_size:
                raise AdmissionError(
                    f"prompt contains {token!r}, not a token id below {self._vocab_size}",
                    field="prompt",
                )
            prompt.append(token)
        return prompt

    def _wake(self) -> None:
        """Wake the worker (a stream was cancelled)."""
        with self._cv:
            self._cv.notify_all()

    # -- worker thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        """Worker thread: run the loop until closed, then end every stream still open."""
        try:
            self._work()
        except Exception:
            # A bug in the loop itself: fail everything rather than hang the consumers.
            logger.exception("%s worker crashed", self._name)
            with self._cv:
                self._closing = True
            self._abort_all("error", "engine worker crashed")
        else:
            self._abort_all("cancel", None)

    def _work(self) -> None:
        """Worker loop: admit, prefill, decode, deliver; until closed."""
        with torch.inference_mode():
            while True:
                newcomers = self._next_work()
                if newcomers is None:
                    break
                for request in newcomers:
                    self._admit(request)
                    self._flush()  # first tokens go out right after their prefill
                if self._rows:
                    self._decode_step()
                self._flush()

    def _drop_cancelled_locked(self) -> None:
        """Finish queued requests whose consumer already cancelled (caller holds ``_cv``)."""
        dropped = [r for r in self._pending if r.stream.cancelled]
        for request in dropped:
            self._pending.remove(request)
            self._finish_locked(request, "cancel")
        if dropped:
            self._flush()

    def _next_work(self) -> list[_Request] | None:
        """Wait for work; return newcomers to admit, or ``None`` when closing."""
        with self._cv:
            while True:
                if self._closing:
                    return None
                self._drop_cancelled_locked()
                room = self.max_concurrent - self._active
                newcomers: list[_Request] = []
                budget = self._prefill_budget
                while self._pending and len(newcomers) < room:
                    if newcomers and len(self._pending[0].prompt) > budget:
                        break  # the rest waits for the next step
                    request = self._pending.popleft()
                    budget -= len(request.prompt)
                    request.admitted = True
                    newcomers.append(request)
                self._active += len(newcomers)
                if newcomers or self._rows:
                    return newcomers
                self._cv.wait()

    def _admit(self, request: _Request) -> None:
        """Prefill one request alone, emit its first token and merge its KV into the batch."""
        stream = request.stream
        if stream.cancelled:
            self._finish(request, "cancel")
            return
        try:
            seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
            inputs = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
            kwargs: dict[str, Any] = {"use_cache": True}
            if self._keep_last:
                kwargs["logits_to_keep"] = 1
            out = self._model(input_ids=inputs, **kwargs)
            request.position = len(request.prompt)
            token = sample_next_token(out.logits[0, -1], request.params, request.generator)
            stream.ttft_seconds = time.perf_counter() - stream.submitted_at
            if self._advance(request, token):
                return
            self._merge(request, out.cache)
        except Exception as exc:
            # Contained: one bad request (e.g. out of memory on a long prompt) fails alone.
            logger.exception("request %d failed in prefill", stream.request_id)
            self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
            return
        logger.debug(
            "request %d joined the batch (%d rows, ttft %.3f s)",
            stream.request_id,
            len(self._rows),
            stream.ttft_seconds,
        )

    def _merge(self, request: _Request, cache: Any) -> None:
        """Left-pad and concatenate a prefilled request's KV into the running batch."""
        length = len(request.prompt)
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if not self._rows:
            self._cache, self._mask, self._rows = cache, row_mask, [request]
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], length)
        # Build everything first, then assign, so a failure leaves the batch intact.
        merged = [
            (
                torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0),
                torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0),
            )
            for old, new in zip(self._cache.layers, cache.layers, strict=True)
        ]
        mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(row_mask, width)], dim=0)
        for layer, (keys, values) in zip(self._cache.layers, merged, strict=True):
            layer.keys, layer.values = keys, values
        self._mask = mask
        self._rows.append(request)

    def _decode_step(self) -> None:
        """Run one batched decode step for every row and process the sampled tokens."""
        self._drop_rows([r for r in self._rows if r.stream.cancelled], "cancel")
        if not self._rows:
            return
        assert self._mask is not None
        rows = self._rows
        inputs = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.cat(
            [self._mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], dim=1
        )
        try:
            out = self._model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                cache=self._cache,
                use_cache=True,
            )
        except Exception as exc:
            # The batch cannot be attributed to one request: fail the rows of this step only.
            logger.exception("%s decode step failed for %d rows", self._name, len(rows))
            self._drop_rows(list(rows), "error", error=f"{type(exc).__name__}: {exc}")
            return
        self.steps += 1
        self._cache = out.cache
        self._mask = mask
        logits = out.logits[:, -1, :]
        greedy = logits.argmax(dim=-1).tolist()
        done: list[_Request] = []
        for index, request in enumerate(rows):
            request.position += 1
            if request.stream.cancelled:
                # Cancelled during the forward pass: emit nothing more.
                self._finish(request, "cancel")
                done.append(request)
                continue
            try:
                if request.params.greedy:
                    token = int(greedy[index])
                else:
                    token = sample_next_token(logits[index], request.params, request.generator)
                finished = self._advance(request, token)
            except Exception as exc:
                # Contained: a sampling or detokenizing failure ends this request only.
                logger.exception("request %d failed", request.stream.request_id)
                self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
                finished = True
            if finished:
                done.append(request)
        self._drop_rows(done, None)

    def _drop_rows(
        self, leaving: list[_Request], reason: FinishReason | None, error: str | None = None
    ) -> None:
        """Remove rows from the batch (finishing them with ``reason`` unless already finished)."""
        if not leaving:
            return
        for request in leaving:
            if not request.finished:
                self._finish(request, reason or "cancel", error=error)
        gone = {id(r) for r in leaving}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        # Trim columns that are padding in every remaining row.
        first = int(torch.nonzero(mask.any(dim=0))[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]
        self._mask = mask[:, first:]
        self._rows = [self._rows[i] for i in keep]

    def _advance(self, request: _Request, token: int) -> bool:
        """Account one sampled token; queue what may be emitted. Returns whether it finished."""
        if token in request.stop_token_ids:
            # EOS or a stop id: flush held-back ids (no stop string matched), emit not the stop.
            self._finish(request, "stop", matched_stop=token)
            return True
        request.generated.append(token)
        request.next_token = token
        ready = len(request.generated)
        if request.params.stop:
            ready, matched = self._scan_stop_strings(request)
            if matched is not None:
                self._finish(request, "stop", matched_stop=matched, upto=ready)
                return True
        if len(request.generated) >= request.params.max_tokens or (
            self._max_positions is not None and request.position >= self._max_positions
        ):
            self._finish(request, "length")
            return True
        if ready > request.emitted:
            self._emit(request, ready, None)
        return False

    def _scan_stop_strings(self, request: _Request) -> tuple[int, str | None]:
        """Search the not-yet-emitted text for stop strings.

        Only the held-back tail can contain a stop string: emitted text never ends with a proper
        prefix of one. The tail is decoded with a few emitted ids of left context, because
        SentencePiece-style tokenizers drop a word's leading space at the start of a decode.

        Returns:
            ``(ready, matched)``: the ids ``generated[:ready]`` may be emitted; ``matched`` is the
            stop string found (then ``ready`` ends before it), else ``None``.
        """
        tail = request.generated[request.emitted :]
        context = request.generated[max(0, request.emitted - STOP_CONTEXT_TOKENS) : request.emitted]
        text = self._decode_after(context, tail)
        stops = request.params.stop
        found: tuple[int, str] | None = None
        for stop in stops:
            at = text.find(stop)
            if at >= 0 and (found is None or at < found[0]):
                found = (at, stop)
        if found is not None:
            limit = found[0]
        else:
            # Hold back a suffix that could still grow into a stop string.
            hold = 0
            for stop in stops:
                for size in range(min(len(stop) - 1, len(text)), hold, -1):
                    if text.endswith(stop[:size]):
                        hold = size
                        break
            if hold == 0:
                return len(request.generated), None
            limit = len(text) - hold
        keep = 0
        for count in range(len(tail) - 1, 0, -1):
            if len(self._decode_after(context, tail[:count])) <= limit:
                keep = count
                break
        return request.emitted + keep, found[1] if found is not None else None

    def _decode_after(self, context: list[int], ids: list[int]) -> str:
        """Text of ``ids`` as it reads after ``context`` (falls back to decoding ``ids`` alone)."""
        if not context:
            return self.decode(ids)
        before = self.decode(context)
        both = self.decode(context + ids)
        return both[len(before) :] if both.startswith(before) else self.decode(ids)

    def _emit(self, request: _Request, upto: int, reason: FinishReason | None, **extra: Any) -> None:
        """Queue ``generated[emitted:upto]`` (and possibly the end) for the request's stream."""
        ids = request.generated[request.emitted : upto]
        request.emitted = max(request.emitted, upto)
        self._outbox.append(_Delivery(request.stream, ids, reason, **extra))

    def _finish(
        self,
        request: _Request,
        reason: FinishReason,
        *,
        matched_stop: str | int | None = None,
        error: str | None = None,
        upto: int | None = None,
    ) -> None:
        """End a request: emit its remaining ids (all, or up to ``upto``) and free its slot."""
        with self._cv:
            self._finish_locked(request, reason, matched_stop=matched_stop, error=error, upto=upto)

    def _finish_locked(
        self,
        request: _Request,
        reason: FinishReason,
        *,
        matched_stop: str | int | None = None,
        error: str | None = None,
        upto: int | None = None,
    ) -> None:
        if request.finished:
            return
        request.finished = True
        if reason in ("cancel", "error"):
            upto = request.emitted  # nothing more after a cancel or an error
        elif upto is None:
            upto = len(request.generated)
        self._emit(request, upto, reason, matched_stop=matched_stop, error=error)
        if request.admitted:
            self._active -= 1
        self._reserved_tokens -= request.reserved
        request.reserved = 0
        logger.debug(
            "request %d finished: %s after %d tokens",
            request.stream.request_id,
            reason,
            len(request.generated),
        )

    def _abort_all(self, reason: FinishReason, error: str | None) -> None:
        """Finish every running and queued request (worker exit)."""
        for request in self._rows:
            self._finish(request, reason, error=error)
        self._rows, self._cache, self._mask = [], None, None
        with self._cv:
            while self._pending:
                self._finish_locked(self._pending.popleft(), reason, error=error)
        self._flush()

    def _flush(self) -> None:
        """Hand queued deliveries to their event loops, one callback per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        for item in self._outbox:
            by_loop.setdefault(item.stream._loop, []).append(item)  # noqa: SLF001 - same module
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:
                # The consumers' loop is closed: nobody is listening, so drop their requests.
                for item in items:
                    item.stream._cancel_requested.set()  # noqa: SLF001 - same module


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a ``[batch, heads, seq, dim]`` KV tensor with zeros to ``seq == width``."""
    missing = width - tensor.shape[-2]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a ``[batch, seq]`` attention mask with zeros to ``seq == width``."""
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.nn.functional.pad(mask, (missing, 0))
