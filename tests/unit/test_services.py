"""Legion services over a fake room and a scripted engine: unicast, envelopes, limits, cancel, /ai."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from bench.lab.fakes import fake_backend
from meshnode.generation.api import CodecMapInfo
from meshnode.legion.roster import elect_ai_responder
from meshnode.legion.service import LegionService, ServiceConfig
from meshnode.wire import legion
from meshnode.wire.compression import StreamDecompressor
from meshnode.wire.envelopes import DATA, END, HELLO, READY, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame, decode_frame


@dataclass
class Msg:
    peer_id: str
    payload: Any


class FakeAction:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[tuple[Any, Any]] = []
        self.inbox: asyncio.Queue[Msg] = asyncio.Queue()
        self.sent_event = asyncio.Event()

    async def send(self, payload: Any, target: Any = None) -> None:
        self.sent.append((payload, target))
        self.sent_event.set()

    async def receive(self) -> Msg:
        return await self.inbox.get()

    async def wait_for(self, predicate: Any) -> tuple[Any, Any]:
        while True:
            for item in self.sent:
                if predicate(item):
                    return item
            self.sent_event.clear()
            await self.sent_event.wait()


class FakeRoom:
    self_id = "M" * 20

    def __init__(self) -> None:
        self.actions: dict[str, FakeAction] = {}
        self.dropped: list[tuple[str, str, float | None]] = []

    def drop_peer(self, peer_id: str, reason: str, ban_seconds: float | None = None) -> None:
        self.dropped.append((peer_id, reason, ban_seconds))

    def make_action(self, name: str) -> FakeAction:
        return self.actions.setdefault(name, FakeAction(name))


@dataclass
class Chunk:
    ids: list[int]
    finish_reason: str | None


class FakeStream:
    prompt_tokens = 0

    def __init__(self, ids: list[int], gate: asyncio.Event | None) -> None:
        self.ids, self.gate = ids, gate
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> FakeStream:
        self._i = 0
        return self

    async def __anext__(self) -> Chunk:
        if self._i > len(self.ids) or self.cancelled:
            raise StopAsyncIteration
        if self.gate is not None and self._i == 2:
            await self.gate.wait()  # hold the stream open mid-way
        if self._i == len(self.ids):
            self._i += 1
            return Chunk([], "stop")
        self._i += 1
        await asyncio.sleep(0)
        return Chunk([self.ids[self._i - 1]], None)


class FakeEngine:
    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []
        self.gate: asyncio.Event | None = None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [1] + [len(m["content"]) for m in messages]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(96 + (i % 26)) for i in ids)

    def generate(self, prompt_ids: list[int], params: Any) -> FakeStream:
        stream = FakeStream([5, 200, 9707, 40000], self.gate)
        self.streams.append(stream)
        return stream

    def load_info(self) -> dict[str, int]:
        active = sum(1 for s in self.streams if not s.cancelled)
        return {"active": active, "queued": 0, "max_concurrent": 8, "max_queue": 4}

    async def close(self) -> None:
        return None


MAP = CodecMapInfo(map_id="huggingfacetb/smollm2", map_hash="sha256:00", data=b"{}")


def make_service(room: Any, engine: Any, **kw: Any) -> LegionService:
    """A service over a fake room, serving a fake engine the way the node serves a real one."""
    return LegionService(room, fake_backend(engine), config=config(**kw), codec_map=MAP)


def config(**kw: Any) -> ServiceConfig:
    base = dict(nick="node", model_id=FakeEngine.model_id, skills=["chat"], authoritative=[], system_prompt="",
                frame_max_ids=16, frame_max_delay_ms=0)
    base.update(kw)
    return ServiceConfig(**base)


def call(call_id: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    return legion.build_call(ts_ms=1, call_id=call_id, tool_name=tool, args=args)


@pytest.fixture
async def svc() -> Any:
    room, engine = FakeRoom(), FakeEngine()
    service = make_service(room, engine)
    task = asyncio.create_task(service.run())
    yield room, engine, service
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def frames_to(room: FakeRoom, peer: str) -> list[CodecFrame]:
    out = []
    for payload, target in room.actions["cf"].sent:
        assert target == peer
        decoded = decode_cf_payload(payload)
        assert isinstance(decoded, CodecFrame)
        out.append(decoded)
    return out


async def test_engine_run_streams_only_to_the_asker_and_replies_with_text(svc: Any) -> None:
    room, engine, service = svc
    async with asyncio.timeout(5):
        room.actions["tc"].inbox.put_nowait(Msg("A" * 20, call("tc-1", "engine_run", {"user": "hi"})))
        payload, target = await room.actions["tc"].wait_for(lambda item: item[0].get("kind") == "result")
    assert target == "A" * 20
    frames = frames_to(room, "A" * 20)
    assert frames[-1].done and frames[-1].finish_reason == "stop"
    assert [i for f in frames for i in f.ids] == [5, 200, 9707, 40000]
    assert payload["status"] == "ok"
    content = payload["result"]["content"]
    assert content["text"] == engine.decode([5, 200, 9707, 40000])
    assert content["tokens"] == 4 and content["finish_reason"] == "stop"
    assert isinstance(content["ttft_ms"], int)


async def test_cap_is_valid_and_sent_to_joining_peer(svc: Any) -> None:
    room, engine, service = svc
    async with asyncio.timeout(5):
        await room.actions["cap"].wait_for(lambda item: item[1] is None)  # broadcast on start
        service.peer_joined("B" * 20)
        payload, _ = await room.actions["cap"].wait_for(lambda item: item[1] == "B" * 20)
    cap = legion.parse_cap(payload)
    assert cap.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and cap.available
    assert {"engine_run", "ping"} <= set(cap.tools)
    assert "stageHost" not in payload and payload["mapId"] == "huggingfacetb/smollm2"


@pytest.mark.parametrize(
    ("tool", "args", "status", "error"),
    [
        ("stage.load", {}, "denied", "tool not exposed by this peer: stage.load"),
        ("engine_run", {"user": ""}, "error", "invalid args: user must be a non-empty string"),
        ("engine_run", {"user": "x", "bogus": 1}, "error", "invalid args: unknown argument 'bogus'"),
        ("engine_run", {"user": "x", "max_tokens": 99999}, "error", "invalid args: max_tokens"),
        ("engine_run", {"user": "x" * 70_000}, "error", "invalid args: prompt is longer"),
    ],
)
async def test_bad_calls_get_clear_results(svc: Any, tool: str, args: dict[str, Any], status: str, error: str) -> None:
    room, engine, service = svc
    async with asyncio.timeout(5):
        room.actions["tc"].inbox.put_nowait(Msg("A" * 20, call("tc-2", tool, args)))
        payload, _ = await room.actions["tc"].wait_for(lambda item: item[0].get("kind") == "result")
    assert payload["status"] == status and payload["error"].startswith(error)
    assert engine.streams == []


async def test_ping_tool(svc: Any) -> None:
    room, _, _ = svc
    async with asyncio.timeout(5):
        room.actions["tc"].inbox.put_nowait(Msg("A" * 20, call("tc-p", "ping", {"payload": {"x": 1}})))
        payload, _ = await room.actions["tc"].wait_for(lambda item: item[0].get("kind") == "result")
    assert payload["status"] == "ok" and payload["result"]["content"]["payload"] == {"x": 1}


async def test_per_peer_concurrency_limit_and_cancel_on_leave(svc: Any) -> None:
    room, engine, service = svc
    engine.gate = asyncio.Event()
    async with asyncio.timeout(5):
        for i in range(3):
            room.actions["tc"].inbox.put_nowait(Msg("A" * 20, call(f"tc-{i}", "engine_run", {"user": "x"})))
        payload, _ = await room.actions["tc"].wait_for(lambda item: item[0].get("callId") == "tc-2")
        assert payload["status"] == "denied" and payload["error"].startswith("busy")
        while len(engine.streams) < 2:  # both calls reached the engine (prompts tokenize off the loop)
            await asyncio.sleep(0.01)
        service.peer_left("A" * 20)
        while service.calls:
            await asyncio.sleep(0)
    assert all(s.cancelled for s in engine.streams) and len(engine.streams) == 2
    assert service.cancelled_calls == 2


async def test_envelope_hello_ready_data_end_with_zstd_and_cancel(svc: Any) -> None:
    room, engine, service = svc
    peer = "C" * 20
    async with asyncio.timeout(5):
        hello = Envelope(kind=HELLO, stream_id="tc-9", seq=0,
                         body={"codec_version": 1, "accept_compression": ["zstd", "identity"]})
        room.actions["cf"].inbox.put_nowait(Msg(peer, encode_envelope(hello)))
        ready_bytes, target = await room.actions["cf"].wait_for(lambda item: True)
        ready = decode_cf_payload(ready_bytes)
        assert target == peer and ready.kind == READY and ready.body["compression"] == "zstd"
        room.actions["tc"].inbox.put_nowait(Msg(peer, call("tc-9", "engine_run", {"user": "hi"})))
        await room.actions["tc"].wait_for(lambda item: item[0].get("kind") == "result")
    envelopes = [decode_cf_payload(p) for p, _ in room.actions["cf"].sent[1:]]
    assert all(e.stream_id == "tc-9" for e in envelopes)
    assert [e.seq for e in envelopes] == list(range(2, 2 + len(envelopes)))
    assert envelopes[-1].kind == END and envelopes[-1].body["finish_reason"] == "stop"
    inflate = StreamDecompressor()
    frames = [decode_frame(inflate.decompress(e.body)) for e in envelopes if e.kind == DATA]
    assert [i for f in frames for i in f.ids] == [5, 200, 9707, 40000]

    engine.gate = asyncio.Event()
    async with asyncio.timeout(5):
        room.actions["tc"].inbox.put_nowait(Msg(peer, call("tc-10", "engine_run", {"user": "hi"})))
        while ("C" * 20, "tc-10") not in service.calls:
            await asyncio.sleep(0)
        end = Envelope(kind=END, stream_id="tc-10", seq=3, body={"codec_version": 1, "finish_reason": "cancel"})
        room.actions["cf"].inbox.put_nowait(Msg(peer, encode_envelope(end)))
        while service.calls:
            await asyncio.sleep(0)
    assert engine.streams[-1].cancelled


def _cap(available: bool = True, active: int = 0, meshnode: bool = True) -> legion.Cap:
    raw = legion.build_cap(ts_ms=1, nick="n", model_id="m", available=available, skills=[], system_prompt_summary="",
                           tools=[legion.tool_descriptor("engine_run", "", {})],
                           load={"active": active, "queued": 0, "max": 4})
    if not meshnode:
        raw.pop("agent")
    return legion.parse_cap(raw)


def test_election_is_deterministic_by_load_then_id() -> None:
    caps = {"b" * 20: _cap(), "a" * 20: _cap(active=2), "c" * 20: _cap(), "Z" * 20: _cap(available=False)}
    assert elect_ai_responder(caps, asker="x" * 20) == "b" * 20
    assert elect_ai_responder(caps, asker="b" * 20) == "c" * 20
    caps["0" * 20] = _cap(meshnode=False)  # browsers never take part in the election
    assert elect_ai_responder(caps, asker="x" * 20) == "b" * 20


async def test_ai_chat_directed_and_broadcast(svc: Any) -> None:
    room, engine, service = svc
    asker = "D" * 20
    async with asyncio.timeout(5):
        msg = legion.build_chat(ts_ms=1, from_id="forged", to="", text="/ai hello there")
        room.actions["cm"].inbox.put_nowait(Msg(asker, msg))
        await room.actions["cf"].wait_for(lambda item: decode_cf_payload(item[0]).done)
    assert all(target == asker for _, target in room.actions["cf"].sent)
    # A directed /ai to someone else is ignored.
    room.actions["cf"].sent.clear()
    other = legion.build_chat(ts_ms=1, from_id=asker, to="E" * 20, text="/ai hi")
    room.actions["cm"].inbox.put_nowait(Msg(asker, other))
    directed = legion.build_chat(ts_ms=1, from_id=asker, to=room.self_id, text="/ai @node hi")
    room.actions["cm"].inbox.put_nowait(Msg(asker, directed))
    async with asyncio.timeout(5):
        await room.actions["cf"].wait_for(lambda item: decode_cf_payload(item[0]).done)
    assert len(engine.streams) == 2


async def test_on_a_byte_budget_a_refused_asker_gets_a_fresh_cap_and_the_room_no_broadcast() -> None:
    """A node with [link] uplink refuses what does not fit, tells the asker why and sends it the
    cap (available false); it does not broadcast a cap to every tab (1.6 KB each) on the flip."""
    from meshnode.link.costs import PacingConfig
    from meshnode.link.pacer import Pacer

    room, engine = FakeRoom(), FakeEngine()
    engine.gate = asyncio.Event()  # streams stay open: the budget stays taken
    pacer = Pacer(PacingConfig(budget_bytes_per_second=6_000))  # room for a few plain streams
    service = LegionService(room, fake_backend(engine), config=config(flip_caps_to_all=False), codec_map=MAP,
                            pacing=pacer)
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            caps = room.make_action("cap")
            tabs = [f"tab{i:02d}" + "x" * 15 for i in range(12)]
            for tab in tabs:
                service.peer_joined(tab)
            while sum(1 for _, target in caps.sent if target in tabs) < len(tabs):  # each newcomer's cap
                await asyncio.sleep(0.05)
            joined_caps = len(caps.sent)
            for index, tab in enumerate(tabs):
                room.actions["tc"].inbox.put_nowait(Msg(tab, call(f"c{index}", "engine_run", {"user": "hi"})))
            denied = await room.actions["tc"].wait_for(
                lambda item: item[0].get("kind") == "result" and item[0]["status"] == "denied")
            assert "link budget" in denied[0]["error"]
            refused_tab = denied[1]
            while not any(target == refused_tab for _, target in caps.sent[joined_caps:]):
                await asyncio.sleep(0.05)
            fresh = next(payload for payload, target in caps.sent[joined_caps:] if target == refused_tab)
            assert fresh["available"] is False
            await asyncio.sleep(0.5)
            refused = {target for payload, target in room.actions["tc"].sent if payload.get("status") == "denied"}
            later = [target for payload, target in caps.sent[joined_caps:] if not payload["available"]]
            assert later and set(later) <= refused  # no flip broadcast: only refused askers were told
    finally:
        engine.gate.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pacer.close()
