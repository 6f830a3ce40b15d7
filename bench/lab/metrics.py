"""Per-stream and per-trial statistics, and the service-level check.

Inputs are the requesters' arrival records (time, ids in the message) and the link counters.
Definitions:

* **inter-token delay**: the time between consecutive tokens at the receiver; ids that arrive in
  the same message are 0 apart, so a 300 ms window shows as one 300 ms gap every few tokens.
* **added delay**: how late token k arrives compared with its slot on the source's fixed schedule
  (``k / rate`` after the stream's start), relative to the stream's most punctual token:
  ``(arrival_k - k / rate) - min_j (arrival_j - j / rate)``. Its median is the delay that
  coalescing and queueing add on top of the path's own latency.
* **delivered rate**: ``n / (last - first + 1 / rate)`` — equals the source rate when every token
  arrives on time, whatever the batching.
* **stall**: an inter-token delay above ``stall_seconds``.
* **lost**: ids of an admitted stream that never arrived before the deadline.
* **bytes per token**: IP bytes counted on the link during the trial / tokens delivered.
* **refusal time**: from a refused stream's request to the refusal (the ``denied`` result with
  its reason); a tab is "told why" when the result carries a reason.
* **goodput**: tokens delivered per second over the trial's span (first request to last token);
  **SLO goodput** counts only streams that met the per-stream part of the service level (rate,
  nothing lost, their own p95 inter-token delay); **sustained goodput** is the SLO goodput in the
  busiest 8 s of the trial (what the link carries once every admitted stream runs, independent of
  how long the ramp-up takes). "Goodput kept" at 2x capacity compares sustained goodputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.lab.netlab import LinkCounters

SUSTAINED_WINDOW_SECONDS = 8.0


@dataclass(frozen=True)
class ServiceLevel:
    """What every stream of a passing trial must get."""

    min_rate: float = 10.0
    """Delivered tokens per second, per stream."""
    max_p95_delay_seconds: float = 0.5
    """95th percentile of the inter-token delay over all tokens of the trial."""
    max_lost: int = 0
    """Tokens not delivered (all streams together)."""
    stall_seconds: float = 1.0

    def describe(self) -> str:
        return (f"every stream >= {self.min_rate:g} tok/s delivered, p95 inter-token delay <= "
                f"{self.max_p95_delay_seconds * 1000:.0f} ms, {self.max_lost} tokens lost, none refused")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stream_stats(stream: dict[str, Any], *, rate: float, expected: int, stall_seconds: float) -> dict[str, Any]:
    """Statistics of one stream's summary (see ``roles.StreamRecord.summary``)."""
    arrivals: list[list[float]] = stream["arrivals"]
    gaps: list[float] = []
    lateness: list[float] = []
    previous: float | None = None
    index = 0
    first = stream["first"]
    for at, count in arrivals:
        for k in range(int(count)):
            gaps.append(0.0 if (previous is None or k > 0) else at - previous)
            lateness.append(at - index / rate)
            index += 1
        previous = at
    gaps = gaps[1:]  # the first token has no predecessor
    best = min(lateness) if lateness else 0.0
    added = [late - best for late in lateness]
    received = int(stream["tokens"])
    last = arrivals[-1][0] if arrivals else None
    delivered_rate = (received / (last - first + 1.0 / rate)) if received and first is not None else 0.0
    return {
        "received": received,
        "lost": 0 if stream.get("refused") else max(0, expected - received),
        "refused": stream.get("refused"),
        "error": stream.get("error"),
        "ttft": None if first is None else first - stream["started"],
        "rate": delivered_rate,
        "gaps": gaps,
        "added": added,
        "stalls": sum(1 for g in gaps if g > stall_seconds),
        "p95_gap": percentile(gaps, 95),
        "last": last,
        "started": stream["started"],
    }


def sustained_goodput(streams: list[dict[str, Any]], window: float = SUSTAINED_WINDOW_SECONDS) -> float:
    """Tokens per second delivered to `streams` in their busiest `window` seconds."""
    events = sorted((at, count) for stream in streams for at, count in stream["arrivals"])
    best = total = 0.0
    start = 0
    for at, count in events:
        total += count
        while events[start][0] < at - window:
            total -= events[start][1]
            start += 1
        best = max(best, total)
    return best / window


def _r(value: float | None, scale: float = 1.0, digits: int = 1) -> float | None:
    return None if value is None else round(value * scale, digits)


