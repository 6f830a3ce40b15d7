"""ICE configuration: server lists from URLs, and aioice's process-wide policy.

aioice keeps its host-address discovery and consent timing in module globals, so they cannot be
set per connection. :func:`apply_ice_policy` is therefore called once, by whoever owns the process
(``meshnode join`` / ``demo`` / the test suite), never by a room.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import aioice.ice
from aiortc import RTCIceServer

from meshnode.errors import ConfigError

__all__ = [
    "HostAddressMode",
    "IcePolicy",
    "IceServerSpec",
    "apply_ice_policy",
    "build_ice_servers",
    "install_consent_timing",
    "install_host_address_override",
    "parse_ice_url",
    "quiet_connect_teardown",
]

logger = logging.getLogger(__name__)

HostAddressMode = Literal["auto", "append", "only"]
IceServerSpec = str | dict[str, Any] | RTCIceServer

DEFAULT_DEAD_PEER_SECONDS = 8.0


@dataclass(frozen=True, kw_only=True)
class IcePolicy:
    """Which host addresses aioice gathers, and how soon a silent remote counts as gone."""

    host_addresses_mode: HostAddressMode = "auto"
    """``auto`` (aioice's own), ``append`` (its own plus `host_addresses`) or ``only``."""
    host_addresses: tuple[str, ...] = ()
    """Addresses for ``append`` / ``only``."""
    dead_peer_seconds: float = DEFAULT_DEAD_PEER_SECONDS
    """A peer that answers no ICE consent check for about this long is gone (aioice: ~30 s; a
    Trystero tab notices in ~10 s)."""

    def __post_init__(self) -> None:
        if self.host_addresses_mode not in ("auto", "append", "only"):
            raise ConfigError(f"unknown ICE host address mode {self.host_addresses_mode!r}")
        if self.host_addresses_mode == "auto" and self.host_addresses:
            raise ConfigError("ICE host addresses were given with mode 'auto', which ignores them: "
                              "use 'append' (aioice's addresses plus these) or 'only'")
        if self.host_addresses_mode == "only" and not self.host_addresses:
            raise ConfigError("ICE host address mode 'only' needs at least one address")
        if self.dead_peer_seconds <= 0:
            raise ConfigError("dead_peer_seconds must be positive")

    def describe(self) -> str:
        """For the join log: which addresses ICE gathers host candidates on."""
        if self.host_addresses_mode == "auto":
            return "aioice's own host addresses (loopback excluded)"
        listed = ", ".join(self.host_addresses)
        return listed if self.host_addresses_mode == "only" else f"aioice's own host addresses + {listed}"


def apply_ice_policy(policy: IcePolicy) -> None:
    """Install `policy` for this process (idempotent for an equal policy)."""
    install_host_address_override(policy.host_addresses_mode, policy.host_addresses)
    install_consent_timing(policy.dead_peer_seconds)


def quiet_connect_teardown(loop: asyncio.AbstractEventLoop) -> None:
    """Log aiortc's abandoned internal tasks at debug level instead of as unhandled errors.

    When a connection is closed while aiortc is still bringing it up (a peer leaves mid-join) or
    still has data queued, its internal tasks (``RTCPeerConnection.__connect``, SCTP transmit) die
    with ``ConnectionError`` and nobody awaits them, so asyncio would print "Task exception was
    never retrieved" with a traceback for an ordinary event. Everything else goes to the previous
    handler unchanged.
    """
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        task = context.get("future")
        coro = task.get_coro() if isinstance(task, asyncio.Task) else None
        code = getattr(coro, "cr_code", None)
        parts = Path(code.co_filename).parts if code is not None else ()
        if isinstance(context.get("exception"), ConnectionError) and (
            "aiortc" in parts or "aioice" in parts
        ):
            # Formatted here: a record holding the exception would keep the connection alive.
            logger.debug("aiortc task %s ended with the connection: %s",
                         getattr(coro, "__qualname__", "?"), str(context["exception"]))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


# -- process-wide aioice host-address override (test-harness §9) -----------------------------------

_original_get_host_addresses = aioice.ice.get_host_addresses
_installed_override: tuple[str, tuple[str, ...]] = ("auto", ())


def install_host_address_override(mode: HostAddressMode, addresses: Sequence[str]) -> None:
    """Change which local addresses aioice gathers host candidates on (process-wide).

    aioice drops 127.0.0.1 and ::1 (P9), so on a loopback-only host aiortc offers no candidates.

    Args:
        mode: ``auto`` — aioice's normal behaviour (restores it if an override was installed);
            ``append`` — aioice's addresses plus `addresses`; ``only`` — exactly `addresses`.
        addresses: IPv4 / IPv6 literals to add or use.
    """
    global _installed_override  # noqa: PLW0603 - aioice's own state is process-wide too
    if mode not in ("auto", "append", "only"):
        raise ValueError(f"unknown host_addresses_mode {mode!r}")
    wanted = tuple(addresses)
    if _installed_override == (mode, wanted):
        return
    _installed_override = (mode, wanted)
    if mode == "auto":
        aioice.ice.get_host_addresses = _original_get_host_addresses
        logger.info("aioice host addresses: default")
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        base = [] if mode == "only" else _original_get_host_addresses(use_ipv4, use_ipv6)
        extra = [a for a in wanted if (use_ipv6 if ":" in a else use_ipv4) and a not in base]
        return base + extra

    aioice.ice.get_host_addresses = get_host_addresses
    logger.info("aioice host addresses: %s %s", mode, ", ".join(wanted) or "(none)")


CONSENT_CHECKS = 4
"""Consecutive unanswered ICE consent checks after which a connection is dead (aioice: 6)."""


def install_consent_timing(dead_peer_seconds: float) -> None:
    """Make aioice give up on a silent remote after about `dead_peer_seconds` (process-wide).

    aioice never reports ICE ``disconnected``; a remote that vanishes without closing (a killed tab,
    a dropped network) is only noticed when consent expires: 6 unanswered checks 5 s apart, ~34 s
    measured. Chromium marks such a connection disconnected after ~5 s and Trystero drops it 5 s
    later. Here the checks run every `dead_peer_seconds` / 4 (randomised ±20 % by aioice) and four
    unanswered ones close the connection, so the node frees the peer's generations as soon as a
    Trystero tab would.
    """
    if dead_peer_seconds <= 0:
        raise ValueError("dead_peer_seconds must be positive")
    aioice.ice.CONSENT_FAILURES = CONSENT_CHECKS
    aioice.ice.CONSENT_INTERVAL = dead_peer_seconds / CONSENT_CHECKS  # type: ignore[assignment]  # a float works


def parse_ice_url(url: str) -> dict[str, Any]:
    """``turn:user:pass@host:port`` (credentials percent-encoded) → ``{urls, username, credential}``;
    other URLs → ``{urls}``. This is how settings and flags carry TURN credentials."""
    scheme, _, rest = url.partition(":")
    if "@" in rest and scheme in ("turn", "turns"):
        creds, _, host = rest.rpartition("@")
        user, _, password = creds.partition(":")
        return {"urls": f"{scheme}:{host}", "username": unquote(user), "credential": unquote(password)}
    return {"urls": url}


def build_ice_servers(servers: Sequence[IceServerSpec]) -> list[RTCIceServer]:
    """Turn ``["stun:…"]`` / ``[{"urls": …, "username": …, "credential": …}]`` into RTCIceServers.

    Always returns a list (possibly empty): aiortc falls back to a public STUN server on None (P22).
    """
    result = []
    for server in servers:
        if isinstance(server, RTCIceServer):
            result.append(server)
        elif isinstance(server, str):
            parsed = parse_ice_url(server)
            result.append(RTCIceServer(urls=parsed["urls"], username=parsed.get("username"),
                                       credential=parsed.get("credential")))
        else:
            result.append(
                RTCIceServer(
                    urls=server["urls"],
                    username=server.get("username"),
                    credential=server.get("credential"),
                )
            )
    return result
