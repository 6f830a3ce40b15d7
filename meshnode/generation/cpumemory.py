"""Resident memory of a CPU engine: caches that grow with use, and heap handed back after loading.

A CPU node is what people leave running on a laptop, so its footprint is what they see in `top`.
SmolLM2-135M peaked at 2.65 GB in bench/cpu_bench.py (llama.cpp: 0.54 GB). A slot KV cache
zero-filled up front was 755 MB of it (16 slots × 1,024 positions, touched before the first token);
freed fp32 weights left in malloc's heap and in the safetensors mapping were most of the rest
(the mapping is released by the decoder, see ``_leave_file_mappings``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap

import torch

__all__ = ["lazy_zeros", "trim_heap"]

logger = logging.getLogger(__name__)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on a CPU its pages come from an anonymous mapping that the kernel fills
    with zeros on first write, so resident memory follows the positions actually written rather
    than the whole shape (reading an untouched page maps the shared zero page)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    size = count * torch.empty((), dtype=dtype).element_size()
    if size == 0:
        return torch.zeros(shape, dtype=dtype)
    # The tensor keeps the mapping alive (torch.frombuffer holds a reference to the buffer).
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=count).view(shape)


def trim_heap() -> int:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim``); returns 1 when
    memory was released, 0 when none was or this C library has no such call."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return 0
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return int(trim(0))
