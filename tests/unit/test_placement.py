"""[model] device_map / max_memory: parsing, planning (refusals name the sizes), loading and serving.

On the CPU a map can only use the CPU, so these tests check the settings and the factory's wiring,
the plan and its refusals, and that a placed model serves the same greedy ids as one loaded
normally. The tests marked ``needs_cuda`` split a tiny model between GPU 0 and the CPU (and between
two GPUs when there are two): the torch engine's continuous batching with each layer's KV cache on
its own device. They are plain functions (``asyncio.run``) so they also run on the lent GPU
machine, where pytest-asyncio is not installed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from meshnode.cli.config import load_settings
from meshnode.cli.main import _flags, build_parser
from meshnode.errors import ConfigError, ModelError
from meshnode.generation import factory, models
from meshnode.generation.api import SamplingParams
from meshnode.generation.placement import Placement, format_bytes, parse_max_memory, plan_device_map
from meshnode.generation.torch_backend import TorchEngine
from meshnode.settings import EngineSettings
from tests.cudakit import (
    needs_cuda,
    one_torch_thread,  # noqa: F401 - autouse fixture: one torch thread
    run,
)

GIB = 2**30
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def tiny_config() -> LlamaConfig:
    # Varied greedy output (initializer_range 0.2); six layers much bigger than the embeddings, so a
    # budget can split them (accelerate keeps room for the biggest layer on the main GPU).
    return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       initializer_range=0.2, max_position_embeddings=512, eos_token_id=2)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama with a word-level tokenizer, loadable by resolve_model."""
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("placed") / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(folder)
    vocab = {"<unk>": 0, "a": 1}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
                            ).save_pretrained(folder)
    return folder


def weight_bytes() -> int:
    return sum(p.numel() * 4 for p in LlamaForCausalLM(tiny_config()).parameters())


def prompt(index: int) -> list[int]:
    return [(index * 7919 + j * 104729) % 400 + 50 for j in range(3 + 2 * index)]


async def greedy_batch(loaded: models.LoadedModel, count: int = 6) -> list[list[int]]:
    """Staggered joins and different lengths: rows join and leave a running batch."""
    async with TorchEngine.from_loaded(loaded, max_concurrent=8, max_queue=8) as engine:
        streams = []
        firsts: list[list[int]] = []
        for i in range(count):
            streams.append(engine.generate(prompt(i), SamplingParams(temperature=0.0, max_tokens=8 + 3 * i)))
            firsts.append((await anext(streams[-1])).ids if i % 2 else [])
        rest = await asyncio.gather(*(s.collect() for s in streams))
    return [f + r for f, r in zip(firsts, rest, strict=True)]


# -- max_memory ----------------------------------------------------------------------------------


def test_parse_max_memory() -> None:
    assert parse_max_memory("0=20GiB,cpu=64GiB") == {0: 20 * GIB, "cpu": 64 * GIB}
    assert parse_max_memory(" 1 = 1.5 GB , mps=512MiB ") == {1: 1_500_000_000, "mps": 512 * 2**20}
    assert parse_max_memory("cpu=1024") == {"cpu": 1024}
    assert parse_max_memory("") == {}
    for bad, why in [("cpu", "DEVICE=SIZE"), ("gpu0=1GiB", "GPU index"), ("disk=10GiB", "never offloads"),
                     ("cpu=1GiB,cpu=2GiB", "twice"), ("0=lots", "number with"), ("0=0GiB", "positive"),
                     ("0=1kb", "number with")]:
        with pytest.raises(ValueError, match=why):
            parse_max_memory(bad)
    assert format_bytes(1.5 * GIB) == "1.50 GiB" and format_bytes(300) == "300 B"


# -- settings, flags and the factory ---------------------------------------------------------------


def test_settings_flags_and_env() -> None:
    args = build_parser().parse_args(["serve-http", "--device-map", "auto", "--max-memory", "0=20GiB,cpu=64GiB"])
    settings, sources = load_settings(None, env={}, flags=_flags(args))
    assert (settings.model.device_map, settings.model.max_memory) == ("auto", "0=20GiB,cpu=64GiB")
    assert sources[("model", "device_map")] == "flag"
    settings, sources = load_settings(None, env={"MESHNODE_MODEL__DEVICE_MAP": "sequential",
                                                 "MESHNODE_MODEL__MAX_MEMORY": "cpu=8GiB"})
    assert settings.model.device_map == "sequential" and sources[("model", "max_memory")].startswith("env")
    for generate in (["generate", "hi"], ["join"]):
        assert _flags(build_parser().parse_args([*generate, "--device-map", "balanced"]))[("model", "device_map")]


