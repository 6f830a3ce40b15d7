"""CompileCache: torch.compile's artifacts kept under meshnode's cache directory across starts.

Compiling the decode step's helpers is most of a cold warm-up. ``torch.compiler`` can serialise
every artifact a process compiled or loaded (inductor graphs, Triton kernels, autotuning results)
into one blob and hot-load it into its local caches in a later process, wherever those live; so
the warm-up saves that blob after it compiled and loads it before it compiles. No environment
variable is read or written here: the directory comes from settings (``model.cache_dir``).

One file per torch version, GPU and model shape: a file from another shape would load harmlessly,
but would then be overwritten with this shape's artifacts only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CompileCache"]

logger = logging.getLogger(__name__)


class CompileCache:
    """Load and save torch.compile's artifacts for one model shape on one GPU."""

    def __init__(self, directory: Path, *, signature: str) -> None:
        self.directory = Path(directory)
        digest = hashlib.sha256(signature.encode()).hexdigest()[:16]
        self.path = self.directory / f"inductor-{torch.__version__.replace('+', '_')}-{digest}.bin"
        """The artifact blob of this torch version, GPU and shape."""

    @classmethod
    def for_model(cls, directory: Path, model: Any, device: torch.device) -> CompileCache:
        """The cache of ``model``'s decoder shape on ``device``."""
        config = model.config
        dtype = next(model.parameters()).dtype
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size")
        shape = ",".join(f"{name}={getattr(config, name, None)}" for name in fields)
        return cls(directory, signature=f"{gpu}|{dtype}|{shape}")

    def load(self) -> bool:
        """Hot-load the saved artifacts into torch's caches; returns whether there were any."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.warning("compile cache %s unreadable: %s", self.path, exc)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:
            # A blob from another build of torch or a damaged file: compile from scratch instead.
            logger.warning("compile cache %s not loaded (%s: %s); compiling", self.path, type(exc).__name__, exc)
            return False
        logger.info("compile cache loaded from %s (%d bytes)", self.path, len(data))
        return info is not None

    def save(self) -> int:
        """Write the artifacts this process compiled or loaded (atomically); returns bytes written."""
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:
            # The cache only shortens the next start; failing to make it must not stop this one.
            logger.warning("compile cache not saved (%s: %s)", type(exc).__name__, exc)
            return 0
        if not saved or not saved[0]:
            return 0
        data = saved[0]
        temporary: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, delete=False, suffix=".tmp") as handle:
                temporary = handle.name
                handle.write(data)
            os.replace(temporary, self.path)
        except OSError as exc:
            logger.warning("compile cache %s not written: %s", self.path, exc)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            return 0
        logger.info("compile cache saved to %s (%d bytes)", self.path, len(data))
        return len(data)
