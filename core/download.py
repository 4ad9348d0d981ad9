"""`python -m lambda_eclipse download`: fetch the five weight files into a ComfyUI `models/` tree, verified.

What is fetched is listed in `manifest.json` next to this file: one JSON object per file with the Hugging Face
repository, file and revision it comes from, and the ComfyUI models subfolder and file name it goes to, plus its
size and sha256 where they are known (null where not).

How a file is fetched:

* Already in place with the right size and sha256 → skipped. Hashing gigabytes on every run is slow, so a file
  whose sha256 this command has checked once is recorded in `models/.lambda_eclipse_verified.json` (path, size,
  mtime, sha256); while the size and mtime are unchanged it is not hashed again (`--rehash` forces it).
* Otherwise `huggingface_hub.hf_hub_download(..., local_dir=<temp dir inside the destination folder>)` downloads
  it, so HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, its retries/resume within a run, its progress bars and a copy
  already in the Hugging Face cache all behave as usual, and nothing is stored twice. Only after its size and
  sha256 check out is it moved (os.replace, same folder) to its final name: a partial or bad file never has the
  final name. A failed check deletes it and raises an error naming the file, the expected and the got values.
* Where the manifest has no sha256 (or size), the file is checked against what the hub reports for it (the ETag of
  an LFS file is the sha256 of its content), and the log says so.
* Offline (HF_HUB_OFFLINE=1) or when the hub cannot be reached, files already in the Hugging Face cache are still
  placed; for the rest one error lists where each file goes, its URL and how to get it by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence
from urllib.parse import quote

from .errors import InputError, LambdaEclipseError, MissingModelsError, ModelFileError

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
FIELDS = ("key", "what", "repo", "file", "revision", "folder", "name", "size", "sha256")
# Optional fields: approx_size, the size as the hub lists it (bytes, rounded), printed as "~139 MB" while the exact
# byte count is not known (it is recorded in models/.lambda_eclipse_verified.json when a download is verified).
OPTIONAL_FIELDS = ("approx_size",)
# --only groups → manifest keys. Keys not listed here belong to the group named by their prefix before "_".
GROUPS = {
    "prior": ("prior",),
    "clip": ("clip_text", "clip_vision"),
    "decoder": ("decoder_unet", "decoder_movq"),
}
HUB_URL = "https://huggingface.co"
MARKER_NAME = ".lambda_eclipse_verified.json"
TMP_PREFIX = ".lambda_eclipse_download-"
_CHUNK = 8 << 20
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    what: str
    repo: str
    file: str
    revision: str
    folder: str
    name: str
    size: int | None = None
    sha256: str | None = None
    approx_size: int | None = None

    @property
    def group(self) -> str:
        for group, keys in GROUPS.items():
            if self.key in keys:
                return group
        return self.key.split("_", 1)[0]

    @property
    def relpath(self) -> str:
        """Where it goes, relative to models/ (forward slashes)."""
        return f"{self.folder}/{self.name}"

    @property
    def url(self) -> str:
        return manifest_url(self)

    def dest(self, models_dir: str | os.PathLike) -> Path:
        return Path(models_dir).joinpath(*PurePosixPath(self.folder).parts, self.name)

    @property
    def page(self) -> str:
        return f"{HUB_URL}/{self.repo}"

    def exact_size(self, models_dir: str | os.PathLike | None = None) -> int | None:
        """The byte count: the manifest's, else the one recorded when `download` verified this file in `models_dir`
        (its sha256 matching the manifest's), else None."""
        if self.size is not None:
            return self.size
        return recorded_size(self, models_dir) if models_dir else None

    def size_text(self, models_dir: str | os.PathLike | None = None) -> str:
        """'1.39 GB' when the size is known (manifest, or measured by a verified download), '~139 MB' from the hub's
        listing, 'size unknown' otherwise."""
        exact = self.exact_size(models_dir)
        if exact:
            return human_size(exact)
        if self.approx_size:
            return approx_size_text(self.approx_size)
        return "size unknown"

    def describe(self, models_dir: str | os.PathLike | None = None) -> str:
        """Where it goes and where it comes from, for the 'files are missing' message."""
        where = self.dest(models_dir if models_dir else "models")
        return f"  - {self.what} ({self.size_text(models_dir)}): put it at\n      {where}\n    download: {self.url}"


def human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def approx_size_text(size: int) -> str:
    """An approximate size as the hub lists it: 139_000_000 → '~139 MB', 1_400_000_000 → '~1.4 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"~{size / scale:.3g} {unit}"
    return f"~{size} B"


def recorded_size(entry: "ManifestEntry", models_dir: str | os.PathLike) -> int | None:
    """The byte count `download` recorded for `entry` in models_dir's verification marker, when the recorded sha256
    is the manifest's (or the manifest has none: the record was checked against the hub's); else None."""
    record = _Marker(Path(models_dir)).files.get(entry.relpath)
    if not isinstance(record, dict) or not isinstance(record.get("size"), int) or isinstance(record.get("size"), bool):
        return None
    if entry.sha256 is not None and record.get("sha256") != entry.sha256:
        return None
    return record["size"] if record["size"] > 0 else None


def manifest_url(entry: ManifestEntry) -> str:
    """The direct download link: https://huggingface.co/{repo}/resolve/{revision}/{file}."""
    return f"{HUB_URL}/{entry.repo}/resolve/{quote(entry.revision, safe='')}/{quote(entry.file)}"


