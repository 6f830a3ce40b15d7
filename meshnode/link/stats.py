"""What a :class:`~meshnode.link.pacer.Pacer` did: counts for the node's log and the bench."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PacerStats"]


@dataclass
class PacerStats:
    """What the pacer did (application-side counts; the bench measures the wire separately)."""

    messages: int = 0
    payload_bytes: int = 0
    tokens: int = 0
    admitted: int = 0
    refused: int = 0
    windows: list[float] = field(default_factory=list)
    peak_streams: int = 0
    capacity_hint: float | None = None
    """At the peak, how many streams of that mix the model would admit."""

    def record_message(self, size: int) -> None:
        self.messages += 1
        self.payload_bytes += size

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "payload_bytes": self.payload_bytes, "tokens": self.tokens,
                "admitted": self.admitted, "refused": self.refused, "peak_streams": self.peak_streams,
                "capacity_hint": None if self.capacity_hint is None else round(self.capacity_hint, 1),
                "window_ms": {"min": round(min(self.windows) * 1000, 1) if self.windows else None,
                              "max": round(max(self.windows) * 1000, 1) if self.windows else None,
                              "last": round(self.windows[-1] * 1000, 1) if self.windows else None}}
