"""Settings precedence (defaults < file < env < flags), validation and configs/default.toml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshnode.cli.config import default_toml, describe, known_keys, load_settings
from meshnode.cli.main import FLAG_KEYS, build_parser
from meshnode.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_default_toml_is_in_step_with_settings() -> None:
    assert (ROOT / "configs" / "default.toml").read_text() == default_toml()
    settings, sources = load_settings(ROOT / "configs" / "default.toml", env={})
    defaults, _ = load_settings(None, env={})
    assert settings == defaults


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[room]\nroom = "from-file"\nstrategy = "nostr"\n[engine]\nmax_concurrent = 3\n')
    env = {"MESHNODE_ROOM__ROOM": "from-env", "MESHNODE_ENGINE__MAX_CONCURRENT": "5"}
    settings, sources = load_settings(cfg, env=env, flags={("room", "room"): "from-flag"})
    assert settings.room.room == "from-flag" and sources[("room", "room")] == "flag"
    assert settings.engine.max_concurrent == 5 and sources[("engine", "max_concurrent")].startswith("env")
    assert settings.room.strategy == "nostr" and sources[("room", "strategy")].startswith("file")
    assert settings.room.app_id == "unstable-legion-demo-v0" and sources[("room", "app_id")] == "default"


def test_legion_aliases_and_lists() -> None:
    env = {"LEGION_RELAY_URLS": "wss://a/mqtt, wss://b/mqtt", "MESHNODE_WEBRTC__ICE_SERVERS": "[]"}
    settings, _ = load_settings(None, env=env)
    assert settings.room.relays == ["wss://a/mqtt", "wss://b/mqtt"]
    assert settings.webrtc.ice_servers == []


def test_secrets_are_redacted() -> None:
    settings, sources = load_settings(None, env={"MESHNODE_ROOM__PASSWORD": "hunter2"})
    rows = {key: (value, source) for key, value, source in describe(settings, sources)}
    assert rows["room.password"] == ("***", "env MESHNODE_ROOM__PASSWORD")


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[room]\nnope = 1\n", {}, "unknown setting room.nope"),
        ("[engine]\nmax_concurrent = -1\n", {}, "engine.max_concurrent"),
        ("", {"MESHNODE_ENGINE__MAX_QUEUE": "many"}, "MESHNODE_ENGINE__MAX_QUEUE"),
        ("", {"MESHNODE_WEBRTC__HOST_ADDRESSES_MODE": "all"}, "host_addresses_mode"),
        ("not toml [", {}, "not valid TOML"),
    ],
)
def test_errors_name_key_and_source(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(cfg, env=env)


def test_every_flag_maps_to_a_real_setting() -> None:
    keys = known_keys()
    assert all(key in keys for key in FLAG_KEYS.values())
    args = build_parser().parse_args(["join", "--room", "r", "--relay", "ws://x", "--relay", "ws://y",
                                      "--ice-host-mode", "only", "--ice-host-address", "127.0.0.1"])
    from meshnode.cli.main import _flags

    settings, _ = load_settings(None, env={}, flags=_flags(args))
    assert settings.room.relays == ["ws://x", "ws://y"]
    assert settings.webrtc.host_addresses_mode == "only"


@pytest.mark.parametrize("where", ["flag", "env", "toml"])
def test_ice_host_address_alone_is_used(tmp_path: Path, where: str) -> None:
    """Issue 12.1: an address the user names is used: without a mode it means 'append'."""
    from meshnode.cli.main import _flags
    from meshnode.node.assembly import ice_policy

    cfg = tmp_path / "c.toml"
    cfg.write_text('[webrtc]\nhost_addresses = ["127.0.0.1"]\n' if where == "toml" else "")
    env = {"MESHNODE_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'} if where == "env" else {}
    argv = ["join", "--ice-host-address", "127.0.0.1"] if where == "flag" else ["join"]
    settings, _ = load_settings(cfg, env=env, flags=_flags(build_parser().parse_args(argv)))
    policy = ice_policy(settings.webrtc)
    assert (policy.host_addresses_mode, policy.host_addresses) == ("append", ("127.0.0.1",))
    assert "127.0.0.1" in policy.describe()


def test_ice_auto_with_addresses_is_a_clear_error() -> None:
    from meshnode.cli.main import _flags

    args = build_parser().parse_args(["join", "--ice-host-mode", "auto", "--ice-host-address", "10.0.0.1"])
    with pytest.raises(ConfigError, match=r"'auto' ignores webrtc.host_addresses \['10.0.0.1'\].*'append'"):
        load_settings(None, env={}, flags=_flags(args))
    settings, _ = load_settings(None, env={})
    from meshnode.node.assembly import ice_policy

    assert ice_policy(settings.webrtc).host_addresses_mode == "auto"  # nothing named: aioice's own


def test_max_concurrent_auto_depends_on_the_engine() -> None:
    from meshnode.generation.factory import resolve_max_concurrent

    settings, _ = load_settings(None, env={})
    assert settings.engine.max_concurrent == 0  # auto by default
    assert resolve_max_concurrent(0, cuda_engine=False) == 8
    assert resolve_max_concurrent(0, cuda_engine=True) == 64
    assert resolve_max_concurrent(3, cuda_engine=True) == 3


def test_verbose_enables_debug_and_quiet_only_warnings() -> None:
    """Issue 13.5: `-v` shows why a peer was dropped (DEBUG); the old mapping kept every -v at INFO."""
    import logging

    from meshnode.cli.logsetup import configure_logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        for verbosity, level in ((-2, logging.WARNING), (-1, logging.WARNING), (0, logging.INFO),
                                 (1, logging.DEBUG), (2, logging.DEBUG)):
            configure_logging(verbosity)
            assert logging.getLogger("meshnode").level == level, verbosity
            assert logging.getLogger("signaling").level == level, verbosity
        assert logging.getLogger("aiortc").level == logging.DEBUG  # -vv: the WebRTC stack too
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name in ("meshnode", "signaling", "aiortc", "aioice", "aiomqtt", "websockets"):
            logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.parametrize("text, expected", [
    ("50KB/s", 50_000.0), ("400kbit", 50_000.0), ("400 kbit/s", 50_000.0), ("1MiB/s", 1024.0 ** 2),
    ("6250", 6250.0), ("2.5MB", 2.5e6), ("8Mbit/s", 1e6), ("0", 0.0),
])
def test_uplink_takes_units(text: str, expected: float) -> None:
    settings, sources = load_settings(None, env={}, flags={("link", "uplink_bytes_per_second"): text})
    assert settings.link.uplink_bytes_per_second == pytest.approx(expected)
    assert sources[("link", "uplink_bytes_per_second")] == "flag"


@pytest.mark.parametrize("text, message", [
    ("400kbps", "ambiguous"), ("50kb/s", "ambiguous"), ("fast", "byte rate like"), ("5 furlongs", "unknown unit"),
    ("-3KB/s", "byte rate like"),
])
def test_uplink_refuses_what_it_cannot_read(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, env={"MESHNODE_LINK__UPLINK_BYTES_PER_SECOND": text})


def test_uplink_from_file_env_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[link]\nuplink_bytes_per_second = "50KB/s"\n')
    settings, _ = load_settings(path, env={})
    assert settings.link.uplink_bytes_per_second == 50_000
    settings, _ = load_settings(path, env={"MESHNODE_LINK__UPLINK_BYTES_PER_SECOND": "100kbit"})
    assert settings.link.uplink_bytes_per_second == 12_500
    args = build_parser().parse_args(["join", "--uplink", "20KB/s", "--config", str(path)])
    from meshnode.cli.main import _flags

    settings, _ = load_settings(args.config, env={}, flags=_flags(args))
    assert settings.link.uplink_bytes_per_second == 20_000


def test_every_shipped_config_loads() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.toml")):
        load_settings(path, env={})
    settings, _ = load_settings(root / "uplink-50KBps.toml", env={})
    assert settings.link.uplink_bytes_per_second == 50_000


def test_relay_only_ice_needs_a_turn_server() -> None:
    with pytest.raises(ConfigError, match="needs a turn: server"):
        load_settings(None, env={}, flags={("webrtc", "ice_transport_policy"): "relay"})
    settings, _ = load_settings(None, env={}, flags={("webrtc", "ice_transport_policy"): "relay",
                                                     ("webrtc", "ice_servers"): ["turn:u:p@127.0.0.1:3478"]})
    assert settings.webrtc.ice_transport_policy == "relay"


# --- engine.upstreams (issue 16) -------------------------------------------------------------------


def test_engine_urls_from_flags_env_and_file(tmp_path: Path) -> None:
    from meshnode.cli.main import _flags, build_parser

    args = build_parser().parse_args(["join", "--engine-url", "http://a:1", "--engine-url", "vllm+http://b:2",
                                      "--tokenizer", "/tok"])
    settings, sources = load_settings(None, env={}, flags=_flags(args))
    assert settings.engine.upstreams == ["http://a:1", "vllm+http://b:2"] and settings.engine.tokenizer == "/tok"
    assert sources[("engine", "upstreams")] == "flag"
    settings, _ = load_settings(None, env={"MESHNODE_ENGINE__UPSTREAMS": "http://a:1,sglang+http://c:3"})
    assert settings.engine.upstreams == ["http://a:1", "sglang+http://c:3"]
    toml = tmp_path / "m.toml"
    toml.write_text('[engine]\nupstreams = ["llamacpp+http://d:4?max_concurrent=2"]\n')
    assert load_settings(toml, env={})[0].engine.upstreams == ["llamacpp+http://d:4?max_concurrent=2"]


@pytest.mark.parametrize(("flags", "match"), [
    ({("engine", "upstreams"): ["tgi+http://a:1"]}, "unknown dialect"),
    ({("engine", "upstreams"): ["http://a:1"], ("model", "model"): "embedded"}, "model.model"),
    ({("engine", "upstreams"): ["http://a:1"], ("model", "device"): "cuda"}, "model.device"),
    ({("engine", "upstreams"): ["http://a:1"], ("engine", "max_batch_tokens"): 10}, "max_batch_tokens"),
    ({("engine", "tokenizer"): "/tok"}, "only used with engine.upstreams"),
])
def test_settings_that_would_be_ignored_beside_upstreams_are_errors(flags: dict[Any, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(None, env={}, flags=flags)
