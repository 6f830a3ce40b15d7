"""Nostr (NIP-01) topic relay with BIP-340 signed ephemeral events (trystero-wire §6.3, §3.1).

* Publish: ``["EVENT", {kind, tags: [["x", topic]], created_at, content, pubkey, id, sig}]`` where
  ``kind`` is the topic's ephemeral kind (20000-29999, so relays forward but do not store), ``id`` is
  the SHA-256 of the compact JSON ``[0, pubkey, created_at, kind, tags, content]`` and ``sig`` the
  BIP-340 Schnorr signature of the 32-byte id.
* Subscribe: the relay's topics are batched into filters of at most 250 topics
  ``{"kinds": [...], "since": now, "#x": [...]}``, one REQ per batch with a stable 64-character
  subscription id. A batch's REQ is re-sent when its topics change and after every reconnect;
  ids no longer needed are closed with ``["CLOSE", id]``. The relay's ``EOSE`` acknowledges a REQ.
* Receive: only ``["EVENT", subId, event]`` for one of our subscription ids; the topic is the first
  ``x`` tag and must be subscribed; an event id already delivered recently is dropped. Like
  Trystero, signatures and kinds are not verified (the
  payloads are end-to-end encrypted by the strategy).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

from coincurve import PrivateKey
from websockets.asyncio.client import ClientConnection

from signaling.adapters.relaysocket import (
    MAX_MESSAGE_BYTES,
    OPEN_TIMEOUT_SECONDS,
    TopicSocketAdapter,
    deliver_topic_message,
)
from signaling.base import Backoff, TopicHandler
from signaling.protocol.names import gen_id, nostr_kind

logger = logging.getLogger(__name__)

MAX_TOPICS_PER_FILTER = 250
"""Topics per REQ filter (trystero-wire §6.3)."""
SUBSCRIPTION_ID_CHARS = 64
SUBSCRIBE_ACK_TIMEOUT_SECONDS = 5.0
"""Bound on waiting for the relay's EOSE after a REQ."""
TOPIC_TAG = "x"
RECENT_EVENT_IDS = 2048
"""Event ids remembered to drop repeats: a re-sent REQ makes relays that store ephemeral events
(nostr-relay does) replay the events of the current second."""

__all__ = ["NostrRelay", "build_event", "event_id", "nostr_kind", "process_key"]


def _compact(value: Any) -> str:
    # NIP-01 serialisation: no whitespace, UTF-8 kept as is (not \\u-escaped).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def event_id(pubkey: str, created_at: int, kind: int, tags: list[list[str]], content: str) -> str:
    """NIP-01 event id: lower-hex SHA-256 of ``[0, pubkey, created_at, kind, tags, content]``."""
    serialised = _compact([0, pubkey, created_at, kind, tags, content])
    return hashlib.sha256(serialised.encode("utf-8", "surrogatepass")).hexdigest()


def build_event(key: PrivateKey, topic: str, content: str, created_at: int) -> dict[str, Any]:
    """A signed ephemeral event carrying `content` on `topic`, keys in Trystero's order.

    Args:
        key: the signing key; its x-only public key is the event's ``pubkey``.
        topic: the topic, sent as the ``x`` tag and hashed into the kind.
        content: the signalling JSON text.
        created_at: whole Unix seconds.
    """
    pubkey = key.public_key_xonly.format().hex()
    kind = nostr_kind(topic)
    tags = [[TOPIC_TAG, topic]]
    identifier = event_id(pubkey, created_at, kind, tags, content)
    signature = key.sign_schnorr(bytes.fromhex(identifier), os.urandom(32))
    return {
        "kind": kind,
        "tags": tags,
        "created_at": created_at,
        "content": content,
        "pubkey": pubkey,
        "id": identifier,
        "sig": signature.hex(),
    }


_process_key: PrivateKey | None = None
_process_key_lock = threading.Lock()


def process_key() -> PrivateKey:
    """The key shared by every `NostrRelay` of this process that was not given one.

    Trystero keeps one key pair per page load (§6.3). Created on first use.
    """
    global _process_key  # noqa: PLW0603 - one lazily created key per process, by design
    with _process_key_lock:
        if _process_key is None:
            _process_key = PrivateKey()
        return _process_key


