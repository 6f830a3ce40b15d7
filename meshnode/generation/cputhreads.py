"""How many intra-op threads an engine's worker thread uses on a CPU.

Measured on a 2-core x86 host (torch 2.13 CPU wheel, GNU OpenMP): the same decode step that takes
~35 ms on the main thread with 2 intra-op threads took ~80–105 ms on the engine's worker thread
with 2, and ~60 ms with 1; the engine served 14.7 → 22.8 tok/s at one stream and 43 → 63 tok/s at
eight with one thread. OpenMP teams started from a second Python thread wake slowly while the
process's other threads (the event loop: WebRTC, HTTP) want the same cores. So the worker leaves
one core to the event loop: all usable cores but one, at least one.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["use_worker_threads", "worker_threads"]

logger = logging.getLogger(__name__)


def worker_threads() -> int:
    """Intra-op threads for a CPU engine worker: the cores this process may use, less one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def use_worker_threads(device: torch.device) -> None:
    """Call on the worker thread before it computes: on a CPU, set its intra-op threads."""
    if device.type != "cpu":
        return
    threads = worker_threads()
    torch.set_num_threads(threads)
    logger.info("CPU engine worker: %d intra-op thread(s) (one core left to the event loop)", threads)
