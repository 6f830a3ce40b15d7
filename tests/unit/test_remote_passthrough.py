"""Pass-through end to end: TokenStream keeps frames whole, the Legion service and serve-http forward them
byte for byte (a node fronting a Codec upstream), and the pool dispatches by free capacity with backoff."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshnode.generation.api import TokenStream
from meshnode.generation.remote.backend import RemoteBackend
from meshnode.generation.remote.codec import CodecDialect
from meshnode.generation.remote.pool import Pool, Upstream
from meshnode.generation.remote.upstream import parse_upstream
from meshnode.http.requests import Limits
from meshnode.http.server import CodecHttpApp
from meshnode.legion.service import LegionService
from meshnode.link.costs import PacingConfig
from meshnode.link.pacer import Pacer
from meshnode.wire.envelopes import DATA, END, HELLO, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame
from tests.remote_fakes import FakeUpstream
from tests.unit.test_services import FakeRoom, Msg, call, config

PEER = "C" * 20


async def test_token_stream_never_merges_frames_and_blocks_the_producer_instead() -> None:
    stream = TokenStream(request_id=1, prompt_tokens=0, loop=asyncio.get_running_loop(), buffer_chunks=2)
    for index in range(2):
        await stream.wait_room()
        stream.put([index], frame=bytes([index]))
    waiter = asyncio.ensure_future(stream.wait_room())
    await asyncio.sleep(0)
    assert not waiter.done()  # full: the producer waits (overflow policy "block")
    first = await stream.__anext__()
    await asyncio.wait_for(waiter, 1)
    stream.put([2], frame=b"\x02")
    stream.put([3], frame=b"\x03")  # over the limit without waiting: still appended, never merged
    stream.put([], "stop")
    rest = [chunk async for chunk in stream]
    assert [first.frame] + [c.frame for c in rest] == [b"\x00", b"\x01", b"\x02", b"\x03", None]
    plain = TokenStream(request_id=2, prompt_tokens=0, loop=asyncio.get_running_loop(), buffer_chunks=1)
    plain.put([1])
    plain.put([2])  # no frames: the engine policy, coalesce
    plain.put([], "stop")
    assert [c.ids for c in [chunk async for chunk in plain]] == [[1, 2]]


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, RemoteBackend]]:
    fake = await FakeUpstream("codec").start()
    remote = RemoteBackend([parse_upstream(fake.url)])
    async with remote:
        yield fake, remote
    await fake.close()


async def run_call(room: FakeRoom, remote: RemoteBackend, *, hello: bool = False, pacing: Any = None) -> None:
    service = LegionService(room, remote, config=config(), codec_map=await remote.codec_map(), pacing=pacing)
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            if hello:
                body = {"codec_version": 1, "accept_compression": ["identity"]}
                room.actions["cf"].inbox.put_nowait(Msg(PEER, encode_envelope(Envelope(HELLO, "tc-1", 0, body))))
                await room.actions["cf"].wait_for(lambda item: True)
            room.actions["tc"].inbox.put_nowait(Msg(PEER, call("tc-1", "engine_run", {"user": "hi"})))
            result, _ = await room.actions["tc"].wait_for(lambda item: item[0].get("kind") == "result")
            assert result["status"] == "ok" and result["result"]["content"]["text"] == "Hello, world!x"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_legion_forwards_upstream_frames_verbatim_one_message_each(upstream: Any) -> None:
    fake, remote = upstream
    room = FakeRoom()
    await run_call(room, remote)
    sent = [payload for payload, target in room.actions["cf"].sent if target == PEER]
    assert b"".join(sent) == fake.body and len(sent) == 5  # one cf message per upstream frame, unchanged


async def test_legion_wraps_the_verbatim_frames_in_data_envelopes_after_a_hello(upstream: Any) -> None:
    fake, remote = upstream
    room = FakeRoom()
    await run_call(room, remote, hello=True)
    envelopes = [decode_cf_payload(p) for p, _ in room.actions["cf"].sent[1:]]
    assert b"".join(e.body for e in envelopes if e.kind == DATA) == fake.body
    assert envelopes[-1].kind == END and envelopes[-1].body["finish_reason"] == "stop"


async def test_a_pacer_repacks_the_ids(upstream: Any) -> None:
    _, remote = upstream
    room = FakeRoom()
    await run_call(room, remote, pacing=Pacer(PacingConfig(budget_bytes_per_second=1_000_000)))
    frames = [decode_cf_payload(p) for p, _ in room.actions["cf"].sent]
    assert all(isinstance(f, CodecFrame) for f in frames)
    assert [i for f in frames for i in f.ids] == [9707, 11, 1879, 0, 90]


async def test_serve_http_in_front_of_a_codec_upstream_is_byte_identical_426_and_counts_cancels(upstream: Any) -> None:
    fake, remote = upstream
    client = TestClient(TestServer(CodecHttpApp(remote, Limits()).make_app(), host="127.0.0.1"))
    await client.start_server()
    body = {"messages": [{"role": "user", "content": "hi"}], "stream_format": "msgpack", "max_tokens": 8}
    try:
        async with asyncio.timeout(10):
            response = await client.post("/v1/chat/completions", json=body, headers={"Codec-Client-Version": "0.4"})
            assert response.status == 200 and await response.read() == fake.body
            refused = await client.post("/v1/chat/completions", json=body, headers={"Codec-Client-Version": "1.0"})
            answer = await refused.json()
            assert refused.status == 426 and answer["error"] == "codec_version_required"
            assert answer["client_version"] == "1.0" and "0.x" in answer["message"]
            assert refused.headers["Codec-Min-Version"] == "0.2"
            fake.mode = "slow"
            response = await client.post("/v1/chat/completions", json=body)
            await response.content.readexactly(15)  # the first frame, then leave
            response.close()
            await fake.disconnected.wait()  # the node cancelled its upstream call
            while 'meshnode_http_cancelled_total{endpoint="chat"} 1' not in await (await client.get("/metrics")).text():
                await asyncio.sleep(0.02)
            metrics = await (await client.get("/metrics")).text()
            assert "meshnode_upstream_up{" in metrics and "meshnode_upstream_requests_total{" in metrics
            assert "meshnode_max_concurrent 8" in metrics
            assert (await client.get("/health")).status == 200
    finally:
        await client.close()


def pool_of(*limits: int, max_queue: int = 0) -> tuple[Pool, list[float]]:
    now = [0.0]
    ups = [Upstream(spec=parse_upstream(f"http://h{i}:1"), dialect=CodecDialect(), limit=limit)
           for i, limit in enumerate(limits)]
    return Pool(ups, max_queue=max_queue, clock=lambda: now[0], jitter=lambda: 1.0), now


def test_pool_picks_the_most_free_capacity_rotating_ties_then_queues_then_refuses() -> None:
    pool, _ = pool_of(2, 2, 4, max_queue=1)
    a, b, c = pool.upstreams
    picks = []
    for _ in range(8):
        chosen = pool.pick()
        assert chosen is not None
        pool.acquire(chosen)
        picks.append(chosen)
    assert picks.count(c) == 4 and picks.count(a) == 2 and picks.count(b) == 2
    assert picks[:2] == [c, c]  # the most free first
    assert pool.load_info() == {"active": 8, "queued": 0, "max_concurrent": 8, "max_queue": 1}
    extra = pool.pick()
    assert extra is not None
    pool.acquire(extra)
    assert pool.queued() == 1 and pool.pick() is None and pool.busy()
    pool.release(extra)
    assert pool.pick() is not None


def test_pool_backoff_doubles_to_the_cap_and_a_passing_check_restores() -> None:
    pool, now = pool_of(1, 1)
    a, b = pool.upstreams
    delays = []
    for _ in range(9):
        pool.failed(a, "connection refused")
        delays.append(a.next_check - now[0])
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0] and delays[-1] == 30.0
    assert pool.pick() is b and pool.pick({b}) is None and not pool.busy({b})
    assert pool.load_info()["max_concurrent"] == 1
    pool.succeeded(a)
    assert a.usable and a.backoff == 0 and a.next_check == now[0] + pool.health_interval
    pool.refuse(b, "426")
    assert pool.pick() is a and not b.usable
