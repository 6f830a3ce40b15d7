"""Trystero rooms for Python: join, handshake, actions, presence, leave (see :mod:`.room`)."""

from meshnode.room.actions import Action, ActionMessage, PeerEvent
from meshnode.room.config import RoomConfig
from meshnode.room.errors import HandshakeFailed, RoomClosed
from meshnode.room.room import Room

__all__ = ["Action", "ActionMessage", "HandshakeFailed", "PeerEvent", "Room", "RoomClosed", "RoomConfig"]
