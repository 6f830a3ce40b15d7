"""Codec msgpack frames and their streaming decoder (legion-mesh §2.1, §2.2).

Pure: bytes and ids in, bytes and frames out; every failure is a :class:`~meshnode.errors.FrameError`.
A frame is one msgpack map ``{ids, done, finish_reason?}`` with keys in that order, smallest
integer encodings and ids in uint32; frames are concatenated with no delimiter, and receivers accept
the JS ``finish_reason: nil`` variant. On the mesh, several ids per frame is the bandwidth lever
(§3.3): :mod:`meshnode.link` decides how many.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from meshnode.errors import FrameError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "DEFAULT_MAX_IDS_PER_FRAME",
    "MAX_UINT32",
    "CodecFrame",
    "StreamDecoder",
    "decode_frame",
    "encode_frame",
]

# --------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------

MAX_UINT32: Final = 0xFFFF_FFFF
"""Largest token id a frame may carry (legion-mesh §2.1: ids are uint32)."""

DEFAULT_MAX_BUFFER_BYTES: Final = 1024 * 1024
"""Default bound on the bytes of one frame (or envelope) held while it is incomplete."""

DEFAULT_MAX_IDS_PER_FRAME: Final = 16_384
"""Default bound on ``len(ids)``; also the msgpack array-length limit while decoding."""

DEFAULT_MAX_STR_BYTES: Final = 256 * 1024
"""Default bound on one msgpack string (``finish_reason``, tool-call arguments, stream ids)."""

DEFAULT_MAX_MAP_LEN: Final = 256
"""Default bound on the entries of one msgpack map (frames, envelopes, HELLO/READY/END bodies)."""

DEFAULT_MAX_DECOMPRESSED_BYTES: Final = 1024 * 1024
"""Default bound on what one compressed message may expand to (decompression-bomb guard)."""

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


def unpack_limited(data: bytes, *, max_buffer_size: int, max_ids_per_frame: int) -> Any:
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


def frame_from_obj(obj: Any, max_ids_per_frame: int) -> CodecFrame:
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
    obj = unpack_limited(
        bytes(data), max_buffer_size=max_buffer_size, max_ids_per_frame=max_ids_per_frame
    )
    return frame_from_obj(obj, max_ids_per_frame)


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
        self._raw: bytearray | None = None  # bytes since _frame_start, kept by feed_raw only

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
        return [frame for frame, _ in self._guarded(data, keep=False)]

    def feed_raw(self, data: bytes | bytearray | memoryview) -> list[tuple[CodecFrame, bytes]]:
        """Like :meth:`feed`, but also return each frame's exact bytes as they were on the stream
        (for forwarding a frame unchanged). Use one of the two methods for a whole stream."""
        return self._guarded(data, keep=True)

    def _guarded(self, data: bytes | bytearray | memoryview, *, keep: bool) -> list[tuple[CodecFrame, bytes]]:
        if self._error is not None:
            raise FrameError(f"stream decoder is poisoned by an earlier error: {self._error}")
        if keep and self._raw is None:
            self._raw = bytearray()
        try:
            return self._feed(memoryview(data).cast("B"))
        except FrameError as exc:
            self._error = exc
            raise
        except Exception as exc:  # msgpack signals malformed input with assorted exception types
            self._error = FrameError(f"malformed msgpack stream: {exc}")
            raise self._error from exc

    def _feed(self, view: memoryview) -> list[tuple[CodecFrame, bytes]]:
        frames: list[tuple[CodecFrame, bytes]] = []
        pos = 0
        while True:
            # Drain every complete value first, so what stays buffered is one partial frame.
            for obj in self._unpacker:
                end = self._unpacker.tell()
                raw = b""
                if self._raw is not None:
                    size = end - self._frame_start
                    raw = bytes(self._raw[:size])
                    del self._raw[:size]
                frames.append((frame_from_obj(obj, self._max_ids_per_frame), raw))
                self._frame_start = end
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
            if self._raw is not None:
                self._raw += view[pos : pos + step]
            pos += step
            self._fed_bytes += step
