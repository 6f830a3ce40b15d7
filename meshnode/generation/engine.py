"""Engine: the request book and worker thread that every local batch backend runs under.

The seam between scheduling and compute:

* :class:`Engine` owns requests: validation and admission (``max_concurrent``, ``max_queue``,
  ``max_batch_tokens``), the queue, one worker thread, token accounting (stop ids, stop strings,
  ``max_tokens``), and handing results back to each stream's event loop. It knows nothing of
  tensors.
* A :class:`BatchBackend` owns the model and the batch. Its :meth:`~BatchBackend.serve` runs on
  the worker thread: it asks the engine for newcomers (:meth:`Engine.next_work`), computes, and
  reports every sampled token with :meth:`Engine.advance` (which says whether that request is
  finished) and every failure with :meth:`Engine.finish`. The torch backend
  (:mod:`meshnode.generation.torch_backend`), the CUDA backend (:mod:`meshnode.generation.cuda`)
  and any other local backend plug in here the same way.

Results go back with ``loop.call_soon_threadsafe`` once per step into each stream's bounded buffer
(overflow policy ``coalesce``, see :class:`~meshnode.generation.api.TokenStream`), so the worker
never waits on a slow consumer. Stop ids (EOS included) end a stream with ``finish_reason="stop"``
and are not emitted; ids whose text could still begin a stop string are held back
(:mod:`meshnode.generation.stops`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from meshnode.errors import AdmissionError
from meshnode.generation.api import DEFAULT_STREAM_BUFFER_CHUNKS, FinishReason, SamplingParams, TokenStream
from meshnode.generation.stops import scan_stop_strings

__all__ = ["DEFAULT_PREFILL_BUDGET_TOKENS", "BatchBackend", "Engine", "Request"]

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_BUDGET_TOKENS = 1024
"""Prompt tokens prefilled between two decode steps (at least one request is always admitted)."""
STOP_JOIN_TIMEOUT_SECONDS = 30.0
"""Bound on waiting for the worker thread to end in :meth:`Engine.close` (one step, at most)."""


@dataclass(eq=False)
class Request:
    """Worker-side state of one request (the backend may keep its own per-request state in `state`)."""

    stream: TokenStream
    prompt: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    position: int = 0
    next_token: int = -1
    admitted: bool = False
    finished: bool = False
    reserved: int = 0
    """KV positions reserved for this request (prompt + max_tokens) under ``max_batch_tokens``."""
    state: Any = None
    """The backend's own per-request data (an RNG, a slot, ...)."""


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
        item.stream.put(item.ids, item.finish_reason, matched_stop=item.matched_stop, error=item.error)


class BatchBackend(Protocol):
    """The compute side of an :class:`Engine` (see the module docstring)."""

    vocab_size: int
    """Prompt ids must be below this."""
    max_positions: int | None
    """Longest sequence (prompt + generated) a request may reach; None = unbounded."""
    slots: int | None
    """Rows the backend can hold at once (None = no limit of its own)."""
    steps: int
    """Batched decode steps run so far (for stats and tests)."""

    def describe(self) -> str:
        """Where it runs, for the start-up log (e.g. ``cpu``, ``cuda:0``)."""
        ...

    def check(self, prompt_length: int, params: SamplingParams) -> None:
        """Refuse a request the backend cannot hold (raises AdmissionError); called at submission."""
        ...

    def serve(self, engine: Engine) -> None:
        """Run on the worker thread until :meth:`Engine.next_work` returns None."""
        ...

    def reset(self) -> list[Request]:
        """The worker is exiting: forget every row; returns the requests held (the engine ends them)."""
        ...


