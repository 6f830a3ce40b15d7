"""Golden-byte and behaviour tests for meshnode.wire (frames, envelopes, compression) (legion-mesh §2, §5.5)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import pytest

from meshnode.errors import FrameError, ProtocolError
from meshnode.wire.compression import StreamCompressor, StreamDecompressor, dict_id
from meshnode.wire.envelopes import (
    DATA,
    DATA_SLICE_BYTES,
    END,
    HELLO,
    READY,
    Envelope,
    EnvelopeKind,
    EnvelopeReassembler,
    chunk_frame,
    decode_cf_payload,
    decode_envelope,
    encode_envelope,
)
from meshnode.wire.frames import CodecFrame, StreamDecoder, decode_frame, encode_frame

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def golden(name: str) -> bytes:
    return (DATA_DIR / name).read_bytes()


EXAMPLE1 = CodecFrame(ids=[9707, 0], done=False)
EXAMPLE2 = CodecFrame(ids=[], done=True, finish_reason="stop")


# -------------------------------------------------------------------------------------------------
# Golden bytes (legion-mesh §2.2)
# -------------------------------------------------------------------------------------------------


def test_example1_encodes_to_golden_bytes() -> None:
    data = encode_frame(EXAMPLE1)
    assert data == bytes.fromhex("82 a3 69 64 73 92 cd 25 eb 00 a4 64 6f 6e 65 c2")
    assert data == golden("codec-frame-example1.bin")


def test_example2_terminal_frame_is_31_bytes() -> None:
    data = encode_frame(EXAMPLE2)
    assert len(data) == 31
    assert data == golden("codec-frame-example2-stop.bin")


def test_concatenated_http_body_is_47_bytes() -> None:
    body = encode_frame(EXAMPLE1) + encode_frame(EXAMPLE2)
    assert body == golden("codec-stream-example1-example2.bin")
    assert len(body) == 47


@pytest.mark.parametrize(
    ("token_id", "size"),
    [(5, 13), (127, 13), (128, 14), (200, 14), (255, 14), (256, 15), (9707, 15), (65535, 15),
     (65536, 17), (151645, 17), (2**32 - 1, 17)],
)
def test_single_token_frame_sizes(token_id: int, size: int) -> None:
    assert len(encode_frame(CodecFrame([token_id], False))) == size


def test_single_token_frame_bytes() -> None:
    assert encode_frame(CodecFrame([5], False)) == bytes.fromhex(
        "82 a3 69 64 73 91 05 a4 64 6f 6e 65 c2"
    )
    assert bytes.fromhex("91 ce 00 02 50 5d") in encode_frame(CodecFrame([151645], False))


def test_golden_frames_decode() -> None:
    assert decode_frame(golden("codec-frame-example1.bin")) == EXAMPLE1
    assert decode_frame(golden("codec-frame-example2-stop.bin")) == EXAMPLE2


def test_js_nil_variant_decodes_as_no_reason() -> None:
    data = golden("codec-frame-example3-js-nil.bin")
    assert len(data) == 31
    frame = decode_frame(data)
    assert frame == EXAMPLE1
    assert frame.finish_reason is None
    # Re-encoding drops the nil: back to example 1.
    assert encode_frame(frame) == golden("codec-frame-example1.bin")


def test_none_finish_reason_is_omitted() -> None:
    assert b"finish_reason" not in encode_frame(CodecFrame([1], False, None))
    assert b"finish_reason" in encode_frame(CodecFrame([1], False, "length"))


def test_extra_keys_tolerated_and_reencoded_in_order() -> None:
    tool_calls = [{"name": "f", "arguments_json": "{}", "id": "c1"}]
    safety = {"category": "pii", "confidence": 1, "source": "prefilter"}
    data = msgpack.packb(
        {"ids": [1], "done": True, "finish_reason": "stop", "tool_calls": tool_calls,
         "safety": safety},
        use_bin_type=True,
    )
    frame = decode_frame(data)
    assert frame.ids == [1] and frame.done and frame.finish_reason == "stop"
    assert frame.extras == {"tool_calls": tool_calls, "safety": safety}
    assert list(frame.extras) == ["tool_calls", "safety"]
    assert encode_frame(frame) == data


# -------------------------------------------------------------------------------------------------
# Encode / decode errors
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-1, 2**32, 2**64, True, 1.0, "1", None])
def test_encode_rejects_ids_outside_uint32(bad_id: object) -> None:
    with pytest.raises(FrameError):
        encode_frame(CodecFrame([1, bad_id], False))  # type: ignore[list-item]


def test_encode_rejects_bad_field_types() -> None:
    with pytest.raises(FrameError):
        encode_frame(CodecFrame([1], 1))  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        encode_frame(CodecFrame([1], True, 5))  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        encode_frame(CodecFrame("abc", True))  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        encode_frame(CodecFrame([1], True, extras={"done": 1}))
    with pytest.raises(FrameError):
        encode_frame(CodecFrame([1], True, extras={"x": object()}))


def test_frame_error_is_a_protocol_error() -> None:
    assert issubclass(FrameError, ProtocolError)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (golden("codec-frame-example1.bin")[:-1], "truncated"),
        (golden("codec-frame-example1.bin") + b"\x00", "trailing"),
        (pack([1, 2]), "must be a map"),
        (pack({"done": False}), "no 'ids'"),
        (pack({"ids": [1]}), "no 'done'"),
        (pack({"ids": [1], "done": 0}), "done must be a bool"),
        (pack({"ids": [1], "done": None}), "done must be a bool"),
        (pack({"ids": "abc", "done": False}), "ids must be an array"),
        (pack({"ids": [-1], "done": False}), "outside uint32"),
        (pack({"ids": [2**32], "done": False}), "outside uint32"),
        (pack({"ids": [1.5], "done": False}), "not an integer"),
        (pack({"ids": [True], "done": False}), "not an integer"),
        (pack({"ids": [], "done": True, "finish_reason": 3}), "finish_reason"),
        (pack({"ids": [], "done": True, b"bin-key": 1}), "not a string"),
        (bytes.fromhex("c1"), "malformed"),
        (bytes.fromhex("d4 01 00"), "malformed"),  # ext types are refused (max_ext_len=0)
    ],
)
def test_decode_errors_carry_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_frame(data)


def test_decode_rejects_invalid_utf8_string() -> None:
    data = bytes.fromhex("82 a3 69 64 73 90 a4 64 6f 6e ff c2")
    with pytest.raises(FrameError):
        decode_frame(data)


def test_decode_limits() -> None:
    big = encode_frame(CodecFrame(list(range(100)), False))
    with pytest.raises(FrameError, match="exceeds"):
        decode_frame(big, max_buffer_size=50)
    with pytest.raises(FrameError):
        decode_frame(big, max_ids_per_frame=99)
    assert decode_frame(big, max_ids_per_frame=100).ids == list(range(100))


# -------------------------------------------------------------------------------------------------
# StreamDecoder (legion-mesh §2.2 concatenation, §6 item 3)
# -------------------------------------------------------------------------------------------------

STREAM_FRAMES = [
    CodecFrame([5], False),
    CodecFrame([200, 9707], False),
    CodecFrame([151645, 0, 2**32 - 1], False),
    CodecFrame([1], False, None, {"safety": {"source": "clean"}}),
    CodecFrame([], True, "stop"),
]
STREAM_BYTES = b"".join(encode_frame(frame) for frame in STREAM_FRAMES)


def test_stream_decoder_one_read_holds_all_frames() -> None:
    assert StreamDecoder().feed(STREAM_BYTES) == STREAM_FRAMES


def test_stream_decoder_byte_by_byte() -> None:
    decoder = StreamDecoder()
    frames: list[CodecFrame] = []
    for byte in STREAM_BYTES:
        frames += decoder.feed(bytes([byte]))
    assert frames == STREAM_FRAMES
    assert decoder.buffered_bytes == 0


def test_stream_decoder_every_two_way_and_three_way_split() -> None:
    n = len(STREAM_BYTES)
    for i in range(n + 1):
        decoder = StreamDecoder()
        assert decoder.feed(STREAM_BYTES[:i]) + decoder.feed(STREAM_BYTES[i:]) == STREAM_FRAMES
    for i in range(0, n + 1, 3):
        for j in range(i, n + 1, 2):
            decoder = StreamDecoder()
            frames = decoder.feed(STREAM_BYTES[:i])
            frames += decoder.feed(STREAM_BYTES[i:j])
            frames += decoder.feed(STREAM_BYTES[j:])
            assert frames == STREAM_FRAMES


def test_golden_http_body_splits() -> None:
    body = golden("codec-stream-example1-example2.bin")
    for i in range(len(body) + 1):
        decoder = StreamDecoder()
        assert decoder.feed(body[:i]) + decoder.feed(body[i:]) == [EXAMPLE1, EXAMPLE2]


def test_stream_decoder_accepts_memoryview_and_bytearray() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(bytearray(STREAM_BYTES[:10])) + decoder.feed(
        memoryview(STREAM_BYTES)[10:]
    ) == STREAM_FRAMES


def test_many_small_frames_in_one_read_beyond_the_buffer_limit() -> None:
    # 1000 frames (13-15 kB) in a single read with a 64-byte buffer: each frame fits, so it works.
    frames = [CodecFrame([i], False) for i in range(1000)]
    data = b"".join(encode_frame(frame) for frame in frames)
    assert StreamDecoder(max_buffer_size=64).feed(data) == frames


def test_buffered_bytes_counts_the_partial_frame() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(STREAM_BYTES[:20]) == [CodecFrame([5], False)]
    assert decoder.buffered_bytes == 20 - 13


def test_oversized_frame_raises_instead_of_buffering() -> None:
    decoder = StreamDecoder(max_buffer_size=100)
    big = encode_frame(CodecFrame(list(range(256, 356)), False))  # 100 ids × 3 B
    assert len(big) > 100
    with pytest.raises(FrameError, match="buffer limit"):
        for byte in big:
            decoder.feed(bytes([byte]))


def test_too_many_ids_in_one_frame() -> None:
    decoder = StreamDecoder(max_ids_per_frame=10)
    with pytest.raises(FrameError):
        decoder.feed(encode_frame(CodecFrame(list(range(11)), False)))


def test_decoder_is_poisoned_after_an_error() -> None:
    decoder = StreamDecoder()
    with pytest.raises(FrameError):
        decoder.feed(b"\xc1")
    assert decoder.poisoned
    with pytest.raises(FrameError, match="poisoned"):
        decoder.feed(encode_frame(EXAMPLE1))


def test_non_frame_value_in_stream_poisons() -> None:
    decoder = StreamDecoder()
    with pytest.raises(FrameError, match="must be a map"):
        decoder.feed(encode_frame(EXAMPLE1) + pack(7))
    with pytest.raises(FrameError):
        decoder.feed(b"")


def test_nested_array_bomb_is_bounded() -> None:
    # 128 nested arrays each declaring 65535 entries: the array limit refuses them early.
    decoder = StreamDecoder(max_ids_per_frame=1024)
    with pytest.raises(FrameError):
        decoder.feed(b"\xdc\xff\xff" * 128)


# -------------------------------------------------------------------------------------------------
# Envelope (legion-mesh §5.5)
# -------------------------------------------------------------------------------------------------


def test_data_envelope_golden() -> None:
    frame_bytes = golden("codec-frame-example1.bin")
    envelope = Envelope(DATA, "7f1c", 2, frame_bytes)
    data = encode_envelope(envelope)
    assert data == golden("codec-envelope-data-7f1c-n2.bin")
    assert len(data) == 34
    assert data[:18] == bytes.fromhex("84 a1 6b 02 a1 73 a4 37 66 31 63 a1 6e 02 a1 62 c4 10")
    assert decode_envelope(data) == envelope


def test_kind_values() -> None:
    assert (HELLO, READY, DATA, END) == (0, 1, 2, 3)
    assert EnvelopeKind(2) is DATA


@pytest.mark.parametrize(
    ("stream_id", "seq", "frame_len", "overhead"),
    [
        ("7f1c", 2, 16, 13 + 4 + 1),
        ("a" * 15, 127, 16, 13 + 15 + 1),
        ("a" * 15, 128, 16, 13 + 15 + 2),
        ("a" * 15, 256, 16, 13 + 15 + 3),
        ("0f8c2d3e-5b9a-4c1d-8e7f-1a2b3c4d5e6f", 2, 16, 13 + 36 + 1 + 1),
        ("7f1c", 2, 300, 13 + 4 + 1 + 1),
    ],
)
def test_envelope_overhead_formula(stream_id: str, seq: int, frame_len: int, overhead: int) -> None:
    data = encode_envelope(Envelope(DATA, stream_id, seq, b"\x00" * frame_len))
    assert len(data) - frame_len == overhead


def test_control_envelopes_round_trip() -> None:
    hello = Envelope(HELLO, "s1", 0, {"codec_version": 1, "accept_compression": ["identity"],
                                     "accept_safety_policies": ["*"], "intent": "chat"})
    ready = Envelope(READY, "s1", 1, {"codec_version": 1, "compression": "identity",
                                     "map_id": "huggingfacetb/smollm2", "safety_policy_id": None,
                                     "safety_policy_hash": None})
    end = Envelope(END, "s1", 5, {"codec_version": 1, "finish_reason": "cancel"})
    for envelope in (hello, ready, end):
        data = encode_envelope(envelope)
        assert data[:3] == bytes([0x84, 0xA1, ord("k")])
        assert decode_envelope(data) == envelope
        assert decode_cf_payload(data) == envelope


def test_encode_envelope_rejects_wrong_body_types() -> None:
    with pytest.raises(FrameError):
        encode_envelope(Envelope(DATA, "s", 2, {"a": 1}))
    with pytest.raises(FrameError):
        encode_envelope(Envelope(END, "s", 3, b"raw"))
    with pytest.raises(FrameError):
        encode_envelope(Envelope(7, "s", 3, {}))  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        encode_envelope(Envelope(DATA, "s", -1, b"x"))
    with pytest.raises(FrameError):
        encode_envelope(Envelope(DATA, 5, 2, b"x"))  # type: ignore[arg-type]


def test_decode_cf_payload_bare_frame_and_envelope() -> None:
    assert decode_cf_payload(golden("codec-frame-example1.bin")) == EXAMPLE1
    assert decode_cf_payload(golden("codec-frame-example3-js-nil.bin")) == EXAMPLE1
    envelope = decode_cf_payload(golden("codec-envelope-data-7f1c-n2.bin"))
    assert isinstance(envelope, Envelope)
    assert decode_frame(envelope.body) == EXAMPLE1  # type: ignore[arg-type]


def test_envelope_is_tried_first() -> None:
    data = pack({"k": 3, "s": "x", "n": 4, "b": {}, "ids": [1], "done": True})
    assert isinstance(decode_cf_payload(data), Envelope)


def test_not_an_envelope_falls_back_to_frame_checks() -> None:
    # k outside 0..3: not an envelope, and not a frame either.
    with pytest.raises(FrameError, match="no 'ids'"):
        decode_cf_payload(pack({"k": 7, "s": "x", "n": 2, "b": b""}))
    # n as a string: same.
    with pytest.raises(FrameError):
        decode_cf_payload(pack({"k": 2, "s": "x", "n": "2", "b": b""}))


def test_envelope_sequence_number_as_float() -> None:
    envelope = decode_envelope(pack({"k": 2, "s": "x", "n": 3.0, "b": b"\x90"}))
    assert envelope.seq == 3
    with pytest.raises(FrameError, match="not an integer"):
        decode_envelope(pack({"k": 2, "s": "x", "n": 2.5, "b": b""}))
    with pytest.raises(FrameError, match="out of range"):
        decode_envelope(pack({"k": 2, "s": "x", "n": -1, "b": b""}))


def test_data_body_must_be_bin() -> None:
    with pytest.raises(FrameError, match="bin"):
        decode_envelope(pack({"k": 2, "s": "x", "n": 2, "b": "text"}))
    with pytest.raises(FrameError, match="bin"):
        decode_envelope(pack({"k": 2, "s": "x", "n": 2}))
    with pytest.raises(FrameError, match="map"):
        decode_envelope(pack({"k": 0, "s": "x", "n": 0, "b": b"raw"}))
    assert decode_envelope(pack({"k": 3, "s": "x", "n": 9})).body == {}


def test_decode_envelope_rejects_bare_frames() -> None:
    with pytest.raises(FrameError, match="not an envelope"):
        decode_envelope(golden("codec-frame-example1.bin"))


# -------------------------------------------------------------------------------------------------
# Chunking and reassembly (legion-mesh §5.5, §6 item 10)
# -------------------------------------------------------------------------------------------------


def big_frame() -> tuple[CodecFrame, bytes]:
    frame = CodecFrame([151645 + (i % 1000) for i in range(16_000)], False)
    return frame, encode_frame(frame)  # 16,000 × 5 B ≈ 80 KB: two slices


def test_small_frame_is_one_envelope() -> None:
    envelopes = chunk_frame(encode_frame(EXAMPLE1), "7f1c", 2)
    assert envelopes == [Envelope(DATA, "7f1c", 2, golden("codec-frame-example1.bin"))]


def test_big_frame_is_sliced_and_reassembled() -> None:
    frame, data = big_frame()
    envelopes = chunk_frame(data, "call-1", 2)
    assert [e.seq for e in envelopes] == [2, 3]
    assert all(len(e.body) <= DATA_SLICE_BYTES for e in envelopes)
    assert b"".join(e.body for e in envelopes) == data  # type: ignore[misc]
    reassembler = EnvelopeReassembler()
    out: list[CodecFrame] = []
    for envelope in envelopes:
        out += reassembler.feed(decode_envelope(encode_envelope(envelope)))
    assert out == [frame]


def test_exact_slice_boundary() -> None:
    assert len(chunk_frame(b"x" * DATA_SLICE_BYTES, "s", 2)) == 1
    assert len(chunk_frame(b"x" * (DATA_SLICE_BYTES + 1), "s", 2)) == 2


def test_chunk_frame_rejects_bad_input() -> None:
    with pytest.raises(FrameError):
        chunk_frame(b"", "s", 2)
    with pytest.raises(FrameError):
        chunk_frame(b"x", "s", -1)
    with pytest.raises(FrameError):
        chunk_frame(b"x", "s", 2, max_slice_bytes=0)


def test_full_hello_ready_data_end_sequence() -> None:
    reassembler = EnvelopeReassembler()
    frames = [CodecFrame([1, 2], False), CodecFrame([3], False), CodecFrame([], True, "stop")]
    assert reassembler.feed(Envelope(HELLO, "s", 0, {"codec_version": 1})) == []
    assert reassembler.feed(Envelope(READY, "s", 1, {"codec_version": 1})) == []
    out: list[CodecFrame] = []
    for seq, frame in enumerate(frames, start=2):
        out += reassembler.feed(Envelope(DATA, "s", seq, encode_frame(frame)))
    assert out == frames
    assert reassembler.feed(Envelope(END, "s", 5, {"finish_reason": "stop"})) == []
    assert reassembler.active_streams == 0


def test_interleaved_streams_are_independent() -> None:
    _, data = big_frame()
    a = chunk_frame(data, "a", 2)
    b = chunk_frame(encode_frame(EXAMPLE1) + encode_frame(EXAMPLE2), "b", 2, max_slice_bytes=7)
    reassembler = EnvelopeReassembler()
    out_a: list[CodecFrame] = []
    out_b: list[CodecFrame] = []
    for index in range(max(len(a), len(b))):
        if index < len(a):
            out_a += reassembler.feed(a[index])
        if index < len(b):
            out_b += reassembler.feed(b[index])
    assert len(out_a) == 1 and out_b == [EXAMPLE1, EXAMPLE2]


@pytest.mark.parametrize("order", [[2, 4], [2, 2], [3, 2]])
def test_gaps_duplicates_and_reordering_fail(order: list[int]) -> None:
    reassembler = EnvelopeReassembler()
    data = encode_frame(CodecFrame(list(range(50)), False))
    slices = chunk_frame(data, "s", 2, max_slice_bytes=8)
    by_seq = {e.seq: e for e in slices}
    with pytest.raises(FrameError):
        for seq in order:
            reassembler.feed(by_seq[seq])
    # The stream stays failed.
    with pytest.raises(FrameError, match="failed earlier"):
        reassembler.feed(by_seq[5])
    reassembler.discard("s")
    assert reassembler.active_streams == 0


def test_end_in_the_middle_of_a_frame_fails() -> None:
    reassembler = EnvelopeReassembler()
    data = encode_frame(EXAMPLE1)
    reassembler.feed(Envelope(DATA, "s", 2, data[:5]))
    with pytest.raises(FrameError, match="middle"):
        reassembler.feed(Envelope(END, "s", 3, {}))
    assert reassembler.active_streams == 0


def test_data_after_done_fails() -> None:
    reassembler = EnvelopeReassembler()
    assert reassembler.feed(Envelope(DATA, "s", 2, encode_frame(EXAMPLE2))) == [EXAMPLE2]
    with pytest.raises(FrameError, match="after the done"):
        reassembler.feed(Envelope(DATA, "s", 3, encode_frame(EXAMPLE1)))
    with pytest.raises(FrameError, match="after the done"):
        EnvelopeReassembler().feed(
            Envelope(DATA, "t", 2, encode_frame(EXAMPLE2) + encode_frame(EXAMPLE1))
        )


def test_reassembler_accepts_plain_int_kinds() -> None:
    reassembler = EnvelopeReassembler()
    assert reassembler.feed(Envelope(2, "s", 2, encode_frame(EXAMPLE1))) == [EXAMPLE1]
    assert reassembler.feed(Envelope(3, "s", 3, {})) == []
    assert reassembler.active_streams == 0
    with pytest.raises(FrameError, match="unknown envelope kind"):
        reassembler.feed(Envelope(9, "s", 4, {}))


def test_end_for_unknown_stream_is_ignored() -> None:
    assert EnvelopeReassembler().feed(Envelope(END, "nope", 9, {})) == []


def test_stream_limit_and_eviction_of_finished_streams() -> None:
    reassembler = EnvelopeReassembler(max_streams=2)
    reassembler.feed(Envelope(DATA, "a", 2, encode_frame(EXAMPLE1)))
    reassembler.feed(Envelope(DATA, "b", 2, encode_frame(EXAMPLE1)))
    with pytest.raises(FrameError, match="concurrent streams"):
        reassembler.feed(Envelope(DATA, "c", 2, encode_frame(EXAMPLE1)))
    reassembler.feed(Envelope(DATA, "a", 3, encode_frame(EXAMPLE2)))  # a is finished now
    assert reassembler.feed(Envelope(DATA, "c", 2, encode_frame(EXAMPLE1))) == [EXAMPLE1]
    assert reassembler.active_streams == 2


def test_reassembler_buffer_is_bounded() -> None:
    reassembler = EnvelopeReassembler(max_buffer_size=1000)
    _, data = big_frame()
    with pytest.raises(FrameError):
        reassembler.feed(chunk_frame(data, "s", 2)[0])


# -------------------------------------------------------------------------------------------------
# Streaming zstd (legion-mesh §2.7)
# -------------------------------------------------------------------------------------------------

MESSAGES = [encode_frame(CodecFrame([i, i + 1, 9707], False)) for i in range(50)] + [
    encode_frame(EXAMPLE2)
]


def test_dict_id_format() -> None:
    assert dict_id(b"") == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert dict_id(b"abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_each_message_decodes_on_arrival() -> None:
    compressor = StreamCompressor(level=3)
    decompressor = StreamDecompressor()
    for message in MESSAGES:
        assert decompressor.decompress(compressor.compress(message)) == message
    assert decompressor.decompress(compressor.finish()) == b""
    assert compressor.finish() == b""
    with pytest.raises(FrameError):
        compressor.compress(b"more")


def test_one_context_per_stream_beats_per_frame_compression() -> None:
    compressor = StreamCompressor()
    streamed = sum(len(compressor.compress(message)) for message in MESSAGES)
    separate = sum(len(StreamCompressor().compress(message)) for message in MESSAGES)
    assert streamed < separate


def test_dictionary_round_trip() -> None:
    dictionary = b"".join(MESSAGES[:10]) * 4
    compressor = StreamCompressor(level=3, dict_data=dictionary)
    assert compressor.dict_id == dict_id(dictionary)
    decompressor = StreamDecompressor(dictionary, expected_dict_id=dict_id(dictionary).upper())
    for message in MESSAGES:
        assert decompressor.decompress(compressor.compress(message)) == message


def test_dictionary_mismatch_is_refused() -> None:
    with pytest.raises(FrameError, match="does not match"):
        StreamDecompressor(b"other dictionary", expected_dict_id=dict_id(b"the named one"))
    with pytest.raises(FrameError):
        StreamDecompressor(None, expected_dict_id=dict_id(b"the named one"))


def test_arbitrary_split_of_compressed_stream() -> None:
    compressor = StreamCompressor()
    wire = b"".join(compressor.compress(message) for message in MESSAGES) + compressor.finish()
    decompressor = StreamDecompressor()
    out = b"".join(decompressor.decompress(wire[i : i + 7]) for i in range(0, len(wire), 7))
    assert out == b"".join(MESSAGES)


def test_decompression_bomb_is_refused() -> None:
    bomb = StreamCompressor().compress(b"\x00" * (16 << 20))
    assert len(bomb) < 4096
    decompressor = StreamDecompressor(max_output_bytes=1 << 20)
    with pytest.raises(FrameError, match="exceeds"):
        decompressor.decompress(bomb)
    assert decompressor.poisoned
    with pytest.raises(FrameError, match="poisoned"):
        decompressor.decompress(b"")


def test_garbage_is_refused() -> None:
    decompressor = StreamDecompressor()
    with pytest.raises(FrameError, match="invalid zstd"):
        decompressor.decompress(b"this is not zstd at all")
    with pytest.raises(FrameError):
        decompressor.decompress(b"")
