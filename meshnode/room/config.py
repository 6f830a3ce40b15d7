"""RoomConfig: everything needed to join one Trystero room (timer defaults are Trystero's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from meshnode.errors import ConfigError
from meshnode.transport.ice import IceServerSpec
from meshnode.wire.roomframes import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PENDING_BYTES_PER_PEER,
    DEFAULT_MAX_PENDING_MESSAGES_PER_PEER,
)
from signaling.strategies import StrategyTimers

__all__ = ["RoomConfig"]


@dataclass(frozen=True, kw_only=True)
class RoomConfig:
    """Everything needed to join one Trystero room.

    Timer defaults are Trystero's (trystero-wire §10).
    """

    strategy: str
    """Relay strategy: ``ws-relay``, ``mqtt``, ``nostr``, ``torrent`` or ``memory``."""
    relay_urls: list[str] = field(default_factory=list)
    """Relay URLs; empty = the strategy's defaults (``signaling.registry.DEFAULT_RELAYS``)."""
    app_id: str
    """Trystero appId."""
    room_id: str
    """Trystero roomId."""
    password: str = ""
    """Room password; "" for none."""
    self_id: str | None = None
    """Our peer id; a fresh 20-character id when None (P15). Rooms with the same self_id and
    app_id share connections to a peer, as Trystero rooms of one page do."""
    ice_servers: list[IceServerSpec] = field(default_factory=list)
    """STUN/TURN servers (strings or ``{"urls", "username", "credential"}``); [] = host only."""
    ice_transport_policy: Literal["all", "relay"] = "all"
    """``relay`` uses TURN candidates only (RTCConfiguration.iceTransportPolicy)."""
    handshake_timeout_seconds: float = 10.0
    """A bound peer must finish the join handshake within this."""
    leave_flush_seconds: float = 0.099
    """Pause between sending @_leave and tearing the bindings down."""
    idle_connection_close_seconds: float = 123.333
    """A connection no room uses any more is closed after this."""
    timers: StrategyTimers = field(default_factory=StrategyTimers)
    """Signalling timers (announce schedule, offer/answer TTLs, connect deadline)."""
    torrent_offers: int = 3
    """Torrent: offers kept outstanding per tracker (0 = answer only)."""
    buffered_amount_low_bytes: int = 65535
    """Data channel ``bufferedAmountLowThreshold``."""
    high_water_bytes: int = 65535
    """Sends wait while a channel has more than this buffered."""
    drain_timeout_seconds: float = 10.0
    """A send that cannot proceed for this long gives up on that peer."""
    disconnected_grace_seconds: float = 5.0
    """ICE ``disconnected`` for this long closes a connection."""
    action_queue_size: int = 1024
    """Received messages buffered per action; beyond that new ones are dropped (logged)."""
    event_queue_size: int = 1024
    """Join/leave events buffered for next_event()."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest accepted action message (reassembled); a peer that sends a larger one is dropped."""
    max_pending_messages_per_peer: int = DEFAULT_MAX_PENDING_MESSAGES_PER_PEER
    """Incomplete (partially received) messages kept per peer; the oldest is evicted beyond."""
    max_pending_bytes_per_peer: int = DEFAULT_MAX_PENDING_BYTES_PER_PEER
    """Bytes of incomplete messages kept per peer; the oldest is evicted beyond."""
    max_queued_messages_per_peer: int = 0
    """Received messages one peer may have waiting in one action's queue; beyond, that peer's new
    messages are dropped, so one flooding peer cannot push others out (0 = no per-peer bound)."""
    max_queued_bytes_per_peer: int = 0
    """Bytes one peer may have waiting in one action's queue (0 = no per-peer bound)."""
    max_backlog_bytes: int = 1024 * 1024
    """Bytes kept for messages of actions nobody registered yet (P18); beyond, they are dropped."""
    peer_rate_bytes_per_second: float = 0.0
    """Sustained inbound bytes per second allowed per connection; a peer that exhausts its burst
    is disconnected and banned (0 = unlimited)."""
    peer_burst_bytes: int = 0
    """Inbound byte burst per connection (defaults to max_message_bytes plus one second of the rate)."""
    peer_rate_messages_per_second: float = 0.0
    """Sustained inbound data-channel messages per second per connection (0 = unlimited)."""
    peer_burst_messages: int = 0
    """Inbound message burst per connection (defaults to 4 s of the rate when a rate is set)."""
    max_connections: int = 0
    """Open plus negotiating connections of this app; further peers are refused (0 = unlimited)."""
    ban_seconds: float = 60.0
    """How long a peer dropped for abuse is refused (signals and connections ignored)."""
    peer_filter: Callable[[str], bool] | None = None
    """Connect only to peers for which this is true; others' signals are ignored (None: every
    peer, as Trystero does). For clients that talk to nodes only: e.g. ``meshnode bench`` puts
    hundreds of requesting tabs in one room without meshing them with each other."""

    def __post_init__(self) -> None:
        for key in ("strategy", "app_id", "room_id"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"room.{key} must be a non-empty string")
        if not isinstance(self.password, str):
            raise ConfigError("room.password must be a string")
        if self.self_id is not None and not self.self_id:
            raise ConfigError("room.self_id must be non-empty when given")
        if self.handshake_timeout_seconds <= 0 or self.action_queue_size < 1:
            raise ConfigError("room timeouts and queue sizes must be positive")
