"""The uplink's hard ceiling: a token bucket every message of a paced node goes through.

The :class:`~meshnode.link.pacer.Pacer` plans windows so that the *average* load fits the budget,
but results, READYs and caps come in bursts (forty streams that started together end together,
each with a 2 KB result). Sent as they come, a burst overflows the link's queue; the link drops
packets and SCTP's retransmission timeout (≥ 1 s) stalls those streams. So a paced node spends
an estimate of each message's *wire* bytes from one bucket that refills at the budget less what
the connections' upkeep takes, and waits when it is empty: the node itself never offers more than
its uplink.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from meshnode.link.costs import SCTP_USER_DATA_BYTES, WireCosts

__all__ = ["ByteBucket", "ShapedAction", "wire_bytes"]

TRYSTERO_CHUNK_BYTES = 16 * 1024
"""Trystero splits messages into chunks of this many payload bytes, each with its own framing."""


def wire_bytes(payload: Any, costs: WireCosts) -> int:
    """Estimated bytes on the link for one message to one peer: framing, packets, headers."""
    if isinstance(payload, bytes | bytearray):
        size = len(payload)
    else:  # Trystero sends anything else as JSON text
        size = len(json.dumps(payload, separators=(",", ":"), default=str).encode())
    chunks = max(1, math.ceil(size / TRYSTERO_CHUNK_BYTES))
    framed = size + chunks * costs.trystero_bytes
    return framed + math.ceil(framed / SCTP_USER_DATA_BYTES) * costs.packet_bytes


class ByteBucket:
    """Token bucket of bytes: ``rate()`` bytes/s, at most ``burst_seconds`` of it banked.

    :meth:`spend` waits until the bucket holds the bytes. Waiting sends go in priority order, then
    first come first served: the streams' frames (priority 0) never queue behind a burst of caps
    and results (priority 1). A message larger than the whole burst may take the bucket into debt
    rather than wait forever.
    """

    def __init__(self, rate: Callable[[], float], *, burst_seconds: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst_seconds = burst_seconds
        self._clock = clock
        self._level = 0.0
        self._at = clock()
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._pump: asyncio.Task[None] | None = None
        self.spent = 0
        self.waited_seconds = 0.0
        """Time the bucket spent empty with sends waiting (how often the ceiling was reached)."""

    def _refill(self) -> float:
        now = self._clock()
        rate = max(1.0, self._rate())
        self._level = min(rate * self._burst_seconds, self._level + (now - self._at) * rate)
        self._at = now
        return rate

    def _take(self, count: int, rate: float) -> bool:
        if self._level < min(float(count), rate * self._burst_seconds):
            return False
        self._level -= count
        self.spent += count
        return True

    async def spend(self, count: int, priority: int = 0) -> None:
        if not self._waiters and self._take(count, self._refill()):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), count, waiter))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._serve(), name="link.bucket")
        await waiter

    async def _serve(self) -> None:
        while self._waiters:
            _, _, count, waiter = self._waiters[0]
            if waiter.done():  # its sender was cancelled
                heapq.heappop(self._waiters)
                continue
            rate = self._refill()
            if self._take(count, rate):
                heapq.heappop(self._waiters)
                waiter.set_result(None)
                continue
            wait = (min(float(count), rate * self._burst_seconds) - self._level) / rate
            self.waited_seconds += wait
            await asyncio.sleep(wait)


class ShapedAction:
    """An action whose sends spend their wire bytes from a :class:`ByteBucket` first.

    A broadcast goes out one peer at a time, each copy paid for on its own, so a cap to a hundred
    tabs (1.6 KB each) interleaves with the streams' frames instead of holding them up for
    seconds.
    """

    def __init__(self, action: Any, bucket: ByteBucket, costs: WireCosts, peers: Callable[[], Sequence[str]], *,
                 priority: int = 0) -> None:
        self._action = action
        self._bucket = bucket
        self._costs = costs
        self._peers = peers
        self._priority = priority

    async def send(self, payload: Any, target: str | list[str] | None = None) -> None:
        targets = [target] if isinstance(target, str) else list(target) if target is not None else list(self._peers())
        cost = wire_bytes(payload, self._costs)
        for peer in targets:
            await self._bucket.spend(cost, self._priority)
            await self._action.send(payload, target=peer)

    def __getattr__(self, name: str) -> Any:  # receive(), name, …: the room action's own
        return getattr(self._action, name)
