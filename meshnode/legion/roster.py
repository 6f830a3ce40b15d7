"""The roster of other peers' caps, and who answers a broadcast ``/ai``.

Real Legion responders stay silent on a broadcast ``/ai`` whenever the sender's cap says
``available: true`` (its own model answers it, legion-mesh §5.7 rule 5), and so does meshnode. For
a sender that is unavailable (or unknown), every meshnode computes the same choice from the same
roster: the eligible meshnode with the lowest load ratio, ties broken by the smallest peer id.

A cap is only a claim: anyone can send ``agent: "meshnode"`` with a load of zero and then never
answer. So a peer is *eligible* only once it has **shown that it serves**: this node called its
``engine_run`` for one token and got a real result back (:class:`Roster` records when). A forger
that does not serve fails that probe and is never elected, so it cannot silence the room; a peer
that passed the probe and later stops serving is re-probed after VERIFY_TTL_SECONDS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from meshnode.wire import legion

__all__ = ["ROSTER_TTL_SECONDS", "Roster", "RosterEntry", "elect_ai_responder"]

logger = logging.getLogger(__name__)

ROSTER_TTL_SECONDS = 90.0
"""A peer whose cap has not been heard for this long is dropped (the real roster's rule)."""
VERIFY_TTL_SECONDS = 600.0
"""A passed serving probe counts this long; then the peer is probed again."""
PROBE_RETRY_SECONDS = 120.0
"""After a failed probe, the peer is not probed again for this long."""


@dataclass
class RosterEntry:
    cap: legion.Cap
    last_seen: float
    verified_at: float | None = None
    """When the peer last answered our serving probe."""
    probe_failed_at: float | None = None
    probing: bool = False


class Roster:
    """Caps by peer id, with when each was last heard and whether the peer proved it serves."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.entries: dict[str, RosterEntry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self.entries

    def get(self, peer_id: str) -> RosterEntry | None:
        return self.entries.get(peer_id)

    def update(self, peer_id: str, cap: legion.Cap) -> RosterEntry:
        entry = self.entries.get(peer_id)
        if entry is None:
            logger.info("cap from %s: nick=%r model=%s available=%s", peer_id, cap.nick, cap.model_id, cap.available)
            entry = self.entries[peer_id] = RosterEntry(cap=cap, last_seen=self.clock())
        else:
            entry.cap, entry.last_seen = cap, self.clock()
        return entry

    def remove(self, peer_id: str) -> None:
        self.entries.pop(peer_id, None)

    def prune(self) -> None:
        now = self.clock()
        for peer_id, entry in list(self.entries.items()):
            if now - entry.last_seen > ROSTER_TTL_SECONDS:
                logger.info("roster: %s silent for %.0f s, pruned", peer_id, now - entry.last_seen)
                del self.entries[peer_id]

    def needs_probe(self, entry: RosterEntry) -> bool:
        """A meshnode-looking engine peer whose serving has not been (recently) shown."""
        if entry.probing or not _claims_engine(entry.cap):
            return False
        now = self.clock()
        if entry.verified_at is not None and now - entry.verified_at < VERIFY_TTL_SECONDS:
            return False
        return entry.probe_failed_at is None or now - entry.probe_failed_at >= PROBE_RETRY_SECONDS

    def verified(self, entry: RosterEntry) -> bool:
        return entry.verified_at is not None and self.clock() - entry.verified_at < VERIFY_TTL_SECONDS

    def candidates(self) -> dict[str, legion.Cap]:
        """Caps of the peers that claim to serve engine_run as meshnodes and have shown it."""
        return {peer_id: entry.cap for peer_id, entry in self.entries.items()
                if _claims_engine(entry.cap) and self.verified(entry)}


def _claims_engine(cap: legion.Cap) -> bool:
    return cap.is_meshnode and "engine_run" in cap.tools


def elect_ai_responder(candidates: dict[str, legion.Cap], asker: str) -> str | None:
    """Among available candidates that are not the asker, the lowest load ratio, then the smallest id."""
    ranked = [(cap.load_ratio, peer_id) for peer_id, cap in candidates.items()
              if peer_id != asker and cap.available and _claims_engine(cap)]
    return min(ranked)[1] if ranked else None
