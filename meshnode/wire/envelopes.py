"""The mesh envelope ``{k, s, n, b}`` (legion-mesh §5.5).

HELLO=0, READY=1, DATA=2 (``b`` is msgpack *bin*: a frame slice, possibly zstd-compressed), END=3.
Receivers try the envelope first, then a bare frame (:func:`decode_cf_payload`); DATA slices are
at most 60 KiB (:func:`chunk_frame`) and :class:`EnvelopeReassembler` joins them per stream.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import msgpack

from meshnode.errors import FrameError
from meshnode.wire.frames import (
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_MAX_IDS_PER_FRAME,
    CodecFrame,
    StreamDecoder,
    frame_from_obj,
    unpack_limited,
)

logger = logging.getLogger(__name__)

MAX_SEQ: Final = 2**53 - 1
"""Largest envelope sequence number: ``n`` is a JS number, exact only up to 2**53 - 1."""

DATA_SLICE_BYTES: Final = 60 * 1024
"""Largest frame slice carried by one DATA envelope (legion-mesh §5.5: "≤ 60 KiB")."""

DEFAULT_MAX_STREAMS: Final = 64
"""Default number of concurrent envelope streams one :class:`EnvelopeReassembler` tracks."""

__all__ = [
    "DATA",
    "DATA_SLICE_BYTES",
    "DEFAULT_MAX_STREAMS",
    "END",
    "HELLO",
    "READY",
    "Envelope",
    "EnvelopeKind",
    "EnvelopeReassembler",
    "chunk_frame",
    "decode_cf_payload",
    "decode_envelope",
    "encode_envelope",
    "end_envelope",
]

# --------------------------------------------------------------------------------------------------
# Envelope (legion-mesh §5.5)
# --------------------------------------------------------------------------------------------------


class EnvelopeKind(IntEnum):
    """``k`` of the mesh envelope (legion-mesh §5.5)."""

    HELLO = 0
    READY = 1
    DATA = 2
    END = 3


HELLO: Final = EnvelopeKind.HELLO
READY: Final = EnvelopeKind.READY
DATA: Final = EnvelopeKind.DATA
END: Final = EnvelopeKind.END


@dataclass(frozen=True, slots=True)
class Envelope:
    """One ``{k, s, n, b}`` envelope (legion-mesh §5.5); wire names map to snake_case here.

    Attributes:
        kind: ``k``: HELLO, READY, DATA or END. Plain ints 0–3 are accepted when building an
            envelope; decoded envelopes always carry an :class:`EnvelopeKind`.
        stream_id: ``s``: the stream id (browsers use ``crypto.randomUUID``; meshnode the callId).
        seq: ``n``: HELLO 0, READY 1, DATA 2, 3, …, END the next number.
        body: ``b``: the raw frame bytes (or a ≤ 60 KiB slice of them) for DATA, a map for the
            other kinds.
    """

    kind: EnvelopeKind | int
    stream_id: str
    seq: int
    body: bytes | dict[str, Any]


def encode_envelope(envelope: Envelope) -> bytes:
    """Encode an envelope with keys ``k, s, n, b`` in that order (legion-mesh §5.5).

    DATA bodies are packed as msgpack **bin** (``c4``/``c5``/``c6``), as the browser receiver
    requires; other kinds carry a map.

    Args:
        envelope: The envelope to encode.

    Returns:
        The msgpack bytes (34 bytes for a DATA envelope of example 1 with ``s="7f1c"``, ``n=2``).

    Raises:
        FrameError: Wrong body type for the kind, a bad stream id or sequence number, or a body
            that msgpack cannot pack.
    """
    try:
        kind = EnvelopeKind(envelope.kind)
    except ValueError as exc:
        raise FrameError(f"unknown envelope kind {envelope.kind!r}") from exc
    if not isinstance(envelope.stream_id, str):
        raise FrameError("stream id must be a string")
    if type(envelope.seq) is not int or not 0 <= envelope.seq <= MAX_SEQ:
        raise FrameError(f"sequence number {envelope.seq!r} is not an integer in 0..2**53-1")
    body = envelope.body
    if kind is EnvelopeKind.DATA:
        if not isinstance(body, bytes | bytearray | memoryview):
            raise FrameError("DATA envelope body must be bytes")
        body = bytes(body)
    elif not isinstance(body, Mapping):
        raise FrameError(f"{kind.name} envelope body must be a map")
    else:
        body = dict(body)
    obj = {"k": int(kind), "s": envelope.stream_id, "n": envelope.seq, "b": body}
    try:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot pack envelope: {exc}") from exc


def _looks_like_envelope(obj: Any) -> bool:
    """The browser receiver's envelope test (legion-mesh §5.5): k ∈ 0..3, s a string, n a number."""
    if not isinstance(obj, dict):
        return False
    k, s, n = obj.get("k"), obj.get("s"), obj.get("n")
    return (
        type(k) is int
        and k in (0, 1, 2, 3)
        and isinstance(s, str)
        and type(n) in (int, float)
    )


