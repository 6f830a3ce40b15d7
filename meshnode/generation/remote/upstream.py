"""An upstream engine's address and dialect, parsed from ``--engine-url``, and its errors.

The URL is ``[DIALECT+]http(s)://host:port[/prefix][?max_concurrent=N]``: ``codec`` (the default:
a Codec HTTP server such as ``meshnode serve-http``), ``vllm``, ``sglang`` or ``llamacpp``;
``max_concurrent`` is how many calls it takes at once (else discovered, else the engine default).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiohttp

from meshnode.errors import ConfigError, MeshError, ProtocolError

__all__ = ["DIALECT_NAMES", "UpstreamError", "UpstreamSpec", "parse_upstream", "read_limited"]

DIALECT_NAMES = ("codec", "vllm", "sglang", "llamacpp")
"""Known dialects, by the name used before ``+`` in an engine URL."""
DIALECT_ALIASES = {"llama.cpp": "llamacpp", "llama-cpp": "llamacpp", "meshnode": "codec"}


@dataclass(frozen=True)
class UpstreamSpec:
    """One configured upstream."""

    url: str
    """Base URL without a trailing slash, e.g. ``http://127.0.0.1:8000``."""
    dialect: str
    """One of :data:`DIALECT_NAMES`."""
    max_concurrent: int = 0
    """Calls it takes at once; 0 = discover it (or use the engine default)."""

    def __str__(self) -> str:
        return self.url if self.dialect == "codec" else f"{self.dialect}+{self.url}"


def parse_upstream(text: str) -> UpstreamSpec:
    """Parse one ``--engine-url`` value.

    Raises:
        ConfigError: Unknown dialect or scheme, no host, or a bad ``max_concurrent``.
    """
    raw = text.strip()
    dialect = "codec"
    scheme_part, sep, _ = raw.partition("://")
    if sep and "+" in scheme_part:
        dialect, _, scheme = scheme_part.rpartition("+")
        dialect = DIALECT_ALIASES.get(dialect.lower(), dialect.lower())
        raw = scheme + raw[len(scheme_part):]
    if dialect not in DIALECT_NAMES:
        raise ConfigError(f"engine URL {text!r}: unknown dialect {dialect!r} (known: {', '.join(DIALECT_NAMES)})")
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"engine URL {text!r} must look like [{'|'.join(DIALECT_NAMES)}+]http://HOST:PORT")
    limit = 0
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "max_concurrent":
            raise ConfigError(f"engine URL {text!r}: unknown parameter {key!r} (known: max_concurrent)")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"engine URL {text!r}: max_concurrent must be a positive integer")
        limit = int(value)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return UpstreamSpec(url=base, dialect=dialect, max_concurrent=limit)


class UpstreamError(MeshError):
    """An upstream failed a call: unreachable, timed out, 5xx, or sent bytes that do not parse.

    ``retryable`` says whether another upstream may take the call (only before its first token).
    """

    def __init__(self, message: str, *, url: str, retryable: bool = True, status: int | None = None) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.retryable = retryable
        self.status = status


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, refusing one longer than ``limit`` bytes (ProtocolError)."""
    body = bytearray()
    async for data in response.content.iter_any():
        body += data
        if len(body) > limit:
            raise ProtocolError(f"{response.url} sent more than {limit} bytes")
    return bytes(body)
