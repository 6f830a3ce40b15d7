"""Process-wide serving counters rendered in the Prometheus text exposition format."""

from __future__ import annotations

import threading
from collections import Counter

TTFT_BUCKETS_SECONDS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Requests by endpoint/status, generated tokens and a time-to-first-token histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._tokens = 0
        self._ttft_counts = [0] * len(TTFT_BUCKETS_SECONDS)
        self._ttft_sum = 0.0
        self._ttft_n = 0

    def request(self, endpoint: str, status: str) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1

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

    def render(self, *, queue_depth: int, active: int) -> str:
        with self._lock:
            lines = [
                "# HELP meshnode_requests_total Completion requests by endpoint and HTTP status.",
                "# TYPE meshnode_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self._requests.items()):
                lines.append(f'meshnode_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
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
            ]
        return "\n".join(lines) + "\n"
