"""Fast CUDA engine: own decoder forward over a slot KV cache, CUDA graphs, sampling on the GPU.

:class:`CudaEngine` serves the same interface as :class:`meshnode.generation.engine.TorchEngine` (it is a
subclass and reuses its admission, streams, stop handling and delivery), but replaces the worker's
model calls with a loop built for one GPU and many concurrent streams:

* **Own forward.** :class:`SlotDecoder` runs Llama/Qwen2-style decoders (embedding, RMSNorm,
  rotary, grouped-query attention, SiLU MLP) directly from the transformers module's parameters.
  q/k/v and gate/up projections are fused into one matrix each (the module's own weights become
  views of them, so no memory is duplicated and the transformers model stays usable).
* **Slot KV cache.** One preallocated tensor ``[layers, slots, 2, kv_heads, max_len + 1, head_dim]``
  sized from the GPU's free memory; every running stream owns one slot (a row). Column
  ``max_len`` is a scratch column: idle slots "decode" there, so an idle row never touches a real
  position. Admission is by free slot (= free KV memory); a request whose prompt + max_tokens does
  not fit a slot is refused.
* **Decode step in CUDA graphs.** One graph per (batch bucket, attention-length bucket): the batch
  bucket covers slots ``0..B-1`` (B in 1, 2, 4, ... up to the slot count), the length bucket reads
  only the first ``L`` columns of the cache (L in 256, 512, ... up to ``max_len``). Slots are
  given lowest-first and compacted when the batch shrinks, so the batch bucket follows the number
  of running streams. The graph reads its inputs (token, position, sampling settings, per-row RNG
  counter) from static device buffers and advances them itself; the host rewrites them only when
  streams join or leave. Elementwise parts (norms, rotary, SiLU, the sampler) are compiled with
  ``torch.compile`` before capture when Triton is available; matmuls and attention use cuBLAS and
  SDPA.
* **Sampling on the GPU.** Greedy, temperature, top-k and top-p per row inside the graph, with one
  device-to-host copy of the new ids per step. Randomness is counter-based (a hash of the request's
  seed, its token index and the vocabulary id, used as Gumbel noise), so a seeded request draws the
  same tokens whatever else shares its batch. Top-k/top-p are evaluated over the row's best
  :data:`SAMPLING_CANDIDATES` tokens; the graph flags a row whose nucleus (or ``top_k``) does not
  fit, and that row is resampled exactly on the full vocabulary (same noise, same result).
* **Chunked prefill.** Newcomers are prefilled in batches of at most ``prefill_budget_tokens``
  (padded) tokens between two decode steps (4x that while nothing decodes), so a burst of long
  prompts delays running streams by one bounded chunk at a time. First chunks replay a prefill
  graph (one per rows x width bucket); later chunks of long prompts run eagerly.
* **Pipelined steps.** Step k+1 is launched before the ids of step k are processed, so stop
  handling, detokenizing and delivery overlap the GPU. Rows that finish at step k simply have their
  step-k+1 result ignored; a row resampled on the host is rolled back one step.

Warm-up (compilation and graph capture) runs once when the worker starts, with a progress bar;
requests queue meanwhile (:meth:`CudaEngine.wait_ready`). Inductor's on-disk caches make a second
start on the same machine several times faster. On a CPU (or without graphs) the same forward runs
eagerly: that is what the unit tests exercise; it is not meant to replace :class:`TorchEngine` on
CPUs, and :func:`meshnode.cli.commands.open_engine` selects it only for CUDA devices.

Measured on one H100 (``bench/gpu_bench.py``, ``bench/results/gpu_*.json``): Qwen2.5-0.5B shape,
611 tok/s at 1 stream (1.63 ms/step), 28.8k tok/s with 64 streams, 41.3k with 256.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from meshnode.generation.engine import (
    DEFAULT_STREAM_BUFFER_CHUNKS,
    SamplingParams,
    TokenStream,
    TorchEngine,
    _Request,
)
from meshnode.errors import AdmissionError, ModelError

__all__ = [
    "CudaEngine",
    "SlotDecoder",
    "sample_rows",
    "sample_row_exact",
    "supports_model",
]

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
"""``config.model_type`` values whose decoder layers :class:`SlotDecoder` can run."""
SAMPLING_CANDIDATES = 256
"""Best tokens per row among which top-k / top-p are applied on the GPU (see module docstring)."""
MIN_LENGTH_BUCKET = 256
"""Smallest attention-length bucket of the decode graphs, in positions."""
MIN_PREFILL_WIDTH = 16
"""Narrowest chunk-width bucket of the prefill graphs, in tokens."""
"""Smallest attention-length bucket of the decode graphs, in positions."""
DEFAULT_CUDA_PREFILL_BUDGET_TOKENS = 4096
"""Padded prompt tokens prefilled between two decode steps while streams are decoding."""
IDLE_PREFILL_FACTOR = 4
"""With no stream decoding, a prefill batch may be this many times larger (nobody is stalled)."""
KV_MEMORY_FRACTION = 0.85
"""Share of the GPU memory left after the weights and the working reserve that the KV cache may take."""
WORKING_RESERVE_BYTES = 2 << 30
"""GPU memory kept free for activations, logits and graph pools when sizing the KV cache."""

_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------
# Counter-based randomness and sampling (pure tensor functions; compiled on CUDA)
# --------------------------------------------------------------------------------------------------


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of an int64 tensor holding values < 2**32.

    Both multipliers are below 2**31, so no int64 product overflows (eager, Triton and Python
    integers then agree bit for bit).
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x6C8E9CF5) & _MASK32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """:func:`_mix32` on a Python int (bit-identical)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x6C8E9CF5) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """Fold a 64-bit request seed into the 32-bit key that the sampler hashes with."""
    return _mix32_int((seed & _MASK32) ^ _mix32_int((seed >> 32) ^ 0x5BD1E995))


