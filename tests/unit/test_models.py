"""meshnode.generation.models without the real model: cache dir, device/dtype choice, atomic conversion, loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from meshnode.errors import ModelError
from meshnode.generation import models


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


class SavingTokenizer:
    """Stands in for a GGUF tokenizer: only ``save_pretrained`` is needed by the conversion."""

    eos_token_id = 2

    def save_pretrained(self, folder: str) -> None:
        Path(folder, "tokenizer.json").write_text("{}", encoding="utf-8")


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake embedded GGUF file; transformers' GGUF loaders return a tiny model instead."""
    path = tmp_path / "pkg" / models.EMBEDDED_GGUF_FILE
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: path)

    def load_tokenizer(*args: Any, **kwargs: Any) -> SavingTokenizer:
        assert kwargs.get("gguf_file") == path.name
        return SavingTokenizer()

    def load_model(*args: Any, **kwargs: Any) -> LlamaForCausalLM:
        assert kwargs.get("gguf_file") == path.name
        model = tiny_llama()
        model.hf_quantizer = object()  # what a GGUF load leaves behind
        return model

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", load_tokenizer)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", load_model)
    return path


def test_default_cache_dir_precedence() -> None:
    assert models.default_cache_dir({"MESHNODE_CACHE_DIR": "/a", "XDG_CACHE_HOME": "/b"}) == Path("/a")
    assert models.default_cache_dir({"XDG_CACHE_HOME": "/b"}) == Path("/b/meshnode")
    assert models.default_cache_dir({}) == Path.home() / ".cache" / "meshnode"


def test_pick_device_and_dtype() -> None:
    cpu = models.pick_device("cpu")
    assert cpu == torch.device("cpu")
    assert models.pick_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ModelError):
        models.pick_device("nonsense")
    assert models.pick_dtype("bf16", cpu) is torch.bfloat16
    assert models.pick_dtype(torch.float32, cpu) is torch.float32
    assert models.pick_dtype("auto", torch.device("mps")) is torch.float16
    assert models.pick_dtype("auto", torch.device("cuda")) is torch.bfloat16
    expected = torch.bfloat16 if models.cpu_has_native_bf16() else torch.float32
    assert models.pick_dtype("auto", cpu) is expected
    with pytest.raises(ModelError):
        models.pick_dtype("int8", cpu)


def test_conversion_is_atomic_and_cached(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    folder = models.ensure_embedded(cache, torch.bfloat16, progress=False)
    assert folder == cache / "SmolLM2-135M-Instruct" / "bfloat16"
    marker = json.loads((folder / models.MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["model_id"] == models.EMBEDDED_MODEL_ID
    assert marker["dtype"] == "bfloat16"
    assert (folder / "config.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in folder.parent.iterdir()] == ["bfloat16"]

    def must_not_convert(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a valid cache must not be converted again")

    monkeypatch.setattr(models, "convert_gguf", must_not_convert)
    assert models.ensure_embedded(cache, torch.bfloat16, progress=False) == folder


def test_interrupted_conversion_leaves_no_cache(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_save(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", fail_save)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="disk full"):
        models.ensure_embedded(cache, torch.float32, progress=False)
    assert list((cache / "SmolLM2-135M-Instruct").iterdir()) == []


def test_incomplete_cache_is_converted_again(fake_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    broken = models.embedded_cache_path(cache, torch.float32)
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}", encoding="utf-8")  # no marker, no weights
    folder = models.ensure_embedded(cache, torch.float32, progress=False)
    assert (folder / models.MARKER_FILE).is_file()
    assert any(folder.glob("*.safetensors"))


def test_resolve_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    tiny_llama().save_pretrained(folder)
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tokenizer_models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    )
    fast.save_pretrained(folder)
    loaded = models.resolve_model(str(folder), device="cpu", dtype="float32")
    assert loaded.model_id == "my-model"
    assert loaded.dtype is torch.float32
    assert loaded.eos_ids == (2,)
    assert loaded.source == folder
    assert not loaded.model.training


def test_resolve_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(str(empty), device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelError, match="offline"):
        models.resolve_model("nobody-here/no-such-model-xyz", device="cpu", offline=True)
