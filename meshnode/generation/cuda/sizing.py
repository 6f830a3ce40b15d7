"""How the CUDA backend splits its KV memory between stream slots and the prefix store.

A slot is one stream's whole context (``positions`` KV columns, preallocated); admission is by free
slot, so the slot count *is* the free KV memory divided by one context. The prefix store takes its
share first, at most :data:`PREFIX_SHARE_MAX` of the budget, so that a large prefix setting can
never leave the node without streams.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshnode.errors import ModelError

__all__ = ["KV_MEMORY_FRACTION", "PREFIX_SHARE_MAX", "WORKING_RESERVE_BYTES", "KvPlan", "kv_budget", "plan_kv"]

KV_MEMORY_FRACTION = 0.85
"""Share of the GPU memory left after the weights and the working reserve that KV may take."""
WORKING_RESERVE_BYTES = 2 << 30
"""GPU memory kept free for activations, logits and graph pools when sizing the KV cache."""
PREFIX_SHARE_MAX = 0.25
"""Largest share of the KV budget the prefix store may take."""


@dataclass(frozen=True)
class KvPlan:
    """The KV layout chosen for one GPU."""

    slots: int
    """Stream slots (each ``positions + 1`` columns: one is the idle rows' scratch column)."""
    positions: int
    """Context positions per slot (prompt + max_tokens of a request must fit)."""
    prefix_blocks: int
    """Blocks of the prefix store (0 = off)."""
    slot_bytes: int
    """Bytes of the slot cache."""
    prefix_bytes: int
    """Bytes of the prefix store."""


def kv_budget(free_bytes: int) -> int:
    """KV bytes allowed out of ``free_bytes`` of free GPU memory (after the weights were loaded)."""
    return int(max(0, free_bytes - WORKING_RESERVE_BYTES) * KV_MEMORY_FRACTION)


def plan_kv(*, budget_bytes: int | None, bytes_per_position: int, positions: int, slots_wanted: int,
            prefix_bytes_wanted: int, block_tokens: int, model_id: str = "model") -> KvPlan:
    """Split a KV budget between the prefix store and as many slots as fit (at most ``slots_wanted``).

    Args:
        budget_bytes: KV memory available; ``None`` = no limit (CPU tests): ``slots_wanted`` slots.
        bytes_per_position: KV bytes of one position of one stream (all layers, k and v).
        positions: Context positions per slot.
        slots_wanted: Most slots to create.
        prefix_bytes_wanted: Memory asked for the prefix store (0 = off).
        block_tokens: Tokens per prefix block.
        model_id: For the error message.

    Raises:
        ModelError: Not even one slot fits.
    """
    row_bytes = bytes_per_position * (positions + 1)
    block_bytes = bytes_per_position * block_tokens
    prefix = max(0, prefix_bytes_wanted)
    if budget_bytes is not None:
        prefix = min(prefix, int(budget_bytes * PREFIX_SHARE_MAX))
    blocks = prefix // block_bytes
    slots = slots_wanted
    if budget_bytes is not None:
        slots = min(slots, (budget_bytes - blocks * block_bytes) // row_bytes)
    if slots < 1:
        raise ModelError(f"{model_id}: the KV cache does not fit even one request of {positions} positions")
    return KvPlan(slots=int(slots), positions=positions, prefix_blocks=int(blocks), slot_bytes=int(slots) * row_bytes,
                  prefix_bytes=int(blocks) * block_bytes)
