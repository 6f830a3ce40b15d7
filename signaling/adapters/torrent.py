"""WebSocket connection to one WebTorrent tracker (trystero-wire §6.4).

This adapter only moves JSON objects: `send` writes an announce or an answer as one text frame, and
every JSON *object* the tracker sends goes to the handler. Building announces (``info_hash``,
``peer_id``, ``numwant``, ``offers``), answering forwarded offers (``to_peer_id``), glare and
de-duplication belong to the Trystero strategy.

Trackers forget a peer when its socket closes, so after a reconnect nothing is re-sent here: the
strategy's announce cadence (every 10 s, §6.4) re-registers the peer on the next tick.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection

from signaling.adapters.relaysocket import MAX_MESSAGE_BYTES, OPEN_TIMEOUT_SECONDS, SocketAdapter
from signaling.base import Backoff, TrackerHandler

logger = logging.getLogger(__name__)


class TrackerClient(SocketAdapter):
    """`TrackerRelay` adapter for one WebTorrent tracker.

    Args:
        url: ``ws://`` or ``wss://`` URL of the tracker.
        backoff: reconnect schedule; Trystero's relay-socket schedule (§6.6) when None.
        open_timeout_seconds: bound on one connection attempt.
        max_message_bytes: largest inbound frame accepted.

    Frames that are not JSON objects are dropped (logged at DEBUG).
    """

    kind: Literal["tracker"] = "tracker"

    def __init__(self, url: str, *, backoff: Backoff | None = None, open_timeout_seconds: float = OPEN_TIMEOUT_SECONDS,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._handler: TrackerHandler | None = None
        super().__init__(url, backoff=backoff, open_timeout_seconds=open_timeout_seconds,
                         max_message_bytes=max_message_bytes)

    def set_handler(self, handler: TrackerHandler) -> None:
        """Set the callback for every JSON object the tracker sends; it must not block."""
        self._handler = handler

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one JSON object (announce / answer) as compact JSON; False while disconnected."""
        if not self._socket.connected:
            return False
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        return await self._socket.send_text(text)

    async def _on_open(self, socket: ClientConnection) -> None:
        """Nothing to restore: the strategy re-announces on its own cadence."""

    def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting, not a bug of ours
            logger.debug("tracker %s: dropped a non-JSON frame", self.url)
            return
        if not isinstance(message, dict):
            logger.debug("tracker %s: dropped a non-object frame", self.url)
            return
        if self._handler is None:
            logger.debug("tracker %s: no handler; dropped %s", self.url, message.get("action"))
            return
        try:
            self._handler(message)
        except Exception:
            # why: a failing consumer must not end the tracker's reader; it is a bug, so log it.
            logger.exception("tracker %s: handler failed", self.url)
