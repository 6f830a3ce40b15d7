"""The torch backend: continuous batching over a transformers causal LM's own cache.

The running batch is left-padded: each row's KV cache occupies the right-most columns of a
shared ``DynamicCache``; a 2D attention mask hides the padding and explicit per-row position
ids keep RoPE positions exact. A newcomer is prefilled alone (batch 1, no padding) between two
decode steps, and its KV is then padded and concatenated into the batch. Finished or cancelled
rows are removed with an index select, and columns that became padding in every row are
trimmed. Because no row ever sees padding in its own attention, a row's tokens do not depend on
which other rows share its batch (exactly, in float32). Every request samples with its own
``torch.Generator`` (seeded from ``SamplingParams.seed``, or randomly), never the global RNG.

A model spread over several devices by accelerate (``[model] device_map``) is served the same way:
inputs, the mask and sampling live on the input embeddings' device, and each layer's KV cache on
the device that layer runs on, so row selection indexes every layer on its own device.
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
from typing import Any, Self

import torch

from meshnode.errors import ModelError
from meshnode.generation.api import SamplingParams
from meshnode.generation.cputhreads import WorkerThreads
from meshnode.generation.engine import Engine, Request
from meshnode.generation.placement import execution_device
from meshnode.generation.text import HFText

__all__ = ["TorchBatch", "TorchEngine", "sample_next_token"]

logger = logging.getLogger(__name__)


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row of logits.

    Args:
        logits: ``[vocab]`` scores.
        params: Temperature, top-k and top-p settings.
        generator: The request's RNG (unused when greedy).

    Returns:
        The chosen token id.
    """
    if params.greedy:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class TorchBatch:
    """A :class:`~meshnode.generation.engine.BatchBackend` over a transformers model's ``DynamicCache``."""

    slots: int | None = None

    def __init__(self, model: Any, model_id: str = "local") -> None:
        """Wrap a model in eval mode (full-attention layers only).

        Raises:
            ModelError: The model's cache is not a plain full-attention dynamic cache.
        """
        self.model = model
        self.device: torch.device = execution_device(model)
        """Where the inputs go (with a device map, the other layers run elsewhere)."""
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.steps = 0
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._check_cache_layout(model_id)
        # Worker-thread state.
        self._rows: list[Request] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None

    def describe(self) -> str:
        return str(self.device)

    def check(self, prompt_length: int, params: SamplingParams) -> None:
        return None

    def _check_cache_layout(self, model_id: str) -> None:
        from transformers import DynamicCache  # noqa: PLC0415 - keep module import light
        from transformers.cache_utils import DynamicLayer  # noqa: PLC0415

        probe = DynamicCache(config=self.model.config)
        odd = {type(layer).__name__ for layer in probe.layers if type(layer) is not DynamicLayer}
        if odd:
            raise ModelError(f"{model_id}: continuous batching supports full-attention models only "
                             f"(cache layers {sorted(odd)})")

    def serve(self, engine: Engine) -> None:
        """Admit (prefill alone), decode one step for every row, deliver; until the engine closes."""
        threads = WorkerThreads(self.device)
        with torch.inference_mode():
            while True:
                newcomers = engine.next_work(engine.max_concurrent - len(self._rows), busy=bool(self._rows))
                if newcomers is None:
                    return
                if newcomers:
                    threads.prefill()
                for request in newcomers:
                    self._admit(engine, request)
                    engine.flush()  # first tokens go out right after their prefill
                if self._rows:
                    threads.decode()
                    self._decode_step(engine)
                engine.flush()

    def reset(self) -> list[Request]:
        held, self._rows, self._cache, self._mask = self._rows, [], None, None
        return held

    def _admit(self, engine: Engine, request: Request) -> None:
        """Prefill one request alone, emit its first token and merge its KV into the batch."""
        if request.stream.cancelled:
            engine.finish(request, "cancel")
            return
        try:
            seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
            request.state = torch.Generator(device=self.device).manual_seed(seed)
            inputs = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
            kwargs: dict[str, Any] = {"use_cache": True}
            if self._keep_last:
                kwargs["logits_to_keep"] = 1
            out = self.model(input_ids=inputs, **kwargs)
            token = sample_next_token(out.logits[0, -1].to(self.device), request.params, request.state)
            engine.started(request)
            if engine.advance(request, token):
                return
            self._merge(request, _cache_of(out))
        except Exception as exc:
            # Contained: one bad request (e.g. out of memory on a long prompt) fails alone.
            engine.fail([request], exc, "prefill")
            return
        logger.debug("request %d joined the batch (%d rows, ttft %.3f s)", request.stream.request_id,
                     len(self._rows), request.stream.ttft_seconds or 0.0)

    def _merge(self, request: Request, cache: Any) -> None:
        """Left-pad and concatenate a prefilled request's KV into the running batch."""
        length = len(request.prompt)
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if not self._rows:
            self._cache, self._mask, self._rows = cache, row_mask, [request]
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], length)
        # Build everything first, then assign, so a failure leaves the batch intact.
        merged = [
            (torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0),
             torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0))
            for old, new in zip(self._cache.layers, cache.layers, strict=True)
        ]
        mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(row_mask, width)], dim=0)
        for layer, (keys, values) in zip(self._cache.layers, merged, strict=True):
            layer.keys, layer.values = keys, values
        self._mask = mask
        self._rows.append(request)

    def _decode_step(self, engine: Engine) -> None:
        """Run one batched decode step for every row and process the sampled tokens."""
        self._drop_rows(engine, [r for r in self._rows if r.stream.cancelled], "cancel")
        if not self._rows:
            return
        assert self._mask is not None
        rows = self._rows
        inputs = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], dim=1)
        try:
            out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions, cache=self._cache,
                             use_cache=True)
        except Exception as exc:
            # The batch cannot be attributed to one request: fail the rows of this step only.
            engine.fail(rows, exc, "decode step")
            self._drop_rows(engine, list(rows), "error")
            return
        self.steps += 1
        self._cache = _cache_of(out)
        self._mask = mask
        logits = out.logits[:, -1, :].to(self.device)  # a no-op unless a device map put lm_head elsewhere
        greedy = logits.argmax(dim=-1).tolist()
        done: list[Request] = []
        for index, request in enumerate(rows):
            request.position += 1
            if request.stream.cancelled:
                engine.finish(request, "cancel")  # cancelled during the forward pass: emit nothing more
                done.append(request)
                continue
            try:
                token = (int(greedy[index]) if request.params.greedy
                         else sample_next_token(logits[index], request.params, request.state))
                finished = engine.advance(request, token)
            except Exception as exc:
                # Contained: a sampling or detokenizing failure ends this request only.
                engine.fail([request], exc, "sampling")
                finished = True
            if finished:
                done.append(request)
        self._drop_rows(engine, done, None)

    def _drop_rows(self, engine: Engine, leaving: list[Request], reason: str | None) -> None:
        """Remove rows from the batch (finishing them with `reason` unless already finished)."""
        if not leaving:
            return
        for request in leaving:
            if not request.finished:
                engine.finish(request, "cancel" if reason is None else reason)  # type: ignore[arg-type]
        gone = {id(r) for r in leaving}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(torch.nonzero(mask.any(dim=0))[0])  # trim columns that are padding in every row
        for layer in self._cache.layers:  # with a device map, each layer's KV sits on its own device
            on_layer = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, on_layer)[:, :, first:, :]
            layer.values = layer.values.index_select(0, on_layer)[:, :, first:, :]
        self._mask = mask[:, first:]
        self._rows = [self._rows[i] for i in keep]


