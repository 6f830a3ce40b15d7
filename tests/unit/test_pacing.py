"""meshnode.link.pacer: the cost model, admission, and the multiplexed wire format (no network)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from meshnode.link.costs import PacingConfig, UnitLoad, WireCosts, predict
from meshnode.link.pacer import Pacer, decode_mux_body
from meshnode.wire.compression import StreamDecompressor
from meshnode.wire.envelopes import DATA, decode_cf_payload
from meshnode.wire.frames import StreamDecoder

HELLO_MUX = {"codec_version": 1, "accept_compression": ["zstd", "identity"], "accept_mux": 1, "result_text": False}


class FakeAction:
    """Collects (payload, target) of every send."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, Any]] = []

    async def send(self, payload: Any, target: str | list[str] | None = None) -> None:
        self.sent.append((payload, target))


def test_predicted_cost_falls_with_the_window_and_multiplexing_is_cheaper() -> None:
    costs = WireCosts()
    mux = [UnitLoad(streams=10, mux=True, negotiated=True, compressed=True)]
    solo = [UnitLoad(streams=1, mux=False, negotiated=True, compressed=True) for _ in range(10)]
    windows = [0.05, 0.1, 0.2, 0.4]
    costs_mux = [predict(mux, w, 30.0, costs)[0] for w in windows]
    assert costs_mux == sorted(costs_mux, reverse=True)
    assert predict(mux, 0.2, 30.0, costs)[0] < predict(solo, 0.2, 30.0, costs)[0] / 3
    # Never more than one message per token: a slow stream at a tiny window sends per token.
    _, _, messages = predict([UnitLoad(streams=1, mux=False, negotiated=False, compressed=False)], 0.001, 5.0, costs)
    assert messages == pytest.approx(5.0)


def test_admission_refuses_past_the_budget_and_release_makes_room() -> None:
    now = [0.0]
    pacer = Pacer(PacingConfig(budget_bytes_per_second=5_000, token_rate=30.0), clock=lambda: now[0])
    admitted = 0
    refusal = None
    for index in range(100):
        pacer.on_hello("peer", f"s{index}", HELLO_MUX, "zstd")
        refusal = pacer.admit("peer", f"s{index}")
        if refusal is not None:
            break
        admitted += 1
    assert 1 <= admitted < 100
    assert refusal is not None and refusal.startswith("busy: link budget")
    assert not pacer.available()  # a newcomer would not fit either: cap.available turns false
    pacer.release("peer", "s0")
    pacer.on_hello("peer", "again", HELLO_MUX, "zstd")
    assert pacer.admit("peer", "again") is None
    assert pacer.window <= pacer.config.max_window_seconds
    for index in range(1, admitted):
        pacer.release("peer", f"s{index}")
    assert pacer.available()


async def test_multiplexed_streams_share_messages_and_decode_back() -> None:
    action = FakeAction()
    pacer = Pacer(PacingConfig(budget_bytes_per_second=50_000, min_window_seconds=0.01, max_window_seconds=0.05))
    ready = {}
    for stream in ("a", "b"):
        ready[stream] = pacer.on_hello("peer", stream, HELLO_MUX, "zstd")
        assert pacer.admit("peer", stream) is None
    assert ready["a"]["mux"] == ready["b"]["mux"] and ready["a"]["mux_tag"] != ready["b"]["mux_tag"]
    sinks = {s: pacer.open_stream(action, "peer", s, negotiated=True, compression="zstd") for s in ("a", "b")}
    async with asyncio.timeout(5):
        for start in range(0, 40, 10):
            await sinks["a"].send(list(range(start, start + 10)), None)
            await sinks["b"].send(list(range(1000 + start, 1010 + start)), None)
        await asyncio.gather(sinks["a"].send([40], "length"), sinks["b"].send([1040], "length"))
    await pacer.close()
    tags = {ready[s]["mux_tag"]: s for s in ready}
    inflate = {s: StreamDecompressor() for s in ready}
    decoders = {s: StreamDecoder() for s in ready}
    got: dict[str, list[int]] = {"a": [], "b": []}
    done: dict[str, str | None] = {}
    for payload, target in action.sent:
        assert target == "peer"
        envelope = decode_cf_payload(payload)
        assert envelope.kind == DATA and envelope.stream_id == ready["a"]["mux"]
        for tag, data in decode_mux_body(envelope.body):
            stream = tags[tag]
            for frame in decoders[stream].feed(inflate[stream].decompress(data)):
                got[stream].extend(frame.ids)
                if frame.done:
                    done[stream] = frame.finish_reason
    assert got == {"a": list(range(41)), "b": list(range(1000, 1041))}
    assert done == {"a": "length", "b": "length"}
    assert len(action.sent) < 10  # 82 ids of two streams, a handful of messages


