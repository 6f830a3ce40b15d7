"""`meshnode ask`: a Python requester. Finds a serving peer, calls engine_run, prints text live.

Flow: join the room; collect caps for a moment and pick the available peer with `engine_run` and
the lowest load; fetch its tokenizer map once (`codec_map` tool, cached by hash); open an envelope
stream (HELLO with zstd, stream id = call id); call `engine_run`; detokenize DATA frames as they
arrive; finish on the tool result.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard

from meshnode.errors import MeshError
from meshnode.wire.maps import Detokenizer, map_sha256, parse_map
from meshnode.room import Room
from meshnode.settings import Settings
from meshnode.wire import legion
from meshnode.wire.compression import StreamDecompressor
from meshnode.wire.envelopes import DATA, END, HELLO, READY, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame, decode_frame

logger = logging.getLogger(__name__)

CAP_GATHER_SECONDS = 1.0
MAX_MAP_BYTES = 64 * 1024 * 1024


class AskError(MeshError):
    """The request could not be completed (no peer, refused, timed out)."""


async def find_server(room: Room, caps: Any, timeout: float) -> tuple[str, legion.Cap]:
    """Wait for caps; return the least-loaded available peer that serves engine_run."""
    found: dict[str, legion.Cap] = {}
    deadline = asyncio.get_running_loop().time() + timeout
    gather_until: float | None = None
    while True:
        now = asyncio.get_running_loop().time()
        until = min(deadline, gather_until) if gather_until else deadline
        if now >= until:
            break
        try:
            async with asyncio.timeout(until - now):
                message = await caps.receive()
        except TimeoutError:
            break
        try:
            cap = legion.parse_cap(message.payload)
        except legion.LegionError as exc:
            logger.debug("ignoring cap from %s: %s", message.peer_id, exc)
            continue
        if cap.available and "engine_run" in cap.tools:
            found[message.peer_id] = cap
            gather_until = gather_until or asyncio.get_running_loop().time() + CAP_GATHER_SECONDS
    if not found:
        raise AskError(f"no peer serving engine_run appeared within {timeout:.0f} s")
    peer_id = min(found, key=lambda p: (found[p].load_ratio, p))
    return peer_id, found[peer_id]


class ToolClient:
    """Sends tc calls and matches results by callId."""

    def __init__(self, room: Room) -> None:
        self.action = room.make_action("tc")
        self.pending: dict[str, asyncio.Future[legion.ToolResult]] = {}

    async def run(self) -> None:
        async for message in self.action:
            try:
                frame = legion.parse_tool_frame(message.payload)
            except legion.LegionError:
                continue
            future = self.pending.get(frame.call_id)
            if isinstance(frame, legion.ToolResult) and future is not None and not future.done():
                future.set_result(frame)

    async def call(self, peer_id: str, tool: str, args: dict[str, Any], call_id: str, timeout: float) -> legion.ToolResult:
        future: asyncio.Future[legion.ToolResult] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        try:
            await self.action.send(legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id,
                                                     tool_name=tool, args=args), target=peer_id)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise AskError(f"{tool} on {peer_id}: no result within {timeout:.0f} s") from None
        finally:
            self.pending.pop(call_id, None)


def new_call_id() -> str:
    return "tc-" + secrets.token_hex(6)


async def fetch_map(tools: ToolClient, peer_id: str, cap: legion.Cap, cache_dir: Path, timeout: float) -> dict[str, Any]:
    """The peer's map, from the local cache when its advertised hash is known."""
    map_hash = cap.raw.get("mapHash")
    if isinstance(map_hash, str) and map_hash.startswith("sha256:"):
        cached = cache_dir / f"{map_hash[7:]}.json"
        if cached.is_file():
            data = cached.read_bytes()
            if map_sha256(data) == map_hash:
                return parse_map(data, expected_sha256=map_hash)
    result = await tools.call(peer_id, "codec_map", {}, new_call_id(), timeout)
    if result.status != "ok" or not result.result:
        raise AskError(f"{peer_id} did not send its tokenizer map: {result.error}")
    content = result.result.get("content", {})
    if content.get("encoding") != "zstd+base64" or not isinstance(content.get("data"), str):
        raise AskError("codec_map result is not zstd+base64 map data")
    try:
        packed = base64.b64decode(content["data"], validate=True)
        data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=MAX_MAP_BYTES)
    except (ValueError, zstandard.ZstdError) as exc:
        raise AskError(f"codec_map data is corrupt: {exc}") from exc
    digest = map_sha256(data)
    if content.get("map_hash") != digest or (isinstance(map_hash, str) and map_hash != digest):
        raise AskError(f"map hash mismatch: advertised {content.get('map_hash')}, got {digest}")
    document = parse_map(data, expected_sha256=digest)
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / f"{digest[7:]}.json").write_bytes(data)
    return document


