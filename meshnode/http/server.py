"""The Codec HTTP endpoint (aiohttp): OpenAI-shaped completions streamed as SSE JSON or Codec frames.

Routes (legion-mesh §2.6, §4.4):
  POST /v1/completions, POST /v1/chat/completions   stream_format "json" (SSE, default) | "msgpack"
  GET  /v1/models
  GET  /.well-known/codec/index.json, /.well-known/codec/maps/<id>.json
  GET  /metrics                                      Prometheus text format
  GET  /health                                       200 {"status": "ok"}; 503 with no capacity (all upstreams down)

A client that leaves mid-stream (disconnect, or its task cancelled) cancels the generation and is
counted in ``meshnode_http_cancelled_total``. A ``Codec-Client-Version`` whose major is not the
one this server speaks (0) is answered 426 with the spec's ``codec_version_required`` body. Chunks
that carry an upstream's exact frame (a node fronting other Codec servers) are written unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from aiohttp import web

from meshnode.errors import AdmissionError
from meshnode.generation.api import Backend, SamplingParams, TokenStream, UpstreamReporter
from meshnode.generation.modelinfo import map_index
from meshnode.generation.text import IncrementalText
from meshnode.http.metrics import Metrics
from meshnode.http.requests import Limits, ParsedRequest, RequestError, parse_request
from meshnode.wire.frames import CodecFrame, encode_frame

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)$")
CORS = {"Access-Control-Allow-Origin": "*"}
CODEC_MAJOR = 0
"""The Codec major version this server speaks (0.2 to 0.4 behaviour, legion-mesh §2.6)."""
MIN_CODEC_VERSION = "0.2"
"""The oldest client version served (an absent header means 0.2)."""
VERSION_DOCS_URL = "https://codecai.net/docs/version-negotiation/"


def parse_client_version(header: str | None) -> tuple[int, int]:
    """`Codec-Client-Version` → (major, minor); absent means 0.2 (legion-mesh §2.6)."""
    if header is None or not header.strip():
        return (0, 2)
    match = _VERSION_RE.match(header.strip())
    if not match:
        raise RequestError(
            f"Codec-Client-Version must look like '0.4', got {header!r}", field="Codec-Client-Version"
        )
    return (int(match.group(1)), int(match.group(2)))


def _error(status: int, message: str, field: str | None = None, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    return web.json_response(body, status=status, headers=CORS)


def _version_required(header: str, version: tuple[int, int]) -> web.Response:
    """426 for a client major this server does not speak (legion-mesh §2.6 426 body and headers)."""
    body = {"error": "codec_version_required", "minimum_version": MIN_CODEC_VERSION, "required_features": [],
            "client_version": header.strip(), "docs_url": VERSION_DOCS_URL,
            "message": f"Codec-Client-Version {version[0]}.{version[1]} is not supported: this server speaks "
                       f"Codec {CODEC_MAJOR}.x (0.2 to 0.4); send Codec-Client-Version: 0.4"}
    return web.json_response(body, status=426, headers={**CORS, "Codec-Min-Version": MIN_CODEC_VERSION})


class CodecHttpApp:
    """Builds the aiohttp application around a backend."""

    def __init__(self, backend: Backend, limits: Limits, metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.limits = limits
        self.metrics = metrics or Metrics()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=2 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/.well-known/codec/index.json", self.map_index)
        app.router.add_get(r"/.well-known/codec/maps/{map_id:.+}.json", self.map_document)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        """200 while the backend can serve; 503 when it has no capacity at all (every upstream down)."""
        if self.backend.load_info().get("max_concurrent", 1) <= 0:
            return web.json_response({"status": "unavailable"}, status=503, headers=CORS)
        return web.json_response({"status": "ok"}, headers=CORS)

    # --- discovery -------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": self.backend.model_id, "object": "model", "owned_by": "meshnode", "created": 0}]
        return web.json_response({"object": "list", "data": data}, headers=CORS)

    async def map_index(self, request: web.Request) -> web.Response:
        codec_map = await self.backend.codec_map()
        body = map_index(codec_map.map_id, codec_map.map_hash)
        return web.json_response(body, headers={**CORS, "Cache-Control": "max-age=300"})

    async def map_document(self, request: web.Request) -> web.Response:
        codec_map = await self.backend.codec_map()
        if request.match_info["map_id"] != codec_map.map_id:
            return _error(404, f"no map {request.match_info['map_id']!r}; this node serves {codec_map.map_id!r}")
        return web.Response(body=codec_map.data, content_type="application/json",
                            headers={**CORS, "Cache-Control": "max-age=300", "Codec-Tokenizer-Map": codec_map.map_hash})

    async def metrics_text(self, request: web.Request) -> web.Response:
        load = self.backend.load_info()
        upstreams = self.backend.upstreams() if isinstance(self.backend, UpstreamReporter) else []
        text = self.metrics.render(queue_depth=load.get("queued", 0), active=load.get("active", 0),
                                   max_concurrent=load.get("max_concurrent", 0), upstreams=upstreams)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # --- completions -----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        endpoint = "chat" if chat else "completions"
        try:
            version = parse_client_version(request.headers.get("Codec-Client-Version"))
            if version[0] != CODEC_MAJOR:
                self.metrics.request(endpoint, "426")
                return _version_required(request.headers.get("Codec-Client-Version", ""), version)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError("request body must be valid JSON") from None
            parsed = parse_request(body, self.limits, chat=chat)
            stream = await self.backend.start(parsed.prompt, self._sampling(parsed))
        except RequestError as exc:
            self.metrics.request(endpoint, "400")
            return _error(400, str(exc), exc.field)
        except AdmissionError as exc:
            busy = "busy" in str(exc).lower() or "queue" in str(exc).lower()
            if not busy and exc.field == "upstream":  # a remote backend with no upstream to ask
                self.metrics.request(endpoint, "503")
                return _error(503, str(exc), exc.field, kind="service_unavailable_error")
            self.metrics.request(endpoint, "429" if busy else "400")
            return _error(429 if busy else 400, str(exc), exc.field,
                          kind="rate_limit_error" if busy else "invalid_request_error")

        started = time.monotonic()
        codec_map = await self.backend.codec_map()
        extra_headers = {"Codec-Tokenizer-Map": codec_map.map_hash} if version >= (0, 4) else {}
        try:
            if parsed.stream_format == "msgpack":
                return await self._stream_msgpack(request, stream, parsed, extra_headers, started)
            if parsed.stream:
                return await self._stream_sse(request, stream, parsed, chat, started)
            return await self._whole(stream, parsed, chat, started)
        except (asyncio.CancelledError, ConnectionResetError):
            # The client left mid-stream (aiohttp raises ConnectionResetError on the next write, or
            # cancels the handler): stop generating, count it, and let aiohttp close the request.
            if not stream.done:
                self.metrics.cancelled(endpoint)
                logger.info("client left %s after %d tokens: generation cancelled", endpoint,
                            stream.completion_tokens)
            raise
        finally:
            stream.cancel()
            self.metrics.request(endpoint, "200")

    def _sampling(self, parsed: ParsedRequest) -> SamplingParams:
        return SamplingParams(
            temperature=parsed.temperature, top_p=parsed.top_p, top_k=parsed.top_k, seed=parsed.seed,
            max_tokens=parsed.max_tokens, stop=parsed.stop,
        )

    def _observe_first(self, started: float, first: list[bool]) -> None:
        if not first[0]:
            first[0] = True
            self.metrics.ttft(time.monotonic() - started)

    async def _stream_msgpack(self, request: web.Request, stream: TokenStream, parsed: ParsedRequest,
                              headers: dict[str, str], started: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            **CORS, **headers, "Content-Type": "application/x-msgpack", "Vary": "Accept-Encoding",
            "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        first = [False]
        async for chunk in stream:
            if chunk.ids:
                self._observe_first(started, first)
                self.metrics.tokens(len(chunk.ids))
            done = chunk.finish_reason is not None
            if chunk.frame is not None:  # an upstream's frame: forwarded byte for byte
                await response.write(chunk.frame)
            elif chunk.ids or done:
                await response.write(encode_frame(CodecFrame(ids=list(chunk.ids), done=done,
                                                              finish_reason=chunk.finish_reason)))
        await response.write_eof()
        return response

    async def _stream_sse(self, request: web.Request, stream: TokenStream, parsed: ParsedRequest, chat: bool,
                          started: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={**CORS, "Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        text = IncrementalText(self.backend)
        first = [False]
        if chat:
            opening = _chat_chunk(ident, created, self.backend.model_id, {"role": "assistant", "content": ""}, None)
            await response.write(_sse(opening))
        async for chunk in stream:
            if chunk.ids:
                self._observe_first(started, first)
                self.metrics.tokens(len(chunk.ids))
            done = chunk.finish_reason is not None
            delta = text.push(list(chunk.ids), final=done)
            if delta:
                await response.write(_sse(self._chunk(chat, ident, created, delta, None)))
            if done:
                await response.write(_sse(self._chunk(chat, ident, created, "", _openai_reason(chunk.finish_reason))))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _chunk(self, chat: bool, ident: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
        if chat:
            return _chat_chunk(ident, created, self.backend.model_id, {"content": text} if text else {}, finish)
        return {"id": ident, "object": "text_completion", "created": created, "model": self.backend.model_id,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    async def _whole(self, stream: TokenStream, parsed: ParsedRequest, chat: bool, started: float) -> web.Response:
        ids: list[int] = []
        finish = None
        first = [False]
        async for chunk in stream:
            if chunk.ids:
                self._observe_first(started, first)
                self.metrics.tokens(len(chunk.ids))
            ids.extend(chunk.ids)
            finish = chunk.finish_reason or finish
        text = self.backend.decode(ids)
        usage = {"prompt_tokens": stream.prompt_tokens, "completion_tokens": len(ids),
                 "total_tokens": stream.prompt_tokens + len(ids)}
        ident = uuid.uuid4().hex[:24]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": _openai_reason(finish)}
            body = {"id": "chatcmpl-" + ident, "object": "chat.completion", "created": int(time.time()),
                    "model": self.backend.model_id, "choices": [choice], "usage": usage}
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": _openai_reason(finish)}
            body = {"id": "cmpl-" + ident, "object": "text_completion", "created": int(time.time()),
                    "model": self.backend.model_id, "choices": [choice], "usage": usage}
        return web.json_response(body, headers=CORS)


def _openai_reason(reason: str | None) -> str | None:
    return {"cancel": "stop"}.get(reason or "", reason)


def _chat_chunk(ident: str, created: int, model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
