"""Fake upstream engines for the remote-backend tests: small aiohttp apps on 127.0.0.1.

`FakeUpstream` speaks one dialect (Codec msgpack or an SSE engine) and replays a recorded-shape
body from tests/data/upstreams in random write sizes; `mode` injects failures ("500", "426",
"drop-before", "drop-after", "stall", "slow") and it records what it was asked.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import msgpack
from aiohttp import web
from aiohttp.test_utils import TestServer

from meshnode.wire.maps import map_sha256

DATA = Path(__file__).resolve().parent / "data" / "upstreams"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAP_DOC = {"id": "huggingfacetb/smollm2", "version": "2", "vocab_size": 6,
           "vocab": {"!": 0, ",": 11, "x": 90, "\u0120world": 1879, "Hello": 9707, "<|im_end|>": 151645},
           "encoder": "byte_level", "special_tokens": {"<|im_end|>": 151645}}
MAP_BYTES = json.dumps(MAP_DOC, separators=(",", ":")).encode()
MAP_HASH = map_sha256(MAP_BYTES)
REFUSAL_426 = {"error": "codec_version_required", "minimum_version": "0.5", "required_features":
               ["safety-policy-enforcement"], "client_version": "0.4",
               "docs_url": "https://codecai.net/docs/version-negotiation/"}
PATHS = {"codec": ["/v1/chat/completions", "/v1/completions"], "vllm": ["/v1/chat/completions", "/v1/completions"],
         "sglang": ["/generate"], "llamacpp": ["/completion"]}
BODIES = {"codec": "codec-chat.msgpack", "vllm": "vllm-completions.sse", "sglang": "sglang-cumulative.sse",
          "llamacpp": "llamacpp-completion.sse"}


class FakeUpstream:
    def __init__(self, dialect: str = "codec", *, mode: str = "ok", body: bytes | None = None, limit: int = 0,
                 seed: int = 1) -> None:
        self.dialect = dialect
        self.mode = mode
        self.body = body if body is not None else (DATA / BODIES[dialect]).read_bytes()
        self.limit = limit
        self.healthy = True
        self.rng = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.aborts: list[dict[str, Any]] = []
        self.disconnects = 0
        self.disconnected = asyncio.Event()
        self.release = asyncio.Event()  # "slow" mode: stream once set
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        prefix = "" if self.dialect == "codec" else f"{self.dialect}+"
        query = f"?max_concurrent={self.limit}" if self.limit else ""
        return f"{prefix}http://127.0.0.1:{self.server.port}{query}"

    def app(self) -> web.Application:
        app = web.Application()
        for path in PATHS[self.dialect]:
            app.router.add_post(path, self.complete)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/abort_request", self.abort)
        if self.dialect == "codec":
            app.router.add_get("/.well-known/codec/index.json", self.index)
            app.router.add_get("/.well-known/codec/maps/{name:.+}.json", self.map)
        return app

    async def start(self) -> FakeUpstream:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=200 if self.healthy else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def index(self, request: web.Request) -> web.Response:
        entry = {"id": MAP_DOC["id"], "url": f"/.well-known/codec/maps/{MAP_DOC['id']}.json", "hash": MAP_HASH}
        return web.json_response({"codec_version": "0.4", "maps": [entry]})

    async def map(self, request: web.Request) -> web.Response:
        return web.Response(body=MAP_BYTES, content_type="application/json")

    async def abort(self, request: web.Request) -> web.Response:
        self.aborts.append(await request.json())
        return web.json_response({})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        if self.mode == "500":
            return web.json_response({"error": {"message": "engine crashed"}}, status=500)
        if self.mode == "426":
            return web.json_response(REFUSAL_426, status=426, headers={"Codec-Min-Version": "0.5"})
        if self.mode == "400":
            return web.json_response({"error": {"message": "prompt is too long"}}, status=400)
        content_type = "application/x-msgpack" if self.dialect == "codec" else "text/event-stream"
        headers = {"Codec-Tokenizer-Map": MAP_HASH} if self.dialect == "codec" else {}
        response = web.StreamResponse(headers={"Content-Type": content_type, **headers})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            if self.mode == "drop-before":
                self._drop(request)
                return response
            body, pos, first = self.body, 0, True
            while pos < len(body):
                step = self.rng.randint(1, 24)
                await response.write(body[pos:pos + step])
                pos += step
                if first and self.mode in {"drop-after", "stall", "slow"}:
                    end = max(pos, self._first_end())
                    await response.write(body[pos:end])  # the rest of the first frame / event
                    pos = end
                    first = False
                    if self.mode == "drop-after":
                        self._drop(request)
                        return response
                    if self.mode == "stall":
                        await asyncio.sleep(30)
                    if self.mode == "slow":
                        while not self.release.is_set():  # keep the call open until released or left
                            await asyncio.sleep(0.02)
                            if request.transport is None or request.transport.is_closing():
                                raise ConnectionResetError("the client left")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            self.disconnected.set()
            raise
        return response

    def _first_end(self) -> int:
        """Where the body's first frame (Codec) or event (SSE) ends."""
        if self.dialect != "codec":
            return self.body.index(b"\n\n") + 2
        unpacker = msgpack.Unpacker()
        unpacker.feed(self.body)
        unpacker.unpack()
        return int(unpacker.tell())

    @staticmethod
    def _drop(request: web.Request) -> None:
        assert request.transport is not None
        request.transport.abort()
