"""The Codec HTTP endpoint against the real embedded model on a loopback aiohttp server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshnode.http.requests import Limits
from meshnode.http.server import CodecHttpApp
from meshnode.wire.frames import StreamDecoder
from meshnode.wire.maps import Detokenizer, parse_map
from tests.fixtures_model import embedded_loaded, make_backend  # noqa: F401

pytestmark = [pytest.mark.model, pytest.mark.integration]

PROMPT = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 24, "temperature": 0}


async def _client(loaded: Any) -> tuple[TestClient, Any]:
    engine = make_backend(loaded, max_concurrent=4, max_queue=2, max_prompt_tokens=512)
    app = CodecHttpApp(engine, Limits(max_tokens=64)).make_app()
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client, engine


def _sse_events(body: str) -> list[Any]:
    events = [line[6:] for line in body.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_msgpack_stream_detokenized_equals_sse_text(embedded_loaded: Any) -> None:
    async with asyncio.timeout(90):
        client, engine = await _client(embedded_loaded)
        try:
            resp = await client.get("/.well-known/codec/index.json")
            index = await resp.json()
            entry = index["maps"][0]
            assert entry["id"] == "huggingfacetb/smollm2"
            resp = await client.get(entry["url"])
            assert resp.status == 200
            doc = parse_map(await resp.read(), expected_sha256=entry["hash"])

            resp = await client.post("/v1/chat/completions", json={**PROMPT, "stream_format": "msgpack"},
                                     headers={"Codec-Client-Version": "0.4", "Accept-Encoding": "identity"})
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/x-msgpack"
            assert resp.headers["Codec-Tokenizer-Map"] == entry["hash"]
            decoder, frames = StreamDecoder(), []
            # Feed the body in awkward 3-byte pieces: the decoder must not care about boundaries.
            async for piece in resp.content.iter_chunked(3):
                frames.extend(decoder.feed(piece))
            assert frames[-1].done and frames[-1].finish_reason in {"stop", "length"}
            assert all(not f.done for f in frames[:-1])
            detok = Detokenizer(doc)
            text_msgpack = "".join(detok.render(f.ids, partial=not f.done) for f in frames)

            resp = await client.post("/v1/chat/completions", json={**PROMPT, "stream": True})
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = _sse_events(await resp.text())
            text_sse = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
            assert events[-1]["choices"][0]["finish_reason"] in {"stop", "length"}

            assert text_msgpack.strip()
            assert text_msgpack == text_sse

            resp = await client.post("/v1/chat/completions", json=PROMPT)
            whole = await resp.json()
            assert whole["choices"][0]["message"]["content"] == text_sse
            assert whole["usage"]["completion_tokens"] == sum(len(f.ids) for f in frames)
        finally:
            await client.close()
            await engine.close()


async def test_completions_prompt_ids_and_metrics(embedded_loaded: Any) -> None:
    async with asyncio.timeout(60):
        client, engine = await _client(embedded_loaded)
        try:
            ids = embedded_loaded.tokenizer.encode("The capital of France is")
            resp = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0,
                                                              "stream_format": "msgpack"})
            frames = StreamDecoder().feed(await resp.read())
            assert sum(len(f.ids) for f in frames) == 5 and frames[-1].finish_reason == "length"
            resp = await client.get("/v1/models")
            assert (await resp.json())["data"][0]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
            metrics = await (await client.get("/metrics")).text()
            assert 'meshnode_requests_total{endpoint="completions",status="200"} 1' in metrics
            assert "meshnode_tokens_generated_total 5" in metrics
            assert "meshnode_ttft_seconds_count 1" in metrics
        finally:
            await client.close()
            await engine.close()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "stream_format": "xml"}, "stream_format"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ],
)
async def test_bad_requests_name_the_field(embedded_loaded: Any, path: str, body: dict[str, Any], field: str) -> None:
    async with asyncio.timeout(30):
        client, engine = await _client(embedded_loaded)
        try:
            resp = await client.post(path, json=body)
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == field
            resp = await client.post(path, data=b"{not json", headers={"Content-Type": "application/json"})
            assert resp.status == 400
            resp = await client.post(path, json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
                                     headers={"Codec-Client-Version": "banana"})
            assert (await resp.json())["error"]["param"] == "Codec-Client-Version"
            resp = await client.get("/.well-known/codec/maps/qwen/qwen2.json")
            assert resp.status == 404
        finally:
            await client.close()
            await engine.close()
