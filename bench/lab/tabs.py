"""The bench's requesting tabs: each its own peer in the trial's one room, one or more streams each.

* **Plain tabs** behave like the real Legion core: no HELLO, each ``cf`` message must be exactly
  one msgpack object (a bare Codec frame; a message with more is counted as a fault), and the
  answer's text is read from the ``engine_run`` result (``content.text``).
* **HELLO askers** open each stream with a HELLO (zstd, multiplexing when a tab runs several
  streams, no repeated text in the result), as meshnode's own clients may.

Tabs connect only to the node: their peer ids share :data:`TAB_ID_PREFIX` and each ignores the
others' signals (``RoomConfig.peer_filter``), so hundreds of tabs share the node's room without
meshing with each other (which would cost the requester processes, not the node's link). A tab
asks whatever the node's cap says: refusals are measured, not avoided.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from bench.lab.modes import Mode
from meshnode.errors import FrameError, MeshError
from meshnode.link.pacer import decode_mux_body
from meshnode.room import Room
from meshnode.wire import legion
from meshnode.wire.compression import StreamDecompressor
from meshnode.wire.envelopes import DATA, END, HELLO, READY, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame, StreamDecoder

logger = logging.getLogger("bench.lab.tabs")

TAB_ID_PREFIX = "benchtab"
READY_TIMEOUT_SECONDS = 10.0
PROMPT = "Tell me about meshes."


def tab_id() -> str:
    """A 20-character Trystero peer id that marks a bench tab."""
    alphabet = string.ascii_letters + string.digits
    return TAB_ID_PREFIX + "".join(secrets.choice(alphabet) for _ in range(20 - len(TAB_ID_PREFIX)))


def is_node(peer_id: str) -> bool:
    """The tabs' peer filter: talk to anything that is not another bench tab."""
    return not peer_id.startswith(TAB_ID_PREFIX)


