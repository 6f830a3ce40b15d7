"""Model shapes of the GPU benchmark (random-initialised, no downloads) and the measured roofline.

The configs are written here from the published model cards' ``config.json`` values, so the GPU
machine (no network) builds each model directly on the device in bf16.
"""

from __future__ import annotations

import statistics
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "qwen0.5b": {  # Qwen/Qwen2.5-0.5B
        "family": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "llama3-8b": {  # meta-llama/Meta-Llama-3-8B
        "family": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "qwen2.5-7b": {  # Qwen/Qwen2.5-7B
        "family": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {  # HuggingFaceTB/SmolLM2-135M
        "family": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "tiny": {  # a CPU dry run of the script (--device cpu --models tiny)
        "family": "llama", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
}
MODELS["qwen7b"] = MODELS["qwen2.5-7b"]  # the name of the previous round's results


def build_model(name: str, device: str, seed: int = 0) -> Any:
    """A random-initialised bf16 model of the named shape, built directly on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(MODELS[name])
    family = spec.pop("family")
    theta = spec.pop("rope_theta")
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    try:
        config = config_cls(**spec, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        config = config_cls(**spec, rope_theta=theta)
    config.eos_token_id = None
    config.bos_token_id = None
    config.pad_token_id = 0
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weight_bytes(model: Any) -> int:
    """Bytes of the model's distinct parameters (a tied embedding counts once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    return total


def measure_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 20 copies of 2 GiB."""
    import torch

    if device != "cuda":
        return 50e9
    source = torch.randn(512 * 2**20, device="cuda", dtype=torch.float32)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del source, target
    torch.cuda.empty_cache()
    return 2 * 512 * 2**20 * 4 / statistics.median(times)


def roofline(weights: int, bandwidth: float) -> dict[str, float]:
    """Batch-1 decode floor: every step reads every weight once."""
    return {"step_floor_ms": 1000 * weights / bandwidth, "batch1_tok_s": bandwidth / weights,
            "batch1_tok_s_datasheet_4.8TBps": 4.8e12 / weights}