def _safe_relpath(value: str, what: str, *, single: bool) -> str | None:
    """None when `value` is a harmless relative path (one component when `single`), else why not."""
    if not value:
        return f"{what} is empty"
    if "\\" in value or "\x00" in value:
        return f"{what} {value!r} contains a backslash or NUL (use '/' between folders)"
    if value.startswith("/") or re.match(r"[A-Za-z]:", value):
        return f"{what} {value!r} is an absolute path; it must be relative"
    parts = value.split("/")
    if single and len(parts) != 1:
        return f"{what} {value!r} must be a file name, not a path"
    for part in parts:
        if part in ("", ".", ".."):
            return f"{what} {value!r} has an empty, '.' or '..' component (path traversal is not allowed)"
    return None


def _parse_entry(raw, index: int, source: str) -> ManifestEntry:
    where = f"{source}, entry {index + 1}"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(raw).__name__}.")
    if isinstance(raw.get("key"), str):
        where += f" ({raw['key']!r})"
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)} (every entry needs {', '.join(FIELDS)}; "
                         "size and sha256 may be null when unknown).")
    unknown = sorted(k for k in raw if k not in FIELDS + OPTIONAL_FIELDS and not str(k).startswith("_"))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS + OPTIONAL_FIELDS)} "
                         "(fields starting with '_' are comments).")
    for f in ("key", "what", "repo", "file", "revision", "folder", "name"):
        if not isinstance(raw[f], str) or not raw[f].strip():
            raise InputError(f"{where}: {f} must be a non-empty string, got {raw[f]!r}.")
    if not _KEY.fullmatch(raw["key"]):
        raise InputError(f"{where}: key {raw['key']!r} may only use letters, digits, '_', '.', '-'.")
    if not _REPO.fullmatch(raw["repo"]):
        raise InputError(f"{where}: repo {raw['repo']!r} is not a Hugging Face id like 'owner/name'.")
    if re.search(r"\s", raw["revision"]) or ".." in raw["revision"]:
        raise InputError(f"{where}: revision {raw['revision']!r} is not a branch, tag or commit.")
    for f, single in (("file", False), ("folder", False), ("name", True)):
        problem = _safe_relpath(raw[f], f, single=single)
        if problem:
            raise InputError(f"{where}: {problem}.")
    if raw["name"].startswith("."):
        raise InputError(f"{where}: name {raw['name']!r} must not start with '.' (hidden and temporary files do).")
    size = raw["size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise InputError(f"{where}: size must be a byte count (an integer ≥ 0) or null, got {size!r}.")
    approx = raw.get("approx_size")
    if approx is not None and (isinstance(approx, bool) or not isinstance(approx, int) or approx < 0):
        raise InputError(f"{where}: approx_size must be a byte count (an integer ≥ 0) or null, got {approx!r}.")
    sha = raw["sha256"]
    if sha is not None and (not isinstance(sha, str) or not _SHA256.fullmatch(sha)):
        raise InputError(f"{where}: sha256 must be 64 hexadecimal digits or null, got {sha!r}.")
    return ManifestEntry(
        key=raw["key"], what=raw["what"], repo=raw["repo"], file=raw["file"], revision=raw["revision"],
        folder=raw["folder"].strip("/"), name=raw["name"], size=size, sha256=sha.lower() if sha else None,
        approx_size=approx,
    )


def parse_manifest(data, source: str = "manifest") -> list[ManifestEntry]:
    """Validate already-parsed manifest JSON (a list of objects)."""
    if not isinstance(data, list) or not data:
        raise InputError(f"{source}: expected a non-empty JSON list of file entries.")
    entries = [_parse_entry(raw, i, source) for i, raw in enumerate(data)]
    keys: dict[str, int] = {}
    dests: dict[str, ManifestEntry] = {}
    for entry in entries:
        if entry.key in keys:
            raise InputError(f"{source}: duplicate key {entry.key!r}.")
        keys[entry.key] = 1
        folded = entry.relpath.casefold()  # two names differing in case collide on Windows and macOS
        if folded in dests:
            raise InputError(f"{source}: {entry.key!r} and {dests[folded].key!r} both go to {entry.relpath!r} "
                             "(duplicate folder/name).")
        dests[folded] = entry
    return entries


def load_manifest(path: str | os.PathLike | None = None) -> list[ManifestEntry]:
    """The manifest at `path` (the shipped `core/manifest.json` by default), validated."""
    path = Path(path) if path is not None else MANIFEST_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"Cannot read the manifest {path}: {exc.strerror or exc}.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"The manifest {path} is not valid JSON: {exc}.") from exc
    return parse_manifest(data, str(path))


def select_entries(entries: Sequence[ManifestEntry], only: str | Iterable[str] | None) -> list[ManifestEntry]:
    """The entries of the chosen groups (prior, clip, decoder) or keys; all when `only` is None."""
    if only is None:
        return list(entries)
    wanted = [w.strip() for w in re.split(r"[,\s]+", only)] if isinstance(only, str) else [str(w).strip() for w in only]
    wanted = [w for w in wanted if w]
    groups = list(dict.fromkeys([*GROUPS, *(e.group for e in entries)]))
    keys = [e.key for e in entries]
    if not wanted:
        raise InputError(f"--only is empty; choose from {', '.join(groups)}.")
    unknown = [w for w in wanted if w not in groups and w not in keys]
    if unknown:
        raise InputError(f"--only: unknown group {', '.join(map(repr, unknown))}; choose from {', '.join(groups)} "
                         f"(comma-separated), or single files: {', '.join(keys)}.")
    chosen = [e for e in entries if e.group in wanted or e.key in wanted]
    if not chosen:
        raise InputError(f"--only {','.join(wanted)}: no file of this manifest belongs to it.")
    return chosen


# ---------------------------------------------------------------------------------------------- small helpers


def human_bytes(n: int | None) -> str:
    if n is None:
        return "size unknown"
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{n} bytes"


def sha256_file(path: str | os.PathLike) -> str:
    """Streamed sha256 of a file (8 MiB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_and_hash(src: str | os.PathLike, dst: Path) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


class _Marker:
    """models/.lambda_eclipse_verified.json: files whose sha256 this command has checked, by size and mtime."""

    def __init__(self, models_dir: Path):
        self.path = models_dir / MARKER_NAME
        self.files: dict[str, dict] = {}
        from .fsio import not_regular_reason

        if not_regular_reason(self.path) is not None:  # a FIFO or folder there: never block reading it
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                self.files = data["files"]
        except (OSError, ValueError):
            pass

    def lookup(self, rel: str, path: Path) -> str | None:
        """The recorded sha256 when the file is unchanged since it was checked, else None."""
        rec = self.files.get(rel)
        if not isinstance(rec, dict):
            return None
        st = path.stat()
        if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and isinstance(rec.get("sha256"), str):
            return rec["sha256"]
        return None

    def record(self, rel: str, path: Path, sha: str) -> None:
        """Remember the file's sha256 with its exact byte count (the size `check` and the messages then print)."""
        from .fsio import write_text_atomic

        st = path.stat()
        self.files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        try:
            write_text_atomic(json.dumps({"version": 1, "files": self.files}, indent=1, sort_keys=True), self.path)
        except (OSError, LambdaEclipseError):  # a read-only models/ folder: the files are fine, hashed next time
            pass


@dataclass
class _Expect:
    size: int | None
    sha256: str | None
    size_from: str = "manifest"
    sha_from: str = "manifest"


@dataclass
class DownloadReport:
    fetched: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    bytes_fetched: int = 0
    bytes_skipped: int = 0
    # files accepted without a sha256 check (no hash known anywhere, hub unreachable)
    unverified: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"fetched {len(self.fetched)} file(s), {human_bytes(self.bytes_fetched)} downloaded "
                f"({self.bytes_fetched} bytes); skipped {len(self.skipped)} already in place "
                f"({human_bytes(self.bytes_skipped)})")
        if self.unverified:
            text += f"; {len(self.unverified)} in place but not hash-checked"
        return text


