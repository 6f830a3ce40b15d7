"""LegionClient: the one Python requester of the Legion protocol (``meshnode ask``, the demo, tests, benches).

It reads caps (a roster, and the real Legion core's selection rule, legion-mesh §8: peers that are
``available`` and list ``engine_run``, the freshest cap first), calls tools
(:class:`~meshnode.legion.calls.ToolCaller`), and records each call's stream as it arrives:

* ``negotiate=False`` behaves like a real Legion tab: no HELLO; bare Codec frames, exactly one
  msgpack object per ``cf`` message (a message holding more is counted in
  :attr:`CallRecord.multi_object_messages`, since the real core would drop it);
* ``negotiate=True`` sends an envelope HELLO (stream id = call id) offering zstd (and, with
  ``accept_mux``, the multiplexed wire) before the call, and reads READY / DATA / END.

Frames from a peer for a call it is not streaming are counted in :attr:`LegionClient.foreign_frames`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import zstandard

from meshnode.errors import FrameError, MeshError
from meshnode.legion.calls import ToolCaller, new_call_id
from meshnode.room import Room
from meshnode.tasks import TaskOwner
from meshnode.wire import legion
from meshnode.wire.compression import StreamDecompressor
from meshnode.wire.envelopes import DATA, END, HELLO, READY, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame, StreamDecoder
from meshnode.wire.maps import Detokenizer, map_sha256, parse_map

__all__ = ["AskError", "CallRecord", "LegionClient", "ask", "pick_order"]

logger = logging.getLogger(__name__)

CAP_GATHER_SECONDS = 1.0
"""After the first eligible cap, wait this long for others before choosing."""
MAX_MAP_BYTES = 64 * 1024 * 1024
JOIN_POLL_SECONDS = 0.05


class AskError(MeshError):
    """The request could not be completed (no peer, refused, timed out)."""


@dataclass(eq=False)
class CallRecord:
    """What one call produced, as the asker saw it."""

    call_id: str
    peer_id: str
    sent_at: float
    ids: list[int] = field(default_factory=list)
    first_at: float | None = None
    done_at: float | None = None
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(time, ids) of every frame that carried ids."""
    messages: int = 0
    multi_object_messages: int = 0
    finish_reason: str | None = None
    end_reason: str | None = None
    result: legion.ToolResult | None = None
    compression: str = "identity"
    streams: bool = True
    """The call streams frames (engine_run); other tools answer with a result only."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    inflate: StreamDecompressor | None = None
    on_frame: Callable[[CodecFrame], None] | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent_at

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_at is None or self.done_at is None or len(self.ids) < 2:
            return None
        return (len(self.ids) - 1) / max(1e-6, self.done_at - self.first_at)

    @property
    def content(self) -> dict[str, Any]:
        """The ``ok`` result's content (``{}`` otherwise)."""
        if self.result is None or self.result.status != "ok":
            return {}
        return dict((self.result.result or {}).get("content") or {})

    def frame(self, frame: CodecFrame, now: float) -> None:
        if frame.ids:
            if self.first_at is None:
                self.first_at = now
            self.ids.extend(frame.ids)
            self.arrivals.append((now, len(frame.ids)))
        if self.on_frame is not None:
            self.on_frame(frame)
        if frame.done:
            self.finish_reason = frame.finish_reason
            self.done_at = now


