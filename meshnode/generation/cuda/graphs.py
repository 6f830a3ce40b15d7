"""DecodeGraphs: the static buffers and CUDA graphs of decode steps and prefill chunks.

One decode graph per (batch bucket, attention-length bucket): the batch bucket covers slots
``0..B-1`` (B in 1, 2, 4, ... up to the slot count), the length bucket reads only the first ``L``
columns of the cache (L in 256, 512, ... up to ``max_len``). A graph reads its inputs (token,
position, sampling settings, per-row RNG counter) from the :class:`~.slots.SlotState` device
buffers and advances them itself. Prefill chunks replay graphs too, in two families: first chunks
(one graph per rows x width bucket; they attend to themselves only) and chunks that continue
cached positions, a reused prefix or a long prompt's later chunks (rows x width x span bucket).
An eager prefill costs milliseconds of kernel launches, which would stall every running stream.
Elementwise parts of the decode step (norms, rotary, SiLU, the sampler) are compiled with
``torch.compile`` before capture; matmuls and attention use cuBLAS and SDPA.

:meth:`DecodeGraphs.calibrate` times the captured graphs once, so the backend can size the prefill
chunk that runs between two decode steps by what it costs, not by a fixed token count.
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

__all__ = ["CACHED_PREFILL_ROWS", "CACHED_PREFILL_TOKENS", "MIN_LENGTH_BUCKET", "MIN_PREFILL_WIDTH", "DecodeGraphs",
           "cached_widths"]

logger = logging.getLogger(__name__)

MIN_LENGTH_BUCKET = 256
"""Smallest attention-length bucket of the decode graphs, in positions."""
MIN_PREFILL_WIDTH = 16
"""Narrowest chunk-width bucket of the prefill graphs, in tokens."""
CACHED_PREFILL_ROWS = (1, 4, 16)
"""Row buckets of the continuing-chunk graphs (one arrival at a time is the common case)."""
CACHED_PREFILL_TOKENS = 1024
"""Most padded tokens of a several-row continuing-chunk graph (one row may be wider)."""
CALIBRATION_LENGTH = 512
"""Attention length at which decode steps are timed for :meth:`DecodeGraphs.calibrate`."""


def cached_widths(widest: int) -> list[int]:
    """Width buckets of continuing chunks: x4 steps up to 256 (a chunk that narrow costs about one
    weight read whatever its width), x2 beyond, ``widest`` last."""
    sizes = [width for width in (MIN_PREFILL_WIDTH, 64, 256) if width < widest]
    width = 512
    while width < widest:
        sizes.append(width)
        width *= 2
    sizes.append(widest)
    return sizes


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
        self.cached_widths = cached_widths(min(max_prompt_tokens, max_len))
        self.cached_rows = [rows for rows in CACHED_PREFILL_ROWS if rows <= slots]
        self.cached_shapes = [(rows, width, span) for width in self.cached_widths for rows in self.cached_rows
                              if rows == 1 or rows * width <= CACHED_PREFILL_TOKENS
                              for span in self.length_buckets if span >= width]
        self._fresh_pairs = set(self.prefill_shapes)
        self._cached_pairs = {(rows, width) for rows, width, _ in self.cached_shapes}
        most_rows = max(self.prefill_rows[-1], self.cached_rows[-1])
        most_tokens = max([rows * width for rows, width in self.prefill_shapes]
                          + [rows * width for rows, width, _ in self.cached_shapes])
        self._pf_tokens = torch.zeros(most_tokens, dtype=torch.long, device=device)
        self._pf_slots = torch.zeros(most_rows, dtype=torch.long, device=device)
        self._pf_starts = torch.zeros(most_rows, dtype=torch.long, device=device)
        self._pf_lengths = torch.zeros(most_rows, dtype=torch.long, device=device)
        self._pf_logits = torch.empty(most_rows, vocab, device=device, dtype=decoder.dtype)
        self.prefill_graphs: dict[tuple[int, int], Any] = {}
        """First-chunk graphs by (rows, width)."""
        self.cached_graphs: dict[tuple[int, int, int], Any] = {}
        """Continuing-chunk graphs by (rows, width, span)."""
        self.breakdown: dict[str, float] = {}
        """Seconds of the warm-up's parts: first (compiling) runs of every shape, graph capture."""
        self.step_ms: dict[int, float] = {}
        """Measured decode step time per batch bucket (at :data:`CALIBRATION_LENGTH`), by :meth:`calibrate`."""
        self.prefill_ms: dict[int, float] = {}
        """Measured one-row first-chunk time per width bucket, by :meth:`calibrate`."""

    # -- bodies ------------------------------------------------------------------------------------

    def step_body(self, batch: int, length: int, *, greedy: bool = False, whole_vocabulary: bool = True) -> None:
        """The work of one decode step over slots ``0..batch-1`` (what a graph replays).

        What the host knows of the running rows trims eager steps (graphs keep the full body):
        ``greedy``: every row is greedy, so the step takes the argmax and skips the sampler (on a
        CPU the sampler cost 2.8 ms of a step at 1 row and 29 ms at 8, the argmax 0.1 and 1 ms);
        ``whole_vocabulary=False``: no row samples without top-k/top-p (see :func:`sample_rows`)."""
        state = self.state
        ints, floats = state.ints[:batch], state.floats[:batch]
        tokens, positions = ints[:, TOKEN], ints[:, POSITION]
        logits = self.decoder.decode(tokens, positions, length, self.logits[:batch])
        if greedy:
            state.result[:batch, 0].copy_(logits.argmax(dim=-1))
            state.result[:batch, 1].zero_()
            ids = state.result[:batch, 0]
        else:
            ids, overflow = self.sampler(logits, floats[:, TEMPERATURE], ints[:, TOP_K], floats[:, TOP_P],
                                         ints[:, KEY], ints[:, COUNTER], min(SAMPLING_CANDIDATES, self.decoder.vocab),
                                         whole_vocabulary)
            state.result[:batch, 0].copy_(ids)
            state.result[:batch, 1].copy_(overflow)
        active = ints[:, ACTIVE]
        tokens.copy_(torch.where(active > 0, ids, tokens))
        positions.add_(active)
        ints[:, COUNTER].add_(active)

    def prefill_body(self, rows: int, width: int) -> None:
        """A first-chunk prefill over the static prefill buffers (what a prefill graph replays)."""
        tokens = self._pf_tokens[: rows * width].view(rows, width)
        self.decoder.prefill_fresh(tokens, self._pf_slots[:rows], self._pf_lengths[:rows], self._pf_logits[:rows])

    def cached_body(self, rows: int, width: int, span: int) -> None:
        """A continuing-chunk prefill over the static buffers (what a cached-prefill graph replays)."""
        tokens = self._pf_tokens[: rows * width].view(rows, width)
        self.decoder.prefill_cached(tokens, self._pf_slots[:rows], self._pf_starts[:rows], self._pf_lengths[:rows],
                                    span, self._pf_logits[:rows])

    def has_shape(self, fresh: bool, rows: int, width: int) -> bool:
        """Whether a prefill graph family covers ``rows`` chunks of up to ``width`` tokens (bucketed;
        a continuing chunk's span bucket always exists)."""
        try:
            if fresh:
                return (bucket(self.prefill_rows, rows), bucket(self.prefill_widths, width)) in self._fresh_pairs
            return (bucket(self.cached_rows, rows), bucket(self.cached_widths, width)) in self._cached_pairs
        except ValueError:
            return False

    # -- running -----------------------------------------------------------------------------------

    def step(self, batch: int, length: int, *, greedy: bool = False, whole_vocabulary: bool = True) -> None:
        """Run one decode step: replay its graph, or run it eagerly when none was captured
        (the flags say what the running rows need; see :meth:`step_body`)."""
        graph = self.graphs.get((batch, length))
        if graph is not None:
            graph.replay()
        else:
            self.step_body(batch, length, greedy=greedy, whole_vocabulary=whole_vocabulary)

    def prefill(self, chunks: torch.Tensor, slots: list[int], starts: list[int], lengths: list[int]
                ) -> torch.Tensor | None:
        """Replay the graph that fits these chunks (``[rows, width]`` on the host); ``None`` when
        none fits (the caller runs them eagerly then). Writes the inputs without a host sync."""
        width = chunks.shape[1]
        fresh = not any(starts)
        try:
            if fresh:
                shape: tuple[int, ...] = (bucket(self.prefill_rows, len(slots)), bucket(self.prefill_widths, width))
                graph = self.prefill_graphs.get((shape[0], shape[1]))
            else:
                span = bucket(self.length_buckets, max(s + n for s, n in zip(starts, lengths, strict=True)))
                shape = (bucket(self.cached_rows, len(slots)), bucket(self.cached_widths, width), span)
                graph = self.cached_graphs.get((shape[0], shape[1], shape[2]))
        except ValueError:
            return None
        if graph is None:
            return None
        rows, padded = shape[0], shape[1]
        pin = self.decoder.device.type == "cuda"
        tokens = torch.zeros(rows, padded, dtype=torch.long, pin_memory=pin)
        tokens[: len(slots), :width] = chunks
        columns = torch.zeros(3, rows, dtype=torch.long, pin_memory=pin)  # slot, start, length
        columns[:, : len(slots)] = torch.tensor([slots, starts, lengths], dtype=torch.long)
        self._pf_tokens[: rows * padded].copy_(tokens.view(-1), non_blocking=True)
        self._pf_slots[:rows].copy_(columns[0], non_blocking=True)
        self._pf_starts[:rows].copy_(columns[1], non_blocking=True)
        self._pf_lengths[:rows].copy_(columns[2], non_blocking=True)
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
        families: list[tuple[str, list[Any], Callable[..., None], dict[Any, Any]]] = [
            ("decode", shapes, self.step_body, self.graphs),
            ("prefill", list(self.prefill_shapes), self.prefill_body, self.prefill_graphs),
            ("cached", list(self.cached_shapes), self.cached_body, self.cached_graphs),
        ]
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        for buffer in (self._pf_lengths, self._pf_slots, self._pf_starts):
            buffer.zero_()
        total = sum(len(family[1]) for family in families)
        with tqdm(total=2 * total, desc=f"{self.name}: warm-up", unit="graph", disable=not progress) as bar:
            started = time.perf_counter()
            with torch.cuda.stream(side):
                for _, family_shapes, body, _ in families:
                    for shape in family_shapes:
                        body(*shape)  # compiles on first use of a shape
                        bar.update()
                self._warm_first_token_sampler()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            self.breakdown["first_runs_s"] = time.perf_counter() - started
            for label, family_shapes, body, captured in families:
                started = time.perf_counter()
                for shape in family_shapes:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        body(*shape)
                    captured[shape] = graph
                    bar.update()
                self.breakdown[f"capture_{label}_s"] = time.perf_counter() - started
        # The warm-up steps advanced nothing real (every row idle), but reset the state to be sure.
        for slot in range(len(self.state.ints)):
            self.state.clear_row(slot)
        self.state.apply()
        torch.cuda.synchronize(device)

    def _warm_first_token_sampler(self) -> None:
        """Run the sampler on inputs shaped like a prefill's first-token draw (contiguous parameter
        vectors, one and several rows), so that serving never triggers a recompilation."""
        device, candidates = self.decoder.device, min(SAMPLING_CANDIDATES, self.decoder.vocab)
        for rows in (1, 2):
            self.sampler(self._pf_logits[:rows], torch.zeros(rows, device=device), torch.zeros(rows, dtype=torch.long,
                         device=device), torch.ones(rows, device=device), torch.zeros(rows, dtype=torch.long,
                         device=device), torch.zeros(rows, dtype=torch.long, device=device), candidates)

    def calibrate(self, repeats: int = 5) -> None:
        """Time decode steps per batch bucket and one-row first chunks per width (captured graphs,
        idle slots only); fills :attr:`step_ms` and :attr:`prefill_ms`."""
        started = time.perf_counter()
        length = bucket(self.length_buckets, min(CALIBRATION_LENGTH, self.length_buckets[-1]))
        for batch in self.batch_buckets:
            graph = self.graphs.get((batch, length))
            if graph is not None:
                self.step_ms[batch] = _time_replays(graph, repeats)
        rows = self.prefill_rows[0]
        self._pf_lengths.zero_()
        for width in self.prefill_widths:
            graph = self.prefill_graphs.get((rows, width))
            if graph is not None:
                self.prefill_ms[width] = _time_replays(graph, repeats)
        for slot in range(len(self.state.ints)):
            self.state.clear_row(slot)
        self.state.apply()
        self.breakdown["calibrate_s"] = time.perf_counter() - started


def _time_replays(graph: Any, repeats: int) -> float:
    """Median milliseconds of one replay of ``graph`` (after two untimed ones)."""
    for _ in range(2):
        graph.replay()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    return sorted(times)[len(times) // 2]
