"""load_settings(): defaults < TOML file < environment < command-line flags.

The environment is read here and nowhere else. Keys are `MESHNODE_<SECTION>__<KEY>` (for example
`MESHNODE_ROOM__PASSWORD`), plus the reference Legion bridge's `LEGION_*` names where they mean the
same thing. Every value remembers where it came from, so `meshnode config show` can say.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meshnode.errors import ConfigError
from meshnode.settings import SECRET_KEYS, ByteRate, Settings

Key = tuple[str, str]

# Names used by the reference Node bridge (legion-mesh §5.10) → our keys.
LEGION_ALIASES: dict[str, Key] = {
    "LEGION_RELAY_URLS": ("room", "relays"),
    "LEGION_ROOM": ("room", "room"),
    "LEGION_ROOM_ID": ("room", "room"),
    "LEGION_APP_ID": ("room", "app_id"),
    "LEGION_PASSWORD": ("room", "password"),
    "LEGION_NICK": ("legion", "nick"),
    "LEGION_SKILLS": ("legion", "skills"),
}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {name: hints[name] for name in hints}


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def known_keys() -> dict[Key, Any]:
    """Every (section, key) with its type."""
    out: dict[Key, Any] = {}
    for section, cls in _section_types().items():
        for key, typ in _field_types(cls).items():
            out[(section, key)] = typ
    return out


def env_name(key: Key) -> str:
    return f"MESHNODE_{key[0].upper()}__{key[1].upper()}"


def _coerce(value: Any, typ: Any, key: Key, source: str) -> Any:
    """Convert a TOML/env/flag value to the field's type; ConfigError names key and source."""
    where = f"{key[0]}.{key[1]} (from {source})"
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"expected a boolean, got {value!r}")
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if typ is ByteRate:
            return ByteRate.parse(value)
        if typ is float:
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            return value
        if typing.get_origin(typ) is list:
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("["):
                    value = json.loads(text)
                else:
                    value = [part.strip() for part in text.split(",") if part.strip()]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"expected a list of strings, got {value!r}")
            return list(value)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"invalid value for {where}: {exc}") from exc
    raise ConfigError(f"unsupported type for {where}")


def load_settings(
    config_file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[Key, Any] | None = None,
) -> tuple[Settings, dict[Key, str]]:
    """Build the effective settings and the source of every value.

    Args:
        config_file: optional TOML file with `[section]` tables.
        env: the environment (defaults to os.environ; tests pass their own).
        flags: command-line values by (section, key); None values are ignored.

    Returns:
        (settings, sources) where sources maps (section, key) to "default", "file <path>",
        "env NAME" or "flag".
    """
    import os

    env = os.environ if env is None else env
    types = known_keys()
    values: dict[Key, Any] = {}
    sources: dict[Key, str] = {key: "default" for key in types}

    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                if (section, key) not in types:
                    raise ConfigError(f"{path}: unknown setting {section}.{key}")
                source = f"file {path}"
                values[(section, key)] = _coerce(value, types[(section, key)], (section, key), source)
                sources[(section, key)] = source

    for name, key in LEGION_ALIASES.items():
        if name in env:
            values[key] = _coerce(env[name], types[key], key, f"env {name}")
            sources[key] = f"env {name}"
    for key, typ in types.items():
        name = env_name(key)
        if name in env:
            values[key] = _coerce(env[name], typ, key, f"env {name}")
            sources[key] = f"env {name}"

    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in types:
            raise ConfigError(f"unknown setting {key[0]}.{key[1]} given as a flag")
        values[key] = _coerce(value, types[key], key, "flag")
        sources[key] = "flag"

    sections: dict[str, Any] = {}
    for section, cls in _section_types().items():
        kwargs = {k: v for (s, k), v in values.items() if s == section}
        sections[section] = cls(**kwargs)
    settings = Settings(**sections)
    _validate(settings, sources)
    return settings, sources