class LegionClient:
    """A requester in one room; use ``async with LegionClient(room) as client``."""

    def __init__(self, room: Room, *, negotiate: bool = False, compression: Sequence[str] = ("zstd", "identity"),
                 hello_extra: dict[str, Any] | None = None) -> None:
        self.room = room
        self.negotiate = negotiate
        self.compression = list(compression)
        self.hello_extra = dict(hello_extra or {})
        self.caps: dict[str, tuple[legion.Cap, float]] = {}
        """Latest valid cap per peer, with when it arrived."""
        self.calls: dict[str, CallRecord] = {}
        self.foreign_frames = 0
        self._cap = room.make_action("cap")
        self._cf = room.make_action("cf")
        self._tc = room.make_action("tc")
        self.caller = ToolCaller(self._tc)
        self._cap_seen = asyncio.Event()
        self._bare: dict[str, CallRecord] = {}  # peer id -> the one un-negotiated call streaming from it
        self._tasks = TaskOwner("legion-client")

    def start(self) -> Self:
        """Start reading the room's cap / cf / tc messages (idempotent)."""
        if not len(self._tasks):
            self._tasks.spawn(self._read(self._cap, self._on_cap), "cap")
            self._tasks.spawn(self._read(self._cf, self._on_cf), "cf")
            self._tasks.spawn(self._read(self._tc, self._on_tc), "tc")
        return self

    async def aclose(self) -> None:
        await self._tasks.aclose()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- reading -----------------------------------------------------------------------------------

    async def _read(self, action: Any, handler: Callable[[str, Any, float], None]) -> None:
        async for message in action:
            try:
                handler(message.peer_id, message.payload, time.monotonic())
            except (MeshError, ValueError, KeyError, TypeError) as exc:  # a peer's garbage: never crash
                logger.debug("dropped a message from %s: %s", message.peer_id, exc)

    def _on_cap(self, peer_id: str, payload: Any, now: float) -> None:
        self.caps[peer_id] = (legion.parse_cap(payload), now)
        self._cap_seen.set()

    def _on_tc(self, peer_id: str, payload: Any, now: float) -> None:
        frame = legion.parse_tool_frame(payload)
        if not isinstance(frame, legion.ToolResult):
            return
        self.caller.on_result(peer_id, frame)
        record = self.calls.get(frame.call_id)
        if record is not None and record.peer_id == peer_id:
            record.result = frame
            record.ready.set()  # a refusal comes before any stream
            self._maybe_done(record)

    def _on_cf(self, peer_id: str, payload: Any, now: float) -> None:
        if not isinstance(payload, bytes):
            raise FrameError("cf payload must be binary")
        decoded = decode_cf_payload(payload)
        if isinstance(decoded, CodecFrame):
            record = self._bare.get(peer_id)
            if record is None:
                self.foreign_frames += 1
                return
            record.messages += 1
            decoder = StreamDecoder()
            frames = decoder.feed(payload)
            if len(frames) != 1:
                record.multi_object_messages += 1
            for frame in frames:
                record.frame(frame, now)
            self._maybe_done(record)
            return
        record = self.calls.get(decoded.stream_id)
        if record is None or record.peer_id != peer_id:
            self.foreign_frames += 1
            return
        record.messages += 1
        if decoded.kind == READY:
            body = decoded.body if isinstance(decoded.body, dict) else {}
            record.compression = str(body.get("compression", "identity"))
            record.inflate = StreamDecompressor() if record.compression == "zstd" else None
            record.ready.set()
        elif decoded.kind == DATA and isinstance(decoded.body, bytes):
            raw = record.inflate.decompress(decoded.body) if record.inflate is not None else decoded.body
            for frame in StreamDecoder().feed(raw):
                record.frame(frame, now)
        elif decoded.kind == END:
            body = decoded.body if isinstance(decoded.body, dict) else {}
            record.end_reason = str(body.get("finish_reason"))
            self._maybe_done(record)

    def _maybe_done(self, record: CallRecord) -> None:
        streamed = record.end_reason is not None if self.negotiate else record.done_at is not None
        if record.result is not None and (streamed or not record.streams or record.result.status != "ok"):
            record.done.set()
            if self._bare.get(record.peer_id) is record:
                del self._bare[record.peer_id]

    # -- peers -------------------------------------------------------------------------------------

    def servers(self) -> list[tuple[str, legion.Cap]]:
        """Joined peers in the order a real tab picks them (:func:`pick_order`)."""
        joined = {peer: entry for peer, entry in self.caps.items() if peer in self.room.peers}
        return [(peer, joined[peer][0]) for peer in pick_order(joined)]

    async def find_server(self, timeout: float) -> tuple[str, legion.Cap]:
        """Wait for caps; the best peer that serves engine_run (see :meth:`servers`), once the other
        peers' caps have had CAP_GATHER_SECONDS to arrive too."""
        try:
            async with asyncio.timeout(timeout):
                await self.next_server(timeout)
                await asyncio.sleep(CAP_GATHER_SECONDS)  # let the other peers' caps arrive too
        except (TimeoutError, AskError):
            if not self.servers():
                raise AskError(f"no peer serving engine_run appeared within {timeout:.0f} s") from None
        return self.servers()[0]

    async def next_server(self, timeout: float) -> tuple[str, legion.Cap]:
        """The peer a tab would call now, waiting (bounded) for a cap when none is available (at
        start, or while every meshnode's cap says busy).

        Raises:
            AskError: none became available within `timeout` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not self.servers():
                    self._cap_seen.clear()
                    await self._cap_seen.wait()
        except TimeoutError:
            raise AskError(f"no available peer serving engine_run within {timeout:.0f} s") from None
        return self.servers()[0]

    # -- calls -------------------------------------------------------------------------------------

    async def call(self, peer_id: str, args: dict[str, Any], *, timeout: float, tool: str = "engine_run",
                   on_frame: Callable[[CodecFrame], None] | None = None) -> CallRecord:
        """Call `tool` on `peer_id` and wait for its stream's end and its result.

        Raises:
            TimeoutError: not done within `timeout` seconds (the record stays in :attr:`calls`).
        """
        call_id = new_call_id("tc")
        record = self.calls[call_id] = CallRecord(call_id=call_id, peer_id=peer_id, sent_at=time.monotonic(),
                                                  on_frame=on_frame, streams=tool == "engine_run")
        try:
            await self._call(record, tool, args, timeout)
        finally:
            if self._bare.get(peer_id) is record:
                del self._bare[peer_id]
        return record

    async def _call(self, record: CallRecord, tool: str, args: dict[str, Any], timeout: float) -> None:
        peer_id, call_id = record.peer_id, record.call_id
        async with asyncio.timeout(timeout):
            while peer_id not in self.room.peers:  # noqa: ASYNC110 - bounded by the call's timeout
                await asyncio.sleep(JOIN_POLL_SECONDS)  # messages to a peer that has not joined go nowhere
            if self.negotiate and record.streams:
                hello = Envelope(kind=HELLO, stream_id=call_id, seq=0, body={
                    "codec_version": 1, "accept_compression": self.compression, **self.hello_extra})
                await self._cf.send(encode_envelope(hello), target=peer_id)
                await record.ready.wait()
            elif record.streams:
                if peer_id in self._bare:
                    raise AskError(f"one un-negotiated stream per peer at a time: {peer_id} is still streaming")
                self._bare[peer_id] = record
            record.sent_at = time.monotonic()
            frame = legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id, tool_name=tool, args=args)
            await self._tc.send(frame, target=peer_id)
            await record.done.wait()

    async def fetch_map(self, peer_id: str, cap: legion.Cap, cache_dir: Path, timeout: float) -> dict[str, Any]:
        """The peer's map, from the local cache when its advertised hash is known."""
        map_hash = cap.raw.get("mapHash")
        if isinstance(map_hash, str) and map_hash.startswith("sha256:"):
            cached = await asyncio.to_thread(_read_cached, cache_dir / f"{map_hash[7:]}.json")
            if cached is not None and map_sha256(cached) == map_hash:
                return parse_map(cached, expected_sha256=map_hash)
        try:
            result = await self.caller.call(peer_id, "codec_map", {}, timeout=timeout)
        except TimeoutError:
            raise AskError(f"codec_map on {peer_id}: no result within {timeout:.0f} s") from None
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
        await asyncio.to_thread(_write_cached, cache_dir / f"{digest[7:]}.json", data)
        return document


