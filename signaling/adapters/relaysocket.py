"""One reconnecting WebSocket to one relay URL, shared by the ws-relay, Nostr and tracker adapters.

The adapters only build and parse their JSON messages; this module owns the socket: it connects in
the background, reconnects with capped, jittered exponential backoff (trystero-wire §6.6: a random
fraction of a period that starts at 3333 ms and doubles up to 60 s, reset on a successful open) and
hands every inbound text frame to the adapter.

Lifecycle of one connection:

1. the socket opens; the backoff is reset;
2. a reader task starts (owned by the connection, reaped when it ends), so that ``on_open`` may
   await replies (Nostr ``EOSE``) that the reader resolves;
3. ``on_open(socket)`` re-sends the adapter's subscriptions;
4. ``connected`` becomes true and stays true until the socket closes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.protocol import State

from signaling.adapters.reconnect import ReconnectLoop
from signaling.base import Backoff, TopicHandler

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_SECONDS = 10.0
"""Bound on TCP connect + TLS + WebSocket handshake."""
PING_INTERVAL_SECONDS = 20.0
"""Keep-alive ping period; a relay that stops answering is detected within interval + timeout."""
PING_TIMEOUT_SECONDS = 20.0
CLOSE_TIMEOUT_SECONDS = 2.0
"""Bound on the closing handshake when we close a socket."""
MAX_MESSAGE_BYTES = 1 << 20
"""Largest inbound frame accepted; signalling messages are a few KiB (SDP included)."""

SOCKET_BACKOFF_BASE_SECONDS = 3.333
SOCKET_BACKOFF_CAP_SECONDS = 60.0


def default_socket_backoff() -> Backoff:
    """Trystero's relay-socket reconnect schedule (trystero-wire §6.6, §10)."""
    return Backoff(base_seconds=SOCKET_BACKOFF_BASE_SECONDS, cap_seconds=SOCKET_BACKOFF_CAP_SECONDS)


