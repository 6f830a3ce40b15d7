"""In-process publish/subscribe hub: a deterministic, socket-free topic relay for tests.

:class:`MemoryRelay` implements :class:`signaling.base.TopicRelay` over a :class:`MemoryHub`.
Like real relays it echoes a publication to the publisher too (trystero-wire §5.1 item 5), and
deliveries are asynchronous (scheduled on the event loop, in publication order), so a publisher
never re-enters its own handler. A test can cut a relay off (:meth:`MemoryRelay.disconnect`) and
bring it back (:meth:`MemoryRelay.reconnect`): while disconnected it neither sends nor receives,
and after reconnecting it has its subscriptions again, as the real adapters re-subscribe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import ClassVar, Literal

from signaling.base import TopicHandler

__all__ = ["MemoryHub", "MemoryRelay"]

logger = logging.getLogger(__name__)


class MemoryHub:
    """Routes publications to every connected relay subscribed to the topic.

    Attributes:
        published: every (url, topic, payload) accepted so far, for assertions in tests.
        drop: optional predicate ``(url, topic, payload) -> bool``; True drops a publication
            (loss injection).
    """

    _named: ClassVar[dict[str, MemoryHub]] = {}

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._relays: set[MemoryRelay] = set()
        self.published: list[tuple[str, str, str]] = []
        self.drop: Callable[[str, str, str], bool] | None = None

    @classmethod
    def named(cls, name: str) -> MemoryHub:
        """The process-wide hub called `name` (used for ``memory://<name>`` URLs)."""
        hub = cls._named.get(name)
        if hub is None:
            hub = cls._named[name] = cls(name)
        return hub

    def relay(self, url: str | None = None) -> MemoryRelay:
        """A new relay adapter attached to this hub."""
        return MemoryRelay(url or f"memory://{self.name or id(self)}", hub=self)

    def attach(self, relay: MemoryRelay) -> None:
        self._relays.add(relay)

    def detach(self, relay: MemoryRelay) -> None:
        self._relays.discard(relay)

    def route(self, sender: MemoryRelay, topic: str, payload: str) -> None:
        self.published.append((sender.url, topic, payload))
        if self.drop is not None and self.drop(sender.url, topic, payload):
            return
        loop = asyncio.get_running_loop()
        for relay in list(self._relays):
            if relay.connected and relay.subscribed(topic):
                loop.call_soon(relay.deliver, topic, payload)


class MemoryRelay:
    """A :class:`~signaling.base.TopicRelay` on a :class:`MemoryHub`.

    Args:
        url: informative; ``memory://NAME`` selects the process-wide hub ``NAME`` when `hub` is not
            given.
        hub: the hub to attach to.
    """

    kind: Literal["topic"] = "topic"

    def __init__(
        self,
        url: str = "memory://default",
        *,
        hub: MemoryHub | None = None,
        backoff: object = None,
    ) -> None:
        self.url = url
        if hub is None:
            name = url.split("://", 1)[1] if "://" in url else url
            hub = MemoryHub.named(name)
        self.hub = hub
        self._handler: TopicHandler | None = None
        self._topics: set[str] = set()
        self._connected = asyncio.Event()
        self._started = False
        self._closed = False
        self.subscribe_order: list[str] = []
        """Every topic passed to subscribe(), in call order (for tests)."""

    def set_handler(self, handler: TopicHandler) -> None:
        self._handler = handler

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        if self._started or self._closed:
            return
        self._started = True
        self.hub.attach(self)
        self._connected.set()

    async def wait_connected(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    def subscribed(self, topic: str) -> bool:
        return topic in self._topics

    async def subscribe(self, topic: str) -> None:
        self.subscribe_order.append(topic)
        self._topics.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)

    async def publish(self, topic: str, payload: str) -> bool:
        if not self.connected:
            return False
        self.hub.route(self, topic, payload)
        return True

    async def close(self) -> None:
        self._closed = True
        self._connected.clear()
        self.hub.detach(self)
        self._topics.clear()

    # -- test controls -----------------------------------------------------------------------------

    def disconnect(self) -> None:
        """Simulate a lost relay connection: nothing is sent or received until reconnect()."""
        self._connected.clear()

    def reconnect(self) -> None:
        """Simulate the adapter reconnecting (subscriptions are kept, as adapters re-subscribe)."""
        if not self._closed and self._started:
            self._connected.set()

    def deliver(self, topic: str, payload: str) -> None:
        if self._handler is None or not self.connected or topic not in self._topics:
            return
        try:
            self._handler(topic, payload)
        except Exception:  # a handler bug must not break delivery to other relays
            logger.exception("memory relay %s: handler failed", self.url)
