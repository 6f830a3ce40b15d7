"""Issue 8 unit tests: per-peer limits, strikes, non-blocking replies, engine faults, admission.

Fake room and scripted engines (no sockets): tests/unit/test_services.py's FakeRoom, and
bench/lab/fakes.py's TimedEngine for faults that need a real stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.lab.fakes import FAIL_MARKER, TimedEngine, expected_ids
from meshnode.errors import AdmissionError
from meshnode.generation.api import SamplingParams
from meshnode.generation.torch_backend import TorchEngine
from meshnode.legion.outbox import MAX_OPTIONAL_PENDING
from meshnode.legion.service import LegionService
from meshnode.room.config import RoomConfig
from meshnode.room.inbound import InboundLimits, TokenBucket, inbound_limits
from meshnode.room.mailbox import Mailbox
from meshnode.wire import legion
from meshnode.wire.envelopes import decode_cf_payload
from tests.unit.test_services import FakeRoom, Msg, call, make_service

A, B = "A" * 20, "B" * 20


async def serve(engine: Any, **kw: Any) -> tuple[FakeRoom, LegionService, asyncio.Task[None]]:
    room = FakeRoom()
    service = make_service(room, engine, **kw)
    return room, service, asyncio.create_task(service.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def result_for(room: FakeRoom, call_id: str) -> dict[str, Any]:
    payload, _ = await room.actions["tc"].wait_for(lambda item: item[0].get("callId") == call_id)
    return payload


async def test_engine_error_fails_only_that_request() -> None:
    engine = TimedEngine(rate=500, tokens=20, fail_after=3)
    room, service, task = await serve(engine)
    try:
        async with asyncio.timeout(10):
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-bad", "engine_run", {"user": FAIL_MARKER})))
            room.actions["tc"].inbox.put_nowait(Msg(B, call("tc-good", "engine_run", {"user": "fine"})))
            bad, good = await result_for(room, "tc-bad"), await result_for(room, "tc-good")
        assert bad["status"] == "error" and bad["error"].startswith("generation failed")
        assert good["status"] == "ok" and good["result"]["content"]["tokens"] == 20
        frames_to_a = [decode_cf_payload(p) for p, t in room.actions["cf"].sent if t == A]
        assert frames_to_a[-1].done and frames_to_a[-1].finish_reason == "error"
        assert [i for f in frames_to_a for i in f.ids] == expected_ids(3)
        assert service.failed_calls == 1 and service.completed_calls == 2
    finally:
        await stop(task)


async def test_engine_bug_is_contained_and_service_keeps_serving() -> None:
    engine = TimedEngine(rate=500, tokens=5)
    original = engine.generate

    def broken(prompt_ids: Any, params: Any) -> Any:
        engine.generate = original  # only the first request hits the bug
        raise RuntimeError("engine bug")

    engine.generate = broken  # type: ignore[method-assign]
    room, service, task = await serve(engine)
    try:
        async with asyncio.timeout(10):
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-1", "engine_run", {"user": "x"})))
            first = await result_for(room, "tc-1")
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-2", "engine_run", {"user": "x"})))
            second = await result_for(room, "tc-2")
        assert first == {**first, "status": "error", "error": "generation failed: internal error"}
        assert second["status"] == "ok"
    finally:
        await stop(task)


async def test_admission_refusal_reaches_the_asker_as_busy() -> None:
    engine = TimedEngine(rate=5, tokens=50, max_batch_tokens=80)
    room, service, task = await serve(engine)
    try:
        async with asyncio.timeout(10):
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-1", "engine_run", {"user": "x", "max_tokens": 50})))
            room.actions["tc"].inbox.put_nowait(Msg(B, call("tc-2", "engine_run", {"user": "y", "max_tokens": 50})))
            refused = await result_for(room, "tc-2")
        assert refused["status"] == "error" and refused["error"].startswith("busy: batch token budget")
    finally:
        await stop(task)


async def test_offences_past_the_limit_drop_the_peer() -> None:
    room, service, task = await serve(TimedEngine(), max_strikes_per_minute=5, ban_seconds=7.0)
    try:
        async with asyncio.timeout(10):
            for i in range(8):
                room.actions["tc"].inbox.put_nowait(Msg(A, {"kind": "call", "v": 1, "ts": 1, "callId": f"c{i}"}))
            room.actions["tc"].inbox.put_nowait(Msg(B, call("tc-ok", "ping", {})))
            assert (await result_for(room, "tc-ok"))["status"] == "ok"
        assert room.dropped == [(A, room.dropped[0][1], 7.0)] and "too many offences" in room.dropped[0][1]
        assert service.dropped_peers == 1
    finally:
        await stop(task)


async def test_forged_from_is_ignored_and_foreign_end_cancels_nothing() -> None:
    engine = TimedEngine(rate=50, tokens=20)
    room, service, task = await serve(engine)
    try:
        async with asyncio.timeout(10):
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-a", "engine_run", {"user": "x"})))
            while (A, "tc-a") not in service.calls:
                await asyncio.sleep(0)
            from meshnode.wire.envelopes import END, Envelope, encode_envelope

            end = Envelope(kind=END, stream_id="tc-a", seq=3, body={"codec_version": 1, "finish_reason": "cancel"})
            room.actions["cf"].inbox.put_nowait(Msg(B, encode_envelope(end)))  # B does not own tc-a
            chat = legion.build_chat(ts_ms=1, from_id=A, to=room.self_id, text="/ai forged")
            room.actions["cm"].inbox.put_nowait(Msg(B, chat))  # claims to be A
            result = await result_for(room, "tc-a")
        assert result["status"] == "ok" and result["result"]["content"]["tokens"] == 20
        assert all(target in (A, B) for _, target in room.actions["cf"].sent)
        assert any(key[0] == B for key in service.calls) or service.completed_calls >= 1
    finally:
        await stop(task)


async def test_a_peer_that_does_not_read_cannot_stall_the_receive_loop() -> None:
    """A's channel does not drain: B is still served at once, and none of A's answers is lost or
    counted against it (they wait, in order, until A reads again)."""
    room, service, task = await serve(TimedEngine())
    blocked = asyncio.Event()
    original = room.actions["tc"].send

    async def send(payload: Any, target: Any = None) -> None:
        if target == A:
            await blocked.wait()  # A's channel never drains
        await original(payload, target)

    room.actions["tc"].send = send  # type: ignore[method-assign]
    try:
        async with asyncio.timeout(10):
            pings = MAX_OPTIONAL_PENDING // 2
            for i in range(pings):
                room.actions["tc"].inbox.put_nowait(Msg(A, call(f"tc-a{i}", "ping", {})))
            room.actions["tc"].inbox.put_nowait(Msg(B, call("tc-b", "ping", {})))
            assert (await result_for(room, "tc-b"))["status"] == "ok"
            assert service.outbox.backlog(A) == pings and service.strikes == 0
            blocked.set()
            answered = [await result_for(room, f"tc-a{i}") for i in range(pings)]
        assert all(r["status"] == "ok" for r in answered) and service.outbox.dropped == 0
        sent_to_a = [p["callId"] for p, t in room.actions["tc"].sent if t == A]
        assert sent_to_a == [f"tc-a{i}" for i in range(pings)]  # in order
    finally:
        blocked.set()
        await stop(task)


def test_unhashable_values_are_guard_errors_not_crashes() -> None:
    """Regression (found by tests/unit/test_fuzz_props.py): `bodyKind: []` raised TypeError."""
    with pytest.raises(legion.LegionError):
        legion.parse_chat({"v": 1, "ts": 1, "to": "", "bodyKind": []})
    with pytest.raises(legion.LegionError):
        legion.parse_tool_frame({"kind": "result", "v": 1, "ts": 1, "callId": "c", "status": {}})
    with pytest.raises(legion.LegionError):
        legion.parse_engine_run({"user": "u", "messages": [{"role": [], "content": "c"}]}, max_prompt_chars=100)


async def test_mailbox_bounds_each_sender_separately() -> None:
    box: Mailbox[str] = Mailbox(100, "test", per_key_messages=3, per_key_bytes=250)
    assert [box.put(f"a{i}", key="a", size=10) for i in range(5)] == [True, True, True, False, False]
    assert box.put("b0", key="b", size=200) and not box.put("b1", key="b", size=100)
    assert box.queued_by("a") == 3 and await box.get() == "a0" and box.queued_by("a") == 2
    assert box.put("a5", key="a", size=10)


def test_inbound_bucket_refills_with_time() -> None:
    limits = InboundLimits(bytes=TokenBucket(rate=100, burst=200, now=0.0), frames=TokenBucket(rate=10, burst=2, now=0.0))
    assert limits.admit(150, 0.0) is None
    assert limits.admit(10, 0.0) is None
    assert "messages/s" in (limits.admit(10, 0.0) or "")
    assert limits.admit(100, 1.0) is None  # a second later: 10 more messages, 100 more bytes
    assert "bytes/s" in (limits.admit(150, 1.0) or "")


def test_inbound_burst_defaults_to_one_maximal_message_and_a_second_of_the_rate() -> None:
    config = RoomConfig(strategy="memory", app_id="a", room_id="r", max_message_bytes=1000, peer_rate_bytes_per_second=100)
    limits = inbound_limits([config], now=0.0)
    assert limits.bytes is not None and limits.bytes.burst == 1100
    assert limits.admit(1100, 0.0) is None and limits.admit(1, 0.0) is not None


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


async def test_engine_batch_token_budget_refuses_instead_of_overcommitting(tiny_model: LlamaForCausalLM) -> None:
    async with asyncio.timeout(30), TorchEngine(tiny_model, model_id="tiny", max_batch_tokens=100) as engine:
        params = SamplingParams(temperature=0.0, max_tokens=40)
        first = engine.generate([1] * 10, params)  # reserves 50
        second = engine.generate([2] * 10, params)  # reserves 50: the budget is full
        with pytest.raises(AdmissionError, match="busy: batch token budget"):
            engine.generate([3] * 10, params)
        with pytest.raises(AdmissionError, match="exceeds this node's batch budget") as refused:
            engine.generate([3] * 70, params)
        assert refused.value.field == "max_tokens"
        assert engine.reserved_tokens == 100
        await first.collect()
        await second.collect()
        assert engine.reserved_tokens == 0
        third = engine.generate([3] * 10, params)  # room again once the others finished
        third.cancel()
        await third.aclose()


async def test_refused_call_forgets_its_envelope_hello() -> None:
    """A HELLO whose call is refused must not linger: 16 of them would block the peer's streams."""
    from meshnode.wire.envelopes import HELLO, Envelope, encode_envelope

    room, service, task = await serve(TimedEngine(), calls_per_minute=1)
    try:
        async with asyncio.timeout(10):
            for i in (1, 2):
                hello = Envelope(kind=HELLO, stream_id=f"tc-{i}", seq=0, body={"codec_version": 1})
                room.actions["cf"].inbox.put_nowait(Msg(A, encode_envelope(hello)))
                while f"tc-{i}" not in service.hellos.get(A, {}):
                    await asyncio.sleep(0)
                room.actions["tc"].inbox.put_nowait(Msg(A, call(f"tc-{i}", "engine_run", {"user": "x"})))
                await result_for(room, f"tc-{i}")
        assert (await result_for(room, "tc-2"))["error"].startswith("rate limit")
        assert service.hellos.get(A, {}) == {}
    finally:
        await stop(task)


