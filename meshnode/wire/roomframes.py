"""Trystero data-channel framing: room / presence frames, action chunks, payloads, reassembly.

Pure and sans-IO (trystero-wire §8): no asyncio, no aiortc. Every data-channel message is an outer
frame (§8.1); a room frame carries one action chunk (§8.2): a 32-byte name, a 2-byte nonce, a tag
byte and a progress byte, then at most 16 348 payload bytes. :class:`Reassembler` turns chunks back
into messages with hard limits on memory, dropping (and logging) what exceeds them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from meshnode.errors import FrameError, ProtocolError

__all__ = [
    "CHUNK_HEADER_BYTES",
    "CHUNK_PAYLOAD_BYTES",
    "NAME_BYTES",
    "NO_METADATA",
    "TAG_BINARY",
    "TAG_JSON",
    "TAG_LAST",
    "TAG_METADATA",
    "ActionChunk",
    "Delivery",
    "PayloadError",
    "PresenceFrame",
    "Reassembler",
    "RoomFrame",
    "decode_chunk",
    "decode_frame",
    "decode_payload",
    "encode_action",
    "encode_name",
    "encode_payload",
    "encode_presence_frame",
    "encode_room_frame",
    "js_json_dumps",
]

logger = logging.getLogger(__name__)

ROOM_FRAME_TYPE: Final = 0x01
PRESENCE_FRAME_TYPE: Final = 0x02
NAME_BYTES: Final = 32
CHUNK_HEADER_BYTES: Final = 36
CHUNK_PAYLOAD_BYTES: Final = 16 * 1024 - CHUNK_HEADER_BYTES  # 16 348 (§8.2)
NONCE_MODULUS: Final = 1 << 16

TAG_LAST: Final = 0x01
TAG_METADATA: Final = 0x02
TAG_BINARY: Final = 0x04
TAG_JSON: Final = 0x08

DEFAULT_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
DEFAULT_MAX_PENDING_MESSAGES_PER_PEER: Final = 32
DEFAULT_MAX_PENDING_BYTES_PER_PEER: Final = 64 * 1024 * 1024
TOMBSTONES_PER_PENDING: Final = 4
"""Keys of dropped messages remembered per peer, as a multiple of the pending-message limit."""


class PayloadError(ProtocolError):
    """A value cannot be sent as an action payload, or a received payload does not decode."""


class _NoMetadata:
    """Sentinel type: the message has no metadata chunk (JS ``undefined``)."""

    _instance: _NoMetadata | None = None

    def __new__(cls) -> _NoMetadata:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_METADATA"

    def __bool__(self) -> bool:
        return False


NO_METADATA: Final = _NoMetadata()
"""Marks "no metadata" where ``None`` (JSON ``null``) is a legitimate metadata value."""


# -- outer frames (§8.1) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomFrame:
    """``01 | len16 | token | chunk``: one action chunk for the room with this token."""

    token: str
    chunk: bytes


@dataclass(frozen=True, slots=True)
class PresenceFrame:
    """``02 | present | len16 | token``: the sender entered (True) or left (False) the room."""

    token: str
    present: bool


def _token_bytes(token: str) -> bytes:
    raw = token.encode("ascii")
    if not raw or len(raw) > 0xFFFF:
        raise ValueError("room token must be 1..65535 ASCII characters")
    return raw


def encode_room_frame(token: str, chunk: bytes) -> bytes:
    """Wrap one action chunk in a room frame (P1: browsers drop bare chunks)."""
    raw = _token_bytes(token)
    return b"\x01" + len(raw).to_bytes(2, "big") + raw + chunk


def encode_presence_frame(token: str, present: bool) -> bytes:
    """Presence frame: ``present=True`` after joining, ``False`` when leaving the room."""
    raw = _token_bytes(token)
    return b"\x02" + (b"\x01" if present else b"\x00") + len(raw).to_bytes(2, "big") + raw


def decode_frame(data: bytes) -> RoomFrame | PresenceFrame:
    """Decode one data-channel message.

    Raises:
        FrameError: empty, unknown type, too short, zero or truncated token (receiver rules §8.1).
    """
    if not data:
        raise FrameError("empty data-channel message")
    kind = data[0]
    if kind == ROOM_FRAME_TYPE:
        offset = 3
    elif kind == PRESENCE_FRAME_TYPE:
        offset = 4
    else:
        raise FrameError(f"unknown outer frame type 0x{kind:02x}")
    if len(data) < offset:
        raise FrameError("outer frame too short")
    length = int.from_bytes(data[offset - 2 : offset], "big")
    if length == 0 or len(data) < offset + length:
        raise FrameError("bad or truncated room token")
    try:
        token = data[offset : offset + length].decode("ascii")
    except UnicodeDecodeError as exc:
        raise FrameError("room token is not ASCII") from exc
    if kind == ROOM_FRAME_TYPE:
        return RoomFrame(token=token, chunk=bytes(data[offset + length :]))
    return PresenceFrame(token=token, present=data[1] == 1)


# -- payloads (§8.3) -------------------------------------------------------------------------------

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_ARRAY_INDEX_MAX = 2**32 - 2


def _js_number(value: float) -> str:
    """``Number.prototype.toString`` of a double, as ``JSON.stringify`` writes it (P11)."""
    if math.isnan(value) or math.isinf(value):
        return "null"
    if value == 0:
        return "0"  # also -0
    sign = "-" if value < 0 else ""
    # repr() gives the shortest round-tripping digits, the same digits JS picks.
    decimal = Decimal(repr(abs(value)))
    _, digit_tuple, exponent = decimal.normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = int(exponent) + k  # value = 0.d1..dk * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        text = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + text


def _js_string(value: str) -> str:
    text = json.dumps(value, ensure_ascii=False)
    # JSON.stringify escapes lone surrogates (well-formed JSON.stringify, ES2019).
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _js_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int | float):
        return _js_number_any(key)
    raise PayloadError(f"cannot use {type(key).__name__} as a JSON object key")


def _js_number_any(value: int | float) -> str:
    if isinstance(value, int) and abs(value) < 2**53:
        return str(value)
    return _js_number(float(value))


def _is_array_index(key: str) -> bool:
    return key.isdigit() and key.isascii() and str(int(key)) == key and int(key) <= _ARRAY_INDEX_MAX


def _js_json(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_js_string(value))
    elif isinstance(value, int | float):
        out.append(_js_number_any(value))
    elif isinstance(value, dict):
        items = [(_js_key(k), v) for k, v in value.items()]
        # JS objects list integer-like keys first, ascending, then the rest in insertion order.
        indices = sorted(
            (item for item in items if _is_array_index(item[0])), key=lambda i: int(i[0])
        )
        ordered = indices + [item for item in items if not _is_array_index(item[0])]
        out.append("{")
        for position, (key, item) in enumerate(ordered):
            if position:
                out.append(",")
            out.append(_js_string(key))
            out.append(":")
            _js_json(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for position, item in enumerate(value):
            if position:
                out.append(",")
            _js_json(item, out)
        out.append("]")
    else:
        raise PayloadError(f"{type(value).__name__} is not JSON-serialisable")


def js_json_dumps(value: Any) -> str:
    """Serialise like JavaScript's ``JSON.stringify`` (compact, JS number formatting, JS key order).

    Raises:
        PayloadError: a value or key JSON cannot represent (bytes, sets, objects, too deep).
    """
    out: list[str] = []
    try:
        _js_json(value, out)
    except RecursionError as exc:
        raise PayloadError("value nested too deeply") from exc
    return "".join(out)


def _utf8(text: str) -> bytes:
    # TextEncoder replaces lone surrogates with U+FFFD.
    return _LONE_SURROGATE.sub("\ufffd", text).encode()


def encode_payload(value: Any) -> tuple[bytes, int]:
    """Encode an action payload; returns (bytes, kind tag bits) per §8.3.

    ``str`` → UTF-8, no bits; ``bytes``-like → raw, binary|JSON bits; anything else → JSON text,
    JSON bit.

    Raises:
        PayloadError: the value is not JSON-serialisable.
    """
    if isinstance(value, str):
        return _utf8(value), 0
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), TAG_BINARY | TAG_JSON
    return _utf8(js_json_dumps(value)), TAG_JSON


def _utf8_text(data: bytes) -> str:
    # TextDecoder: replacement characters for bad bytes, a leading BOM is dropped.
    return data.decode("utf-8-sig", errors="replace")


def decode_payload(data: bytes, tags: int) -> Any:
    """Decode reassembled payload bytes by tag bits (binary bit checked first, §8.3).

    Raises:
        PayloadError: the JSON bit is set but the bytes are not JSON.
    """
    if tags & TAG_BINARY:
        return bytes(data)
    if tags & TAG_JSON:
        try:
            return json.loads(_utf8_text(data))
        except (ValueError, RecursionError) as exc:
            raise PayloadError(f"JSON payload does not parse: {exc}") from exc
    return _utf8_text(data)


# -- action chunks (§8.2, §8.4) --------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    """The 32-byte, NUL-padded action name field.

    Raises:
        ValueError: the UTF-8 name is longer than 32 bytes (``makeAction`` rejects those).
    """
    raw = name.encode()
    if len(raw) > NAME_BYTES:
        raise ValueError(f"action name {name!r} is longer than {NAME_BYTES} bytes")
    return raw.ljust(NAME_BYTES, b"\x00")


def _progress(index: int, count: int) -> int:
    # JS Math.round rounds .5 up; Python's round() does not (P12).
    return math.floor(((index + 1) / count) * 255 + 0.5)


def encode_action(
    name: str | bytes,
    nonce: int,
    payload: bytes,
    kind_tags: int,
    metadata: Any = NO_METADATA,
) -> list[bytes]:
    """Split one action message into chunks (without the room-frame prefix).

    Args:
        name: action name (or its pre-encoded 32-byte field).
        nonce: message counter; taken modulo 65536.
        payload: the encoded payload (see :func:`encode_payload`).
        kind_tags: ``0``, ``TAG_JSON`` or ``TAG_BINARY | TAG_JSON``; set on every chunk.
        metadata: any JSON value sent as chunk 0 with ``TAG_METADATA``; ``NO_METADATA`` for none.

    Returns:
        The chunks in send order; the last has ``TAG_LAST``.
    """
    name_field = name if isinstance(name, bytes) else encode_name(name)
    if len(name_field) != NAME_BYTES:
        raise ValueError("encoded action name must be 32 bytes")
    parts: list[tuple[int, bytes]] = []
    if metadata is not NO_METADATA:
        parts.append((TAG_METADATA, _utf8(js_json_dumps(metadata))))
    parts.extend(
        (0, payload[offset : offset + CHUNK_PAYLOAD_BYTES])
        for offset in range(0, len(payload), CHUNK_PAYLOAD_BYTES)
    )
    if not parts:  # empty payload without metadata: one empty chunk
        parts.append((0, b""))
    count = len(parts)
    prefix = name_field + (nonce % NONCE_MODULUS).to_bytes(2, "big")
    chunks = []
    for index, (extra_tags, body) in enumerate(parts):
        tags = kind_tags | extra_tags | (TAG_LAST if index == count - 1 else 0)
        chunks.append(prefix + bytes((tags, _progress(index, count))) + body)
    return chunks


@dataclass(frozen=True, slots=True)
class ActionChunk:
    """One parsed action chunk."""

    name: str
    nonce: int
    tags: int
    progress: int
    payload: bytes

    @property
    def last(self) -> bool:
        return bool(self.tags & TAG_LAST)

    @property
    def is_metadata(self) -> bool:
        return bool(self.tags & TAG_METADATA)


def decode_chunk(chunk: bytes) -> ActionChunk:
    """Parse a chunk header; the name loses **all** NUL characters (§8.4).

    Raises:
        FrameError: shorter than the 36-byte header.
    """
    if len(chunk) < CHUNK_HEADER_BYTES:
        raise FrameError(f"action chunk of {len(chunk)} bytes is shorter than its header")
    name = chunk[:NAME_BYTES].decode("utf-8", errors="replace").replace("\x00", "")
    return ActionChunk(
        name=name,
        nonce=int.from_bytes(chunk[32:34], "big"),
        tags=chunk[34],
        progress=chunk[35],
        payload=bytes(chunk[CHUNK_HEADER_BYTES:]),
    )


# -- reassembly (§8.4) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """A complete action message.

    Attributes:
        peer_id: sender.
        name: action name.
        nonce: the sender's message counter.
        payload: ``str``, ``bytes`` or a parsed JSON value (§8.3).
        metadata: parsed metadata, or ``NO_METADATA``.
        size: reassembled bytes on the wire (payload + metadata), for per-peer memory accounting.
    """

    peer_id: str
    name: str
    nonce: int
    payload: Any
    metadata: Any
    size: int = 0


@dataclass
class _Partial:
    parts: list[bytes]
    size: int = 0
    metadata: Any = NO_METADATA


_Key = tuple[str, int]


class Reassembler:
    """Reassembles chunks keyed by (peer, name, nonce) within hard memory limits.

    ``feed`` never raises: malformed chunks, oversize messages and undecodable payloads are dropped
    and logged (DEBUG, with a reason) and counted in :attr:`dropped`, because remote garbage is
    expected and must not take the room down (STYLE §8).

    Limits: one message may hold at most `max_message_bytes`; a peer may have at most
    `max_pending_messages_per_peer` incomplete messages and `max_pending_bytes_per_peer` buffered
    bytes, beyond which its oldest incomplete messages are evicted. A peer whose message outgrows
    `max_message_bytes` is reported to `on_oversize` (the room drops it: whatever it is sending
    cannot be delivered, and every further chunk would cost parsing). The key of a dropped message is
    remembered (a small, bounded "tombstone") until its last chunk, so that its remaining chunks are
    swallowed instead of being delivered as a truncated message.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_pending_messages_per_peer: int = DEFAULT_MAX_PENDING_MESSAGES_PER_PEER,
        max_pending_bytes_per_peer: int = DEFAULT_MAX_PENDING_BYTES_PER_PEER,
        on_oversize: Callable[[str, str], None] | None = None,
    ) -> None:
        if min(max_message_bytes, max_pending_messages_per_peer, max_pending_bytes_per_peer) < 1:
            raise ValueError("reassembly limits must be positive")
        if max_message_bytes > max_pending_bytes_per_peer:
            raise ValueError("max_message_bytes must not exceed max_pending_bytes_per_peer")
        self.max_message_bytes = max_message_bytes
        self.max_pending_messages_per_peer = max_pending_messages_per_peer
        self.max_pending_bytes_per_peer = max_pending_bytes_per_peer
        self.max_tombstones_per_peer = TOMBSTONES_PER_PENDING * max_pending_messages_per_peer
        self.on_oversize = on_oversize
        """Called with (peer id, reason) when a peer's message outgrew `max_message_bytes`."""
        self._pending: dict[str, OrderedDict[_Key, _Partial]] = {}
        self._tombstones: dict[str, OrderedDict[_Key, None]] = {}
        self._peer_bytes: dict[str, int] = {}
        self.dropped = 0
        """Messages or chunks dropped so far (for tests and metrics)."""

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered for incomplete messages, over all peers."""
        return sum(self._peer_bytes.values())

    def pending_messages(self, peer_id: str) -> int:
        """Incomplete messages buffered for one peer."""
        return len(self._pending.get(peer_id, ()))

    def drop_peer(self, peer_id: str) -> None:
        """Forget everything buffered for a peer (on leave / disconnect, P13)."""
        self._pending.pop(peer_id, None)
        self._tombstones.pop(peer_id, None)
        self._peer_bytes.pop(peer_id, None)

    def clear(self) -> None:
        """Forget everything."""
        self._pending.clear()
        self._tombstones.clear()
        self._peer_bytes.clear()

    def feed(self, peer_id: str, data: bytes) -> Delivery | None:
        """Add one chunk from `peer_id`; returns the message when this chunk completed it."""
        try:
            chunk = decode_chunk(data)
        except FrameError as exc:
            self._count_drop(peer_id, "%s", exc)
            return None
        key = (chunk.name, chunk.nonce)
        tombstones = self._tombstones.get(peer_id)
        if tombstones is not None and key in tombstones:
            if chunk.last:
                del tombstones[key]
            return None
        pending = self._pending.setdefault(peer_id, OrderedDict())
        partial = pending.get(key)
        if partial is None:
            partial = pending[key] = _Partial(parts=[])
        if not self._add(peer_id, key, partial, chunk):
            return None
        self._enforce_limits(peer_id, keep=key, keep_is_last=chunk.last)
        if key not in pending or not chunk.last:
            return None
        del pending[key]
        body = b"".join(partial.parts)
        self._peer_bytes[peer_id] -= partial.size
        try:
            payload = decode_payload(body, chunk.tags)
        except PayloadError as exc:
            self._count_drop(peer_id, "action %r: %s", chunk.name, exc)
            return None
        return Delivery(
            peer_id=peer_id,
            name=chunk.name,
            nonce=chunk.nonce,
            payload=payload,
            metadata=partial.metadata,
            size=partial.size,
        )

    def _add(self, peer_id: str, key: _Key, partial: _Partial, chunk: ActionChunk) -> bool:
        """Buffer one chunk; False when the message was dropped instead."""
        size = len(chunk.payload)
        if partial.size + size > self.max_message_bytes:
            reason = f"action {key[0]!r} exceeds {self.max_message_bytes} bytes"
            self._drop_message(peer_id, key, chunk.last, "%s", reason)
            if self.on_oversize is not None:
                self.on_oversize(peer_id, reason)
            return False
        if chunk.is_metadata:
            try:
                partial.metadata = json.loads(_utf8_text(chunk.payload))
            except (ValueError, RecursionError):
                self._drop_message(
                    peer_id, key, chunk.last, "action %r: metadata is not JSON", key[0]
                )
                return False
        else:
            partial.parts.append(chunk.payload)
        partial.size += size  # metadata counts towards the limits too
        self._peer_bytes[peer_id] = self._peer_bytes.get(peer_id, 0) + size
        return True

    def _enforce_limits(self, peer_id: str, keep: _Key, *, keep_is_last: bool) -> None:
        """Evict the peer's oldest incomplete messages (`keep` last of all) until within limits."""
        pending = self._pending[peer_id]
        while len(pending) > self.max_pending_messages_per_peer or (
            self._peer_bytes[peer_id] > self.max_pending_bytes_per_peer
        ):
            victim = next((k for k in pending if k != keep), keep)
            last = keep_is_last and victim == keep
            self._drop_message(
                peer_id, victim, last, "evicted action %r (per-peer limits)", victim[0]
            )
            if victim == keep:
                break

    def _drop_message(
        self, peer_id: str, key: _Key, last: bool, reason: str, *args: object
    ) -> None:
        partial = self._pending[peer_id].pop(key, None)
        if partial is not None:
            self._peer_bytes[peer_id] = self._peer_bytes.get(peer_id, 0) - partial.size
        if not last:  # swallow the rest of this message
            tombstones = self._tombstones.setdefault(peer_id, OrderedDict())
            tombstones[key] = None
            while len(tombstones) > self.max_tombstones_per_peer:
                tombstones.popitem(last=False)
        self._count_drop(peer_id, reason, *args)

    def _count_drop(self, peer_id: str, reason: str, *args: object) -> None:
        self.dropped += 1
        logger.debug("dropped action data from %s: " + reason, peer_id, *args)