class TorchEngine(Engine):
    """An :class:`~meshnode.generation.engine.Engine` over :class:`TorchBatch` (CPU, MPS, or CUDA
    for models the CUDA engine does not support)."""

    def __init__(self, model: Any, tokenizer: Any = None, *, model_id: str = "local", **limits: Any) -> None:
        """Args: a transformers causal LM in eval mode; its tokenizer (None: id-only, no stop
        strings); the public model name; :class:`~meshnode.generation.engine.Engine` limits."""
        self.batch = TorchBatch(model, model_id)
        decode = None if tokenizer is None else HFText(tokenizer, model_id).decode
        super().__init__(self.batch, decode=decode, model_id=model_id, **limits)

    @classmethod
    def from_loaded(cls, loaded: Any, **limits: Any) -> Self:
        """Build an engine (not started) from a :class:`meshnode.generation.models.LoadedModel`."""
        return cls(loaded.model, loaded.tokenizer, model_id=loaded.model_id, eos_ids=loaded.eos_ids, **limits)

    @property
    def device(self) -> torch.device:
        return self.batch.device


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a ``[batch, heads, seq, dim]`` KV tensor with zeros to ``seq == width``."""
    missing = width - tensor.shape[-2]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a ``[batch, seq]`` attention mask with zeros to ``seq == width``."""
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.nn.functional.pad(mask, (missing, 0))


def _cache_of(out: Any) -> Any:
    """A forward's KV cache: ``cache`` in transformers ≥ 5.2x, ``past_key_values`` before (5.17)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
