"""Errors of the room layer."""

from __future__ import annotations

from meshnode.errors import MeshError
from meshnode.transport.peer import PeerError

__all__ = ["HandshakeFailed", "RoomClosed"]


class RoomClosed(MeshError):
    """The room was left; no more messages or events will come."""


class HandshakeFailed(PeerError):
    """The per-room join handshake with a peer failed (wrong password, bad messages)."""
