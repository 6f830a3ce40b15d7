"""A small in-process NIP-01 relay for `meshnode demo`: enough for Trystero's Nostr strategy.

It speaks EVENT / REQ / CLOSE and answers OK, EOSE, CLOSED and NOTICE (NIP-01). Events are checked
(id = SHA-256 of the canonical serialisation, BIP-340 signature over the id) and fanned out to
matching subscriptions; nothing is stored, so only ephemeral traffic (Trystero's kinds
20000–29999) makes sense here. Filters support `kinds`, `#x` tags, `since`, `until`, `authors`
and `ids`. Built for one machine (loopback); limits keep a misbehaving client from hoarding memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from coincurve import PublicKeyXOnly
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from signaling.adapters.nostr import event_id

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024
MAX_SUBSCRIPTIONS_PER_CONNECTION = 64
MAX_FILTERS_PER_SUBSCRIPTION = 16
MAX_SUBSCRIPTION_ID_CHARS = 64
HEX64 = frozenset("0123456789abcdef")


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= HEX64


def check_event(event: object) -> str | None:
    """Why `event` is not a valid NIP-01 event, or None when it is."""
    if not isinstance(event, dict):
        return "invalid: event must be an object"
    pubkey, sig, ident = event.get("pubkey"), event.get("sig"), event.get("id")
    kind, created_at = event.get("kind"), event.get("created_at")
    tags, content = event.get("tags"), event.get("content")
    if not (_is_hex(pubkey, 64) and _is_hex(sig, 128) and _is_hex(ident, 64)):
        return "invalid: id, pubkey and sig must be lower-case hex"
    if not isinstance(kind, int) or isinstance(kind, bool) or not isinstance(created_at, int):
        return "invalid: kind and created_at must be integers"
    if not isinstance(content, str):
        return "invalid: content must be a string"
    if not isinstance(tags, list) or not all(
        isinstance(tag, list) and all(isinstance(part, str) for part in tag) for tag in tags
    ):
        return "invalid: tags must be lists of strings"
    if event_id(str(pubkey), created_at, kind, tags, content) != ident:
        return "invalid: event id does not match its content"
    try:
        valid = PublicKeyXOnly(bytes.fromhex(str(pubkey))).verify(bytes.fromhex(str(sig)), bytes.fromhex(str(ident)))
    except ValueError:
        valid = False
    return None if valid else "invalid: bad signature"


@dataclass
class _Filter:
    kinds: set[int] | None = None
    tags: dict[str, set[str]] = field(default_factory=dict)
    since: int | None = None
    until: int | None = None
    authors: set[str] | None = None
    ids: set[str] | None = None

    @classmethod
    def parse(cls, raw: object) -> _Filter:
        if not isinstance(raw, dict):
            raise ValueError("filter must be an object")
        out = cls()
        for key, value in raw.items():
            if (key in {"kinds", "authors", "ids"} or (key.startswith("#") and len(key) == 2)) and not isinstance(
                    value, list):
                raise ValueError(f"{key} must be a list")
            if key == "kinds":
                out.kinds = {v for v in value if isinstance(v, int)}
            elif key == "authors":
                out.authors = {v for v in value if isinstance(v, str)}
            elif key == "ids":
                out.ids = {v for v in value if isinstance(v, str)}
            elif key.startswith("#") and len(key) == 2:
                out.tags[key[1]] = {v for v in value if isinstance(v, str)}
            elif key in {"since", "until"}:
                if not isinstance(value, int):
                    raise ValueError(f"{key} must be an integer")
                setattr(out, key, value)
        return out

    def matches(self, event: dict[str, Any]) -> bool:
        if self.kinds is not None and event["kind"] not in self.kinds:
            return False
        if self.ids is not None and event["id"] not in self.ids:
            return False
        if self.authors is not None and event["pubkey"] not in self.authors:
            return False
        if self.since is not None and event["created_at"] < self.since:
            return False
        if self.until is not None and event["created_at"] > self.until:
            return False
        for name, wanted in self.tags.items():
            if not any(len(tag) >= 2 and tag[0] == name and tag[1] in wanted for tag in event["tags"]):
                return False
        return True


class NostrRelayServer:
    """A NIP-01 relay on `host:port` (port 0 picks a free one). Async context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._server: Server | None = None
        self._subscriptions: dict[ServerConnection, dict[str, list[_Filter]]] = {}
        self.events_relayed = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen; after a close() it comes back on the same port (clients reconnect to it)."""
        if self._server is None:
            self._server = await serve(self._handle, self.host, self._requested_port, max_size=MAX_MESSAGE_BYTES)
            self._requested_port = self.port
            logger.info("nostr relay listening on %s", self.url)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def close(self) -> None:
        """Stop listening and drop every connection. Idempotent."""
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            await server.wait_closed()
            self._subscriptions.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _handle(self, connection: ServerConnection) -> None:
        self._subscriptions[connection] = {}
        try:
            async for frame in connection:
                if isinstance(frame, str):
                    await self._on_frame(connection, frame)
        except ConnectionClosed:
            pass  # a client leaving is the normal end of its session
        finally:
            self._subscriptions.pop(connection, None)

    async def _send(self, connection: ServerConnection, message: list[Any]) -> None:
        with contextlib.suppress(ConnectionClosed):
            await connection.send(_compact(message))

    async def _on_frame(self, connection: ServerConnection, frame: str) -> None:
        try:
            message = json.loads(frame)
        except (ValueError, RecursionError):
            await self._send(connection, ["NOTICE", "invalid: not JSON"])
            return
        if not isinstance(message, list) or not message or not isinstance(message[0], str):
            await self._send(connection, ["NOTICE", "invalid: expected a JSON array"])
            return
        verb = message[0]
        if verb == "EVENT" and len(message) == 2:
            await self._on_event(connection, message[1])
        elif verb == "REQ" and len(message) >= 3:
            await self._on_req(connection, message[1], message[2:])
        elif verb == "CLOSE" and len(message) == 2 and isinstance(message[1], str):
            self._subscriptions.get(connection, {}).pop(message[1], None)
            await self._send(connection, ["CLOSED", message[1], ""])
        else:
            await self._send(connection, ["NOTICE", f"invalid: unsupported message {verb!r}"])

    async def _on_event(self, connection: ServerConnection, event: Any) -> None:
        problem = check_event(event)
        ident = event.get("id") if isinstance(event, dict) else None
        await self._send(connection, ["OK", ident if isinstance(ident, str) else "", problem is None, problem or ""])
        if problem is not None:
            return
        for peer, subscriptions in list(self._subscriptions.items()):
            for sub_id, filters in list(subscriptions.items()):
                if any(f.matches(event) for f in filters):
                    self.events_relayed += 1
                    await self._send(peer, ["EVENT", sub_id, event])

    async def _on_req(self, connection: ServerConnection, sub_id: Any, raw_filters: list[Any]) -> None:
        if not isinstance(sub_id, str) or not 0 < len(sub_id) <= MAX_SUBSCRIPTION_ID_CHARS:
            await self._send(connection, ["NOTICE", "invalid: bad subscription id"])
            return
        subscriptions = self._subscriptions.setdefault(connection, {})
        if sub_id not in subscriptions and len(subscriptions) >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
            await self._send(connection, ["CLOSED", sub_id, "error: too many subscriptions"])
            return
        try:
            filters = [_Filter.parse(raw) for raw in raw_filters[:MAX_FILTERS_PER_SUBSCRIPTION]]
        except ValueError as exc:
            await self._send(connection, ["CLOSED", sub_id, f"invalid: {exc}"])
            return
        subscriptions[sub_id] = filters
        await self._send(connection, ["EOSE", sub_id])  # nothing stored: the backlog is always empty
