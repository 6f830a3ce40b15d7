"""Relay adapter interfaces shared by every signaling transport, plus reconnect backoff.

Two kinds of relay exist (trystero-wire §5, §6):

* topic relays (``mqtt``, ``nostr``, ``ws-relay``, ``memory``): plain publish/subscribe of UTF-8 text on
  named topics. One adapter instance = one relay URL. The Trystero topic strategy holds one adapter
  per URL and replies on the relay a message arrived on.
* tracker relays (``torrent``): the WebTorrent "announce with offers" protocol (trystero-wire §6.4).

Adapters reconnect on their own with capped, jittered exponential backoff and re-subscribe their
topics after a reconnect. Inbound messages go to a handler set by the owner; a handler must not block.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


class SignalingError(Exception):
    """Root of signaling errors (the package is independent of meshnode.errors)."""


class RelayUnavailable(SignalingError):
    """A relay cannot be reached (yet); adapters keep retrying in the background."""


TopicHandler = Callable[[str, str], None]
"""Called with (topic, payload_text) for every message received on a subscribed topic."""

TrackerHandler = Callable[[dict[str, Any]], None]
"""Called with every parsed JSON object a tracker sends."""


@runtime_checkable
class TopicRelay(Protocol):
    """One connection to one publish/subscribe relay URL.

    Lifecycle: ``await relay.start()`` begins connecting in the background and returns at once (a
    dead relay must not block the others); ``await relay.close()`` is idempotent.
    """

    kind: Literal["topic"]
    url: str

    def set_handler(self, handler: TopicHandler) -> None: ...

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the connection; True when connected."""
        ...

    async def subscribe(self, topic: str) -> None:
        """Subscribe and, when connected, wait until the relay confirmed it (or a short bound).

        The topic is remembered and re-subscribed after every reconnect.
        """
        ...

    async def unsubscribe(self, topic: str) -> None: ...

    async def publish(self, topic: str, payload: str) -> bool:
        """Publish UTF-8 text; returns False (and drops it) while disconnected."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class TrackerRelay(Protocol):
    """One WebSocket connection to one WebTorrent tracker (trystero-wire §6.4)."""

    kind: Literal["tracker"]
    url: str

    def set_handler(self, handler: TrackerHandler) -> None: ...

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...

    async def wait_connected(self, timeout: float) -> bool: ...

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one JSON object (announce / answer); False while disconnected."""
        ...

    async def close(self) -> None: ...


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter (delay = uniform(0, min(cap, base * 2**n)))."""

    base_seconds: float = 1.0
    cap_seconds: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * (2**self.failures))
        self.failures = min(self.failures + 1, 32)
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0