def _as_private_key(value: PrivateKey | bytes | str | None) -> PrivateKey:
    if value is None:
        return process_key()
    if isinstance(value, PrivateKey):
        return value
    if isinstance(value, str):
        return PrivateKey(bytes.fromhex(value))
    return PrivateKey(value)


class NostrRelay(TopicSocketAdapter):
    """`TopicRelay` adapter for one Nostr relay.

    Args:
        url: ``ws://`` or ``wss://`` URL of the relay.
        backoff: reconnect schedule; Trystero's relay-socket schedule (§6.6) when None.
        private_key: signing key (a `coincurve.PrivateKey`, 32 raw bytes or 64 hex characters);
            the per-process key from `process_key()` when None.
        clock: Unix time in seconds, for ``created_at`` and the filters' ``since``.
        subscribe_ack_timeout_seconds: bound on waiting for ``EOSE`` in `subscribe`.
        open_timeout_seconds: bound on one connection attempt.
        max_message_bytes: largest inbound frame accepted.
    """

    kind: Literal["topic"] = "topic"

    def __init__(
        self,
        url: str,
        *,
        backoff: Backoff | None = None,
        private_key: PrivateKey | bytes | str | None = None,
        clock: Callable[[], float] = time.time,
        subscribe_ack_timeout_seconds: float = SUBSCRIBE_ACK_TIMEOUT_SECONDS,
        open_timeout_seconds: float = OPEN_TIMEOUT_SECONDS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._key = _as_private_key(private_key)
        self.pubkey = self._key.public_key_xonly.format().hex()
        """x-only public key, lower hex (the ``pubkey`` of our events)."""
        self._clock = clock
        self._ack_timeout = subscribe_ack_timeout_seconds
        self._handler: TopicHandler | None = None
        self._topics: dict[str, None] = {}  # ordered set, batched in subscription order
        self._subscription_ids: list[str] = []  # stable id of batch i
        self._sent: dict[str, tuple[str, ...]] = {}  # id -> topics of the REQ on this socket
        self._acks: dict[str, asyncio.Future[None]] = {}  # id -> resolved by EOSE
        self._recent: OrderedDict[str, None] = OrderedDict()  # event ids already delivered
        super().__init__(url, backoff=backoff, open_timeout_seconds=open_timeout_seconds,
                         max_message_bytes=max_message_bytes, on_close=self._on_close)

    @property
    def connected(self) -> bool:
        """True while the socket is open and the REQs were re-sent and acknowledged (bounded)."""
        return self._socket.connected

    async def subscribe(self, topic: str) -> None:
        """Remember `topic`; when connected, re-send its batch's REQ and wait for ``EOSE`` (bounded)."""
        if topic in self._topics:
            return
        self._topics[topic] = None
        await self._synchronise(wait=True)

    async def unsubscribe(self, topic: str) -> None:
        """Forget `topic`; re-send the changed REQs and close ids that are no longer needed."""
        if topic in self._topics:
            del self._topics[topic]
            await self._synchronise(wait=False)

    async def publish(self, topic: str, payload: str) -> bool:
        """Publish `payload` as a signed event on `topic`; False (dropped) while disconnected."""
        if not self._socket.connected:
            return False
        event = build_event(self._key, topic, payload, int(self._clock()))
        logger.debug("nostr %s: EVENT %s kind %d", self.url, event["id"], event["kind"])
        return await self._socket.send_text(_compact(["EVENT", event]))

    def _plan(self) -> tuple[list[str], list[str]]:
        """Bring `_sent` up to date with the topics; return the frames to send and the ids to await.

        Synchronous on purpose: concurrent callers each send only what changed since the other
        planned, and every frame is planned exactly once per socket.
        """
        topics = list(self._topics)
        batches = [
            tuple(topics[i : i + MAX_TOPICS_PER_FILTER])
            for i in range(0, len(topics), MAX_TOPICS_PER_FILTER)
        ]
        while len(self._subscription_ids) < len(batches):
            self._subscription_ids.append(gen_id(SUBSCRIPTION_ID_CHARS))
        frames: list[str] = []
        awaited: list[str] = []
        since = int(self._clock())
        for subscription_id, batch in zip(self._subscription_ids, batches, strict=False):
            if self._sent.get(subscription_id) == batch:
                continue
            self._sent[subscription_id] = batch
            kinds = list(dict.fromkeys(nostr_kind(topic) for topic in batch))
            query = {"kinds": kinds, "since": since, "#x": list(batch)}
            frames.append(_compact(["REQ", subscription_id, query]))
            awaited.append(subscription_id)
        for subscription_id in self._subscription_ids[len(batches) :]:
            if self._sent.pop(subscription_id, None) is not None:
                frames.append(_compact(["CLOSE", subscription_id]))
        return frames, awaited

    async def _synchronise(self, *, wait: bool) -> None:
        if self._socket.socket is None:
            return  # on_open re-sends everything after the next connect
        frames, awaited = self._plan()
        loop = asyncio.get_running_loop()
        acks = [self._acks.setdefault(sid, loop.create_future()) for sid in awaited]
        for frame in frames:
            if not await self._socket.send_text(frame):
                return  # the socket closed; on_open re-sends after the reconnect
        if wait and acks:
            done, _ = await asyncio.wait(acks, timeout=self._ack_timeout)
            if len(done) < len(acks):
                logger.warning("nostr %s: no EOSE within %.1f s", self.url, self._ack_timeout)

    async def _on_open(self, socket: ClientConnection) -> None:
        self._sent.clear()
        await self._synchronise(wait=True)

    def _on_close(self) -> None:
        self._sent.clear()
        # Nothing will acknowledge the REQs of a closed socket: release their waiters now.
        for ack in self._acks.values():
            if not ack.done():
                ack.set_result(None)
        self._acks.clear()

    def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting, not a bug of ours
            logger.debug("nostr %s: dropped a non-JSON frame", self.url)
            return
        if not isinstance(message, list) or not message or not isinstance(message[0], str):
            logger.debug("nostr %s: dropped a malformed frame", self.url)
            return
        verb = message[0]
        if verb == "EVENT" and len(message) >= 3:
            self._on_event(message[1], message[2])
        elif verb == "EOSE" and len(message) >= 2:
            ack = self._acks.pop(message[1], None) if isinstance(message[1], str) else None
            if ack is not None and not ack.done():
                ack.set_result(None)
        elif verb == "OK" and len(message) >= 3:
            if message[2] is not True:
                reason = str(message[3]) if len(message) >= 4 else ""
                # Two identical announcements in one second share an id; relays reject the
                # second as a duplicate, which is harmless (§6.3).
                level = logging.DEBUG if reason.startswith("duplicate:") else logging.WARNING
                logger.log(level, "nostr %s: event %s rejected: %s", self.url, message[1], reason)
        elif verb == "NOTICE":
            logger.warning("nostr %s: NOTICE %s", self.url, message[1:])
        elif verb == "CLOSED":
            logger.warning("nostr %s: subscription closed by the relay: %s", self.url, message[1:])
            if len(message) >= 2 and isinstance(message[1], str):
                ack = self._acks.pop(message[1], None)
                if ack is not None and not ack.done():
                    ack.set_result(None)
        else:
            logger.debug("nostr %s: ignored %s", self.url, verb)

    def _on_event(self, subscription_id: object, event: object) -> None:
        if not isinstance(subscription_id, str) or subscription_id not in self._sent:
            logger.debug("nostr %s: EVENT for a foreign subscription", self.url)
            return
        if not isinstance(event, dict) or not isinstance(event.get("content"), str):
            logger.debug("nostr %s: dropped a malformed event", self.url)
            return
        tags = event.get("tags")
        topic = None
        if isinstance(tags, list):
            for tag in tags:
                if isinstance(tag, list) and len(tag) >= 2 and tag[0] == TOPIC_TAG:
                    topic = tag[1]
                    break
        if not isinstance(topic, str) or topic not in self._topics:
            logger.debug("nostr %s: dropped an event for an unsubscribed topic", self.url)
            return
        identifier = event.get("id")
        if isinstance(identifier, str):
            if identifier in self._recent:
                logger.debug("nostr %s: dropped a repeated event %s", self.url, identifier)
                return
            self._recent[identifier] = None
            if len(self._recent) > RECENT_EVENT_IDS:
                self._recent.popitem(last=False)
        deliver_topic_message(self._handler, topic, event["content"], self.url)
