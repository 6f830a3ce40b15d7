"""One call's token stream on ``cf``: the engine's chunks, coalesced, as Codec frames to the asker.

Bare Codec frames by default; DATA/END envelopes (optionally zstd per stream) when the asker sent
a HELLO for the call (legion-mesh §5.5). :func:`pump` moves engine chunks into a queue and
:func:`coalesce` batches them: the first token at once (time to first token), later ids until
``max_ids`` or ``max_delay``, plus whatever piled up while the previous send waited for the channel.

Pass-through: a chunk that carries an upstream's exact frame (``TokenChunk.frame``, from a remote
Codec upstream) is, with ``verbatim=True``, never merged or re-encoded: its bytes go out as one
``cf`` message (bare), or as the body of one DATA envelope for a HELLO-negotiated asker. The
service asks for that only without a link policy; a pacer re-packs ids on its own byte budget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from meshnode.errors import MeshError
from meshnode.legion.outbox import Sender
from meshnode.wire.compression import StreamCompressor
from meshnode.wire.envelopes import DATA, Envelope, encode_envelope, end_envelope
from meshnode.wire.frames import CodecFrame, encode_frame

__all__ = ["Batch", "FrameSender", "coalesce", "pump"]

logger = logging.getLogger(__name__)


class FrameSender:
    """Sends one call's frames to one peer: bare Codec frames, or DATA/END envelopes."""

    def __init__(self, action: Sender, peer_id: str, *, stream_id: str | None, compression: str) -> None:
        self.action = action
        self.peer_id = peer_id
        self.stream_id = stream_id
        self.seq = 2
        self.frames_sent = 0
        self.tokens = 0
        self._compressor = StreamCompressor() if compression == "zstd" else None

    async def send(self, ids: list[int], finish_reason: str | None, frame: bytes | None = None) -> None:
        """Send one frame: ``frame`` verbatim when given (its ids and reason are ``ids`` and
        ``finish_reason``), else one encoded from ``ids``; an END envelope follows the last one."""
        done = finish_reason is not None
        if frame is None:
            frame = encode_frame(CodecFrame(ids=list(ids), done=done, finish_reason=finish_reason))
        self.tokens += len(ids)
        if self.stream_id is None:
            await self.action.send(frame, target=self.peer_id)
        else:
            body = self._compressor.compress(frame) if self._compressor else frame
            envelope = Envelope(kind=DATA, stream_id=self.stream_id, seq=self.seq, body=body)
            self.seq += 1
            await self.action.send(encode_envelope(envelope), target=self.peer_id)
            if done:
                await self.action.send(end_envelope(self.stream_id, self.seq, finish_reason, self.tokens),
                                       target=self.peer_id)
        self.frames_sent += 1


@dataclass(frozen=True)
class Chunk:
    ids: list[int]
    finish_reason: str | None


async def pump(stream: Any, queue: asyncio.Queue[Any]) -> None:
    """Move engine chunks into a queue so the sender can wait on it with timeouts. An engine
    failure becomes a terminal "error" chunk, so the sender always sees an end."""
    try:
        async for chunk in stream:
            await queue.put(chunk)
            if chunk.finish_reason is not None:
                return
        await queue.put(Chunk(ids=[], finish_reason="stop"))
    except MeshError as exc:
        logger.warning("generation failed: %s", exc)
        await queue.put(Chunk(ids=[], finish_reason="error"))
    except Exception:  # an engine bug: end this stream with an error frame instead of hanging it
        logger.exception("generation failed")
        await queue.put(Chunk(ids=[], finish_reason="error"))


@dataclass(frozen=True)
class Batch:
    """What the sender sends next: ids and the end (if this is it), with an upstream frame to
    forward verbatim instead of encoding one."""

    ids: list[int]
    finish_reason: str | None
    frame: bytes | None = None


async def coalesce(queue: asyncio.Queue[Any], max_ids: int, max_delay: float, *,
                   verbatim: bool = False) -> AsyncIterator[Batch]:
    """Yield batches: the first token at once (time to first token), later ids gathered until
    `max_ids` or `max_delay` seconds, and whatever piled up while the previous send waited for the
    channel (backpressure coalesces for free). With `verbatim`, a chunk carrying an upstream frame
    is yielded alone and unchanged (ids gathered before it go first)."""
    first = True
    held: Any = None  # a frame-carrying chunk read while gathering: it goes out alone, next

    def whole(chunk: Any) -> bytes | None:
        return getattr(chunk, "frame", None) if verbatim else None

    while True:
        chunk = held if held is not None else await queue.get()
        held = None
        frame = whole(chunk)
        if frame is not None:
            first = False if chunk.ids else first
            yield Batch(list(chunk.ids), chunk.finish_reason, frame)
            if chunk.finish_reason is not None:
                return
            continue
        ids, reason = list(chunk.ids), chunk.finish_reason
        if not first and reason is None:
            deadline = asyncio.get_running_loop().time() + max_delay
            while len(ids) < max_ids and reason is None and held is None:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        chunk = await queue.get()
                except TimeoutError:
                    break
                if whole(chunk) is not None:
                    held = chunk
                    break
                ids.extend(chunk.ids)
                reason = chunk.finish_reason
        while reason is None and held is None and not queue.empty():
            chunk = queue.get_nowait()
            if whole(chunk) is not None:
                held = chunk
                break
            ids.extend(chunk.ids)
            reason = chunk.finish_reason
        if ids or reason is not None:
            first = False if ids else first
            yield Batch(ids, reason)
        if reason is not None:
            return
