"""How many intra-op threads an engine's worker thread uses on a CPU, per phase.

Measured on a 2-core x86 host (torch 2.13 CPU wheel, GNU OpenMP): a decode step that takes ~35 ms
on the main thread with 2 intra-op threads took ~80–105 ms on the engine's worker thread with 2,
and ~60 ms with 1 (small operations: OpenMP teams started from a second Python thread wake slowly,
while the event loop wants a core for WebRTC and HTTP). Prefill is a few large matrix products,
which still gain from every core (512-token TTFT 1.4 s with 2 threads, 2.0 s with 1). So a CPU
worker prefills on every usable core and decodes on all but one (at least one).
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["WorkerThreads", "usable_cores"]

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class WorkerThreads:
    """Intra-op thread counts of one engine worker thread (call from that thread); no-op off CPU."""

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cpu"
        cores = usable_cores()
        self.prefill_threads = cores
        self.decode_threads = max(1, cores - 1)
        self._current = 0
        if self.active:
            logger.info("CPU engine worker: %d intra-op thread(s) for prefill, %d for decode steps (one core "
                        "left to the event loop)", self.prefill_threads, self.decode_threads)

    def prefill(self) -> None:
        self._use(self.prefill_threads)

    def decode(self) -> None:
        self._use(self.decode_threads)

    def _use(self, threads: int) -> None:
        if self.active and threads != self._current:
            torch.set_num_threads(threads)
            self._current = threads
