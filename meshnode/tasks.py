"""TaskOwner: the one way meshnode and signaling own background tasks.

Long-lived work runs in an ``asyncio.TaskGroup`` of the component that owns it; short-lived
work that a component starts in reaction to events (a reply, a handshake, a close) is spawned on
that component's :class:`TaskOwner`. Either way every task has an owner that cancels and awaits
it on close, and a task that fails is logged once, at ERROR, with its traceback: a failure is
never silent, and never kills the owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["TASK_STOP_TIMEOUT_SECONDS", "TaskOwner"]

logger = logging.getLogger(__name__)

TASK_STOP_TIMEOUT_SECONDS = 5.0
"""Bound on waiting for cancelled tasks to end in :meth:`TaskOwner.aclose`."""


class TaskOwner:
    """Owns short-lived background tasks: logs their failures, cancels and awaits them on close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        """Start `coro` as an owned task; returns None (and closes `coro`) after close()."""
        if self._closed:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}.{name}")
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    def cancel(self) -> None:
        """Cancel every owned task without waiting (the owner stays open)."""
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self, timeout: float = TASK_STOP_TIMEOUT_SECONDS) -> None:
        """Cancel every task and wait (bounded) until they have ended; idempotent."""
        self._closed = True
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                logger.warning("task %s did not stop within %.1f s", task.get_name(), timeout)
