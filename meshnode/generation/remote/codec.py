"""Codec HTTP upstreams (legion-mesh §2.6): msgpack frames passed through byte for byte.

The request is an OpenAI-shaped completion with ``stream_format: "msgpack"`` and
``Codec-Client-Version: 0.4``; the body is Codec frames back to back (§2.2). Each frame is parsed
(ids, done, finish_reason) and also kept as the exact bytes the upstream sent, which the node
forwards unchanged (``TokenChunk.frame``). The map comes from the upstream's own
``/.well-known/codec/index.json`` and the map document it lists (§4.4), verified against its hash,
so no local tokenizer is needed. ``meshnode serve-http`` is such an upstream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import aiohttp

from meshnode.errors import FrameError, ProtocolError
from meshnode.generation.api import CodecMapInfo, FinishReason, Prompt, SamplingParams
from meshnode.generation.remote.dialects import HttpCall, Piece
from meshnode.generation.remote.upstream import UpstreamError, read_limited
from meshnode.wire.frames import StreamDecoder
from meshnode.wire.maps import family_for_model_id, map_sha256, parse_map

__all__ = ["CODEC_CLIENT_VERSION", "CodecDialect", "CodecParser", "fetch_map", "finish_of"]

logger = logging.getLogger(__name__)

CODEC_CLIENT_VERSION = "0.4"
"""Sent as ``Codec-Client-Version`` (legion-mesh §2.6: an absent header means 0.2)."""
MAX_MAP_BYTES = 64 * 1024 * 1024
"""Largest map document fetched from an upstream (Qwen2's is about 7 MiB)."""

# legion-mesh §2.1: spec values, plus what engines really send (stop / length / abort / cancel).
_FINISH: dict[str, FinishReason] = {"stop": "stop", "eos_token": "stop", "stop_sequence": "stop",
                                    "length": "length", "cancel": "cancel"}


def finish_of(reason: str | None) -> tuple[FinishReason, str | None]:
    """A Codec ``finish_reason`` as this node's finish and, for failures, an error text.

    A missing reason on the done frame means ``stop`` (the bridge's rule); unknown strings,
    ``error``, ``abort`` and ``policy_violation`` are failures (§2.1: "treat as error").
    """
    if reason is None:
        return "stop", None
    known = _FINISH.get(reason)
    if known is not None:
        return known, None
    return "error", f"upstream finished with {reason!r}"


class CodecParser:
    """Codec msgpack frames (any read split) to pieces carrying each frame's exact bytes."""

    def __init__(self) -> None:
        self._decoder = StreamDecoder()
        self._done = False
        self._ignored = 0

    def feed(self, data: bytes) -> list[Piece]:
        if self._done:
            self._ignored += len(data)
            return []
        try:
            frames = self._decoder.feed_raw(data)
        except FrameError as exc:
            raise ProtocolError(f"upstream sent a malformed Codec frame: {exc}") from exc
        pieces: list[Piece] = []
        for frame, raw in frames:
            if self._done:  # nothing follows a done frame (§2.1); drop what does, once logged
                self._ignored += len(raw)
                continue
            if frame.done:
                self._done = True
                finish, error = finish_of(frame.finish_reason)
                pieces.append(Piece(ids=frame.ids, finish=finish, frame=raw, error=error))
            else:
                pieces.append(Piece(ids=frame.ids, frame=raw))
        return pieces

    def close(self) -> list[Piece]:
        if self._ignored:
            logger.warning("upstream sent %d bytes after its last frame (ignored)", self._ignored)
        if self._done:
            return []
        if self._decoder.buffered_bytes:
            raise ProtocolError(f"upstream closed the stream inside a frame ({self._decoder.buffered_bytes} bytes)")
        raise ProtocolError("upstream closed the stream before its last (done) frame")


def _limit_from_metrics(body: bytes) -> int | None:
    """``meshnode_max_concurrent`` from a meshnode's ``/metrics`` (other Codec servers have none)."""
    for line in body.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(" ")
        if name == "meshnode_max_concurrent" and value.strip().isdigit():
            return int(value.strip()) or None
    return None


class CodecDialect:
    """A Codec HTTP server (``meshnode serve-http``, the Codec engine forks)."""

    name = "codec"
    chat_native = True
    serves_map = True
    health_path = "/health"
    content_type = "application/x-msgpack"
    discovery: tuple[str, Callable[[bytes], int | None]] | None = ("/metrics", _limit_from_metrics)

    def request(self, prompt: Prompt, params: SamplingParams, rid: str, model: str | None) -> HttpCall:
        body: dict[str, Any] = {}
        if model:
            body["model"] = model
        if prompt.messages is not None:
            path, body["messages"] = "/v1/chat/completions", [dict(m) for m in prompt.messages]
        else:
            path, body["prompt"] = "/v1/completions", prompt.text if prompt.text is not None else list(prompt.ids or ())
        body.update(stream_format="msgpack", stream=True, max_tokens=params.max_tokens,
                    temperature=params.temperature, top_p=params.top_p)
        if params.top_k:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        headers = {"Codec-Client-Version": CODEC_CLIENT_VERSION, "Accept": "application/x-msgpack",
                   "Accept-Encoding": "identity"}  # §2.7: compressed bodies do not stream
        return HttpCall(path=path, body=body, headers=headers)

    def parser(self, encode: Callable[[str], list[int]] | None) -> CodecParser:
        return CodecParser()

    def abort(self, rid: str) -> HttpCall | None:
        return None  # closing the stream is the cancel (serve-http cancels at its next write)


async def _get(session: aiohttp.ClientSession, url: str, base: str) -> bytes:
    try:
        async with session.get(url, headers={"Accept-Encoding": "identity"}) as response:
            if response.status != 200:
                raise UpstreamError(f"GET {url} answered {response.status}", url=base, status=response.status)
            return await read_limited(response, MAX_MAP_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise UpstreamError(f"GET {url} failed: {exc or type(exc).__name__}", url=base) from exc


async def fetch_map(session: aiohttp.ClientSession, base: str, model_id: str | None) -> CodecMapInfo:
    """The upstream's Codec map: ``index.json``, then the document it lists, hash verified (§4.4).

    The entry whose id is the family of ``model_id`` is preferred (a browser picks that one,
    §4.5), else the first. A pointer document (``{id, url, hash}``) is followed once.

    Raises:
        UpstreamError: The upstream does not answer, or serves no index (HTTP status).
        ProtocolError: The index or the map is malformed, or the hash does not match.
    """
    index_url = f"{base}/.well-known/codec/index.json"
    try:
        index = json.loads(await _get(session, index_url, base))
        entries = [e for e in index["maps"] if isinstance(e, dict)]
        wanted = family_for_model_id(model_id) if model_id else None
        entry = next((e for e in entries if e.get("id") == wanted), entries[0])
        map_id, map_url, pinned = str(entry["id"]), str(entry["url"]), str(entry["hash"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ProtocolError(f"{index_url} is not a Codec map index: {exc}") from exc
    document_url = urljoin(index_url, map_url)
    data = await _get(session, document_url, base)
    try:
        head = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"{document_url} is not JSON: {exc}") from exc
    if isinstance(head, dict) and "vocab" not in head and isinstance(head.get("url"), str):
        pinned = str(head.get("hash") or pinned)  # a pointer (§4.4); pointer chains are refused below
        document_url = urljoin(document_url, head["url"])
        data = await _get(session, document_url, base)
    parse_map(data, expected_sha256=pinned)
    return CodecMapInfo(map_id=map_id, map_hash=map_sha256(data), data=data)