def _validate(settings: Settings, sources: dict[Key, str]) -> None:
    def bad(key: Key, why: str) -> ConfigError:
        return ConfigError(f"{key[0]}.{key[1]} (from {sources[key]}): {why}")

    webrtc = settings.webrtc
    if webrtc.host_addresses_mode not in {"", "auto", "append", "only"}:
        raise bad(("webrtc", "host_addresses_mode"), "must be auto, append or only")
    if webrtc.host_addresses_mode == "auto" and webrtc.host_addresses:
        raise bad(("webrtc", "host_addresses_mode"), f"'auto' ignores webrtc.host_addresses "
                  f"{webrtc.host_addresses} (from {sources[('webrtc', 'host_addresses')]}): use 'append' "
                  "(aioice's addresses plus these) or 'only' (these alone), or leave the mode unset")
    if webrtc.ice_transport_policy not in {"all", "relay"}:
        raise bad(("webrtc", "ice_transport_policy"), "must be all or relay")
    if webrtc.ice_transport_policy == "relay" and not any(url.startswith(("turn:", "turns:"))
                                                          for url in webrtc.ice_servers):
        raise bad(("webrtc", "ice_transport_policy"), "'relay' needs a turn: server in webrtc.ice_servers "
                  "(--ice-server turn:USER:PASS@HOST:PORT)")
    if settings.link.max_delay_ms < 50:
        raise bad(("link", "max_delay_ms"), "must be at least 50 (the pacer's shortest window)")
    if webrtc.host_addresses_mode == "only" and not webrtc.host_addresses:
        raise bad(("webrtc", "host_addresses_mode"), "'only' needs webrtc.host_addresses (--ice-host-address)")
    for key in [
        ("engine", "max_prompt_tokens"),
        ("engine", "max_tokens"),
        ("engine", "default_max_tokens"),
        ("legion", "max_calls_per_peer"),
        ("legion", "calls_per_minute"),
        ("legion", "frame_max_ids"),
        ("limits", "max_message_bytes"),
        ("limits", "max_pending_messages_per_peer"),
        ("limits", "max_pending_bytes_per_peer"),
        ("limits", "max_queued_messages_per_peer"),
        ("limits", "max_queued_bytes_per_peer"),
        ("limits", "max_strikes_per_minute"),
        ("limits", "max_prompt_chars"),
    ]:
        if getattr(getattr(settings, key[0]), key[1]) < 1:
            raise bad(key, "must be at least 1")
    for key in [("engine", "max_queue"), ("engine", "max_concurrent"), ("engine", "context_tokens"),
                ("engine", "prefill_budget_tokens")]:
        if getattr(settings.engine, key[1]) < 0:
            raise bad(key, "must not be negative")
    for key in [("engine", "max_batch_tokens"), ("engine", "prefix_cache_mib"),
                ("limits", "peer_rate_bytes_per_second"), ("limits", "peer_rate_messages_per_second"),
                ("limits", "max_connections"),
                ("limits", "ban_seconds")]:
        if getattr(getattr(settings, key[0]), key[1]) < 0:
            raise bad(key, "must not be negative (0 turns it off)")
    _validate_placement(settings, sources, bad)
    _validate_upstreams(settings, sources, bad)
    limits = settings.limits
    if limits.max_message_bytes > limits.max_pending_bytes_per_peer:
        raise bad(("limits", "max_message_bytes"), "must not exceed limits.max_pending_bytes_per_peer")
    if not settings.room.room:
        raise bad(("room", "room"), "must not be empty")
    if not 0 < settings.http.port < 65536:
        raise bad(("http", "port"), "must be a TCP port")


