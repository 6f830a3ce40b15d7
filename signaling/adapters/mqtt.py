"""MQTT topic relay over WebSocket or TCP (trystero-wire §6.2), on aiomqtt 2.x (paho-mqtt).

What Trystero's MQTT strategy (mqtt.js 5) does, and this adapter matches: MQTT 3.1.1 with the
clean-session flag, QoS 0, retain false, a client id ``<prefix>`` + 8 hex characters, credentials
from the URL's userinfo, topics that are the bare b36 topic strings, UTF-8 JSON payloads. Brokers
echo our own publishes (3.1.1 has no "no-local"), so the strategy drops its own messages.

URLs: ``ws://`` / ``wss://`` (MQTT over WebSocket; the path is taken from the URL and defaults to
``/``, as mqtt.js does, so ``wss://broker.emqx.io:8084/mqtt`` and ``wss://public.cloud.shiftr.io``
both work), ``mqtt://`` / ``tcp://`` (plain TCP, port 1883) and ``mqtts://`` / ``ssl://`` (TLS,
port 8883).

aiomqtt 2.x does not reconnect by itself: one background task runs a connect → re-subscribe →
read loop and reconnects with `Backoff` (mqtt.js retries every second; here the first retry comes
after up to 1 s, doubling up to 60 s while the broker stays down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import AsyncIterator
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiomqtt import ProtocolVersion

from signaling.adapters.reconnect import ReconnectLoop
from signaling.adapters.relaysocket import deliver_topic_message, wait_event
from signaling.base import Backoff, TopicHandler

logger = logging.getLogger(__name__)
_paho_logger = logging.getLogger(f"{__name__}.paho")

DEFAULT_PORTS = {"ws": 80, "wss": 443, "mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}
TLS_SCHEMES = frozenset({"wss", "mqtts", "ssl"})
WEBSOCKET_SCHEMES = frozenset({"ws", "wss"})
CLIENT_ID_PREFIX = "meshnode_"
KEEPALIVE_SECONDS = 60
"""MQTT keep-alive (mqtt.js default)."""
OPERATION_TIMEOUT_SECONDS = 10.0
"""Bound on CONNACK, UNSUBACK and a publish."""
SUBSCRIBE_ACK_TIMEOUT_SECONDS = 5.0
"""Bound on waiting for SUBACK in `MqttRelay.subscribe`."""
MAX_QUEUED_INCOMING_MESSAGES = 4096
"""aiomqtt's inbound queue bound (drained at once into the handler); overflow is dropped and logged."""
DISCONNECT_TIMEOUT_SECONDS = 2.0
"""Bound on the graceful DISCONNECT when the connection ends."""
MQTT_BACKOFF_BASE_SECONDS = 1.0
MQTT_BACKOFF_CAP_SECONDS = 60.0
_FORBIDDEN_TOPIC_CHARS = frozenset("+#\0")
MAX_PAYLOAD_BYTES = 1 << 20
"""Largest PUBLISH payload decoded; signalling messages are a few KiB (same bound as relay sockets)."""


def default_mqtt_backoff() -> Backoff:
    """Reconnect schedule close to mqtt.js's 1 s period, backing off while a broker stays down."""
    return Backoff(base_seconds=MQTT_BACKOFF_BASE_SECONDS, cap_seconds=MQTT_BACKOFF_CAP_SECONDS)


def _check_topic(topic: str) -> None:
    if not topic or _FORBIDDEN_TOPIC_CHARS.intersection(topic):
        msg = f"not a plain MQTT topic name: {topic!r}"
        raise ValueError(msg)


