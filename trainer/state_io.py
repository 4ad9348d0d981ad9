"""Training state (optimizer, scheduler, RNG states, step) as one .safetensors file: nothing is ever unpickled.

A checkpoint folder may come from someone else or sit on a shared disk, and a pickle (``torch.save``) runs code
when it is loaded. So the trainer stores its state as a tree of plain values: the tensors go into a safetensors
file, and the structure around them (dicts, lists, tuples, numbers, strings) goes as JSON into the file's
metadata (``lambda_eclipse_state``). Reading it back parses JSON and tensors only. Numpy arrays (numpy's RNG
state) are stored as tensors and tagged with their dtype; non-finite floats are tagged too, so the JSON stays
standard.

Checkpoints written by earlier versions (``optimizer.pt``, ``rng-<rank>.pt``, ``checkpoint/state.pt``) are read
with ``torch.load(weights_only=True)``: torch's restricted unpickler builds tensors, containers and numbers and
calls nothing else. For the RNG files the allow-list adds only what numpy's RNG state needs (ndarray
reconstruction and dtypes). Any other object in such a file is refused with a message; its code never runs.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import torch

from .errors import CheckpointError

FORMAT = "lambda-eclipse-state/1"
FORMAT_KEY = "format"
STRUCTURE_KEY = "lambda_eclipse_state"


# -- encoding ------------------------------------------------------------------------------------------

class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def _tensor(self, t: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t.detach().cpu().clone().contiguous()  # own storage: safetensors refuses shared tensors
        return key

    def __call__(self, obj):
        import numpy as np

        if isinstance(obj, torch.Tensor):
            return {"$tensor": self._tensor(obj)}
        if isinstance(obj, np.ndarray):
            return {"$ndarray": self._tensor(torch.from_numpy(np.ascontiguousarray(obj))), "dtype": str(obj.dtype)}
        if isinstance(obj, np.generic):
            obj = obj.item()
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"$float": repr(obj)}
        if isinstance(obj, tuple):
            return {"$tuple": [self(v) for v in obj]}
        if isinstance(obj, list):
            return [self(v) for v in obj]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in obj):
                return {k: self(v) for k, v in obj.items()}
            return {"$items": [[self(k), self(v)] for k, v in obj.items()]}
        raise TypeError(f"training state holds a {type(obj).__name__}, which is not stored (only tensors, numpy "
                        "arrays, numbers, strings, lists, tuples and dicts are)")


def _decode(obj, tensors):
    import numpy as np

    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors(obj["$tensor"])
    if "$ndarray" in obj:
        return tensors(obj["$ndarray"]).numpy().astype(np.dtype(str(obj["dtype"])), copy=True)
    if "$float" in obj:
        value = float(obj["$float"])
        if math.isfinite(value):
            raise ValueError(f"tagged float {obj['$float']!r} is finite")
        return value
    if "$tuple" in obj:
        return tuple(_decode(v, tensors) for v in obj["$tuple"])
    if "$items" in obj:
        return {_key(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["$items"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _key(k):
    if isinstance(k, list):  # a tuple key would come back as a list: keep it hashable
        return tuple(k)
    return k


# -- files ---------------------------------------------------------------------------------------------

def save_state(obj, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write `obj` (a tree of tensors and plain values) to `path` (.safetensors), atomically."""
    from .fsio import save_file_atomic

    encode = _Encoder()
    structure = encode(obj)
    meta = {FORMAT_KEY: FORMAT, STRUCTURE_KEY: json.dumps(structure, separators=(",", ":"), allow_nan=False)}
    meta.update(metadata or {})
    return save_file_atomic(encode.tensors, path, metadata=meta)


def check_regular_file(path: Path, what: str, advice: str = "") -> None:
    """CheckpointError unless `path` is a regular file (a FIFO or device would block or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"The {what} {path} is missing. {advice}".rstrip()) from None
    except OSError as exc:
        raise CheckpointError(f"The {what} {path} cannot be read ({exc.strerror or exc}). {advice}".rstrip()) from exc
    if not stat.S_ISREG(st.st_mode):
        from ..core.fsio import not_regular_reason

        reason = not_regular_reason(path) or "is not a regular file"
        raise CheckpointError(f"The {what} {path} {reason}; it was not read. {advice}".rstrip())


def read_state_metadata(path: str | os.PathLike, what: str = "training state file", advice: str = "") -> dict:
    """The string metadata of a state file, from its header only (no tensor is read)."""
    from safetensors import safe_open

    path = Path(path)
    check_regular_file(path, what, advice)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    except Exception as exc:  # torn or garbled header
        raise CheckpointError(f"The {what} {path} is damaged ({type(exc).__name__}: {str(exc)[:200]}). "
                              f"{advice}".rstrip()) from exc
    if meta.get(FORMAT_KEY) != FORMAT or STRUCTURE_KEY not in meta:
        raise CheckpointError(f"The {what} {path} is not a λ-ECLIPSE training state file (format "
                              f"{meta.get(FORMAT_KEY)!r}). {advice}".rstrip())
    return meta


def load_state(path: str | os.PathLike, what: str = "training state file", advice: str = ""):
    """The tree `save_state` wrote; CheckpointError (naming the file) for a missing, damaged or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_state_metadata(path, what, advice)
    try:
        structure = json.loads(meta[STRUCTURE_KEY])
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())

            def tensor(key):
                if key not in keys:
                    raise KeyError(f"tensor {key!r} is not in the file")
                return handle.get_tensor(key)

            return _decode(structure, tensor)
    except Exception as exc:  # bad JSON, a missing tensor, a torn data section
        raise CheckpointError(f"The {what} {path} is damaged ({type(exc).__name__}: {str(exc)[:200]}). "
                              f"{advice}".rstrip()) from exc


def _numpy_globals() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype] + \
        [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8, np.int32)]


def load_legacy(path: str | os.PathLike, what: str, advice: str = "", numpy_arrays: bool = False):
    """A .pt state file of an earlier version, read by torch's restricted unpickler (weights_only=True).

    It builds tensors, dicts, lists, tuples, numbers and strings (and with `numpy_arrays` numpy arrays) and
    calls nothing else; a file holding any other object is refused before anything in it runs.
    """
    import pickle
    import warnings

    path = Path(path)
    check_regular_file(path, what, advice)
    allowed = _numpy_globals() if numpy_arrays else []
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"The {what} {path} (an older checkpoint format) holds Python objects other than tensors and numbers, "
            "so it was not opened: loading it could run code from the file. If this checkpoint is not one the "
            f"trainer wrote, do not use it. {advice}".rstrip()) from exc
    except Exception as exc:  # torn zip, not a torch file
        raise CheckpointError(f"The {what} {path} is damaged ({type(exc).__name__}: {str(exc)[:200]}). "
                              f"{advice}".rstrip()) from exc
