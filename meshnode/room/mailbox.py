"""Mailbox: the bounded receive queue behind every action and the room's event stream."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Generic, Literal, TypeVar

from meshnode.room.errors import RoomClosed

__all__ = ["ACTION_QUEUE_OVERFLOW", "Mailbox"]

logger = logging.getLogger(__name__)

ACTION_QUEUE_OVERFLOW: Literal["drop-newest"] = "drop-newest"
"""What a full per-action receive queue does with a new message (logged at WARNING)."""

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A bounded FIFO with one overflow policy (drop the newest, logged) and a closed state.

    Optionally also bounded per sender (`per_key_messages` / `per_key_bytes`): a message whose
    sender already has that much waiting is dropped, so one flooding peer fills only its own share
    and other peers' messages still get in.
    """

    def __init__(
        self,
        maxsize: int,
        what: str,
        *,
        per_key_messages: int = 0,
        per_key_bytes: int = 0,
        drop_oldest: bool = False,
    ) -> None:
        self._drop_oldest = drop_oldest
        """History queues (peer events) keep the newest items and drop quietly: a node that never
        reads `next_event()` must not log a warning for every hundred joins forever."""
        self._items: deque[tuple[T, str | None, int]] = deque()
        self._maxsize = maxsize
        self._what = what
        self._per_key_messages = per_key_messages
        self._per_key_bytes = per_key_bytes
        self._queued: dict[str, list[int]] = {}  # key -> [messages, bytes] waiting
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, item: T, *, key: str | None = None, size: int = 0) -> bool:
        if self._closed:
            return False
        queued = self._queued.get(key) if key is not None else None
        over_key = queued is not None and (
            (self._per_key_messages and queued[0] >= self._per_key_messages)
            or (self._per_key_bytes and queued[1] + size > self._per_key_bytes)
        )
        if self._drop_oldest and len(self._items) >= self._maxsize and not over_key:
            self._items.popleft()  # keys are not used with drop_oldest
            self.dropped += 1
        elif len(self._items) >= self._maxsize or over_key:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                logger.warning(
                    "%s queue is full (%s); %s policy dropped %d message(s) so far",
                    self._what,
                    f"sender {key}" if over_key else self._maxsize,
                    ACTION_QUEUE_OVERFLOW,
                    self.dropped,
                )
            return False
        self._items.append((item, key, size))
        if key is not None:
            entry = self._queued.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += size
        self._ready.set()
        return True

    def purge(self, key: str) -> int:
        """Drop every waiting message from `key` (a banned peer); returns how many."""
        if key not in self._queued:
            return 0
        kept = deque(entry for entry in self._items if entry[1] != key)
        dropped = len(self._items) - len(kept)
        self._items = kept
        del self._queued[key]
        if not self._items and not self._closed:
            self._ready.clear()
        return dropped

    def queued_by(self, key: str) -> int:
        """Messages from `key` waiting now."""
        entry = self._queued.get(key)
        return entry[0] if entry else 0

    async def get(self) -> T:
        while True:
            if self._items:
                item, key, size = self._items.popleft()
                if key is not None:
                    entry = self._queued[key]
                    entry[0] -= 1
                    entry[1] -= size
                    if entry[0] <= 0:
                        del self._queued[key]
                if not self._items and not self._closed:
                    self._ready.clear()
                return item
            if self._closed:
                raise RoomClosed(f"{self._what}: the room was left")
            await self._ready.wait()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)


MAX_BACKLOG_NAMES = 16
"""Unregistered action names whose early messages are kept until make_action() (P18)."""
MAX_BACKLOG_PER_NAME = 32


class Backlog(Generic[T]):
    """Early messages for actions nobody registered yet (P18), bounded by names, count and bytes.

    Items are ``(sender, item)``; the oldest of a name is dropped past MAX_BACKLOG_PER_NAME, and new
    ones are dropped (at debug) past MAX_BACKLOG_NAMES names or `max_bytes` in all.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._by_name: dict[str, deque[tuple[str, T, int]]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        """Action names with messages kept."""
        return len(self._by_name)

    @property
    def bytes(self) -> int:
        """Bytes kept now."""
        return self._bytes

    def keep(self, name: str, sender: str, item: T, size: int) -> None:
        backlog = self._by_name.get(name)
        if backlog is None:
            if len(self._by_name) >= MAX_BACKLOG_NAMES:
                logger.debug("dropping message for unknown action %r", name)
                return
            backlog = self._by_name[name] = deque()
        if self._bytes + size > self._max_bytes:
            logger.debug("dropping message for unknown action %r: backlog is full", name)
            return
        if len(backlog) >= MAX_BACKLOG_PER_NAME:
            _, _, old_size = backlog.popleft()
            self._bytes -= old_size
        backlog.append((sender, item, size))
        self._bytes += size

    def take(self, name: str) -> list[tuple[str, T, int]]:
        """Everything kept for `name`, oldest first (forgotten here)."""
        taken = list(self._by_name.pop(name, ()))
        self._bytes -= sum(size for _, _, size in taken)
        return taken

    def purge(self, sender: str) -> int:
        """Forget everything kept from `sender`; returns how many."""
        dropped = 0
        for name, backlog in list(self._by_name.items()):
            kept = deque(entry for entry in backlog if entry[0] != sender)
            dropped += len(backlog) - len(kept)
            self._bytes -= sum(entry[2] for entry in backlog if entry[0] == sender)
            self._by_name[name] = kept
        return dropped
