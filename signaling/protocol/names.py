"""Names, keys and ids derived from (appId, roomId, password) exactly as Trystero derives them.

Pure functions, no I/O (trystero-wire §2, §3). Every value here is compared byte for byte by
browser peers, so each formula cites the spec row it implements.
"""

from __future__ import annotations

import hashlib
import random
import secrets

__all__ = [
    "ID_ALPHABET",
    "LIBRARY_NAME",
    "b36_digest",
    "gen_id",
    "info_hash",
    "nostr_kind",
    "password_hash",
    "room_token",
    "root_topic",
    "self_topic",
    "signalling_key",
]

LIBRARY_NAME = "Trystero"
"""The literal library name that prefixes every topic path and the room token (§3.1)."""

ID_ALPHABET = "0123456789AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVvWwXxYyZz"
"""The 62-character alphabet of Trystero ids (§2); interleaved case, picks are uniform."""

_B36_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_SYSTEM_RANDOM = secrets.SystemRandom()


def gen_id(length: int, rng: random.Random | None = None) -> str:
    """Return `length` uniform picks from :data:`ID_ALPHABET` (§2).

    Args:
        length: number of characters (20 for peer ids, 12 for offer ids, 36 for challenges).
        rng: source of randomness; defaults to the operating system's CSPRNG (Trystero uses
            ``Math.random``; a stronger source is wire-compatible).
    """
    if length < 0:
        raise ValueError("length must be >= 0")
    pick = (rng or _SYSTEM_RANDOM).choice
    return "".join(pick(ID_ALPHABET) for _ in range(length))


def _to_b36(value: int) -> str:
    if value == 0:
        return "0"
    digits = []
    while value:
        value, rest = divmod(value, 36)
        digits.append(_B36_DIGITS[rest])
    return "".join(reversed(digits))


def b36_digest(text: str) -> str:
    """SHA-1 of the UTF-8 text, each byte written in unpadded lower-case base 36 (§3.1).

    The result is 20-40 characters and not uniquely decodable; it is only ever compared.
    """
    return "".join(_to_b36(byte) for byte in hashlib.sha1(text.encode()).digest())  # noqa: S324 - Trystero's topic hash


def root_topic(app_id: str, room_id: str) -> str:
    """The room's root topic: b36 SHA-1 of ``Trystero@APP@ROOM`` (§3.1)."""
    return b36_digest(f"{LIBRARY_NAME}@{app_id}@{room_id}")


def self_topic(app_id: str, room_id: str, peer_id: str) -> str:
    """A peer's self topic in a room: b36 SHA-1 of ``Trystero@APP@ROOM@ID`` (§3.1)."""
    return b36_digest(f"{LIBRARY_NAME}@{app_id}@{room_id}@{peer_id}")


def signalling_key(password: str, app_id: str, room_id: str) -> bytes:
    """The 32-byte AES-256-GCM key: SHA-256 of ``PW:APP:ROOM`` (``:APP:ROOM`` without password)."""
    return hashlib.sha256(f"{password}:{app_id}:{room_id}".encode()).digest()


def room_token(app_id: str, room_id: str) -> str:
    """The data-channel room token: lower-case hex SHA-256 of ``Trystero:APP:ROOM`` (§3.1, §8.1)."""
    return hashlib.sha256(f"{LIBRARY_NAME}:{app_id}:{room_id}".encode()).hexdigest()


def password_hash(challenge: str, password: str, app_id: str, room_id: str) -> str:
    """The password-handshake response: hex SHA-256 of ``c:PW:APP:ROOM`` (§3.1, §8.6)."""
    return hashlib.sha256(f"{challenge}:{password}:{app_id}:{room_id}".encode()).hexdigest()


def nostr_kind(topic: str) -> int:
    """The ephemeral Nostr event kind of a topic: 20000 + (sum of UTF-16 code units) mod 10000."""
    units = topic.encode("utf-16-le")
    total = sum(int.from_bytes(units[i : i + 2], "little") for i in range(0, len(units), 2))
    return 20000 + total % 10000


def info_hash(topic: str) -> str:
    """The WebTorrent ``info_hash`` of a (root) topic: first 20 chars of b36 SHA-1 of it (§3.1)."""
    return b36_digest(topic)[:20]
