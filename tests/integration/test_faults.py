"""Issue 8 §3: faults a serving node must survive, each injected for real on loopback.

* the relay dies mid-stream and comes back: the stream finishes intact, a newcomer is served after;
* every relay unreachable at start: a clear warning naming them, retries with backoff, then service;
* a peer vanishes without leaving (its packets stop): ICE consent fails, the connection is cleaned
  up and its generation cancelled;
* SIGTERM: running streams finish within the drain deadline (or end with a "cancel" frame), peers
  see the node leave, and the process exits 0.

(An engine error in one request and admission control are in tests/unit/test_hardening.py.) The
engine is the scripted TimedEngine (bench/lab/fakes.py): these faults are about transport and lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aioice.ice
import pytest

from bench.lab.fakes import TimedEngine, expected_ids
from bench.lab.meshkit import Asker, join_room, node_settings, start_node
from meshnode.node import node as node_module
from signaling.adapters.memory import MemoryHub
from signaling.adapters.wsrelay import WsRelay
from signaling.base import Backoff
from signaling.protocol.names import gen_id

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def app_id(request: pytest.FixtureRequest) -> str:
    return "fault-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[-40:] + "-" + gen_id(6)


def fast(url: str) -> WsRelay:
    return WsRelay(url, backoff=Backoff(base_seconds=0.2, cap_seconds=1.0))


async def first_tokens(asker: Asker, call: asyncio.Task[Any]) -> None:
    while not any(r.ids for r in asker.calls.values()):
        if call.done():
            call.result()
        await asyncio.sleep(0.01)


async def test_relay_dies_mid_stream_and_comes_back(wsrelay_server_fresh: Any, request: pytest.FixtureRequest) -> None:
    url = wsrelay_server_fresh.url
    settings = node_settings(app_id(request), strategy="ws-relay", relays=[url])
    async with asyncio.timeout(90):
        running = await start_node(settings, TimedEngine(rate=25, tokens=100), relays=[fast(url)])
        rooms = []
        try:
            a = await join_room(settings, relays=[fast(url)])
            rooms.append(a)
            await a.wait_for_peers(1, 30)
            asker = Asker(a, running.peer_id)
            call = asyncio.create_task(asker.call({"user": "long", "max_tokens": 100}))
            await first_tokens(asker, call)
            await wsrelay_server_fresh.astop()  # fault: the only relay dies mid-stream
            record = await call
            assert record.ids == expected_ids(100) and record.result is not None and record.result.status == "ok"
            await wsrelay_server_fresh.arestart()
            b = await join_room(settings, relays=[fast(url)])  # a newcomer needs the relay back
            rooms.append(b)
            newcomer = Asker(b, running.peer_id)
            async with asyncio.timeout(40):
                while running.peer_id not in b.peers:
                    await b.next_event()
            record = await newcomer.call({"user": "after", "max_tokens": 20})
            assert record.ids == expected_ids(20)
            await asker.close()
            await newcomer.close()
        finally:
            for room in rooms:
                await room.leave()
            await running.shutdown()


async def test_all_relays_unreachable_at_start(wsrelay_server_fresh: Any, request: pytest.FixtureRequest,
                                               caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("meshnode", "signaling"):  # other tests (CLI) may have raised these loggers' levels
        caplog.set_level(logging.INFO, logger=name)
    monkeypatch.setattr(node_module, "RELAY_WARNING_SECONDS", 0.5)
    url = wsrelay_server_fresh.url
    wsrelay_server_fresh.stop()  # fault: nothing listens on the relay's port
    settings = node_settings(app_id(request), strategy="ws-relay", relays=[url])
    async with asyncio.timeout(90):
        running = await start_node(settings, TimedEngine(rate=200, tokens=10), relays=[fast(url)])
        try:
            while "can be reached" not in caplog.text or caplog.text.count("connection failed") < 2:
                await asyncio.sleep(0.1)
            assert f"none of the 1 relay(s) can be reached ({url}); retrying in the background" in caplog.text
            assert "reconnecting in" in caplog.text  # backoff between attempts
            await wsrelay_server_fresh.arestart()
            room = await join_room(settings, relays=[fast(url)])
            try:
                await room.wait_for_peers(1, 40)
                asker = Asker(room, running.peer_id)
                record = await asker.call({"user": "hello", "max_tokens": 10})
                assert record.ids == expected_ids(10)
                await asker.close()
            finally:
                await room.leave()
            while "reachable now" not in caplog.text:
                await asyncio.sleep(0.1)
        finally:
            await running.shutdown()


def _silence(room: Any, node_id: str) -> None:
    """Make `room`'s connection to the node go quiet without a goodbye: drop every packet it would
    send or receive (no DTLS close_notify, no SCTP ABORT, no @_leave), like a tab whose machine
    lost its network."""
    link = room._mesh.live[node_id]
    connection = link._pc.sctp.transport.transport._connection
    for protocol in connection._protocols:
        protocol.send_stun = lambda *args, **kwargs: None
        protocol.send_data = lambda *args, **kwargs: asyncio.sleep(0)
        protocol.datagram_received = lambda *args, **kwargs: None


async def test_peer_vanishing_cancels_its_generation(request: pytest.FixtureRequest,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # ICE consent freshness detects the silence (RFC 7675); aioice checks every 5 s and gives up
    # after 6 failures: shortened here, as aiortc's own tests shorten aioice timers.
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 3)
    hub = MemoryHub()
    settings = node_settings(app_id(request))
    engine = TimedEngine(rate=10, tokens=1000)
    async with asyncio.timeout(60):
        running = await start_node(settings, engine, relays=[hub.relay()])
        room = await join_room(settings, relays=[hub.relay()])
        try:
            await room.wait_for_peers(1, 30)
            asker = Asker(room, running.peer_id)
            call = asyncio.create_task(asker.call({"user": "long", "max_tokens": 1000}, timeout=60))
            await first_tokens(asker, call)
            service = running.node.service
            assert service is not None and len(service.calls) == 1
            _silence(room, running.peer_id)  # fault: the asker vanishes
            while service.calls or room.self_id in (running.node.room.peers if running.node.room else []):
                await asyncio.sleep(0.05)
            assert service.cancelled_calls == 1
            assert engine.streams == []  # the generation was cancelled, its slot freed
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            await asker.close()
        finally:
            await room.leave()
            await running.shutdown()


@pytest.mark.parametrize(("drain", "tokens", "finish"), [(10.0, 40, "length"), (0.5, 400, "cancel")])
async def test_sigterm_drains_streams_and_peers_see_leave(wsrelay_server: Any, request: pytest.FixtureRequest,
                                                          drain: float, tokens: int, finish: str) -> None:
    url = wsrelay_server.url
    app = app_id(request)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.nodeproc", "--relay", url, "--app", app, "--drain", str(drain),
        "--rate", "20", "--tokens", str(tokens), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    settings = node_settings(app, strategy="ws-relay", relays=[url])
    room = None
    try:
        async with asyncio.timeout(90):
            assert process.stdout is not None
            line = (await process.stdout.readline()).decode()
            assert line.startswith("READY "), line
            node_id = line.split()[1]
            room = await join_room(settings, relays=[fast(url)])
            left = asyncio.Event()
            room.on_peer_leave(lambda peer: left.set() if peer == node_id else None)
            await room.wait_for_peers(1, 30)
            asker = Asker(room, node_id)
            call = asyncio.create_task(asker.call({"user": "drain me", "max_tokens": tokens}, timeout=60))
            await first_tokens(asker, call)
            process.send_signal(signal.SIGTERM)  # fault: the operator stops the node
            record = await call
            await left.wait()  # the node said goodbye (@_leave), not just vanished
            assert record.finish_reason == finish
            if finish == "length":
                assert record.ids == expected_ids(tokens) and record.result is not None and record.result.status == "ok"
            else:
                assert record.ids == expected_ids(len(record.ids)) and record.result is not None and record.result.status == "error"
                assert "shutting down" in (record.result.error or "")
            out = (await process.stdout.read()).decode()
            assert await process.wait() == 0
            assert "STOPPED" in out
            await asker.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if room is not None:
            await room.leave()