def test_result_text_is_dropped_only_when_negotiated() -> None:
    pacer = Pacer(PacingConfig(budget_bytes_per_second=50_000))
    pacer.on_hello("peer", "quiet", HELLO_MUX, "zstd")
    pacer.on_hello("peer", "plain", {"codec_version": 1, "accept_compression": ["identity"]}, "identity")
    content = {"text": "hello", "tokens": 2}
    assert pacer.result_content("peer", "quiet", content) == {"tokens": 2}
    assert pacer.result_content("peer", "plain", content) == content


def test_decode_mux_body_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="multiplexed"):
        decode_mux_body(msgpack.packb({"not": "a list"}))
    with pytest.raises(ValueError, match="multiplexed"):
        decode_mux_body(msgpack.packb([[1, "text, not bytes"]]))


async def test_the_token_rate_is_measured_from_the_streams() -> None:
    now = [0.0]
    pacer = Pacer(PacingConfig(budget_bytes_per_second=50_000, token_rate=30.0), clock=lambda: now[0])
    action = FakeAction()
    for index in range(10):
        assert pacer.admit(f"tab{index}", "s") is None
        pacer.open_stream(action, f"tab{index}", "s", negotiated=False, compression="identity")
    assert pacer.rate() == 30.0  # nothing seen yet: the prior
    for _ in range(20):  # 10 streams at 8 tokens/s each, for 2 s
        now[0] += 0.1
        pacer.note_tokens(8)
        pacer.maybe_replan()
    assert pacer.rate() == pytest.approx(8.0, rel=0.1)
    await pacer.close()


def test_a_slower_engine_lets_more_streams_in() -> None:
    def admitted(rate: float) -> int:
        pacer = Pacer(PacingConfig(budget_bytes_per_second=20_000, token_rate=rate))
        count = 0
        while pacer.admit(f"tab{count}", "s") is None and count < 1000:
            count += 1
        return count

    assert admitted(5.0) > admitted(30.0) >= 1


def test_connections_cost_budget_even_without_streams() -> None:
    now = [0.0]
    pacer = Pacer(PacingConfig(budget_bytes_per_second=20_000), clock=lambda: now[0])
    alone = Pacer(PacingConfig(budget_bytes_per_second=20_000), clock=lambda: now[0])
    pacer.connections_changed(150)  # 150 idle tabs: their upkeep eats into the budget
    now[0] += 10.0  # past their set-up
    counts = []
    for p in (pacer, alone):
        n = 0
        while p.admit(f"tab{n}", "s") is None and n < 1000:
            n += 1
        counts.append(n)
    assert counts[0] < counts[1]
    assert pacer.summary()["connections"] == 150


async def test_a_steady_stream_sends_one_message_per_window() -> None:
    action = FakeAction()
    pacer = Pacer(PacingConfig(budget_bytes_per_second=1_650, min_window_seconds=0.05, max_window_seconds=0.2))
    assert pacer.admit("tab", "s") is None
    sink = pacer.open_stream(action, "tab", "s", negotiated=False, compression="identity")
    assert pacer.window > 0.15  # the small budget needs a wide window
    window = pacer.window
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10):
        for token in range(60):  # 1.2 s at 50 tokens/s
            await sink.send([token], None)
            await asyncio.sleep(0.02)
        await sink.send([60], "length")
    elapsed = loop.time() - started
    await pacer.close()
    frames = [decode_cf_payload(payload) for payload, _ in action.sent]
    assert [i for f in frames for i in f.ids] == list(range(61))  # bare frames, every id once
    # One message per window (plus the first, sent at the short window), not one per window + a token.
    assert len(frames) <= elapsed / window + 2