def _gumbel(keys: torch.Tensor, counters: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise for each (row, vocabulary id): a pure function of key, counter and id.

    Args:
        keys: ``[B]`` int64 row keys (< 2**32, from :func:`seed_key`).
        counters: ``[B]`` int64 index of the token being sampled within its request.
        ids: ``[B, N]`` or ``[N]`` int64 vocabulary ids.

    Returns:
        ``[B, N]`` float32 noise.
    """
    # Constants stay below 2**31 and ids are never multiplied by one: inductor turns ``arange *
    # constant`` into int32 index arithmetic, where a larger literal does not compile.
    row = _mix32(keys ^ ((counters * 0x1E3779B9) & _MASK32))[:, None]
    h = _mix32(row ^ ids)
    h = _mix32(h ^ (row >> 3))
    uniform = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(uniform))


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor,
    counters: torch.Tensor,
    candidates: int = SAMPLING_CANDIDATES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row on the logits' device, each row with its own settings.

    Semantics match :func:`meshnode.generation.engine.sample_next_token` (temperature, then top-k by threshold,
    then top-p on the renormalised distribution), with counter-based Gumbel-max instead of a
    generator. Top-k/top-p are evaluated among the row's best ``candidates`` tokens; a row whose
    allowed set may extend beyond them is flagged for :func:`sample_row_exact`.

    Args:
        logits: ``[B, V]`` scores (any float dtype).
        temperature: ``[B]`` float32; ``0`` = greedy.
        top_k: ``[B]`` int64; ``0`` = off.
        top_p: ``[B]`` float32; ``>= 1`` = off.
        keys: ``[B]`` int64 row keys.
        counters: ``[B]`` int64 token index within each request.
        candidates: Candidate count (at most V).

    Returns:
        ``(ids, overflow)``: ``[B]`` int64 tokens and ``[B]`` bool rows to resample exactly.
    """
    scores = logits.float()
    greedy = temperature <= 0
    inv_t = torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature.clamp_min(1e-6))
    scaled = scores * inv_t[:, None]
    best = scaled.argmax(dim=-1)
    cand_scores, cand_ids = torch.topk(scaled, candidates, dim=-1)
    use_k = top_k > 0
    kth = cand_scores.gather(1, (top_k - 1).clamp(0, candidates - 1)[:, None])
    allowed = (cand_scores >= kth) | ~use_k[:, None]
    masked = cand_scores.masked_fill(~allowed, -math.inf)
    # Without top-k the distribution is normalised over the whole vocabulary.
    norm = torch.where(use_k, torch.logsumexp(masked, dim=-1), torch.logsumexp(scaled, dim=-1))
    probs = torch.exp(masked - norm[:, None])
    use_p = top_p < 1.0
    before = probs.cumsum(dim=-1) - probs
    allowed = allowed & ((before < top_p[:, None]) | ~use_p[:, None])
    noise = _gumbel(keys, counters, cand_ids)
    pick = torch.where(allowed, cand_scores + noise, -math.inf).argmax(dim=-1)
    from_candidates = cand_ids.gather(1, pick[:, None])[:, 0]
    vocab = torch.arange(scaled.shape[-1], device=scaled.device)
    from_vocab = (scaled + _gumbel(keys, counters, vocab)).argmax(dim=-1)
    plain = ~use_k & ~use_p
    ids = torch.where(greedy, best, torch.where(plain, from_vocab, from_candidates))
    overflow = ~greedy & (
        (top_k > candidates) | (~use_k & use_p & (probs.sum(dim=-1) < top_p))
    )
    return ids, overflow


