"""Placing a model that is bigger than one GPU: ``[model] device_map`` and ``max_memory`` (accelerate).

accelerate decides which layers go to which GPU (and which to the CPU) from the model's module
sizes and a memory budget per device; transformers then loads each weight straight onto its
device. meshnode plans the map itself, on an empty (meta) copy of the model, before reading any
weight, for two reasons:

* a model that does not fit is refused *before* loading, with the sizes named. accelerate would
  otherwise put the remainder on disk (or fail late, asking for an offload folder): serving from
  disk is far too slow for token streams, so meshnode never offloads there;
* the explicit map it hands to ``from_pretrained`` is exactly the one it checked and logs.

Layers the map puts on the CPU stay in CPU memory and run on the main GPU, their weights copied
in at every forward pass (accelerate's CPU offload): it serves, slowly. ``max_memory`` follows
accelerate's meaning: only the devices it names are used, and it bounds the weights only, so
leave room beside them for the KV cache and activations.

Parsing (:func:`parse_max_memory`) needs no torch, so the configuration loader can validate the
setting; planning imports torch, transformers and accelerate when called.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshnode.errors import ModelError

__all__ = ["DEVICE_MAPS", "Placement", "execution_device", "format_bytes", "parse_max_memory", "plan_device_map"]

logger = logging.getLogger(__name__)

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's strategies: auto = balanced (the same share per GPU), balanced_low_0 (GPU 0 kept
light for the sampling), sequential (fill GPU 0, then GPU 1, ...)."""

NOT_SERVED = frozenset({"disk", "meta"})
"""Places in a device map that cannot serve token streams."""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")

MemoryBudget = dict[int | str, int]
"""Bytes of weights per device: a GPU index, ``"cpu"`` or ``"mps"``."""


@dataclass(frozen=True, kw_only=True)
class Placement:
    """How to spread a model over devices (``[model] device_map`` / ``max_memory``)."""

    device_map: str
    """One of :data:`DEVICE_MAPS`."""
    max_memory: Mapping[int | str, int] = field(default_factory=dict)
    """Bytes per device; empty = the free memory accelerate measures on every device."""


