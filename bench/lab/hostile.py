"""A hostile room member (issue 8 §2): each attack joins with a fresh peer id, attacks a serving
node, checks the node's reaction and returns figures. Shared by tests/integration/test_abuse.py
and bench/abuse.py.

Well-formed but abusive messages go through the hostile Room's own actions; malformed ones are
written straight onto its data channel to the node (`PeerLink.send` of hand-made room frames), so
every byte the node sees is chosen here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from meshnode.room import Room
from meshnode.transport.peer import PeerError
from meshnode.wire import legion
from meshnode.wire.envelopes import END, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame
from meshnode.wire.roomframes import (
    CHUNK_PAYLOAD_BYTES,
    TAG_BINARY,
    TAG_JSON,
    TAG_LAST,
    encode_name,
    encode_room_frame,
)

WAIT_SECONDS = 20.0


@dataclass
class Hostile:
    """A joined hostile peer and its raw access to the node."""

    room: Room
    node_id: str
    left: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def peer_id(self) -> str:
        return self.room.self_id

    def chunk(self, name: str, nonce: int, tags: int, payload: bytes) -> bytes:
        header = encode_name(name) + (nonce % 65536).to_bytes(2, "big") + bytes((tags, 255))
        return encode_room_frame(self.room.token, header + payload)

    async def raw(self, frame: bytes) -> bool:
        """Write one data-channel message to the node; False once the node has dropped us."""
        link = self.room._mesh.live.get(self.node_id) if self.room._mesh is not None else None
        if link is None:
            return False
        try:
            await link.send(frame)
        except PeerError:
            return False
        return True

    async def wait_dropped(self, timeout: float = WAIT_SECONDS) -> float:
        """Seconds until the node's connection to us is gone (the node dropped us)."""
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            await self.left.wait()
        return time.monotonic() - started


Joiner = Callable[[], Awaitable[Room]]


async def join_hostile(join: Joiner, node_id: str) -> Hostile:
    room = await join()
    hostile = Hostile(room=room, node_id=node_id)
    joined = asyncio.Event()
    room.on_peer_join(lambda peer: joined.set() if peer == node_id else None)
    room.on_peer_leave(lambda peer: hostile.left.set() if peer == node_id else None)
    async with asyncio.timeout(WAIT_SECONDS):
        await joined.wait()
    return hostile


