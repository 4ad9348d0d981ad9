"""Files the trainer writes: atomic (temp file + os.replace) and with the mode a plain open() gives.

Temporary files made by `tempfile.mkstemp` are 0600, and an `os.replace` keeps that mode, so a
prior or feature shard written that way cannot be read by a ComfyUI that runs as another user.
Every file the trainer writes therefore gets ``0o666 & ~umask`` (0644 with the usual umask 022),
the mode `open(path, "w")` would have given it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..core.loading import current_umask, file_mode  # noqa: F401  (re-exported for the trainer)


def set_file_mode(path: str | os.PathLike, mode: int | None = None):
    os.chmod(path, file_mode() if mode is None else mode)


def set_tree_modes(path: str | os.PathLike):
    """Give every regular file at or under `path` the plain-open() mode (directories are left as they are)."""
    path = Path(path)
    mode = file_mode()
    if path.is_file():
        set_file_mode(path, mode)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                set_file_mode(p, mode)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """write(tmp) fills a temporary file next to `path`, which then replaces `path` in one step, with the
    plain-open() mode. A crash leaves either the old file or the new one under the final name, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        set_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


def save_file_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors file, atomically, readable like any file the user writes."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    def write(tmp: Path):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, sort_keys=True)
            handle.write("\n")

    return atomic_write(path, write)


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
