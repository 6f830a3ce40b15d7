"""The per-(room, peer) binding and the password step of Trystero's join handshake (§8.6)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from meshnode.room.config import RoomConfig
from meshnode.room.errors import HandshakeFailed
from meshnode.room.mailbox import Mailbox
from meshnode.transport.peer import PeerLink
from signaling.protocol import names

__all__ = [
    "HSDATA",
    "HSREADY",
    "LEAVE",
    "PING",
    "PONG",
    "Binding",
    "answer_challenge",
    "password_step",
]

CHALLENGE_LENGTH = 36
PASSWORD_FIELD = "__trystero_pw"  # noqa: S105 - a field name, not a secret
MAX_HSDATA_QUEUED = 4

# Internal action names (trystero-wire §8.5).
HSDATA, HSREADY, LEAVE, PING, PONG = "@_hsdata", "@_hsready", "@_leave", "@_ping", "@_pong"
SIGNAL, STREAM, TRACK, RESPONSE = "@_signal", "@_stream", "@_track", "@_response"
TOLERATED = frozenset({STREAM, TRACK, RESPONSE})
"""Internal actions of Trystero's media / request APIs, which meshnode ignores."""

SendInternal = Callable[["Binding", str, Any], Awaitable[None]]


@dataclass(eq=False)
class Binding:
    """One peer bound to one room: handshake state, then membership."""

    peer_id: str
    link: PeerLink
    joined: bool = False
    remote_ready: asyncio.Event = field(default_factory=asyncio.Event)
    local_ready: bool = False
    """Our side of the handshake passed and our @_hsready went out."""
    hsdata: Mailbox[Any] = field(default_factory=lambda: Mailbox(MAX_HSDATA_QUEUED, "@_hsdata"))
    task: asyncio.Task[Any] | None = None
    pings: deque[asyncio.Future[None]] = field(default_factory=deque)


async def password_step(binding: Binding, config: RoomConfig, self_id: str, send: SendInternal) -> None:
    """Prove the room password both ways: the smaller id challenges, the other answers."""
    if self_id < binding.peer_id:
        challenge = names.gen_id(CHALLENGE_LENGTH)
        await send(binding, HSDATA, {PASSWORD_FIELD: "challenge", "c": challenge})
        reply = await binding.hsdata.get()
        expected = names.password_hash(challenge, config.password, config.app_id, config.room_id)
        if not (isinstance(reply, dict) and reply.get(PASSWORD_FIELD) == "response" and reply.get("h") == expected):
            raise HandshakeFailed("wrong room password? (bad challenge response)", peer_id=binding.peer_id)
    else:
        await answer_challenge(binding, await binding.hsdata.get(), config, send)


async def answer_challenge(binding: Binding, message: Any, config: RoomConfig, send: SendInternal) -> None:
    """Answer a password challenge from the peer with the smaller id."""
    if not (isinstance(message, dict) and message.get(PASSWORD_FIELD) == "challenge"
            and isinstance(message.get("c"), str)):
        raise HandshakeFailed("expected a password challenge", peer_id=binding.peer_id)
    digest = names.password_hash(message["c"], config.password, config.app_id, config.room_id)
    await send(binding, HSDATA, {PASSWORD_FIELD: "response", "h": digest})