def trial_metrics(streams: list[dict[str, Any]], *, offered: int, rate: float, expected: int,
                  counters: LinkCounters | None, cap: float, slo: ServiceLevel,
                  plain_tabs: bool = False) -> dict[str, Any]:
    """Aggregate one trial; ``passed`` says whether it met the service level.

    `plain_tabs`: the tabs read the answer from the result's ``content.text`` (as the Legion core
    does), so a finished stream whose result has no text counts as an error.
    """
    stats = [stream_stats(s, rate=rate, expected=expected, stall_seconds=slo.stall_seconds) for s in streams]
    admitted = [s for s in stats if not s["refused"]]
    refused = [s for s in stats if s["refused"]]
    gaps = [g for s in admitted for g in s["gaps"]]
    added = [a for s in admitted for a in s["added"]]
    ttfts = [s["ttft"] for s in admitted if s["ttft"] is not None]
    rates = [s["rate"] for s in admitted]
    received = sum(s["received"] for s in stats)
    lost = sum(s["lost"] for s in admitted) + max(0, offered - len(stats)) * expected
    errors = sum(1 for s in admitted if s["error"])
    starts = [s["started"] for s in admitted]
    lasts = [s["last"] for s in admitted if s["last"] is not None]
    span = (max(lasts) - min(starts)) if lasts and starts else 0.0
    ok_streams = [s for s in admitted if s["rate"] >= slo.min_rate and s["lost"] == 0 and not s["error"]
                  and (s["p95_gap"] or 0.0) <= slo.max_p95_delay_seconds]
    p95 = percentile(gaps, 95)
    refusal_times = [s["result_at"] - s["started"] for s in streams
                     if s.get("refused") and s.get("result_at") is not None]
    late = [s for s, st in zip(streams, stats, strict=True) if s.get("late")]
    no_text = sum(1 for s in streams if plain_tabs and s.get("done") and not s.get("refused")
                  and not s.get("error") and not s.get("text_chars"))
    result: dict[str, Any] = {
        "offered": offered,
        "admitted": len(admitted),
        "refused": len(refused),
        "refusal": refused[0]["refused"] if refused else None,
        "refusal_ms": {"p50": _r(percentile(refusal_times, 50), 1000), "max": _r(max(refusal_times, default=None), 1000)},
        "refused_within_1s": sum(1 for t in refusal_times if t <= 1.0),
        "refused_without_reason": sum(1 for s in refused if "no reason given" in str(s["refused"])),
        "late_streams": len(late),
        "late_within_slo": sum(1 for s, st in zip(streams, stats, strict=True) if s.get("late") and st in ok_streams),
        "results_without_text": no_text,
        "incomplete_samples": [{key: s.get(key) for key in ("peer", "late", "tokens", "done", "finish", "error",
                                                             "started", "result_at")}
                               for s, st in zip(streams, stats, strict=True) if st["lost"]][:5],
        "errors": errors,
        "error_samples": sorted({str(s["error"]) for s in admitted if s["error"]})[:3],
        "tokens_delivered": received,
        "tokens_lost": lost,
        "stalls": sum(s["stalls"] for s in admitted),
        "min_stream_rate": _r(min(rates) if rates else 0.0, 1, 2),
        "median_stream_rate": _r(percentile(rates, 50), 1, 2),
        "ttft_ms": {"p50": _r(percentile(ttfts, 50), 1000), "p95": _r(percentile(ttfts, 95), 1000)},
        "delay_ms": {"p50": _r(percentile(gaps, 50), 1000), "p95": _r(p95, 1000),
                     "p99": _r(percentile(gaps, 99), 1000), "max": _r(max(gaps) if gaps else None, 1000)},
        "added_delay_ms": {"p50": _r(percentile(added, 50), 1000), "p95": _r(percentile(added, 95), 1000)},
        "span_s": round(span, 3),
        "goodput_tok_s": round(received / span, 1) if span > 0 else 0.0,
        "slo_goodput_tok_s": round(sum(s["received"] for s in ok_streams) / span, 1) if span > 0 else 0.0,
        "streams_within_slo": len(ok_streams),
        "sustained_goodput_tok_s": round(sustained_goodput([s for s, st in zip(streams, stats, strict=True)
                                                            if st in ok_streams]), 1),
    }
    if counters is not None:
        seconds = max(counters.when, 1e-9)
        per_token = max(1, received)
        result["link"] = {
            "seconds": round(seconds, 3),
            "up_bytes": counters.up_bytes, "down_bytes": counters.down_bytes,
            "up_packets": counters.up_packets, "down_packets": counters.down_packets,
            "up_offered_bytes": counters.up_offered_bytes, "down_offered_bytes": counters.down_offered_bytes,
            "up_drops": counters.up_drops, "down_drops": counters.down_drops,
            "up_bytes_per_s": round(counters.up_bytes / seconds, 1),
            "down_bytes_per_s": round(counters.down_bytes / seconds, 1),
            "up_utilisation": round(counters.up_bytes / seconds / cap, 3) if cap else None,
            "up_bytes_per_token": round(counters.up_bytes / per_token, 2),
            "down_bytes_per_token": round(counters.down_bytes / per_token, 2),
            "up_packets_per_token": round(counters.up_packets / per_token, 3),
        }
    result["passed"] = bool(
        stats and not refused and errors == 0 and no_text == 0 and lost <= slo.max_lost
        and len(admitted) == offered and rates and min(rates) >= slo.min_rate
        and p95 is not None and p95 <= slo.max_p95_delay_seconds
    )
    return result