def _envelope_from_obj(obj: Any) -> Envelope:
    if not _looks_like_envelope(obj):
        raise FrameError("not an envelope: needs k in 0..3, string s and numeric n")
    seq = obj["n"]
    if isinstance(seq, float):
        # A JS sender encodes integral numbers as msgpack ints; a float here is a fraction or
        # out of range, which no sequence number can be.
        if not seq.is_integer():
            raise FrameError(f"sequence number {seq!r} is not an integer")
        seq = int(seq)
    if not 0 <= seq <= MAX_SEQ:
        raise FrameError(f"sequence number {seq} out of range")
    kind = EnvelopeKind(obj["k"])
    body: bytes | dict[str, Any]
    if kind is EnvelopeKind.DATA:
        raw = obj.get("b")
        if not isinstance(raw, bytes):
            raise FrameError("DATA envelope body must be msgpack bin")
        body = raw
    else:
        # Liberal: a missing control body is treated as empty.
        raw = obj.get("b", {})
        if not isinstance(raw, dict) or not all(isinstance(key, str) for key in raw):
            raise FrameError(f"{kind.name} envelope body must be a map with string keys")
        body = raw
    return Envelope(kind=kind, stream_id=obj["s"], seq=seq, body=body)


def decode_envelope(
    data: bytes,
    *,
    max_buffer_size: int = DEFAULT_MAX_BUFFER_BYTES,
) -> Envelope:
    """Decode exactly one envelope.

    Args:
        data: The msgpack bytes of one envelope, with nothing after it.
        max_buffer_size: Largest accepted input, in bytes.

    Returns:
        The envelope; DATA bodies are left as raw bytes (see :class:`EnvelopeReassembler`).

    Raises:
        FrameError: Malformed msgpack, trailing bytes, or not a valid envelope.
    """
    obj = unpack_limited(
        bytes(data), max_buffer_size=max_buffer_size, max_ids_per_frame=DEFAULT_MAX_IDS_PER_FRAME
    )
    return _envelope_from_obj(obj)


def decode_cf_payload(
    data: bytes,
    *,
    max_buffer_size: int = DEFAULT_MAX_BUFFER_BYTES,
    max_ids_per_frame: int = DEFAULT_MAX_IDS_PER_FRAME,
) -> Envelope | CodecFrame:
    """Decode one ``cf`` action payload in the browser receiver's order (legion-mesh §5.5).

    The payload is tried as an envelope first (``k`` ∈ {0,1,2,3}, ``s`` a string, ``n`` a number);
    otherwise it must be a bare frame.

    Args:
        data: One binary ``cf`` payload.
        max_buffer_size: Largest accepted input, in bytes.
        max_ids_per_frame: Largest accepted ``len(ids)`` for a bare frame.

    Returns:
        An :class:`Envelope` or a :class:`CodecFrame`.

    Raises:
        FrameError: Malformed msgpack, or neither a valid envelope nor a valid frame.
    """
    obj = unpack_limited(
        bytes(data), max_buffer_size=max_buffer_size, max_ids_per_frame=max_ids_per_frame
    )
    if _looks_like_envelope(obj):
        return _envelope_from_obj(obj)
    return frame_from_obj(obj, max_ids_per_frame)