class _Unavailable(Exception):
    """A file could not be fetched for a reason the user can act on (network, access, missing on the hub).

    `down`: the hub cannot be reached at all, so the remaining files are not asked for (only the HF cache is tried).
    """

    def __init__(self, reason: str, down: bool = False):
        super().__init__(reason)
        self.reason, self.down = reason, down


def _hub():
    try:
        import huggingface_hub  # noqa: F401
        from huggingface_hub import constants
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ModelFileError("Downloading needs the huggingface_hub package: pip install huggingface_hub") from exc
    return constants


def _describe_hub_error(exc: BaseException, entry: ManifestEntry, endpoint: str) -> _Unavailable:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return _Unavailable("offline mode is on (HF_HUB_OFFLINE=1)", down=True)
    if isinstance(exc, hf_errors.GatedRepoError):
        return _Unavailable(f"{entry.repo} is gated: accept its terms at {HUB_URL}/{entry.repo} and set HF_TOKEN "
                            "(or run `hf auth login`)")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return _Unavailable(f"repository {entry.repo} not found at {endpoint} (or it is private: set HF_TOKEN)")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return _Unavailable(f"{entry.repo} has no revision {entry.revision!r} (the manifest is out of date?)")
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return _Unavailable(f"{entry.repo} has no file {entry.file!r} at revision {entry.revision!r} "
                            "(the manifest is out of date?)")
    if status in (401, 403):
        return _Unavailable(f"access denied (HTTP {status}) to {entry.repo}: set HF_TOKEN to a token that can read it")
    if isinstance(exc, hf_errors.HfHubHTTPError) and status is not None:
        return _Unavailable(f"the hub answered HTTP {status} ({str(exc).splitlines()[0][:200]}); try again later")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        return _Unavailable(f"could not reach {endpoint}" + (f" ({cause})" if cause else ""), down=True)
    text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError, ConnectionError)):
        return _Unavailable(f"could not reach {endpoint} ({type(exc).__name__}: {text})", down=True)
    if isinstance(exc, OSError) and getattr(exc, "errno", None):
        return _Unavailable(f"{type(exc).__name__}: {text}")  # disk full, permission denied…
    return _Unavailable(f"could not download it from {endpoint} ({type(exc).__name__}: {text})")


