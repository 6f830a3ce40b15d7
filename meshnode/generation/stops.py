"""Stop strings over incrementally decoded text (pure; the engine supplies the decoder).

Only the held-back tail of a stream can contain a stop string: emitted text never ends with a
proper prefix of one. The tail is decoded with a few emitted ids of left context, because
SentencePiece-style tokenizers drop a word's leading space at the start of a decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["STOP_CONTEXT_TOKENS", "scan_stop_strings"]

STOP_CONTEXT_TOKENS = 4
"""Already-emitted ids decoded as left context when searching stop strings."""

Decode = Callable[[Sequence[int]], str]


def scan_stop_strings(generated: list[int], emitted: int, stops: Sequence[str],
                      decode: Decode) -> tuple[int, str | None]:
    """Search the not-yet-emitted text of `generated` for `stops`.

    Returns:
        ``(ready, matched)``: the ids ``generated[:ready]`` may be emitted; ``matched`` is the stop
        string found (then ``ready`` ends before it), else ``None``.
    """
    tail = generated[emitted:]
    context = generated[max(0, emitted - STOP_CONTEXT_TOKENS) : emitted]
    text = _decode_after(decode, context, tail)
    found: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (found is None or at < found[0]):
            found = (at, stop)
    if found is not None:
        limit = found[0]
    else:
        # Hold back a suffix that could still grow into a stop string.
        hold = 0
        for stop in stops:
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:size]):
                    hold = size
                    break
        if hold == 0:
            return len(generated), None
        limit = len(text) - hold
    keep = 0
    for count in range(len(tail) - 1, 0, -1):
        if len(_decode_after(decode, context, tail[:count])) <= limit:
            keep = count
            break
    return emitted + keep, found[1] if found is not None else None


def _decode_after(decode: Decode, context: list[int], ids: list[int]) -> str:
    """Text of `ids` as it reads after `context` (falls back to decoding `ids` alone)."""
    if not context:
        return decode(ids)
    before = decode(context)
    both = decode(context + ids)
    return both[len(before) :] if both.startswith(before) else decode(ids)