async def ask(room: Room, prompt: str, *, system: str | None, max_tokens: int, temperature: float,
              timeout: float, cache_dir: Path, write: Callable[[str], None]) -> dict[str, Any]:
    """Ask the best peer; stream text through `write`; return the tool result content."""
    caps = room.make_action("cap")
    frames = room.make_action("cf")
    tools = ToolClient(room)
    reader = asyncio.create_task(tools.run(), name="ask.tc")
    try:
        peer_id, cap = await find_server(room, caps, timeout)
        logger.info("asking %s (%r, %s)", peer_id, cap.nick, cap.model_id)
        detok = Detokenizer(await fetch_map(tools, peer_id, cap, cache_dir, timeout))
        call_id = new_call_id()
        hello = Envelope(kind=HELLO, stream_id=call_id, seq=0,
                         body={"codec_version": 1, "accept_compression": ["zstd", "identity"], "intent": "chat"})
        await frames.send(encode_envelope(hello), target=peer_id)
        args: dict[str, Any] = {"user": prompt, "max_tokens": max_tokens, "temperature": temperature}
        if system:
            args["system"] = system
        streaming = asyncio.create_task(_print_stream(frames, peer_id, call_id, detok, write), name="ask.cf")
        try:
            result = await tools.call(peer_id, "engine_run", args, call_id, timeout)
            async with asyncio.timeout(5):
                await streaming  # END travels before the result on the same ordered channel
        finally:
            streaming.cancel()
        if result.status != "ok":
            raise AskError(f"{peer_id} answered {result.status}: {result.error}")
        return dict((result.result or {}).get("content", {}))
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _print_stream(frames: Any, peer_id: str, call_id: str, detok: Detokenizer,
                        write: Callable[[str], None]) -> None:
    inflate: StreamDecompressor | None = None
    async for message in frames:
        if message.peer_id != peer_id or not isinstance(message.payload, bytes):
            continue
        decoded = decode_cf_payload(message.payload)
        if isinstance(decoded, CodecFrame):
            continue  # bare frames belong to /ai or other streams
        if decoded.stream_id != call_id:
            continue
        if decoded.kind == READY:
            body = decoded.body if isinstance(decoded.body, dict) else {}
            inflate = StreamDecompressor() if body.get("compression") == "zstd" else None
        elif decoded.kind == DATA and isinstance(decoded.body, bytes):
            raw = inflate.decompress(decoded.body) if inflate else decoded.body
            frame = decode_frame(raw)
            write(detok.render(frame.ids, partial=not frame.done))
        elif decoded.kind == END:
            return


async def run_ask(args: argparse.Namespace, settings: Settings) -> int:
    from meshnode.generation.models import default_cache_dir
    from meshnode.node.node import room_config

    cache = Path(settings.model.cache_dir) if settings.model.cache_dir else default_cache_dir()
    room = await Room.join(room_config(settings))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        content = await ask(room, args.prompt, system=args.system, max_tokens=args.max_tokens,
                            temperature=args.temperature, timeout=args.timeout, cache_dir=cache / "maps", write=write)
    except AskError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        await room.leave()
    sys.stdout.write("\n")
    logger.info("%s tokens, finish=%s, first token after %s ms", content.get("tokens"), content.get("finish_reason"),
                content.get("ttft_ms"))
    return 0