class Engine:
    """Continuous batching of token-id requests over a :class:`BatchBackend`.

    Use it as an async context manager (or call :meth:`start` and :meth:`close`)::

        async with TorchEngine.from_loaded(resolve_model(None)) as engine:
            async with engine.generate(ids, SamplingParams(temperature=0)) as stream:
                async for chunk in stream:
                    ...
    """

    def __init__(
        self,
        backend: BatchBackend,
        *,
        decode: Callable[[Sequence[int]], str] | None = None,
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
        """Create an engine; the worker thread starts on :meth:`start` or the first request.

        Args:
            backend: The model and its batch.
            decode: Text of ids (for stop strings); ``None`` allows id-only use (no stop strings).
            model_id: Public model name.
            eos_ids: Ids that always end a stream with ``"stop"``.
            max_concurrent: Rows in the running batch (at most the backend's slots); more queue.
            max_queue: Queued requests beyond ``max_concurrent`` before refusing.
            max_prompt_tokens: Longest accepted prompt.
            max_tokens_limit: Largest accepted ``SamplingParams.max_tokens``.
            stream_buffer_chunks: Per-stream buffered chunks before coalescing.
            prefill_budget_tokens: Prompt tokens prefilled between two decode steps, so a burst
                of long prompts does not stall running streams for long (one request is always
                admitted per step).
            max_batch_tokens: Memory admission: the sum of ``len(prompt) + max_tokens`` over
                running and queued requests may not exceed this; a request that would is refused
                as busy instead of risking an out-of-memory failure of the whole batch. 0 = off.
            name: Used in the worker thread's name and in logs.

        Raises:
            ValueError: A limit is not positive.
        """
        for label, value in (("max_concurrent", max_concurrent), ("max_prompt_tokens", max_prompt_tokens),
                             ("max_tokens_limit", max_tokens_limit)):
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_batch_tokens < 0:
            raise ValueError(f"max_batch_tokens must be >= 0, got {max_batch_tokens}")
        self.backend = backend
        self._decode = decode
        self._model_id = model_id
        self.eos_ids: tuple[int, ...] = tuple(eos_ids)
        """Ids that always end a stream."""
        self.max_concurrent = min(max_concurrent, backend.slots) if backend.slots else max_concurrent
        """Rows in the running batch."""
        self.max_queue = max_queue
        """Queued requests allowed beyond ``max_concurrent``."""
        self.max_prompt_tokens = max_prompt_tokens
        """Longest accepted prompt, in tokens."""
        self.max_tokens_limit = max_tokens_limit
        """Largest accepted ``max_tokens``."""
        self.max_batch_tokens = max_batch_tokens
        """Budget of reserved KV positions over running + queued requests (0 = none)."""
        self.prefill_budget = max(1, prefill_budget_tokens)
        """Prompt tokens a backend should prefill between two decode steps."""
        self.name = name
        self._buffer_chunks = stream_buffer_chunks
        self._reserved_tokens = 0
        self._cv = threading.Condition()
        self._pending: deque[Request] = deque()
        self._active = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._next_id = 0
        self._close_started = False
        self._closed = asyncio.Event()
        self._outbox: list[_Delivery] = []  # worker thread only

    # -- properties --------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """Public model name."""
        return self._model_id

    @property
    def steps(self) -> int:
        """Batched decode steps run so far."""
        return self.backend.steps

    @property
    def reserved_tokens(self) -> int:
        """KV positions reserved by running and queued requests (see ``max_batch_tokens``)."""
        with self._cv:
            return self._reserved_tokens

    def load_info(self) -> dict[str, int]:
        """Current load: ``active``, ``queued``, ``max_concurrent``, ``max_queue``."""
        with self._cv:
            return {"active": self._active, "queued": len(self._pending), "max_concurrent": self.max_concurrent,
                    "max_queue": self.max_queue}

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
                self._thread = threading.Thread(target=self._run, name=f"meshnode-{self.name}", daemon=True)
                self._thread.start()
                logger.info("%s started: model %s on %s, max_concurrent=%d", self.name, self._model_id,
                            self.backend.describe(), self.max_concurrent)

    def stop(self, timeout: float | None = STOP_JOIN_TIMEOUT_SECONDS) -> None:
        """Stop the worker thread and wait for it, at most `timeout` seconds (blocking; prefer
        :meth:`close` in async code). Running and queued streams end with ``finish_reason="cancel"``.
        """
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("%s: the worker thread did not stop within %.0f s (a step still running)",
                               self.name, timeout)

    async def close(self) -> None:
        """Stop the worker; idempotent, and concurrent callers wait for the same close."""
        if self._close_started:
            await self._closed.wait()
            return
        self._close_started = True
        try:
            await asyncio.to_thread(self.stop)
            logger.info("%s stopped", self.name)
        finally:
            self._closed.set()

    async def __aenter__(self) -> Self:
        """Start the worker thread."""
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Close the engine."""
        await self.close()

    # -- submission (event loop) -------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> TokenStream:
        """Submit a request; call from a running event loop.

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
            raise AdmissionError(f"max_tokens {params.max_tokens} exceeds this node's limit of "
                                 f"{self.max_tokens_limit}", field="max_tokens")
        if params.stop and self._decode is None:
            raise AdmissionError("stop strings need a tokenizer", field="stop")
        self.backend.check(len(prompt), params)
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._closing:
                raise AdmissionError("the engine is closed")
            if self._active + len(self._pending) >= self.max_concurrent + self.max_queue:
                raise AdmissionError(f"busy: {self._active} requests running and {len(self._pending)} queued "
                                     f"(limits {self.max_concurrent} + {self.max_queue}); retry later")
            reserve = len(prompt) + params.max_tokens
            if self.max_batch_tokens and self._reserved_tokens + reserve > self.max_batch_tokens:
                if reserve > self.max_batch_tokens:
                    raise AdmissionError(f"prompt + max_tokens = {reserve} tokens exceeds this node's batch "
                                         f"budget of {self.max_batch_tokens}", field="max_tokens")
                raise AdmissionError(f"busy: batch token budget {self._reserved_tokens}/{self.max_batch_tokens} "
                                     f"in use, this request needs {reserve}; retry later")
            self._reserved_tokens += reserve
            self._next_id += 1
            stream = TokenStream(request_id=self._next_id, prompt_tokens=len(prompt), loop=loop,
                                 buffer_chunks=self._buffer_chunks, on_cancel=self._wake)
            self._pending.append(Request(stream=stream, prompt=prompt, params=params,
                                         stop_token_ids=frozenset(self.eos_ids) | frozenset(params.stop_ids),
                                         reserved=reserve))
            self._cv.notify_all()
        self.start()
        logger.debug("request %d queued: %d prompt tokens", stream.request_id, len(prompt))
        return stream

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
            raise AdmissionError("prompt must be a list of token ids", field="prompt")
        if not prompt_ids:
            raise AdmissionError("prompt is empty", field="prompt")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise AdmissionError(f"prompt has {len(prompt_ids)} tokens; this node's limit is "
                                 f"{self.max_prompt_tokens}", field="prompt")
        limit = self.backend.max_positions
        if limit is not None and len(prompt_ids) >= limit:
            raise AdmissionError(f"prompt has {len(prompt_ids)} tokens; the model's context is {limit}",
                                 field="prompt")
        vocab = self.backend.vocab_size
        prompt: list[int] = []
        for token in prompt_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise AdmissionError(f"prompt contains {token!r}, not a token id below {vocab}", field="prompt")
            prompt.append(token)
        return prompt

    def _wake(self) -> None:
        """Wake the worker (a stream was cancelled)."""
        with self._cv:
            self._cv.notify_all()

    # -- the worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        """Worker thread: let the backend serve until closed, then end every stream still open."""
        try:
            self.backend.serve(self)
        except Exception:
            # A bug in the loop itself: fail everything rather than hang the consumers.
            logger.exception("%s worker crashed", self.name)
            with self._cv:
                self._closing = True
            self._abort_all("error", "engine worker crashed")
        else:
            self._abort_all("cancel", None)

    def next_work(self, room: int, *, busy: bool, budgeted: bool = True) -> list[Request] | None:
        """Wait for work (worker thread): up to `room` newcomers to admit, ``[]`` when only the rows
        the backend already holds need a step (`busy`), or None when the engine is closing.

        With `budgeted`, newcomers after the first stop at :attr:`prefill_budget` prompt tokens.
        """
        with self._cv:
            while True:
                if self._closing:
                    return None
                self._drop_cancelled_locked()
                newcomers: list[Request] = []
                budget = self.prefill_budget
                while self._pending and len(newcomers) < room:
                    if budgeted and newcomers and len(self._pending[0].prompt) > budget:
                        break  # the rest waits for the next step
                    request = self._pending.popleft()
                    budget -= len(request.prompt)
                    request.admitted = True
                    newcomers.append(request)
                self._active += len(newcomers)
                if newcomers or busy:
                    return newcomers
                self._cv.wait()

    def _drop_cancelled_locked(self) -> None:
        """Finish queued requests whose consumer already cancelled (caller holds ``_cv``)."""
        dropped = [r for r in self._pending if r.stream.cancelled]
        for request in dropped:
            self._pending.remove(request)
            self._finish_locked(request, "cancel")
        if dropped:
            self.flush()

    def started(self, request: Request) -> None:
        """The request's prompt is prefilled and its first token about to be advanced (TTFT)."""
        request.position = len(request.prompt)
        request.stream.ttft_seconds = time.perf_counter() - request.stream.submitted_at

    def advance(self, request: Request, token: int) -> bool:
        """Account one sampled token; queue what may be emitted. Returns whether it finished."""
        if token in request.stop_token_ids:
            # EOS or a stop id: flush held-back ids (no stop string matched), emit not the stop.
            self.finish(request, "stop", matched_stop=token)
            return True
        request.generated.append(token)
        request.next_token = token
        ready = len(request.generated)
        if request.params.stop:
            assert self._decode is not None  # generate() refuses stop strings without one
            ready, matched = scan_stop_strings(request.generated, request.emitted, request.params.stop,
                                               self._decode)
            if matched is not None:
                self.finish(request, "stop", matched_stop=matched, upto=ready)
                return True
        limit = self.backend.max_positions
        if len(request.generated) >= request.params.max_tokens or (limit is not None and request.position >= limit):
            self.finish(request, "length")
            return True
        if ready > request.emitted:
            self._emit(request, ready, None)
        return False

    def _emit(self, request: Request, upto: int, reason: FinishReason | None, **extra: Any) -> None:
        """Queue ``generated[emitted:upto]`` (and possibly the end) for the request's stream."""
        ids = request.generated[request.emitted : upto]
        request.emitted = max(request.emitted, upto)
        self._outbox.append(_Delivery(request.stream, ids, reason, **extra))

    def finish(self, request: Request, reason: FinishReason, *, matched_stop: str | int | None = None,
               error: str | None = None, upto: int | None = None) -> None:
        """End a request: emit its remaining ids (all, or up to `upto`) and free its place."""
        with self._cv:
            self._finish_locked(request, reason, matched_stop=matched_stop, error=error, upto=upto)

    def _finish_locked(self, request: Request, reason: FinishReason, *, matched_stop: str | int | None = None,
                       error: str | None = None, upto: int | None = None) -> None:
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
        logger.debug("request %d finished: %s after %d tokens", request.stream.request_id, reason,
                     len(request.generated))

    def fail(self, requests: Sequence[Request], exc: BaseException, what: str) -> None:
        """A step failed for these requests only: log once and end them with an error."""
        logger.error("%s %s failed for %d request(s)", self.name, what, len(requests), exc_info=exc)
        for request in requests:
            self.finish(request, "error", error=f"{type(exc).__name__}: {exc}")

    def _abort_all(self, reason: FinishReason, error: str | None) -> None:
        """Finish every running and queued request (worker exit)."""
        for request in self.backend.reset():
            self.finish(request, reason, error=error)
        with self._cv:
            while self._pending:
                self._finish_locked(self._pending.popleft(), reason, error=error)
        self.flush()

    def flush(self) -> None:
        """Hand queued deliveries to their event loops, one callback per loop (worker thread)."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        for item in self._outbox:
            by_loop.setdefault(item.stream.loop, []).append(item)
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:
                # The consumers' loop is closed: nobody is listening, so drop their requests.
                for item in items:
                    item.stream.cancel()