def parse_max_memory(text: str) -> MemoryBudget:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` → ``{0: 21474836480, 1: ..., "cpu": ...}``.

    Keys are GPU indexes, ``cpu`` or ``mps``; sizes take B, KB, MB, GB, TB (powers of 10) or KiB,
    MiB, GiB, TiB (powers of 2), as accelerate reads them. An empty text is an empty budget.

    Raises:
        ValueError: A malformed entry, an unknown device, ``disk`` or a repeated device.
    """
    budget: MemoryBudget = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        device, sep, size = entry.partition("=")
        device = device.strip().lower()
        if not sep:
            raise ValueError(f"{entry!r}: write DEVICE=SIZE, e.g. 0=20GiB or cpu=64GiB")
        key: int | str
        if device.isdigit():
            key = int(device)
        elif device in {"cpu", "mps"}:
            key = device
        elif device == "disk":
            raise ValueError("disk: meshnode never offloads weights to disk (too slow to serve token streams)")
        else:
            raise ValueError(f"{entry!r}: the device is a GPU index (0, 1, ...), cpu or mps")
        if key in budget:
            raise ValueError(f"{entry!r}: device {device} is given twice")
        budget[key] = _parse_size(size, entry)
    return budget


def _parse_size(size: str, entry: str) -> int:
    match = _SIZE.match(size)
    unit = match.group(2) if match else ""
    factor = _UNITS.get(unit.lower())
    if len(unit) == 2 and unit.endswith("b"):  # accelerate reads "Gb" as gigabits: say GB or GiB
        factor = None
    if match is None or factor is None:
        raise ValueError(f"{entry!r}: the size is a number with B, KB, MB, GB, KiB, MiB, GiB or TiB (bytes)")
    value = int(float(match.group(1)) * factor)
    if value <= 0:
        raise ValueError(f"{entry!r}: the size must be positive")
    return value


def format_bytes(count: float) -> str:
    """``1610612736`` → ``"1.50 GiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{int(count)} B"


def _describe_budget(budget: Mapping[int | str, int]) -> str:
    return ", ".join(f"{key}={format_bytes(size)}" for key, size in budget.items()) or "nothing"


def plan_device_map(config: Any, dtype: Any, placement: Placement, *, model_id: str) -> dict[str, int | str]:
    """The device map accelerate chooses for a model of `config` in `dtype`, checked to serve.

    Args:
        config: The model's transformers config (nothing is loaded from its weights).
        dtype: The torch dtype the weights will have.
        placement: The strategy and the memory budget.
        model_id: Named in errors.

    Returns:
        Module name → GPU index or ``"cpu"``, for ``from_pretrained(device_map=...)``.

    Raises:
        ModelError: A budget names a GPU that is not there, or the model does not fit in the
            budget without disk offload (the message names the sizes).
    """
    import torch  # noqa: PLC0415 - the configuration loader imports this module without torch
    from accelerate import infer_auto_device_map, init_empty_weights  # noqa: PLC0415
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    if placement.device_map not in DEVICE_MAPS:
        raise ModelError(f"device map {placement.device_map!r}: use one of {', '.join(DEVICE_MAPS)}")
    gpus = torch.cuda.device_count()
    missing = [key for key in placement.max_memory if isinstance(key, int) and key >= gpus]
    if missing:
        raise ModelError(f"max_memory names GPU {missing[0]}, but this machine has {gpus} CUDA device(s)")
    try:
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError) as exc:  # an architecture transformers cannot build
        raise ModelError(f"cannot plan a device map for {model_id}: {exc}") from exc
    empty.tie_weights()  # tied embeddings count once, and stay on one device
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    # The budget: the devices named (accelerate's meaning), else every device's free memory.
    limit: MemoryBudget = dict(get_max_memory(dict(placement.max_memory) or None))
    budget = limit
    if placement.device_map != "sequential":
        budget = dict(get_balanced_memory(empty, max_memory=dict(limit), no_split_module_classes=no_split, dtype=dtype,
                                          low_zero=placement.device_map == "balanced_low_0"))
    device_map: dict[str, int | str] = dict(infer_auto_device_map(empty, max_memory=budget,
                                                                  no_split_module_classes=no_split, dtype=dtype))
    sizes = compute_module_sizes(empty, dtype=dtype)
    unserved = {name: place for name, place in device_map.items() if place in NOT_SERVED}
    if unserved:
        spill = sum(sizes.get(name, 0) for name in unserved)
        given = "given" if placement.max_memory else "free"
        raise ModelError(
            f"{model_id} does not fit: its weights need {format_bytes(sizes.get('', 0))} in {str(dtype)[6:]}, and "
            f"{format_bytes(spill)} of them ({_modules(unserved)}) would be "
            f"offloaded to disk beyond the memory {given} ({_describe_budget(limit)}). "
            "meshnode never serves from disk: raise --max-memory (only the devices it names are used), add GPUs, "
            "or choose a smaller dtype or model")
    per_device: dict[int | str, int] = {}
    for name, place in device_map.items():
        per_device[place] = per_device.get(place, 0) + sizes.get(name, 0)
    logger.info("device map %s for %s (%s): %s", placement.device_map, model_id, format_bytes(sizes.get("", 0)),
                _describe_budget(per_device))
    return device_map


def _modules(names: Mapping[str, object]) -> str:
    first = next(iter(names))
    if not first:
        return "the whole model"
    return first if len(names) == 1 else f"{len(names)} modules from {first}"


def execution_device(model: Any) -> Any:
    """Where a model's inputs go: the device its input embeddings run on.

    A model placed by accelerate has parameters on several devices, and those of CPU-offloaded
    layers sit on ``meta``: the embeddings' hook names the device they execute on. accelerate's
    root hook moves the outputs back to the inputs' device, so the logits arrive there too.
    """
    import torch  # noqa: PLC0415

    embeddings = model.get_input_embeddings()
    device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    if device is None:
        return embeddings.weight.device
    return device if isinstance(device, torch.device) else torch.device(device)


def device_map_kwargs(source: str, dtype: Any, placement: Placement | None, *, model_id: str,
                      **config_kwargs: Any) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments: ``{}`` for one device, else the planned map.

    Args:
        source: The folder or hub id ``from_pretrained`` will read (its config is read here).
        dtype: The weights' torch dtype.
        placement: None (one device) or the strategy and budget.
        model_id: Named in errors.
        config_kwargs: Passed to ``AutoConfig.from_pretrained`` (``local_files_only``).
    """
    if placement is None:
        return {}
    from transformers import AutoConfig  # noqa: PLC0415

    config = AutoConfig.from_pretrained(source, **config_kwargs)
    return {"device_map": plan_device_map(config, dtype, placement, model_id=model_id)}