def _hub_errors():
    import httpx2  # huggingface_hub's HTTP client

    return (OSError, httpx2.HTTPError)


def _hub_sha(etag: str | None) -> str | None:
    return etag.lower() if etag and _SHA256.fullmatch(etag) else None


def _disk_full(exc: BaseException) -> bool:
    """True for 'no space left' / 'quota exceeded', also when wrapped by another exception."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# huggingface_hub logs a warning per retry of a broken or stalled transfer (and, where the root logger has a handler
# too, prints each twice): these loggers are quietened while a file is fetched, and one line per file says what
# happened.
_HUB_LOGGERS = ("huggingface_hub.file_download", "huggingface_hub.utils._http")


class _HubWarnings(logging.Filter):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _hub_warnings_collected():
    collected = _HubWarnings()
    loggers = [logging.getLogger(name) for name in _HUB_LOGGERS]
    for logger in loggers:
        logger.addFilter(collected)
    try:
        yield collected
    finally:
        for logger in loggers:
            logger.removeFilter(collected)


# ------------------------------------------------------------------------------------------------ downloading


class _Downloader:
    def __init__(self, models_dir: Path, log: Log, rehash: bool):
        self.constants = _hub()
        self.models_dir, self.log, self.rehash = models_dir, log, rehash
        self.marker = _Marker(models_dir)
        self.offline = bool(self.constants.is_offline_mode())
        self.network_down: str | None = "offline mode is on (HF_HUB_OFFLINE=1)" if self.offline else None
        self.endpoint = self.constants.ENDPOINT
        self.report = DownloadReport()
        self.missing: list[tuple[ManifestEntry, str, _Expect]] = []
        self.created: list[Path] = []  # folders made for the file being fetched (removed again if it fails)

    # -- hub metadata
    def hub_metadata(self, entry: ManifestEntry):
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(entry.repo, entry.file, revision=entry.revision)
        try:
            return get_hf_file_metadata(url)
        except _hub_errors() as exc:
            raise _describe_hub_error(exc, entry, self.endpoint) from exc

    def expect(self, entry: ManifestEntry, meta) -> _Expect:
        """Manifest values, completed and cross-checked with the hub's report (`meta`, may be None)."""
        exp = _Expect(entry.size, entry.sha256)
        if meta is None:
            return exp
        hub_sha, hub_size = _hub_sha(meta.etag), meta.size
        label = f"{entry.repo}/{entry.file}@{entry.revision}"
        if exp.sha256 and hub_sha and hub_sha != exp.sha256:
            raise ModelFileError(
                f"{label}: the hub reports sha256 {hub_sha} but the manifest expects {exp.sha256}. The file on the hub "
                f"changed or the manifest is wrong; nothing was downloaded for {entry.relpath}.")
        if exp.size is not None and hub_size is not None and hub_size != exp.size:
            raise ModelFileError(
                f"{label}: the hub reports {hub_size} bytes but the manifest expects {exp.size}. The file on the hub "
                f"changed or the manifest is wrong; nothing was downloaded for {entry.relpath}.")
        if exp.sha256 is None:
            if hub_sha:
                exp.sha256, exp.sha_from = hub_sha, "the hub"
                self.log(f"  note: the manifest has no sha256 for {entry.key}; checking against the hub's "
                         f"sha256 {hub_sha}")
            else:
                self.log(f"  note: neither the manifest nor the hub gives a sha256 for {entry.key} "
                         f"(hub ETag {meta.etag!r}); only its size can be checked")
        if exp.size is None and hub_size is not None:
            exp.size, exp.size_from = hub_size, "the hub"
        return exp

    # -- checks
    def verify(self, path: Path, entry: ManifestEntry, exp: _Expect, dest: Path) -> str:
        """sha256 of `path` after checking size and hash; deletes it and raises on a mismatch."""
        got_size = path.stat().st_size
        problem = None
        if exp.size is not None and got_size != exp.size:
            problem = f"size: expected {exp.size} bytes (from {exp.size_from}), got {got_size}"
            got_sha = None
        else:
            got_sha = sha256_file(path)
            if exp.sha256 and got_sha != exp.sha256:
                problem = f"sha256: expected {exp.sha256} (from {exp.sha_from}), got {got_sha}"
        if problem:
            path.unlink(missing_ok=True)
            raise ModelFileError(
                f"{entry.repo}/{entry.file}@{entry.revision} for {entry.relpath} failed verification, {problem}. "
                f"The bad file was deleted and nothing was written to {dest}. Run the download again; if it fails "
                "again, the file on the hub changed or the manifest is wrong.")
        return got_sha

    def existing_ok(self, entry: ManifestEntry, dest: Path) -> bool:
        size = dest.stat().st_size
        if entry.size is not None and size != entry.size:
            self.log(f"  {entry.relpath} exists but has {size} bytes instead of {entry.size}; downloading it again")
            return False
        recorded = None if self.rehash else self.marker.lookup(entry.relpath, dest)
        if recorded and (entry.sha256 is None or recorded == entry.sha256):
            return True
        exp = _Expect(entry.size, entry.sha256)
        if exp.sha256 is None and self.network_down is None:
            try:
                exp = self.expect(entry, self.hub_metadata(entry))
            except _Unavailable as why:
                if why.down:
                    self.network_down = why.reason
                self.log(f"  cannot ask the hub about {entry.key} ({why.reason})")
        if exp.size is not None and size != exp.size:
            self.log(f"  {entry.relpath} exists but has {size} bytes instead of {exp.size} (from {exp.size_from}); "
                     "downloading it again")
            return False
        if exp.sha256 is None:
            why = "the hub is not reachable" if self.network_down else "the hub gives none either"
            how = "on its size" if exp.size is not None else "unchecked"
            self.log(f"  {entry.relpath} exists; the manifest has no sha256 for it and {why}: accepted {how}")
            self.report.unverified.append(dest)
            return True
        self.log(f"  checking the sha256 of the existing {entry.relpath} ({human_bytes(size)}, done once)…")
        got = sha256_file(dest)
        if got != exp.sha256:
            self.log(f"  {entry.relpath} exists but its sha256 is {got}, expected {exp.sha256} (from {exp.sha_from}); "
                     "downloading it again")
            return False
        self.marker.record(entry.relpath, dest, got)
        return True

    # -- one file
    def run_entry(self, entry: ManifestEntry, n: int, total: int) -> None:
        dest = entry.dest(self.models_dir)
        self.log(f"[{n}/{total}] {entry.key}: {entry.what}")
        if dest.is_file():
            if self.existing_ok(entry, dest):
                self.log(f"  in place: {dest} — skipped")
                self.report.skipped.append(dest)
                self.report.bytes_skipped += dest.stat().st_size
                return
        elif dest.exists():
            raise ModelFileError(f"{dest} exists but is not a file; move it away and run the download again.")
        self.log(f"  {entry.repo} / {entry.file} @ {entry.revision}\n  → {dest}")
        tmpdir = dest.parent / f"{TMP_PREFIX}{entry.name}"
        self.created = []
        try:
            with _hub_warnings_collected() as hub_warnings:
                try:
                    if self.network_down is None:
                        try:
                            self.fetch(entry, dest, tmpdir)
                            return
                        except _Unavailable as why:
                            if not why.down:
                                self.missing.append((entry, why.reason, _Expect(entry.size, entry.sha256)))
                                self.log(f"  not downloaded: {why.reason}")
                                return
                            self.network_down = why.reason
                    if self.from_hf_cache(entry, dest, tmpdir):
                        return
                    self.missing.append((entry, self.network_down or "unavailable", _Expect(entry.size, entry.sha256)))
                    self.log(f"  not downloaded: {self.network_down}")
                finally:
                    if hub_warnings.messages:  # one line for all of huggingface_hub's retry warnings of this file
                        last = hub_warnings.messages[-1].splitlines()[0][:200]
                        self.log(f"  the transfer of {entry.name} was interrupted {len(hub_warnings.messages)} time(s) "
                                 f"and huggingface_hub retried (last: {last})")
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
            if not dest.is_file():
                self._remove_created_folders()

    def _make_folder(self, folder: Path) -> None:
        """Create `folder` (only now that a file is about to be written there), remembering what was new."""
        new = []
        probe = folder
        while not probe.exists() and probe.parent != probe:
            new.append(probe)
            probe = probe.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelFileError(f"Cannot create the folder {folder} ({exc.strerror or exc}). Check that the --models "
                                 "folder is writable, or choose another one.") from exc
        self.created.extend(new)  # deepest first

    def _remove_created_folders(self) -> None:
        """A file that was not placed leaves no empty folder behind (only folders this run made, only if empty)."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []

    def _prepare(self, dest: Path, tmpdir: Path, need: int | None) -> None:
        self._make_folder(dest.parent)
        if tmpdir.exists():
            shutil.rmtree(tmpdir, ignore_errors=True)  # left by a run that was killed
        if need:
            free = shutil.disk_usage(dest.parent).free
            if free < need:
                raise ModelFileError(f"Not enough free space in {dest.parent} for {dest.name}: {human_bytes(need)} "
                                     f"needed, {human_bytes(free)} free. Free some space (or give a --models folder on "
                                     "another disk) and run the download again.")

    def _disk_full_error(self, entry: ManifestEntry, dest: Path, exc: BaseException) -> ModelFileError:
        try:
            free = human_bytes(shutil.disk_usage(dest.parent).free) + " free now"
        except OSError:
            free = "free space unknown"
        return ModelFileError(
            f"The disk filled up while writing {entry.key} ({entry.name}) into {dest.parent} ({exc}; {free}). The "
            f"partial file was deleted and nothing was written to {dest}. Free some space (or give a --models folder "
            "on another disk) and run the download again.")

    def _place(self, path: Path, entry: ManifestEntry, dest: Path, sha: str, nbytes: int) -> None:
        os.replace(path, dest)
        self.marker.record(entry.relpath, dest, sha)
        self.report.fetched.append(dest)
        self.report.bytes_fetched += nbytes

    def fetch(self, entry: ManifestEntry, dest: Path, tmpdir: Path) -> None:
        from huggingface_hub import hf_hub_download

        exp = self.expect(entry, self.hub_metadata(entry))
        self.log(f"  {human_bytes(exp.size)}" + (f", sha256 {exp.sha256}" if exp.sha256 else ""))
        self._prepare(dest, tmpdir, exp.size)
        try:
            got = Path(hf_hub_download(entry.repo, entry.file, revision=entry.revision, local_dir=tmpdir))
        except _hub_errors() as exc:
            if _disk_full(exc):
                raise self._disk_full_error(entry, dest, exc) from exc
            raise _describe_hub_error(exc, entry, self.endpoint) from exc
        self.log(f"  verifying {entry.name} …")
        sha = self.verify(got, entry, exp, dest)
        nbytes = got.stat().st_size
        self._place(got, entry, dest, sha, nbytes)
        self.log(f"  ok: {human_bytes(nbytes)}, sha256 {sha}")

    def from_hf_cache(self, entry: ManifestEntry, dest: Path, tmpdir: Path) -> bool:
        """Offline: place a copy found in the Hugging Face cache (verified). False when there is none."""
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(entry.repo, entry.file, revision=entry.revision)
        if not isinstance(cached, str) or not os.path.isfile(cached):
            return False
        exp = _Expect(entry.size, entry.sha256)
        blob_sha = _hub_sha(os.path.basename(os.path.realpath(cached)))  # cache blobs are named by their ETag
        if exp.sha256 is None and blob_sha:
            exp.sha256, exp.sha_from = blob_sha, "the hub (as recorded by the Hugging Face cache)"
        self.log(f"  found in the Hugging Face cache: {cached}; copying")
        self._prepare(dest, tmpdir, os.path.getsize(cached))
        tmpdir.mkdir(parents=True, exist_ok=True)
        tmp = tmpdir / entry.name
        try:
            _copy_and_hash(cached, tmp)
        except OSError as exc:
            if _disk_full(exc):
                raise self._disk_full_error(entry, dest, exc) from exc
            raise ModelFileError(f"Could not copy {cached} to {tmp} ({exc.strerror or exc}).") from exc
        sha = self.verify(tmp, entry, exp, dest)
        nbytes = tmp.stat().st_size
        self._place(tmp, entry, dest, sha, 0)
        self.log(f"  ok: {human_bytes(nbytes)}, sha256 {sha} (from the cache, nothing downloaded)")
        return True

    def missing_message(self) -> str:
        offline = self.offline
        lines = [
            f"{len(self.missing)} model file(s) could not be downloaded"
            + (" because offline mode is on (HF_HUB_OFFLINE=1)" if offline else "")
            + ". Download each by hand and put it exactly where shown (then run this command again to verify them):"
        ]
        for entry, reason, exp in self.missing:
            dest = entry.dest(self.models_dir)
            size = human_bytes(exp.size) if exp.size is not None else entry.size_text(self.models_dir)
            lines += [
                f"  - {entry.what} [{entry.key}] ({size})",
                f"      put:      {dest}",
                f"      download: {manifest_url(entry)}",
            ]
            if exp.sha256:
                lines.append(f"      sha256:   {exp.sha256}")
            if not offline:
                lines.append(f"      why:      {reason}")
            lines.append(f"      e.g.:     curl -L -C - --create-dirs -o \"{dest}\" \"{manifest_url(entry)}\"")
        if offline:
            lines.append("Or unset HF_HUB_OFFLINE and run this command again.")
        elif any(_is_network(reason) for _, reason, _ in self.missing):
            lines.append("Check your connection (a proxy or mirror goes in HTTPS_PROXY / HF_ENDPOINT; now "
                         f"{self.endpoint}) and run this command again.")
        if self.report.fetched or self.report.skipped:
            lines.append(f"The other {len(self.report.fetched) + len(self.report.skipped)} file(s) are in place.")
        return "\n".join(lines)

    def stopped_message(self, error: str, not_tried: Sequence[ManifestEntry]) -> str:
        """The error that stopped the run, then what happened to the files before it and which were not tried."""
        lines = [error]
        if self.missing:
            lines.append(f"Before that, {len(self.missing)} file(s) could not be downloaded:")
            lines += [f"  - {entry.key} ({entry.dest(self.models_dir)}): {reason}" for entry, reason, _ in self.missing]
        if not_tried:
            lines.append(f"Not tried: {', '.join(e.key for e in not_tried)}.")
        return "\n".join(lines)


def _is_network(reason: str) -> bool:
    return reason.startswith(("could not", "offline", "the hub answered"))


def download_models(
    models_dir: str | os.PathLike,
    only: str | Iterable[str] | None = None,
    manifest: str | os.PathLike | Sequence[ManifestEntry] | None = None,
    log: Log = print,
    *,
    rehash: bool = False,
) -> DownloadReport:
    """Fetch the manifest's files (or the `only` groups: prior, clip, decoder) into the ComfyUI `models_dir`.

    Folders are created only when a file is about to be written into them, and removed again (when this call made
    them and they stayed empty) if that file could not be placed.

    Files already in place and verified are skipped. Raises ModelFileError when a download fails verification (the
    bad file is deleted) and MissingModelsError, after trying every file, listing the ones that could not be
    fetched (offline, network, access), with their destinations and URLs.
    """
    if manifest is None or isinstance(manifest, (str, os.PathLike)):
        entries = load_manifest(manifest)
    else:
        entries = list(manifest)
        if not all(isinstance(e, ManifestEntry) for e in entries):
            raise InputError("manifest: expected a path or a list of ManifestEntry.")
    chosen = select_entries(entries, only)
    models_dir = Path(models_dir).expanduser()
    if models_dir.exists() and not models_dir.is_dir():
        raise InputError(f"--models {models_dir} is a file, not a folder. Give the ComfyUI models/ folder.")
    # Nothing is created up front: each folder (models_dir too) is made when a file is about to be written there.
    # The command line refuses a --models that does not exist first (check_models_folder): a typo is never filled.
    if (models_dir / "models").is_dir() and not any((models_dir / d).is_dir() for d in ("checkpoints", "vae", "clip_vision")):
        log(f"note: {models_dir} has a models/ folder inside; if it is the ComfyUI folder, use --models {models_dir / 'models'}")

    dl = _Downloader(models_dir, log, rehash)
    where = "offline (HF_HUB_OFFLINE=1)" if dl.offline else f"from {dl.endpoint}"
    log(f"{len(chosen)} file(s) into {models_dir}, {where}")
    for n, entry in enumerate(chosen, 1):
        try:
            dl.run_entry(entry, n, len(chosen))
        except LambdaEclipseError as exc:
            if not dl.missing and n == len(chosen):
                raise
            raise type(exc)(dl.stopped_message(str(exc), chosen[n:])) from exc
    log(dl.report.summary())
    if dl.missing:
        raise MissingModelsError(dl.missing_message())
    return dl.report


def looks_like_comfyui_root(folder: Path) -> bool:
    """A ComfyUI installation folder (the one that holds models/): main.py with comfy/ or custom_nodes/ beside it."""
    return (folder / "main.py").is_file() and ((folder / "comfy").is_dir() or (folder / "custom_nodes").is_dir())


def check_models_folder(models_dir: str | os.PathLike, flag: str = "--models") -> Path:
    """Refuse, creating nothing, a models folder that is a file, or that does not exist (a typo would otherwise be
    created silently and filled with 10 GB). A missing `models/` inside a ComfyUI installation is fine: it is made
    when the first file is written."""
    models_dir = Path(models_dir).expanduser()
    if models_dir.is_dir():
        return models_dir
    if models_dir.exists():
        raise InputError(f"{flag} {models_dir} is a file, not a folder. Give the ComfyUI models/ folder (the one "
                         "holding checkpoints/, vae/, clip_vision/ …).")
    if models_dir.name == "models" and looks_like_comfyui_root(models_dir.parent):
        return models_dir
    raise InputError(f"{flag} {models_dir} does not exist, and nothing was created. Check the path: it is the models/ "
                     "folder inside your ComfyUI folder (e.g. ComfyUI/models). To keep the files somewhere else, "
                     f"create the folder first (mkdir -p {models_dir}).")


# ------------------------------------------------------------------------------------------------ command line


def add_download_parser(subparsers) -> argparse.ArgumentParser:
    """Register `download` on an argparse subparsers object; sets func=cmd_download."""
    p = subparsers.add_parser(
        "download",
        help="download the five weight files into a ComfyUI models/ folder (verified, resumable)",
        description="Download the λ-ECLIPSE prior, the OpenCLIP bigG text and vision towers and the Kandinsky 2.2 "
                    "decoder (UNet + MoVQ) from the Hugging Face hub into a ComfyUI models/ folder. Files already in "
                    "place are checked and skipped. Honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE.",
    )
    from .paths import MODELS_ENV_HELP

    groups = "; ".join(f"{g} (= {', '.join(keys)})" if keys != (g,) else g for g, keys in GROUPS.items())
    try:
        keys = ", ".join(e.key for e in load_manifest())
    except InputError:  # a broken shipped manifest is reported when it is used, not by --help
        keys = ", ".join(k for ks in GROUPS.values() for k in ks)
    p.add_argument("--models", metavar="DIR", help="the ComfyUI models/ folder; it must exist (a mistyped path is "
                   f"never created). Default: {MODELS_ENV_HELP}")
    p.add_argument("--only", metavar="LIST", help=f"comma-separated groups: {groups}; or single files: {keys}. "
                   "Default: all five files")
    p.add_argument("--manifest", metavar="FILE", help="a manifest JSON to use instead of the shipped one (default: "
                   "core/manifest.json of the package)")
    p.add_argument("--rehash", action="store_true", help="re-check the sha256 of files already in place even when "
                   "they were verified before")
    p.set_defaults(func=cmd_download)
    return p


def cmd_download(args) -> int:
    from .paths import MODELS_ENV_HELP, default_models_dir

    models, source = getattr(args, "models", None), "--models"
    if not models:
        models, source = default_models_dir()
    if models:
        check_models_folder(models, flag=source)
    else:
        raise InputError(f"download: give the ComfyUI models/ folder with --models DIR (default: {MODELS_ENV_HELP}; "
                         "neither is set).")
    manifest = getattr(args, "manifest", None)
    download_models(models, only=getattr(args, "only", None), manifest=manifest, rehash=getattr(args, "rehash", False))
    return 0


__all__ = [
    "DownloadReport", "GROUPS", "MANIFEST_PATH", "ManifestEntry", "add_download_parser", "cmd_download",
    "download_models", "load_manifest", "manifest_url", "parse_manifest", "select_entries", "sha256_file",
]
