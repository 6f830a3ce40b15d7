"""Generations: the calls a service is running, from the backend's stream to the asker's frames and result.

Each accepted call (``engine_run`` or ``/ai``) runs in its own task: the backend's stream is pumped
into a queue, coalesced, and sent as Codec frames to the asker only (:mod:`.streaming`, or the link
policy's sink when one is configured). Frames a remote Codec upstream sent are forwarded byte for
byte when there is no link policy (:func:`.streaming.coalesce` with ``verbatim``); a pacer re-packs
their ids. An ``engine_run`` result follows once the stream ended. A
call still generating at its deadline ends with ``finish_reason: "length"``, so the asker gets its
result before it gives up. Cancelling (asker left, END envelope, shutdown) stops the generation
within one engine step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshnode.errors import AdmissionError, MeshError
from meshnode.generation.api import Backend, Prompt, SamplingParams, TokenStream
from meshnode.legion.deadline import ThroughputMeter
from meshnode.legion.outbox import Sender
from meshnode.legion.streaming import FrameSender, coalesce, pump
from meshnode.link.policy import StreamPolicy, StreamSink
from meshnode.tasks import TaskOwner
from meshnode.wire import legion

__all__ = ["CallState", "GenerationSettings", "Generations"]

logger = logging.getLogger(__name__)

STREAM_QUEUE_CHUNKS = 1024
FINAL_SEND_TIMEOUT_SECONDS = 1.0
"""Bound on telling an asker that shutdown cancelled its stream."""
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.95


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    max_tokens: int = 1024
    frame_max_ids: int = 16
    frame_max_delay_seconds: float = 0.05
    deadline_seconds: float = 0.0
    """A call still generating after this long ends with finish_reason "length" (0 = no limit)."""


@dataclass(eq=False)
class CallState:
    peer_id: str
    call_id: str
    max_tokens: int
    started: float
    tokens: int = 0
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    queued: bool = False
    """Every engine slot was taken when it started: its time to first token includes a queue wait."""

    @property
    def remaining(self) -> int:
        return max(0, self.max_tokens - self.tokens)


@dataclass
class _Outcome:
    status: str = "ok"
    error: str | None = None
    finish: str | None = None
    ids: list[int] = field(default_factory=list)
    ttft_ms: int | None = None
    first: float | None = None
    last: float | None = None


class Generations:
    """The running calls of one service (see the module docstring)."""

    def __init__(self, backend: Backend, settings: GenerationSettings, *, frames: Sender, tools: Sender,
                 meter: ThroughputMeter, pacing: StreamPolicy | None, clock: Callable[[], float],
                 on_change: Callable[[], None], on_closed: Callable[[str], None]) -> None:
        self.backend = backend
        self.settings = settings
        self._frames = frames
        self._tools = tools
        self.meter = meter
        self.pacing = pacing
        self.clock = clock
        self._on_change = on_change
        self._on_closed = on_closed
        self.calls: dict[tuple[str, str], CallState] = {}
        self.draining = False
        self.cancelled_calls = 0
        self.completed_calls = 0
        self.failed_calls = 0
        self._tasks = TaskOwner("legion.gen")

    def remaining(self) -> list[int]:
        """Tokens each running call may still generate (its budget minus what it sent)."""
        return [call.remaining for call in self.calls.values()]

    def slots(self) -> int:
        """Streams the backend decodes at once."""
        return max(1, int(self.backend.load_info().get("max_concurrent", 1)))

    def start(self, peer_id: str, call_id: str, messages: list[dict[str, str]], max_tokens: int,
              temperature: float | None, top_p: float | None, *, reply_tool: bool, compression: str | None) -> None:
        call = CallState(peer_id=peer_id, call_id=call_id, max_tokens=min(max_tokens, self.settings.max_tokens),
                         started=self.clock(), queued=len(self.calls) >= self.slots())
        self.calls[(peer_id, call_id)] = call
        params = SamplingParams(temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
                                top_p=DEFAULT_TOP_P if top_p is None else top_p, max_tokens=call.max_tokens)
        call.task = self._tasks.spawn(self._run(call, messages, params, reply_tool, compression),
                                      f"{peer_id[:8]}/{call_id}")
        self.meter.busy(len(self.calls))

    def cancel_call(self, peer_id: str, call_id: str, why: str) -> None:
        call = self.calls.get((peer_id, call_id))
        if call is not None and call.task is not None and not call.task.done():
            logger.info("cancelling call %s from %s: %s", call_id, peer_id, why)
            call.cancelled = True
            call.task.cancel()

    def cancel_peer(self, peer_id: str, why: str) -> None:
        for owner, call_id in list(self.calls):
            if owner == peer_id:
                self.cancel_call(owner, call_id, why)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` for the running calls to end; True when they did."""
        running = [c.task for c in self.calls.values() if c.task is not None]
        if not running:
            return True
        _, pending = await asyncio.wait(running, timeout=timeout)
        return not pending

    async def cancel_all(self, why: str) -> None:
        tasks = [c.task for c in self.calls.values() if c.task is not None and not c.task.done()]
        if tasks:
            logger.info("cancelling %d generation(s): %s", len(tasks), why)
        for call in list(self.calls.values()):
            call.cancelled = True
        await self._tasks.aclose()

    # -- one call ----------------------------------------------------------------------------------

    def _sink(self, call: CallState, compression: str | None) -> tuple[Any, int, float]:
        negotiated = compression is not None
        if self.pacing is not None:
            sink: StreamSink = self.pacing.open_stream(self._frames, call.peer_id, call.call_id, negotiated=negotiated,
                                                       compression=compression or "identity")
            return sink, *sink.coalesce
        sender = FrameSender(self._frames, call.peer_id, stream_id=call.call_id if negotiated else None,
                             compression=compression or "identity")
        return sender, self.settings.frame_max_ids, self.settings.frame_max_delay_seconds

    async def _run(self, call: CallState, messages: list[dict[str, str]], params: SamplingParams,
                   reply_tool: bool, compression: str | None) -> None:
        peer_id, call_id = call.peer_id, call.call_id
        sender, max_ids, max_delay = self._sink(call, compression)
        outcome = _Outcome()
        stream: TokenStream | None = None
        try:
            stream = await self.backend.start(Prompt.chat(messages), params)
            self._on_change()
            logger.info("call %s from %s: %d prompt tokens", call_id, peer_id, stream.prompt_tokens)
            await self._stream(call, stream, sender, max_ids, max_delay, outcome)
        except asyncio.CancelledError:
            call.cancelled = True
            self.cancelled_calls += 1
            logger.info("call %s from %s cancelled after %d tokens", call_id, peer_id, len(outcome.ids))
            if self.draining:  # the shutdown deadline passed: end the stream visibly (STYLE §5.6 step 4)
                await self._tell_cancelled(sender, peer_id, call_id, reply_tool)
            raise
        except AdmissionError as exc:  # refused (prompt too long, busy, batch token budget): say why
            outcome.status, outcome.error = "error", _busy(str(exc))
        except MeshError as exc:
            outcome.status, outcome.error = "error", f"generation failed: {exc}"
            logger.warning("call %s from %s failed: %s", call_id, peer_id, exc)
        except Exception:  # a backend bug fails this request only; the node keeps serving the others
            outcome.status, outcome.error = "error", "generation failed: internal error"
            logger.exception("call %s from %s failed", call_id, peer_id)
        finally:
            if stream is not None:
                stream.cancel()
            self._end(call, outcome)
        if outcome.status == "error" and sender.frames_sent == 0:
            await sender.send([], "error")
        if reply_tool:
            await self._reply(call, outcome)

    async def _stream(self, call: CallState, stream: TokenStream, sender: Any, max_ids: int, max_delay: float,
                      outcome: _Outcome) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_QUEUE_CHUNKS)
        feeder = self._tasks.spawn(pump(stream, queue), f"pump[{call.call_id}]")
        deadline = self.settings.deadline_seconds
        try:
            async with asyncio.timeout(deadline if deadline > 0 else None):
                async for batch in coalesce(queue, max_ids, max_delay, verbatim=self.pacing is None):
                    now = self.clock()
                    if batch.ids:
                        if outcome.first is None:
                            outcome.first = now
                            outcome.ttft_ms = int((now - call.started) * 1000)
                        outcome.last = now
                        call.tokens += len(batch.ids)
                        self.meter.tokens(len(batch.ids))
                    outcome.ids.extend(batch.ids)
                    outcome.finish = batch.finish_reason
                    if batch.frame is not None:
                        await sender.send(batch.ids, batch.finish_reason, batch.frame)
                    else:
                        await sender.send(batch.ids, batch.finish_reason)
        except TimeoutError:  # the asker would give up soon: end here and send what there is
            logger.info("call %s from %s reached its %.0f s deadline after %d tokens", call.call_id, call.peer_id,
                        deadline, len(outcome.ids))
            outcome.finish = "length"
            await sender.send([], "length")
        finally:
            if feeder is not None:
                feeder.cancel()
        if outcome.finish == "error":  # the engine failed mid-stream (terminal error frame sent)
            reason = getattr(stream, "error", None)  # e.g. a remote upstream's timeout or 5xx
            outcome.status, outcome.error = "error", f"generation failed: {reason}" if reason else "generation failed"

    def _end(self, call: CallState, outcome: _Outcome) -> None:
        self.calls.pop((call.peer_id, call.call_id), None)
        self.meter.busy(len(self.calls))
        self._on_closed(call.peer_id)
        if self.pacing is not None:
            self.pacing.release(call.peer_id, call.call_id)
        self._on_change()
        if call.cancelled:
            return
        self.meter.call_done(len(outcome.ids), call.started, outcome.first, outcome.last, queued=call.queued)
        elapsed = max(1e-6, self.clock() - call.started)
        if outcome.status == "error":
            self.failed_calls += 1
        if outcome.finish == "cancel":
            self.cancelled_calls += 1
            logger.info("call %s from %s cancelled by the asker after %d tokens", call.call_id, call.peer_id,
                        len(outcome.ids))
        else:
            self.completed_calls += 1
            logger.info("call %s from %s: %d tokens in %.2f s (%.1f tok/s), finish=%s", call.call_id, call.peer_id,
                        len(outcome.ids), elapsed, len(outcome.ids) / elapsed, outcome.finish)

    async def _reply(self, call: CallState, outcome: _Outcome) -> None:
        if outcome.status == "ok":
            content: dict[str, Any] = {"text": self.backend.decode(outcome.ids),
                                       "finish_reason": outcome.finish or "stop", "tokens": len(outcome.ids),
                                       "ttft_ms": outcome.ttft_ms}
            if self.pacing is not None:
                content = self.pacing.result_content(call.peer_id, call.call_id, content)
            frame = legion.build_result(ts_ms=int(time.time() * 1000), call_id=call.call_id, status="ok",
                                        result={"content": content}, error=None)
        else:
            frame = legion.build_result(ts_ms=int(time.time() * 1000), call_id=call.call_id, status="error",
                                        result=None, error=outcome.error)
        try:
            await self._tools.send(frame, target=call.peer_id)
        except MeshError as exc:  # the asker left meanwhile
            logger.debug("could not send the result of %s to %s: %s", call.call_id, call.peer_id, exc)

    async def _tell_cancelled(self, sender: Any, peer_id: str, call_id: str, reply_tool: bool) -> None:
        """Best effort, bounded: a terminal frame (finish_reason "cancel") and an error result."""
        try:
            async with asyncio.timeout(FINAL_SEND_TIMEOUT_SECONDS):
                await sender.send([], "cancel")
                if reply_tool:
                    frame = legion.build_result(ts_ms=int(time.time() * 1000), call_id=call_id, status="error",
                                                result=None, error="cancelled: the node is shutting down")
                    await self._tools.send(frame, target=peer_id)
        except (MeshError, TimeoutError) as exc:  # the asker is gone or slow: the leave tells it
            logger.debug("could not tell %s that call %s was cancelled: %s", peer_id, call_id, exc)


def _busy(text: str) -> str:
    return f"busy: {text}" if "queue" in text.lower() and not text.startswith("busy") else text