def check_websocket_url(url: str) -> None:
    """Raise ValueError unless `url` is a ``ws://`` or ``wss://`` URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        msg = f"not a ws:// or wss:// URL: {url!r}"
        raise ValueError(msg)


class RelaySocket:
    """A WebSocket to one relay that reconnects by itself until closed.

    Args:
        url: ``ws://`` or ``wss://`` URL of the relay.
        backoff: reconnect schedule; Trystero's (§6.6) when None.
        on_open: awaited after each successful open, before ``connected`` turns true; re-sends
            subscriptions. Failures of the socket inside it count as a lost connection.
        on_text: called with every inbound text frame (binary frames are dropped); must not block.
        on_close: called after each connection ended (also a failed ``on_open``); must not block.
        open_timeout_seconds: bound on one connection attempt.
        max_message_bytes: largest inbound frame accepted.
    """

    def __init__(
        self,
        url: str,
        *,
        backoff: Backoff | None = None,
        on_open: Callable[[ClientConnection], Awaitable[None]],
        on_text: Callable[[str], None],
        on_close: Callable[[], None] | None = None,
        open_timeout_seconds: float = OPEN_TIMEOUT_SECONDS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        check_websocket_url(url)
        self.url = url
        self._backoff = backoff if backoff is not None else default_socket_backoff()
        self._on_open = on_open
        self._on_text = on_text
        self._on_close = on_close
        self._open_timeout_seconds = open_timeout_seconds
        self._max_message_bytes = max_message_bytes
        self._socket: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self._loop = ReconnectLoop(f"relay {url}", self._connect_once, self._backoff,
                                   (OSError, TimeoutError, InvalidHandshake, ConnectionClosed))
        self.connections = 0
        """How many times a connection was opened (tests and metrics)."""

    @property
    def connected(self) -> bool:
        """True while the socket is open and ``on_open`` has completed."""
        return self._ready.is_set()

    @property
    def socket(self) -> ClientConnection | None:
        """The open socket (also during ``on_open``), else None."""
        return self._socket

    async def start(self) -> None:
        """Start connecting in the background; returns at once. Idempotent."""
        self._loop.start()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for ``connected``; returns it."""
        return await wait_event(self._ready, timeout)

    async def wait_disconnected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no socket is open; True when none is."""
        return await wait_event(self._down, timeout)

    async def send_text(self, text: str) -> bool:
        """Send one text frame on the open socket (also during ``on_open``).

        Returns:
            False when no socket is open or it closed during the send; the frame is dropped.
        """
        socket = self._socket
        if socket is None:
            return False
        try:
            await socket.send(text)
        except ConnectionClosed:
            # why: the reader sees the same close and drives the reconnect; callers only need False.
            return False
        return True

    async def close(self) -> None:
        """Stop reconnecting, close the socket and wait for the task.

        Idempotent; concurrent callers wait for the first close.
        """
        await self._loop.close()

    async def _connect_once(self) -> None:
        async with connect(
            self.url,
            open_timeout=self._open_timeout_seconds,
            ping_interval=PING_INTERVAL_SECONDS,
            ping_timeout=PING_TIMEOUT_SECONDS,
            close_timeout=CLOSE_TIMEOUT_SECONDS,
            max_size=self._max_message_bytes,
            proxy=None,  # never route relay traffic through an environment proxy
        ) as socket:
            self._socket = socket
            self._down.clear()
            self.connections += 1
            self._backoff.reset()
            logger.info("relay %s: connected", self.url)
            # The reader runs while on_open awaits replies; it is owned here and always reaped.
            reader = asyncio.get_running_loop().create_task(
                self._read(socket), name=f"signaling[{self.url}].reader"
            )
            try:
                await self._on_open(socket)
                if socket.state is State.OPEN and not reader.done():
                    self._ready.set()
                await reader
            finally:
                reader.cancel()
                await asyncio.wait({reader})
                if not reader.cancelled():
                    failure = reader.exception()
                    if failure is not None and failure is not sys.exception():
                        # why: otherwise a reader bug hidden behind an on_open failure is lost.
                        logger.error("relay %s: reader failed", self.url, exc_info=failure)
                self._socket = None
                self._ready.clear()
                self._down.set()
                if self._on_close is not None:
                    self._on_close()
                logger.info("relay %s: disconnected", self.url)

    async def _read(self, socket: ClientConnection) -> None:
        try:
            async for message in socket:
                if isinstance(message, str):
                    self._on_text(message)
                else:
                    logger.debug("relay %s: dropped a binary frame of %d bytes", self.url, len(message))
        except ConnectionClosed as exc:
            # why: an abnormal close ends this connection like a normal one; _run reconnects.
            logger.debug("relay %s: closed: %s", self.url, exc)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `event`; returns whether it is set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def deliver_topic_message(handler: TopicHandler | None, topic: str, payload: str, url: str) -> None:
    """Call a topic relay's handler, containing its failures.

    A failing consumer must not end the relay's reader; it is a bug, so it is logged with its
    traceback at ERROR.
    """
    if handler is None:
        logger.debug("relay %s: no handler; dropped a message on %s", url, topic)
        return
    try:
        handler(topic, payload)
    except Exception:
        logger.exception("relay %s: topic handler failed", url)


class SocketAdapter:
    """What every WebSocket relay adapter shares: one :class:`RelaySocket` and its lifecycle.

    Subclasses implement ``_on_open(socket)`` and ``_on_text(text)``, and may pass `on_close`.
    """

    def __init__(self, url: str, *, backoff: Backoff | None = None,
                 open_timeout_seconds: float = OPEN_TIMEOUT_SECONDS, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 on_close: Callable[[], None] | None = None) -> None:
        self.url = url
        self._socket = RelaySocket(url, backoff=backoff, on_open=self._on_open, on_text=self._on_text,
                                   on_close=on_close, open_timeout_seconds=open_timeout_seconds,
                                   max_message_bytes=max_message_bytes)

    async def _on_open(self, socket: ClientConnection) -> None:
        raise NotImplementedError

    def _on_text(self, text: str) -> None:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        """True while the socket is open (and, for topic relays, the subscriptions were restored)."""
        return self._socket.connected

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        await self._socket.start()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the connection; True when connected."""
        return await self._socket.wait_connected(timeout)

    async def wait_disconnected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until the socket is down; True when it is."""
        return await self._socket.wait_disconnected(timeout)

    async def close(self) -> None:
        """Close the socket and stop reconnecting. Idempotent."""
        await self._socket.close()


class TopicSocketAdapter(SocketAdapter):
    """A topic relay over one WebSocket: remembered subscriptions and an inbound handler."""

    _handler: TopicHandler | None
    _topics: dict[str, None]
    """Ordered set: restored in subscription order after a reconnect."""

    def set_handler(self, handler: TopicHandler) -> None:
        """Set the callback for inbound (topic, payload_text); it must not block."""
        self._handler = handler

    @property
    def topics(self) -> tuple[str, ...]:
        """The remembered subscriptions, in subscription order."""
        return tuple(self._topics)
