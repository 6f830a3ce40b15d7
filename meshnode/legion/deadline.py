"""Take only the calls that can finish before the asker gives up (legion-mesh §6 item 7).

The real Legion core times a tool call out after 30 s (the chat app after 20 s) and reads only the
final ``tc`` result, so a call that finishes late wastes the engine and leaves the tab with
nothing while another provider may have been free. :class:`Deadlines` estimates each new call's
finish time from the throughput this node has measured, the work already in flight and the
call's token budget:

    finish ≈ ttft + max(budget / per_stream_rate, (work_ahead + budget) / aggregate_rate)

The first term is the call decoding at the speed one stream gets now; the second is every token
ahead of it plus its own going through the engine at the aggregate rate measured while it was
busy. A call with an explicit ``max_tokens`` that would not finish in time is refused at once
(``busy: …``); a call without one gets the largest budget that fits (at least ``min_tokens``), and
is refused only when not even that fits. While a default call would be refused, the node advertises
``available: false``. Until something has been measured nothing is refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Deadlines", "Plan", "ThroughputMeter"]

EWMA_WEIGHT = 0.3
"""Weight of the newest sample in the moving averages."""
AGGREGATE_WINDOW_SECONDS = 10.0
"""Tokens delivered over this many seconds give the aggregate rate."""


class ThroughputMeter:
    """Decode speed as the service sees it: per stream, in aggregate, and time to first token."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.per_stream: float | None = None
        """Tokens per second one stream got (moving average over finished calls)."""
        self.ttft: float | None = None
        """Seconds from call start to the first token (moving average)."""
        self._deliveries: deque[tuple[float, int]] = deque()
        self._busy_since: float | None = None

    def busy(self, active: int) -> None:
        """Tell the meter how many calls are generating (the aggregate counts busy time only)."""
        now = self.clock()
        if active and self._busy_since is None:
            self._busy_since = now
        elif not active:
            self._busy_since = None

    def tokens(self, count: int) -> None:
        if count:
            self._deliveries.append((self.clock(), count))

    def call_done(self, tokens: int, started: float, first: float | None, last: float | None) -> None:
        """A call ended: fold its time to first token and its per-stream rate into the averages."""
        if first is not None:
            self.ttft = _blend(self.ttft, first - started)
        if first is not None and last is not None and tokens >= 2 and last > first:
            self.per_stream = _blend(self.per_stream, (tokens - 1) / (last - first))

    @property
    def aggregate(self) -> float | None:
        """Tokens per second over the recent busy window (None while unknown)."""
        now = self.clock()
        while self._deliveries and now - self._deliveries[0][0] > AGGREGATE_WINDOW_SECONDS:
            self._deliveries.popleft()
        if not self._deliveries or self._busy_since is None:
            return None
        span = now - max(self._deliveries[0][0], self._busy_since)
        if span < 1.0:
            return None
        return sum(count for _, count in self._deliveries) / span


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


@dataclass(frozen=True)
class Plan:
    max_tokens: int
    """The call's token budget (its own, or the largest default that fits)."""
    estimate_seconds: float | None
    """Predicted seconds to the result (None: nothing measured yet)."""
    refusal: str | None = None


class Deadlines:
    """Admission by predicted finish time (see the module docstring); 0 s = off."""

    def __init__(self, meter: ThroughputMeter, *, deadline_seconds: float, min_tokens: int = 16) -> None:
        self.meter = meter
        self.deadline_seconds = deadline_seconds
        self.min_tokens = min_tokens

    def estimate(self, budget: int, work_ahead: int) -> float | None:
        rate = self.meter.per_stream
        if rate is None or rate <= 0:
            return None
        seconds = budget / rate
        aggregate = self.meter.aggregate
        if aggregate is not None and aggregate > 0:
            seconds = max(seconds, (work_ahead + budget) / aggregate)
        return (self.meter.ttft or 0.0) + seconds

    def plan(self, requested: int | None, default: int, work_ahead: int) -> Plan:
        """The budget for a new call, or why it is refused."""
        budget = requested if requested is not None else default
        if self.deadline_seconds <= 0:
            return Plan(budget, None)
        estimate = self.estimate(budget, work_ahead)
        if estimate is None or estimate <= self.deadline_seconds:
            return Plan(budget, estimate)
        if requested is None:
            fitted = self._largest_fitting(default, work_ahead)
            if fitted >= self.min_tokens:
                return Plan(fitted, self.estimate(fitted, work_ahead))
        return Plan(budget, estimate, refusal=(
            f"busy: {budget} tokens would take about {estimate:.0f} s here now (deadline "
            f"{self.deadline_seconds:.0f} s); ask another peer or retry later"))

    def would_refuse_default(self, work_ahead: int) -> bool:
        """Whether a call without max_tokens would be refused now (drives ``cap.available``)."""
        if self.deadline_seconds <= 0:
            return False
        estimate = self.estimate(self.min_tokens, work_ahead)
        return estimate is not None and estimate > self.deadline_seconds

    def _largest_fitting(self, ceiling: int, work_ahead: int) -> int:
        low, high = 0, ceiling
        while low < high:  # the estimate grows with the budget: bisect
            middle = (low + high + 1) // 2
            estimate = self.estimate(middle, work_ahead)
            if estimate is not None and estimate <= self.deadline_seconds:
                low = middle
            else:
                high = middle - 1
        return low