def test_the_node_paces_only_with_an_uplink() -> None:
    from meshnode.node.assembly import stream_policy
    from meshnode.settings import ByteRate, LinkSettings

    assert stream_policy(LinkSettings()) is None
    pacer = stream_policy(LinkSettings(uplink_bytes_per_second=ByteRate(50_000), max_delay_ms=300))
    assert isinstance(pacer, Pacer)
    assert pacer.config.budget_bytes_per_second == 50_000 and pacer.config.max_window_seconds == 0.3


async def test_ids_and_the_finish_that_arrive_while_a_message_waits_go_in_the_next_one() -> None:
    """A frame waiting for the link must not take the finish that arrived meanwhile: the last ids
    would be lost and the result would overtake them."""

    class SlowAction(FakeAction):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def send(self, payload: Any, target: str | list[str] | None = None) -> None:
            if not self.sent:
                await self.gate.wait()  # the first message waits for the link
            await super().send(payload, target)

    action = SlowAction()
    pacer = Pacer(PacingConfig(budget_bytes_per_second=50_000, min_window_seconds=0.01, max_window_seconds=0.02))
    assert pacer.admit("tab", "s") is None
    sink = pacer.open_stream(action, "tab", "s", negotiated=False, compression="identity")
    async with asyncio.timeout(5):
        await sink.send([1, 2, 3], None)
        await asyncio.sleep(0.05)  # the first frame is now waiting inside send()
        final = asyncio.ensure_future(sink.send([4, 5], "stop"))
        await asyncio.sleep(0.05)
        assert not final.done()  # the finish waits for its own frame, not the one in flight
        action.gate.set()
        await final
    await pacer.close()
    frames = [decode_cf_payload(payload) for payload, _ in action.sent]
    assert [i for f in frames for i in f.ids] == [1, 2, 3, 4, 5]
    assert [f.done for f in frames] == [False, True]


async def test_the_bucket_holds_the_node_to_its_uplink_and_splits_broadcasts() -> None:
    from meshnode.link.bucket import ByteBucket, ShapedAction, wire_bytes

    costs = WireCosts()
    bucket = ByteBucket(lambda: 20_000.0, burst_seconds=0.05)
    action = FakeAction()
    shaped = ShapedAction(action, bucket, costs, peers=lambda: ["a", "b", "c"])
    payload = b"x" * 900
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10):
        for _ in range(10):
            await shaped.send(payload, target="a")
        await shaped.send({"broadcast": True})  # a cap: one copy per peer, each paid for
    elapsed = loop.time() - started
    assert [target for _, target in action.sent[-3:]] == ["a", "b", "c"]
    spent = 10 * wire_bytes(payload, costs) + 3 * wire_bytes({"broadcast": True}, costs)
    assert bucket.spent == spent
    assert elapsed >= (spent - 20_000 * 0.05) / 20_000 * 0.9  # never faster than the rate
    assert wire_bytes(payload, costs) == 900 + 103 + 97 and wire_bytes(b"y" * 1200, costs) == 1200 + 103 + 2 * 97


async def test_frames_go_before_caps_and_results_waiting_for_the_bucket() -> None:
    from meshnode.link.bucket import ByteBucket

    bucket = ByteBucket(lambda: 10_000.0, burst_seconds=0.01)
    order: list[str] = []

    async def send(name: str, size: int, priority: int) -> None:
        await bucket.spend(size, priority)
        order.append(name)

    async with asyncio.timeout(5):
        await bucket.spend(100)  # empty the bucket
        caps = [asyncio.ensure_future(send(f"cap{i}", 1600, 1)) for i in range(3)]
        await asyncio.sleep(0)
        frame = asyncio.ensure_future(send("frame", 250, 0))
        await asyncio.gather(*caps, frame)
    assert order.index("frame") <= 1  # at most the cap already being paid for goes first