async def attack(join: Joiner, node_id: str, run: Callable[[Hostile], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Join a fresh hostile peer, run one attack with it, leave."""
    h = await join_hostile(join, node_id)
    try:
        return await run(h)
    finally:
        await h.room.leave()


def _call(call_id: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    return legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id, tool_name=tool, args=args)


async def _results(room: Room, count: int, timeout: float) -> list[dict[str, Any]]:
    """Up to `count` tc results received within `timeout` seconds."""
    action = room.make_action("tc")
    out: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(out) < count:
                message = await action.receive()
                if isinstance(message.payload, dict) and message.payload.get("kind") == "result":
                    out.append(message.payload)
    except TimeoutError:
        pass
    return out


# -- the attacks -------------------------------------------------------------------------------------


async def tc_flood(h: Hostile, calls: int = 1000) -> dict[str, Any]:
    """1000 valid engine_run calls as fast as the channel takes them: refused, then dropped."""
    tc = h.room.make_action("tc")
    sent = 0
    for i in range(calls):
        if h.left.is_set():
            break
        await tc.send(_call(f"tc-flood-{i}", "engine_run", {"user": "flood"}), target=h.node_id)
        sent += 1
    dropped_after = await h.wait_dropped()
    replies = await _results(h.room, calls, 0.5)
    return {"calls_sent": sent, "replies": len(replies),
            "ok_replies": sum(r.get("status") == "ok" for r in replies), "dropped": True,
            "seconds_to_drop_after_burst": round(dropped_after, 3)}


async def huge_action(h: Hostile, total_bytes: int = 100 * 1024 * 1024) -> dict[str, Any]:
    """One 100 MB binary action, chunk by chunk: the node drops us after its byte burst."""
    payload = bytes(CHUNK_PAYLOAD_BYTES)
    sent = 0
    while sent < total_bytes:
        last = sent + CHUNK_PAYLOAD_BYTES >= total_bytes
        if not await h.raw(h.chunk("cf", 7, TAG_BINARY | TAG_JSON | (TAG_LAST if last else 0), payload)):
            break
        sent += CHUNK_PAYLOAD_BYTES
    await h.wait_dropped()
    return {"bytes_offered": total_bytes, "bytes_sent_before_drop": sent, "dropped": True}


async def long_prompt(h: Hostile, chars: int = 40_000) -> dict[str, Any]:
    """A 10k-token prompt (40k characters): a clear error result, and the peer stays."""
    await h.room.make_action("tc").send(_call("tc-long", "engine_run", {"user": "x" * chars}), target=h.node_id)
    replies = await _results(h.room, 1, WAIT_SECONDS)
    assert replies and replies[0]["status"] == "error", replies
    assert "tokens" in replies[0]["error"] and "limit" in replies[0]["error"], replies[0]
    return {"prompt_chars": chars, "status": replies[0]["status"], "error": replies[0]["error"],
            "dropped": h.left.is_set()}


async def invalid_utf8(h: Hostile) -> dict[str, Any]:
    """Invalid UTF-8 in JSON, string and metadata chunks: replaced or dropped, never a crash."""
    frames = [
        h.chunk("tc", 1, TAG_JSON | TAG_LAST, b'{"kind":"call","v":1,"ts":1,"callId":"\xff\xfe\xfd",'
                                              b'"toolName":"ping","args":{}}'),
        h.chunk("cm", 1, TAG_LAST, b"\xc3\x28\xa0\xa1/ai \xf0\x28\x8c\x28"),
        h.chunk("cap", 1, TAG_JSON | TAG_LAST, b"\xed\xa0\x80{\"v\":1}"),
        h.chunk("tc", 2, TAG_JSON | 0x02, b"\xff\xff"),  # a metadata chunk that is not JSON
        h.chunk("tc", 2, TAG_JSON | TAG_LAST, b"{}"),
    ]
    for frame in frames:
        await h.raw(frame)
    replies = await _results(h.room, 1, 2.0)
    return {"messages": len(frames), "replies": [r.get("status") for r in replies], "dropped": h.left.is_set()}


async def nested_json(h: Hostile) -> dict[str, Any]:
    """100 000 nested brackets, and valid JSON nested deeper than the guard allows: dropped."""
    deep: Any = {"x": 1}
    for _ in range(40):
        deep = {"a": deep}
    frames = [
        h.chunk("tc", 3, TAG_JSON | TAG_LAST, b"[" * 100_000),
        h.chunk("cap", 3, TAG_JSON | TAG_LAST, b'{"v":1,' * 20_000),
        h.chunk("tc", 4, TAG_JSON | TAG_LAST, json.dumps(_call("tc-deep", "ping", {"payload": deep})).encode()),
    ]
    for frame in frames:
        await h.raw(frame)
    replies = await _results(h.room, 1, 2.0)
    return {"messages": len(frames), "replies": [r.get("status") for r in replies], "dropped": h.left.is_set()}


async def unknown_actions(h: Hostile, node_room: Room, count: int = 200, size: int = 4096) -> dict[str, Any]:
    """Messages on 50 action names nobody registered: kept within the backlog bounds."""
    for i in range(count):
        await h.raw(h.chunk(f"junk{i % 50}", i, TAG_BINARY | TAG_JSON | TAG_LAST, bytes(size)))
    await h.room.ping(h.node_id, WAIT_SECONDS)  # the channel is ordered: everything before has arrived
    backlog = node_room._backlog.bytes
    assert backlog <= node_room.config.max_backlog_bytes
    assert len(node_room._backlog) <= 16
    return {"messages": count, "bytes": count * size, "node_backlog_bytes": backlog,
            "node_backlog_names": len(node_room._backlog), "dropped": h.left.is_set()}


async def forged_from(h: Hostile, honest_id: str) -> dict[str, Any]:
    """`/ai` chat claiming to come from the honest peer: answered to the real sender only."""
    chat = legion.build_chat(ts_ms=int(time.time() * 1000), from_id=honest_id, to=h.node_id, text="/ai forged")
    frames = h.room.make_action("cf")
    await h.room.make_action("cm").send(chat, target=h.node_id)
    received = 0
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            while True:
                message = await frames.receive()
                received += 1
                decoded = decode_cf_payload(message.payload)
                if isinstance(decoded, CodecFrame) and decoded.done:
                    break
    except TimeoutError:
        pass
    return {"frames_to_forger": received, "dropped": h.left.is_set()}


async def foreign_streams(h: Hostile, stream_ids: list[str]) -> dict[str, Any]:
    """END (cancel) and DATA envelopes for the honest peer's streams: ignored."""
    cf = h.room.make_action("cf")
    for stream_id in stream_ids:
        await cf.send(encode_envelope(Envelope(kind=END, stream_id=stream_id, seq=9,
                                               body={"codec_version": 1, "finish_reason": "cancel"})),
                      target=h.node_id)
    return {"streams_targeted": len(stream_ids), "dropped": h.left.is_set()}


async def partial_chunks(h: Hostile, node_room: Room, limit: int) -> dict[str, Any]:
    """Endless first chunks that never complete: bounded per peer, then dropped for the bytes."""
    piece = bytes(8192)
    for nonce in range(100):
        await h.raw(h.chunk("tc", nonce, TAG_JSON, piece))
    await h.room.ping(h.node_id, WAIT_SECONDS)
    pending = node_room._reassembler.pending_messages(h.peer_id)
    assert pending <= limit, pending
    sent = 100
    while await h.raw(h.chunk("tc", 100 + sent, TAG_JSON, bytes(CHUNK_PAYLOAD_BYTES))):
        sent += 1
        if sent > 100_000:
            break
    await h.wait_dropped()
    return {"partial_messages_sent": sent, "node_pending_messages_peak": pending, "dropped": True}
