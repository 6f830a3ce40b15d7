"""SlotDecoder: a Llama/Qwen2-style decoder forward over a preallocated slot KV cache.

It runs decoders (embedding, RMSNorm, rotary, grouped-query attention, SiLU MLP) directly from the
transformers module's parameters. q/k/v and gate/up projections are fused into one matrix each
(the module's own weights become views of them, so no memory is duplicated and the transformers
model stays usable). The cache is one tensor ``[layers, slots, 2, kv_heads, max_len + 1, head_dim]``;
column ``max_len`` is a scratch column where idle slots "decode", so an idle row never touches a
real position. Three forwards share the weights: :meth:`SlotDecoder.decode` (one token per slot),
:meth:`SlotDecoder.prefill_fresh` (first prompt chunks, attending to themselves) and
:meth:`SlotDecoder.prefill_cached` (chunks after cached positions: a reused prefix, a long prompt's
later chunks); all three are free of host synchronisation, so they can be captured in CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from meshnode.errors import ModelError
from meshnode.generation.cpumemory import lazy_zeros, trim_heap
from meshnode.generation.cuda.hostcopy import to_device

__all__ = ["SUPPORTED_MODEL_TYPES", "SlotDecoder", "supports_model"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
"""``config.model_type`` values whose decoder layers :class:`SlotDecoder` can run."""


def supports_model(model: Any) -> str | None:
    """Return why :class:`SlotDecoder` cannot run ``model``, or ``None`` when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":
        return f"activation {activation!r} is not silu"
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
    qk = qkv[..., : (heads + kv_heads) * dim].reshape(*qkv.shape[:-1], heads + kv_heads, dim)
    v = qkv[..., (heads + kv_heads) * dim :].reshape(*qkv.shape[:-1], kv_heads, dim)
    half = dim // 2
    rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
    qk = qk * cos + rotated * sin
    return qk[..., :heads, :], torch.stack((qk[..., heads:, :], v), dim=-3)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused ``[..., 2 * intermediate]`` projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible``, -inf elsewhere, in the attention's dtype."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's (fused) parameters; the projections are tensors, or fp16-packed
    weights (see :meth:`SlotDecoder.pack_fp16`) whose bias is packed with them."""

    norm_in: torch.Tensor
    qkv_weight: Any
    qkv_bias: torch.Tensor | None
    out_weight: Any
    out_bias: torch.Tensor | None
    norm_mlp: torch.Tensor
    gate_up_weight: Any
    down_weight: Any


def _linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``: a dense tensor, or fbgemm fp16-packed weights (bias inside)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return torch.ops.quantized.linear_dynamic_fp16(x, weight)  # type: ignore[no-any-return]


def fp16_packing_available(device: torch.device) -> bool:
    """fbgemm's fp16-weight GEMM exists here (x86 CPU builds of torch)."""
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


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


_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _check_packable(model: Any) -> None:
    device = next(model.parameters()).device
    if not fp16_packing_available(device) or next(model.parameters()).dtype != torch.float32:
        raise ModelError("fp16 packed weights need a float32 model on an x86 CPU (fbgemm)")


def _projection_bytes(module: Any) -> int:
    """fp32 bytes of one decoder layer's projections (0 once they were emptied by packing)."""
    return sum(p.numel() * p.element_size() for name in _PROJECTIONS
               for p in module.get_submodule(name).parameters(recurse=False))


def _pack_layer(layer: _Layer, module: Any) -> _Layer:
    """``layer`` with fbgemm fp16-packed projections; ``module``'s fp32 projections are emptied
    (their memory is freed once ``layer``, the last holder of the fused copies, is dropped)."""
    pack = torch.ops.quantized.linear_prepack_fp16
    packed = _Layer(norm_in=layer.norm_in, qkv_weight=pack(layer.qkv_weight, layer.qkv_bias), qkv_bias=None,
                    out_weight=pack(layer.out_weight, layer.out_bias), out_bias=None, norm_mlp=layer.norm_mlp,
                    gate_up_weight=pack(layer.gate_up_weight, None), down_weight=pack(layer.down_weight, None))
    for name in _PROJECTIONS:
        linear = module.get_submodule(name)
        linear.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    return packed