async def test_event_history_keeps_the_newest_quietly(caplog: pytest.LogCaptureFixture) -> None:
    box: Mailbox[int] = Mailbox(3, "peer events", drop_oldest=True)
    for i in range(250):
        assert box.put(i)
    assert [await box.get() for _ in range(3)] == [247, 248, 249]
    assert box.dropped == 247 and "queue is full" not in caplog.text


async def test_aiortc_teardown_errors_are_not_reported_as_unhandled() -> None:
    """aiortc's internal tasks die with ConnectionError when a connection closes under them; only
    that is swallowed, a real bug still reaches the previous handler."""
    import aioice

    from meshnode.transport.ice import quiet_connect_teardown

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        quiet_connect_teardown(loop)
        # An aioice coroutine failing exactly as it does under aiortc's transports on teardown.
        teardown = loop.create_task(aioice.Connection(ice_controlling=True).send(b"x"))
        other = loop.create_task(_raise(ValueError("a real bug")))
        await asyncio.wait([teardown, other])
        assert isinstance(teardown.exception(), ConnectionError)
        for task in (teardown, other):
            loop.call_exception_handler({"message": "Task exception was never retrieved",
                                         "exception": task.exception(), "future": task})
    finally:
        loop.set_exception_handler(previous)
    assert [type(c["exception"]) for c in reported] == [ValueError]


