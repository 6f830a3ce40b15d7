"""The ``iv$base64`` AES-GCM codec for SDPs and candidates on relays (trystero-wire §4).

Pure: no I/O. Format: the 16 IV bytes as decimals joined by ``,``, then ``$``, then standard
base64 (with padding) of ciphertext + 16-byte tag; no associated data.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signaling.base import SignalingError

__all__ = ["IV_BYTES", "SealError", "Sealer", "seal", "unseal"]

IV_BYTES = 16
"""Trystero uses a 128-bit IV, not the usual 96 bits (§4, pitfall P6)."""
MAX_SEALED_CHARS = 256 * 1024
"""Sealed texts longer than this are refused before decoding (a sealed SDP is a few KB)."""


class SealError(SignalingError):
    """A sealed string is malformed or fails authentication (wrong key, i.e. wrong password)."""


class Sealer:
    """Seals and unseals text with one signalling key (SHA-256 of ``PW:APP:ROOM``)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("signalling key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, iv: bytes | None = None) -> str:
        """Encrypt `plaintext`; `iv` (16 bytes) is random unless given (tests only)."""
        nonce = os.urandom(IV_BYTES) if iv is None else iv
        if len(nonce) != IV_BYTES:
            raise ValueError("iv must be 16 bytes")
        sealed = self._aead.encrypt(nonce, plaintext.encode(), None)
        return ",".join(str(b) for b in nonce) + "$" + base64.b64encode(sealed).decode("ascii")

    def unseal(self, text: str) -> str:
        """Decrypt a sealed string.

        Raises:
            SealError: the text is malformed, or authentication failed (wrong key). Callers treat
                both the same way: drop the message (§4).
        """
        if len(text) > MAX_SEALED_CHARS:
            raise SealError(f"sealed text longer than {MAX_SEALED_CHARS} characters")
        iv_text, sep, body = text.partition("$")  # split on the first "$" (§4)
        if not sep:
            raise SealError("sealed text has no '$'")
        try:
            if len(iv_text) > 4 * IV_BYTES * 4:  # 16 decimals of <= 3 digits and commas, with slack
                raise ValueError("IV text too long")
            iv = bytes(int(part) for part in iv_text.split(","))
            data = base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise SealError(f"malformed sealed text: {exc}") from exc
        if not iv:
            raise SealError("empty IV")
        try:
            return self._aead.decrypt(iv, data, None).decode()
        except InvalidTag as exc:
            raise SealError("authentication failed (wrong key)") from exc
        except UnicodeDecodeError as exc:
            raise SealError("plaintext is not UTF-8") from exc
        except ValueError as exc:  # e.g. IV length the library refuses
            raise SealError(f"cannot decrypt: {exc}") from exc


def seal(key: bytes, plaintext: str, iv: bytes | None = None) -> str:
    """One-shot :meth:`Sealer.seal`."""
    return Sealer(key).seal(plaintext, iv)


def unseal(key: bytes, text: str) -> str:
    """One-shot :meth:`Sealer.unseal`."""
    return Sealer(key).unseal(text)