@dataclass
class StreamRecord:
    """What one requested stream saw (times in seconds on the system's monotonic clock)."""

    tab: int
    call_id: str
    late: bool = False
    started: float = 0.0
    first: float | None = None
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    tokens: int = 0
    done: bool = False
    finish: str | None = None
    refused: str | None = None
    error: str | None = None
    result_at: float | None = None
    text_chars: int | None = None
    cap_available: bool = True
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    compression: str = "identity"
    inflate: StreamDecompressor | None = None
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the engine_run result is in (or the request failed here): the stream is settled."""

    def add(self, count: int, now: float) -> None:
        if count <= 0:
            return
        if self.first is None:
            self.first = now
        self.arrivals.append((now, count))
        self.tokens += count

    def end(self, finish: str | None) -> None:
        """The last frame arrived (or the stream is over without one)."""
        self.done = True
        self.finish = finish

    def fail(self, error: str) -> None:
        self.error = error
        self.end(None)
        self.finished.set()

    def summary(self, origin: float) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - origin, 4)

        return {
            "peer": self.tab, "call_id": self.call_id, "late": self.late, "started": rel(self.started),
            "first": rel(self.first), "arrivals": [[round(t - origin, 4), n] for t, n in self.arrivals],
            "tokens": self.tokens, "done": self.done, "finish": self.finish, "refused": self.refused,
            "error": self.error, "result_at": rel(self.result_at), "text_chars": self.text_chars,
            "cap_available": self.cap_available,
        }


class Tab:
    """One requesting peer with its own room handle (its own peer id and connection)."""

    def __init__(self, index: int, room: Room, mode: Mode, streams: int, *, late: bool = False) -> None:
        self.index = index
        self.room = room
        self.mode = mode
        self.streams = streams
        self.late = late
        self.caps = room.make_action("cap")
        self.cf = room.make_action("cf")
        self.tc = room.make_action("tc")
        self.node: str | None = None
        self.node_seen = asyncio.Event()
        self.node_available = True
        self.records: dict[str, StreamRecord] = {}
        self.by_mux: dict[tuple[str, int], StreamRecord] = {}
        self.connect_s: float | None = None
        """Late tabs: seconds from joining the room to the node's cap."""
        self.multi_object_messages = 0
        """Plain tabs: cf messages that held more than one msgpack object (the real core reads one)."""

    @property
    def hello(self) -> bool:
        return self.mode.hello or (self.mode.name == "codec" and self.streams > 1)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._loop(self.caps, self._on_cap), name=f"tab{self.index}.cap")
            group.create_task(self._loop(self.cf, self._on_cf), name=f"tab{self.index}.cf")
            group.create_task(self._loop(self.tc, self._on_tc), name=f"tab{self.index}.tc")

    async def _loop(self, action: Any, handler: Any) -> None:
        while True:
            message = await action.receive()
            try:
                handler(message.peer_id, message.payload, time.monotonic())
            except (MeshError, ValueError, KeyError, TypeError) as exc:
                logger.debug("tab %d: dropped a message: %s", self.index, exc)

    def _on_cap(self, peer_id: str, payload: Any, now: float) -> None:
        cap = legion.parse_cap(payload)
        if "engine_run" in cap.tools:
            self.node = peer_id
            self.node_available = cap.available
            self.node_seen.set()

    def _on_tc(self, peer_id: str, payload: Any, now: float) -> None:
        frame = legion.parse_tool_frame(payload)
        record = self.records.get(frame.call_id)
        if record is None or not isinstance(frame, legion.ToolResult):
            return
        record.result_at = now
        if frame.status != "ok":
            if record.tokens == 0:
                record.refused = frame.error or f"{frame.status} (no reason given)"
            else:
                record.error = frame.error or frame.status
            record.end(None)
            record.finished.set()
            return
        content = (frame.result or {}).get("content")
        content = content if isinstance(content, dict) else {}
        text = content.get("text")
        record.text_chars = len(text) if isinstance(text, str) else None
        if not record.done:
            record.end(record.finish or "result-before-end")
        record.finished.set()

    def _frames(self, record: StreamRecord, data: bytes, now: float) -> None:
        raw = record.inflate.decompress(data) if record.inflate is not None else data
        for frame in record.decoder.feed(raw):
            record.add(len(frame.ids), now)
            if frame.done:
                record.end(frame.finish_reason or "stop")

    def _on_cf(self, peer_id: str, payload: Any, now: float) -> None:
        if isinstance(payload, dict):  # the json-sse baseline: one JSON text chunk per token
            self._on_sse(payload, now)
            return
        if not isinstance(payload, bytes):
            return
        decoded = decode_cf_payload(payload)
        if isinstance(decoded, CodecFrame):  # bare frames: only when this tab runs one stream
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(payload)
            if sum(1 for _ in unpacker) != 1:
                self.multi_object_messages += 1
            open_records = [r for r in self.records.values() if not r.done]
            if len(open_records) == 1:
                open_records[0].add(len(decoded.ids), now)
                if decoded.done:
                    open_records[0].end(decoded.finish_reason or "stop")
            return
        record = self.records.get(decoded.stream_id)
        if decoded.kind == READY and record is not None:
            body = decoded.body if isinstance(decoded.body, dict) else {}
            record.compression = str(body.get("compression", "identity"))
            if record.compression == "zstd":
                record.inflate = StreamDecompressor()
            if "mux" in body:
                self.by_mux[(str(body["mux"]), int(body["mux_tag"]))] = record
            record.ready.set()
        elif decoded.kind == DATA and isinstance(decoded.body, bytes):
            if record is not None:
                self._frames(record, decoded.body, now)
                return
            for tag, data in decode_mux_body(decoded.body):
                target = self.by_mux.get((decoded.stream_id, tag))
                if target is not None:
                    self._frames(target, data, now)
        elif decoded.kind == END and record is not None and not record.done:
            body = decoded.body if isinstance(decoded.body, dict) else {}
            record.end(str(body.get("finish_reason", "stop")))

    def _on_sse(self, payload: dict[str, Any], now: float) -> None:
        if not str(payload.get("id", "")).startswith("cmpl-"):
            return
        record = self.records.get(str(payload["id"])[5:])
        if record is None:
            return
        choice = payload["choices"][0]
        # One chunk per token; only a terminal chunk with no text carries none.
        record.add(0 if choice.get("finish_reason") is not None and not choice.get("text") else 1, now)
        if choice.get("finish_reason") is not None:
            record.end(choice["finish_reason"])

    def hello_body(self) -> dict[str, Any]:
        body = self.mode.hello_body() or {"codec_version": 1, "accept_compression": ["identity"],
                                          "accept_safety_policies": [], "intent": "chat"}
        if self.streams <= 1:
            body.pop("accept_mux", None)  # one stream: a multiplex envelope would only cost bytes
        return body

    async def start_stream(self, tokens: int) -> StreamRecord:
        call_id = "tc-" + secrets.token_hex(6)
        record = StreamRecord(tab=self.index, call_id=call_id, late=self.late, started=time.monotonic(),
                              cap_available=self.node_available)
        self.records[call_id] = record
        assert self.node is not None
        try:
            if self.hello:
                await self.cf.send(encode_envelope(Envelope(kind=HELLO, stream_id=call_id, seq=0,
                                                            body=self.hello_body())), target=self.node)
                # Call only once READY has come back: the node handles cf and tc in separate loops,
                # so a call sent right behind its HELLO can overtake it (then no envelope, no mux).
                async with asyncio.timeout(READY_TIMEOUT_SECONDS):
                    await record.ready.wait()
            call = legion.build_call(ts_ms=int(time.time() * 1000), call_id=call_id, tool_name="engine_run",
                                     args={"user": PROMPT, "max_tokens": tokens})
            await self.tc.send(call, target=self.node)
        except (MeshError, FrameError) as exc:
            record.fail(f"request failed: {exc}")
        except TimeoutError:
            record.fail(f"no READY within {READY_TIMEOUT_SECONDS:.0f} s")
        return record
