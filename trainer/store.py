"""Feature store: sharded safetensors + JSON index, compact and crash-safe.

Layout of a feature folder::

    index.json                 dims, shard list (examples, bytes, sha256), skip counts, CLIP source
    meta.safetensors           blank (no-edge) control embedding [E]
    shards/shard-00000.safetensors   one shard, written as .tmp then os.replace'd
    shards/shard-00000.json          its sidecar (written last: the shard is complete iff it exists)

A shard holds N examples, all fp16 except ids/offsets:

    image   [N,E]   target CLIP image embedding
    pooled  [N,E]   pooled projected text embedding
    control [N,E]   CLIP embedding of the target's Canny map
    tokens  [T,E]   only the real text tokens (SOT..EOT) of every caption, concatenated
    ids     [T]     int32 token ids for those tokens
    tok_off [N+1]   int64 offsets into tokens/ids
    subj    [S,E]   subject embeddings, concatenated
    subj_off[N+1]   int64 offsets into subj
metadata["examples"] = JSON list of {key, caption, words, word_ids} (the rule inputs for interleaving).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .fsio import save_file_atomic, write_json_atomic

FORMAT = "lambda-eclipse-features/1"
INDEX_MAX_BYTES = 256 << 20  # an index lists shards (~300 bytes each): far more than any real one


class ShardError(DataError):
    """A feature shard is missing, torn or corrupt."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path):
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def pack_examples(examples: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """examples: dicts with image/pooled/control [E], tokens [t,E], ids [t], subj [s,E], key, caption, words, word_ids."""
    E = examples[0]["image"].shape[-1] if examples else 0
    tok_off, subj_off = [0], [0]
    for ex in examples:
        tok_off.append(tok_off[-1] + ex["tokens"].shape[0])
        subj_off.append(subj_off[-1] + ex["subj"].shape[0])

    def cat(name, shape_tail):
        parts = [ex[name].reshape(-1, *shape_tail) for ex in examples]
        return torch.cat(parts).to(torch.float16) if parts else torch.zeros(0, *shape_tail, dtype=torch.float16)

    tensors = {
        "image": cat("image", (E,)),
        "pooled": cat("pooled", (E,)),
        "control": cat("control", (E,)),
        "tokens": cat("tokens", (E,)),
        "ids": torch.cat([ex["ids"].reshape(-1).to(torch.int32) for ex in examples]) if examples else torch.zeros(0, dtype=torch.int32),
        "tok_off": torch.tensor(tok_off, dtype=torch.int64),
        "subj": cat("subj", (E,)),
        "subj_off": torch.tensor(subj_off, dtype=torch.int64),
    }
    meta = {"format": FORMAT, "examples": json.dumps(
        [{"key": ex["key"], "caption": ex["caption"], "words": ex["words"], "word_ids": ex["word_ids"]} for ex in examples],
        separators=(",", ":"))}
    return tensors, meta


def write_shard(folder: Path, index: int, examples: list[dict], skips: dict, records: int):
    """Atomic: the .safetensors first (tmp + replace), then the sidecar that marks it complete."""
    shards = Path(folder) / "shards"
    try:
        shards.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from ..core.errors import OutputPathError

        raise OutputPathError(f"Cannot create {shards} ({exc.strerror or exc}). Check the free space and the "
                              "permissions of --out; rerun the same command to resume.") from exc
    path = shards / (shard_name(index) + ".safetensors")
    tensors, meta = pack_examples(examples)
    save_file_atomic(tensors, path, metadata=meta)
    side = {
        "shard": index, "file": path.name, "examples": len(examples), "records": records,
        "bytes": path.stat().st_size, "sha256": sha256_file(path), "skipped": dict(skips),
        "tokens": int(tensors["tokens"].shape[0]), "subjects": int(tensors["subj"].shape[0]),
    }
    write_json_atomic(side, shards / (shard_name(index) + ".json"))
    _fsync_dir(shards)
    return side


def shard_done(folder: Path, index: int) -> dict | None:
    """The sidecar if shard `index` is complete (sidecar present and file size matches), else None."""
    shards = Path(folder) / "shards"
    side_path = shards / (shard_name(index) + ".json")
    path = shards / (shard_name(index) + ".safetensors")
    if not side_path.is_file() or not path.is_file():
        return None
    try:
        side = json.loads(side_path.read_text())
    except ValueError:
        return None
    if side.get("bytes") != path.stat().st_size:
        return None
    return side


@dataclass
class Shard:
    """A loaded shard (fp16 tensors kept as stored; cast per batch)."""

    path: Path
    image: torch.Tensor
    pooled: torch.Tensor
    control: torch.Tensor
    tokens: torch.Tensor
    ids: torch.Tensor
    tok_off: torch.Tensor
    subj: torch.Tensor
    subj_off: torch.Tensor
    examples: list[dict]

    def __len__(self):
        return self.image.shape[0]


def fix_hint(path: Path) -> str:
    return (f"Delete {path} and its .json sidecar, then rerun `python -m lambda_eclipse.trainer extract` with the "
            "same arguments: only that shard is redone.")


def load_shard(path: str | Path, sha256: str | None = None, verify: bool = True) -> Shard:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ShardError(f"Feature shard {path} is missing. {fix_hint(path)}")
    if verify and sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise ShardError(f"Feature shard {path} is corrupt (sha256 {actual[:12]}… ≠ {sha256[:12]}… in the index). {fix_hint(path)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        examples = json.loads(meta["examples"])
        n = t["image"].shape[0]
        ok = (
            meta.get("format") == FORMAT and len(examples) == n
            and t["tok_off"].shape[0] == n + 1 and t["subj_off"].shape[0] == n + 1
            and int(t["tok_off"][-1]) == t["tokens"].shape[0] == t["ids"].shape[0]
            and int(t["subj_off"][-1]) == t["subj"].shape[0]
        )
    except Exception as exc:  # torn header, bad JSON, missing key
        raise ShardError(f"Feature shard {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}). {fix_hint(path)}") from exc
    if not ok:
        raise ShardError(f"Feature shard {path} is inconsistent (offsets/examples do not add up). {fix_hint(path)}")
    return Shard(path, t["image"], t["pooled"], t["control"], t["tokens"], t["ids"], t["tok_off"], t["subj"], t["subj_off"], examples)


class FeatureStore:
    """Read side of a feature folder: index, shard sizes, lazily loaded shards (small LRU cache)."""

    def __init__(self, folder: str | Path, verify: bool = True, cache_shards: int = 8):
        self.folder = Path(folder)
        from .fsio import read_small_text

        index_path = self.folder / "index.json"
        if not index_path.exists():
            raise ShardError(f"{index_path} not found: run `python -m lambda_eclipse.trainer extract --out {self.folder}` first "
                             "(an interrupted extract writes the index when it finishes; rerun it to resume).")
        rerun = (f"Rerun `python -m lambda_eclipse.trainer extract --out {self.folder}` with the same arguments to "
                 "rewrite it (finished shards are kept).")
        try:
            self.index = json.loads(read_small_text(index_path, "The feature index", ShardError,
                                                    max_bytes=INDEX_MAX_BYTES, advice=rerun))
        except ShardError:
            raise
        except ValueError as exc:
            raise ShardError(f"{index_path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}). Rerun "
                             f"`python -m lambda_eclipse.trainer extract --out {self.folder}` with the same arguments "
                             "to rewrite it (finished shards are kept).") from exc
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            fmt = self.index.get("format") if isinstance(self.index, dict) else None
            raise ShardError(f"{index_path} is not a λ-ECLIPSE feature index (format {fmt!r}).")
        try:
            self.embed_dim = int(self.index["embed_dim"])
            self.context_length = int(self.index["context_length"])
            if self.embed_dim < 1 or not isinstance(self.index["shards"], list):
                raise ValueError("embed_dim < 1 or 'shards' is not a list")
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{index_path} is incomplete ({type(exc).__name__}: {exc}). {rerun}") from exc
        self.shards = [s for s in (self._checked_entry(k, s, index_path, rerun)
                                   for k, s in enumerate(self.index["shards"])) if s["examples"] > 0]
        self.sizes = [s["examples"] for s in self.shards]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.verify = verify
        self.cache_shards = max(1, cache_shards)
        self._cache: dict[int, Shard] = {}
        self._order: list[int] = []
        from safetensors.torch import load_file

        meta_path = self.folder / "meta.safetensors"
        try:
            if not stat.S_ISREG(os.stat(meta_path).st_mode):
                from ..core.fsio import not_regular_reason

                raise OSError(f"{meta_path.name} {not_regular_reason(meta_path) or 'is not a regular file'}")
            meta = load_file(str(meta_path))
            self.blank = meta["blank"].float()
        except Exception as exc:  # missing or torn file, no 'blank' tensor
            raise ShardError(f"{meta_path} is missing or unreadable ({type(exc).__name__}: {str(exc)[:200]}). Rerun "
                             f"`python -m lambda_eclipse.trainer extract --out {self.folder}` with the same arguments "
                             "to rewrite it (finished shards are kept).") from exc

    def _checked_entry(self, k: int, info, index_path: Path, rerun: str) -> dict:
        """A shard entry of index.json: a plain file name inside shards/ (never a path out of the folder) and a
        whole number of examples (`check_files` then holds the count against the file's size)."""
        where = f"{index_path}: shard entry {k}"
        if not isinstance(info, dict):
            raise ShardError(f"{where} is not an object. {rerun}")
        name, examples = info.get("file"), info.get("examples")
        if not isinstance(name, str) or not name:
            raise ShardError(f"{where} has no \"file\". {rerun}")
        if name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute() or Path(name).name != name:
            raise ShardError(f"{where}: \"file\": {name!r} is not a file name inside {self.folder / 'shards'} (a "
                             f"path, or one leading out of the feature folder); it was not read. {rerun}")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
            raise ShardError(f"{where}: \"examples\" must be a whole number ≥ 0, got {examples!r}. {rerun}")
        return info

    def __len__(self):
        return self.offsets[-1]

    def check_files(self):
        """Cheap up-front check (no hashing): every shard is a regular file with the size the index gives, and
        holds no more examples than that size can, so a missing or torn shard (or an index claiming 10^9 examples)
        stops a run before anything is written or allocated. ShardError names the first one. Call it before
        `Split.make`, which allocates per example."""
        for k, info in enumerate(self.shards):
            path = self.folder / "shards" / info["file"]
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise ShardError(f"Feature shard {path} is missing. {fix_hint(path)}") from None
            except OSError as exc:
                raise ShardError(f"Feature shard {path} cannot be read ({exc.strerror or exc}). {fix_hint(path)}") from exc
            if not stat.S_ISREG(st.st_mode):
                from ..core.fsio import not_regular_reason

                raise ShardError(f"Feature shard {path} {not_regular_reason(path) or 'is not a regular file'}; it was "
                                 f"not read. {fix_hint(path)}")
            size = st.st_size
            if info.get("bytes") is not None and size != info["bytes"]:
                raise ShardError(f"Feature shard {path} is torn ({size} bytes, the index says {info['bytes']}). {fix_hint(path)}")
            # every example stores at least its image, pooled text and edge embeddings: 3 fp16 vectors
            most = size // (3 * 2 * self.embed_dim)
            if info["examples"] > most:
                raise ShardError(
                    f"{self.folder / 'index.json'} says {path.name} holds {info['examples']:,} examples, but its "
                    f"{size:,} bytes hold at most {most:,} {self.embed_dim}-d examples: the index does not belong to "
                    f"these shards, and nothing was allocated for them. Rerun `python -m lambda_eclipse.trainer "
                    f"extract --out {self.folder}` with the same arguments to rewrite it.")

    def shard(self, i: int) -> Shard:
        if i in self._cache:
            self._order.remove(i)
            self._order.append(i)
            return self._cache[i]
        info = self.shards[i]
        shard = load_shard(self.folder / "shards" / info["file"], info.get("sha256"), self.verify)
        if len(shard) != info["examples"]:
            raise ShardError(f"Feature shard {shard.path} has {len(shard)} examples, the index says {info['examples']}. {fix_hint(shard.path)}")
        self._cache[i] = shard
        self._order.append(i)
        while len(self._order) > self.cache_shards:
            del self._cache[self._order.pop(0)]
        return shard

    def locate(self, global_index: int) -> tuple[int, int]:
        import bisect

        s = bisect.bisect_right(self.offsets, global_index) - 1
        return s, global_index - self.offsets[s]


def write_index(folder: Path, info: dict, sidecars: list[dict]):
    total = sum(s["examples"] for s in sidecars)
    nbytes = sum(s["bytes"] for s in sidecars)
    skipped: dict[str, int] = {}
    for s in sidecars:
        for k, v in s["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    index = dict(info)
    index.update({
        "format": FORMAT, "examples": total, "bytes": nbytes,
        "bytes_per_example": (nbytes / total) if total else None,
        "skipped": skipped, "shards": sorted(sidecars, key=lambda s: s["shard"]),
    })
    write_json_atomic(index, Path(folder) / "index.json")
    return index
