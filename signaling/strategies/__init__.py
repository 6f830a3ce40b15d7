"""Trystero's signalling strategies: topic relays (:mod:`.topic`) and WebTorrent trackers (:mod:`.tracker`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from signaling.strategies.engine import JoinErrorHandler, NegotiationError, PeerFactory, StrategyTimers
from signaling.strategies.topic import TopicStrategy
from signaling.strategies.tracker import TrackerStrategy

__all__ = ["NegotiationError", "PeerFactory", "StrategyTimers", "TopicStrategy", "TrackerStrategy", "build_strategy"]


def build_strategy(
    relays: Sequence[Any],
    *,
    app_id: str,
    room_id: str,
    self_id: str,
    factory: PeerFactory,
    password: str = "",
    timers: StrategyTimers | None = None,
    on_join_error: JoinErrorHandler | None = None,
    torrent_offers: int = 3,
) -> TopicStrategy | TrackerStrategy:
    """The strategy for `relays`: trackers get the torrent strategy, topic relays the topic one.

    Raises:
        ValueError: the relays mix kinds, or an argument is invalid for the strategy.
    """
    kinds = {getattr(relay, "kind", None) for relay in relays}
    common: dict[str, Any] = {"app_id": app_id, "room_id": room_id, "self_id": self_id, "factory": factory,
                              "password": password, "timers": timers, "on_join_error": on_join_error}
    if kinds == {"tracker"}:
        return TrackerStrategy(list(relays), offers_per_announce=torrent_offers, **common)
    if kinds == {"topic"}:
        return TopicStrategy(list(relays), **common)
    raise ValueError(f"relays must all be topic relays or all trackers, got {sorted(map(str, kinds))}")
