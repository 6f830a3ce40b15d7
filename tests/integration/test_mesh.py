"""A meshnode serving a room through real relays, asked by a Python peer (`meshnode ask` logic).

Real aiortc on 127.0.0.1, real relays, the real embedded model: the streamed, detokenized text must
equal what the engine generates locally for the same request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from meshnode.cli.config import load_settings
from meshnode.legion.client import ask
from meshnode.node.assembly import room_config
from meshnode.node.node import Node
from meshnode.room import Room
from tests.fixtures_model import embedded_loaded, local_text, make_backend  # noqa: F401

pytestmark = [pytest.mark.model, pytest.mark.integration]

LOOPBACK = {"ice_servers": []}
QUESTION = "What is the capital of France? Answer in one short sentence."


def settings_for(strategy: str, url: str, room: str) -> Any:
    settings, _ = load_settings(None, env={}, flags={("room", "strategy"): strategy, ("room", "relays"): [url],
                                                     ("room", "room"): room, ("room", "app_id"): "meshnode-test",
                                                     ("webrtc", "ice_servers"): [], ("webrtc", "host_addresses"): ["127.0.0.1"]})
    return settings


@pytest.mark.parametrize("strategy", ["ws-relay", "mqtt"])
async def test_ask_prints_what_the_node_generates(embedded_loaded: Any, strategy: str, wsrelay_server: Any,
                                                  mqtt_broker: Any, tmp_path: Path, request: Any) -> None:
    url = wsrelay_server.url if strategy == "ws-relay" else mqtt_broker.ws_url
    settings = settings_for(strategy, url, f"mesh-{request.node.name}")
    async with asyncio.timeout(120):
        async with make_backend(embedded_loaded, max_concurrent=4) as backend:
            expected = await local_text(backend, QUESTION, 32)
            node = Node(settings, backend, room_overrides=LOOPBACK)
            stop = asyncio.Event()
            serving = asyncio.create_task(node.run(stop, drain_seconds=2))
            await node.started.wait()
            asker = await Room.join(room_config(settings, **LOOPBACK))
            pieces: list[str] = []
            try:
                content = await ask(asker, QUESTION, system=None, max_tokens=32, temperature=0, timeout=60,
                                    cache_dir=tmp_path / "maps", write=pieces.append)
            finally:
                await asker.leave()
                stop.set()
                await serving
    assert "".join(pieces) == expected
    assert content["text"] == expected
    assert content["tokens"] >= 1 and content["finish_reason"] in {"stop", "length"}
    assert node.service is not None and node.service.completed_calls == 1
