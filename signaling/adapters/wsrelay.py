"""Trystero's ws-relay protocol (trystero-wire §6.1): the client adapter (the server is
:mod:`signaling.servers.wsrelay`).

Four JSON text frames make up the whole protocol:

* client → server ``{"type":"subscribe","topic":T}``, ``{"type":"unsubscribe","topic":T}`` and
  ``{"type":"publish","topic":T,"payload":P}`` (P is the signalling JSON *as a string*);
* server → client ``{"topic":T,"payload":P}``, delivered to every open subscriber of T **including
  the publisher**.

There are no acknowledgements, no authentication and no persistence. `WsRelayServer` is what the
tests run; `WsRelay` is the `TopicRelay` adapter.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection

from signaling.adapters.relaysocket import (
    MAX_MESSAGE_BYTES,
    OPEN_TIMEOUT_SECONDS,
    TopicSocketAdapter,
    deliver_topic_message,
)
from signaling.base import Backoff, TopicHandler

logger = logging.getLogger(__name__)

MAX_TOPIC_CHARS = 256
"""Longest topic the server accepts (Trystero topics are 20-40 characters)."""
MAX_TOPICS_PER_CONNECTION = 1024
"""Subscriptions one socket may hold on the server; further subscribes are ignored."""


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class WsRelay(TopicSocketAdapter):
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

    def __init__(self, url: str, *, backoff: Backoff | None = None, open_timeout_seconds: float = OPEN_TIMEOUT_SECONDS,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._handler: TopicHandler | None = None
        self._topics: dict[str, None] = {}
        self._sent: set[str] = set()  # topics subscribed on the current socket
        super().__init__(url, backoff=backoff, open_timeout_seconds=open_timeout_seconds,
                         max_message_bytes=max_message_bytes, on_close=self._sent.clear)

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

    async def _send_subscribe(self, topic: str) -> None:
        # Bookkeeping happens before the await, so on_open and a concurrent subscribe never send
        # the same topic twice on one socket (§6.1: once per topic per socket).
        if self._socket.socket is None or topic in self._sent:
            return
        self._sent.add(topic)
        if not await self._socket.send_text(_compact({"type": "subscribe", "topic": topic})):
            self._sent.discard(topic)

    async def _on_open(self, socket: ClientConnection) -> None:
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
