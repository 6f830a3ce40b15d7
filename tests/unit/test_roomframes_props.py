"""Property tests for the action chunker / Reassembler (trystero-wire §8.2-§8.4)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.errors import FrameError
from meshnode.wire import roomframes as rf

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f == 0 or abs(f) > 1e-300)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def payloads(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["bytes", "str", "json"]))
    if kind == "bytes":
        size = draw(
            st.sampled_from([0, 1, 100, rf.CHUNK_PAYLOAD_BYTES, rf.CHUNK_PAYLOAD_BYTES + 1, 40000])
        )
        return random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    if kind == "str":
        # Lone surrogates are replaced by U+FFFD on the way out, like TextEncoder; avoid them here.
        text = draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=50))
        return text * draw(st.sampled_from([1, 500]))
    return draw(json_values)


@st.composite
def messages(draw: st.DrawFn) -> list[tuple[str, str, int, Any, Any]]:
    count = draw(st.integers(1, 6))
    result = []
    for index in range(count):
        peer = draw(st.sampled_from(["p1", "p2"]))
        name = draw(st.sampled_from(["cap", "cf", "tc", "é✓"]))
        meta = draw(st.one_of(st.just(rf.NO_METADATA), json_values))
        result.append((peer, name, index, draw(payloads()), meta))
    return result


def _normalise(value: Any) -> Any:
    """Compare like JavaScript: every number is a double, tuples become lists."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=messages(), seed=st.integers(0, 2**32))
def test_interleaved_chunks_reassemble(
    batch: list[tuple[str, str, int, Any, Any]], seed: int
) -> None:
    # Chunks of one message stay in order (ordered channel), messages interleave arbitrarily.
    streams = []
    for peer, name, nonce, payload, meta in batch:
        data, kind = rf.encode_payload(payload)
        streams.append([(peer, chunk) for chunk in rf.encode_action(name, nonce, data, kind, meta)])
    rng = random.Random(seed)
    reassembler = rf.Reassembler()
    delivered = []
    while any(streams):
        stream = rng.choice([s for s in streams if s])
        peer, chunk = stream.pop(0)
        result = reassembler.feed(peer, chunk)
        if result is not None:
            delivered.append(result)
    assert reassembler.pending_bytes == 0
    assert len(delivered) == len(batch)
    by_key = {(d.peer_id, d.name, d.nonce): d for d in delivered}
    for peer, name, nonce, payload, meta in batch:
        got = by_key[(peer, name, nonce)]
        if isinstance(payload, bytes):
            assert got.payload == payload
        else:
            assert _normalise(got.payload) == _normalise(payload)
        if meta is rf.NO_METADATA:
            assert got.metadata is rf.NO_METADATA
        else:
            assert _normalise(got.metadata) == _normalise(meta)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_garbage_frames_never_raise_unexpectedly(data: bytes) -> None:
    try:
        frame = rf.decode_frame(data)
    except FrameError:
        return
    reassembler = rf.Reassembler()
    if isinstance(frame, rf.RoomFrame):
        reassembler.feed("peer", frame.chunk)  # must not raise
    assert reassembler.pending_bytes <= len(data)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=120), max_size=30))
def test_garbage_chunks_are_dropped_quietly(chunks: list[bytes]) -> None:
    reassembler = rf.Reassembler(
        max_message_bytes=256, max_pending_messages_per_peer=4, max_pending_bytes_per_peer=512
    )
    for chunk in chunks:
        reassembler.feed("peer", chunk)  # never raises
        assert reassembler.pending_messages("peer") <= 4
        assert reassembler.pending_bytes <= 512


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 3000), st.booleans()), min_size=1, max_size=120
    )
)
def test_memory_stays_bounded_and_nothing_truncated_is_delivered(
    ops: list[tuple[int, int, bool]],
) -> None:
    limit_messages, limit_bytes, limit_message = 5, 8000, 4000
    reassembler = rf.Reassembler(
        max_message_bytes=limit_message,
        max_pending_messages_per_peer=limit_messages,
        max_pending_bytes_per_peer=limit_bytes,
    )
    sent: dict[int, bytearray] = {}
    for nonce, size, last in ops:
        body = bytes([nonce]) * size
        sent.setdefault(nonce, bytearray()).extend(body)
        tags = rf.TAG_BINARY | rf.TAG_JSON | (rf.TAG_LAST if last else 0)
        chunk = rf.encode_name("x") + nonce.to_bytes(2, "big") + bytes((tags, 0)) + body
        result = reassembler.feed("peer", chunk)
        if last:
            whole = bytes(sent.pop(nonce))
            if result is not None:
                assert result.payload == whole  # never a truncated message
        assert reassembler.pending_messages("peer") <= limit_messages
        assert reassembler.pending_bytes <= limit_bytes


def test_oversize_message_is_dropped_and_rest_swallowed() -> None:
    offenders: list[tuple[str, str]] = []
    reassembler = rf.Reassembler(max_message_bytes=1000, max_pending_bytes_per_peer=1000,
                                 on_oversize=lambda peer, reason: offenders.append((peer, reason)))
    data, kind = rf.encode_payload(bytes(50000))
    chunks = rf.encode_action("big", 0, data, kind)
    assert all(reassembler.feed("p", chunk) is None for chunk in chunks)
    assert reassembler.pending_bytes == 0
    assert reassembler.dropped == 1
    # Reported once, at the chunk that crossed the limit (the room drops such a peer there).
    assert offenders == [("p", "action 'big' exceeds 1000 bytes")]
    # The next message on the same action is delivered normally.
    data, kind = rf.encode_payload(b"ok")
    (chunk,) = rf.encode_action("big", 1, data, kind)
    delivery = reassembler.feed("p", chunk)
    assert delivery is not None and delivery.payload == b"ok"


def test_drop_peer_clears_buffers() -> None:
    reassembler = rf.Reassembler()
    data, kind = rf.encode_payload(bytes(40000))
    chunks = rf.encode_action("x", 0, data, kind)
    reassembler.feed("p", chunks[0])
    assert reassembler.pending_bytes > 0
    reassembler.drop_peer("p")
    assert reassembler.pending_bytes == 0
    assert reassembler.pending_messages("p") == 0


def test_bad_json_payload_is_dropped() -> None:
    chunk = rf.encode_name("x") + b"\x00\x00" + bytes((rf.TAG_LAST | rf.TAG_JSON, 255)) + b"{nope"
    reassembler = rf.Reassembler()
    assert reassembler.feed("p", chunk) is None
    assert reassembler.dropped == 1
