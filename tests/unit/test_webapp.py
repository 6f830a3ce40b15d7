"""meshnode.node.webapp: /config.json (never the password), map routes with exact bytes, static client,
and a clear error when the client is not built. No model, no browser (a stub node)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshnode.cli.config import load_settings
from meshnode.errors import ConfigError
from meshnode.generation.api import CodecMapInfo
from meshnode.node.webapp import WebApp, browser_ice_servers, client_config, start_web

MAP_BYTES = b'{\n  "id": "huggingfacetb/smollm2",\n  "vocab": {\n    "a": 0\n  }\n}'


MAP = CodecMapInfo(map_id="huggingfacetb/smollm2", map_hash="sha256:" + hashlib.sha256(MAP_BYTES).hexdigest(),
                   data=MAP_BYTES)


class _Backend:
    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"

    async def codec_map(self) -> CodecMapInfo:
        return MAP


class _Node:
    backend = _Backend()
    model_id = backend.model_id
    codec_map = MAP
    room = None
    service = None


def _settings(**flags: Any) -> Any:
    base = {("room", "strategy"): "mqtt", ("webrtc", "ice_servers"): []}
    base.update({tuple(k.split(".")): v for k, v in flags.items()})
    settings, _ = load_settings(None, env={}, flags=base)
    return settings


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text("<!doctype html><title>client</title>")
    (tmp_path / "app.js").write_text("export {}")
    return tmp_path


def test_config_never_carries_the_password() -> None:
    settings = _settings(**{"room.password": "hunter2",
                            "webrtc.ice_servers": ["stun:127.0.0.1:3478", "turn:u%40x:p@127.0.0.1:3478"]})
    config = client_config(_Node(), settings)
    assert "hunter2" not in json.dumps(config)
    assert config["passwordRequired"] is True
    assert config["strategy"] == "mqtt" and config["relayUrls"], config  # defaults = the node's relays
    assert config["iceServers"] == [{"urls": "stun:127.0.0.1:3478"},
                                    {"urls": "turn:127.0.0.1:3478", "username": "u@x", "credential": "p"}]
    assert config["node"]["mapId"] == "huggingfacetb/smollm2"


def test_browser_ice_servers_keeps_plain_urls() -> None:
    assert browser_ice_servers(["stun:a:1", "turns:b:2"]) == [{"urls": "stun:a:1"}, {"urls": "turns:b:2"}]


async def test_routes(dist: Path) -> None:
    settings = _settings(**{"room.relays": ["ws://127.0.0.1:9/"], "room.room": "r1", "room.app_id": "app"})
    async with TestClient(TestServer(WebApp(_Node(), settings, dist).make_app())) as client:
        index = await client.get("/")
        assert index.status == 200 and "client" in await index.text()
        assert "default-src 'self'" in index.headers["Content-Security-Policy"]
        assert (await client.get("/app.js")).status == 200
        assert (await client.get("/../secret")).status in {403, 404}
        config = await (await client.get("/config.json")).json()
        assert (config["relayUrls"], config["roomId"], config["appId"]) == (["ws://127.0.0.1:9/"], "r1", "app")
        assert config["passwordRequired"] is False
        maps = await (await client.get("/.well-known/codec/index.json")).json()
        assert maps["maps"] == [{"id": MAP.map_id, "url": f"/.well-known/codec/maps/{MAP.map_id}.json",
                                 "hash": MAP.map_hash}]
        doc = await client.get(f"/.well-known/codec/maps/{MAP.map_id}.json")
        assert doc.status == 200 and await doc.read() == MAP_BYTES
        assert doc.headers["Codec-Tokenizer-Map"] == MAP.map_hash
        assert (await client.get("/.well-known/codec/maps/qwen/qwen2.json")).status == 404


async def test_start_web_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scripts/build-client.sh"):
        await start_web(_Node(), _settings(), 0, dist=tmp_path / "missing")


async def test_start_web_binds_loopback(dist: Path) -> None:
    runner = await start_web(_Node(), _settings(), 0, dist=dist)
    try:
        host, port = runner.addresses[0][:2]
        assert host == "127.0.0.1" and port > 0
    finally:
        await runner.cleanup()
