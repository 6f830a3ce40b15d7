"""What every upstream dialect provides, and the sans-IO pieces the dialects share.

A dialect turns a prompt and sampling parameters into one HTTP request, and the response body
(fed in whatever pieces the socket delivers) into :class:`Piece` values: new ids, the end, and for
Codec upstreams the exact bytes of each frame. Parsers never await and raise
:class:`~meshnode.errors.ProtocolError` on bytes that do not parse, so every dialect is tested
against recorded bodies split at random points (tests/unit/test_remote_dialects.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshnode.errors import ProtocolError
from meshnode.generation.api import FinishReason, Prompt, SamplingParams

__all__ = [
    "MAX_EVENT_BYTES",
    "Dialect",
    "HttpCall",
    "Piece",
    "SseReader",
    "StreamParser",
    "json_event",
]

MAX_EVENT_BYTES = 1024 * 1024
"""Largest server-sent event accepted from an upstream (one JSON chunk)."""


@dataclass(frozen=True)
class Piece:
    """What one step of an upstream's stream contributes."""

    ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    frame: bytes | None = None
    """The upstream's exact frame bytes (Codec upstreams), forwarded unchanged."""
    prompt_tokens: int | None = None
    matched_stop: str | int | None = None
    error: str | None = None
    """Why the upstream failed the call (with ``finish == "error"``)."""


class StreamParser(Protocol):
    """Sans-IO: response bytes in, pieces out."""

    def feed(self, data: bytes) -> list[Piece]:
        """Pieces completed by these bytes. Raises ProtocolError on malformed bytes."""
        ...

    def close(self) -> list[Piece]:
        """The body ended: remaining pieces. Raises ProtocolError when the stream was cut short."""
        ...


@dataclass(frozen=True)
class HttpCall:
    """One HTTP POST with a JSON body."""

    path: str
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


class Dialect(Protocol):
    """One kind of upstream server."""

    name: str
    chat_native: bool
    """Whether it applies the chat template itself (else the node sends templated ids)."""
    serves_map: bool
    """Whether it serves its Codec map at ``/.well-known/codec/`` (else a local tokenizer must)."""
    health_path: str
    """GET path that answers 200 while the upstream can serve."""
    content_type: str
    """The streamed response's media type."""
    discovery: tuple[str, Callable[[bytes], int | None]] | None
    """GET path and a parser for the number of calls the upstream takes at once, if it says."""

    def request(self, prompt: Prompt, params: SamplingParams, rid: str, model: str | None) -> HttpCall:
        """The streaming request for a prompt (messages only when :attr:`chat_native`)."""
        ...

    def parser(self, encode: Callable[[str], list[int]] | None) -> StreamParser:
        """A parser for one response (``encode`` is the local tokenizer's, for repairs)."""
        ...

    def abort(self, rid: str) -> HttpCall | None:
        """An extra request that cancels ``rid`` at once (beyond closing the stream), if any."""
        ...


class SseReader:
    """Server-sent events, sans-IO: bytes in, each event's ``data`` out (WHATWG rules, data only).

    Lines end in LF, CRLF or CR; an empty line ends an event; ``data:`` lines of one event are
    joined with LF; comments (``:``) and other fields are ignored. An event over
    :data:`MAX_EVENT_BYTES` is an error (an upstream that never ends a line must not grow memory).
    """

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._line = bytearray()
        self._data: list[bytes] = []
        self._size = 0
        self._after_cr = False

    def feed(self, data: bytes) -> list[str]:
        """The ``data`` of every event these bytes complete. Raises ProtocolError (size, UTF-8)."""
        events: list[str] = []
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]  # the LF of a CRLF whose CR ended the previous read
        self._after_cr = False
        pos, size = 0, len(data)
        while pos < size:
            ends = [i for i in (data.find(b"\n", pos), data.find(b"\r", pos)) if i >= 0]
            if not ends:
                self._line += data[pos:]
                break
            end = min(ends)
            self._line += data[pos:end]
            self._size_check()
            self._end_line(events)
            pos = end + 1
            if data[end] == 0x0D:
                if pos == size:
                    self._after_cr = True
                elif data[pos] == 0x0A:
                    pos += 1
        self._size_check()
        return events

    def pending(self) -> bool:
        """Whether an event or a line is incomplete."""
        return bool(self._line or self._data)

    def _size_check(self) -> None:
        if self._size + len(self._line) > self._max:
            raise ProtocolError(f"server-sent event exceeds {self._max} bytes")

    def _end_line(self, events: list[str]) -> None:
        line = bytes(self._line)
        self._line.clear()
        if not line:
            if self._data:
                try:
                    events.append(b"\n".join(self._data).decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise ProtocolError(f"server-sent event is not UTF-8: {exc}") from exc
            self._data, self._size = [], 0
            return
        name, _, value = line.partition(b":")
        if name == b"data":
            value = value[1:] if value.startswith(b" ") else value
            self._data.append(value)
            self._size += len(value) + 1
            self._size_check()


def json_event(data: str, dialect: str) -> dict[str, Any]:
    """One event's JSON object. Raises ProtocolError naming the dialect."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"{dialect} sent an event that is not JSON: {data[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{dialect} sent an event that is not a JSON object: {data[:80]!r}")
    return obj


def id_list(value: Any, what: str) -> list[int]:
    """A JSON array of token ids. Raises ProtocolError otherwise."""
    if not isinstance(value, list) or not all(type(i) is int and 0 <= i <= 0xFFFF_FFFF for i in value):
        raise ProtocolError(f"{what} must be an array of token ids, got {str(value)[:80]}")
    return list(value)


def error_text(obj: Mapping[str, Any]) -> str:
    """The message of an OpenAI-style ``{"error": {...}}`` event (or its string)."""
    error = obj.get("error")
    if isinstance(error, Mapping):
        return str(error.get("message") or error)
    return str(error)
