"""Settings → components: the one place that turns configuration into room, service and ICE objects.

Settings sections and component configs share field names, so :func:`pick` copies every field a
component has from the sections given; only what is named differently on purpose (the room id,
its relays) is passed explicitly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from meshnode.legion.service import ServiceConfig
from meshnode.link.costs import PacingConfig
from meshnode.link.pacer import Pacer
from meshnode.room import RoomConfig
from meshnode.settings import LinkSettings, Settings, WebRTCSettings
from meshnode.transport.ice import IcePolicy

__all__ = ["ice_policy", "pick", "room_config", "service_config", "stream_policy"]

T = TypeVar("T")


def pick(cls: type[T], *sections: Any, **explicit: Any) -> T:
    """`cls` built from the same-named fields of `sections` (later sections win), then `explicit`."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for section in sections:
        values.update({f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names})
    values.update(explicit)
    return cls(**values)


def room_config(settings: Settings, **overrides: Any) -> RoomConfig:
    """The RoomConfig for the configured room (defaults: the Unstable Legion classic demo)."""
    r = settings.room
    # Per-peer limits against hostile room members (docs/limits.md) come from [limits].
    explicit: dict[str, Any] = {"strategy": r.strategy, "relay_urls": list(r.relays), "app_id": r.app_id,
                                "room_id": r.room, "password": r.password,
                                "ice_servers": list(settings.webrtc.ice_servers),
                                "ice_transport_policy": settings.webrtc.ice_transport_policy}
    explicit.update(overrides)
    return pick(RoomConfig, settings.limits, **explicit)


def service_config(settings: Settings, *, nick: str, model_id: str) -> ServiceConfig:
    return pick(ServiceConfig, settings.engine, settings.legion, settings.limits, nick=nick, model_id=model_id,
                skills=list(settings.legion.skills), authoritative=list(settings.legion.authoritative),
                flip_caps_to_all=settings.link.uplink_bytes_per_second <= 0)


def ice_policy(webrtc: WebRTCSettings) -> IcePolicy:
    """The process-wide ICE policy: addresses given without a mode mean ``append``."""
    mode = webrtc.host_addresses_mode or ("append" if webrtc.host_addresses else "auto")
    return IcePolicy(host_addresses_mode=mode, host_addresses=tuple(webrtc.host_addresses))  # type: ignore[arg-type]


def stream_policy(link: LinkSettings) -> Pacer | None:
    """The link policy [link] describes: a :class:`Pacer` on the uplink budget, or None (unlimited:
    the service's own frames of up to ``frame_max_ids`` ids every ``frame_max_delay_ms``)."""
    if link.uplink_bytes_per_second <= 0:
        return None
    return Pacer(PacingConfig(budget_bytes_per_second=float(link.uplink_bytes_per_second),
                              max_window_seconds=link.max_delay_ms / 1000))
