"""Take only the calls that can finish before the asker gives up (legion-mesh §6 item 7).

The real Legion core times a tool call out after 30 s (the chat app after 20 s) and reads only the
final ``tc`` result, so a call that finishes late wastes the engine and leaves the tab with
nothing while another provider may have been free. :class:`Deadlines` estimates each new call's
finish time from what this node has measured (the speed one stream gets, the aggregate the engine
reaches with several, the time to first token), the calls in flight and the new call's budget:

* with a free engine slot, the call decodes at ``min(per_stream, aggregate / streams)``;
* with every slot taken, it first waits for the running call that will be done soonest (its
  remaining budget at that speed), then decodes.

A call with an explicit ``max_tokens`` that would not finish in time is refused at once (``busy:
…``); a call without one gets the largest budget that fits (at least ``min_tokens``) and is refused
only when not even that fits. While a default call would be refused, the node advertises
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
    """Decode speed as the service sees it: per stream, the aggregate with several, time to first token."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.per_stream: float | None = None
        """Tokens per second one stream got (moving average over finished calls)."""
        self.ttft: float | None = None
        """Seconds from call start to the first token (moving average)."""
        self.capacity: float | None = None
        """The highest aggregate tokens/s seen with two or more calls running (None: not seen yet)."""
        self._deliveries: deque[tuple[float, int]] = deque()
        self._busy_since: float | None = None
        self._active = 0

    def busy(self, active: int) -> None:
        """Tell the meter how many calls are generating (the aggregate counts busy time only)."""
        if active != self._active:
            self._deliveries.clear()  # a new mix: measure it afresh
            self._busy_since = self.clock() if active else None
        self._active = active

    def tokens(self, count: int) -> None:
        if not count:
            return
        now = self.clock()
        self._deliveries.append((now, count))
        while now - self._deliveries[0][0] > AGGREGATE_WINDOW_SECONDS:
            self._deliveries.popleft()
        if self._active >= 2 and self._busy_since is not None and now - self._busy_since >= 1.0:
            rate = sum(n for _, n in self._deliveries) / (now - max(self._busy_since, now - AGGREGATE_WINDOW_SECONDS))
            self.capacity = rate if self.capacity is None else max(rate, _blend(self.capacity, rate))

    def call_done(self, tokens: int, started: float, first: float | None, last: float | None, *,
                  queued: bool = False) -> None:
        """A call ended: fold its time to first token and its per-stream rate into the averages.

        A call that started `queued` (every slot taken) waited before its first token; the
        estimate models that wait itself, so its TTFT would count the wait twice and, once high,
        refuse every call and never be measured again."""
        if first is not None and not queued:
            self.ttft = _blend(self.ttft, first - started)
        if first is not None and last is not None and tokens >= 2 and last > first:
            self.per_stream = _blend(self.per_stream, (tokens - 1) / (last - first))

    def stream_rate(self, streams: int) -> float | None:
        """Tokens per second each of `streams` concurrent calls can expect (None: unknown)."""
        if self.per_stream is None:
            return None
        if self.capacity is None:
            return self.per_stream
        return min(self.per_stream, self.capacity / max(1, streams))


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

    def estimate(self, budget: int, remaining: list[int], slots: int) -> float | None:
        """Seconds until a new call of `budget` tokens would be done, with calls of `remaining`
        tokens in flight on an engine of `slots` concurrent streams (None: nothing measured)."""
        running = len(remaining) + 1
        rate = self.meter.stream_rate(min(running, slots))
        if rate is None or rate <= 0:
            return None
        wait = 0.0
        if running > slots:  # every slot taken: wait for the soonest of the calls ahead to end
            ahead = sorted(remaining)[running - slots - 1]
            wait = ahead / rate
        return (self.meter.ttft or 0.0) + wait + budget / rate

    def plan(self, requested: int | None, default: int, remaining: list[int], slots: int) -> Plan:
        """The budget for a new call, or why it is refused."""
        budget = requested if requested is not None else default
        if self.deadline_seconds <= 0:
            return Plan(budget, None)
        estimate = self.estimate(budget, remaining, slots)
        if estimate is None or estimate <= self.deadline_seconds:
            return Plan(budget, estimate)
        if requested is None:
            fitted = self._largest_fitting(default, remaining, slots)
            if fitted >= self.min_tokens:
                return Plan(fitted, self.estimate(fitted, remaining, slots))
        return Plan(budget, estimate, refusal=(
            f"busy: {budget} tokens would take about {estimate:.0f} s here now (deadline "
            f"{self.deadline_seconds:.0f} s); ask another peer or retry later"))

    def would_refuse_default(self, remaining: list[int], slots: int) -> bool:
        """Whether a call without max_tokens would be refused now (drives ``cap.available``)."""
        if self.deadline_seconds <= 0:
            return False
        estimate = self.estimate(self.min_tokens, remaining, slots)
        return estimate is not None and estimate > self.deadline_seconds

    def _largest_fitting(self, ceiling: int, remaining: list[int], slots: int) -> int:
        low, high = 0, ceiling
        while low < high:  # the estimate grows with the budget: bisect
            middle = (low + high + 1) // 2
            estimate = self.estimate(middle, remaining, slots)
            if estimate is not None and estimate <= self.deadline_seconds:
                low = middle
            else:
                high = middle - 1
        return low
