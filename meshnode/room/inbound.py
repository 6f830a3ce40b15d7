"""Inbound flood control per connection: token buckets for bytes and data-channel messages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshnode.room.config import RoomConfig

__all__ = ["InboundLimits", "TokenBucket", "inbound_limits"]


class TokenBucket:
    """Token bucket: `rate` units per second, at most `burst` saved up (sans-IO, clock injected)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        """Spend `amount`; False (nothing spent) when the bucket cannot cover it."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


@dataclass(eq=False)
class InboundLimits:
    """Per-connection inbound budget: bytes and data-channel messages (None = unlimited)."""

    bytes: TokenBucket | None
    frames: TokenBucket | None

    def admit(self, size: int, now: float) -> str | None:
        """Account one received message; a reason string when the peer went over its budget."""
        if self.frames is not None and not self.frames.take(1, now):
            return f"more than {self.frames.rate:g} messages/s (burst {self.frames.burst:g})"
        if self.bytes is not None and not self.bytes.take(size, now):
            return f"more than {self.bytes.rate:g} bytes/s (burst {self.bytes.burst:g})"
        return None


def inbound_limits(configs: Iterable[RoomConfig], now: float) -> InboundLimits:
    """The tightest limits among the rooms that share a connection."""
    byte_rates = [(rate, c.peer_burst_bytes or c.max_message_bytes + rate)
                  for c in configs if (rate := c.peer_rate_bytes_per_second) > 0]
    frame_rates = [(c.peer_rate_messages_per_second, c.peer_burst_messages or 4 * c.peer_rate_messages_per_second)
                   for c in configs if c.peer_rate_messages_per_second > 0]
    return InboundLimits(
        bytes=TokenBucket(*min(byte_rates), now) if byte_rates else None,
        frames=TokenBucket(*min(frame_rates), now) if frame_rates else None,
    )