async def _raise(exc: Exception) -> None:
    raise exc


async def test_calls_that_could_not_finish_in_time_are_refused_at_once() -> None:
    """Issue 12.4 with a scripted engine of one slot at 4 tokens/s and a 10 s deadline: once the
    node has measured that speed, a call whose budget cannot finish in time is refused within a
    second (busy, not an offence); while the slot is taken for longer than a default call could
    wait, the cap says available: false, and a fresh cap says true once the slot is free."""
    room, service, task = await serve(TimedEngine(rate=4, tokens=1000, max_concurrent=1, max_queue=4),
                                      call_deadline_seconds=10.0)
    caps = room.actions["cap"]
    try:
        async with asyncio.timeout(40):
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-warm", "engine_run", {"user": "x", "max_tokens": 8})))
            assert (await result_for(room, "tc-warm"))["status"] == "ok"  # ~2 s: the speed is measured
            asked = asyncio.get_running_loop().time()
            room.actions["tc"].inbox.put_nowait(Msg(B, call("tc-long", "engine_run", {"user": "y", "max_tokens": 60})))
            long = await result_for(room, "tc-long")  # 60 tokens at 4 tok/s: 15 s
            refused_after = asyncio.get_running_loop().time() - asked
            sent = len(caps.sent)
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-slot", "engine_run", {"user": "x", "max_tokens": 36})))
            while not any(not p["available"] for p, _ in caps.sent[sent:]):  # 9 s + 4 s for a default call
                await asyncio.sleep(0.05)
            room.actions["tc"].inbox.put_nowait(Msg(B, call("tc-any", "engine_run", {"user": "y"})))
            waiting = await result_for(room, "tc-any")
            slot = await result_for(room, "tc-slot")
            while not caps.sent[-1][0]["available"]:  # free again: a fresh cap says so
                await asyncio.sleep(0.05)
        assert long["status"] == "denied" and long["error"].startswith("busy:") and "deadline" in long["error"]
        assert refused_after < 1.0
        assert waiting["status"] == "denied" and "deadline" in waiting["error"]
        assert slot["status"] == "ok" and slot["result"]["content"]["tokens"] == 36
        assert service.strikes == 0  # a busy node is not the asker's fault
    finally:
        await stop(task)


