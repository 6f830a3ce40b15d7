"""Property tests for meshnode.wire (frames, envelopes, compression): round trips, arbitrary read splits, fuzzed garbage.

Style §13.1: a streaming decoder must give identical frames for every split of the same bytes
(legion-mesh §6 item 3), and malformed input may only ever raise FrameError.
"""

from __future__ import annotations

import contextlib

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.errors import FrameError
from meshnode.wire.compression import StreamCompressor, StreamDecompressor
from meshnode.wire.envelopes import (
    Envelope,
    EnvelopeKind,
    EnvelopeReassembler,
    chunk_frame,
    decode_cf_payload,
    decode_envelope,
    encode_envelope,
)
from meshnode.wire.frames import MAX_UINT32, CodecFrame, StreamDecoder, decode_frame, encode_frame

# Moderate example counts: the test machine is shared (no long CPU loops).
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

token_ids = st.one_of(
    st.integers(0, 127),
    st.integers(128, 65535),
    st.integers(65536, MAX_UINT32),
)
reasons = st.one_of(st.none(), st.sampled_from(["stop", "length", "error", "abort"]), st.text())
frames = st.builds(
    CodecFrame,
    ids=st.lists(token_ids, max_size=40),
    done=st.booleans(),
    finish_reason=reasons,
)
frame_lists = st.lists(frames, min_size=1, max_size=12)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@PROPS
@given(frames)
def test_frame_round_trip(frame: CodecFrame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    assert decode_cf_payload(data) == frame
    # Same bytes as msgpack of the map built in spec key order (legion-mesh §2.2).
    expected = {"ids": frame.ids, "done": frame.done}
    if frame.finish_reason is not None:
        expected["finish_reason"] = frame.finish_reason
    assert data == msgpack.packb(expected, use_bin_type=True)


@PROPS
@given(frame_lists, st.lists(st.integers(0, 2000), max_size=30))
def test_every_split_gives_identical_frames(batch: list[CodecFrame], cuts: list[int]) -> None:
    data = b"".join(encode_frame(frame) for frame in batch)
    decoder = StreamDecoder()
    out: list[CodecFrame] = []
    for piece in split_at(data, cuts):
        out += decoder.feed(piece)
    assert out == batch
    assert decoder.buffered_bytes == 0


@PROPS
@given(frame_lists, st.integers(1, 64))
def test_fixed_size_reads(batch: list[CodecFrame], read_size: int) -> None:
    data = b"".join(encode_frame(frame) for frame in batch)
    decoder = StreamDecoder()
    out: list[CodecFrame] = []
    for start in range(0, len(data), read_size):
        out += decoder.feed(data[start : start + read_size])
    assert out == batch


@PROPS
@given(st.binary(max_size=200))
def test_garbage_decode_raises_only_frame_error(data: bytes) -> None:
    for decode in (decode_frame, decode_cf_payload, decode_envelope):
        with contextlib.suppress(FrameError):
            decode(data)


@PROPS
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_garbage_stream_raises_only_frame_error(chunks: list[bytes]) -> None:
    decoder = StreamDecoder(max_buffer_size=256, max_ids_per_frame=64)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except FrameError:
            assert decoder.poisoned
            return


@PROPS
@given(frame_lists, st.data())
def test_mutated_streams_raise_only_frame_error(
    batch: list[CodecFrame], data: st.DataObject
) -> None:
    raw = bytearray(b"".join(encode_frame(frame) for frame in batch))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=6))
    decoder = StreamDecoder(max_buffer_size=4096)
    try:
        for piece in split_at(bytes(raw), cuts):
            decoder.feed(piece)
    except FrameError:
        pass


envelope_bodies = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.none(), st.booleans(), st.integers(-(2**31), 2**31), st.text(max_size=16)),
    max_size=5,
)


@PROPS
@given(
    st.sampled_from(list(EnvelopeKind)),
    st.text(max_size=40),
    st.integers(0, 2**53 - 1),
    st.binary(max_size=300),
    envelope_bodies,
)
def test_envelope_round_trip(
    kind: EnvelopeKind, stream_id: str, seq: int, raw: bytes, body: dict[str, object]
) -> None:
    envelope = Envelope(kind, stream_id, seq, raw if kind is EnvelopeKind.DATA else body)
    data = encode_envelope(envelope)
    assert decode_envelope(data) == envelope
    assert decode_cf_payload(data) == envelope


@PROPS
@given(frame_lists, st.integers(1, 40), st.integers(0, 1000))
def test_chunk_and_reassemble(batch: list[CodecFrame], slice_size: int, first_seq: int) -> None:
    # Keep the stream well-formed: at most one done frame, at the end.
    batch = [CodecFrame(f.ids, False, f.finish_reason) for f in batch[:-1]] + batch[-1:]
    data = b"".join(encode_frame(frame) for frame in batch)
    envelopes = chunk_frame(data, "s", first_seq, max_slice_bytes=slice_size)
    assert [e.seq for e in envelopes] == list(range(first_seq, first_seq + len(envelopes)))
    reassembler = EnvelopeReassembler()
    out: list[CodecFrame] = []
    for envelope in envelopes:
        out += reassembler.feed(decode_envelope(encode_envelope(envelope)))
    assert out == batch


@PROPS
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=10), st.booleans())
def test_zstd_messages_round_trip(messages: list[bytes], use_dict: bool) -> None:
    dictionary = b"ids done finish_reason stop length" * 8 if use_dict else None
    compressor = StreamCompressor(dict_data=dictionary)
    decompressor = StreamDecompressor(dictionary)
    for message in messages:
        assert decompressor.decompress(compressor.compress(message)) == message


@PROPS
@given(st.lists(st.binary(max_size=100), max_size=5))
def test_zstd_garbage_raises_only_frame_error(chunks: list[bytes]) -> None:
    decompressor = StreamDecompressor(max_output_bytes=1 << 16)
    for chunk in chunks:
        try:
            decompressor.decompress(chunk)
        except FrameError:
            return
