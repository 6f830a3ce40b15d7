"""ToolCaller: the calling side of ``tc`` (legion-mesh §5.4): send a call, await its one result."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from meshnode.legion.outbox import Sender
from meshnode.wire import legion

__all__ = ["ToolCaller", "new_call_id"]

MAX_PENDING_CALLS = 64


def new_call_id(prefix: str = "c") -> str:
    return f"{prefix}-{int(time.time() * 1000):x}-{secrets.token_hex(3)}"


class ToolCaller:
    """Calls tools on peers; the owner's ``tc`` receive loop hands results to :meth:`on_result`."""

    def __init__(self, action: Sender) -> None:
        self._action = action
        self._pending: dict[str, tuple[str, asyncio.Future[legion.ToolResult]]] = {}

    async def call(self, peer_id: str, tool: str, args: dict[str, Any], *, timeout: float,
                   call_id: str | None = None) -> legion.ToolResult:
        """Call `tool` on `peer_id` and wait for its result.

        Raises:
            TimeoutError: no result within `timeout` seconds.
        """
        if len(self._pending) >= MAX_PENDING_CALLS:
            raise RuntimeError(f"more than {MAX_PENDING_CALLS} calls pending")
        call_id = call_id or new_call_id()
        waiter: asyncio.Future[legion.ToolResult] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (peer_id, waiter)
        try:
            frame = legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id, tool_name=tool, args=args)
            await self._action.send(frame, target=peer_id)
            async with asyncio.timeout(timeout):
                return await waiter
        finally:
            self._pending.pop(call_id, None)

    def on_result(self, peer_id: str, result: legion.ToolResult) -> bool:
        """A result arrived; True when it answered one of our calls (from the peer we called)."""
        pending = self._pending.get(result.call_id)
        if pending is None or pending[0] != peer_id or pending[1].done():
            return False
        pending[1].set_result(result)
        return True