class MqttRelay:
    """`TopicRelay` adapter for one MQTT broker.

    Args:
        url: broker URL (``ws``, ``wss``, ``mqtt``, ``tcp``, ``mqtts`` or ``ssl`` scheme), with
            optional ``user:password@`` userinfo (percent-decoded).
        backoff: reconnect schedule; `default_mqtt_backoff()` when None.
        client_id: MQTT client identifier; ``meshnode_`` + 8 random hex characters when None.
        keepalive_seconds: MQTT keep-alive.
        operation_timeout_seconds: bound on CONNACK, UNSUBACK and a publish.
        subscribe_ack_timeout_seconds: bound on waiting for SUBACK in `subscribe`.
        tls_context: TLS settings for ``wss`` / ``mqtts``; the system defaults when None.

    Raises:
        ValueError: the URL has an unknown scheme or no host.
    """

    kind: Literal["topic"] = "topic"

    def __init__(
        self,
        url: str,
        *,
        backoff: Backoff | None = None,
        client_id: str | None = None,
        keepalive_seconds: int = KEEPALIVE_SECONDS,
        operation_timeout_seconds: float = OPERATION_TIMEOUT_SECONDS,
        subscribe_ack_timeout_seconds: float = SUBSCRIBE_ACK_TIMEOUT_SECONDS,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            msg = f"not an MQTT URL (ws, wss, mqtt, tcp, mqtts, ssl): {url!r}"
            raise ValueError(msg)
        self.url = url
        self.client_id = client_id or CLIENT_ID_PREFIX + secrets.token_hex(4)
        self._hostname = parts.hostname
        self._port = parts.port or DEFAULT_PORTS[scheme]
        self._username = unquote(parts.username) if parts.username is not None else None
        self._password = unquote(parts.password) if parts.password is not None else None
        self._transport: Literal["tcp", "websockets"] = (
            "websockets" if scheme in WEBSOCKET_SCHEMES else "tcp"
        )
        self._websocket_path: str | None = None
        if self._transport == "websockets":
            path = parts.path or "/"
            self._websocket_path = f"{path}?{parts.query}" if parts.query else path
        self._tls_context: ssl.SSLContext | None = None
        if scheme in TLS_SCHEMES:
            self._tls_context = tls_context or ssl.create_default_context()
        self._keepalive_seconds = keepalive_seconds
        self._operation_timeout = operation_timeout_seconds
        self._ack_timeout = subscribe_ack_timeout_seconds
        self._backoff = backoff if backoff is not None else default_mqtt_backoff()
        self._handler: TopicHandler | None = None
        self._topics: dict[str, None] = {}  # ordered set, re-subscribed after every reconnect
        self._client: aiomqtt.Client | None = None
        self._ready = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self._loop = ReconnectLoop(f"mqtt {url}", self._connect_once, self._backoff, (aiomqtt.MqttError,))
        self.connections = 0
        """How many times a connection was established (tests and metrics)."""

    def set_handler(self, handler: TopicHandler) -> None:
        """Set the callback for inbound (topic, payload_text); it must not block."""
        self._handler = handler

    @property
    def connected(self) -> bool:
        """True while connected and the remembered topics were re-subscribed."""
        return self._ready.is_set()

    @property
    def topics(self) -> tuple[str, ...]:
        """The remembered subscriptions, in subscription order."""
        return tuple(self._topics)

    async def start(self) -> None:
        """Start connecting in the background; returns at once. Idempotent."""
        self._loop.start()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the connection; True when connected."""
        return await wait_event(self._ready, timeout)

    async def wait_disconnected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no connection is up; True when none is."""
        return await wait_event(self._down, timeout)

    async def subscribe(self, topic: str) -> None:
        """Remember `topic` and, when connected, subscribe with QoS 0 and wait for SUBACK (bounded).

        Raises:
            ValueError: `topic` is empty or contains an MQTT wildcard.
        """
        _check_topic(topic)
        self._topics[topic] = None
        client = self._client
        if client is None:
            return  # subscribed by the connection loop once connected
        try:
            await client.subscribe(topic, qos=0, timeout=self._ack_timeout)
        except aiomqtt.MqttError as exc:
            # why: the connection is failing; the reconnect re-subscribes every remembered topic.
            logger.warning("mqtt %s: subscribe failed: %s", self.url, exc)

    async def unsubscribe(self, topic: str) -> None:
        """Forget `topic` and, when connected, unsubscribe it."""
        self._topics.pop(topic, None)
        client = self._client
        if client is None:
            return
        try:
            await client.unsubscribe(topic, timeout=self._operation_timeout)
        except aiomqtt.MqttError as exc:
            # why: a failing connection forgets its subscriptions anyway (clean session).
            logger.debug("mqtt %s: unsubscribe failed: %s", self.url, exc)

    async def publish(self, topic: str, payload: str) -> bool:
        """Publish UTF-8 text with QoS 0, retain false; False (dropped) while disconnected.

        Raises:
            ValueError: `topic` is empty or contains an MQTT wildcard.
        """
        _check_topic(topic)
        client = self._client
        if client is None or not self._ready.is_set():
            return False
        try:
            await client.publish(
                topic, payload.encode(), qos=0, retain=False, timeout=self._operation_timeout
            )
        except aiomqtt.MqttError as exc:
            # why: QoS 0 makes no delivery promise; report the drop and let the loop reconnect.
            logger.debug("mqtt %s: publish failed: %s", self.url, exc)
            return False
        return True

    async def close(self) -> None:
        """Disconnect and stop reconnecting. Idempotent; concurrent callers wait for the first."""
        await self._loop.close()

    def _new_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._hostname,
            self._port,
            username=self._username,
            password=self._password,
            identifier=self.client_id,
            logger=_paho_logger,
            protocol=ProtocolVersion.V311,
            clean_session=True,
            transport=self._transport,
            timeout=self._operation_timeout,
            keepalive=self._keepalive_seconds,
            tls_context=self._tls_context,
            websocket_path=self._websocket_path,
            max_queued_incoming_messages=MAX_QUEUED_INCOMING_MESSAGES,
        )
        _close_sockets_of_failed_handshakes(client)
        _fail_connect_on_early_disconnect(client)
        return client

    async def _connect_once(self) -> None:
        client = self._new_client()
        async with _connection(client):
            self._client = client
            self._down.clear()
            self.connections += 1
            self._backoff.reset()
            logger.info("mqtt %s: connected as %s", self.url, self.client_id)
            try:
                topics = list(self._topics)
                if topics:
                    # One SUBSCRIBE for all remembered topics, QoS 0 (clean session: the broker
                    # forgot them with the old connection).
                    await client.subscribe([(topic, 0) for topic in topics], timeout=self._ack_timeout)
                self._ready.set()
                async for message in client.messages:
                    self._on_message(message)
            finally:
                self._client = None
                self._ready.clear()
                self._down.set()
                logger.info("mqtt %s: disconnected", self.url)

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        if topic not in self._topics:
            logger.debug("mqtt %s: dropped a message for unsubscribed topic %s", self.url, topic)
            return
        payload = message.payload
        if isinstance(payload, bytes | bytearray | str) and len(payload) > MAX_PAYLOAD_BYTES:
            # paho has already read it (MQTT allows 256 MB): at least do not decode or parse it.
            logger.debug("mqtt %s: dropped a %d-byte payload on %s", self.url, len(payload), topic)
            return
        if isinstance(payload, bytes | bytearray):
            try:
                text = bytes(payload).decode("utf-8")
            except UnicodeDecodeError:
                logger.debug("mqtt %s: dropped a non-UTF-8 payload on %s", self.url, topic)
                return
        elif isinstance(payload, str):
            text = payload
        else:
            logger.debug("mqtt %s: dropped a non-text payload on %s", self.url, topic)
            return
        deliver_topic_message(self._handler, topic, text, self.url)


