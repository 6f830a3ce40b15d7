"""Outbox: replies to each peer, sent in order from one task per peer, never lost while it reads.

The receive loops must never wait on one peer's data channel, so replies (tc results, READY,
chat lines) are queued here and sent by a per-peer task that waits on that channel's backpressure.
Replies the node owes (the result of a call it accepted, the READY of a HELLO it accepted) are
**essential**: they are always queued. Optional ones (refusals of new work, chat error lines) are
dropped, at debug level and without counting an offence, once MAX_OPTIONAL_PENDING replies to that
peer are waiting; :meth:`backlog` tells the service to refuse new work from a peer that is that
far behind (a slow reader is slowed down, not punished). A peer that stops reading altogether is
found by the transport (its sends time out and the connection closes), which ends its queue.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshnode.errors import MeshError
from meshnode.tasks import TaskOwner

__all__ = ["MAX_OPTIONAL_PENDING", "Outbox", "Sender"]

logger = logging.getLogger(__name__)

MAX_OPTIONAL_PENDING = 16
"""Replies waiting for one peer beyond which optional ones are dropped and new work refused."""


class Sender(Protocol):
    async def send(self, payload: Any, target: str | list[str] | None = None) -> Any: ...


@dataclass
class _Queue:
    items: deque[tuple[Sender, Any, str]] = field(default_factory=deque)
    sending: bool = False


class Outbox:
    """Per-peer ordered reply queues (see the module docstring)."""

    def __init__(self, tasks: TaskOwner) -> None:
        self._tasks = tasks
        self._queues: dict[str, _Queue] = {}
        self.dropped = 0
        """Optional replies dropped because their peer was too far behind."""

    def backlog(self, peer_id: str) -> int:
        """Replies to `peer_id` not yet handed to its channel."""
        queue = self._queues.get(peer_id)
        return len(queue.items) + int(queue.sending) if queue is not None else 0

    def post(self, peer_id: str, action: Sender, payload: Any, what: str, *, essential: bool) -> bool:
        """Queue one reply; False when an optional reply was dropped (the peer is far behind)."""
        queue = self._queues.setdefault(peer_id, _Queue())
        if not essential and self.backlog(peer_id) >= MAX_OPTIONAL_PENDING:
            self.dropped += 1
            logger.debug("not sending %s to %s: %d replies already waiting", what, peer_id, self.backlog(peer_id))
            return False
        queue.items.append((action, payload, what))
        if not queue.sending:
            queue.sending = True
            self._tasks.spawn(self._drain(peer_id, queue), f"outbox->{peer_id[:8]}")
        return True

    def forget(self, peer_id: str) -> None:
        """The peer left: its waiting replies have nowhere to go."""
        queue = self._queues.pop(peer_id, None)
        if queue is not None:
            queue.items.clear()

    async def _drain(self, peer_id: str, queue: _Queue) -> None:
        try:
            while queue.items:
                action, payload, what = queue.items.popleft()
                try:
                    await action.send(payload, target=peer_id)
                except MeshError as exc:  # the peer went away meanwhile: nothing else to do
                    logger.debug("could not send %s to %s: %s", what, peer_id, exc)
                    queue.items.clear()
        finally:
            queue.sending = False
            if self._queues.get(peer_id) is queue and not queue.items:
                del self._queues[peer_id]
