"""Files the trainer writes: atomic (temp file + os.replace) and with the mode a plain open() gives.

Temporary files made by `tempfile.mkstemp` are 0600, and an `os.replace` keeps that mode, so a
prior or feature shard written that way cannot be read by a ComfyUI that runs as another user.
Every file the trainer writes therefore gets ``0o666 & ~umask`` (0644 with the usual umask 022),
the mode `open(path, "w")` would have given it.

Also here: `check_output_folder` (an --out that is a file or cannot be written is refused before any model
loads), `read_small_text` (settings and index files are stat-checked and size-capped before they are opened: a
FIFO would block, /dev/zero never ends) and `RunLock` (core.fsio.FolderLock on a run's --out, main process only).
"""

from __future__ import annotations

import os
from pathlib import Path

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


from ..core.errors import OutputPathError  # noqa: E402
from ..core.fsio import atomic_write, save_file_atomic, write_json_atomic, write_text_atomic  # noqa: E402,F401  (the pack's one writer)

#: The most a settings or index file may hold (a --config /dev/zero or a runaway file is refused, not read).
CONFIG_MAX_BYTES = 1 << 20


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Raise OutputPathError now, before any model loads, if `path` cannot be an output folder: a file there, a
    folder that is not writable, a parent that is a file or not writable. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputPathError(f"{flag} {path} is a file, not a folder. Give a folder for the run (it is created "
                                  "if missing).")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{flag} {path}: the folder is not writable. Choose a folder you can write to.")
        return path
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{flag} {path}: {parent} is a file, not a folder.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"{flag} {path}: the folder {parent} is not writable, so {path.name} cannot "
                                      "be created there. Choose a folder you can write to.")
            break
    return path


def read_small_text(path: str | os.PathLike, what: str, error=ValueError, max_bytes: int = CONFIG_MAX_BYTES,
                    advice: str = "") -> str:
    """The text of a small settings/index file, checked before it is opened: a regular file (a FIFO would block,
    /dev/zero never ends) of at most `max_bytes`. `error` (an exception type) carries the message."""
    import stat

    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist. {advice}".rstrip()) from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc}). {advice}".rstrip()) from exc
    if not stat.S_ISREG(st.st_mode):
        from ..core.fsio import not_regular_reason

        reason = not_regular_reason(path) or "is not a regular file"
        raise error(f"{what} {path} {reason}; it was not read. {advice}".rstrip())
    if st.st_size > max_bytes:
        raise error(f"{what} {path} is {st.st_size:,} bytes, more than the {max_bytes:,} such a file may hold; "
                    f"it was not read. {advice}".rstrip())
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc}). {advice}".rstrip()) from exc
    if len(raw) > max_bytes:  # grew while being read
        raise error(f"{what} {path} holds more than {max_bytes:,} bytes; it was not read. {advice}".rstrip())
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}). {advice}".rstrip()) from exc


def is_main_process_by_env() -> bool:
    """Rank 0 (or no launcher): torchrun and accelerate set RANK for every process they start."""
    rank = os.environ.get("RANK", "0").strip() or "0"
    return rank == "0"


class RunLock:
    """core.fsio.FolderLock on a run's output folder, held by the main process only (the other ranks of a
    multi-process run write into the folder it holds).

    `take_if_exists()` at the very start refuses at once when another run holds an existing folder, and creates
    nothing; `take()` before the first write covers a folder this run creates. Both are no-ops once held.
    """

    def __init__(self, folder: str | os.PathLike, command: str, main: bool | None = None):
        from ..core.fsio import FolderLock

        self.folder = Path(folder).expanduser()
        self.lock = FolderLock(self.folder, command)
        self.main = is_main_process_by_env() if main is None else main
        self.held = False

    def take_if_exists(self) -> "RunLock":
        if self.folder.is_dir():
            self.take()
        return self

    def take(self) -> "RunLock":
        if self.main and not self.held:
            self.lock.acquire()
            self.held = True
        return self

    def release(self):
        if self.held:
            self.held = False
            self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False