def _leave_file_mappings(model: Any) -> None:
    """Copy the weights that stay in use (embeddings, norms) into the process's own memory.

    A model loaded from safetensors keeps its tensors in a mapping of the file, which lives as long
    as any of them does: every page that packing read stays resident (SmolLM2-135M: 0.5 GB) while
    only the small leftovers are used. Copying those drops the last reference to the mapping.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.numel():
            tensor.data = tensor.data.clone()


class SlotDecoder:
    """A Llama/Qwen2 decoder forward over a slot KV cache, driven by a transformers model's weights.

    The model's q/k/v and gate/up weights are fused in place (its modules keep working, on views).
    Everything here runs on the model's device and dtype; the sampler is separate
    (:func:`sample_rows`).
    """

    def __init__(self, model: Any, *, slots: int, max_len: int, fp16_weights: bool = False) -> None:
        """Wrap ``model`` and allocate the KV cache.

        Args:
            model: A supported transformers causal LM (see :func:`supports_model`).
            slots: Cache rows (concurrent streams).
            max_len: Positions per row (a scratch column is added).
            fp16_weights: Pack each layer as it is fused (see :meth:`pack_fp16`): the fp32 fused
                copies never pile up, which keeps a CPU node's peak memory down.

        Raises:
            ModelError: The model is not supported, or ``fp16_weights`` cannot be packed here.
        """
        reason = supports_model(model)
        if reason is not None:
            raise ModelError(f"SlotDecoder cannot run this model: {reason}")
        if fp16_weights:
            _check_packable(model)
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
        self.head: Any = self.lm_head
        """What the logits are computed with: ``lm_head``, or its fp16-packed copy."""
        self.vocab = int(self.lm_head.shape[0])
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        with torch.no_grad():
            self.layers: list[_Layer] = []
            freed = 0
            for module in inner.layers:
                fused = self._fuse_layer(module)
                if fp16_weights:
                    freed += _projection_bytes(module)
                    fused = _pack_layer(fused, module)
                self.layers.append(fused)
                del fused
            rotary = inner.rotary_emb
            scale = float(getattr(rotary, "attention_scaling", 1.0))
            positions = torch.arange(max_len + 1, device=self.device, dtype=torch.float32)
            freqs = positions[:, None] * rotary.inv_freq.to(self.device, torch.float32)[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            self.cos = (angles.cos() * scale).to(self.dtype)
            self.sin = (angles.sin() * scale).to(self.dtype)
        self.kv = lazy_zeros(
            (len(self.layers), slots, 2, self.kv_heads, max_len + 1, self.head_dim), self.dtype, self.device)
        """The cache: ``[layers, slots, k/v, kv_heads, max_len + 1, head_dim]``."""
        self.rows = torch.arange(slots, device=self.device)
        # Elementwise helpers; replaced by compiled versions in :meth:`compile`.
        self.norm: Callable[..., Any] = _rms_norm
        self.add_norm: Callable[..., Any] = _add_rms_norm
        self.rope: Callable[..., Any] = _rope_split
        self.silu_mul: Callable[..., Any] = _silu_mul
        self.freed_bytes = freed + (self.pack_fp16(model) if fp16_weights else 0)
        """fp32 projection bytes freed by packing (0 when the weights are not packed)."""

    @staticmethod
    def kv_bytes_per_position(model: Any) -> int:
        """KV-cache bytes one position of one row takes for ``model`` (all layers, k and v)."""
        config = model.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        element = int(next(model.parameters()).element_size())
        return int(config.num_hidden_layers) * 2 * kv_heads * head_dim * element

    def _fuse_layer(self, layer: Any) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = (attention.q_proj, attention.k_proj, attention.v_proj)
        return _Layer(
            norm_in=layer.input_layernorm.weight,
            qkv_weight=_fuse(qkv, "weight"),
            qkv_bias=_fuse(qkv, "bias"),
            out_weight=attention.o_proj.weight,
            out_bias=attention.o_proj.bias,
            norm_mlp=layer.post_attention_layernorm.weight,
            gate_up_weight=_fuse((mlp.gate_proj, mlp.up_proj), "weight"),
            down_weight=mlp.down_proj.weight,
        )

    def compile(self) -> None:
        """Use ``torch.compile``d elementwise helpers (dynamic shapes; call before capturing)."""
        self.norm = torch.compile(_rms_norm, dynamic=True, fullgraph=True)
        self.add_norm = torch.compile(_add_rms_norm, dynamic=True, fullgraph=True)
        self.rope = torch.compile(_rope_split, dynamic=True, fullgraph=True)
        self.silu_mul = torch.compile(_silu_mul, dynamic=True, fullgraph=True)

    def uncompile(self) -> None:
        """Back to the eager elementwise helpers."""
        self.norm, self.add_norm, self.rope, self.silu_mul = _rms_norm, _add_rms_norm, _rope_split, _silu_mul

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
        # One additive mask for every layer (SDPA would convert a boolean one in each call).
        columns = torch.arange(length, device=self.device)
        mask = _additive_mask(columns[None, :] <= positions[:, None], self.dtype)[:, None, None, :]
        group = self.heads // self.kv_heads
        h = self.norm(x, self.layers[0].norm_in, self.eps)
        for index, layer in enumerate(self.layers):
            qkv = _linear(h, layer.qkv_weight, layer.qkv_bias)
            q, kv = self.rope(qkv, cos, sin, self.heads, self.kv_heads)
            cache = self.kv[index]
            cache[rows, :, :, positions] = kv
            keys = cache[:batch, 0, :, :length]
            values = cache[:batch, 1, :, :length]
            # GQA without repeating the cache: a kv head's query heads act as its query "length".
            attended = F.scaled_dot_product_attention(
                q.reshape(batch, self.kv_heads, group, self.head_dim), keys, values, attn_mask=mask
            )
            out = _linear(attended.reshape(batch, self.heads * self.head_dim), layer.out_weight, layer.out_bias)
            x, h = self.add_norm(x, out, layer.norm_mlp, self.eps)
            mlp = _linear(self.silu_mul(_linear(h, layer.gate_up_weight)), layer.down_weight)
            following = (
                self.layers[index + 1].norm_in if index + 1 < len(self.layers) else self.final_norm
            )
            x, h = self.add_norm(x, mlp, following, self.eps)
        self._logits(h, logits_out)
        return logits_out

    def _logits(self, h: torch.Tensor, out: torch.Tensor) -> None:
        if isinstance(self.head, torch.Tensor):
            torch.mm(h, self.head.t(), out=out)
        else:
            out.copy_(_linear(h, self.head))

    def pack_fp16(self, model: Any) -> int:
        """Keep the projections and the head as fp16 weights packed for fbgemm (CPU only).

        On a CPU the decode step streams every weight from memory once per token: half the bytes
        of fp32 is about twice the speed, and fbgemm's fp16 GEMM accumulates in fp32 (greedy
        output stays close to fp32; bench/results/README.md has the measured agreement). The model's own
        projection weights are emptied, so their fp32 copies are freed: after this only the
        decoder can run the model. Layers packed at construction (``fp16_weights=True``) stay as
        they are. Returns the fp32 bytes freed.
        """
        _check_packable(model)
        freed = 0
        with torch.no_grad():
            for index, module in enumerate(model.model.layers):
                if isinstance(self.layers[index].down_weight, torch.Tensor):
                    freed += _projection_bytes(module)
                    self.layers[index] = _pack_layer(self.layers[index], module)
            if isinstance(self.head, torch.Tensor):
                self.head = torch.ops.quantized.linear_prepack_fp16(self.lm_head, None)
            _leave_file_mappings(model)
        trim_heap()  # the freed fp32 weights leave the process instead of staying in malloc's heap
        return freed

    # -- prefill -----------------------------------------------------------------------------------

    def prefill(
        self, tokens: torch.Tensor, slots: torch.Tensor, starts: Sequence[int], lengths: Sequence[int]
    ) -> torch.Tensor:
        """Run prompt chunks of several rows, write their KV, return each row's last logits (eager).

        Args:
            tokens: ``[P, T]`` chunk ids, right-padded.
            slots: ``[P]`` cache rows.
            starts: Position of each chunk's first token (tokens before it are already cached).
            lengths: Valid tokens of each chunk (``1..T``).

        Returns:
            ``[P, V]`` logits at each chunk's last valid token.
        """
        length_t = to_device(list(lengths), self.device)
        out = torch.empty(tokens.shape[0], self.vocab, device=self.device, dtype=self.dtype)
        if not any(starts):
            return self.prefill_fresh(tokens, slots, length_t, out)
        span = max(s + n for s, n in zip(starts, lengths, strict=True))
        return self.prefill_cached(tokens, slots, to_device(list(starts), self.device), length_t, span, out)

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
            qkv = _linear(h, layer.qkv_weight, layer.qkv_bias)
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
        self._logits(last, logits_out)
        return logits_out

    def _prefill_tail(
        self, index: int, layer: _Layer, x: torch.Tensor, attended: torch.Tensor, count: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output projection, MLP and the next norm of one prefill layer."""
        attended = attended.transpose(1, 2).reshape(count, width, self.heads * self.head_dim)
        out = _linear(attended, layer.out_weight, layer.out_bias)
        x, h = _add_rms_norm(x, out, layer.norm_mlp, self.eps)
        mlp = _linear(_silu_mul(_linear(h, layer.gate_up_weight)), layer.down_weight)
        following = self.layers[index + 1].norm_in if index + 1 < len(self.layers) else self.final_norm
        return _add_rms_norm(x, mlp, following, self.eps)

    def prefill_cached(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        starts: torch.Tensor,
        lengths: torch.Tensor,
        span: int,
        logits_out: torch.Tensor,
    ) -> torch.Tensor:
        """Chunks that continue cached positions (a reused prefix, a long prompt's later chunks);
        no host synchronisation, graph-capturable.

        Args:
            tokens: ``[P, T]`` ids, right-padded.
            slots: ``[P]`` cache rows.
            starts: ``[P]`` position of each chunk's first token (positions before it are cached).
            lengths: ``[P]`` valid tokens per row; 0 = a padding row (writes its slot's scratch
                column only; its logits are garbage).
            span: Attention reads cache columns ``0..span-1``; at least every ``start + length``.
            logits_out: ``[P, V]`` buffer for the logits at each row's last valid token.

        Returns:
            ``logits_out``.
        """
        count, width = tokens.shape
        device = self.device
        offsets = torch.arange(width, device=device)
        valid = offsets[None, :] < lengths[:, None]
        positions = torch.where(valid, starts[:, None] + offsets[None, :], self.scratch)
        x = F.embedding(tokens, self.embed)
        cos = self.cos[positions][:, :, None, :]
        sin = self.sin[positions][:, :, None, :]
        columns = torch.arange(span, device=device)
        group = self.heads // self.kv_heads
        # GQA by folding: a kv head's query heads x tokens become its query rows, so SDPA keeps a
        # fused kernel (with enable_gqa and an explicit mask it would fall back to the math one).
        # Padding tokens sit at the scratch position, past every column: they see all (garbage, finite).
        visible = columns[None, None, :] <= positions[:, :, None]
        mask = _additive_mask(visible, self.dtype)[:, None, None].expand(count, 1, group, width, span)
        mask = mask.reshape(count, 1, group * width, span)
        slot_rows = slots[:, None].expand(count, width)
        h = _rms_norm(x, self.layers[0].norm_in, self.eps)
        for index, layer in enumerate(self.layers):
            qkv = _linear(h, layer.qkv_weight, layer.qkv_bias)
            q, kv = _rope_split(qkv, cos, sin, self.heads, self.kv_heads)
            cache = self.kv[index]
            cache[slot_rows, :, :, positions] = kv
            window = cache.narrow(3, 0, span).index_select(0, slots)
            folded = q.transpose(1, 2).reshape(count, self.kv_heads, group * width, self.head_dim)
            attended = F.scaled_dot_product_attention(folded, window[:, 0], window[:, 1], attn_mask=mask)
            attended = attended.reshape(count, self.heads, width, self.head_dim)  # SDPA may return strided
            x, h = self._prefill_tail(index, layer, x, attended, count, width)
        last = h[torch.arange(count, device=device), lengths - 1]
        self._logits(last, logits_out)
        return logits_out

    def move_row(self, source: int, target: int, used: int) -> None:
        """Copy the first ``used`` cached positions of row ``source`` into row ``target``."""
        self.kv[:, target, :, :, :used].copy_(self.kv[:, source, :, :, :used])
