"""The pack's one way to write a file, and its one lock on an output folder.

Writing (`atomic_write` and the helpers over it):
- the content goes to a temporary file in the destination folder (`.<name>.tmp-XXXX<suffix>`), is flushed and
  fsync'ed, gets the mode a plain ``open()`` would give (``0o666 & ~umask``: mkstemp's 0600 would hide a prior
  from a ComfyUI running as another user), and only then takes the final name;
- with ``overwrite=False`` the final name is taken with ``os.link`` (atomic, fails if the name exists), so two
  processes writing the same path at once can never replace each other's file: the second gets
  `OutputExistsError`. Where hard links are not supported, an exclusive create is used instead;
- on any failure the temporary file is removed, the old file is left as it was, and an ``OSError`` becomes one
  `OutputPathError` that names the file and says what to check.

Locking (`FolderLock`): a long run (training, extraction, an evaluation) takes ``<folder>/.lambda_eclipse.lock``
holding its PID and command. A second run on the same folder refuses at once with `FolderLockedError`, naming the
first run's PID. A lock whose PID is no longer alive (a killed run, a reboot) is taken over with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import InputError, OutputPathError

log = logging.getLogger("lambda_eclipse")

LOCK_NAME = ".lambda_eclipse.lock"


class OutputExistsError(OutputPathError):
    """The output file is already there and replacing it was not asked for (no --overwrite)."""


class FolderLockedError(InputError):
    """Another run is writing to the same output folder."""


# -- file modes ------------------------------------------------------------------------------------------

def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is set-and-return)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from a plain open(): 0o666 minus the umask (temp files from mkstemp are 0600)."""
    return 0o666 & ~current_umask()


# -- reading: only regular files ------------------------------------------------------------------------

def not_regular_reason(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a file without blocking or running away: 'is a FIFO (named pipe)', 'is a
    device (like /dev/zero)', 'is a socket', 'is a folder'; None for a regular file (or a link to one) or an
    absent path (the caller says "not found" in its own words)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a file: reading it would wait forever"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device (like /dev/zero), not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"


def require_regular_file(path: str | os.PathLike, what: str, error=None):
    """Raise `error` (default InputError) when `path` exists but is not a regular file; see not_regular_reason."""
    reason = not_regular_reason(path)
    if reason is not None:
        raise (error or InputError)(f"The {what} {str(path)!r} {reason}. Give the path of a real file.")


# -- writing ---------------------------------------------------------------------------------------------

def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _fsync_folder(folder: Path):
    """Make a rename durable (POSIX); harmless where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exists_message(path: Path) -> str:
    return f"{path} already exists; nothing was changed. Pass --overwrite to replace it, or choose another name."


def check_writable_target(path: str | os.PathLike, *, overwrite: bool = True, what: str = "output file") -> Path:
    """Raise now (before any work) if `path` cannot be written as a file: a folder there, an existing file without
    `overwrite`, a parent that is a file. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"The {what} {path} is a folder. Give a file name (e.g. {path / 'out'}{path.suffix or ''}).")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(_exists_message(path))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"Cannot write {path}: {parent} is a file, not a folder.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"Cannot write {path}: the folder {parent} is not writable. Choose a folder you can write to.")
            break
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = True,
                 durable: bool = True) -> Path:
    """write(tmp) fills a temporary file next to `path`; then it takes the name `path` in one step.

    A crash leaves the old file or the complete new one under the final name, never half of one. With
    ``overwrite=False`` an existing `path` is never replaced, even by a process racing this one.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder; give a file name to write.")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise OutputExistsError(_exists_message(path))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"Cannot create the folder {str(folder)!r} for {path.name} ({_why(exc)}).") from exc
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.tmp-", suffix=path.suffix)
    except OSError as exc:
        raise OutputPathError(f"Cannot write in {str(folder)!r} ({_why(exc)}). Choose a folder you can write to.") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OutputPathError):
            raise
        if isinstance(exc, OSError):
            raise OutputPathError(
                f"Could not write {path} ({_why(exc)}); nothing was changed there. Check the free space and the "
                "permissions of the folder."
            ) from exc
        raise
    if durable:
        _fsync_folder(folder)
    return path


def _link_new(tmp: Path, path: Path):
    """Give `tmp` the name `path` only if no file has that name (atomic); then drop `tmp`."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(_exists_message(path)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links here (some FUSE/SMB mounts): claim the name exclusively, then copy
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        except FileExistsError:
            raise OutputExistsError(_exists_message(path)) from None
        try:
            with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    tmp.unlink()


def write_bytes_atomic(data: bytes, path, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def write_text_atomic(text: str, path, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_json_atomic(obj, path, *, overwrite: bool = True) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return write_text_atomic(text, path, overwrite=overwrite)


def save_file_atomic(tensors: dict, path, metadata: dict[str, str] | None = None, *, overwrite: bool = True) -> Path:
    """A .safetensors file, atomically, readable like any file the user writes."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata), overwrite=overwrite)


# -- one run per output folder ---------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


class FolderLock:
    """``with FolderLock(out, "trainer train"):`` — one run at a time per output folder.

    The lock file is created with O_EXCL, so of two runs started together exactly one wins. The holder's PID,
    host and command are written into it; a lock left by a dead process on this host is taken over (with a
    warning); a lock from another host (a shared disk) is never taken over silently: the message says how to
    remove it. Re-entrant within one process (a nested lock on the same folder is a no-op).
    """

    _held: dict[str, int] = {}

    def __init__(self, folder: str | os.PathLike, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300]
        self._key = ""
        self._owned = False

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                info = json.loads(handle.read(4096) or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "FolderLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputPathError(f"The output folder {self.folder} is a file. Give a folder name.")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"Cannot create the output folder {self.folder} ({_why(exc)}).") from exc
        self._key = str(self.path.resolve())
        if FolderLock._held.get(self._key):
            FolderLock._held[self._key] += 1
            return self
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = self._read()
                pid = int(other.get("pid") or 0) if str(other.get("pid", "")).isdigit() else 0
                host = other.get("host") or ""
                if host and host != info["host"]:
                    raise FolderLockedError(
                        f"{self.folder} is in use by process {pid or '?'} on {host} ({other.get('command') or 'unknown command'}). "
                        f"Wait for it to finish, or if it is no longer running, delete {self.path}."
                    ) from None
                if pid and _pid_alive(pid):
                    raise FolderLockedError(
                        f"{self.folder} is in use by another run (PID {pid}: {other.get('command') or 'unknown command'}). "
                        f"Wait for it to finish or stop it, or choose another output folder."
                    ) from None
                log.warning("Taking over the stale lock %s (PID %s is not running).", self.path, pid or "?")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise OutputPathError(f"Cannot remove the stale lock {self.path} ({_why(exc)}).") from exc
                continue
            except OSError as exc:
                raise OutputPathError(f"Cannot write in the output folder {self.folder} ({_why(exc)}). "
                                      "Choose a folder you can write to.") from exc
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(info, handle)
            self._owned = True
            FolderLock._held[self._key] = 1
            return self
        raise FolderLockedError(f"Could not lock {self.folder}: another run keeps taking it. Choose another output folder.")

    def release(self):
        count = FolderLock._held.get(self._key, 0)
        if count > 1:
            FolderLock._held[self._key] = count - 1
            return
        FolderLock._held.pop(self._key, None)
        if self._owned:
            self._owned = False
            if self._read().get("pid") == os.getpid():
                try:
                    self.path.unlink()
                except OSError:
                    pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
