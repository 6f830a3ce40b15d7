"""A small ws-relay server (trystero-wire §6.1) for the tests, the benches and local rooms.

Every ``{"type":"publish","topic":T,"payload":P}`` from a client goes to every open subscriber of
T, the publisher included, as ``{"topic":T,"payload":P}``. No acknowledgements, no
authentication, no persistence; topics and subscriptions per connection are bounded.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from signaling.adapters.relaysocket import MAX_MESSAGE_BYTES, PING_INTERVAL_SECONDS, PING_TIMEOUT_SECONDS

__all__ = ["WsRelayServer"]

logger = logging.getLogger(__name__)

MAX_TOPIC_CHARS = 256
"""Longest topic the server accepts (Trystero topics are 20-40 characters)."""
MAX_TOPICS_PER_CONNECTION = 1024
"""Subscriptions one socket may hold on the server; further subscribes are ignored."""


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class WsRelayServer:
    """A ws-relay server (trystero-wire §6.1) for tests and ``meshnode relay``.

    Use as an async context manager::

        async with WsRelayServer("127.0.0.1", 0) as server:
            print(server.url)
            await server.serve_forever()

    Args:
        host: address to bind.
        port: TCP port; 0 picks a free one (read `port` / `url` after start).
        max_message_bytes: largest inbound frame; larger ones close that client's socket.
        max_topics_per_connection: subscriptions one socket may hold; extra subscribes are ignored.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_topics_per_connection: int = MAX_TOPICS_PER_CONNECTION,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._max_message_bytes = max_message_bytes
        self._max_topics = max_topics_per_connection
        self._server: Server | None = None
        self._subscribers: dict[str, set[ServerConnection]] = {}
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        if self._server is None:
            msg = "server not started"
            raise RuntimeError(msg)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``ws://host:port`` of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start accepting connections."""
        if self._server is not None:
            return
        self._server = await serve(
            self._handle,
            self.host,
            self._requested_port,
            max_size=self._max_message_bytes,
            ping_interval=PING_INTERVAL_SECONDS,
            ping_timeout=PING_TIMEOUT_SECONDS,
        )
        logger.info("ws-relay server listening on %s", self.url)

    async def serve_forever(self) -> None:
        """Wait until the server is closed."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.wait_closed()

    async def close(self) -> None:
        """Close every connection and stop listening. Idempotent."""
        if self._server is None or self._closed:
            return
        self._closed = True
        self._server.close()
        await self._server.wait_closed()
        self._subscribers.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _handle(self, connection: ServerConnection) -> None:
        topics: set[str] = set()
        try:
            async for frame in connection:
                if isinstance(frame, str):
                    self._on_frame(connection, topics, frame)
        except ConnectionClosed:
            # why: a client going away is the normal end of its session.
            pass
        finally:
            for topic in topics:
                subscribers = self._subscribers.get(topic)
                if subscribers is not None:
                    subscribers.discard(connection)
                    if not subscribers:
                        del self._subscribers[topic]

    def _on_frame(self, connection: ServerConnection, topics: set[str], frame: str) -> None:
        try:
            message = json.loads(frame)
        except (ValueError, RecursionError):
            return  # why: the protocol has no error reply; garbage is ignored, as upstream does
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        topic = message.get("topic")
        if not isinstance(topic, str) or not 0 < len(topic) <= MAX_TOPIC_CHARS:
            return
        if kind == "subscribe":
            if topic not in topics and len(topics) >= self._max_topics:
                logger.warning("ws-relay server: subscription limit reached for %s", connection.id)
                return
            topics.add(topic)
            self._subscribers.setdefault(topic, set()).add(connection)
        elif kind == "unsubscribe":
            topics.discard(topic)
            subscribers = self._subscribers.get(topic)
            if subscribers is not None:
                subscribers.discard(connection)
                if not subscribers:
                    del self._subscribers[topic]
        elif kind == "publish" and "payload" in message:
            subscribers = self._subscribers.get(topic)
            if subscribers:
                # The publisher gets its own message back when subscribed (§6.1).
                broadcast(subscribers, _compact({"topic": topic, "payload": message["payload"]}))
