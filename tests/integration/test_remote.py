"""A RemoteBackend against a real `meshnode serve-http` child (the embedded model) on 127.0.0.1.

* greedy text through the node equals the upstream's own answer;
* byte-identical: a recording proxy between node and upstream keeps the upstream's response bytes,
  and the node's chunks carry exactly those bytes, frame by frame (chunking varies between runs, so
  two separate requests are compared by ids, one request by bytes); a serve-http in front of the
  node answers its client with the upstream's bytes too;
* the asker leaving closes the upstream request (the upstream's /metrics counts the cancel);
* killing the upstream mid-stream ends the stream with an error finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshnode.generation.api import Prompt, SamplingParams
from meshnode.generation.remote.backend import RemoteBackend
from meshnode.generation.remote.upstream import parse_upstream
from meshnode.http.requests import Limits
from meshnode.http.server import CodecHttpApp
from meshnode.wire.frames import StreamDecoder
from meshnode.wire.maps import Detokenizer, parse_map

pytestmark = [pytest.mark.model, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 180.0
MESSAGES = [{"role": "user", "content": "Name three colors."}]
LONG = [{"role": "user", "content": "Count from one to two hundred, one number per line."}]


@dataclass
class Upstream:
    process: subprocess.Popen[bytes]
    url: str
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_http(tmp: Path) -> Iterator[Upstream]:
    port = free_port()
    log = tmp / f"serve-http-{port}.log"
    env = {**os.environ, "MESHNODE_ENGINE__MAX_CONCURRENT": "4", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "meshnode", "serve-http", "--port", str(port), "--device",
                                    "cpu"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield Upstream(process, f"http://127.0.0.1:{port}", log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


async def wait_ready(upstream: Upstream) -> None:
    async with asyncio.timeout(START_TIMEOUT_SECONDS), aiohttp.ClientSession() as session:
        while True:
            assert upstream.process.poll() is None, upstream.log.read_text()[-2000:]
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(upstream.url + "/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.25)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with serve_http(tmp_path_factory.mktemp("upstream")) as child:
        asyncio.run(wait_ready(child))
        yield child


class RecordingProxy:
    """Relays POSTs to the upstream unchanged and keeps each response body's bytes."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.bodies: list[bytes] = []
        self.server: TestServer | None = None

    async def relay(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in {"content-type", "codec-client-version",
                                                                            "accept", "accept-encoding"}}
        body = bytearray()
        self.bodies.append(b"")
        async with aiohttp.ClientSession(auto_decompress=False) as session, session.post(
                self.target + request.path, data=await request.read(), headers=headers) as answer:
            response = web.StreamResponse(status=answer.status, headers={
                k: v for k, v in answer.headers.items() if k.lower() in {"content-type", "codec-tokenizer-map"}})
            await response.prepare(request)
            async for data in answer.content.iter_any():
                body += data
                self.bodies[-1] = bytes(body)
                await response.write(data)
            await response.write_eof()
        return response

    async def forward_get(self, request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as session, session.get(self.target + request.path_qs) as answer:
            return web.Response(status=answer.status, body=await answer.read(),
                                content_type=answer.content_type)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def __aenter__(self) -> RecordingProxy:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.relay)
        app.router.add_get("/{tail:.*}", self.forward_get)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.close()


@contextlib.asynccontextmanager
async def remote_at(url: str) -> AsyncIterator[RemoteBackend]:
    async with RemoteBackend([parse_upstream(url)]) as remote:
        yield remote


async def direct(upstream: Upstream, messages: list[dict[str, str]], max_tokens: int) -> tuple[bytes, list[Any]]:
    """The upstream's own msgpack answer: its body bytes and frames."""
    body = {"messages": messages, "stream_format": "msgpack", "max_tokens": max_tokens, "temperature": 0}
    async with aiohttp.ClientSession() as session, session.post(
            upstream.url + "/v1/chat/completions", json=body, headers={"Codec-Client-Version": "0.4"}) as response:
        assert response.status == 200
        data = await response.read()
    return data, StreamDecoder().feed(data)


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


async def test_greedy_text_and_frames_byte_identical_through_the_node(upstream: Upstream) -> None:
    async with asyncio.timeout(120):
        own_bytes, own_frames = await direct(upstream, MESSAGES, 24)
        async with RecordingProxy(upstream.url) as proxy, remote_at(proxy.url) as remote:
            codec_map = await remote.codec_map()
            assert remote.model_id.endswith("SmolLM2-135M-Instruct")
            detokenizer = Detokenizer(parse_map(codec_map.data, expected_sha256=codec_map.map_hash))
            own_text = "".join(detokenizer.render(f.ids, partial=not f.done) for f in own_frames)

            stream = await remote.start(Prompt.chat(MESSAGES), SamplingParams(temperature=0, max_tokens=24))
            chunks = [chunk async for chunk in stream]
            ids = [i for c in chunks for i in c.ids]
            assert own_text.strip() and remote.decode(ids) == own_text  # greedy: the same answer
            assert ids == [i for f in own_frames for i in f.ids]
            # The honest byte identity: this call's upstream bytes, recorded on the wire, are the
            # node's frames, one chunk per upstream frame, in order and unchanged.
            assert b"".join(c.frame or b"" for c in chunks) == proxy.bodies[-1]
            decoded = StreamDecoder().feed_raw(proxy.bodies[-1])
            assert [c.frame for c in chunks] == [raw for _, raw in decoded]
            assert len(own_bytes) > 0

            # A serve-http in front of the node (a meshnode fronting a meshnode) answers the same bytes.
            client = TestClient(TestServer(CodecHttpApp(remote, Limits()).make_app(), host="127.0.0.1"))
            await client.start_server()
            try:
                body = {"messages": MESSAGES, "stream_format": "msgpack", "max_tokens": 24, "temperature": 0}
                response = await client.post("/v1/chat/completions", json=body,
                                             headers={"Codec-Client-Version": "0.4"})
                assert response.headers["Codec-Tokenizer-Map"] == codec_map.map_hash
                assert await response.read() == proxy.bodies[-1]
            finally:
                await client.close()


async def test_cancel_closes_the_upstream_request(upstream: Upstream) -> None:
    name = 'meshnode_http_cancelled_total{endpoint="chat"}'
    async with asyncio.timeout(120), remote_at(upstream.url) as remote:
        before = await metric(upstream.url, name)
        stream = await remote.start(Prompt.chat(LONG), SamplingParams(temperature=0, max_tokens=400))
        first = await stream.__anext__()
        assert first.ids
        stream.cancel()
        while await metric(upstream.url, name) < before + 1:  # the upstream saw the client leave
            await asyncio.sleep(0.1)
        while await metric(upstream.url, "meshnode_active_streams"):  # and stopped generating
            await asyncio.sleep(0.1)


async def test_killing_the_upstream_mid_stream_is_an_error_finish(tmp_path: Path) -> None:
    with serve_http(tmp_path) as child:
        await wait_ready(child)
        async with asyncio.timeout(120), remote_at(child.url) as remote:
            stream = await remote.start(Prompt.chat(LONG), SamplingParams(temperature=0, max_tokens=400))
            got = [await stream.__anext__() for _ in range(3)]
            assert all(c.finish_reason is None for c in got)
            os.killpg(child.process.pid, signal.SIGKILL)
            rest = [chunk async for chunk in stream]
            assert rest[-1].finish_reason == "error"
            assert stream.error is not None and child.url in stream.error
            assert not remote.upstreams()[0].healthy