async def test_a_queued_call_does_not_inflate_the_time_to_first_token() -> None:
    """A call that waited for the engine's only slot reached its first token late because of the
    queue, which the estimate models by itself. Folding that wait into the TTFT average counted it
    twice, and once the average was high every call was refused and it was never measured again
    (bench/deadline_bench.py: 4 answers in 90 s on an engine that finishes 18)."""
    engine = TimedEngine(rate=10, tokens=1000, max_concurrent=1, max_queue=4, slots=True)
    room, service, task = await serve(engine, call_deadline_seconds=30.0)
    try:
        async with asyncio.timeout(20):
            for call_id, peer in (("tc-first", A), ("tc-queued", B)):  # the second waits ~2 s for the slot
                room.actions["tc"].inbox.put_nowait(Msg(peer, call(call_id, "engine_run", {"user": "x",
                                                                                            "max_tokens": 20})))
            results = [await result_for(room, call_id) for call_id in ("tc-first", "tc-queued")]
        assert [r["status"] for r in results] == ["ok", "ok"]
        assert results[1]["result"]["content"]["ttft_ms"] > 1500  # it did wait in the queue
        assert service.meter.ttft is not None and service.meter.ttft < 0.5, service.meter.ttft
    finally:
        await stop(task)


async def test_a_call_without_max_tokens_gets_the_budget_that_fits() -> None:
    room, service, task = await serve(TimedEngine(rate=10, tokens=1000), call_deadline_seconds=5.0)
    try:
        async with asyncio.timeout(30):
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-warm", "engine_run", {"user": "x", "max_tokens": 10})))
            await result_for(room, "tc-warm")
            room.actions["tc"].inbox.put_nowait(Msg(A, call("tc-default", "engine_run", {"user": "x"})))
            result = await result_for(room, "tc-default")
        tokens = result["result"]["content"]["tokens"]
        assert result["status"] == "ok" and 16 <= tokens < 50, result  # ~5 s at ~10 tok/s, not 256
    finally:
        await stop(task)


async def test_leaving_and_rejoining_keeps_the_offence_count() -> None:
    """13.1: a peer that leaves between offences (presence 0 / @_leave, then back) finds its
    strikes where it left them: it is dropped at its 31st offence within the minute."""
    room, service, task = await serve(TimedEngine(), max_strikes_per_minute=30)
    try:
        async with asyncio.timeout(10):
            for round_ in range(4):
                for i in range(10):
                    room.actions["tc"].inbox.put_nowait(Msg(A, call(f"c{round_}-{i}", "rm_rf", {})))
                while service.strikes < 10 * (round_ + 1):
                    await asyncio.sleep(0.01)
                service.peer_left(A)  # the room saw it leave; it comes back with the same id
        assert [peer for peer, _, _ in room.dropped] == [A]
    finally:
        await stop(task)
