"""The CUDA backend: own decoder forward over a slot KV cache, CUDA graphs, sampling on the GPU.

:class:`CudaBatch` is a :class:`~meshnode.generation.engine.BatchBackend`; :class:`CudaEngine` is
the :class:`~meshnode.generation.engine.Engine` over it, with the same interface as the torch
engine. How the loop is built for one GPU and many concurrent streams:

* **Own forward** (:mod:`.decoder`) over a **slot KV cache** sized from the GPU's free memory;
  every running stream owns one slot (a row). Admission is by free slot (= free KV memory); a
  request whose prompt + max_tokens does not fit a slot is refused.
* **Decode steps in CUDA graphs** (:mod:`.graphs`). Slots are given lowest-first and compacted
  when the batch shrinks, so the batch bucket follows the number of running streams; the host
  rewrites the graphs' inputs only when streams join or leave.
* **Sampling on the GPU** (:mod:`.sampler`), with one device-to-host copy of the new ids per step.
* **Chunked prefill.** Newcomers are prefilled in batches of at most ``prefill_budget_tokens``
  (padded) tokens between two decode steps (4x that while nothing decodes), so a burst of long
  prompts delays running streams by one bounded chunk at a time.
* **Pipelined steps.** Step k+1 is launched before the ids of step k are processed, so stop
  handling, detokenizing and delivery overlap the GPU. Rows that finish at step k simply have their
  step-k+1 result ignored; a row resampled on the host is rolled back one step.

Warm-up (compilation and graph capture) runs once when the worker starts, with a progress bar;
requests queue meanwhile (:meth:`CudaEngine.wait_ready`). On a CPU (or without graphs) the same
forward runs eagerly: that is what the unit tests exercise; :func:`meshnode.generation.factory.open_engine`
selects it only for CUDA devices.

Measured on one H100 (``bench/gpu_bench.py``, ``bench/results/gpu_*.json``): Qwen2.5-0.5B shape,
611 tok/s at 1 stream (1.63 ms/step), 28.8k tok/s with 64 streams, 41.3k with 256.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from typing import Any, Self

import torch

from meshnode.errors import AdmissionError, ModelError
from meshnode.generation.api import SamplingParams
from meshnode.generation.cuda.decoder import SlotDecoder, supports_model
from meshnode.generation.cuda.graphs import DecodeGraphs
from meshnode.generation.cuda.sampler import SAMPLING_CANDIDATES, sample_rows, sample_rows_exact, seed_key
from meshnode.generation.cuda.slots import RESULT_BUFFERS, Launch, Running, SlotState, bucket
from meshnode.generation.engine import Engine, Request
from meshnode.generation.text import HFText

__all__ = ["CudaBatch", "CudaEngine"]

logger = logging.getLogger(__name__)

DEFAULT_CUDA_PREFILL_BUDGET_TOKENS = 4096
"""Padded prompt tokens prefilled between two decode steps while streams are decoding."""
IDLE_PREFILL_FACTOR = 4
"""With no stream decoding, a prefill batch may be this many times larger (nobody is stalled)."""
KV_MEMORY_FRACTION = 0.85
"""Share of the GPU memory left after the weights and the working reserve that the KV cache may take."""
WORKING_RESERVE_BYTES = 2 << 30
"""GPU memory kept free for activations, logits and graph pools when sizing the KV cache."""


class CudaBatch:
    """The slots, graphs and pipelined loop of one GPU (see the module docstring)."""

    def __init__(self, model: Any, *, model_id: str = "local", slots: int = 256, max_prompt_tokens: int = 4096,
                 max_tokens_limit: int = 2048, prefill_budget_tokens: int = DEFAULT_CUDA_PREFILL_BUDGET_TOKENS,
                 name: str = "cuda-engine", use_graphs: bool | None = None, use_compile: bool | None = None,
                 kv_memory_bytes: int | None = None, progress: bool = False, fp16_weights: bool = False) -> None:
        """`fp16_weights`: on a CPU, keep the projections fp16-packed for fbgemm (the CPU fast
        path; False: the model's own weights, exact).

        Raises: ModelError: the model is not supported or the cache cannot hold one request."""
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
        self.prefill_budget = max(1, prefill_budget_tokens)
        model_limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or (
            max_prompt_tokens + max_tokens_limit)
        max_len = min(max_prompt_tokens + max_tokens_limit, model_limit)
        per_row = SlotDecoder.kv_bytes_per_position(model) * (max_len + 1)
        if kv_memory_bytes is None and on_cuda:
            free, _total = torch.cuda.mem_get_info(self.device)
            kv_memory_bytes = int(max(0, free - WORKING_RESERVE_BYTES) * KV_MEMORY_FRACTION)
        if kv_memory_bytes is not None:
            slots = min(slots, kv_memory_bytes // per_row)
            if slots < 1:
                raise ModelError(f"{model_id}: the KV cache does not fit even one request of {max_len} positions")
        self.slots: int | None = int(slots)
        """Cache slots (rows); the engine's max_concurrent is at most this."""
        self.max_len = max_len
        """Positions per slot: every request's prompt + max_tokens must fit."""
        self.max_positions: int | None = max_len
        self.decoder = SlotDecoder(model, slots=int(slots), max_len=max_len)
        self.fp16_weights = fp16_weights
        """Projections as fbgemm fp16-packed weights (the CPU fast path)."""
        if fp16_weights:
            freed = self.decoder.pack_fp16(model)
            logger.info("%s: fp16-packed weights for the CPU (%.0f MB of fp32 freed)", model_id, freed / 1e6)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.kv_cache_bytes = self.decoder.kv.numel() * self.decoder.kv.element_size()
        """Bytes of the preallocated KV cache."""
        self.state = SlotState(int(slots), self.device, self.decoder.scratch)
        self.graphs = DecodeGraphs(self.decoder, self.state, slots=int(slots), max_len=max_len,
                                   prefill_capacity=self.prefill_budget * IDLE_PREFILL_FACTOR,
                                   max_prompt_tokens=max_prompt_tokens, name=name)
        self.ready = threading.Event()
        """Set once warm-up is over and requests are being served."""
        self.warmup_seconds: float | None = None
        """Time warm-up took (compilation and graph capture)."""
        self.steps = 0
        self.prefill_steps = 0
        """Prefill batches run so far."""
        self.overflow_rows = 0
        """Rows resampled on the full vocabulary because top-k/top-p outgrew the candidates."""
        # Worker-side state.
        self._engine: Engine | None = None
        self._running: dict[int, Running] = {}
        """Admitted requests by slot (prefilling or decoding)."""
        self._free_slots = list(range(int(slots)))
        self._newcomers: list[Running] = []
        self._launches = 0
        self._inflight: Launch | None = None
        self._stash = torch.empty_like(self.graphs.logits)
        """Logits of the previous step, kept when a row of it may need an exact resample."""
        self._stashed: int | None = None
        """Number of the launch whose logits are in ``_stash``."""

    @property
    def warmup_breakdown(self) -> dict[str, float]:
        return self.graphs.breakdown

    def describe(self) -> str:
        return f"{self.device} ({self.slots} slots x {self.max_len} positions)"

    def check(self, prompt_length: int, params: SamplingParams) -> None:
        need = prompt_length + params.max_tokens
        if need > self.max_len:
            raise AdmissionError(f"prompt + max_tokens = {need} tokens exceeds this node's {self.max_len} "
                                 f"positions per stream", field="max_tokens")

    # -- warm-up -----------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Compile and capture the decode graphs (worker thread, before serving); returns seconds."""
        if self.ready.is_set():
            return self.warmup_seconds or 0.0
        started = time.perf_counter()
        graphs = self.graphs
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
                graphs.graphs.clear()
                graphs.capture_all(progress=self._progress)
        self.warmup_seconds = time.perf_counter() - started
        logger.info("%s warm: %d slots x %d positions (KV %.2f GiB), %d graphs, %.1f s", self.name, self.slots,
                    self.max_len, self.kv_cache_bytes / 2**30, len(graphs.graphs), self.warmup_seconds)
        self.ready.set()
        return self.warmup_seconds

    # -- the worker --------------------------------------------------------------------------------

    def serve(self, engine: Engine) -> None:
        """Warm up; then admit, prefill a chunk, launch a step, process the last one (pipelined)."""
        self._engine = engine
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
                    self._prefill_some(engine)
                    engine.flush()
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
        self._newcomers.clear()
        self._inflight = None
        self._free_slots = list(range(self.slots or 0))
        return held

    def _assign_slot(self, request: Request) -> None:
        self._free_slots.sort()
        slot = self._free_slots.pop(0)
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        run = Running(request=request, slot=slot, key=seed_key(seed))
        self._running[slot] = run
        self._newcomers.append(run)

    def _release(self, run: Running) -> None:
        """Free a finished request's slot (its row goes idle before the next step)."""
        if run.released:
            return
        run.released = True
        if self._running.get(run.slot) is run:
            del self._running[run.slot]
            self._free_slots.append(run.slot)
            if run.decoding:
                self.state.clear_row(run.slot)
        if run in self._newcomers:
            self._newcomers.remove(run)

    def _end(self, engine: Engine, run: Running, reason: Any) -> None:
        engine.finish(run.request, reason)
        self._release(run)

    def _prefill_some(self, engine: Engine) -> None:
        """Prefill one bounded batch of prompt chunks; newcomers whose prompt is done start decoding."""
        for run in [r for r in self._newcomers if r.request.stream.cancelled]:
            self._end(engine, run, "cancel")
        if not self._newcomers:
            return
        decoding = any(run.decoding for run in self._running.values())
        budget = self.prefill_budget * (1 if decoding else IDLE_PREFILL_FACTOR)
        chosen: list[tuple[Running, int]] = []
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
            tokens[index, :size] = torch.tensor(run.request.prompt[run.prefilled : run.prefilled + size],
                                                dtype=torch.long)
        done = [i for i, (run, size) in enumerate(chosen) if run.prefilled + size == len(run.request.prompt)]
        try:
            logits = None
            if not any(run.prefilled for run in rows):
                logits = self.graphs.prefill_first(tokens, [run.slot for run in rows], [size for _, size in chosen])
            if logits is None:
                logits = self.decoder.prefill(tokens.to(self.device),
                                              torch.tensor([run.slot for run in rows], device=self.device),
                                              [run.prefilled for run in rows], [size for _, size in chosen])
            first = self._sample_first(logits, [rows[i] for i in done], done)
        except Exception as exc:
            engine.fail([run.request for run in rows], exc, "prefill")
            for run in rows:
                self._release(run)
            return
        self.prefill_steps += 1
        for run, size in chosen:
            run.prefilled += size
        for j, index in enumerate(done):
            run = rows[index]
            request = run.request
            self._newcomers.remove(run)
            if request.stream.cancelled:
                self._end(engine, run, "cancel")
                continue
            engine.started(request)
            if engine.advance(request, first[j]):
                self._release(run)
                continue
            run.decoding = True
            run.valid_from = self._launches + 1
            self.state.set_row(run.slot, token=first[j], position=request.position, params=request.params,
                               key=run.key, counter=1)

    def _sample_first(self, logits: torch.Tensor, runs: list[Running], rows: list[int]) -> list[int]:
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
            exact = sample_rows_exact(picked.index_select(0, torch.tensor(flagged, device=device)),
                                      [params[j] for j in flagged], [runs[j].key for j in flagged], [0] * len(flagged))
            for j, token in zip(flagged, exact, strict=True):
                first[j] = token
        return [int(token) for token in first]

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
            # has run; the copy is ordered after it on the stream.
            self.decoder.move_row(slot, target, min(run.request.position + 1, self.max_len))
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
        try:
            state.apply()
            if not decoding:
                return None
            batch = bucket(self.graphs.batch_buckets, max(run.slot for run in decoding) + 1)
            # A row may be one step further on the device than here (the step in flight).
            need = min(max(run.request.position for run in decoding) + 2, self.max_len)
            length = bucket(self.graphs.length_buckets, need)
            previous = self._inflight
            if previous is not None and previous.may_overflow:
                # The step about to run overwrites the logits an exact resample of the previous
                # step would need: keep them (one copy, only while such rows are running).
                self._stash[: previous.batch].copy_(self.graphs.logits[: previous.batch])
                self._stashed = previous.number
            self.graphs.step(batch, length)
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
        may_overflow = any(
            not run.request.params.greedy
            and (run.request.params.top_k > SAMPLING_CANDIDATES
                 or (run.request.params.top_p < 1 and run.request.params.top_k == 0))
            for run in decoding
        )
        return Launch(self._launches, batch, [(run, run.slot) for run in decoding], may_overflow, result, event)

    def _process(self, engine: Engine, launch: Launch) -> None:
        """Wait for a launched step and hand its ids to the streams."""
        if launch.event is not None:
            launch.event.synchronize()
        results = launch.result.tolist()
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
                finished = True
            if finished:
                self._release(run)

    def _resample(self, rows: list[tuple[Running, int]], launch: Launch) -> list[int]:
        """Exact full-vocabulary samples for rows whose nucleus outgrew the candidates.

        The logits buffer holds the newest launched step; when a newer step was launched since,
        they were stashed before it ran (or, should that not be so, they are recomputed from the
        rows' cached state with eager steps).
        """
        slots = torch.tensor([slot for _, slot in rows], device=self.device)
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
                 prefill_budget_tokens: int = DEFAULT_CUDA_PREFILL_BUDGET_TOKENS, name: str = "cuda-engine",
                 use_graphs: bool | None = None, use_compile: bool | None = None,
                 kv_memory_bytes: int | None = None, progress: bool = False, fp16_weights: bool = False,
                 **limits: Any) -> None:
        self.batch = CudaBatch(model, model_id=model_id, slots=max_concurrent, max_prompt_tokens=max_prompt_tokens,
                               max_tokens_limit=max_tokens_limit, prefill_budget_tokens=prefill_budget_tokens,
                               name=name, use_graphs=use_graphs, use_compile=use_compile,
                               kv_memory_bytes=kv_memory_bytes, progress=progress, fp16_weights=fp16_weights)
        super().__init__(self.batch, decode=None if tokenizer is None else HFText(tokenizer).decode, model_id=model_id,
                         max_concurrent=max_concurrent, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                         max_tokens_limit=max_tokens_limit, prefill_budget_tokens=prefill_budget_tokens, name=name,
                         **limits)

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

    async def wait_ready(self) -> float:
        """Start the worker and wait until warm-up is over; returns the warm-up seconds."""
        self.start()
        await asyncio.to_thread(self.batch.ready.wait)
        return self.batch.warmup_seconds or 0.0

    def warm_up(self) -> float:
        return self.batch.warm_up()
