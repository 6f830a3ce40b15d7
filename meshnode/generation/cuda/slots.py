"""Slot bookkeeping of the CUDA backend: the per-slot device state and the host-side records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from meshnode.generation.api import SamplingParams
from meshnode.generation.cuda.sampler import SAMPLING_CANDIDATES
from meshnode.generation.engine import Request

__all__ = ["ACTIVE", "COUNTER", "KEY", "POSITION", "RESULT_BUFFERS", "TEMPERATURE", "TOKEN", "TOP_K", "TOP_P",
           "FirstToken", "Launch", "Running", "SlotState", "bucket", "buckets", "may_overflow",
           "samples_whole_vocabulary"]

TOKEN, POSITION, ACTIVE, TOP_K, KEY, COUNTER = range(6)
"""Integer columns of :attr:`SlotState.ints`."""
TEMPERATURE, TOP_P = range(2)
"""Float columns of :attr:`SlotState.floats`."""
RESULT_BUFFERS = 3
"""Pinned host buffers for step results (one step in flight while the next is launched)."""


class SlotState:
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

    def set_tokens(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write device-side tokens into rows (after :meth:`apply` of those rows; stream-ordered)."""
        self.ints[:, TOKEN].index_copy_(0, slots, tokens)

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


def samples_whole_vocabulary(params: SamplingParams) -> bool:
    """Whether a row samples without top-k/top-p (the sampler's whole-vocabulary kind)."""
    return not params.greedy and params.top_k <= 0 and params.top_p >= 1


def may_overflow(params: SamplingParams) -> bool:
    """Whether a row's top-k/top-p may outgrow the sampler's candidates (an exact resample may follow)."""
    return not params.greedy and (params.top_k > SAMPLING_CANDIDATES or (params.top_p < 1 and params.top_k == 0))


@dataclass(frozen=True, eq=False)
class FirstToken:
    """A prompt's first token, sampled on the device and read back with the row's first decode step."""

    host: torch.Tensor
    """Pinned ``[rows, (id, overflow flag)]`` buffer the prefill batch's picks are copied into."""
    index: int
    """This row's index in ``host``."""
    logits: torch.Tensor | None
    """The row's prefill logits, kept only when an exact resample may be needed."""


@dataclass(eq=False)
class Running:
    """Worker-side slot bookkeeping of one admitted request."""

    request: Request
    slot: int
    key: int
    prefilled: int = 0
    """Prompt tokens already in the cache."""
    decoding: bool = False
    released: bool = False
    valid_from: int = 0
    """First step launch whose result for this row counts (earlier ones ran on stale state)."""
    first: FirstToken | None = None
    """The first token, until the launch it arrives with is processed."""


@dataclass(frozen=True, eq=False)
class Launch:
    """A decode step launched on the device and not yet processed."""

    number: int
    batch: int
    rows: list[tuple[Running, int]]
    """``(run, slot)`` for every decoding row at launch time."""
    may_overflow: bool
    """Some row's top-k/top-p may outgrow the candidates (its logits may be needed later)."""
    result: torch.Tensor
    """Pinned host buffer the step's ids are copied into."""
    event: Any


def buckets(limit: int, first: int) -> list[int]:
    """``first, 2*first, ...`` capped at ``limit`` (which is always the last bucket)."""
    sizes: list[int] = []
    size = first
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return sizes


def bucket(sizes: Sequence[int], need: int) -> int:
    for size in sizes:
        if size >= need:
            return size
    raise ValueError(f"{need} exceeds the largest bucket {sizes[-1]}")
