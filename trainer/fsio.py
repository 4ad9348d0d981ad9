"""Files the trainer writes: atomic (temp file + os.replace) and with the mode a plain open() gives.

Temporary files made by `tempfile.mkstemp` are 0600, and an `os.replace` keeps that mode, so a
prior or feature shard written that way cannot be read by a ComfyUI that runs as another user.
Every file the trainer writes therefore gets ``0o666 & ~umask`` (0644 with the usual umask 022),
the mode `open(path, "w")` would have given it.
"""

from __future__ import annotations

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


from ..core.fsio import atomic_write, save_file_atomic, write_json_atomic  # noqa: E402,F401  (the pack's one writer)


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
