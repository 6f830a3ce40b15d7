"""Prefiller: which prompt chunks run between two decode steps, and how they start decoding.

Chunked prefill that does not stall running streams:

* **Bounded by time, not tokens.** Between two decode steps one prefill batch runs, at most
  :meth:`Prefiller.budget` padded tokens. The budget comes from :meth:`DecodeGraphs.calibrate`:
  the widest chunk that costs at most :data:`CHUNK_STEP_RATIO` of a decode step of the batch now
  running, so an arrival at most doubles one inter-token gap. With nothing decoding, nobody waits:
  the batch may be as large as the prefill graphs go.
* **No host synchronisation.** Inputs go up through pinned memory; the first token is sampled on
  the device and written straight into the row's decode state, and its value comes back with the
  row's first decode step (``Running.first``). The host never waits for a prefill.
* **Prefix reuse.** A newcomer's first chunk starts where the :class:`~.prefix.PrefixStore`'s match
  ends (the matched KV is copied into its slot first); every chunk's full blocks, and a finished
  stream's prompt + output, go back into the store. Two newcomers that share a block nobody has
  cached yet are not prefilled together: the second waits one step and reuses the first's.
* **One graph family per batch.** First chunks (nothing cached before them) and continuing chunks
  replay different graphs, so a batch holds one kind; the other waits for the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from meshnode.generation.cuda.decoder import SlotDecoder
from meshnode.generation.cuda.graphs import DecodeGraphs
from meshnode.generation.cuda.hostcopy import tensor_to_device, to_device
from meshnode.generation.cuda.prefix import PrefixMatch, PrefixStore
from meshnode.generation.cuda.sampler import SAMPLING_CANDIDATES
from meshnode.generation.cuda.slots import FirstToken, Running, SlotState, bucket, may_overflow
from meshnode.generation.engine import Engine

__all__ = ["CHUNK_STEP_RATIO", "DEFAULT_CUDA_PREFILL_BUDGET_TOKENS", "IDLE_PREFILL_FACTOR", "MEMORY_BOUND_SLACK",
           "Prefiller",
           "budget_table", "prefill_capacity"]

logger = logging.getLogger(__name__)

DEFAULT_CUDA_PREFILL_BUDGET_TOKENS = 4096
"""Padded prompt tokens per prefill batch while streams decode, when nothing was calibrated."""
IDLE_PREFILL_FACTOR = 4
"""With no stream decoding, a prefill batch may be this many times the default (nobody is stalled)."""
CHUNK_STEP_RATIO = 0.75
"""A calibrated chunk costs at most this share of one decode step of the running batch..."""
MEMORY_BOUND_SLACK = 1.25
"""... or at most this times the narrowest chunk: while a chunk is bound by reading the weights
(every chunk costs at least that), a wider one stalls the decode no longer and prefills more."""


def prefill_capacity(budget: int | None) -> int:
    """Largest prefill batch, in padded tokens, for a configured budget (``None`` = calibrated)."""
    return (budget or DEFAULT_CUDA_PREFILL_BUDGET_TOKENS) * IDLE_PREFILL_FACTOR


def budget_table(step_ms: dict[int, float], prefill_ms: dict[int, float], ratio: float = CHUNK_STEP_RATIO,
                 slack: float = MEMORY_BOUND_SLACK) -> dict[int, int]:
    """Per decode batch bucket: the widest one-row chunk whose measured time is within ``ratio`` of
    a step, or within ``slack`` of the cheapest chunk (the weight-read floor every chunk pays).

    Args:
        step_ms: Decode step milliseconds by batch bucket.
        prefill_ms: One-row first-chunk milliseconds by width bucket.
        ratio: Share of a step a chunk may take.
        slack: Allowed excess over the cheapest chunk.

    Returns:
        Tokens per batch bucket (at least the narrowest width, so prompts always progress).
    """
    if not prefill_ms:
        return {}
    narrowest, floor = min(prefill_ms), min(prefill_ms.values())
    table = {}
    for batch, step in step_ms.items():
        limit = max(ratio * step, slack * floor)
        table[batch] = max((width for width, took in prefill_ms.items() if took <= limit), default=narrowest)
    return table


class Prefiller:
    """Newcomers' prefill for :class:`~.backend.CudaBatch` (see the module docstring)."""

    def __init__(self, decoder: SlotDecoder, graphs: DecodeGraphs, state: SlotState, prefix: PrefixStore | None, *,
                 budget: int | None, name: str) -> None:
        self.decoder = decoder
        self.graphs = graphs
        self.state = state
        self.prefix = prefix
        self.name = name
        self.device = decoder.device
        self.fixed_budget = budget
        """A budget given by the caller (tokens), or ``None`` = calibrated."""
        self.capacity = prefill_capacity(budget)
        """Largest prefill batch, in padded tokens (what runs while nothing decodes)."""
        self.budgets: dict[int, int] = {}
        """Calibrated budget per decode batch bucket."""
        self.newcomers: list[Running] = []
        """Admitted requests whose prompt is not fully prefilled, in arrival order."""
        self.steps = 0
        """Prefill batches run."""
        self.deferred = 0
        """Times a newcomer waited a step to reuse a block another one was computing."""

    def calibrate(self) -> None:
        """Derive the per-batch budgets from the graphs' measured times (CUDA warm-up)."""
        if self.fixed_budget is not None:
            return
        self.graphs.calibrate()
        self.budgets = budget_table(self.graphs.step_ms, self.graphs.prefill_ms)
        logger.info("%s prefill budget per decode batch: %s tokens (step ms %s, chunk ms %s)", self.name,
                    self.budgets, {b: round(t, 3) for b, t in self.graphs.step_ms.items()},
                    {w: round(t, 3) for w, t in self.graphs.prefill_ms.items()})

    def budget(self, decoding: int) -> int:
        """Padded prompt tokens the next batch may prefill while ``decoding`` rows decode."""
        if decoding == 0:
            return self.capacity
        if self.fixed_budget is not None:
            return self.fixed_budget
        if self.budgets:
            return self.budgets[bucket(sorted(self.budgets), decoding)]
        return DEFAULT_CUDA_PREFILL_BUDGET_TOKENS

    # -- one batch ---------------------------------------------------------------------------------

    def run(self, engine: Engine, decoding: int, release: Callable[[Running], None]) -> list[Running]:
        """Prefill one bounded batch of chunks; returns the rows whose prompt is done (their first
        token sampled and written into the device state: they decode from the next launch on)."""
        for run in [r for r in self.newcomers if r.request.stream.cancelled]:
            engine.finish(run.request, "cancel")
            release(run)
        if not self.newcomers:
            return []
        chosen = self._choose(self.budget(decoding))
        if not chosen:
            return []
        rows = [run for run, _ in chosen]
        sizes = [size for _, size in chosen]
        starts = [run.prefilled for run in rows]
        width = max(sizes)
        tokens = torch.zeros(len(chosen), width, dtype=torch.long)
        for index, (run, size) in enumerate(chosen):
            tokens[index, :size] = torch.tensor(run.request.prompt[run.prefilled : run.prefilled + size],
                                                dtype=torch.long)
        done = [i for i, (run, size) in enumerate(chosen) if run.prefilled + size == len(run.request.prompt)]
        slots = [run.slot for run in rows]
        try:
            logits = self.graphs.prefill(tokens, slots, starts, sizes)
            if logits is None:
                logits = self.decoder.prefill(tensor_to_device(tokens, self.device), to_device(slots, self.device),
                                              starts, sizes)
            firsts = self._sample_first(logits, [rows[i] for i in done], done)
        except Exception as exc:
            engine.fail([run.request for run in rows], exc, "prefill")
            for run in rows:
                release(run)
            return []
        self.steps += 1
        for run, size in chosen:
            run.prefilled += size
            if self.prefix is not None:
                self.prefix.insert(run.request.prompt[: run.prefilled], self.decoder.kv, run.slot)
        started = []
        for index, first in zip(done, firsts, strict=True):
            run = rows[index]
            self.newcomers.remove(run)
            run.first = first
            started.append(run)
        return started

    def _choose(self, budget: int) -> list[tuple[Running, int]]:
        """Newcomers for one batch, in order: one kind (first or continuing chunks), padded width x
        rows within ``budget``, prefix matches copied into their slots."""
        chosen: list[tuple[Running, int]] = []
        spans: list[tuple[int, int]] = []
        width = 0
        fresh_kind: bool | None = None
        for run in list(self.newcomers):
            prompt = run.request.prompt
            start, match = run.prefilled, None
            if start == 0 and self.prefix is not None:
                match = self.prefix.match(prompt, len(prompt) - 1)
                start = match.tokens
            fresh = start == 0
            if self._computed_by_others(prompt, start, chosen, spans):
                self._forget(match)
                self.deferred += 1
                continue
            if fresh_kind is not None and fresh != fresh_kind:
                self._forget(match)
                continue
            size = min(len(prompt) - start, budget)
            new_width = max(width, size)
            # More rows only while their padded batch is within budget and has a graph to replay.
            if chosen and (new_width * (len(chosen) + 1) > budget
                           or not self.graphs.has_shape(fresh, len(chosen) + 1, new_width)):
                self._forget(match)
                break
            if match is not None:
                self.prefix.count(match, len(prompt))  # type: ignore[union-attr]
                self.prefix.copy_into(match, self.decoder.kv, run.slot)  # type: ignore[union-attr]
                self._forget(match)
                run.prefilled = start
            fresh_kind = fresh
            chosen.append((run, size))
            spans.append((start, start + size))
            width = new_width
        return chosen

    def _computed_by_others(self, prompt: list[int], start: int, chosen: list[tuple[Running, int]],
                            spans: list[tuple[int, int]]) -> bool:
        """Whether a chosen row's chunk completes the block this prompt would compute from ``start``
        (then this one waits a step and reuses that block from the store)."""
        if self.prefix is None or not chosen:
            return False
        size = self.prefix.block_tokens
        block_end = (start // size + 1) * size  # only whole blocks enter the store
        useful = min(block_end, len(prompt) - 1)
        if useful <= start:
            return False
        return any(begin < block_end <= finish and other.request.prompt[:useful] == prompt[:useful]
                   for (other, _), (begin, finish) in zip(chosen, spans, strict=True))

    def _forget(self, match: PrefixMatch | None) -> None:
        if match is not None and self.prefix is not None:
            self.prefix.release(match)

    def _sample_first(self, logits: torch.Tensor, runs: list[Running], rows: list[int]) -> list[FirstToken]:
        """Sample each finished prompt's first token on the device and make its row decode from it."""
        if not runs:
            return []
        device, pin = self.device, self.device.type == "cuda"
        params = [run.request.params for run in runs]
        picked = logits.index_select(0, to_device(rows, device))
        ids, overflow = self.graphs.sampler(
            picked,
            to_device([p.temperature for p in params], device, torch.float32),
            to_device([p.top_k for p in params], device),
            to_device([p.top_p for p in params], device, torch.float32),
            to_device([run.key for run in runs], device),
            torch.zeros(len(runs), dtype=torch.long, device=device),
            min(SAMPLING_CANDIDATES, self.decoder.vocab),
        )
        host = torch.empty(len(runs), 2, dtype=torch.long, pin_memory=pin)
        host.copy_(torch.stack((ids, overflow.to(torch.long)), dim=1), non_blocking=pin)
        for run in runs:
            # The token column is overwritten on the device just below; 0 is a placeholder.
            self.state.set_row(run.slot, token=0, position=len(run.request.prompt), params=run.request.params,
                               key=run.key, counter=1)
        self.state.apply()
        self.state.set_tokens(to_device([run.slot for run in runs], device), ids)
        kept: Any = [picked[j] if may_overflow(p) else None for j, p in enumerate(params)]
        return [FirstToken(host=host, index=j, logits=kept[j]) for j in range(len(runs))]
