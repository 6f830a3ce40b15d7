"""PrefixStore: KV of prompt prefixes, computed once and reused by every request that starts with them.

Every call in a Legion room starts with the same chat-template head and system prompt, and a tab
that keeps its context resends its earlier turns. The store keeps the KV of such prefixes in a
bounded pool of blocks so that a new request copies them into its slot and prefills only the rest.

* **A trie of blocks.** Each node holds one block of ``block_tokens`` tokens: its KV, computed in
  the context of every token before it (its ancestors), lives in one block of the pool tensor
  ``[layers, 2, kv_heads, blocks, block_tokens, head_dim]``. A child is found by its parent and
  its own tokens, so a lookup is one dict probe per block.
* **Prefixes that diverge mid-block.** The KV at a position depends only on the tokens up to it,
  so when the walk stops at a block that differs, a child of the last node that shares its first
  ``m`` tokens still gives ``m`` positions.
* **Reuse by copy.** A match's blocks are gathered into the request's slot row (stream-ordered,
  no host synchronisation); the slot is then an ordinary slot. Blocks enter the store the same way
  out of slots: after each prefill chunk (so a burst sharing a prefix reuses it at once) and when a
  stream ends (prompt + generated, for a tab's next turn).
* **Bounded, LRU.** The pool has a fixed number of blocks; when it is full, the least recently used
  leaf that nobody has pinned is evicted. A lookup touches its path leaf first, so a parent is
  always more recent than its children and the oldest node is a leaf.
* **Pins.** A match pins its nodes until :meth:`release` (after the copy is queued), so a block
  being reused is never handed to another prefix. Every copy in and out runs on the one CUDA stream
  of the worker, so an eviction after the copy was queued cannot overwrite it early.

Only the worker thread calls it; :meth:`stats` may be read from any thread (plain ints).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from meshnode.generation.cuda.hostcopy import to_device

__all__ = ["DEFAULT_BLOCK_TOKENS", "PrefixMatch", "PrefixStore"]

DEFAULT_BLOCK_TOKENS = 64
"""Tokens per block: coarse enough that a 4k prompt is 64 probes and copies, fine enough that
little of a shared head is lost at a block edge (partial matches recover it anyway)."""


@dataclass(eq=False)
class _Node:
    """One cached block: its tokens, where its KV is, and the blocks that continue it."""

    tokens: tuple[int, ...]
    block: int
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    by_first: dict[int, list[_Node]] = field(default_factory=dict)
    """Children by their first token, for partial matches."""
    pins: int = 0


@dataclass(eq=False)
class PrefixMatch:
    """The cached blocks covering the first :attr:`tokens` tokens of a prompt (pinned until released)."""

    nodes: list[_Node]
    tokens: int
    released: bool = False


class PrefixStore:
    """A bounded store of KV blocks for prompt prefixes (see the module docstring)."""

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, blocks: int, device: torch.device,
                 dtype: torch.dtype, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if blocks < 1 or block_tokens < 1:
            raise ValueError(f"a prefix store needs blocks >= 1 and block_tokens >= 1, got {blocks}, {block_tokens}")
        self.block_tokens = block_tokens
        self.device = device
        self.pool = torch.zeros(layers, 2, kv_heads, blocks, block_tokens, head_dim, device=device, dtype=dtype)
        """``[layers, k/v, kv_heads, block, position in block, head_dim]``."""
        self.blocks = blocks
        self.block_bytes = self.pool[:, :, :, 0].numel() * self.pool.element_size()
        self._root = _Node(tokens=(), block=-1, parent=None)
        self._lru: OrderedDict[_Node, None] = OrderedDict()
        self._free = list(range(blocks - 1, -1, -1))
        self.lookups = 0
        """Requests looked up."""
        self.hits = 0
        """Requests that reused at least one token."""
        self.tokens_looked_up = 0
        """Prompt tokens of the looked-up requests that could have been reused."""
        self.tokens_reused = 0
        """Prompt tokens copied from the store instead of prefilled."""
        self.blocks_inserted = 0
        self.evictions = 0

    @staticmethod
    def blocks_for(memory_bytes: int, bytes_per_position: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> int:
        """How many blocks ``memory_bytes`` holds for a model of ``bytes_per_position``."""
        return max(0, memory_bytes // (bytes_per_position * block_tokens))

    @property
    def blocks_used(self) -> int:
        return self.blocks - len(self._free)

    def stats(self) -> dict[str, int]:
        """Counters for load_info: lookups, hits, tokens reused, bytes used and held."""
        return {"prefix_lookups": self.lookups, "prefix_hits": self.hits, "prefix_tokens_reused": self.tokens_reused,
                "prefix_tokens_looked_up": self.tokens_looked_up, "prefix_blocks_used": self.blocks_used,
                "prefix_bytes_used": self.blocks_used * self.block_bytes,
                "prefix_bytes": self.blocks * self.block_bytes, "prefix_evictions": self.evictions}

    # -- lookup ------------------------------------------------------------------------------------

    def match(self, tokens: Sequence[int], limit: int) -> PrefixMatch:
        """The longest cached prefix of ``tokens``, at most ``limit`` tokens, pinned.

        Args:
            tokens: The prompt.
            limit: Most tokens to reuse (a prompt's last token is always prefilled, for its logits).
        """
        size = self.block_tokens
        node, path, position = self._root, [], 0
        while position + size <= limit:
            child = node.children.get(tuple(tokens[position : position + size]))
            if child is None:
                break
            path.append(child)
            node, position = child, position + size
        if position < limit:
            rest = tokens[position : min(position + size, limit)]
            best, shared = None, 0
            for candidate in node.by_first.get(rest[0], ()):
                common = _common_prefix(candidate.tokens, rest)
                if common > shared:
                    best, shared = candidate, common
            if best is not None:
                path.append(best)
                position += shared
        for member in path:
            member.pins += 1
        self._touch(path)
        return PrefixMatch(nodes=path, tokens=position)

    def count(self, match: PrefixMatch, prompt_tokens: int) -> None:
        """Record a lookup that was used (a deferred one is matched again later and counts then)."""
        self.lookups += 1
        self.tokens_looked_up += max(0, prompt_tokens - 1)
        if match.tokens:
            self.hits += 1
            self.tokens_reused += match.tokens

    def release(self, match: PrefixMatch) -> None:
        """Unpin a match (idempotent); its blocks may be evicted from now on."""
        if match.released:
            return
        match.released = True
        for member in match.nodes:
            member.pins -= 1

    def copy_into(self, match: PrefixMatch, cache: torch.Tensor, slot: int) -> None:
        """Queue the copy of a match's positions into ``slot`` of a ``[layers, slots, 2, kv_heads,
        positions, head_dim]`` cache (stream-ordered; no host synchronisation)."""
        if not match.tokens:
            return
        index = to_device([member.block for member in match.nodes], self.device)
        gathered = self.pool.index_select(3, index).flatten(3, 4)  # [layers, 2, kv_heads, n * block, dim]
        cache[:, slot, :, :, : match.tokens].copy_(gathered[:, :, :, : match.tokens])

    # -- insertion ---------------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], cache: torch.Tensor, slot: int) -> int:
        """Store the full blocks of ``tokens`` that are not cached yet, copied out of ``slot``.

        ``cache[:, slot]`` must hold (or be queued to hold) the KV of every position of ``tokens``.
        Returns the number of blocks added (fewer than missing when every other block is pinned).
        """
        size = self.block_tokens
        full = len(tokens) // size
        node, path, index = self._root, [], 0
        while index < full:
            child = node.children.get(tuple(tokens[index * size : (index + 1) * size]))
            if child is None:
                break
            path.append(child)
            node, index = child, index + 1
        first_new = index
        for member in path:  # the path must survive the evictions this insertion makes
            member.pins += 1
        added: list[_Node] = []
        while index < full:
            block = self._take_block()
            if block is None:
                break
            key = tuple(tokens[index * size : (index + 1) * size])
            child = _Node(tokens=key, block=block, parent=node, pins=1)
            node.children[key] = child
            node.by_first.setdefault(key[0], []).append(child)
            path.append(child)
            added.append(child)
            node, index = child, index + 1
        for member in path:
            member.pins -= 1
        self._touch(path)
        if added:
            source = cache[:, slot, :, :, first_new * size : index * size].unflatten(  # type: ignore[no-untyped-call]
                3, (len(added), size))
            self.pool.index_copy_(3, to_device([member.block for member in added], self.device), source)
            self.blocks_inserted += len(added)
        return len(added)

    def _take_block(self) -> int | None:
        """A free block, evicting the least recently used unpinned leaf when none is free."""
        if self._free:
            return self._free.pop()
        for node in self._lru:
            if node.pins or node.children:
                continue
            self._drop(node)
            self.evictions += 1
            return self._free.pop()
        return None

    def _drop(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None and not node.children
        del parent.children[node.tokens]
        siblings = parent.by_first[node.tokens[0]]
        siblings.remove(node)
        if not siblings:
            del parent.by_first[node.tokens[0]]
        del self._lru[node]
        self._free.append(node.block)

    def _touch(self, path: list[_Node]) -> None:
        """Mark a root-to-leaf path as just used, leaf first (parents end up more recent)."""
        for member in reversed(path):
            self._lru[member] = None
            self._lru.move_to_end(member)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count
