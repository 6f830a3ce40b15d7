"""The CUDA backend: own decoder forward over a slot KV cache, CUDA graphs, sampling on the GPU.

:class:`CudaBatch` is a :class:`~meshnode.generation.engine.BatchBackend`; :class:`CudaEngine` is
the :class:`~meshnode.generation.engine.Engine` over it, with the same interface as the torch
engine. How the loop is built for one GPU and many concurrent streams:

* **Own forward** (:mod:`.decoder`) over a **slot KV cache**: every running stream owns one slot
  (a row of ``context`` positions). The slot count is what the GPU's free memory holds after the
  weights and the prefix store (:mod:`.sizing`), so admission by free slot is admission by free
  KV memory; a request whose prompt + max_tokens does not fit a slot is refused.
* **Prefix reuse** (:mod:`.prefix`): KV of prompt prefixes shared across calls (the chat-template
  head and system prompt every Legion call starts with, a tab's earlier turns) is kept in a
  bounded LRU store and copied into a newcomer's slot, which then prefills only the rest.
* **Decode steps in CUDA graphs** (:mod:`.graphs`). Slots are given lowest-first and compacted
  when the batch shrinks, so the batch bucket follows the number of running streams; the host
  rewrites the graphs' inputs only when streams join or leave.
* **Sampling on the GPU** (:mod:`.sampler`), with one device-to-host copy of the new ids per step.
* **Chunked prefill between decode steps** (:mod:`.prefill`): one batch of prompt chunks per
  step, sized by its measured cost against the running batch's step, replayed from graphs, with
  no host synchronisation (a prompt's first token is sampled on the device and arrives with the
  row's first decode step). A Poisson stream of arrivals therefore lengthens an inter-token gap by
  at most one bounded chunk and never drains the pipeline.
* **Pipelined steps.** Step k+1 is launched before the ids of step k are processed, so stop
  handling, detokenizing and delivery overlap the GPU. Rows that finish at step k simply have their
  step-k+1 result ignored; a row resampled on the host is rolled back one step. The host waits on
  the device only for the step whose ids it processes next (and for the exact resample of a row
  whose top-p nucleus outgrew the sampler's candidates, which reads logits back).

Warm-up (compilation, graph capture, calibration) runs once when the worker starts, with a progress
bar; requests queue meanwhile (:meth:`CudaEngine.wait_ready`). torch.compile's artifacts are kept
across starts (:mod:`.compilecache`). On a CPU (or without graphs) the same forward runs eagerly:
that is what the unit tests exercise; :func:`meshnode.generation.factory.build_engine` selects it
only for CUDA devices.

Measured (``bench/gpu_bench.py``, ``bench/results/gpu_*.json``): see ``bench/results/README.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch

from meshnode.errors import AdmissionError, ModelError
from meshnode.generation.api import SamplingParams
from meshnode.generation.cputhreads import WorkerThreads
from meshnode.generation.cuda.compilecache import CompileCache
from meshnode.generation.cuda.decoder import SlotDecoder, supports_model
from meshnode.generation.cuda.graphs import DecodeGraphs
from meshnode.generation.cuda.hostcopy import to_device
from meshnode.generation.cuda.prefill import DEFAULT_CUDA_PREFILL_BUDGET_TOKENS, Prefiller, prefill_capacity
from meshnode.generation.cuda.prefix import DEFAULT_BLOCK_TOKENS, PrefixStore
from meshnode.generation.cuda.sampler import sample_rows_exact, seed_key
from meshnode.generation.cuda.sizing import kv_budget, plan_kv
from meshnode.generation.cuda.slots import (
    RESULT_BUFFERS,
    Launch,
    Running,
    SlotState,
    bucket,
    may_overflow,
    samples_whole_vocabulary,
)
from meshnode.generation.engine import Engine, Request
from meshnode.generation.text import HFText

__all__ = ["DEFAULT_PREFIX_CACHE_BYTES", "CudaBatch", "CudaEngine"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX_CACHE_BYTES = 8 << 30
"""Prefix store on a CUDA device unless configured (lowered to a quarter of the KV memory)."""


class CudaBatch:
    """The slots, graphs and pipelined loop of one GPU (see the module docstring)."""

    def __init__(self, model: Any, *, model_id: str = "local", slots: int = 256, max_prompt_tokens: int = 4096,
                 max_tokens_limit: int = 2048, context_tokens: int = 0, prefill_budget_tokens: int | None = None,
                 name: str = "cuda-engine", use_graphs: bool | None = None, use_compile: bool | None = None,
                 kv_memory_bytes: int | None = None, prefix_cache_bytes: int | None = None,
                 prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS, compile_cache: Path | None = None,
                 progress: bool = False, fp16_weights: bool = False) -> None:
        """Size the KV cache and build the decoder, graphs and prefill scheduler (nothing compiled yet).

        Args:
            model: A supported transformers causal LM (see :func:`supports_model`).
            model_id: For messages.
            slots: Most concurrent streams (lowered to what the KV memory holds).
            max_prompt_tokens: Longest prompt.
            max_tokens_limit: Largest max_tokens.
            context_tokens: Positions per slot; 0 = max_prompt_tokens + max_tokens_limit. Capped by
                the model's context either way.
            prefill_budget_tokens: Padded prompt tokens per prefill batch while streams decode;
                ``None`` = measured at warm-up on CUDA (:data:`DEFAULT_CUDA_PREFILL_BUDGET_TOKENS` otherwise).
            name: For logs and the worker thread.
            use_graphs: Capture CUDA graphs (default: on CUDA).
            use_compile: torch.compile the decode step's helpers (default: on CUDA).
            kv_memory_bytes: KV memory (slots + prefix store); default: from the GPU's free memory.
            prefix_cache_bytes: Memory for the prefix store; 0 = off; default:
                :data:`DEFAULT_PREFIX_CACHE_BYTES` on CUDA, off elsewhere.
            prefix_block_tokens: Tokens per prefix block.
            compile_cache: Directory for torch.compile's artifacts across starts; ``None`` = none.
            progress: Show a warm-up progress bar.
            fp16_weights: On a CPU, keep the projections fp16-packed for fbgemm (the CPU fast path;
                False: the model's own weights, exact).

        Raises:
            ModelError: The model is not supported or the cache cannot hold one request.
        """
        reason = supports_model(model)
        if reason is not None:
            raise ModelError(f"{model_id}: {reason}")
        self.name = name
        self.device: torch.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else use_graphs
        # Compiling for the CPU (inductor's C++ backend) costs minutes and is never needed here.
        self.use_compile = on_cuda and (True if use_compile is None else use_compile)
        self._progress = progress
        model_limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or (
            max_prompt_tokens + max_tokens_limit)
        max_len = min(context_tokens or (max_prompt_tokens + max_tokens_limit), model_limit)
        if kv_memory_bytes is None and on_cuda:
            kv_memory_bytes = kv_budget(torch.cuda.mem_get_info(self.device)[0])
        if prefix_cache_bytes is None:
            prefix_cache_bytes = DEFAULT_PREFIX_CACHE_BYTES if on_cuda else 0
        per_position = SlotDecoder.kv_bytes_per_position(model)
        plan = plan_kv(budget_bytes=kv_memory_bytes, bytes_per_position=per_position, positions=max_len,
                       slots_wanted=slots, prefix_bytes_wanted=prefix_cache_bytes, block_tokens=prefix_block_tokens,
                       model_id=model_id)
        self.plan = plan
        """How the KV memory is split (slots, prefix blocks)."""
        self.slots: int | None = plan.slots
        """Cache slots (rows); the engine's max_concurrent is at most this."""
        self.max_len = max_len
        """Positions per slot: every request's prompt + max_tokens must fit."""
        self.max_positions: int | None = max_len
        self.decoder = SlotDecoder(model, slots=plan.slots, max_len=max_len, fp16_weights=fp16_weights)
        self.fp16_weights = fp16_weights
        """Projections as fbgemm fp16-packed weights (the CPU fast path)."""
        if fp16_weights:
            logger.info("%s: fp16-packed weights for the CPU (%.0f MB of fp32 freed)", model_id,
                        self.decoder.freed_bytes / 1e6)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.kv_cache_bytes = self.decoder.kv.numel() * self.decoder.kv.element_size()
        """Bytes of the preallocated slot KV cache."""
        decoder = self.decoder
        self.prefix: PrefixStore | None = None
        """The prefix store (None = off)."""
        if plan.prefix_blocks:
            self.prefix = PrefixStore(layers=len(decoder.layers), kv_heads=decoder.kv_heads, head_dim=decoder.head_dim,
                                      blocks=plan.prefix_blocks, block_tokens=prefix_block_tokens,
                                      device=self.device, dtype=decoder.dtype)
        self.state = SlotState(plan.slots, self.device, self.decoder.scratch)
        self.graphs = DecodeGraphs(self.decoder, self.state, slots=plan.slots, max_len=max_len,
                                   prefill_capacity=prefill_capacity(prefill_budget_tokens),
                                   max_prompt_tokens=max_prompt_tokens, name=name)
        self.prefiller = Prefiller(self.decoder, self.graphs, self.state, self.prefix, budget=prefill_budget_tokens,
                                   name=name)
        self._compile_cache = (CompileCache.for_model(compile_cache, model, self.device)
                               if compile_cache is not None and self.use_compile else None)
        self.ready = threading.Event()
        """Set once warm-up is over and requests are being served."""
        self.warmup_seconds: float | None = None
        """Time warm-up took (compilation and graph capture)."""
        self.steps = 0
        self.overflow_rows = 0
        """Rows resampled on the full vocabulary because top-k/top-p outgrew the candidates."""
        # Worker-side state.
        self._engine: Engine | None = None
        self._running: dict[int, Running] = {}
        """Admitted requests by slot (prefilling or decoding)."""
        self._free_slots = list(range(plan.slots))
        self._launches = 0
        self._inflight: Launch | None = None
        self._stash = torch.empty_like(self.graphs.logits)
        """Logits of the previous step, kept when a row of it may need an exact resample."""
        self._stashed: int | None = None
        """Number of the launch whose logits are in ``_stash``."""

    @property
    def warmup_breakdown(self) -> dict[str, float]:
        return self.graphs.breakdown

    @property
    def prefill_steps(self) -> int:
        """Prefill batches run so far."""
        return self.prefiller.steps

    def describe(self) -> str:
        prefix = f", prefix cache {self.plan.prefix_bytes / 2**30:.1f} GiB" if self.prefix is not None else ""
        return (f"{self.device} ({self.slots} slots x {self.max_len} positions, KV "
                f"{self.kv_cache_bytes / 2**30:.1f} GiB{prefix})")

    def stats(self) -> dict[str, int]:
        """KV and prefix-store counters (for load_info)."""
        info = {"kv_slots": self.slots or 0, "kv_positions": self.max_len, "kv_bytes": self.kv_cache_bytes,
                "prefill_batches": self.prefiller.steps}
        if self.prefix is not None:
            info.update(self.prefix.stats())
        return info

    def check(self, prompt_length: int, params: SamplingParams) -> None:
        need = prompt_length + params.max_tokens
        if need > self.max_len:
            raise AdmissionError(f"prompt + max_tokens = {need} tokens exceeds this node's {self.max_len} "
                                 f"positions per stream", field="max_tokens")

    # -- warm-up -----------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Compile, capture and calibrate (worker thread, before serving); returns seconds."""
        if self.ready.is_set():
            return self.warmup_seconds or 0.0
        started = time.perf_counter()
        graphs, breakdown = self.graphs, self.graphs.breakdown
        cache = self._compile_cache
        if cache is not None:
            mark = time.perf_counter()
            cache.load()
            breakdown["compile_cache_load_s"] = time.perf_counter() - mark
        if self.use_compile:
            try:
                graphs.compile()
            except Exception:
                logger.exception("%s: torch.compile failed; using eager helpers", self.name)
                graphs.uncompile()
                self.use_compile = False
        if self.use_graphs:
            try:
                graphs.capture_all(progress=self._progress)
            except Exception:
                if not self.use_compile:
                    raise
                logger.exception("%s: capture with compiled helpers failed; retrying eager", self.name)
                graphs.uncompile()
                self.use_compile = False
                for captured in (graphs.graphs, graphs.prefill_graphs, graphs.cached_graphs):
                    captured.clear()
                graphs.capture_all(progress=self._progress)
            try:
                self.prefiller.calibrate()
            except Exception:
                # Only the chunk budget depends on it: serve with the default one rather than not at all.
                logger.exception("%s: prefill calibration failed; default chunk budget", self.name)
        if cache is not None and self.use_compile:
            mark = time.perf_counter()
            cache.save()
            breakdown["compile_cache_save_s"] = time.perf_counter() - mark
        self.warmup_seconds = time.perf_counter() - started
        logger.info("%s warm in %.1f s: %d slots x %d positions (KV %.2f GiB, prefix store %.2f GiB), "
                    "%d decode + %d prefill + %d cached-prefill graphs; %s", self.name, self.warmup_seconds,
                    self.slots, self.max_len, self.kv_cache_bytes / 2**30, self.plan.prefix_bytes / 2**30,
                    len(graphs.graphs), len(graphs.prefill_graphs), len(graphs.cached_graphs),
                    ", ".join(f"{key} {value:.1f} s" for key, value in breakdown.items()))
        self.ready.set()
        return self.warmup_seconds

    # -- the worker --------------------------------------------------------------------------------

    def serve(self, engine: Engine) -> None:
        """Warm up; then admit, prefill a chunk, launch a step, process the last one (pipelined)."""
        self._engine = engine
        threads = WorkerThreads(self.device)
        scope = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        try:
            with scope, torch.inference_mode():
                self.warm_up()
                while True:
                    busy = bool(self._running) or self._inflight is not None
                    newcomers = engine.next_work(len(self._free_slots), busy=busy, budgeted=False)
                    if newcomers is None:
                        return
                    for request in newcomers:
                        self._assign_slot(request)
                    if self.prefiller.newcomers:
                        threads.prefill()
                        self._prefill_some(engine)
                    threads.decode()
                    previous, self._inflight = self._inflight, self._launch(engine)
                    if previous is not None:
                        self._process(engine, previous)
                    engine.flush()
        finally:
            self.ready.set()  # wait_ready() returns even when warm-up failed

    def reset(self) -> list[Request]:
        held = [run.request for run in self._running.values()]
        for run in self._running.values():
            run.released = True
        self._running.clear()
        self.prefiller.newcomers.clear()
        self._inflight = None
        self._free_slots = list(range(self.slots or 0))
        return held

    def _assign_slot(self, request: Request) -> None:
        self._free_slots.sort()
        slot = self._free_slots.pop(0)
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        run = Running(request=request, slot=slot, key=seed_key(seed))
        self._running[slot] = run
        self.prefiller.newcomers.append(run)

    def _release(self, run: Running) -> None:
        """Free a finished request's slot (its row goes idle before the next step)."""
        if run.released:
            return
        run.released = True
        run.first = None
        if self._running.get(run.slot) is run:
            del self._running[run.slot]
            self._free_slots.append(run.slot)
            if run.decoding:
                self.state.clear_row(run.slot)
        if run in self.prefiller.newcomers:
            self.prefiller.newcomers.remove(run)

    def _end(self, engine: Engine, run: Running, reason: Any) -> None:
        engine.finish(run.request, reason)
        self._release(run)

    def _complete(self, run: Running) -> None:
        """A stream ended normally (stop or length): keep its context for a next turn, free the slot."""
        if self.prefix is not None:
            request = run.request
            # Positions before request.position hold final KV (the step in flight writes the next one).
            tokens = (request.prompt + request.generated)[: request.position]
            self.prefix.insert(tokens, self.decoder.kv, run.slot)
        self._release(run)

    def _prefill_some(self, engine: Engine) -> None:
        """One prefill batch (:class:`~.prefill.Prefiller`); rows whose prompt is done start decoding."""
        decoding = sum(1 for run in self._running.values() if run.decoding)
        for run in self.prefiller.run(engine, decoding, self._release):
            run.decoding = True
            run.valid_from = self._launches + 1

    def _take_first(self, engine: Engine, run: Running) -> bool:
        """Hand a row its first token (read back with its first launch); returns whether that
        launch's result for the row counts (not finished, not rolled back)."""
        first, run.first = run.first, None
        assert first is not None
        request = run.request
        token, overflow = (int(value) for value in first.host[first.index].tolist())
        if overflow and first.logits is not None:
            try:
                token = sample_rows_exact(first.logits[None], [request.params], [run.key], [0])[0]
            except Exception:
                logger.exception("%s exact resampling failed", self.name)  # keep the candidate pick
            self.overflow_rows += 1
        if request.stream.cancelled:
            self._end(engine, run, "cancel")
            return False
        engine.started(request)
        try:
            finished = engine.advance(request, token)
        except Exception as exc:
            engine.fail([request], exc, "sampling")
            self._release(run)
            return False
        if finished:
            self._complete(run)
            return False
        if overflow:
            # The launch in flight decoded from the candidate pick: restart the row from the exact one.
            self.state.set_row(run.slot, token=token, position=request.position, params=request.params,
                               key=run.key, counter=1)
            run.valid_from = self._launches + 1
            return False
        return True

    def _compact(self) -> None:
        """Move decoding rows from the top slots into free lower ones when that shrinks the batch."""
        decoding = [slot for slot, run in self._running.items() if run.decoding]
        if not decoding:
            return
        sizes = self.graphs.batch_buckets
        if bucket(sizes, max(decoding) + 1) <= bucket(sizes, len(decoding)):
            return
        self._free_slots.sort()
        for slot in sorted(decoding, reverse=True):
            if not self._free_slots or self._free_slots[0] > slot:
                break
            run = self._running[slot]
            target = self._free_slots.pop(0)
            # Positions up to request.position (inclusive) may be written once the step in flight
            # has run; the copy is ordered after it on the stream. A row whose first token is not
            # read back yet is at position len(prompt).
            position = max(run.request.position, len(run.request.prompt))
            self.decoder.move_row(slot, target, min(position + 1, self.max_len))
            self.state.move_row(slot, target)
            del self._running[slot]
            run.slot = target
            self._running[target] = run
            self._free_slots.append(slot)
            self._free_slots.sort()

    def _launch(self, engine: Engine) -> Launch | None:
        """Apply row changes and launch one decode step for every decoding row (no waiting)."""
        for run in [r for r in self._running.values() if r.decoding and r.request.stream.cancelled]:
            self._end(engine, run, "cancel")
        self._compact()
        state = self.state
        decoding = [run for run in self._running.values() if run.decoding]
        params = [run.request.params for run in decoding]
        try:
            state.apply()
            if not decoding:
                return None
            batch = bucket(self.graphs.batch_buckets, max(run.slot for run in decoding) + 1)
            # A row may be one step further on the device than here (the step in flight).
            need = min(max(max(run.request.position, len(run.request.prompt)) for run in decoding) + 2, self.max_len)
            length = bucket(self.graphs.length_buckets, need)
            previous = self._inflight
            if previous is not None and previous.may_overflow:
                # The step about to run overwrites the logits an exact resample of the previous
                # step would need: keep them (one copy, only while such rows are running).
                self._stash[: previous.batch].copy_(self.graphs.logits[: previous.batch])
                self._stashed = previous.number
            self.graphs.step(batch, length, greedy=all(p.greedy for p in params),
                             whole_vocabulary=any(samples_whole_vocabulary(p) for p in params))
            self._launches += 1
            result = state.result_host[self._launches % RESULT_BUFFERS]
            result[:batch].copy_(state.result[:batch], non_blocking=True)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
        except Exception as exc:
            engine.fail([run.request for run in decoding], exc, "decode step")
            for run in decoding:
                self._release(run)
            return None
        self.steps += 1
        overflowing = any(may_overflow(p) for p in params)
        return Launch(self._launches, batch, [(run, run.slot) for run in decoding], overflowing, result, event)

    def _process(self, engine: Engine, launch: Launch) -> None:
        """Wait for a launched step and hand its ids (and newcomers' first tokens) to the streams."""
        if launch.event is not None:
            launch.event.synchronize()
        results = launch.result.tolist()
        for run, _ in launch.rows:
            if run.first is not None and not run.released:
                self._take_first(engine, run)
        # Skip rows finished meanwhile, or whose step ran on state corrected since.
        rows = [(run, slot) for run, slot in launch.rows if not run.released and launch.number >= run.valid_from]
        overflowing = [(run, slot) for run, slot in rows if results[slot][1]]
        resampled: dict[int, int] = {}
        if overflowing:
            try:
                tokens = self._resample(overflowing, launch)
            except Exception:
                logger.exception("%s exact resampling failed", self.name)
                tokens = [results[slot][0] for _, slot in overflowing]  # keep the candidate picks
            resampled = {slot: token for (_, slot), token in zip(overflowing, tokens, strict=True)}
            self.overflow_rows += len(overflowing)
        for run, slot in rows:
            request = run.request
            token = resampled.get(slot, results[slot][0])
            request.position += 1
            if request.stream.cancelled:
                self._end(engine, run, "cancel")
                continue
            try:
                finished = engine.advance(request, token)
                if slot in resampled and not finished:
                    # The step in flight fed the candidate pick back: roll the row back to here.
                    self.state.set_row(run.slot, token=token, position=request.position, params=request.params,
                                       key=run.key, counter=len(request.generated))
                    run.valid_from = self._launches + 1
            except Exception as exc:
                engine.fail([request], exc, "sampling")
                self._release(run)
                continue
            if finished:
                self._complete(run)

    def _resample(self, rows: list[tuple[Running, int]], launch: Launch) -> list[int]:
        """Exact full-vocabulary samples for rows whose nucleus outgrew the candidates.

        The logits buffer holds the newest launched step; when a newer step was launched since,
        they were stashed before it ran (or, should that not be so, they are recomputed from the
        rows' cached state with eager steps).
        """
        slots = to_device([slot for _, slot in rows], self.device)
        if self._inflight is None or self._inflight.number == launch.number:
            logits = self.graphs.logits.index_select(0, slots)
        elif self._stashed == launch.number:
            logits = self._stash.index_select(0, slots)
        else:
            logits = torch.stack([self._row_logits(run.slot, run.request.next_token, run.request.position)
                                  for run, _ in rows])
        return sample_rows_exact(logits, [run.request.params for run, _ in rows], [run.key for run, _ in rows],
                                 [len(run.request.generated) for run, _ in rows])

    def _row_logits(self, slot: int, token: int, position: int) -> torch.Tensor:
        """Logits of one row's token at ``position`` via a one-row prefill (eager)."""
        tokens = torch.tensor([[token]], device=self.device)
        return self.decoder.prefill(tokens, torch.tensor([slot], device=self.device), [position], [1])[0]


class CudaEngine(Engine):
    """Continuous batching for one GPU: an :class:`~meshnode.generation.engine.Engine` over :class:`CudaBatch`.

    ``max_concurrent`` is the number of cache slots (lowered to what fits the GPU's memory).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, model_id: str = "local", max_concurrent: int = 256,
                 max_queue: int = 1024, max_prompt_tokens: int = 4096, max_tokens_limit: int = 2048,
                 context_tokens: int = 0, prefill_budget_tokens: int | None = None, name: str = "cuda-engine",
                 use_graphs: bool | None = None, use_compile: bool | None = None,
                 kv_memory_bytes: int | None = None, prefix_cache_bytes: int | None = None,
                 prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS, compile_cache: Path | None = None,
                 progress: bool = False, fp16_weights: bool = False, **limits: Any) -> None:
        self.batch = CudaBatch(model, model_id=model_id, slots=max_concurrent, max_prompt_tokens=max_prompt_tokens,
                               max_tokens_limit=max_tokens_limit, context_tokens=context_tokens,
                               prefill_budget_tokens=prefill_budget_tokens, name=name, use_graphs=use_graphs,
                               use_compile=use_compile, kv_memory_bytes=kv_memory_bytes,
                               prefix_cache_bytes=prefix_cache_bytes, prefix_block_tokens=prefix_block_tokens,
                               compile_cache=compile_cache, progress=progress, fp16_weights=fp16_weights)
        super().__init__(self.batch, decode=None if tokenizer is None else HFText(tokenizer).decode, model_id=model_id,
                         max_concurrent=max_concurrent, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                         max_tokens_limit=max_tokens_limit,
                         prefill_budget_tokens=prefill_budget_tokens or DEFAULT_CUDA_PREFILL_BUDGET_TOKENS,
                         name=name, **limits)

    @classmethod
    def from_loaded(cls, loaded: Any, **limits: Any) -> Self:
        """Build an engine (not started) from a :class:`meshnode.generation.models.LoadedModel`."""
        return cls(loaded.model, loaded.tokenizer, model_id=loaded.model_id, eos_ids=loaded.eos_ids, **limits)

    @property
    def device(self) -> torch.device:
        return self.batch.device

    @property
    def max_len(self) -> int:
        return self.batch.max_len

    @property
    def kv_cache_bytes(self) -> int:
        return self.batch.kv_cache_bytes

    @property
    def overflow_rows(self) -> int:
        return self.batch.overflow_rows

    @property
    def warmup_breakdown(self) -> dict[str, float]:
        return self.batch.warmup_breakdown

    def load_info(self) -> dict[str, int]:
        """The engine's load plus the KV and prefix-store counters."""
        return {**super().load_info(), **self.batch.stats()}

    async def wait_ready(self) -> float:
        """Start the worker and wait until warm-up is over; returns the warm-up seconds."""
        self.start()
        await asyncio.to_thread(self.batch.ready.wait)
        return self.batch.warmup_seconds or 0.0

    def warm_up(self) -> float:
        return self.batch.warm_up()
