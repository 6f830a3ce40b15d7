"""Host-to-device copies of small index and parameter lists that never wait for the GPU.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then synchronises the
stream, so the host waits for every step already queued: on the decode path that drains the
pipeline. Here the values go through pinned memory with ``non_blocking=True`` instead (the caching
host allocator keeps the pinned block alive until the copy has run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["tensor_to_device", "to_device"]


def to_device(values: Sequence[int] | Sequence[float], device: torch.device,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1-D tensor of ``values`` on ``device``, copied without a host synchronisation."""
    if device.type != "cuda":
        return torch.tensor(list(values), dtype=dtype, device=device)
    host = torch.tensor(list(values), dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def tensor_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, copied without a host synchronisation."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
