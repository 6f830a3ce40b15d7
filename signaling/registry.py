"""Relay adapters by strategy name, and Trystero's default relay URLs.

The strategy is explicit configuration, never guessed from a URL: ws-relay, Nostr, MQTT and trackers
all use ``wss://`` URLs. Built-in adapters are imported lazily (only the one asked for). Third-party
adapters register in the ``meshnode.signaling`` entry-point group, ``name = "module:Class"``::

    [project.entry-points."meshnode.signaling"]
    my-relay = "my_package.relay:MyRelay"

A built-in name always resolves to the built-in adapter; an entry point that tries to take a
built-in name over is ignored with a warning.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from signaling.base import SignalingError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "meshnode.signaling"

BUILTIN_ADAPTERS: dict[str, str] = {
    "mqtt": "signaling.adapters.mqtt:MqttRelay",
    "nostr": "signaling.adapters.nostr:NostrRelay",
    "ws-relay": "signaling.adapters.wsrelay:WsRelay",
    "torrent": "signaling.adapters.torrent:TrackerClient",
    "memory": "signaling.adapters.memory:MemoryRelay",
}
"""Strategy name -> ``module:attribute`` of the adapter class."""

DEFAULT_RELAYS: dict[str, list[str]] = {
    # The Unstable Legion brokers (legion-mesh §5.10): Trystero's default MQTT list (trystero-wire
    # §6.2) minus the hosts Legion blocks (test.mosquitto.org, broker-cn.emqx.io). Browsers of the
    # Legion apps pass exactly these as relayConfig.urls, so meshnode must use the same brokers to
    # meet them. (The chat product prepends wss://signal.quasarke.net/mqtt.)
    "mqtt": [
        "wss://broker.emqx.io:8084/mqtt",
        "wss://public:public@public.cloud.shiftr.io",
        "wss://broker.hivemq.com:8884/mqtt",
    ],
    # Trystero 0.25.3's default trackers, all three used (defaultRedundancy = 3, not shuffled;
    # trystero-wire §6.4). 0.24.0-0.25.2 used tracker.webtorrent.dev, tracker.openwebtorrent.com
    # and tracker.btorrent.xyz.
    "torrent": [
        "wss://open.ftorrent.com",
        "wss://tracker.webtorrent.dev",
        "wss://tracker.openwebtorrent.com",
    ],
    # Trystero has no single Nostr default: it shuffles its built-in list (47 relays in 0.25.3, a
    # different list in each version) with a seed derived from the appId and uses the first 5
    # (trystero-wire §6.3), so two apps - or two Trystero versions - generally pick different
    # relays. meshnode cannot meet a browser that relies on that shuffle unless both sides are
    # configured with the same explicit relayConfig.urls; these are a short explicit list of large
    # public relays that are also in Trystero's pool.
    "nostr": [
        "wss://nos.lol",
        "wss://relay.damus.io",
        "wss://relay.nostr.place",
    ],
    # ws-relay has no public default (Trystero requires relayConfig.urls, §6.1); run `meshnode relay`.
    "ws-relay": [],
    # In-process hub for tests: no URLs.
    "memory": [],
}
"""Default relay URLs per strategy; only defaults, overridden by configuration."""


class UnknownAdapterError(SignalingError, LookupError):
    """No relay adapter is registered under the requested name."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown relay strategy {name!r}; known: {', '.join(known) or 'none'}")


class AdapterLoadError(SignalingError):
    """A registered adapter could not be imported, or is not a class."""

    def __init__(self, name: str, target: str, reason: str = "cannot import it") -> None:
        self.name = name
        self.target = target
        super().__init__(f"cannot load relay adapter {name!r} from {target!r}: {reason}")


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        builtin = BUILTIN_ADAPTERS.get(entry_point.name)
        if builtin is not None:
            if entry_point.value.replace(" ", "") != builtin:
                logger.warning(
                    "ignoring entry point %s = %s: %r is a built-in relay strategy",
                    entry_point.name,
                    entry_point.value,
                    entry_point.name,
                )
            continue
        found.setdefault(entry_point.name, entry_point)
    return found


def adapter_names() -> list[str]:
    """All known strategy names: built-ins first, then third-party entry points, sorted."""
    return list(BUILTIN_ADAPTERS) + sorted(_entry_points())


def get_adapter_class(name: str) -> type:
    """The adapter class registered under `name`.

    Args:
        name: strategy name (``mqtt``, ``nostr``, ``ws-relay``, ``torrent``, ``memory`` or a
            third-party entry point's name).

    Returns:
        The class; construct it as ``cls(url, backoff=..., **options)``.

    Raises:
        UnknownAdapterError: no adapter has that name (the message lists the known names).
        AdapterLoadError: the adapter's module could not be imported or lacks the class.
    """
    target = BUILTIN_ADAPTERS.get(name)
    if target is not None:
        module_name, _, attribute = target.partition(":")
        try:
            loaded: object = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise AdapterLoadError(name, target) from exc
    else:
        entry_point = _entry_points().get(name)
        if entry_point is None:
            raise UnknownAdapterError(name, adapter_names())
        target = entry_point.value
        try:
            loaded = entry_point.load()
        except (ImportError, AttributeError) as exc:
            raise AdapterLoadError(name, target) from exc
    if not isinstance(loaded, type):
        raise AdapterLoadError(name, target, f"{loaded!r} is not a class")
    return loaded


def build_relays(strategy: str, urls: Sequence[str] = ()) -> list[Any]:
    """One adapter per URL for `strategy`; no URLs means the strategy's public defaults.

    Raises:
        SignalingError: the strategy is unknown or has no default relays (the message says so),
            or an adapter refused its URL.
    """
    chosen = list(urls) or list(DEFAULT_RELAYS.get(strategy, []))
    if strategy == "memory" and not chosen:
        chosen = ["memory://default"]
    if not chosen:
        raise SignalingError(f"no relay URLs given and {strategy!r} has no public defaults")
    adapter = get_adapter_class(strategy)
    try:
        return [adapter(url) for url in chosen]
    except ValueError as exc:
        raise SignalingError(f"{strategy} relay: {exc}") from exc
