"""Trystero's ws-relay protocol (trystero-wire §6.1): a client adapter and a small server.

Four JSON text frames make up the whole protocol:

* client → server ``{"type":"subscribe","topic":T}``, ``{"type":"unsubscribe","topic":T}`` and
  ``{"type":"publish","topic":T,"payload":P}`` (P is the signalling JSON *as a string*);
* server → client ``{"topic":T,"payload":P}``, delivered to every open subscriber of T **including
  the publisher**.

There are no acknowledgements, no authentication and no persistence. `WsRelayServer` is what the
tests and ``meshnode relay`` run; `WsRelay` is the `TopicRelay` adapter.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any, Literal, Self

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from signaling.base import Backoff, TopicHandler
from signaling.adapters.relaysocket import (
    MAX_MESSAGE_BYTES,
    OPEN_TIMEOUT_SECONDS,
    PING_INTERVAL_SECONDS,
    PING_TIMEOUT_SECONDS,
    RelaySocket,
    deliver_topic_message,
)

logger = logging.getLogger(__name__)

MAX_TOPIC_CHARS = 256
"""Longest topic the server accepts (Trystero topics are 20-40 characters)."""
MAX_TOPICS_PER_CONNECTION = 1024
"""Subscriptions one socket may hold on the server; further subscribes are ignored."""


def _compact(value: Any) -> str:  # noqa: ANN401 - any JSON value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class WsRelay:
    """`TopicRelay` adapter for one ws-relay server.

    Args:
        url: ``ws://`` or ``wss://`` URL of the server.
        backoff: reconnect schedule; Trystero's relay-socket schedule (§6.6) when None.
        open_timeout_seconds: bound on one connection attempt.
        max_message_bytes: largest inbound frame accepted.

    ws-relay has no subscribe acknowledgement, so `subscribe` returns once the frame is sent.
    Messages for topics not subscribed (any more) are dropped, as are frames that are not
    ``{"topic": str, "payload": str | object}``; an object payload is handed on as compact JSON.
    """

    kind: Literal["topic"] = "topic"

    def __init__(
        self,
        url: str,
        *,
        backoff: Backoff | None = None,
        open_timeout_seconds: float = OPEN_TIMEOUT_SECONDS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = url
        self._handler: TopicHandler | None = None
        self._topics: dict[str, None] = {}  # ordered set: re-subscribed in subscription order
        self._sent: set[str] = set()  # topics subscribed on the current socket
        self._socket = RelaySocket(
            url,
            backoff=backoff,
            on_open=self._on_open,
            on_text=self._on_text,
            on_close=self._sent.clear,
            open_timeout_seconds=open_timeout_seconds,
            max_message_bytes=max_message_bytes,
        )

    def set_handler(self, handler: TopicHandler) -> None:
        """Set the callback for inbound (topic, payload_text); it must not block."""
        self._handler = handler

    @property
    def connected(self) -> bool:
        """True while the socket is open and the subscriptions were re-sent."""
        return self._socket.connected

    @property
    def topics(self) -> tuple[str, ...]:
        """The remembered subscriptions, in subscription order."""
        return tuple(self._topics)

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        await self._socket.start()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the connection; True when connected."""
        return await self._socket.wait_connected(timeout)

    async def wait_disconnected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until the socket is down; True when it is."""
        return await self._socket.wait_disconnected(timeout)

    async def subscribe(self, topic: str) -> None:
        """Remember `topic` and, when a socket is open, send the subscribe frame."""
        self._topics[topic] = None
        await self._send_subscribe(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Forget `topic` and, when it was subscribed on the open socket, unsubscribe it."""
        self._topics.pop(topic, None)
        if topic in self._sent:
            self._sent.discard(topic)
            await self._socket.send_text(_compact({"type": "unsubscribe", "topic": topic}))

    async def publish(self, topic: str, payload: str) -> bool:
        """Publish text on `topic`; False (dropped) while disconnected."""
        if not self._socket.connected:
            return False
        frame = _compact({"type": "publish", "topic": topic, "payload": payload})
        return await self._socket.send_text(frame)

    async def close(self) -> None:
        """Close the socket and stop reconnecting. Idempotent."""
        await self._socket.close()

    async def _send_subscribe(self, topic: str) -> None:
        # Bookkeeping happens before the await, so on_open and a concurrent subscribe never send
        # the same topic twice on one socket (§6.1: once per topic per socket).
        if self._socket.socket is None or topic in self._sent:
            return
        self._sent.add(topic)
        if not await self._socket.send_text(_compact({"type": "subscribe", "topic": topic})):
            self._sent.discard(topic)

    async def _on_open(self, socket: ClientConnection) -> None:  # noqa: ARG002
        self._sent.clear()
        for topic in list(self._topics):
            await self._send_subscribe(topic)

    def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting, not a bug of ours
            logger.debug("ws-relay %s: dropped a non-JSON frame", self.url)
            return
        if not isinstance(message, dict):
            logger.debug("ws-relay %s: dropped a non-object frame", self.url)
            return
        topic = message.get("topic")
        payload = message.get("payload")
        if not isinstance(topic, str) or not isinstance(payload, str | dict | list):
            logger.debug("ws-relay %s: dropped a frame without topic/payload", self.url)
            return
        if topic not in self._topics:
            logger.debug("ws-relay %s: dropped a message for unsubscribed topic %s", self.url, topic)
            return
        text_payload = payload if isinstance(payload, str) else _compact(payload)
        deliver_topic_message(self._handler, topic, text_payload, self.url)


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
