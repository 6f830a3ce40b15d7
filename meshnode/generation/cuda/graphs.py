"""DecodeGraphs: the static buffers and CUDA graphs of decode steps and first-chunk prefills.

One decode graph per (batch bucket, attention-length bucket): the batch bucket covers slots
``0..B-1`` (B in 1, 2, 4, ... up to the slot count), the length bucket reads only the first ``L``
columns of the cache (L in 256, 512, ... up to ``max_len``). A graph reads its inputs (token,
position, sampling settings, per-row RNG counter) from the :class:`~.slots.SlotState` device
buffers and advances them itself. First prompt chunks replay a prefill graph too (one per rows x
width bucket): an eager prefill costs milliseconds of kernel launches, which would stall every
running stream. Elementwise parts (norms, rotary, SiLU, the sampler) are compiled with
``torch.compile`` before capture; matmuls and attention use cuBLAS and SDPA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from meshnode.generation.cuda.decoder import SlotDecoder
from meshnode.generation.cuda.sampler import SAMPLING_CANDIDATES, sample_rows
from meshnode.generation.cuda.slots import (
    ACTIVE,
    COUNTER,
    KEY,
    POSITION,
    TEMPERATURE,
    TOKEN,
    TOP_K,
    TOP_P,
    SlotState,
    bucket,
    buckets,
)

__all__ = ["MIN_LENGTH_BUCKET", "MIN_PREFILL_WIDTH", "DecodeGraphs"]

logger = logging.getLogger(__name__)

MIN_LENGTH_BUCKET = 256
"""Smallest attention-length bucket of the decode graphs, in positions."""
MIN_PREFILL_WIDTH = 16
"""Narrowest chunk-width bucket of the prefill graphs, in tokens."""


class DecodeGraphs:
    """Decode and prefill bodies over static buffers, eager or replayed from captured graphs."""

    def __init__(self, decoder: SlotDecoder, state: SlotState, *, slots: int, max_len: int,
                 prefill_capacity: int, max_prompt_tokens: int, name: str) -> None:
        self.decoder = decoder
        self.state = state
        self.name = name
        device, vocab = decoder.device, decoder.vocab
        self.batch_buckets = buckets(slots, 1)
        self.length_buckets = buckets(max_len, min(MIN_LENGTH_BUCKET, max_len))
        self.logits = torch.empty(slots, vocab, device=device, dtype=decoder.dtype)
        """Logits of the newest decode step, ``[slot, vocab]``."""
        self.sampler: Callable[..., Any] = sample_rows
        self.graphs: dict[tuple[int, int], Any] = {}
        widest = min(max_prompt_tokens, prefill_capacity)
        self.prefill_widths = buckets(widest, min(MIN_PREFILL_WIDTH, widest))
        self.prefill_rows = buckets(min(slots, max(1, prefill_capacity // self.prefill_widths[0])), 1)
        self.prefill_shapes = [(rows, width) for width in self.prefill_widths for rows in self.prefill_rows
                               if rows * width <= prefill_capacity or rows == 1]
        most_rows = self.prefill_rows[-1]
        most_tokens = max(rows * width for rows, width in self.prefill_shapes)
        self._pf_tokens = torch.zeros(most_tokens, dtype=torch.long, device=device)
        self._pf_slots = torch.zeros(most_rows, dtype=torch.long, device=device)
        self._pf_lengths = torch.zeros(most_rows, dtype=torch.long, device=device)
        self._pf_logits = torch.empty(most_rows, vocab, device=device, dtype=decoder.dtype)
        self.prefill_graphs: dict[tuple[int, int], Any] = {}
        self.breakdown: dict[str, float] = {}
        """Seconds of the warm-up's parts: first (compiling) runs of every shape, graph capture."""

    # -- bodies ------------------------------------------------------------------------------------

    def step_body(self, batch: int, length: int) -> None:
        """The work of one decode step over slots ``0..batch-1`` (what a graph replays)."""
        state = self.state
        ints, floats = state.ints[:batch], state.floats[:batch]
        tokens, positions = ints[:, TOKEN], ints[:, POSITION]
        logits = self.decoder.decode(tokens, positions, length, self.logits[:batch])
        ids, overflow = self.sampler(logits, floats[:, TEMPERATURE], ints[:, TOP_K], floats[:, TOP_P], ints[:, KEY],
                                     ints[:, COUNTER], min(SAMPLING_CANDIDATES, self.decoder.vocab))
        active = ints[:, ACTIVE]
        state.result[:batch, 0].copy_(ids)
        state.result[:batch, 1].copy_(overflow)
        tokens.copy_(torch.where(active > 0, ids, tokens))
        positions.add_(active)
        ints[:, COUNTER].add_(active)

    def prefill_body(self, rows: int, width: int) -> None:
        """A first-chunk prefill over the static prefill buffers (what a prefill graph replays)."""
        tokens = self._pf_tokens[: rows * width].view(rows, width)
        self.decoder.prefill_fresh(tokens, self._pf_slots[:rows], self._pf_lengths[:rows], self._pf_logits[:rows])

    # -- running -----------------------------------------------------------------------------------

    def step(self, batch: int, length: int) -> None:
        """Run one decode step: replay its graph, or run it eagerly when none was captured."""
        graph = self.graphs.get((batch, length))
        if graph is not None:
            graph.replay()
        else:
            self.step_body(batch, length)

    def prefill_first(self, chunks: torch.Tensor, slots: list[int], lengths: list[int]) -> torch.Tensor | None:
        """Replay a prefill graph for first chunks (``[rows, width]`` on the host); ``None`` when
        none fits (the caller runs them eagerly then)."""
        if not self.prefill_graphs:
            return None
        width = chunks.shape[1]
        try:
            rows = bucket(self.prefill_rows, len(slots))
            padded = bucket(self.prefill_widths, width)
        except ValueError:
            return None
        graph = self.prefill_graphs.get((rows, padded))
        if graph is None:
            return None
        tokens = torch.zeros(rows, padded, dtype=torch.long)
        tokens[: len(slots), :width] = chunks
        slot_ids = torch.zeros(rows, dtype=torch.long)
        sizes = torch.zeros(rows, dtype=torch.long)
        slot_ids[: len(slots)] = torch.tensor(slots, dtype=torch.long)
        sizes[: len(slots)] = torch.tensor(lengths, dtype=torch.long)
        if self.decoder.device.type == "cuda":
            tokens, slot_ids, sizes = tokens.pin_memory(), slot_ids.pin_memory(), sizes.pin_memory()
        self._pf_tokens[: rows * padded].copy_(tokens.view(-1), non_blocking=True)
        self._pf_slots[:rows].copy_(slot_ids, non_blocking=True)
        self._pf_lengths[:rows].copy_(sizes, non_blocking=True)
        graph.replay()
        return self._pf_logits[: len(slots)]

    # -- warm-up -----------------------------------------------------------------------------------

    def compile(self) -> None:
        """Compile the elementwise helpers and the sampler (CUDA warm-up only)."""
        import torch._dynamo as dynamo  # noqa: PLC0415 - only on CUDA warm-up

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
        self.decoder.compile()
        self.sampler = torch.compile(sample_rows, dynamic=True, fullgraph=True)

    def uncompile(self) -> None:
        """Back to the eager helpers (a compile or a capture with them failed)."""
        self.decoder.uncompile()
        self.sampler = sample_rows

    def capture_all(self, *, progress: bool) -> None:
        """Warm up every decode and prefill shape eagerly, then capture one graph per shape.

        Every slot is idle here and every prefill row is padding, so the eager warm-up runs write
        only scratch columns.
        """
        from tqdm.auto import tqdm  # noqa: PLC0415 - only on CUDA warm-up

        device = self.decoder.device
        shapes = [(b, n) for n in self.length_buckets for b in self.batch_buckets]
        prefills = self.prefill_shapes
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        self._pf_lengths.zero_()
        self._pf_slots.zero_()
        with tqdm(total=2 * (len(shapes) + len(prefills)), desc=f"{self.name}: warm-up", unit="graph",
                  disable=not progress) as bar:
            started = time.perf_counter()
            with torch.cuda.stream(side):
                for batch, length in shapes:
                    self.step_body(batch, length)  # compiles on first use of a shape
                    bar.update()
                for rows, width in prefills:
                    self.prefill_body(rows, width)
                    bar.update()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            self.breakdown["first_runs_s"] = time.perf_counter() - started
            started = time.perf_counter()
            for batch, length in shapes:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.step_body(batch, length)
                self.graphs[(batch, length)] = graph
                bar.update()
            for rows, width in prefills:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.prefill_body(rows, width)
                self.prefill_graphs[(rows, width)] = graph
                bar.update()
            self.breakdown["capture_s"] = time.perf_counter() - started
        # The warm-up steps advanced nothing real (every row idle), but reset the state to be sure.
        for slot in range(len(self.state.ints)):
            self.state.clear_row(slot)
        self.state.apply()
        torch.cuda.synchronize(device)
