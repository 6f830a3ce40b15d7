"""Plain engine upstreams (vLLM, SGLang, llama.cpp) with a local tokenizer: map, text, chat template, stop ids."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from meshnode.errors import AdmissionError, ConfigError
from meshnode.generation.api import Prompt, SamplingParams
from meshnode.generation.remote.backend import RemoteBackend
from meshnode.generation.remote.tokenizer import LocalTokenizer
from meshnode.generation.remote.upstream import parse_upstream
from meshnode.wire.maps import map_sha256, parse_map
from tests.remote_fakes import FakeUpstream

VOCAB = {"!": 0, "[UNK]": 1, "hi": 5, "<|im_start|>": 6, "user": 7, "assistant": 8, ",": 11, "world": 1879,
         "Hello": 9707, "<|im_end|>": 151645}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
CHAT = Prompt.chat([{"role": "user", "content": "hi"}])


def tiny_tokenizer(folder: Path, *, template: str | None = TEMPLATE) -> LocalTokenizer:
    """A word-level tokenizer over Qwen2's ids of the recorded bodies, saved as a HF folder."""
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {"eos_token": "<|im_end|>"}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return LocalTokenizer(folder)


def test_local_tokenizer_text_chat_template_and_map(tmp_path: Path) -> None:
    text = tiny_tokenizer(tmp_path / "tok")
    assert text.encode_text("Hello , world !") == [9707, 11, 1879, 0]
    assert text.encode_chat(CHAT.messages or ()) == [6, 7, 5, 151645, 6, 8]
    assert text.decode([9707, 151645, 0]) == "Hello !"  # special tokens skipped
    info = text.model_info("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert info.map_id == "huggingfacetb/smollm2"
    assert parse_map(info.map_bytes)["vocab"]["Hello"] == 9707
    assert LocalTokenizer(tmp_path / "tok" / "tokenizer.json").encode_text("hi") == [5]
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        LocalTokenizer(tmp_path / "missing")
    bare = tiny_tokenizer(tmp_path / "bare", template=None)
    with pytest.raises(AdmissionError, match="no chat template"):
        bare.encode_chat(CHAT.messages or ())


def test_plain_upstreams_need_a_tokenizer() -> None:
    with pytest.raises(ConfigError, match="--tokenizer"):
        RemoteBackend([parse_upstream("vllm+http://127.0.0.1:9")])


async def serve(dialect: str, tmp_path: Path, **kw: Any) -> tuple[FakeUpstream, RemoteBackend]:
    fake = await FakeUpstream(dialect, **kw).start()
    return fake, RemoteBackend([parse_upstream(fake.url)], tokenizer=tiny_tokenizer(tmp_path / "tok"))


async def test_vllm_ids_text_and_the_map_of_the_local_tokenizer(tmp_path: Path) -> None:
    fake, remote = await serve("vllm", tmp_path)
    try:
        async with asyncio.timeout(10), remote:
            codec_map = await remote.codec_map()
            assert codec_map.map_id == "huggingfacetb/smollm2" and codec_map.map_hash == map_sha256(codec_map.data)
            stream = await remote.start(Prompt(text="Hello"), SamplingParams(max_tokens=8))
            got = [c async for c in stream]
            ids = [i for c in got for i in c.ids]
            assert ids == [9707, 11, 1879, 0] and got[-1].finish_reason == "stop"  # the stop id is not streamed
            assert all(c.frame is None for c in got)  # the node encodes these frames itself
            assert stream.prompt_tokens == 9 and stream.matched_stop == 151645
            assert remote.decode(ids) == "Hello , world !"
        assert fake.requests[0]["return_token_ids"] is True and fake.requests[0]["model"]
    finally:
        await fake.close()


async def test_sglang_chat_is_templated_here_and_sent_as_ids(tmp_path: Path) -> None:
    fake, remote = await serve("sglang", tmp_path)
    try:
        async with asyncio.timeout(10), remote:
            got = [c async for c in await remote.start(CHAT, SamplingParams(max_tokens=8))]
            assert [i for c in got for i in c.ids] == [9707, 11, 1879, 0]
        assert fake.requests[0]["input_ids"] == [6, 7, 5, 151645, 6, 8]
    finally:
        await fake.close()


async def test_stop_ids_the_upstream_does_not_know_end_the_stream_here(tmp_path: Path) -> None:
    fake, remote = await serve("llamacpp", tmp_path)
    try:
        async with asyncio.timeout(10), remote:
            stream = await remote.start(Prompt(ids=(6, 7)), SamplingParams(max_tokens=8, stop_ids=(1879,)))
            got = [c async for c in stream]
            assert [i for c in got for i in c.ids] == [9707, 11] and got[-1].finish_reason == "stop"
            assert stream.matched_stop == 1879
        assert fake.requests[0]["prompt"] == [6, 7]
    finally:
        await fake.close()
