"""Actions: the named message types of a room, and the values they deliver."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from meshnode.room.errors import RoomClosed
from meshnode.room.mailbox import Mailbox
from meshnode.wire.roomframes import NO_METADATA, encode_action, encode_name, encode_payload, encode_room_frame

__all__ = ["Action", "ActionMessage", "ActionPort", "PeerEvent"]


@dataclass(frozen=True, slots=True)
class ActionMessage:
    """One received action message.

    Attributes:
        peer_id: the sender.
        payload: ``str``, ``bytes`` or a parsed JSON value (trystero-wire §8.3).
        metadata: the message's metadata, or None when it had none.
    """

    peer_id: str
    payload: Any
    metadata: Any = None


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A peer joined (handshake complete) or left the room."""

    kind: Literal["join", "leave"]
    peer_id: str


class ActionPort(Protocol):
    """What an action needs from its room to send."""

    token: str

    def check_open(self) -> None:
        """Raise :class:`RoomClosed` unless the room is joined."""
        ...

    def targets(self, target: str | Sequence[str] | None) -> list[str]:
        """The joined peers among `target` (every joined peer for None)."""
        ...

    async def send_frames(self, peers: list[str], frames: list[bytes]) -> None:
        """Send `frames` in order to each of `peers`, with backpressure."""
        ...


class Action:
    """A named message type of a room (``room.make_action(name)``).

    Payloads: ``bytes``-like → binary, ``str`` → string, anything else → JSON (§8.3). Received
    messages wait in a bounded :class:`Mailbox` (`RoomConfig.action_queue_size`, optionally bounded
    per sender too).
    """

    def __init__(self, port: ActionPort, name: str, mailbox: Mailbox[ActionMessage]) -> None:
        self.name = name
        self._port = port
        self._name_field = encode_name(name)
        self._nonce = 0  # per action and per room instance, from 0, wrapping (P13)
        self.mailbox = mailbox
        """Received messages waiting for :meth:`receive`."""

    def __repr__(self) -> str:
        return f"Action({self.name!r})"

    def encode(self, payload: Any, metadata: Any = NO_METADATA) -> list[bytes]:
        """The room frames of one message (consumes one nonce)."""
        data, kind = encode_payload(payload)
        chunks = encode_action(self._name_field, self._nonce, data, kind, metadata)
        self._nonce = (self._nonce + 1) % 65536
        return [encode_room_frame(self._port.token, chunk) for chunk in chunks]

    async def send(
        self,
        payload: Any,
        target: str | Sequence[str] | None = None,
        metadata: Any = None,
    ) -> list[str]:
        """Send a message to joined peers, waiting while their channels are backed up.

        Args:
            payload: bytes-like (binary), str, or any JSON-serialisable value.
            target: one peer id, a list of them, or None for every joined peer.
            metadata: optional JSON value sent as the metadata chunk (None = no metadata).

        Returns:
            The peer ids the message was handed to (targets that are not joined are skipped).

        Raises:
            RoomClosed: the room was left.
            PayloadError: the payload or metadata cannot be encoded.
        """
        self._port.check_open()
        frames = self.encode(payload, NO_METADATA if metadata is None else metadata)
        peers = self._port.targets(target)
        await self._port.send_frames(peers, frames)
        return peers

    async def receive(self) -> ActionMessage:
        """The next message; raises :class:`RoomClosed` once the room is left and drained."""
        return await self.mailbox.get()

    def __aiter__(self) -> AsyncIterator[ActionMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ActionMessage]:
        while True:
            try:
                yield await self.mailbox.get()
            except RoomClosed:
                return
