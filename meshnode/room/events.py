"""Membership events of one room: join/leave callbacks, the event queue, join errors, waiters."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from meshnode.room.actions import PeerEvent
from meshnode.room.errors import RoomClosed
from meshnode.room.mailbox import Mailbox

__all__ = ["JoinErrorCallback", "Membership", "PeerCallback"]

logger = logging.getLogger(__name__)

MAX_JOIN_ERRORS = 64

JoinErrorCallback = Callable[[str, str], None]
PeerCallback = Callable[[str], None]


class Membership:
    """Who gets told about joins, leaves and join errors, and how (callbacks, a queue, waiters)."""

    def __init__(self, event_queue_size: int) -> None:
        self.join_errors: deque[tuple[str, str]] = deque(maxlen=MAX_JOIN_ERRORS)
        """Recent (peer_id, reason) join errors: wrong password, handshake timeout, …"""
        self.events: Mailbox[PeerEvent] = Mailbox(event_queue_size, "peer events", drop_oldest=True)
        self._join: list[PeerCallback] = []
        self._leave: list[PeerCallback] = []
        self._error: list[JoinErrorCallback] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def on_join(self, callback: PeerCallback, joined: list[str]) -> Callable[[], None]:
        self._join.append(callback)
        for peer_id in joined:
            _call(callback, peer_id)
        return lambda: self._join.remove(callback)

    def on_leave(self, callback: PeerCallback) -> Callable[[], None]:
        self._leave.append(callback)
        return lambda: self._leave.remove(callback)

    def on_error(self, callback: JoinErrorCallback) -> Callable[[], None]:
        self._error.append(callback)
        return lambda: self._error.remove(callback)

    def join_error(self, peer_id: str, reason: str) -> None:
        self.join_errors.append((peer_id, reason))
        for callback in list(self._error):
            _call(callback, peer_id, reason)

    def emit(self, kind: Literal["join", "leave"], peer_id: str, joined: int) -> None:
        """Tell everyone that `peer_id` joined or left; `joined` peers are in the room now."""
        self.events.put(PeerEvent(kind=kind, peer_id=peer_id))
        for callback in list(self._join if kind == "join" else self._leave):
            _call(callback, peer_id)
        if kind == "join":
            for count, waiter in self._waiters:
                if joined >= count and not waiter.done():
                    waiter.set_result(None)

    async def wait_for(self, count: int, timeout: float) -> None:
        """Wait until a join brings the room to `count` peers (TimeoutError after `timeout`)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (count, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def close(self) -> None:
        self.events.close()
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RoomClosed("the room was left"))
        self._waiters.clear()


def _call(callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:  # an application callback must not break the room
        logger.exception("room callback failed")
