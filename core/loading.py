"""Finding and opening weight files safely: safetensors first, never unpickling arbitrary objects."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch

from .errors import ModelFileError
from .fsio import require_regular_file

log = logging.getLogger("lambda_eclipse")

SAFE_SUFFIXES = (".safetensors",)
# torch.load(weights_only=True) refuses arbitrary objects, so these are opened only that way.
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = SAFE_SUFFIXES + TORCH_SUFFIXES


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat name → tensor dict from a .safetensors file or a weights-only torch file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"Weight file not found: {path}. Check the path or put the file there.")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a weight file.")
    require_regular_file(path, "weight file", ModelFileError)
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise ModelFileError(
                f"{path.name} is not a readable .safetensors file ({exc}). "
                "Re-download it; a partial download is the usual cause."
            ) from exc
    if suffix in TORCH_SUFFIXES:
        return _unwrap_state_dict(load_plain_tensors(path), path)
    raise ModelFileError(
        f"{path.name}: unsupported weight file type '{suffix or '(none)'}'. "
        f"Use one of {', '.join(WEIGHT_SUFFIXES)} (.safetensors preferred)."
    )


def load_plain_tensors(path: str | os.PathLike):
    """torch.load with weights_only=True (memory-mapped when the format allows): tensors only, never code.

    A file that holds other Python objects is refused with our own message; torch's (which suggests turning
    the safety off) is never passed on.
    """
    import pickle
    import warnings

    path = Path(path)
    require_regular_file(path, "weight file", ModelFileError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes are not the user's business
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{path.name} holds Python objects besides tensors, so it was not opened (loading it could run code "
            "from the file). Use the .safetensors version of this model, or convert the file to .safetensors."
        ) from exc
    except Exception as exc:
        raise ModelFileError(
            f"{path.name} could not be opened as plain weights ({type(exc).__name__}). Only tensors are read from "
            ".bin/.pt/.ckpt files; re-download it, or use the .safetensors version."
        ) from exc


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints often nest the weights one level down.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path.name} does not hold a flat dict of tensors; it cannot be used as weights.")
    return obj


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a .safetensors header (empty for other files)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    require_regular_file(path, "weight file", ModelFileError)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise ModelFileError(f"{path.name} is not a readable .safetensors file ({exc}).") from exc


MAX_JSON_BYTES = 16 << 20  # a config, index or manifest; anything larger is not one of ours


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    require_regular_file(path, "JSON file", ModelFileError)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ModelFileError(f"{path} is {path.stat().st_size / 1e6:.0f} MB: too large for a JSON config "
                                 f"(at most {MAX_JSON_BYTES >> 20} MB). Is it the right file?")
    except OSError:
        pass
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} could not be read as JSON ({exc}).") from exc


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


# One writer for the whole pack (core/fsio.py); these names stay importable from here.
from .fsio import current_umask, file_mode, save_file_atomic, write_json_atomic  # noqa: E402,F401


def resolve_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or one of 'fp32'/'fp16'/'bf16' (and their long names)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use fp32, fp16 or bf16.") from None


class CheckCache:
    """Results of header-only model checks by file signature, errors included: menus check files on every refresh.
    Bounded (cleared when full); a cached error is raised anew, as its type with its message."""

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self._items: dict = {}

    def get(self, key, check):
        hit = self._items.get(key)
        if hit is None:
            try:
                hit = check()
            except ModelFileError as exc:
                hit = exc
            if len(self._items) >= self.limit:
                self._items.clear()
            self._items[key] = hit
        if isinstance(hit, ModelFileError):
            raise type(hit)(str(hit))
        return hit

    def clear(self):
        self._items.clear()