@contextlib.asynccontextmanager
async def _connection(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
    """``async with client`` that also cleans up after a failed or cancelled connect.

    aiomqtt 2.x leaves paho's socket open (and its reader registered on the loop) when
    ``__aenter__`` times out waiting for CONNACK or is cancelled (close() during a connect), which
    surfaces later as "unclosed socket" warnings and callbacks on a dead connection.
    """
    try:
        await client.__aenter__()
    except BaseException:
        _abandon(client)
        raise
    try:
        yield client
    except BaseException as exc:
        client.timeout = DISCONNECT_TIMEOUT_SECONDS  # bounds aiomqtt's wait in a graceful disconnect
        try:
            await client.__aexit__(type(exc), exc, exc.__traceback__)
        except aiomqtt.MqttError:
            # why: a failed DISCONNECT must not replace a cancellation (close() or loop shutdown).
            if not isinstance(exc, asyncio.CancelledError):
                raise
        raise
    client.timeout = DISCONNECT_TIMEOUT_SECONDS
    await client.__aexit__(None, None, None)


def _abandon(client: aiomqtt.Client) -> None:
    """Close what a failed connect left behind (relies on aiomqtt 2.5 / paho-mqtt 2.2 internals)."""
    paho = getattr(client, "_client", None)
    close_socket = getattr(paho, "_sock_close", None)
    if paho is None or not callable(close_socket):
        return
    # Phase 2 (TCP/WebSocket up, waiting for CONNACK): close the socket through paho, whose
    # callbacks make aiomqtt remove its reader and stop its keep-alive task.
    close_socket()
    # Phase 1 (aiomqtt's executor thread still inside paho's blocking connect): the socket it
    # opens later belongs to nobody, so close it right away and keep it off the event loop.
    paho.on_socket_open = _close_late_socket
    paho.on_socket_register_write = None
    paho.on_socket_unregister_write = None


def _close_late_socket(client: object, userdata: object, sock: Any) -> None:  # noqa: ARG001
    sock.close()


def _close_sockets_of_failed_handshakes(client: aiomqtt.Client) -> None:
    """Make paho close its TCP socket when the TLS or WebSocket handshake on it fails.

    paho-mqtt 2.2's ``_create_socket`` opens the TCP connection, then wraps it for TLS and/or
    WebSocket; when a wrapper's handshake raises (a relay answering HTTP 404, a reset during the
    upgrade), the TCP socket is dropped unclosed and only the garbage collector closes it, with a
    ResourceWarning. Wraps the two (private) methods of this one paho instance.
    """
    paho = getattr(client, "_client", None)
    create_socket = getattr(paho, "_create_socket", None)
    create_connection = getattr(paho, "_create_socket_connection", None)
    if paho is None or not callable(create_socket) or not callable(create_connection):
        return
    opened: list[Any] = []

    def tracked_connection() -> Any:
        sock = create_connection()
        opened.append(sock)
        return sock

    def guarded_create_socket() -> Any:
        opened.clear()
        try:
            return create_socket()
        except BaseException:
            for sock in opened:
                sock.close()
            raise
        finally:
            opened.clear()

    paho._create_socket_connection = tracked_connection  # noqa: SLF001
    paho._create_socket = guarded_create_socket  # noqa: SLF001


def _fail_connect_on_early_disconnect(client: aiomqtt.Client) -> None:
    """Make a connection lost before CONNACK fail the connect at once.

    aiomqtt 2.5 ignores disconnects that happen before CONNACK (its ``_on_disconnect`` returns
    early), so a broker that closes the socket during the MQTT handshake - wrong protocol, a
    WebSocket endpoint that is not MQTT, a dying broker - costs a full operation timeout per
    attempt. Wraps this paho instance's ``on_disconnect`` to fail aiomqtt's (private) CONNACK future.
    """
    paho = getattr(client, "_client", None)
    original = getattr(paho, "on_disconnect", None)
    if paho is None or original is None or not hasattr(client, "_connected"):
        return

    loop = asyncio.get_running_loop()

    def fail_pending_connect() -> None:
        connected = client._connected  # noqa: SLF001
        if not connected.done():
            connected.set_exception(aiomqtt.MqttError("connection closed before CONNACK"))
            connected.exception()  # nobody may await it any more: do not log it as unretrieved

    def on_disconnect(*args: Any) -> None:
        original(*args)
        # paho may call this from aiomqtt's connect thread; futures belong to the loop's thread.
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(fail_pending_connect)

    paho.on_disconnect = on_disconnect