def sample_row_exact(
    logits: torch.Tensor, params: SamplingParams, key: int, counter: int
) -> int:
    """Sample one row over the full vocabulary (the reference for :func:`sample_rows`).

    Args:
        logits: ``[V]`` scores.
        params: The request's sampling settings.
        key: The request's :func:`seed_key`.
        counter: Index of the token being sampled within the request.

    Returns:
        The token id.
    """
    scaled = logits.float()
    if params.greedy:
        return int(scaled.argmax())
    scaled = scaled / params.temperature
    device = scaled.device
    ids = torch.arange(scaled.numel(), device=device)
    allowed = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        allowed = scaled >= kth
    if params.top_p < 1.0:
        masked = scaled.masked_fill(~allowed, -math.inf)
        ordered, order = torch.sort(masked, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        keep_sorted = (probs.cumsum(dim=-1) - probs) < params.top_p
        keep = torch.zeros_like(allowed).scatter(0, order, keep_sorted)
        allowed = allowed & keep
    noise = _gumbel(
        torch.tensor([key], device=device), torch.tensor([counter], device=device), ids
    )[0]
    return int(torch.where(allowed, scaled + noise, -math.inf).argmax())


def sample_rows_exact(
    logits: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[int], counters: Sequence[int]
) -> list[int]:
    """:func:`sample_row_exact` for several rows at once (one full-vocabulary sort).

    Args:
        logits: ``[n, V]`` scores.
        params: Each row's sampling settings.
        keys: Each row's :func:`seed_key`.
        counters: Each row's token index within its request.

    Returns:
        The token ids.
    """
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else 0 for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    scaled = logits.float() / temperature[:, None]
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    use_k = top_k > 0
    kth = ordered.gather(1, (top_k - 1).clamp(0, vocab - 1)[:, None])
    allowed = (ordered >= kth) | ~use_k[:, None]
    probs = torch.softmax(ordered.masked_fill(~allowed, -math.inf), dim=-1)
    before = probs.cumsum(dim=-1) - probs
    allowed = allowed & ((before < top_p[:, None]) | (top_p >= 1.0)[:, None])
    noise = _gumbel(torch.tensor(list(keys), device=device), torch.tensor(list(counters), device=device), order)
    pick = torch.where(allowed, ordered + noise, -math.inf).argmax(dim=-1)
    tokens = order.gather(1, pick[:, None])[:, 0].tolist()
    return [
        int(scaled[i].argmax()) if p.greedy else int(tokens[i]) for i, p in enumerate(params)
    ]


# --------------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------------


def supports_model(model: Any) -> str | None:
    """Return why :class:`SlotDecoder` cannot run ``model``, or ``None`` when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return "sliding-window layers are not supported"
    if getattr(config, "use_sliding_window", False) or (
        model_type == "mistral" and getattr(config, "sliding_window", None)
    ):
        return "sliding-window attention is not supported"
    if getattr(config, "mlp_bias", False):
        return "MLP biases are not supported"
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "no rotary embedding with inv_freq"
    rope_type = getattr(rotary, "rope_type", "default")
    if "dynamic" in str(rope_type):
        return f"rope type {rope_type!r} changes with the sequence length"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama/Qwen2 compute it (float32 statistics)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm: returns ``(x + delta, norm(x + delta))``."""
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def _rope_split(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split fused q/k/v, rotate q and k.

    Args:
        qkv: ``[..., (heads + 2 kv_heads) * head_dim]``.
        cos: ``[..., 1, head_dim]`` (model dtype).
        sin: Same as ``cos``.
        heads: Query heads.
        kv_heads: Key/value heads.

    Returns:
        ``(q, kv)``: ``[..., heads, head_dim]`` and ``[..., 2, kv_heads, head_dim]``.
    """
    dim = cos.shape[-1]
    qk = qkv[..., : (heads + kv_heads) * dim].unflatten(-1, (heads + kv_heads, dim))
    v = qkv[..., (heads + kv_heads) * dim :].unflatten(-1, (kv_heads, dim))
    half = dim // 2
    rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
    qk = qk * cos + rotated * sin
    return qk[..., :heads, :], torch.stack((qk[..., heads:, :], v), dim=-3)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused ``[..., 2 * intermediate]`` projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's (fused) parameters."""

    norm_in: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    norm_mlp: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


def _fuse(modules: Sequence[Any], attribute: str) -> torch.Tensor | None:
    """Concatenate one parameter of several linear modules; repoint the modules at views of it."""
    parts = [getattr(m, attribute) for m in modules]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ModelError(f"some projections have a {attribute} and some do not")
    fused = torch.cat([p.detach() for p in parts], dim=0)
    start = 0
    for module, part in zip(modules, parts, strict=True):
        view = fused[start : start + part.shape[0]]
        setattr(module, attribute, torch.nn.Parameter(view, requires_grad=False))
        start += part.shape[0]
    return fused


class SlotDecoder:
    """A Llama/Qwen2 decoder forward over a slot KV cache, driven by a transformers model's weights.

    The model's q/k/v and gate/up weights are fused in place (its modules keep working, on views).
    Everything here runs on the model's device and dtype; the sampler is separate
    (:func:`sample_rows`).
    """

    def __init__(self, model: Any, *, slots: int, max_len: int) -> None:
        """Wrap ``model`` and allocate the KV cache.

        Args:
            model: A supported transformers causal LM (see :func:`supports_model`).
            slots: Cache rows (concurrent streams).
            max_len: Positions per row (a scratch column is added).

        Raises:
            ModelError: The model is not supported.
        """
        reason = supports_model(model)
        if reason is not None:
            raise ModelError(f"SlotDecoder cannot run this model: {reason}")
        config = model.config
        inner = model.model
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.hidden = int(config.hidden_size)
        self.eps = float(config.rms_norm_eps)
        self.slots = slots
        self.max_len = max_len
        self.scratch = max_len
        """Cache column idle rows write to (never read by a real row)."""
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.vocab = int(self.lm_head.shape[0])
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        with torch.no_grad():
            self.layers = [self._fuse_layer(layer) for layer in inner.layers]
            rotary = inner.rotary_emb
            scale = float(getattr(rotary, "attention_scaling", 1.0))
            positions = torch.arange(max_len + 1, device=self.device, dtype=torch.float32)
            freqs = positions[:, None] * rotary.inv_freq.to(self.device, torch.float32)[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            self.cos = (angles.cos() * scale).to(self.dtype)
            self.sin = (angles.sin() * scale).to(self.dtype)
        self.kv = torch.zeros(
            len(self.layers),
            slots,
            2,
            self.kv_heads,
            max_len + 1,
            self.head_dim,
            device=self.device,
            dtype=self.dtype,
        )
        """The cache: ``[layers, slots, k/v, kv_heads, max_len + 1, head_dim]``."""
        self.rows = torch.arange(slots, device=self.device)
        # Elementwise helpers; replaced by compiled versions in :meth:`compile`.
        self.norm: Callable[..., Any] = _rms_norm
        self.add_norm: Callable[..., Any] = _add_rms_norm
        self.rope: Callable[..., Any] = _rope_split
        self.silu_mul: Callable[..., Any] = _silu_mul

    @staticmethod
    def kv_bytes_per_position(model: Any) -> int:
        """KV-cache bytes one position of one row takes for ``model`` (all layers, k and v)."""
        config = model.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        element = next(model.parameters()).element_size()
        return int(config.num_hidden_layers) * 2 * kv_heads * head_dim * element

    def _fuse_layer(self, layer: Any) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = (attention.q_proj, attention.k_proj, attention.v_proj)
        return _Layer(
            norm_in=layer.input_layernorm.weight,
            qkv_weight=_fuse(qkv, "weight"),  # type: ignore[arg-type]
            qkv_bias=_fuse(qkv, "bias"),
            out_weight=attention.o_proj.weight,
            out_bias=attention.o_proj.bias,
            norm_mlp=layer.post_attention_layernorm.weight,
            gate_up_weight=_fuse((mlp.gate_proj, mlp.up_proj), "weight"),  # type: ignore[arg-type]
            down_weight=mlp.down_proj.weight,
        )

    def compile(self) -> None:
        """Use ``torch.compile``d elementwise helpers (dynamic shapes; call before capturing)."""
        options = {"dynamic": True, "fullgraph": True}
        self.norm = torch.compile(_rms_norm, **options)
        self.add_norm = torch.compile(_add_rms_norm, **options)
        self.rope = torch.compile(_rope_split, **options)
        self.silu_mul = torch.compile(_silu_mul, **options)

    # -- decode ------------------------------------------------------------------------------------

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, length: int, logits_out: torch.Tensor
    ) -> torch.Tensor:
        """One decode step for slots ``0..B-1`` (no host synchronisation; graph-capturable).

        Args:
            tokens: ``[B]`` input ids (slot ``i`` is row ``i``).
            positions: ``[B]`` where each row's token goes (``scratch`` for idle rows).
            length: Attention reads cache columns ``0..length-1`` (must exceed every real position).
            logits_out: ``[B, V]`` buffer that receives the logits.

        Returns:
            ``logits_out``.
        """
        batch = tokens.shape[0]
        rows = self.rows[:batch]
        x = F.embedding(tokens, self.embed)
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        columns = torch.arange(length, device=self.device)
        mask = (columns[None, :] <= positions[:, None])[:, None, None, :]
        group = self.heads // self.kv_heads
        h = self.norm(x, self.layers[0].norm_in, self.eps)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            q, kv = self.rope(qkv, cos, sin, self.heads, self.kv_heads)
            cache = self.kv[index]
            cache[rows, :, :, positions] = kv
            keys = cache[:batch, 0, :, :length]
            values = cache[:batch, 1, :, :length]
            # GQA without repeating the cache: a kv head's query heads act as its query "length".
            attended = F.scaled_dot_product_attention(
                q.reshape(batch, self.kv_heads, group, self.head_dim), keys, values, attn_mask=mask
            )
            out = F.linear(attended.reshape(batch, self.heads * self.head_dim), layer.out_weight, layer.out_bias)
            x, h = self.add_norm(x, out, layer.norm_mlp, self.eps)
            mlp = F.linear(self.silu_mul(F.linear(h, layer.gate_up_weight)), layer.down_weight)
            following = (
                self.layers[index + 1].norm_in if index + 1 < len(self.layers) else self.final_norm
            )
            x, h = self.add_norm(x, mlp, following, self.eps)
        torch.mm(h, self.lm_head.t(), out=logits_out)
        return logits_out

    # -- prefill -----------------------------------------------------------------------------------

    def prefill(
        self, tokens: torch.Tensor, slots: torch.Tensor, starts: Sequence[int], lengths: Sequence[int]
    ) -> torch.Tensor:
        """Run prompt chunks of several rows, write their KV, return each row's last logits.

        Args:
            tokens: ``[P, T]`` chunk ids, right-padded.
            slots: ``[P]`` cache rows.
            starts: Position of each chunk's first token (tokens before it are already cached).
            lengths: Valid tokens of each chunk (``1..T``).

        Returns:
            ``[P, V]`` logits at each chunk's last valid token.
        """
        length_t = torch.tensor(list(lengths), device=self.device)
        if not any(starts):
            out = torch.empty(tokens.shape[0], self.vocab, device=self.device, dtype=self.dtype)
            return self.prefill_fresh(tokens, slots, length_t, out)
        return self._prefill_continued(tokens, slots, starts, lengths, length_t)

    def prefill_fresh(
        self, tokens: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, logits_out: torch.Tensor
    ) -> torch.Tensor:
        """First chunks of prompts (positions from 0); no host synchronisation, graph-capturable.

        Args:
            tokens: ``[P, T]`` ids, right-padded.
            slots: ``[P]`` cache rows.
            lengths: ``[P]`` valid tokens per row; a row of length 0 is padding (it writes only
                the scratch column of its slot and its logits are garbage).
            logits_out: ``[P, V]`` buffer for the logits at each row's last valid token.

        Returns:
            ``logits_out``.
        """
        count, width = tokens.shape
        offsets = torch.arange(width, device=self.device)
        positions = torch.where(offsets[None, :] < lengths[:, None], offsets[None, :], self.scratch)
        x = F.embedding(tokens, self.embed)
        cos = self.cos[positions][:, :, None, :]
        sin = self.sin[positions][:, :, None, :]
        slot_rows = slots[:, None].expand(count, width)
        h = _rms_norm(x, self.layers[0].norm_in, self.eps)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            q, kv = _rope_split(qkv, cos, sin, self.heads, self.kv_heads)
            self.kv[index][slot_rows, :, :, positions] = kv
            # A first chunk attends to itself only: causal attention over its own keys (padding
            # sits at the end, after every real query).
            attended = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                kv[:, :, 0].transpose(1, 2),
                kv[:, :, 1].transpose(1, 2),
                is_causal=True,
                enable_gqa=True,
            )
            x, h = self._prefill_tail(index, layer, x, attended, count, width)
        last = h[torch.arange(count, device=self.device), lengths - 1]
        torch.mm(last, self.lm_head.t(), out=logits_out)
        return logits_out

    def _prefill_tail(
        self, index: int, layer: _Layer, x: torch.Tensor, attended: torch.Tensor, count: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output projection, MLP and the next norm of one prefill layer."""
        attended = attended.transpose(1, 2).reshape(count, width, self.heads * self.head_dim)
        out = F.linear(attended, layer.out_weight, layer.out_bias)
        x, h = _add_rms_norm(x, out, layer.norm_mlp, self.eps)
        mlp = F.linear(_silu_mul(F.linear(h, layer.gate_up_weight)), layer.down_weight)
        following = self.layers[index + 1].norm_in if index + 1 < len(self.layers) else self.final_norm
        return _add_rms_norm(x, mlp, following, self.eps)

    def _prefill_continued(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        starts: Sequence[int],
        lengths: Sequence[int],
        length_t: torch.Tensor,
    ) -> torch.Tensor:
        """Later chunks of long prompts: attend to the cached prefix too (eager)."""
        count, width = tokens.shape
        device = self.device
        offsets = torch.arange(width, device=device)
        start_t = torch.tensor(list(starts), device=device)
        valid = offsets[None, :] < length_t[:, None]
        positions = torch.where(valid, start_t[:, None] + offsets[None, :], self.scratch)
        x = F.embedding(tokens, self.embed)
        cos = self.cos[positions][:, :, None, :]
        sin = self.sin[positions][:, :, None, :]
        span = max(s + n for s, n in zip(starts, lengths, strict=True))
        columns = torch.arange(span, device=device)
        mask = (columns[None, None, :] <= positions[:, :, None])[:, None, :, :]
        slot_rows = slots[:, None].expand(count, width)
        h = _rms_norm(x, self.layers[0].norm_in, self.eps)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            q, kv = _rope_split(qkv, cos, sin, self.heads, self.kv_heads)
            cache = self.kv[index]
            cache[slot_rows, :, :, positions] = kv
            window = cache.narrow(3, 0, span).index_select(0, slots)
            attended = F.scaled_dot_product_attention(
                q.transpose(1, 2), window[:, 0], window[:, 1], attn_mask=mask, enable_gqa=True
            )
            x, h = self._prefill_tail(index, layer, x, attended, count, width)
        last = h[torch.arange(count, device=device), length_t - 1]
        return F.linear(last, self.lm_head)

    def move_row(self, source: int, target: int, used: int) -> None:
        """Copy the first ``used`` cached positions of row ``source`` into row ``target``."""
        self.kv[:, target, :, :, :used].copy_(self.kv[:, source, :, :, :used])


# --------------------------------------------------------------------------------------------------
# Static per-slot state read by the decode graphs
# --------------------------------------------------------------------------------------------------

_TOKEN, _POSITION, _ACTIVE, _TOP_K, _KEY, _COUNTER = range(6)
_TEMPERATURE, _TOP_P = range(2)
RESULT_BUFFERS = 3
"""Pinned host buffers for step results (one step in flight while the next is launched)."""


class _SlotState:
    """Per-slot inputs of the decode step, kept on the device.

    The graphs advance token, position and counter of active rows themselves, so the device copy
    is the truth for those; the host only writes whole rows (a stream joins, leaves, moves or is
    corrected), batched into one copy per step and ordered on the stream before the next step.
    """

    def __init__(self, slots: int, device: torch.device, scratch: int) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self.scratch = scratch
        self.idle_ints = [0, scratch, 0, 0, 0, 0]
        self.idle_floats = [0.0, 1.0]
        self.ints = torch.tensor([self.idle_ints] * slots, dtype=torch.long, device=device)
        self.floats = torch.tensor([self.idle_floats] * slots, dtype=torch.float32, device=device)
        self.result = torch.zeros(slots, 2, dtype=torch.long, device=device)
        """``[slot, (new id, overflow flag)]`` written by each step."""
        self.result_host = [
            torch.zeros(slots, 2, dtype=torch.long, pin_memory=self.pin) for _ in range(RESULT_BUFFERS)
        ]
        self.pending: dict[int, tuple[list[int], list[float]]] = {}

    def set_row(
        self, slot: int, *, token: int, position: int, params: SamplingParams, key: int, counter: int
    ) -> None:
        """Make ``slot`` an active row (applied before the next step)."""
        self.pending[slot] = (
            [token, position, 1, params.top_k, key, counter],
            [params.temperature, params.top_p],
        )

    def clear_row(self, slot: int) -> None:
        """Make ``slot`` idle: it decodes into the scratch column and samples nothing real."""
        self.pending[slot] = (list(self.idle_ints), list(self.idle_floats))

    def move_row(self, source: int, target: int) -> None:
        """Move a row's state (as the device has advanced it, or as pending) to another slot."""
        if source in self.pending:
            self.pending[target] = self.pending.pop(source)
        else:
            # A pending write for the (free) target would land after this copy: drop it.
            self.pending.pop(target, None)
            self.ints[target].copy_(self.ints[source])
            self.floats[target].copy_(self.floats[source])
        self.clear_row(source)

    def apply(self) -> None:
        """Write the pending rows to the device (stream-ordered, no host synchronisation)."""
        if not self.pending:
            return
        slots = list(self.pending)
        index = torch.tensor(slots, dtype=torch.long, pin_memory=self.pin)
        ints = torch.tensor([self.pending[s][0] for s in slots], dtype=torch.long, pin_memory=self.pin)
        floats = torch.tensor(
            [self.pending[s][1] for s in slots], dtype=torch.float32, pin_memory=self.pin
        )
        self.pending.clear()
        index = index.to(self.device, non_blocking=True)
        self.ints.index_copy_(0, index, ints.to(self.device, non_blocking=True))
        self.floats.index_copy_(0, index, floats.to(self.device, non_blocking=True))


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Running:
    """Worker-side slot bookkeeping of one admitted request."""

    request: _Request
    slot: int
    key: int
    prefilled: int = 0
    """Prompt tokens already in the cache."""
    decoding: bool = False
    released: bool = False
    valid_from: int = 0
    """First step launch whose result for this row counts (earlier ones ran on stale state)."""


@dataclass(frozen=True, eq=False)
class _Launch:
    """A decode step launched on the device and not yet processed."""

    number: int
    batch: int
    rows: list[tuple[_Running, int]]
    """``(run, slot)`` for every decoding row at launch time."""
    may_overflow: bool
    """Some row's top-k/top-p may outgrow the candidates (its logits may be needed later)."""
    result: torch.Tensor
    """Pinned host buffer the step's ids are copied into."""
    event: Any


def _buckets(limit: int, first: int) -> list[int]:
    """``first, 2*first, ...`` capped at ``limit`` (which is always the last bucket)."""
    sizes: list[int] = []
    size = first
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return sizes


def _bucket(sizes: Sequence[int], need: int) -> int:
    for size in sizes:
        if size >= need:
            return size
    raise ValueError(f"{need} exceeds the largest bucket {sizes[-1]}")


class CudaEngine(TorchEngine):
    """Continuous batching for one GPU: slot KV cache, CUDA-graph decode steps, GPU sampling.

    Same public interface as :class:`TorchEngine` (``generate``, ``encode_chat``, ``encode_text``,
    ``decode``, ``load_info``, ``start``/``close``, async context manager). ``max_concurrent`` is
    the number of cache slots (lowered to what fits the GPU's memory). See the module docstring
    for how it works.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        model_id: str = "local",
        eos_ids: Sequence[int] = (),
        max_concurrent: int = 256,
        max_queue: int = 1024,
        max_prompt_tokens: int = 4096,
        max_tokens_limit: int = 2048,
        stream_buffer_chunks: int = DEFAULT_STREAM_BUFFER_CHUNKS,
        prefill_budget_tokens: int = DEFAULT_CUDA_PREFILL_BUDGET_TOKENS,
        max_batch_tokens: int = 0,
        name: str = "cuda-engine",
        use_graphs: bool | None = None,
        use_compile: bool | None = None,
        kv_memory_bytes: int | None = None,
        progress: bool = False,
    ) -> None:
        """Wrap a loaded model; warm-up runs when the worker starts.

        Args:
            model: A supported transformers causal LM (see :func:`supports_model`), in eval mode.
            tokenizer: As for :class:`TorchEngine`.
            model_id: Public model name.
            eos_ids: Ids that always end a stream.
            max_concurrent: Cache slots wanted (fewer if the KV cache would not fit).
            max_queue: Queued requests beyond the slots before refusing.
            max_prompt_tokens: Longest accepted prompt.
            max_tokens_limit: Largest accepted ``max_tokens``.
            stream_buffer_chunks: Per-stream buffered chunks before coalescing.
            prefill_budget_tokens: Padded prompt tokens per prefill batch while streams decode.
            max_batch_tokens: As for :class:`TorchEngine` (0 = off; slots already bound memory).
            name: Worker thread name and log prefix.
            use_graphs: Capture decode steps in CUDA graphs (default: on CUDA).
            use_compile: Compile the elementwise helpers and sampler (default: on; CUDA only).
            kv_memory_bytes: KV cache size; default from the GPU's free memory (CPU: slots x
                positions as asked).
            progress: Show a progress bar during warm-up.

        Raises:
            ModelError: The model is not supported or the cache cannot hold one request.
            ValueError: A limit is not positive.
        """
        super().__init__(
            model,
            tokenizer,
            model_id=model_id,
            eos_ids=eos_ids,
            max_concurrent=max_concurrent,
            max_queue=max_queue,
            max_prompt_tokens=max_prompt_tokens,
            max_tokens_limit=max_tokens_limit,
            stream_buffer_chunks=stream_buffer_chunks,
            prefill_budget_tokens=prefill_budget_tokens,
            max_batch_tokens=max_batch_tokens,
            name=name,
        )
        reason = supports_model(model)
        if reason is not None:
            raise ModelError(f"{model_id}: {reason}")
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else use_graphs
        # Compiling for the CPU (inductor's C++ backend) costs minutes and is never needed here.
        self.use_compile = on_cuda and (True if use_compile is None else use_compile)
        self._progress = progress
        model_limit = self._max_positions or (max_prompt_tokens + max_tokens_limit)
        max_len = min(max_prompt_tokens + max_tokens_limit, model_limit)
        per_row = SlotDecoder.kv_bytes_per_position(model) * (max_len + 1)
        if kv_memory_bytes is None and on_cuda:
            free, _total = torch.cuda.mem_get_info(self.device)
            kv_memory_bytes = int(max(0, free - WORKING_RESERVE_BYTES) * KV_MEMORY_FRACTION)
        slots = max_concurrent
        if kv_memory_bytes is not None:
            slots = min(slots, kv_memory_bytes // per_row)
            if slots < 1:
                raise ModelError(
                    f"{model_id}: the KV cache does not fit even one request of {max_len} positions"
                )
        self.max_concurrent = int(slots)
        self.max_len = max_len
        """Positions per slot: every request's prompt + max_tokens must fit."""
        self._max_positions = max_len
        self.decoder = SlotDecoder(model, slots=self.max_concurrent, max_len=max_len)
        self.kv_cache_bytes = self.decoder.kv.numel() * self.decoder.kv.element_size()
        """Bytes of the preallocated KV cache."""
        self._state = _SlotState(self.max_concurrent, self.device, self.decoder.scratch)
        self._batch_buckets = _buckets(self.max_concurrent, 1)
        self._length_buckets = _buckets(max_len, min(MIN_LENGTH_BUCKET, max_len))
        self._logits = torch.empty(
            self.max_concurrent, self.decoder.vocab, device=self.device, dtype=self.decoder.dtype
        )
        self._sampler: Callable[..., Any] = sample_rows
        self._graphs: dict[tuple[int, int], Any] = {}
        # First prompt chunks run as graphs too (one per rows x width bucket): an eager prefill
        # costs milliseconds of kernel launches, which would stall every running stream.
        capacity = self._prefill_budget * IDLE_PREFILL_FACTOR
        widest = min(max_prompt_tokens, capacity)
        self._prefill_widths = _buckets(widest, min(MIN_PREFILL_WIDTH, widest))
        self._prefill_rows = _buckets(min(self.max_concurrent, max(1, capacity // self._prefill_widths[0])), 1)
        self._prefill_shapes = [
            (rows, width)
            for width in self._prefill_widths
            for rows in self._prefill_rows
            if rows * width <= capacity or rows == 1
        ]
        most_rows = self._prefill_rows[-1]
        most_tokens = max(rows * width for rows, width in self._prefill_shapes)
        self._pf_tokens = torch.zeros(most_tokens, dtype=torch.long, device=self.device)
        self._pf_slots = torch.zeros(most_rows, dtype=torch.long, device=self.device)
        self._pf_lengths = torch.zeros(most_rows, dtype=torch.long, device=self.device)
        self._pf_logits = torch.empty(most_rows, self.decoder.vocab, device=self.device, dtype=self.decoder.dtype)
        self._prefill_graphs: dict[tuple[int, int], Any] = {}
        self.ready = threading.Event()
        """Set once warm-up is over and requests are being served."""
        self.warmup_seconds: float | None = None
        """Time warm-up took (compilation and graph capture)."""
        self.warmup_breakdown: dict[str, float] = {}
        """Seconds of the warm-up's parts: first (compiling) runs of every shape, graph capture."""
        self.prefill_steps = 0
        """Prefill batches run so far."""
        self.overflow_rows = 0
        """Rows resampled on the full vocabulary because top-k/top-p outgrew the candidates."""
        # Worker-side state.
        self._running: dict[int, _Running] = {}
        """Admitted requests by slot (prefilling or decoding)."""
        self._free_slots = list(range(self.max_concurrent))
        self._newcomers: list[_Running] = []
        self._launches = 0
        self._inflight: _Launch | None = None
        self._stash = torch.empty_like(self._logits)
        """Logits of the previous step, kept when a row of it may need an exact resample."""
        self._stashed: int | None = None
        """Number of the launch whose logits are in ``_stash``."""

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None
    ) -> TokenStream:
        """Submit a request (see :meth:`TorchEngine.generate`).

        Raises:
            AdmissionError: As for :class:`TorchEngine`, and when prompt + ``max_tokens`` exceeds
                a cache slot (``field="max_tokens"``).
        """
        params = SamplingParams() if params is None else params
        if isinstance(prompt_ids, Sequence) and isinstance(params, SamplingParams):
            need = len(prompt_ids) + params.max_tokens
            if need > self.max_len:
                raise AdmissionError(
                    f"prompt + max_tokens = {need} tokens exceeds this node's {self.max_len} "
                    f"positions per stream",
                    field="max_tokens",
                )
        return super().generate(prompt_ids, params)

    async def wait_ready(self) -> float:
        """Start the worker and wait until warm-up is over; returns the warm-up seconds."""
        self.start()
        await asyncio.to_thread(self.ready.wait)
        return self.warmup_seconds or 0.0

    # -- warm-up -----------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Compile and capture the decode graphs (worker thread, before serving); returns seconds."""
        if self.ready.is_set():
            return self.warmup_seconds or 0.0
        started = time.perf_counter()
        if self.use_compile:
            try:
                self._compile()
            except Exception:
                logger.exception("%s: torch.compile failed; using eager helpers", self._name)
                self._uncompile()
        if self.use_graphs:
            try:
                self._capture_all()
            except Exception:
                if not self.use_compile:
                    raise
                logger.exception("%s: capture with compiled helpers failed; retrying eager", self._name)
                self._uncompile()
                self._graphs.clear()
                self._capture_all()
        self.warmup_seconds = time.perf_counter() - started
        logger.info(
            "%s warm: %d slots x %d positions (KV %.2f GiB), %d graphs, %.1f s",
            self._name,
            self.max_concurrent,
            self.max_len,
            self.kv_cache_bytes / 2**30,
            len(self._graphs),
            self.warmup_seconds,
        )
        self.ready.set()
        return self.warmup_seconds

    def _compile(self) -> None:
        import torch._dynamo as dynamo  # noqa: PLC0415 - only on CUDA warm-up

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
        self.decoder.compile()
        self._sampler = torch.compile(sample_rows, dynamic=True, fullgraph=True)

    def _uncompile(self) -> None:
        decoder = self.decoder
        decoder.norm, decoder.add_norm = _rms_norm, _add_rms_norm
        decoder.rope, decoder.silu_mul = _rope_split, _silu_mul
        self._sampler = sample_rows
        self.use_compile = False

    def _step_body(self, batch: int, length: int) -> None:
        """The work of one decode step over slots ``0..batch-1`` (what a graph replays)."""
        state = self._state
        ints, floats = state.ints[:batch], state.floats[:batch]
        tokens, positions = ints[:, _TOKEN], ints[:, _POSITION]
        logits = self.decoder.decode(tokens, positions, length, self._logits[:batch])
        ids, overflow = self._sampler(
            logits,
            floats[:, _TEMPERATURE],
            ints[:, _TOP_K],
            floats[:, _TOP_P],
            ints[:, _KEY],
            ints[:, _COUNTER],
            SAMPLING_CANDIDATES if SAMPLING_CANDIDATES <= self.decoder.vocab else self.decoder.vocab,
        )
        active = ints[:, _ACTIVE]
        state.result[:batch, 0].copy_(ids)
        state.result[:batch, 1].copy_(overflow)
        tokens.copy_(torch.where(active > 0, ids, tokens))
        positions.add_(active)
        ints[:, _COUNTER].add_(active)

    def _prefill_body(self, rows: int, width: int) -> None:
        """A first-chunk prefill over the static prefill buffers (what a prefill graph replays)."""
        tokens = self._pf_tokens[: rows * width].view(rows, width)
        self.decoder.prefill_fresh(
            tokens, self._pf_slots[:rows], self._pf_lengths[:rows], self._pf_logits[:rows]
        )

    def _capture_all(self) -> None:
        """Warm up every decode and prefill shape eagerly, then capture one graph per shape.

        Every slot is idle here and every prefill row is padding, so the eager warm-up runs write
        only scratch columns.
        """
        from tqdm.auto import tqdm  # noqa: PLC0415 - only on CUDA warm-up

        shapes = [(b, n) for n in self._length_buckets for b in self._batch_buckets]
        prefills = self._prefill_shapes
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        self._pf_lengths.zero_()
        self._pf_slots.zero_()
        with tqdm(
            total=2 * (len(shapes) + len(prefills)),
            desc=f"{self._name}: warm-up",
            unit="graph",
            disable=not self._progress,
        ) as bar:
            started = time.perf_counter()
            with torch.cuda.stream(side):
                for batch, length in shapes:
                    self._step_body(batch, length)  # compiles on first use of a shape
                    bar.update()
                for rows, width in prefills:
                    self._prefill_body(rows, width)
                    bar.update()
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            self.warmup_breakdown["first_runs_s"] = time.perf_counter() - started
            started = time.perf_counter()
            for batch, length in shapes:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step_body(batch, length)
                self._graphs[(batch, length)] = graph
                bar.update()
            for rows, width in prefills:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._prefill_body(rows, width)
                self._prefill_graphs[(rows, width)] = graph
                bar.update()
            self.warmup_breakdown["capture_s"] = time.perf_counter() - started
        # The warm-up steps advanced nothing real (every row idle), but reset the state to be sure.
        for slot in range(self.max_concurrent):
            self._state.clear_row(slot)
        self._state.apply()
        torch.cuda.synchronize(self.device)

    # -- worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        """Worker loop: warm up; then admit, prefill a chunk, launch a step, process the last one.

        Steps are pipelined one deep: step k+1 is launched before the ids of step k are
        processed, so the host's per-token work (stops, detokenizing, delivery) overlaps the GPU.
        """
        device_scope = (
            torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        try:
            with device_scope, torch.inference_mode():
                self.warm_up()
                while True:
                    newcomers = self._next_work()
                    if newcomers is None:
                        break
                    for request in newcomers:
                        self._assign_slot(request)
                    self._prefill_some()
                    self._flush()
                    previous, self._inflight = self._inflight, self._launch()
                    if previous is not None:
                        self._process(previous)
                    self._flush()
        finally:
            self.ready.set()  # wait_ready() returns even when warm-up failed

    def _next_work(self) -> list[_Request] | None:
        """Wait for work; return newly admitted requests (one per free slot), ``None`` when closing."""
        with self._cv:
            while True:
                if self._closing:
                    return None
                self._drop_cancelled_locked()
                newcomers: list[_Request] = []
                while self._pending and len(newcomers) < len(self._free_slots):
                    request = self._pending.popleft()
                    request.admitted = True
                    newcomers.append(request)
                self._active += len(newcomers)
                if newcomers or self._running or self._inflight is not None:
                    return newcomers
                self._cv.wait()

    def _assign_slot(self, request: _Request) -> None:
        self._free_slots.sort()
        slot = self._free_slots.pop(0)
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        run = _Running(request=request, slot=slot, key=seed_key(seed))
        self._running[slot] = run
        self._newcomers.append(run)

    def _release(self, run: _Running) -> None:
        """Free a finished request's slot (its row goes idle before the next step)."""
        if run.released:
            return
        run.released = True
        if self._running.get(run.slot) is run:
            del self._running[run.slot]
            self._free_slots.append(run.slot)
            if run.decoding:
                self._state.clear_row(run.slot)
        if run in self._newcomers:
            self._newcomers.remove(run)

    def _prefill_some(self) -> None:
        """Prefill one bounded batch of prompt chunks; newcomers whose prompt is done start decoding."""
        for run in [r for r in self._newcomers if r.request.stream.cancelled]:
            self._finish(run.request, "cancel")
            self._release(run)
        if not self._newcomers:
            return
        decoding = any(run.decoding for run in self._running.values())
        budget = self._prefill_budget * (1 if decoding else IDLE_PREFILL_FACTOR)
        chosen: list[tuple[_Running, int]] = []
        width = 0
        for run in self._newcomers:
            # Chunks are right-padded to the widest one: the budget counts padded tokens.
            size = min(len(run.request.prompt) - run.prefilled, budget)
            new_width = max(width, size)
            if chosen and new_width * (len(chosen) + 1) > budget:
                break
            chosen.append((run, size))
            width = new_width
        rows = [run for run, _ in chosen]
        tokens = torch.zeros(len(chosen), width, dtype=torch.long)
        for index, (run, size) in enumerate(chosen):
            chunk = run.request.prompt[run.prefilled : run.prefilled + size]
            tokens[index, :size] = torch.tensor(chunk, dtype=torch.long)
        done = [i for i, (run, size) in enumerate(chosen) if run.prefilled + size == len(run.request.prompt)]
        try:
            logits = self._prefill_graphed(chosen, tokens)
            if logits is None:
                logits = self.decoder.prefill(
                    tokens.to(self.device),
                    torch.tensor([run.slot for run in rows], device=self.device),
                    [run.prefilled for run in rows],
                    [size for _, size in chosen],
                )
            first = self._sample_first(logits, [rows[i] for i in done], done)
        except Exception as exc:
            logger.exception("%s prefill failed for %d requests", self._name, len(rows))
            for run in rows:
                self._finish(run.request, "error", error=f"{type(exc).__name__}: {exc}")
                self._release(run)
            return
        self.prefill_steps += 1
        for run, size in chosen:
            run.prefilled += size
        now = time.perf_counter()
        for j, index in enumerate(done):
            run = rows[index]
            request = run.request
            self._newcomers.remove(run)
            if request.stream.cancelled:
                self._finish(request, "cancel")
                self._release(run)
                continue
            request.position = len(request.prompt)
            request.stream.ttft_seconds = now - request.stream.submitted_at
            if self._advance(request, first[j]):
                self._release(run)
                continue
            run.decoding = True
            run.valid_from = self._launches + 1
            self._state.set_row(
                run.slot,
                token=first[j],
                position=request.position,
                params=request.params,
                key=run.key,
                counter=1,
            )

    def _prefill_graphed(self, chosen: list[tuple[_Running, int]], chunks: torch.Tensor) -> torch.Tensor | None:
        """Replay a prefill graph for first chunks; ``None`` when none fits (run eagerly then)."""
        width = chunks.shape[1]
        if not self._prefill_graphs or any(run.prefilled for run, _ in chosen):
            return None
        try:
            rows = _bucket(self._prefill_rows, len(chosen))
            padded = _bucket(self._prefill_widths, width)
        except ValueError:
            return None
        graph = self._prefill_graphs.get((rows, padded))
        if graph is None:
            return None
        tokens = torch.zeros(rows, padded, dtype=torch.long)
        tokens[: len(chosen), :width] = chunks
        slots = torch.zeros(rows, dtype=torch.long)
        lengths = torch.zeros(rows, dtype=torch.long)
        for index, (run, size) in enumerate(chosen):
            slots[index], lengths[index] = run.slot, size
        pin = self.device.type == "cuda"
        if pin:
            tokens, slots, lengths = tokens.pin_memory(), slots.pin_memory(), lengths.pin_memory()
        self._pf_tokens[: rows * padded].copy_(tokens.view(-1), non_blocking=True)
        self._pf_slots[:rows].copy_(slots, non_blocking=True)
        self._pf_lengths[:rows].copy_(lengths, non_blocking=True)
        graph.replay()
        return self._pf_logits[: len(chosen)]

    def _sample_first(self, logits: torch.Tensor, runs: list[_Running], rows: list[int]) -> list[int]:
        """Sample the first token of each finished prompt (token index 0 of its request)."""
        if not runs:
            return []
        device = self.device
        params = [run.request.params for run in runs]
        picked = logits.index_select(0, torch.tensor(rows, device=device))
        ids, overflow = sample_rows(
            picked,
            torch.tensor([p.temperature for p in params], device=device),
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device),
            torch.tensor([run.key for run in runs], device=device),
            torch.zeros(len(runs), dtype=torch.long, device=device),
            min(SAMPLING_CANDIDATES, self.decoder.vocab),
        )
        first = ids.tolist()
        flagged = [j for j, flag in enumerate(overflow.tolist()) if flag]
        if flagged:
            self.overflow_rows += len(flagged)
            exact = sample_rows_exact(
                picked.index_select(0, torch.tensor(flagged, device=device)),
                [params[j] for j in flagged],
                [runs[j].key for j in flagged],
                [0] * len(flagged),
            )
            for j, token in zip(flagged, exact, strict=True):
                first[j] = token
        return [int(token) for token in first]

    def _compact(self) -> None:
        """Move decoding rows from the top slots into free lower ones when that shrinks the batch."""
        decoding = [slot for slot, run in self._running.items() if run.decoding]
        if not decoding:
            return
        top = max(decoding) + 1
        if _bucket(self._batch_buckets, top) <= _bucket(self._batch_buckets, len(decoding)):
            return
        self._free_slots.sort()
        for slot in sorted(decoding, reverse=True):
            if not self._free_slots or self._free_slots[0] > slot:
                break
            run = self._running[slot]
            target = self._free_slots.pop(0)
            # Positions up to request.position (inclusive) may be written once the step in flight
            # has run; the copy is ordered after it on the stream.
            self.decoder.move_row(slot, target, min(run.request.position + 1, self.max_len))
            self._state.move_row(slot, target)
            del self._running[slot]
            run.slot = target
            self._running[target] = run
            self._free_slots.append(slot)
            self._free_slots.sort()

    def _launch(self) -> _Launch | None:
        """Apply row changes and launch one decode step for every decoding row (no waiting)."""
        for run in [r for r in self._running.values() if r.decoding and r.request.stream.cancelled]:
            self._finish(run.request, "cancel")
            self._release(run)
        self._compact()
        state = self._state
        decoding = [run for run in self._running.values() if run.decoding]
        try:
            state.apply()
            if not decoding:
                return None
            batch = _bucket(self._batch_buckets, max(run.slot for run in decoding) + 1)
            # A row may be one step further on the device than here (the step in flight).
            need = min(max(run.request.position for run in decoding) + 2, self.max_len)
            length = _bucket(self._length_buckets, need)
            previous = self._inflight
            if previous is not None and previous.may_overflow:
                # The step about to run overwrites the logits an exact resample of the previous
                # step would need: keep them (one copy, only while such rows are running).
                self._stash[: previous.batch].copy_(self._logits[: previous.batch])
                self._stashed = previous.number
            graph = self._graphs.get((batch, length))
            if graph is not None:
                graph.replay()
            else:
                self._step_body(batch, length)
            self._launches += 1
            result = state.result_host[self._launches % RESULT_BUFFERS]
            result[:batch].copy_(state.result[:batch], non_blocking=True)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
        except Exception as exc:
            logger.exception("%s decode step failed for %d rows", self._name, len(decoding))
            for run in decoding:
                self._finish(run.request, "error", error=f"{type(exc).__name__}: {exc}")
                self._release(run)
            return None
        self.steps += 1
        candidates = SAMPLING_CANDIDATES
        may_overflow = any(
            not run.request.params.greedy
            and (
                run.request.params.top_k > candidates
                or (run.request.params.top_p < 1 and run.request.params.top_k == 0)
            )
            for run in decoding
        )
        return _Launch(
            self._launches, batch, [(run, run.slot) for run in decoding], may_overflow, result, event
        )

    def _process(self, launch: _Launch) -> None:
        """Wait for a launched step and hand its ids to the streams."""
        if launch.event is not None:
            launch.event.synchronize()
        results = launch.result.tolist()
        state = self._state
        rows = [
            (run, slot)
            for run, slot in launch.rows
            # Skip rows finished meanwhile, or whose step ran on state corrected since.
            if not run.released and launch.number >= run.valid_from
        ]
        overflowing = [(run, slot) for run, slot in rows if results[slot][1]]
        resampled: dict[int, int] = {}
        if overflowing:
            try:
                tokens = self._resample(overflowing, launch)
            except Exception:
                logger.exception("%s exact resampling failed", self._name)
                tokens = [results[slot][0] for _, slot in overflowing]  # keep the candidate picks
            resampled = {slot: token for (_, slot), token in zip(overflowing, tokens, strict=True)}
            self.overflow_rows += len(overflowing)
        for run, slot in rows:
            request = run.request
            token = resampled.get(slot, results[slot][0])
            overflow = slot in resampled
            request.position += 1
            if request.stream.cancelled:
                self._finish(request, "cancel")
                self._release(run)
                continue
            try:
                finished = self._advance(request, token)
                if overflow and not finished:
                    # The step in flight fed the candidate pick back: roll the row back to here.
                    state.set_row(
                        run.slot,
                        token=token,
                        position=request.position,
                        params=request.params,
                        key=run.key,
                        counter=len(request.generated),
                    )
                    run.valid_from = self._launches + 1
            except Exception as exc:
                logger.exception("request %d failed", request.stream.request_id)
                self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
                finished = True
            if finished:
                self._release(run)

    def _resample(self, rows: list[tuple[_Running, int]], launch: _Launch) -> list[int]:
        """Exact full-vocabulary samples for rows whose nucleus outgrew the candidates.

        The logits buffer holds the newest launched step; when a newer step was launched since,
        they were stashed before it ran (or, should that not be so, they are recomputed from the
        rows' cached state with eager steps).
        """
        slots = torch.tensor([slot for _, slot in rows], device=self.device)
        if self._inflight is None or self._inflight.number == launch.number:
            logits = self._logits.index_select(0, slots)
        elif self._stashed == launch.number:
            logits = self._stash.index_select(0, slots)
        else:
            logits = torch.stack(
                [self._row_logits(run.slot, run.request.next_token, run.request.position) for run, _ in rows]
            )
        return sample_rows_exact(
            logits,
            [run.request.params for run, _ in rows],
            [run.key for run, _ in rows],
            [len(run.request.generated) for run, _ in rows],
        )

    def _row_logits(self, slot: int, token: int, position: int) -> torch.Tensor:
        """Logits of one row's token at ``position`` via a one-row prefill (eager)."""
        return self.decoder.prefill(
            torch.tensor([[token]], device=self.device),
            torch.tensor([slot], device=self.device),
            [position],
            [1],
        )[0]

    def _abort_all(self, reason: Any, error: str | None) -> None:
        """Finish every admitted and queued request (worker exit)."""
        for run in list(self._running.values()):
            self._finish(run.request, reason, error=error)
            run.released = True
        self._running.clear()
        self._newcomers.clear()
        self._inflight = None
        self._free_slots = list(range(self.max_concurrent))
        super()._abort_all(reason, error)