def _validate_placement(settings: Settings, sources: dict[Key, str], bad: Callable[[Key, str], ConfigError]) -> None:
    """model.device_map is one of accelerate's strategies, max_memory parses, and neither comes alone
    with a setting it contradicts (a fixed device; a budget without a map)."""
    from meshnode.generation.placement import DEVICE_MAPS, parse_max_memory

    model = settings.model
    if model.device_map and model.device_map not in DEVICE_MAPS:
        raise bad(("model", "device_map"), f"must be one of {', '.join(DEVICE_MAPS)} (or empty: one device)")
    try:
        parse_max_memory(model.max_memory)
    except ValueError as exc:
        raise bad(("model", "max_memory"), str(exc)) from None
    if model.max_memory and not model.device_map:
        raise bad(("model", "max_memory"), "needs model.device_map (--device-map auto)")
    if model.device_map and model.device != "auto":
        raise bad(("model", "device"), f"must stay auto with model.device_map (from "
                  f"{sources[('model', 'device_map')]}): the map places the model itself")


def _validate_upstreams(settings: Settings, sources: dict[Key, str], bad: Callable[[Key, str], ConfigError]) -> None:
    """engine.upstreams parse, and no setting of the local model is given beside them (it would be ignored)."""
    from meshnode.generation.remote.upstream import parse_upstream

    engine = settings.engine
    if engine.upstream_timeout_seconds <= 0:
        raise bad(("engine", "upstream_timeout_seconds"), "must be positive")
    if not engine.upstreams:
        if engine.tokenizer:
            raise bad(("engine", "tokenizer"), "is only used with engine.upstreams (--engine-url)")
        return
    for url in engine.upstreams:
        try:
            parse_upstream(url)
        except ConfigError as exc:
            raise bad(("engine", "upstreams"), str(exc)) from None
    defaults = Settings()
    local_only = [("model", "model"), ("model", "device"), ("model", "dtype"), ("model", "cache_dir"),
                  ("model", "device_map"), ("model", "max_memory"), ("engine", "max_prompt_tokens"),
                  ("engine", "max_batch_tokens")]
    for key in local_only:
        value = getattr(getattr(settings, key[0]), key[1])
        if (key == ("model", "model") and sources[key] != "default") or value != getattr(
                getattr(defaults, key[0]), key[1]):
            raise bad(key, f"is a setting of the local model, which engine.upstreams replace "
                      f"(from {sources[('engine', 'upstreams')]}): give one or the other")


def describe(settings: Settings, sources: dict[Key, str]) -> list[tuple[str, str, str]]:
    """(key, value, source) rows with secrets redacted, for `meshnode config show`."""
    rows = []
    for section in dataclasses.fields(settings):
        obj = getattr(settings, section.name)
        for f in dataclasses.fields(obj):
            key = (section.name, f.name)
            value = getattr(obj, f.name)
            shown = "***" if key in SECRET_KEYS and value else json.dumps(value)
            rows.append((f"{section.name}.{f.name}", shown, sources.get(key, "default")))
    return rows


def field_docs() -> dict[Key, str]:
    """Attribute docstrings of meshnode/settings.py, read from its source with ast."""
    import ast
    import inspect

    from meshnode import settings as settings_module

    tree = ast.parse(inspect.getsource(settings_module))
    class_to_section = {cls.__name__: name for name, cls in _section_types().items()}
    docs: dict[Key, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name not in class_to_section:
            continue
        body = node.body
        for stmt, nxt in zip(body, body[1:] + [None], strict=True):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[(class_to_section[node.name], stmt.target.id)] = nxt.value.value.strip()
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def default_toml() -> str:
    """The text of configs/default.toml: every key with its default and documentation."""
    docs = field_docs()
    defaults = Settings()
    lines = [
        "# meshnode configuration: every key with its default.",
        "# Precedence: defaults < this file (--config FILE) < environment"
        " (MESHNODE_<SECTION>__<KEY>) < flags.",
        "# Generated by `meshnode config default`; tests keep it in step with meshnode/settings.py.",
    ]
    for section in dataclasses.fields(defaults):
        lines += ["", f"[{section.name}]"]
        obj = getattr(defaults, section.name)
        for f in dataclasses.fields(obj):
            doc = docs.get((section.name, f.name), "")
            for doc_line in doc.splitlines():
                lines.append(f"# {doc_line.strip()}")
            lines.append(f"# env: {env_name((section.name, f.name))}")
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
    return "\n".join(lines) + "\n"
