"""Issue 8 §5: password rooms and what leaks, checked on real connections (loopback, MemoryHub).

* With a password, everything the relay carries is unreadable to it: no SDP, no ICE credentials,
  no candidate; each sealed blob fails to open with the password-less key (which the relay can
  compute from appId/roomId) and with a wrong password.
* A peer with the wrong password never joins the node (and never gets a stream).
* At the default log level (INFO) a full served call logs neither the prompt, nor the completion,
  nor the room password, nor SDP/ICE secrets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest

from bench.lab.fakes import TimedEngine, expected_ids
from bench.lab.meshkit import Asker, join_room, node_settings, start_node
from signaling.adapters.memory import MemoryHub
from signaling.protocol.names import gen_id, signalling_key
from signaling.protocol.sealing import Sealer, SealError

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
PROMPT = "PROMPT-CANARY-7f3e tell me a secret"


class SpyHub(MemoryHub):
    """A MemoryHub that records every payload it routes: the relay's view of the room."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def route(self, sender: Any, topic: str, payload: str) -> None:
        self.seen.append((topic, payload))
        super().route(sender, topic, payload)


def app_id(request: pytest.FixtureRequest) -> str:
    return "sec-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[-40:] + "-" + gen_id(6)


async def test_password_room_hides_signalling_from_the_relay(request: pytest.FixtureRequest,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    for name in ("meshnode", "signaling"):  # INFO is the default level of `meshnode join`
        caplog.set_level(logging.INFO, logger=name)
    hub = SpyHub()
    app = app_id(request)
    settings = node_settings(app, **{"room.password": PASSWORD})
    async with asyncio.timeout(60):
        running = await start_node(settings, TimedEngine(rate=200, tokens=12), relays=[hub.relay()])
        room = await join_room(settings, relays=[hub.relay()])
        try:
            await room.wait_for_peers(1, 30)
            asker = Asker(room, running.peer_id)
            record = await asker.call({"user": PROMPT, "max_tokens": 12})
            assert record.ids == expected_ids(12)
            text = record.content["text"]
            await asker.close()
        finally:
            await room.leave()
            await running.shutdown()

    relay_view = "\n".join(payload for _, payload in hub.seen)
    for secret in ("v=0", "a=fingerprint", "a=ice-pwd", "a=ice-ufrag", "candidate:", "127.0.0.1", PASSWORD):
        assert secret not in relay_view, secret
    sealed = [v for _, payload in hub.seen for k, v in json.loads(payload).items() if k in ("offer", "answer",
                                                                                           "candidate")]
    assert sealed, "no offer/answer went through the relay"
    right = Sealer(signalling_key(PASSWORD, app, "hardening"))
    for key in (signalling_key("", app, "hardening"), signalling_key("wrong", app, "hardening")):
        for blob in sealed:
            with pytest.raises(SealError):
                Sealer(key).unseal(blob)
    assert all("v=0" in right.unseal(blob) for blob in sealed if "candidate" not in right.unseal(blob)[:20])

    logged = caplog.text
    for secret in (PROMPT, "PROMPT-CANARY", PASSWORD, text, "a=ice-pwd", "a=fingerprint"):
        assert secret not in logged, secret


async def test_wrong_password_never_joins_the_node(request: pytest.FixtureRequest) -> None:
    hub = MemoryHub()
    app = app_id(request)
    engine = TimedEngine(rate=200, tokens=5)
    errors: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    async with asyncio.timeout(60):
        running = await start_node(node_settings(app, **{"room.password": PASSWORD}), engine, relays=[hub.relay()])
        assert running.node.room is not None
        running.node.room.on_join_error(lambda peer, reason: errors.put_nowait((peer, reason)))
        intruder = await join_room(node_settings(app, **{"room.password": "guess"}), relays=[hub.relay()])
        intruder.on_join_error(lambda peer, reason: errors.put_nowait((peer, reason)))
        try:
            # Whichever side receives the other's sealed offer reports it (roles follow id order).
            peer, reason = await errors.get()
            assert peer in (intruder.self_id, running.peer_id) and "password" in reason
            assert intruder.peers == [] and running.node.room.peers == []
            assert engine.started == 0
        finally:
            await intruder.leave()
            await running.shutdown()
