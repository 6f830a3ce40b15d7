"""Issue 13: bans that hold, nothing processed after a ban, and an /ai election forgers cannot win.

Real Nodes and Python peers on real Rooms (aiortc on 127.0.0.1, MemoryHub signalling), the
scripted engine (bench/lab/fakes.py) so that every generation the node starts is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import pytest

from bench.lab.fakes import TimedEngine
from bench.lab.meshkit import join_room, node_settings, start_node
from meshnode.wire import legion
from meshnode.wire.envelopes import decode_cf_payload
from meshnode.wire.frames import CodecFrame
from signaling.adapters.memory import MemoryHub
from signaling.protocol.names import gen_id

pytestmark = pytest.mark.integration

TIMEOUT = 60.0


def app_id(request: pytest.FixtureRequest) -> str:
    return "bans-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[-30:] + "-" + gen_id(6)


def _call(call_id: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    return legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id, tool_name=tool, args=args)


async def test_input_queued_before_a_ban_is_never_processed(request: pytest.FixtureRequest) -> None:
    """13.2: a burst of offences then valid calls, all already queued when the ban strikes: the
    node drops the peer at its 31st offence and starts none of the calls queued behind it."""
    hub = MemoryHub()
    settings = node_settings(app_id(request))
    engine = TimedEngine(rate=100, tokens=10)
    async with asyncio.timeout(TIMEOUT):
        running = await start_node(settings, engine, relays=[hub.relay()])
        hostile = await join_room(settings, relays=[hub.relay()])
        try:
            await hostile.wait_for_peers(1, 30)
            tc = hostile.make_action("tc")
            burst = [_call(f"bad-{i}", "rm_rf", {}) for i in range(40)]
            burst += [_call(f"run-{i}", "engine_run", {"user": "work after the ban?"}) for i in range(5)]
            # One send per message, back to back: they arrive in one go and queue at the node.
            await asyncio.gather(*(tc.send(frame, target=running.peer_id) for frame in burst))
            while running.peer_id in hostile.peers:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # anything still queued would start now
            assert running.node.room is not None
            assert running.node.room._mesh is not None and running.node.room._mesh.is_banned(hostile.self_id)
            assert engine.started == 0, "work started after the ban"
        finally:
            await hostile.leave()
            await running.shutdown()


async def test_a_forged_cap_cannot_silence_broadcast_ai(request: pytest.FixtureRequest) -> None:
    """13.4: a peer claims to be an idle meshnode (agent "meshnode", load 0, engine_run) and never
    serves; a tab without a model asks /ai: the honest node has probed the forger, found that it
    does not serve, and answers, exactly once."""
    hub = MemoryHub()
    settings = node_settings(app_id(request))
    async with asyncio.timeout(TIMEOUT):
        honest = await start_node(settings, TimedEngine(rate=100, tokens=12), relays=[hub.relay()])
        forger = await join_room(settings, relays=[hub.relay()])
        asker = await join_room(settings, relays=[hub.relay()])
        try:
            await asyncio.gather(forger.wait_for_peers(2, 30), asker.wait_for_peers(2, 30))
            cap = legion.build_cap(ts_ms=int(time.time() * 1000), nick="forger", model_id="x/forged", available=True,
                                   skills=[], system_prompt_summary="", load={"active": 0, "queued": 0, "max": 64},
                                   tools=[legion.tool_descriptor("engine_run", "", legion.ENGINE_RUN_SCHEMA)])
            assert cap["agent"] == "meshnode"
            await forger.make_action("cap").send(cap)
            service = honest.node.service
            assert service is not None
            while forger.self_id not in service.roster:
                await asyncio.sleep(0.05)
            frames = asker.make_action("cf")
            chat = legion.build_chat(ts_ms=int(time.time() * 1000), from_id=asker.self_id, to="",
                                     text="/ai are you there?")
            await asker.make_action("cm").send(chat)
            got: list[tuple[str, CodecFrame]] = []
            while not got or not got[-1][1].done:
                message = await frames.receive()
                decoded = decode_cf_payload(message.payload)
                assert isinstance(decoded, CodecFrame)
                got.append((message.peer_id, decoded))
            assert {peer for peer, _ in got} == {honest.peer_id}
            assert sum(len(f.ids) for _, f in got) == 12
            entry = service.roster.get(forger.self_id)
            assert entry is not None and not service.roster.verified(entry)
        finally:
            await asyncio.gather(forger.leave(), asker.leave())
            await honest.shutdown()


async def test_two_honest_nodes_answer_a_broadcast_ai_once(request: pytest.FixtureRequest) -> None:
    """The election among meshnodes that have shown they serve: each probes the other (one token),
    then exactly one of them answers a broadcast /ai from a tab without a model."""
    hub = MemoryHub()
    settings = node_settings(app_id(request))
    async with asyncio.timeout(TIMEOUT):
        nodes = [await start_node(settings, TimedEngine(rate=100, tokens=8), relays=[hub.relay()]) for _ in range(2)]
        asker = await join_room(settings, relays=[hub.relay()])
        try:
            await asker.wait_for_peers(2, 30)
            for node, other in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
                service = node.node.service
                assert service is not None
                while not any(service.roster.verified(e) for p, e in service.roster.entries.items()
                              if p == other.peer_id):
                    await asyncio.sleep(0.05)
            frames = asker.make_action("cf")
            chat = legion.build_chat(ts_ms=int(time.time() * 1000), from_id=asker.self_id, to="", text="/ai hello")
            await asker.make_action("cm").send(chat)
            senders: dict[str, int] = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):  # both would have finished by now (8 tokens at 100 tok/s)
                    while True:
                        message = await frames.receive()
                        decoded = decode_cf_payload(message.payload)
                        assert isinstance(decoded, CodecFrame)
                        senders[message.peer_id] = senders.get(message.peer_id, 0) + len(decoded.ids)
            assert len(senders) == 1 and list(senders.values()) == [8], senders
        finally:
            await asker.leave()
            await asyncio.gather(*(n.shutdown() for n in nodes))
