"""Feature extraction with the frozen CLIP: records → sharded, compact features (resumable, multi-process)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..core.canny import canny_edges
from ..core.clip import load_clip, prepare_subject
from ..core.errors import InterleaveError
from ..core.interleave import find_spans, plan_positions
from .data import FilterConfig, Record, SkipCounter, mask_check, read_records, record_to_json, subject_mask
from .errors import ConfigError, ExtractError
from .fsio import RunLock, check_output_folder, save_file_atomic, write_json_atomic
from .store import shard_done, write_index, write_shard

log = logging.getLogger("lambda_eclipse.trainer")


@dataclass
class ExtractConfig:
    clip: str = ""
    out: str = ""
    manifest: str | None = None
    coco_captions: str | None = None
    coco_instances: str | None = None
    coco_images: str | None = None
    shard_size: int = 4096
    batch_size: int = 64
    device: str | None = None
    dtype: str = "fp32"
    subject_fit: str = "pad"
    canny_low: float = 100
    canny_high: float = 200
    limit: int | None = None
    progress: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)


def progress_bar(total: int, desc: str, enabled: bool = True):
    """tqdm (rate + ETA) when available, else a plain logger that prints rate and ETA now and then."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, smoothing=0.1)
        except ImportError:
            pass
    return _LogProgress(total, desc, enabled)


class _LogProgress:
    def __init__(self, total, desc, enabled):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self.start = self.last = time.time()

    def update(self, n=1):
        self.n += n
        now = time.time()
        if self.enabled and (now - self.last > 10 or self.n >= self.total):
            rate = self.n / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d (%.1f/s, ETA %.0fs)", self.desc, self.n, self.total, rate, eta)
            self.last = now

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def prepare_record(rec: Record, clip, filters: FilterConfig, skips: SkipCounter, fit: str):
    """Pixels and checks for one record → dict ready for encoding, or None (reason counted)."""
    if not Path(rec.image).is_file():
        skips.example("missing_image")
        return None
    try:
        image = _load_rgb(rec.image)
    except Exception:
        skips.example("unreadable_image")
        return None
    sot, eot = clip.tokenizer.sot_token_id, clip.tokenizer.eot_token_id
    full_ids = [sot] + clip.word_ids(rec.caption) + [eot]
    if not rec.caption.strip():
        skips.example("empty_caption")
        return None
    kept = []
    seen_words = set()
    for ref in rec.subjects:
        wids = clip.word_ids(ref.word) if ref.word.strip() else []
        if not wids or not find_spans(full_ids, wids):
            skips.subject("word_not_in_caption")
            continue
        try:
            plan_positions(rec.caption, full_ids, [ref.word], [wids], clip.context_length)
        except InterleaveError:
            skips.subject("word_cut_off")
            continue
        if ref.word.lower() in seen_words:
            skips.subject("duplicate_word")
            continue
        try:
            mask = subject_mask(ref, image.width, image.height)
        except Exception:
            skips.subject("unreadable_mask")
            continue
        why = mask_check(mask, filters)
        if why:
            skips.subject(why)
            continue
        seen_words.add(ref.word.lower())
        kept.append((ref.word, wids, mask))
    if len(kept) > filters.max_subjects:
        skips.example("too_many_subjects")
        return None
    if len(kept) < filters.min_subjects:
        skips.example("too_few_subjects")
        return None
    try:  # overlapping spans ("teddy bear" and "bear") cannot both be placed
        plan_positions(rec.caption, full_ids, [k[0] for k in kept], [k[1] for k in kept], clip.context_length)
    except InterleaveError:
        skips.example("subject_overlap")
        return None
    return {
        "key": rec.key, "caption": rec.caption, "image": image,
        "edges": Image.fromarray(canny_edges(image)),
        "subjects": [prepare_subject(image, m, fit) for _, _, m in kept],
        "words": [k[0] for k in kept], "word_ids": [k[1] for k in kept],
    }


@torch.no_grad()
def encode_batch(clip, items: list[dict]) -> list[dict]:
    text = clip.encode_text([it["caption"] for it in items])
    images = clip.encode_images([it["image"] for it in items], batch_size=len(items))
    edges = clip.encode_images([it["edges"] for it in items], batch_size=len(items))
    flat = [s for it in items for s in it["subjects"]]
    subj = clip.encode_images(flat, batch_size=max(1, len(flat))) if flat else None
    out, k = [], 0
    for b, it in enumerate(items):
        n = int(text.mask[b].sum())
        s = len(it["subjects"])
        out.append({
            "key": it["key"], "caption": it["caption"], "words": it["words"], "word_ids": it["word_ids"],
            "image": images[b].cpu(), "pooled": text.pooled[b].cpu(), "control": edges[b].cpu(),
            "tokens": text.tokens[b, :n].cpu(), "ids": text.ids[b, :n].cpu(),
            "subj": subj[k:k + s].cpu() if s else torch.zeros(0, images.shape[-1]),
        })
        k += s
    return out


def extract_shard(clip, records: list[Record], cfg: ExtractConfig, bar=None) -> tuple[list[dict], SkipCounter]:
    skips = SkipCounter()
    examples: list[dict] = []
    pending: list[dict] = []
    for rec in records:
        item = prepare_record(rec, clip, cfg.filters, skips, cfg.subject_fit)
        if bar is not None:
            bar.update(1)
        if item is not None:
            pending.append(item)
        if len(pending) >= cfg.batch_size:
            examples += encode_batch(clip, pending)
            pending = []
    if pending:
        examples += encode_batch(clip, pending)
    return examples, skips


