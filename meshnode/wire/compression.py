"""Streaming zstd, one context per stream, flushed per message (legion-mesh §2.7).

Optionally with a dictionary named ``sha256:<hex>`` of its raw bytes. Decompression is bounded
per message (a decompression-bomb guard); every failure is a :class:`~meshnode.errors.FrameError`.
"""

from __future__ import annotations

import hashlib
from typing import Final

import zstandard

from meshnode.errors import FrameError
from meshnode.wire.frames import DEFAULT_MAX_DECOMPRESSED_BYTES

__all__ = ["StreamCompressor", "StreamDecompressor", "dict_id"]

_DECOMPRESS_WRITE_SIZE_BYTES: Final = 64 * 1024

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
                self._sink,  # type: ignore[arg-type]  # a write()-only sink is all zstandard uses
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
