"""Process-wide serving counters rendered in the Prometheus text exposition format."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

from meshnode.generation.api import UpstreamStatus

TTFT_BUCKETS_SECONDS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Requests by endpoint/status, generated tokens and a time-to-first-token histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._cancelled: Counter[str] = Counter()
        self._tokens = 0
        self._ttft_counts = [0] * len(TTFT_BUCKETS_SECONDS)
        self._ttft_sum = 0.0
        self._ttft_n = 0

    def request(self, endpoint: str, status: str) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1

    def cancelled(self, endpoint: str) -> None:
        """A client left before its stream ended (the generation was cancelled)."""
        with self._lock:
            self._cancelled[endpoint] += 1

    def tokens(self, n: int) -> None:
        with self._lock:
            self._tokens += n

    def ttft(self, seconds: float) -> None:
        with self._lock:
            self._ttft_sum += seconds
            self._ttft_n += 1
            for i, bound in enumerate(TTFT_BUCKETS_SECONDS):
                if seconds <= bound:
                    self._ttft_counts[i] += 1

    def render(self, *, queue_depth: int, active: int, max_concurrent: int = 0,
               upstreams: Sequence[UpstreamStatus] = ()) -> str:
        with self._lock:
            lines = [
                "# HELP meshnode_requests_total Completion requests by endpoint and HTTP status.",
                "# TYPE meshnode_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self._requests.items()):
                lines.append(f'meshnode_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += [
                "# HELP meshnode_http_cancelled_total Streams whose client left before the end (generation cancelled).",
                "# TYPE meshnode_http_cancelled_total counter",
            ]
            for endpoint in ("chat", "completions"):
                lines.append(f'meshnode_http_cancelled_total{{endpoint="{endpoint}"}} {self._cancelled[endpoint]}')
            lines += [
                "# HELP meshnode_tokens_generated_total Tokens generated and sent.",
                "# TYPE meshnode_tokens_generated_total counter",
                f"meshnode_tokens_generated_total {self._tokens}",
                "# HELP meshnode_ttft_seconds Time from request to first token.",
                "# TYPE meshnode_ttft_seconds histogram",
            ]
            for bound, count in zip(TTFT_BUCKETS_SECONDS, self._ttft_counts, strict=True):
                lines.append(f'meshnode_ttft_seconds_bucket{{le="{bound}"}} {count}')
            lines += [
                f'meshnode_ttft_seconds_bucket{{le="+Inf"}} {self._ttft_n}',
                f"meshnode_ttft_seconds_sum {self._ttft_sum:.6f}",
                f"meshnode_ttft_seconds_count {self._ttft_n}",
                "# HELP meshnode_queue_depth Requests waiting for a batch slot.",
                "# TYPE meshnode_queue_depth gauge",
                f"meshnode_queue_depth {queue_depth}",
                "# HELP meshnode_active_streams Requests being generated now.",
                "# TYPE meshnode_active_streams gauge",
                f"meshnode_active_streams {active}",
                "# HELP meshnode_max_concurrent Streams served at once (remote nodes dispatch by it).",
                "# TYPE meshnode_max_concurrent gauge",
                f"meshnode_max_concurrent {max_concurrent}",
            ]
            lines += _upstream_lines(upstreams)
        return "\n".join(lines) + "\n"


def _upstream_lines(upstreams: Sequence[UpstreamStatus]) -> list[str]:
    """Per-upstream gauges and counters of a node that serves from remote engines."""
    if not upstreams:
        return []
    series: list[tuple[str, str, str, Callable[[UpstreamStatus], int]]] = [
        ("meshnode_upstream_up", "gauge", "1 while the upstream passes its health checks.", lambda u: int(u.healthy)),
        ("meshnode_upstream_active", "gauge", "Calls streaming from the upstream now.", lambda u: u.active),
        ("meshnode_upstream_limit", "gauge", "Calls the upstream takes at once.", lambda u: u.limit),
        ("meshnode_upstream_requests_total", "counter", "Calls dispatched to the upstream.", lambda u: u.requests),
        ("meshnode_upstream_failures_total", "counter", "Failed calls and health checks of the upstream.",
         lambda u: u.failures),
    ]
    lines: list[str] = []
    for name, kind, text, value in series:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for upstream in upstreams:
            url = upstream.url.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{name}{{upstream="{url}",dialect="{upstream.dialect}"}} {value(upstream)}')
    return lines