def _plan_fingerprint(records: list[Record], cfg: ExtractConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"shard_size": cfg.shard_size, "filters": asdict(cfg.filters), "fit": cfg.subject_fit,
                         "canny": [cfg.canny_low, cfg.canny_high]}, sort_keys=True).encode())
    for r in records:
        h.update(json.dumps(record_to_json(r), sort_keys=True).encode())
    return h.hexdigest()


def validate_extract_config(cfg: ExtractConfig):
    """Ranges and cross-checks of the settings, before anything is read or written (ConfigError)."""
    from .settings import EXTRACT_RULES, FILTER_RULES, check_value

    if not cfg.clip:
        raise ConfigError("extract: missing --clip")
    if not cfg.out:
        raise ConfigError("extract: missing --out")
    problems = [check_value(name, getattr(cfg, name), rule) for name, rule in EXTRACT_RULES.items()]
    problems += [check_value(name, getattr(cfg.filters, name), rule) for name, rule in FILTER_RULES.items()]
    f = cfg.filters
    if f.min_box_area > f.max_box_area:
        problems.append(f"--min-box-area ({f.min_box_area}) must not exceed --max-box-area ({f.max_box_area})")
    if f.min_subjects > f.max_subjects:
        problems.append(f"--min-subjects ({f.min_subjects}) must not exceed --max-subjects ({f.max_subjects})")
    if cfg.canny_low > cfg.canny_high:
        problems.append(f"--canny-low ({cfg.canny_low}) must not exceed --canny-high ({cfg.canny_high})")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))
    check_output_folder(cfg.out)  # a file there, or a folder that cannot be written: before the CLIP loads


def run_extract(cfg: ExtractConfig) -> dict:
    """Extract every shard not yet done; this process takes shards rank, rank+world, …. Returns the index (main process).

    A second extract into the same --out is refused at once (core.fsio.FolderLock, held by the main process)."""
    from .extras import require_extras

    require_extras("extract", ("accelerate",))
    from accelerate import PartialState

    validate_extract_config(cfg)
    state = PartialState(cpu=cfg.device == "cpu")
    with RunLock(cfg.out, "trainer extract", main=state.is_main_process) as lock:
        return _extract(cfg, state, lock.take_if_exists())


def _extract(cfg: ExtractConfig, state, lock: RunLock) -> dict:
    from .fsio import read_small_text

    device = cfg.device or str(state.device)
    out = Path(cfg.out)
    manifest_skips = SkipCounter()
    records = read_records(cfg.manifest, cfg.coco_captions, cfg.coco_instances, cfg.coco_images, manifest_skips)
    if cfg.limit:
        records = records[: cfg.limit]
    fingerprint = _plan_fingerprint(records, cfg)
    plan_path = out / "plan.json"
    if plan_path.exists():
        try:
            old = json.loads(read_small_text(plan_path, "The extraction plan", ValueError))
        except ValueError:
            old = {}
        if not isinstance(old, dict) or old.get("fingerprint") != fingerprint:
            raise ExtractError(
                f"{out} holds features of a different dataset/settings (plan.json fingerprint differs). "
                "Use a new --out folder, or delete this one to start over.")
    clip = load_clip(cfg.clip, device=device, dtype=cfg.dtype)
    # Nothing has been written before this point: bad input leaves --out as it was.
    if state.is_main_process:
        lock.take()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExtractError(f"Cannot create the feature folder {out} ({exc.strerror or exc}).") from exc
        if not plan_path.is_file():
            write_json_atomic({"fingerprint": fingerprint, "records": len(records), "shard_size": cfg.shard_size}, plan_path)
    state.wait_for_everyone()
    n_shards = max(1, -(-len(records) // cfg.shard_size))
    mine = [k for k in range(n_shards) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if shard_done(out, k) is None]
    if len(todo) < len(mine):
        log.info("rank %d: %d of %d shards already done, resuming", state.process_index, len(mine) - len(todo), len(mine))
    total = sum(len(records[k * cfg.shard_size:(k + 1) * cfg.shard_size]) for k in todo)
    bar = progress_bar(total, f"extract[{state.process_index}]", cfg.progress and state.is_local_main_process)
    for k in todo:
        recs = records[k * cfg.shard_size:(k + 1) * cfg.shard_size]
        examples, skips = extract_shard(clip, recs, cfg, bar)
        side = write_shard(out, k, examples, skips, len(recs))
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"shard {k}: {side['examples']}/{len(recs)} kept")
    bar.close()
    if state.is_main_process:
        save_file_atomic({"blank": clip.blank_embedding().cpu().to(torch.float16)}, out / "meta.safetensors")
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    sidecars = []
    for k in range(n_shards):
        side = shard_done(out, k)
        if side is None:
            raise ExtractError(f"Shard {k} is not finished (another process failed?). Rerun extract to complete it.")
        sidecars.append(side)
    skipped_manifest = {k: v for k, v in manifest_skips.items()}
    info = {
        "embed_dim": int(clip.embed_dim), "context_length": int(clip.context_length), "clip": str(cfg.clip),
        "records": len(records), "shard_size": cfg.shard_size, "filters": asdict(cfg.filters),
        "subject_fit": cfg.subject_fit, "canny": [cfg.canny_low, cfg.canny_high],
        "manifest_skipped": skipped_manifest, "fingerprint": fingerprint,
    }
    index = write_index(out, info, sidecars)
    for k, v in skipped_manifest.items():
        index["skipped"][k] = index["skipped"].get(k, 0) + v
    write_json_atomic(index, out / "index.json")
    log.info("extracted %d of %d records into %d shards (%.1f KB/example); skipped: %s", index["examples"], len(records),
             n_shards, (index["bytes_per_example"] or 0) / 1024, SkipCounter(index["skipped"]).describe())
    return index