def chunk_frame(
    frame_bytes: bytes,
    stream_id: str,
    first_seq: int,
    *,
    max_slice_bytes: int = DATA_SLICE_BYTES,
) -> list[Envelope]:
    """Split encoded frame bytes into DATA envelopes of at most ``max_slice_bytes`` each.

    legion-mesh §5.5 / §6 item 10: a frame over 60 KiB travels as several DATA envelopes with
    consecutive sequence numbers (the reference sender drops all but the first slice; this one
    does not). A frame that fits yields exactly one envelope.

    Args:
        frame_bytes: One or more encoded frames (their concatenation is also fine).
        stream_id: ``s`` for every envelope.
        first_seq: ``n`` of the first envelope; the rest follow contiguously.
        max_slice_bytes: Largest body per envelope.

    Returns:
        DATA envelopes in order.

    Raises:
        FrameError: Empty input, a bad stream id or sequence range, or a non-positive slice size.
    """
    if not frame_bytes:
        raise FrameError("nothing to chunk")
    if max_slice_bytes < 1:
        raise FrameError("slice size must be positive")
    if not isinstance(stream_id, str):
        raise FrameError("stream id must be a string")
    count = -(-len(frame_bytes) // max_slice_bytes)
    if type(first_seq) is not int or first_seq < 0 or first_seq + count - 1 > MAX_SEQ:
        raise FrameError(f"sequence numbers from {first_seq!r} do not fit 0..2**53-1")
    data = bytes(frame_bytes)
    return [
        Envelope(
            kind=EnvelopeKind.DATA,
            stream_id=stream_id,
            seq=first_seq + index,
            body=data[index * max_slice_bytes : (index + 1) * max_slice_bytes],
        )
        for index in range(count)
    ]


@dataclass(slots=True)
class _StreamState:
    next_seq: int
    decoder: StreamDecoder
    finished: bool = False  # a done frame was seen; only END may follow
    failed: bool = False


class EnvelopeReassembler:
    """Rebuilds frames from DATA envelopes, per stream id (sans-IO; one instance per remote peer).

    The DATA bodies of one stream form a byte stream of concatenated frames (legion-mesh §5.5,
    "a ≤ 60 KiB slice of one"), decoded with a :class:`StreamDecoder`, so a frame is returned as
    soon as its last slice arrives — no END is needed (unlike the reference, §6 item 10).

    Sequence rules: the first envelope seen for a stream fixes its starting number; every later
    envelope of that stream (DATA, END, or a repeated HELLO/READY) must carry the next number.
    A gap, duplicate or reordering raises :class:`FrameError` and marks the stream failed: all
    later envelopes for it raise too, until END or :meth:`discard` forgets it.

    State is removed on END. After a ``done`` frame only END may follow; such finished (and
    failed) streams are evicted oldest-first when a new stream needs room. When
    ``max_streams`` live streams exist, a new one is refused with :class:`FrameError`.

    Args:
        max_streams: Largest number of streams tracked at once.
        max_buffer_size: Per stream, the largest incomplete frame in bytes.
        max_ids_per_frame: Per frame, the largest ``len(ids)``.
    """

    def __init__(
        self,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_buffer_size: int = DEFAULT_MAX_BUFFER_BYTES,
        max_ids_per_frame: int = DEFAULT_MAX_IDS_PER_FRAME,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be positive")
        self._max_streams = max_streams
        self._max_buffer_size = max_buffer_size
        self._max_ids_per_frame = max_ids_per_frame
        self._streams: dict[str, _StreamState] = {}

    @property
    def active_streams(self) -> int:
        """Number of streams currently tracked (including finished ones awaiting END)."""
        return len(self._streams)

    def discard(self, stream_id: str) -> None:
        """Forget a stream (e.g. when its peer left); unknown ids are ignored."""
        self._streams.pop(stream_id, None)

    def feed(self, envelope: Envelope) -> list[CodecFrame]:
        """Account for one envelope and return the frames its DATA completes.

        Args:
            envelope: Any envelope received from the peer this reassembler belongs to.

        Returns:
            Completed frames (only DATA envelopes produce any).

        Raises:
            FrameError: Out-of-order or duplicate sequence number, data after ``done``, END in the
                middle of a frame, malformed frame bytes, a stream that failed earlier, or too
                many concurrent streams.
        """
        try:
            # Callers may build envelopes with plain ints for `kind`; normalise once.
            kind = EnvelopeKind(envelope.kind)
        except ValueError as exc:
            raise FrameError(f"unknown envelope kind {envelope.kind!r}") from exc
        state = self._streams.get(envelope.stream_id)
        if state is None:
            if kind is EnvelopeKind.END:
                # END of a stream already closed by its done frame, or never opened: nothing to do.
                return []
            state = self._open(envelope.stream_id, envelope.seq)
        if state.failed:
            if kind is EnvelopeKind.END:
                self._streams.pop(envelope.stream_id, None)
            raise FrameError(f"stream {envelope.stream_id!r} failed earlier")
        if envelope.seq != state.next_seq:
            state.failed = True
            raise FrameError(
                f"stream {envelope.stream_id!r}: got n={envelope.seq}, expected {state.next_seq}"
            )
        state.next_seq += 1
        if kind is EnvelopeKind.END:
            del self._streams[envelope.stream_id]
            if state.decoder.buffered_bytes:
                raise FrameError(f"stream {envelope.stream_id!r} ended in the middle of a frame")
            return []
        if kind is not EnvelopeKind.DATA:
            return []  # HELLO / READY carry no frame bytes
        if state.finished:
            state.failed = True
            raise FrameError(f"stream {envelope.stream_id!r}: DATA after the done frame")
        if not isinstance(envelope.body, bytes | bytearray | memoryview):
            state.failed = True
            raise FrameError("DATA envelope body must be bytes")
        try:
            frames = state.decoder.feed(envelope.body)
        except FrameError:
            state.failed = True
            raise
        for index, frame in enumerate(frames):
            if frame.done:
                state.finished = True
                if index != len(frames) - 1 or state.decoder.buffered_bytes:
                    state.failed = True
                    raise FrameError(f"stream {envelope.stream_id!r}: bytes after the done frame")
        return frames

    def _open(self, stream_id: str, seq: int) -> _StreamState:
        if len(self._streams) >= self._max_streams:
            for key, old in self._streams.items():
                if old.finished or old.failed:
                    del self._streams[key]
                    break
            else:
                raise FrameError(f"more than {self._max_streams} concurrent streams")
        state = _StreamState(
            next_seq=seq,
            decoder=StreamDecoder(
                max_buffer_size=self._max_buffer_size,
                max_ids_per_frame=self._max_ids_per_frame,
            ),
        )
        self._streams[stream_id] = state
        return state


def end_envelope(stream_id: str, seq: int, finish_reason: str | None, total_tokens: int) -> bytes:
    """The END envelope of a negotiated stream (legion-mesh §5.5); ``total_tokens`` counts every id
    the stream carried."""
    return encode_envelope(Envelope(kind=END, stream_id=stream_id, seq=seq, body={
        "codec_version": 1, "finish_reason": finish_reason, "total_tokens": total_tokens}))