def pick_order(caps: dict[str, tuple[legion.Cap, float]]) -> list[str]:
    """The real Legion core's provider choice (legion-mesh §8, ``findPeersByTool`` +
    ``pickBestPeer``): peers whose cap is ``available`` and lists ``engine_run``, the freshest cap
    (latest arrival on the local clock; the sender's ``ts`` is not trusted) first, then by peer id
    as the Legion chat app breaks ties. The load a meshnode advertises is not read: meshnodes
    spread calls by saying ``available: false`` while a lighter one is available.

    Args:
        caps: Peer id → (latest valid cap, when it arrived).
    """
    eligible = [(-seen, peer) for peer, (cap, seen) in caps.items() if cap.available and "engine_run" in cap.tools]
    return [peer for _, peer in sorted(eligible)]


def _write_cached(path: Path, data: bytes) -> None:
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs a fetch next time
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _read_cached(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


async def ask(room: Room, prompt: str, *, system: str | None, max_tokens: int, temperature: float,
              timeout: float, cache_dir: Path, write: Callable[[str], None]) -> dict[str, Any]:
    """Ask the best peer; stream text through `write` as frames arrive; return the result content."""
    async with LegionClient(room, negotiate=True) as client:
        peer_id, cap = await client.find_server(timeout)
        logger.info("asking %s (%r, %s)", peer_id, cap.nick, cap.model_id)
        detok = Detokenizer(await client.fetch_map(peer_id, cap, cache_dir, timeout))
        args: dict[str, Any] = {"user": prompt, "max_tokens": max_tokens, "temperature": temperature}
        if system:
            args["system"] = system
        try:
            record = await client.call(peer_id, args, timeout=timeout,
                                       on_frame=lambda frame: write(detok.render(frame.ids, partial=not frame.done)))
        except TimeoutError:
            raise AskError(f"engine_run on {peer_id}: no answer within {timeout:.0f} s") from None
        assert record.result is not None
        if record.result.status != "ok":
            raise AskError(f"{peer_id} answered {record.result.status}: {record.result.error}")
        return record.content
