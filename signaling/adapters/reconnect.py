"""ReconnectLoop: one relay connection kept up in the background (shared by every socket adapter)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from signaling.base import Backoff

__all__ = ["TASK_STOP_TIMEOUT_SECONDS", "ReconnectLoop"]

logger = logging.getLogger(__name__)

TASK_STOP_TIMEOUT_SECONDS = 5.0
"""Bound on waiting for a connection task to end after it was cancelled."""


class ReconnectLoop:
    """One relay connection kept up in the background: ``connect_once`` again after every failure,
    with backoff, until :meth:`close` (trystero-wire §6.6: a dead relay never affects the others).

    `expected` are the exceptions that mean "unreachable or gone" (logged as a warning); anything
    else is a bug in a callback, logged with its traceback, and reconnected like any failure.
    """

    def __init__(self, label: str, connect_once: Callable[[], Awaitable[None]], backoff: Backoff,
                 expected: tuple[type[BaseException], ...]) -> None:
        self.label = label
        self._connect_once = connect_once
        self._backoff = backoff
        self._expected = expected
        self._task: asyncio.Task[None] | None = None
        self.closing = False
        self._closed: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Start connecting in the background (idempotent)."""
        if self._task is None and not self.closing:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"signaling[{self.label}]")

    async def close(self) -> None:
        """Stop reconnecting and wait (bounded) for the task; idempotent, concurrent callers wait."""
        if self._closed is not None:
            await self._closed
            return
        self._closed = asyncio.get_running_loop().create_future()
        self.closing = True
        try:
            task = self._task
            if task is not None and not task.done():
                task.cancel()
                try:
                    async with asyncio.timeout(TASK_STOP_TIMEOUT_SECONDS):
                        await asyncio.wait({task})
                except TimeoutError:
                    logger.warning("%s: connection task did not stop in time", self.label)
            if task is not None and task.done() and not task.cancelled():
                exc = task.exception()
                if exc is not None:
                    logger.error("%s: connection task failed", self.label, exc_info=exc)
        finally:
            self._closed.set_result(None)

    async def _run(self) -> None:
        while not self.closing:
            try:
                await self._connect_once()
            except self._expected as exc:
                logger.warning("%s: connection failed: %s", self.label, exc or type(exc).__name__)
            except Exception:
                logger.exception("%s: unexpected error", self.label)
            if self.closing:
                break
            delay = self._backoff.next_delay()
            logger.info("%s: reconnecting in %.2f s", self.label, delay)
            await asyncio.sleep(delay)
