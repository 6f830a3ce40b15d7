"""Every upstream dialect against its recorded-shape bodies (tests/data/upstreams), split at random points."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgpack
import pytest

from meshnode.errors import ConfigError, ProtocolError
from meshnode.generation.api import Prompt, SamplingParams
from meshnode.generation.remote.codec import CodecDialect, CodecParser
from meshnode.generation.remote.dialects import Piece, SseReader
from meshnode.generation.remote.engines import LlamaCppDialect, SglangDialect, VllmDialect
from meshnode.generation.remote.upstream import parse_upstream
from meshnode.wire.frames import decode_frame

DATA = Path(__file__).resolve().parents[1] / "data" / "upstreams"


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    """The body cut at random points (pieces of 0 to 40 bytes)."""
    out, pos = [], 0
    while pos < len(data):
        step = rng.randint(0, 40)
        out.append(data[pos:pos + step])
        pos += step
    return out


def run(parser: Any, pieces: list[bytes]) -> list[Piece]:
    out: list[Piece] = []
    for piece in pieces:
        out.extend(parser.feed(piece))
    out.extend(parser.close())
    return out


def summary(pieces: list[Piece]) -> tuple[list[int], str | None, Any]:
    ids = [i for p in pieces for i in p.ids]
    finishes = [p.finish for p in pieces if p.finish is not None]
    assert len(finishes) == 1 and pieces[-1].finish is not None  # exactly one end, and last
    return ids, finishes[0], pieces[-1].matched_stop


CASES = [
    ("vllm-completions.sse", VllmDialect, [9707, 11, 1879, 0], "stop", 151645, 9),
    ("vllm-chat.sse", VllmDialect, [9707, 0], "length", None, 9),
    ("sglang-cumulative.sse", SglangDialect, [9707, 11, 1879, 0], "stop", 151645, 9),
    ("sglang-incremental.sse", SglangDialect, [9707, 11, 1879, 0], "length", None, 9),
    ("llamacpp-completion.sse", LlamaCppDialect, [9707, 11, 1879], "stop", None, 9),
    ("codec-chat.msgpack", CodecDialect, [9707, 11, 1879, 0, 90], "stop", None, None),
]


@pytest.mark.parametrize(("name", "dialect", "ids", "finish", "matched", "prompt_tokens"), CASES)
def test_dialect_parses_its_recorded_body_however_it_is_split(name: str, dialect: Any, ids: list[int], finish: str,
                                                              matched: Any, prompt_tokens: int | None) -> None:
    body = (DATA / name).read_bytes()
    whole = run(dialect().parser(None), [body])
    assert summary(whole) == (ids, finish, matched)
    if prompt_tokens is not None:
        assert next(p.prompt_tokens for p in whole if p.prompt_tokens is not None) == prompt_tokens
    rng = random.Random(name)
    for _ in range(60):
        assert summary(run(dialect().parser(None), splits(body, rng))) == (ids, finish, matched)
    assert summary(run(dialect().parser(None), [body[i:i + 1] for i in range(len(body))])) == (ids, finish, matched)


def test_codec_pieces_carry_each_frame_exactly_as_sent() -> None:
    body = (DATA / "codec-chat.msgpack").read_bytes()
    rng = random.Random(7)
    for _ in range(60):
        pieces = run(CodecParser(), splits(body, rng))
        assert b"".join(p.frame or b"" for p in pieces) == body
        assert all(p.frame is not None and decode_frame(p.frame).ids == p.ids for p in pieces)
    # the nil variant and the extra key survive untouched (re-encoding would drop or reorder them)
    frames = [msgpack.unpackb(p.frame) for p in run(CodecParser(), [body])]
    assert frames[2] == {"ids": [0], "done": False, "finish_reason": None}
    assert frames[3]["tool_calls"] == [{"name": "f", "arguments_json": "{}"}]


def test_failures_reported_by_the_upstream_become_error_pieces() -> None:
    pieces = run(VllmDialect().parser(None), [(DATA / "vllm-error.sse").read_bytes()])
    assert pieces[-1].finish == "error" and "EngineCore encountered an issue" in (pieces[-1].error or "")
    pieces = run(SglangDialect().parser(None), [(DATA / "sglang-abort.sse").read_bytes()])
    assert pieces[-1].finish == "error" and "Abort before prefill" in (pieces[-1].error or "")
    assert [i for p in pieces for i in p.ids] == [9707]  # the abort chunk repeats the ids: nothing twice
    pieces = run(CodecParser(), [(DATA / "codec-error.msgpack").read_bytes()])
    assert pieces[-1].finish == "error" and "'error'" in (pieces[-1].error or "")


def test_llamacpp_gap_of_a_split_character_is_repaired_with_the_local_tokenizer() -> None:
    body = (DATA / "llamacpp-split-character.sse").read_bytes()
    ids, finish, _ = summary(run(LlamaCppDialect().parser(None), [body]))
    assert (ids, finish) == ([13048, 233], "length")  # without a tokenizer: the gap stays (and is logged)
    encoded: list[str] = []

    def encode(text: str) -> list[int]:
        encoded.append(text)
        return [220, 145367, 233]

    ids, _, _ = summary(run(LlamaCppDialect().parser(encode), splits(body, random.Random(3))))
    assert ids == [13048, 220, 145367, 233] and encoded == [" \U0001F44B"]


@pytest.mark.parametrize("body", [
    b"\xc1\xc1\xc1",                          # never-used msgpack byte
    b"\x82\xa3ids\x91\x05\xa4done\xa3yes",    # done is not a bool
    b"\x93\x01\x02\x03",                      # an array, not a frame
])
def test_malformed_codec_bytes_are_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed Codec frame"):
        run(CodecParser(), [body])


def test_cut_streams_are_a_protocol_error() -> None:
    body = (DATA / "codec-chat.msgpack").read_bytes()
    with pytest.raises(ProtocolError, match="inside a frame"):
        run(CodecParser(), [body[:20]])
    with pytest.raises(ProtocolError, match="before its last"):
        run(CodecParser(), [body[:15]])
    sse = (DATA / "vllm-completions.sse").read_bytes()
    with pytest.raises(ProtocolError, match="before it finished"):
        run(VllmDialect().parser(None), [sse[: sse.index(b"\n\n") + 2]])


@pytest.mark.parametrize(("dialect", "body", "match"), [
    (VllmDialect, (DATA / "vllm-without-token-ids.sse").read_bytes(), "ignores return_token_ids"),
    (VllmDialect, b"data: {not json\n\n", "not JSON"),
    (VllmDialect, b"data: [1, 2]\n\n", "not a JSON object"),
    (VllmDialect, b'data: {"choices": [{"text": "a", "token_ids": [-1]}]}\n\n', "token ids"),
    (SglangDialect, b'data: {"output_ids": [1]}\n\n', "meta_info"),
    (SglangDialect, b'data: {"output_ids": [1], "meta_info": {"finish_reason": "stop"}}\n\n', "not an object"),
    (LlamaCppDialect, b'data: {"content": "a", "stop": false}\n\n', "ignores return_tokens"),
    (LlamaCppDialect, b"data: \xff\xfe\n\n", "not UTF-8"),
])
def test_malformed_sse_events_are_a_protocol_error(dialect: Any, body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        run(dialect().parser(None), [body])


def test_sse_reader_line_ends_comments_multiline_data_and_size_limit() -> None:
    stream = b": comment\r\ndata: a\r\ndata: b\r\n\r\nevent: x\ndata:c\n\ndata: d\r\r"
    for cut in range(len(stream) + 1):
        reader = SseReader()
        assert reader.feed(stream[:cut]) + reader.feed(stream[cut:]) == ["a\nb", "c", "d"]
    with pytest.raises(ProtocolError, match="exceeds"):
        SseReader(max_event_bytes=100).feed(b"data: " + b"x" * 200)


def test_requests_pass_sampling_stops_and_limits_in_each_dialects_fields() -> None:
    params = SamplingParams(temperature=0.5, top_p=0.9, top_k=40, seed=7, max_tokens=33, stop=("END",),
                            stop_ids=(2,))
    chat = Prompt.chat([{"role": "user", "content": "hi"}])
    codec = CodecDialect().request(chat, params, "r1", "m")
    assert codec.path == "/v1/chat/completions" and codec.headers["Codec-Client-Version"] == "0.4"
    assert codec.headers["Accept-Encoding"] == "identity"
    assert {k: codec.body[k] for k in ("stream_format", "max_tokens", "temperature", "top_p", "top_k", "seed",
                                       "stop")} == {"stream_format": "msgpack", "max_tokens": 33, "temperature": 0.5,
                                                    "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["END"]}
    assert CodecDialect().request(Prompt(ids=(1, 2)), params, "r", None).body["prompt"] == [1, 2]
    vllm = VllmDialect().request(Prompt(text="hi"), params, "r2", "m")
    assert vllm.path == "/v1/completions" and vllm.body["return_token_ids"] is True
    assert (vllm.body["max_tokens"], vllm.body["stop_token_ids"], vllm.body["request_id"]) == (33, [2], "r2")
    assert VllmDialect().request(chat, params, "r", None).body["max_completion_tokens"] == 33
    sglang = SglangDialect().request(Prompt(ids=(5, 6)), params, "r3", None)
    assert sglang.path == "/generate" and sglang.body["rid"] == "r3" and sglang.body["input_ids"] == [5, 6]
    assert sglang.body["sampling_params"] == {"max_new_tokens": 33, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
                                              "stop": ["END"], "stop_token_ids": [2], "sampling_seed": 7}
    assert SglangDialect().request(Prompt(text="x"), SamplingParams(), "r", None).body["sampling_params"]["top_k"] == -1
    assert SglangDialect().abort("r3") is not None and SglangDialect().abort("r3").body == {"rid": "r3"}
    llama = LlamaCppDialect().request(Prompt(ids=(5,)), params, "r4", None)
    assert llama.path == "/completion"
    assert {k: llama.body[k] for k in ("prompt", "n_predict", "seed", "stop", "return_tokens", "min_p")} == {
        "prompt": [5], "n_predict": 33, "seed": 7, "stop": ["END"], "return_tokens": True, "min_p": 0.0}
    assert LlamaCppDialect().request(Prompt(ids=(5,)), SamplingParams(), "r", None).body["seed"] == -1


def test_engine_urls() -> None:
    assert parse_upstream("http://127.0.0.1:8000/").url == "http://127.0.0.1:8000"
    spec = parse_upstream("vllm+https://gpu:8000/base?max_concurrent=64")
    assert (spec.dialect, spec.url, spec.max_concurrent, str(spec)) == (
        "vllm", "https://gpu:8000/base", 64, "vllm+https://gpu:8000/base")
    assert parse_upstream("llama.cpp+http://h:8080").dialect == "llamacpp"
    for bad in ["tgi+http://h:1", "ftp://h", "http://", "http://h?x=1", "http://h?max_concurrent=0", "h:8000"]:
        with pytest.raises(ConfigError):
            parse_upstream(bad)
