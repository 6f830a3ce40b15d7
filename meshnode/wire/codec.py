"""Codec msgpack frames, streaming decode, the ``{k,s,n,b}`` envelope, zstd streams, id batching.

Everything here is pure: bytes and ids in, bytes and frames out. No asyncio, no sockets, no torch
(house style §3.2, §4). Every failure is a :class:`~meshnode.errors.FrameError`.

Wire rules implemented here (spec ``legion-mesh.md``):

* §2.1/§2.2 — a frame is one msgpack map ``{ids, done, finish_reason?}`` with keys in that order,
  smallest integer encodings, ids in uint32; frames are concatenated with no delimiter.
* §2.2 — receivers accept the JS ``finish_reason: nil`` variant.
* §5.5 — the mesh envelope ``{k, s, n, b}``: HELLO=0, READY=1, DATA=2 (``b`` is msgpack *bin*),
  END=3; receivers try the envelope first, then a bare frame; DATA slices are at most 60 KiB.
* §2.7 — compression is one zstd context per stream, flushed per message, optionally with a
  dictionary named ``sha256:<hex>`` of its raw bytes.
* §3.3 — batching several ids per frame is the bandwidth lever on the mesh (:class:`TokenBatcher`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import msgpack
import zstandard

from meshnode.errors import FrameError

logger = logging.getLogger(__name__)

__all__ = [
    "DATA",
    "DATA_SLICE_BYTES",
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "DEFAULT_MAX_IDS_PER_FRAME",
    "DEFAULT_MAX_STREAMS",
    "END",
    "HELLO",
    "MAX_UINT32",
    "READY",
    "CodecFrame",
    "Envelope",
    "EnvelopeKind",
    "EnvelopeReassembler",
    "StreamCompressor",
    "StreamDecoder",
    "StreamDecompressor",
    "TokenBatcher",
    "chunk_frame",
    "decode_cf_payload",
    "decode_envelope",
    "decode_frame",
    "dict_id",
    "encode_envelope",
    "encode_frame",
]

# --------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------

MAX_UINT32: Final = 0xFFFF_FFFF
"""Largest token id a frame may carry (legion-mesh §2.1: ids are uint32)."""

MAX_SEQ: Final = 2**53 - 1
"""Largest envelope sequence number: ``n`` is a JS number, exact only up to 2**53 - 1."""

DATA_SLICE_BYTES: Final = 60 * 1024
"""Largest frame slice carried by one DATA envelope (legion-mesh §5.5: "≤ 60 KiB")."""

DEFAULT_MAX_BUFFER_BYTES: Final = 1024 * 1024
"""Default bound on the bytes of one frame (or envelope) held while it is incomplete."""

DEFAULT_MAX_IDS_PER_FRAME: Final = 16_384
"""Default bound on ``len(ids)``; also the msgpack array-length limit while decoding."""

DEFAULT_MAX_STR_BYTES: Final = 256 * 1024
"""Default bound on one msgpack string (``finish_reason``, tool-call arguments, stream ids)."""

DEFAULT_MAX_MAP_LEN: Final = 256
"""Default bound on the entries of one msgpack map (frames, envelopes, HELLO/READY/END bodies)."""

DEFAULT_MAX_STREAMS: Final = 64
"""Default number of concurrent envelope streams one :class:`EnvelopeReassembler` tracks."""

DEFAULT_MAX_DECOMPRESSED_BYTES: Final = 1024 * 1024
"""Default bound on what one compressed message may expand to (decompression-bomb guard)."""

_DECOMPRESS_WRITE_SIZE_BYTES: Final = 64 * 1024

_FRAME_KEYS: Final = frozenset({"ids", "done", "finish_reason"})


def _unpack_limits(max_buffer_size: int, max_ids_per_frame: int) -> dict[str, int]:
    """Keyword arguments bounding every msgpack container and string (house style §4).

    Memory note: msgpack pre-allocates a declared array before its elements arrive, so a hostile
    stream can make the decoder hold ``depth × max_array_len`` list slots (depth ≤ the C unpacker's
    fixed stack of 128 levels) before it fails; ``max_ids_per_frame`` therefore also bounds that.
    """
    return {
        "max_buffer_size": max_buffer_size,
        "max_str_len": min(DEFAULT_MAX_STR_BYTES, max_buffer_size),
        "max_bin_len": max_buffer_size,
        "max_array_len": max_ids_per_frame,
        "max_map_len": DEFAULT_MAX_MAP_LEN,
        "max_ext_len": 0,
    }


def _unpackb(data: bytes, *, max_buffer_size: int, max_ids_per_frame: int) -> Any:
    """Unpack exactly one msgpack value with limits; any failure becomes :class:`FrameError`."""
    if len(data) > max_buffer_size:
        raise FrameError(f"message of {len(data)} bytes exceeds the {max_buffer_size}-byte limit")
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        **_unpack_limits(max_buffer_size, max_ids_per_frame),
    )
    try:
        unpacker.feed(data)
        obj = unpacker.unpack()
    except msgpack.OutOfData as exc:
        raise FrameError("truncated msgpack value") from exc
    except Exception as exc:  # msgpack raises ValueError/TypeError/StackError/... on bad input
        raise FrameError(f"malformed msgpack: {exc}") from exc
    if unpacker.tell() != len(data):
        raise FrameError(f"{len(data) - unpacker.tell()} trailing bytes after one msgpack value")
    return obj


# --------------------------------------------------------------------------------------------------
# Codec frames (legion-mesh §2.1, §2.2)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodecFrame:
    """One Codec token-stream frame (legion-mesh §2.1).

    Attributes:
        ids: Raw model token ids produced since the previous frame (uint32 each; may be empty).
        done: ``True`` only on the last frame of a stream.
        finish_reason: Why the stream ended (any string; normally only when ``done``). ``None``
            is omitted on the wire; a decoded JS ``nil`` also becomes ``None``.
        extras: Other keys of the frame map, in wire order (e.g. ``tool_calls`` from the sglang
            fork, ``safety`` from mesh senders). Tolerated on decode without validation and
            re-emitted after the fixed keys on encode.
    """

    ids: list[int]
    done: bool
    finish_reason: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _check_ids(ids: object) -> list[int]:
    if not isinstance(ids, list | tuple):
        raise FrameError(f"ids must be an array, got {type(ids).__name__}")
    for value in ids:
        # bool is an int subclass and would be packed as c2/c3: reject it explicitly.
        if type(value) is not int:
            raise FrameError(f"id {value!r} is not an integer")
        if not 0 <= value <= MAX_UINT32:
            raise FrameError(f"id {value} is outside uint32")
    return list(ids)


def encode_frame(frame: CodecFrame) -> bytes:
    """Encode one frame exactly as the reference encoders do (legion-mesh §2.2).

    Keys are emitted in the order ``ids``, ``done``, ``finish_reason`` (only when not ``None``),
    then any ``extras`` in their own order; integers take their smallest msgpack form.

    Args:
        frame: The frame to encode.

    Returns:
        The msgpack bytes, e.g. 16 bytes for ``CodecFrame([9707, 0], False)``.

    Raises:
        FrameError: An id is not an integer in uint32, ``done`` is not a bool, ``finish_reason``
            is not a string, or an extra key clashes with a fixed key or cannot be packed.
    """
    ids = _check_ids(frame.ids)
    if type(frame.done) is not bool:
        raise FrameError(f"done must be a bool, got {type(frame.done).__name__}")
    # Built explicitly in spec order so the bytes are deterministic (house style §4).
    obj: dict[str, Any] = {"ids": ids, "done": frame.done}
    if frame.finish_reason is not None:
        if not isinstance(frame.finish_reason, str):
            raise FrameError("finish_reason must be a string or None")
        obj["finish_reason"] = frame.finish_reason
    for key, value in frame.extras.items():
        if not isinstance(key, str) or key in _FRAME_KEYS:
            raise FrameError(f"invalid extra frame key {key!r}")
        obj[key] = value
    try:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot pack frame: {exc}") from exc


def _frame_from_obj(obj: Any, max_ids_per_frame: int) -> CodecFrame:
    """Validate a decoded msgpack value as a frame (legion-mesh §5.5 receiver checks)."""
    if not isinstance(obj, dict):
        raise FrameError(f"frame must be a map, got {type(obj).__name__}")
    if "ids" not in obj:
        raise FrameError("frame has no 'ids'")
    if "done" not in obj:
        raise FrameError("frame has no 'done'")
    ids = _check_ids(obj["ids"])
    if len(ids) > max_ids_per_frame:
        raise FrameError(f"frame carries {len(ids)} ids, limit {max_ids_per_frame}")
    done = obj["done"]
    if type(done) is not bool:
        raise FrameError(f"done must be a bool, got {type(done).__name__}")
    # legion-mesh §2.2 JS quirk: finish_reason may be nil; treat it like an absent key.
    reason = obj.get("finish_reason")
    if reason is not None and not isinstance(reason, str):
        raise FrameError(f"finish_reason must be a string or nil, got {type(reason).__name__}")
    extras: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            # strict_map_key still admits bin keys; the spec says "string keys".
            raise FrameError(f"frame key {key!r} is not a string")
        if key not in _FRAME_KEYS:
            extras[key] = value
    return CodecFrame(ids=ids, done=done, finish_reason=reason, extras=extras)


def decode_frame(
    data: bytes,
    *,
    max_buffer_size: int = DEFAULT_MAX_BUFFER_BYTES,
    max_ids_per_frame: int = DEFAULT_MAX_IDS_PER_FRAME,
) -> CodecFrame:
    """Decode exactly one bare Codec frame.

    Accepts ``finish_reason: nil`` (legion-mesh §2.2, example 3) and tolerates unknown keys, which
    land in :attr:`CodecFrame.extras`.

    Args:
        data: The msgpack bytes of one frame, with nothing after it.
        max_buffer_size: Largest accepted input, in bytes.
        max_ids_per_frame: Largest accepted ``len(ids)``.

    Returns:
        The decoded frame.

    Raises:
        FrameError: Malformed or truncated msgpack, trailing bytes, a limit exceeded, or a value
            that is not a frame (missing ``ids``/``done``, wrong types, ids outside uint32).
    """
    obj = _unpackb(
        bytes(data), max_buffer_size=max_buffer_size, max_ids_per_frame=max_ids_per_frame
    )
    return _frame_from_obj(obj, max_ids_per_frame)


class StreamDecoder:
    """Turns an arbitrarily split byte stream of concatenated frames into frames (sans-IO).

    legion-mesh §2.2: frames are concatenated with no delimiter; §6 item 3: the decoder must give
    the same frames however the stream is split into reads. This wraps ``msgpack.Unpacker`` and
    feeds it at most as many bytes as the current incomplete frame may still grow by, so one read
    holding many frames works while a single oversized frame fails fast.

    Error handling: after any :class:`FrameError` the decoder is **poisoned**: the position of the
    next frame boundary is unknown, so every later :meth:`feed` raises :class:`FrameError` again.
    Frames completed earlier in the failing call are lost with it. Create a new decoder (i.e.
    start a new stream) to recover.

    Args:
        max_buffer_size: Largest number of bytes one frame may occupy; exceeding it while the
            frame is incomplete raises :class:`FrameError` instead of buffering more.
        max_ids_per_frame: Largest ``len(ids)`` (and largest msgpack array) accepted.
    """

    def __init__(
        self,
        *,
        max_buffer_size: int = DEFAULT_MAX_BUFFER_BYTES,
        max_ids_per_frame: int = DEFAULT_MAX_IDS_PER_FRAME,
    ) -> None:
        if max_buffer_size < 1 or max_ids_per_frame < 0:
            raise ValueError("limits must be positive")
        self._max_buffer_size = max_buffer_size
        self._max_ids_per_frame = max_ids_per_frame
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            **_unpack_limits(max_buffer_size, max_ids_per_frame),
        )
        self._fed_bytes = 0  # total bytes handed to the unpacker
        self._frame_start = 0  # stream offset where the current (incomplete) frame begins
        self._error: FrameError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the current incomplete frame received so far (0 on a frame boundary)."""
        return self._fed_bytes - self._frame_start

    @property
    def poisoned(self) -> bool:
        """Whether an earlier error made this decoder unusable."""
        return self._error is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[CodecFrame]:
        """Add bytes and return every frame they complete, in order.

        Args:
            data: The next bytes of the stream; any length, including zero.

        Returns:
            Frames completed by these bytes (possibly none).

        Raises:
            FrameError: Malformed data, a frame over ``max_buffer_size`` or ``max_ids_per_frame``,
                a value that is not a frame, or an earlier error (the decoder is poisoned).
        """
        if self._error is not None:
            raise FrameError(f"stream decoder is poisoned by an earlier error: {self._error}")
        try:
            return self._feed(memoryview(data).cast("B"))
        except FrameError as exc:
            self._error = exc
            raise
        except Exception as exc:  # msgpack signals malformed input with assorted exception types
            self._error = FrameError(f"malformed msgpack stream: {exc}")
            raise self._error from exc

    def _feed(self, view: memoryview) -> list[CodecFrame]:
        frames: list[CodecFrame] = []
        pos = 0
        while True:
            # Drain every complete value first, so what stays buffered is one partial frame.
            for obj in self._unpacker:
                frames.append(_frame_from_obj(obj, self._max_ids_per_frame))
                self._frame_start = self._unpacker.tell()
            if pos >= len(view):
                return frames
            room = self._max_buffer_size - self.buffered_bytes
            if room <= 0:
                raise FrameError(
                    f"incomplete frame exceeds the {self._max_buffer_size}-byte buffer limit"
                )
            # Feeding at most `room` bytes keeps the unpacker's own buffer under its
            # max_buffer_size, so BufferFull never fires for a stream of small frames.
            step = min(len(view) - pos, room)
            self._unpacker.feed(view[pos : pos + step])
            pos += step
            self._fed_bytes += step


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
    obj = _unpackb(
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
    obj = _unpackb(
        bytes(data), max_buffer_size=max_buffer_size, max_ids_per_frame=max_ids_per_frame
    )
    if _looks_like_envelope(obj):
        return _envelope_from_obj(obj)
    return _frame_from_obj(obj, max_ids_per_frame)


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


# --------------------------------------------------------------------------------------------------
# Streaming zstd, one context per stream (legion-mesh §2.7)
# --------------------------------------------------------------------------------------------------


def dict_id(dict_data: bytes) -> str:
    """Name a zstd dictionary as ``sha256:<64 lower-case hex>`` of its raw bytes (legion-mesh §2.7).

    Args:
        dict_data: The raw dictionary bytes, exactly as distributed.

    Returns:
        The identifier used in ``Codec-Zstd-Dict`` and ``zstd_dict_sha256``.
    """
    return "sha256:" + hashlib.sha256(bytes(dict_data)).hexdigest()


def _zstd_dict(dict_data: bytes | None) -> zstandard.ZstdCompressionDict | None:
    if dict_data is None:
        return None
    try:
        return zstandard.ZstdCompressionDict(bytes(dict_data))
    except zstandard.ZstdError as exc:
        raise FrameError(f"unusable zstd dictionary: {exc}") from exc


class StreamCompressor:
    """One zstd stream for one Codec stream, flushed after every message (legion-mesh §2.7).

    Each :meth:`compress` ends with a block flush, so the receiver can decode that message as soon
    as it arrives (the sglang fork's 16 KiB chunker does not, §2.7). Do not use this on the mesh
    for single frames: per-token flushing costs more than it saves (legion-mesh §3.2, style §4).

    Args:
        level: zstd compression level.
        dict_data: Optional raw dictionary bytes; the receiver must use the same bytes
            (identify them with :func:`dict_id`).
    """

    def __init__(self, level: int = 3, dict_data: bytes | None = None) -> None:
        dictionary = _zstd_dict(dict_data)
        self.dict_id: str | None = None if dict_data is None else dict_id(dict_data)
        """``sha256:<hex>`` of the dictionary, or ``None``."""
        try:
            self._compressor = zstandard.ZstdCompressor(level=level, dict_data=dictionary)
            self._stream = self._compressor.compressobj()
        except zstandard.ZstdError as exc:
            raise FrameError(f"cannot create zstd compressor: {exc}") from exc
        self._finished = False

    def compress(self, data: bytes) -> bytes:
        """Compress one message and flush it so it is decodable on arrival.

        Args:
            data: The message bytes (e.g. one or more encoded frames).

        Returns:
            The compressed bytes for this message (the first call also carries the zstd header).

        Raises:
            FrameError: The stream was already finished, or zstd failed.
        """
        if self._finished:
            raise FrameError("compressor already finished")
        try:
            return self._stream.compress(bytes(data)) + self._stream.flush(
                zstandard.COMPRESSOBJ_FLUSH_BLOCK
            )
        except zstandard.ZstdError as exc:
            raise FrameError(f"zstd compression failed: {exc}") from exc

    def finish(self) -> bytes:
        """End the zstd frame; returns the trailing bytes. Later calls return ``b""``."""
        if self._finished:
            return b""
        self._finished = True
        try:
            return self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        except zstandard.ZstdError as exc:
            raise FrameError(f"zstd compression failed: {exc}") from exc


class _BoundedSink:
    """A write target that refuses to hold more than ``limit`` bytes (decompression-bomb guard)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise FrameError(f"decompressed message exceeds {self.limit} bytes")
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: the bytes are handed back by the caller."""

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        self.size = 0
        return out


class StreamDecompressor:
    """Decompresses one zstd stream message by message, with an output bound (legion-mesh §2.7).

    Output is produced incrementally into a bounded sink, so a small input that would expand past
    ``max_output_bytes`` fails with :class:`FrameError` after at most one 64 KiB output block,
    instead of being inflated in memory first.

    Error handling: garbage, a dictionary mismatch or an oversized message raise
    :class:`FrameError` and **poison** the decompressor (zstd's state is then unknown); every later
    call raises again.

    Args:
        dict_data: Raw dictionary bytes, or ``None``.
        max_output_bytes: Largest output of one :meth:`decompress` call.
        expected_dict_id: If given, ``dict_data`` must hash to this ``sha256:<hex>`` (the client
            must use exactly the dictionary the server named, §2.7).
    """

    def __init__(
        self,
        dict_data: bytes | None = None,
        *,
        max_output_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
        expected_dict_id: str | None = None,
    ) -> None:
        if expected_dict_id is not None:
            actual = None if dict_data is None else dict_id(dict_data)
            if actual != expected_dict_id.lower():
                raise FrameError(f"zstd dictionary {actual} does not match {expected_dict_id}")
        if max_output_bytes < 1:
            raise ValueError("max_output_bytes must be positive")
        self._sink = _BoundedSink(max_output_bytes)
        try:
            decompressor = zstandard.ZstdDecompressor(dict_data=_zstd_dict(dict_data))
            self._writer = decompressor.stream_writer(
                self._sink,
                write_size=min(_DECOMPRESS_WRITE_SIZE_BYTES, max_output_bytes + 1),
                write_return_read=True,
                closefd=False,
            )
        except zstandard.ZstdError as exc:
            raise FrameError(f"cannot create zstd decompressor: {exc}") from exc
        self._error: FrameError | None = None

    @property
    def poisoned(self) -> bool:
        """Whether an earlier error made this decompressor unusable."""
        return self._error is not None

    def decompress(self, chunk: bytes) -> bytes:
        """Decompress the next compressed message.

        Args:
            chunk: Bytes produced by one :meth:`StreamCompressor.compress` call (any split of the
                stream also works; output then appears when a block completes).

        Returns:
            The decompressed bytes available so far.

        Raises:
            FrameError: Invalid zstd data, output over ``max_output_bytes``, or an earlier error.
        """
        if self._error is not None:
            raise FrameError(f"decompressor is poisoned by an earlier error: {self._error}")
        try:
            self._writer.write(bytes(chunk))
        except FrameError as exc:
            self._error = exc
            raise
        except zstandard.ZstdError as exc:
            self._error = FrameError(f"invalid zstd data: {exc}")
            raise self._error from exc
        return self._sink.take()


# --------------------------------------------------------------------------------------------------
# Id batching (legion-mesh §3.3: several ids per frame is the lever that matters on the mesh)
# --------------------------------------------------------------------------------------------------


class TokenBatcher:
    """Coalesces generated ids into batches by count or age (sans-IO; the caller passes the clock).

    ``push`` ids as they are generated with the current time; ``poll(now)`` returns a batch of up
    to ``max_ids`` ids once ``max_ids`` are pending or the oldest pending id has waited
    ``max_delay_seconds``; :attr:`deadline` tells the caller when to poll next. ``flush`` empties
    the batcher (for the terminal frame).

    Overflow policy: pending ids are bounded by ``max_pending_ids``; a ``push`` beyond it raises
    :class:`FrameError` ("fail"), since silently dropping token ids would corrupt the text.

    Args:
        max_ids: Largest batch; a batch is due as soon as this many ids are pending.
        max_delay_seconds: Longest time an id may wait for company.
        max_pending_ids: Bound on ids held between polls.
    """

    def __init__(
        self,
        max_ids: int = 16,
        max_delay_seconds: float = 0.05,
        *,
        max_pending_ids: int = 65_536,
    ) -> None:
        if max_ids < 1 or max_delay_seconds < 0 or max_pending_ids < max_ids:
            raise ValueError(
                "need max_ids >= 1, max_delay_seconds >= 0 and max_pending_ids >= max_ids"
            )
        self.max_ids = max_ids
        self.max_delay_seconds = max_delay_seconds
        self.max_pending_ids = max_pending_ids
        self._ids: list[int] = []
        self._stamps: list[float] = []  # push time of each pending id, same index

    @property
    def pending(self) -> int:
        """Number of ids waiting."""
        return len(self._ids)

    @property
    def deadline(self) -> float | None:
        """When :meth:`poll` returns a batch even without more ids; ``None`` when empty."""
        if not self._ids:
            return None
        if len(self._ids) >= self.max_ids:
            return self._stamps[0]
        return self._stamps[0] + self.max_delay_seconds

    def push(self, ids: Sequence[int], now: float) -> None:
        """Queue ids generated at time ``now``.

        Raises:
            FrameError: An id is outside uint32, or the pending bound would be exceeded.
        """
        checked = _check_ids(list(ids))
        if len(self._ids) + len(checked) > self.max_pending_ids:
            raise FrameError(f"more than {self.max_pending_ids} ids pending in the batcher")
        self._ids.extend(checked)
        self._stamps.extend([now] * len(checked))

    def poll(self, now: float) -> list[int] | None:
        """Return the next due batch (at most ``max_ids`` ids), or ``None`` if none is due."""
        if not self._ids:
            return None
        # Same expression as `deadline`, so "not due" always means "deadline > now" (floats).
        if len(self._ids) < self.max_ids and now < self._stamps[0] + self.max_delay_seconds:
            return None
        batch = self._ids[: self.max_ids]
        del self._ids[: self.max_ids]
        del self._stamps[: self.max_ids]
        return batch

    def flush(self) -> list[int]:
        """Return every pending id (possibly none) and empty the batcher."""
        batch = self._ids
        self._ids = []
        self._stamps = []
        return batch
