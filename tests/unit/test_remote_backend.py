"""RemoteBackend against fake upstreams on 127.0.0.1: pass-through, failover, cancel, health, capacity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshnode.errors import AdmissionError
from meshnode.generation.api import Prompt, SamplingParams, TokenChunk
from meshnode.generation.remote.backend import RemoteBackend, RemoteSettings
from meshnode.generation.remote.upstream import parse_upstream
from tests.remote_fakes import DATA, MAP_HASH, MODEL, FakeUpstream

CHAT = Prompt.chat([{"role": "user", "content": "hi"}])
GREEDY = SamplingParams(temperature=0, max_tokens=16, stop=("END",), seed=3)


@pytest.fixture
async def upstreams() -> AsyncIterator[list[FakeUpstream]]:
    made: list[FakeUpstream] = []
    yield made
    for fake in made:
        await fake.close()


async def fakes(made: list[FakeUpstream], *specs: dict[str, Any]) -> list[FakeUpstream]:
    for index, spec in enumerate(specs):
        made.append(await FakeUpstream(seed=index, **spec).start())
    return made


def backend(*fake: FakeUpstream, **settings: Any) -> RemoteBackend:
    remote = RemoteBackend([parse_upstream(f.url) for f in fake],
                           settings=RemoteSettings(**{"timeout_seconds": 5.0, **settings}))
    remote.pool.backoff_base, remote.pool.backoff_cap, remote.pool.health_interval = 0.05, 0.1, 0.1
    return remote


async def chunks(stream: Any) -> list[TokenChunk]:
    return [chunk async for chunk in stream]


async def test_codec_frames_pass_through_byte_identical_with_the_upstreams_map(upstreams: list[FakeUpstream]) -> None:
    (fake,) = await fakes(upstreams, {})
    async with asyncio.timeout(10), backend(fake) as remote:
        assert remote.model_id == MODEL
        codec_map = await remote.codec_map()
        assert (codec_map.map_id, codec_map.map_hash) == ("huggingfacetb/smollm2", MAP_HASH)
        got = await chunks(await remote.start(CHAT, GREEDY))
        assert b"".join(c.frame or b"" for c in got) == (DATA / "codec-chat.msgpack").read_bytes()
        assert all(c.frame is not None for c in got) and got[-1].finish_reason == "stop"
        assert remote.decode([i for c in got for i in c.ids]) == "Hello, world!x"
    sent = fake.requests[0]
    assert sent["messages"] == [{"role": "user", "content": "hi"}] and sent["stream_format"] == "msgpack"
    assert (sent["temperature"], sent["max_tokens"], sent["stop"], sent["seed"]) == (0, 16, ["END"], 3)
    assert fake.headers[0]["Codec-Client-Version"] == "0.4"


async def test_426_is_reported_clearly_and_takes_the_upstream_out(upstreams: list[FakeUpstream]) -> None:
    (fake,) = await fakes(upstreams, {"mode": "426"})
    async with asyncio.timeout(10), backend(fake) as remote:
        with pytest.raises(AdmissionError, match="426") as refused:
            await remote.start(CHAT, GREEDY)
        assert "minimum_version" in str(refused.value) and "0.5" in str(refused.value)
        assert refused.value.field == "upstream"
        assert not remote.upstreams()[0].healthy and remote.load_info()["max_concurrent"] == 0
        with pytest.raises(AdmissionError, match="refused Codec-Client-Version"):
            await remote.start(CHAT, GREEDY)
    assert len(fake.requests) == 1  # not asked again


async def test_a_4xx_is_a_refusal_not_a_failover(upstreams: list[FakeUpstream]) -> None:
    bad, good = await fakes(upstreams, {"mode": "400"}, {})
    async with asyncio.timeout(10), backend(bad, good) as remote:
        remote.pool.upstreams[1].limit = 1  # the 400 one has the most free capacity: it is asked first
        with pytest.raises(AdmissionError, match="prompt is too long"):
            await remote.start(CHAT, GREEDY)
    assert not good.requests


@pytest.mark.parametrize("mode", ["500", "drop-before"])
async def test_failover_before_the_first_token(upstreams: list[FakeUpstream], mode: str) -> None:
    broken, good = await fakes(upstreams, {"mode": mode, "limit": 4}, {"limit": 2})
    async with asyncio.timeout(10), backend(broken, good) as remote:
        got = await chunks(await remote.start(CHAT, GREEDY))
        assert got[-1].finish_reason == "stop"
        assert b"".join(c.frame or b"" for c in got) == good.body
        status = {s.url: s for s in remote.upstreams()}
        assert not status[str(parse_upstream(broken.url))].healthy
    assert len(broken.requests) == 1 and len(good.requests) == 1


async def test_no_retry_after_the_first_token(upstreams: list[FakeUpstream]) -> None:
    broken, other = await fakes(upstreams, {"mode": "drop-after", "limit": 4}, {"limit": 2})
    async with asyncio.timeout(10), backend(broken, other) as remote:
        stream = await remote.start(CHAT, GREEDY)
        got = await chunks(stream)
        assert got[0].ids == [9707] and got[-1].finish_reason == "error"
        assert stream.error is not None and "stream broke" in stream.error and str(broken.server.port) in stream.error
    assert not other.requests


async def test_a_stalled_upstream_times_out_into_an_error_finish(upstreams: list[FakeUpstream]) -> None:
    (fake,) = await fakes(upstreams, {"mode": "stall"})
    async with asyncio.timeout(10), backend(fake, timeout_seconds=0.3) as remote:
        stream = await remote.start(CHAT, GREEDY)
        got = await chunks(stream)
        assert got[-1].finish_reason == "error" and "stream broke" in (stream.error or "")


async def test_an_upstream_error_frame_after_tokens_ends_the_stream_with_it(upstreams: list[FakeUpstream]) -> None:
    (fake,) = await fakes(upstreams, {"body": (DATA / "codec-error.msgpack").read_bytes()})
    async with asyncio.timeout(10), backend(fake) as remote:
        stream = await remote.start(CHAT, GREEDY)
        got = await chunks(stream)
        assert b"".join(c.frame or b"" for c in got) == fake.body and got[-1].finish_reason == "error"
        assert "upstream finished with 'error'" in (stream.error or "")


async def test_cancel_closes_the_upstream_stream(upstreams: list[FakeUpstream]) -> None:
    (fake,) = await fakes(upstreams, {"mode": "slow"})
    async with asyncio.timeout(10), backend(fake) as remote:
        stream = await remote.start(CHAT, GREEDY)
        first = await stream.__anext__()
        assert first.ids == [9707] and remote.load_info()["active"] == 1
        stream.cancel()
        await fake.disconnected.wait()
        rest = await chunks(stream)
        assert rest[-1].finish_reason == "cancel"
        while remote.load_info()["active"]:
            await asyncio.sleep(0.01)


async def test_sglang_cancel_also_posts_abort_request(upstreams: list[FakeUpstream], tmp_path: Any) -> None:
    from tests.unit.test_remote_text import tiny_tokenizer

    (fake,) = await fakes(upstreams, {"dialect": "sglang", "mode": "slow"})
    remote = RemoteBackend([parse_upstream(fake.url)], tokenizer=tiny_tokenizer(tmp_path))
    async with asyncio.timeout(10), remote:
        stream = await remote.start(Prompt(text="hi"), GREEDY)
        assert (await stream.__anext__()).ids == [9707]
        stream.cancel()
        await fake.disconnected.wait()
        while not fake.aborts:
            await asyncio.sleep(0.01)
    assert fake.aborts == [{"rid": fake.requests[0]["rid"]}]


async def test_dispatch_by_free_capacity_and_the_summed_load(upstreams: list[FakeUpstream]) -> None:
    small, large = await fakes(upstreams, {"mode": "slow", "limit": 1}, {"mode": "slow", "limit": 3})
    async with asyncio.timeout(10), backend(small, large, max_queue=1) as remote:
        assert remote.load_info() == {"active": 0, "queued": 0, "max_concurrent": 4, "max_queue": 1}
        streams = [await remote.start(CHAT, GREEDY) for _ in range(4)]
        assert (len(small.requests), len(large.requests)) == (1, 3)
        assert remote.load_info() == {"active": 4, "queued": 0, "max_concurrent": 4, "max_queue": 1}
        streams.append(await remote.start(CHAT, GREEDY))  # beyond the limits: max_queue lets one wait there
        assert remote.load_info()["queued"] == 1
        with pytest.raises(AdmissionError, match="busy"):
            await remote.start(CHAT, GREEDY)
        for stream in streams:
            stream.cancel()
        while remote.load_info()["active"]:
            await asyncio.sleep(0.01)


async def test_a_down_upstream_is_skipped_until_healthy_again(upstreams: list[FakeUpstream]) -> None:
    flaky, steady = await fakes(upstreams, {"limit": 8}, {"limit": 1})
    flaky.healthy = False
    async with asyncio.timeout(10), backend(flaky, steady) as remote:
        assert [s.healthy for s in remote.upstreams()] == [False, True]
        for _ in range(2):
            await chunks(await remote.start(CHAT, GREEDY))
        assert (len(flaky.requests), len(steady.requests)) == (0, 2)
        flaky.healthy = True
        while not remote.upstreams()[0].healthy:  # the health loop's backoff re-check finds it
            await asyncio.sleep(0.01)
        await chunks(await remote.start(CHAT, GREEDY))
        assert len(flaky.requests) == 1


async def test_no_upstream_at_all_is_a_clear_refusal() -> None:
    remote = backend_at("http://127.0.0.1:9")  # discard port: nothing listens
    async with asyncio.timeout(10), remote:
        assert remote.load_info()["max_concurrent"] == 0
        with pytest.raises(AdmissionError, match="no upstream available") as refused:
            await remote.start(CHAT, GREEDY)
        assert refused.value.field == "upstream"
        from aiohttp.test_utils import TestClient, TestServer

        from meshnode.http.requests import Limits
        from meshnode.http.server import CodecHttpApp

        client = TestClient(TestServer(CodecHttpApp(remote, Limits()).make_app(), host="127.0.0.1"))
        await client.start_server()
        try:
            answer = await client.post("/v1/completions", json={"prompt": "hi", "stream_format": "msgpack"})
            assert answer.status == 503 and "no upstream available" in (await answer.json())["error"]["message"]
        finally:
            await client.close()


def backend_at(url: str) -> RemoteBackend:
    return RemoteBackend([parse_upstream(url)], settings=RemoteSettings(timeout_seconds=1.0))


async def test_a_call_when_every_upstream_is_down_checks_them_at_once(upstreams: list[FakeUpstream]) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from meshnode.http.requests import Limits
    from meshnode.http.server import CodecHttpApp

    (fake,) = await fakes(upstreams, {})
    fake.healthy = False
    remote = backend(fake)
    async with asyncio.timeout(10), remote:
        remote.pool.backoff_base = remote.pool.backoff_cap = 3600.0  # the loop would not look again soon
        remote.pool.failed(remote.pool.upstreams[0], "still loading")
        client = TestClient(TestServer(CodecHttpApp(remote, Limits()).make_app(), host="127.0.0.1"))
        await client.start_server()
        try:
            assert (await client.get("/health")).status == 503  # no capacity: fronting nodes skip this one
            fake.healthy = True
            got = await chunks(await remote.start(CHAT, GREEDY))
            assert got[-1].finish_reason == "stop"
            assert (await client.get("/health")).status == 200
        finally:
            await client.close()
