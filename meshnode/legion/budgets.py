"""Per-peer budgets against hostile room members: call rate, open calls, offences, map calls.

Budgets are keyed by peer id and **outlive a leave**: a peer that leaves and rejoins (presence 0
then 1 on the same connection, or a reconnect under the same id) finds its strikes and call counts
where it left them, for as long as their one-minute windows last. A budget is forgotten only once
it is empty (no open call, nothing left in any window), so memory stays bounded by the peers that
were active within the last minute (and by MAX_BUDGETS).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BudgetLimits", "PeerBudget", "PeerBudgets"]

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
"""Length of the sliding windows (calls, strikes and map calls per minute)."""
MAX_BUDGETS = 4096
"""Budgets kept at once; beyond, the least recently touched empty ones go first."""
MAP_CALLS_PER_MINUTE = 2
"""codec_map answers carry the whole tokenizer map (~1 MB): a cheap call, an expensive answer."""


@dataclass(frozen=True, kw_only=True)
class BudgetLimits:
    calls_per_minute: int = 30
    max_calls_per_peer: int = 2
    max_strikes_per_minute: int = 30


@dataclass
class PeerBudget:
    """One peer's sliding windows and open-call count."""

    started: deque[float] = field(default_factory=deque)
    open_calls: int = 0
    strikes: deque[float] = field(default_factory=deque)
    map_calls: deque[float] = field(default_factory=deque)
    dropped_at: float | None = None
    """When the room last dropped and banned this peer for its offences."""

    def trim(self, now: float) -> None:
        for window in (self.started, self.strikes, self.map_calls):
            while window and now - window[0] > WINDOW_SECONDS:
                window.popleft()

    @property
    def empty(self) -> bool:
        return not (self.open_calls or self.started or self.strikes or self.map_calls)


class PeerBudgets:
    """The budgets of every peer the service has heard from recently."""

    def __init__(self, limits: BudgetLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self._budgets: OrderedDict[str, PeerBudget] = OrderedDict()

    def __len__(self) -> int:
        return len(self._budgets)

    def get(self, peer_id: str) -> PeerBudget:
        budget = self._budgets.get(peer_id)
        if budget is None:
            budget = self._budgets[peer_id] = PeerBudget()
            self._evict()
        else:
            self._budgets.move_to_end(peer_id)
        budget.trim(self.clock())
        return budget

    def strike(self, peer_id: str) -> bool:
        """Count one offence; True while the peer is within its limit, False once past it (then
        it is to be dropped and banned, and its messages earn no reply)."""
        budget = self.get(peer_id)
        budget.strikes.append(self.clock())
        return len(budget.strikes) <= self.limits.max_strikes_per_minute

    def should_drop(self, peer_id: str, ban_seconds: float) -> bool:
        """Over its limit and not dropped within the last ban period: drop (and ban) it now."""
        budget = self.get(peer_id)
        now = self.clock()
        if budget.dropped_at is not None and now - budget.dropped_at < ban_seconds:
            return False
        budget.dropped_at = now
        return True

    def strikes(self, peer_id: str) -> int:
        budget = self._budgets.get(peer_id)
        return len(budget.strikes) if budget is not None else 0

    def admit_call(self, peer_id: str) -> str | None:
        """Per-peer call limits; returns a refusal reason, or None (and the call is counted)."""
        budget = self.get(peer_id)
        if len(budget.started) >= self.limits.calls_per_minute:
            return f"rate limit: at most {self.limits.calls_per_minute} calls per minute"
        if budget.open_calls >= self.limits.max_calls_per_peer:
            return f"busy: at most {self.limits.max_calls_per_peer} concurrent calls per peer"
        budget.started.append(self.clock())
        return None

    def admit_map(self, peer_id: str) -> str | None:
        """codec_map answers are large: at most MAP_CALLS_PER_MINUTE."""
        budget = self.get(peer_id)
        if len(budget.map_calls) >= MAP_CALLS_PER_MINUTE:
            return f"rate limit: at most {MAP_CALLS_PER_MINUTE} codec_map calls per minute"
        budget.map_calls.append(self.clock())
        return None

    def opened(self, peer_id: str) -> None:
        self.get(peer_id).open_calls += 1

    def closed(self, peer_id: str) -> None:
        budget = self._budgets.get(peer_id)
        if budget is not None:
            budget.open_calls = max(0, budget.open_calls - 1)

    def prune(self) -> None:
        """Forget budgets whose windows ran out and that hold no open call."""
        now = self.clock()
        for peer_id, budget in list(self._budgets.items()):
            budget.trim(now)
            if budget.empty:
                del self._budgets[peer_id]

    def _evict(self) -> None:
        while len(self._budgets) > MAX_BUDGETS:
            victim = next((p for p, b in self._budgets.items() if b.empty), None)
            if victim is None:
                victim = next(iter(self._budgets))
            del self._budgets[victim]