@pytest.mark.parametrize(("values", "why"), [
    ({("model", "device_map"): "everywhere"}, "model.device_map .*must be one of auto"),
    ({("model", "device_map"): "auto", ("model", "max_memory"): "cpu=much"}, "model.max_memory .*number with"),
    ({("model", "max_memory"): "cpu=1GiB"}, "needs model.device_map"),
    ({("model", "device_map"): "auto", ("model", "device"): "cuda:1"}, "model.device .*must stay auto"),
    ({("model", "device_map"): "auto", ("engine", "upstreams"): ["http://127.0.0.1:9"]},
     "model.device_map .*engine.upstreams replace"),
])
def test_settings_errors(values: dict[tuple[str, str], Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_settings(None, env={}, flags=values)


def test_a_device_map_picks_the_torch_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the CUDA-graph engine serves a model on one GPU; with a device map, the torch engine."""
    from meshnode.generation.cuda import backend as cuda_backend
    from meshnode.generation.cuda import decoder

    built: list[str] = []
    monkeypatch.setattr(TorchEngine, "from_loaded", classmethod(lambda cls, loaded, **kw: built.append("torch")))
    monkeypatch.setattr(cuda_backend.CudaEngine, "from_loaded", classmethod(lambda cls, loaded, **kw: built.append("cuda")))
    monkeypatch.setattr(decoder, "supports_model", lambda model: None)
    one_gpu = SimpleNamespace(device=torch.device("cuda", 0), device_map=None, model=object())
    spread = SimpleNamespace(device=torch.device("cuda", 0), device_map={"model.layers.0": 0, "model.layers.1": 1},
                             model=object())
    factory.build_engine(one_gpu, EngineSettings(), progress=False)
    factory.build_engine(spread, EngineSettings(), progress=False)
    assert built == ["cuda", "torch"]


def test_open_backend_loads_the_placed_model(model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[model] device_map / max_memory reach resolve_model as a Placement; the torch engine serves."""
    from meshnode.settings import ModelSettings

    loads: list[models.LoadedModel] = []
    resolve = models.resolve_model
    monkeypatch.setattr(models, "resolve_model", lambda *a, **kw: loads.append(resolve(*a, **kw)) or loads[-1])

    async def main() -> list[int]:
        settings = ModelSettings(model=str(model_folder), dtype="float32", device_map="auto", max_memory="cpu=1GiB")
        async with factory.open_backend(settings, EngineSettings(max_concurrent=2), progress=False) as backend:
            engine = backend.engine  # type: ignore[attr-defined]
            assert isinstance(engine, TorchEngine)
            return await engine.generate(prompt(1), SamplingParams(temperature=0.0, max_tokens=6)).collect()

    assert len(run(main())) == 6
    assert [loaded.device_map for loaded in loads] == [{"": "cpu"}]


# -- planning and loading ------------------------------------------------------------------------


def test_plan_fits_on_the_cpu() -> None:
    plan = plan_device_map(tiny_config(), torch.float32, Placement(device_map="auto", max_memory={"cpu": GIB}),
                           model_id="tiny")
    assert set(plan.values()) == {"cpu"}


def test_plan_refuses_disk_offload_and_names_the_sizes() -> None:
    total = weight_bytes()
    budget = {"cpu": total // 3}
    with pytest.raises(ModelError) as failed:
        plan_device_map(tiny_config(), torch.float32, Placement(device_map="sequential", max_memory=budget),
                        model_id="tiny")
    message = str(failed.value)
    assert "tiny does not fit" in message and "disk" in message, message
    assert format_bytes(total) in message and f"cpu={format_bytes(total // 3)}" in message, message
    assert "float32" in message and "--max-memory" in message, message


def test_plan_refuses_a_gpu_that_is_not_there() -> None:
    absent = torch.cuda.device_count()
    with pytest.raises(ModelError, match=f"names GPU {absent}, but this machine has {absent}"):
        plan_device_map(tiny_config(), torch.float32, Placement(device_map="auto", max_memory={absent: GIB}),
                        model_id="tiny")


def test_resolve_model_with_a_device_map_serves_the_same_ids(model_folder: Path) -> None:
    plain = models.resolve_model(str(model_folder), device="cpu", dtype="float32")
    placed = models.resolve_model(str(model_folder), dtype="float32",
                                  placement=Placement(device_map="auto", max_memory={"cpu": GIB}))
    assert plain.device_map is None and placed.device_map == {"": "cpu"}
    assert placed.device == torch.device("cpu") and not placed.model.training
    assert run(greedy_batch(placed)) == run(greedy_batch(plain))


def test_resolve_model_placement_errors(model_folder: Path, tmp_path: Path) -> None:
    placement = Placement(device_map="auto")
    with pytest.raises(ModelError, match="leave the device at auto"):
        models.resolve_model(str(model_folder), device="cpu", placement=placement)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="not a .gguf file"):
        models.resolve_model(str(gguf), placement=placement)
    with pytest.raises(ModelError, match="does not fit"):
        models.resolve_model(str(model_folder), dtype="float32",
                             placement=Placement(device_map="auto", max_memory={"cpu": 4096}))


# -- across devices (CUDA) -----------------------------------------------------------------------


def _split(model_folder: Path, budget: dict[int | str, int], device_map: str) -> models.LoadedModel:
    return models.resolve_model(str(model_folder), dtype="float32",
                                placement=Placement(device_map=device_map, max_memory=budget))


@needs_cuda
def test_gpu_and_cpu_split_serves_the_ids_of_one_gpu(model_folder: Path) -> None:
    """Part of the layers on GPU 0, the rest offloaded to the CPU (run on GPU 0, weights copied in)."""
    whole = models.resolve_model(str(model_folder), device="cuda", dtype="float32")
    split = _split(model_folder, {0: weight_bytes() * 6 // 10, "cpu": GIB}, "sequential")
    assert split.device_map is not None and set(split.device_map.values()) == {0, "cpu"}, split.device_map
    assert split.device == torch.device("cuda", 0)
    assert run(greedy_batch(split)) == run(greedy_batch(whole))


@needs_two_gpus
def test_two_gpus_serve_the_ids_of_one(model_folder: Path) -> None:
    whole = models.resolve_model(str(model_folder), device="cuda", dtype="float32")
    split = _split(model_folder, {0: weight_bytes() * 6 // 10, 1: GIB}, "sequential")
    assert split.device_map is not None and set(split.device_map.values()) == {0, 1}, split.device_map
    assert run(greedy_batch(split)) == run(greedy_batch(whole))
