"""Dreambench (google/dreambooth `dataset/`): the 30 subjects × 25 prompts protocol of the paper's Table 2.

Layout read: `DATASET/<subject>/*.jpg` and `DATASET/prompts_and_classes.txt` (the repository's file as is: a
"subject_name,class" list, then the 25 "Object Prompts" and the 25 "Live Subject Prompts" written as
`'a {0} {1} in the jungle'.format(unique_token, class_token)`). Live subjects are those of class cat or dog.

For λ-ECLIPSE there is no unique token: the prompt is the template with the class noun ("a dog in the jungle"),
and the class noun is the subject word whose token features get the subject's image embedding. The subject
image is one photo of the concept (`reference`, default the first in name order), segmented on white when a
mask is given (`masks/<subject>/<photo stem>.png`); the public Dreambench has no masks, so the photo is used
as is. Generated images are written as `IMAGES/<subject>/p<prompt index:02d>_s<seed>.png`; any tool writing
that layout can be scored with `--score-only`.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .metrics import LABELS, METRICS, PAPER

LIVE_CLASSES = frozenset({"cat", "dog"})
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_NAME = re.compile(r"^p(\d+)_s(\d+)\.(png|jpg|jpeg|webp)$", re.IGNORECASE)
CSV_FIELDS = ("subject", "prompt", "seed", "image", "dino", "clip_i", "clip_t")
_TEMPLATE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


class DatasetError(ValueError):
    """The Dreambench folder is not in the expected layout (says what was found)."""


@dataclass
class DreamSubject:
    name: str
    cls: str
    photos: list[Path]
    templates: list[str]
    live: bool = False
    masks: dict[str, Path] = field(default_factory=dict)

    def prompt(self, index: int) -> str:
        return format_prompt(self.templates[index], self.cls)


def format_prompt(template: str, class_noun: str, unique_token: str = "") -> str:
    """`'a {0} {1} in the jungle'` → "a dog in the jungle" (no unique token: λ-ECLIPSE names the class only)."""
    return " ".join(template.format(unique_token, class_noun).split())


def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject → class, the object templates, the live-subject templates) from prompts_and_classes.txt."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        low = line.lower()
        if not line:
            continue
        if low == "classes":
            section = "classes"
        elif low.startswith("object prompts"):
            section = "object"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif low == "prompts" or low.startswith("prompt_list") or line == "]":
            continue
        elif section == "classes" and "," in line and low != "subject_name,class":
            name, cls = line.split(",", 1)
            classes[name.strip()] = cls.strip()
        elif section in lists:
            match = _TEMPLATE.match(line)
            if match:
                lists[section].append(match.group(2))
    if not classes or not lists["object"] or not lists["live"]:
        raise DatasetError(
            "prompts_and_classes.txt: expected a 'subject_name,class' list and the 'Object Prompts' and 'Live Subject "
            f"Prompts' lists of google/dreambooth; found {len(classes)} classes, {len(lists['object'])} object and "
            f"{len(lists['live'])} live prompts."
        )
    return classes, lists["object"], lists["live"]


def load_dataset(dataset, subjects: Sequence[str] | None = None, masks=None) -> list[DreamSubject]:
    """The subjects (all, or those named, in file order) with their photos, class and prompt templates."""
    dataset = Path(dataset).expanduser()
    listing = dataset / "prompts_and_classes.txt"
    if not listing.is_file() and (dataset / "dataset" / "prompts_and_classes.txt").is_file():
        dataset, listing = dataset / "dataset", dataset / "dataset" / "prompts_and_classes.txt"
    if not listing.is_file():
        raise DatasetError(f"--dataset {dataset}: no prompts_and_classes.txt (give the google/dreambooth `dataset/` folder).")
    classes, objects, live = parse_prompts_and_classes(listing.read_text(encoding="utf-8"))
    names = list(classes) if not subjects else list(subjects)
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DatasetError(f"--subjects: not in prompts_and_classes.txt: {', '.join(unknown)} "
                           f"(known: {', '.join(classes)}).")
    out = []
    for name in names:
        folder = dataset / name
        photos = sorted(p for p in folder.glob("*") if p.suffix.lower() in PHOTO_SUFFIXES) if folder.is_dir() else []
        if not photos:
            raise DatasetError(f"{folder}: no photos of '{name}' (expected {folder}/*.jpg).")
        found_masks = {}
        if masks:
            for photo in photos:
                mask = Path(masks).expanduser() / name / f"{photo.stem}.png"
                if mask.is_file():
                    found_masks[photo.name] = mask
        is_live = classes[name] in LIVE_CLASSES
        out.append(DreamSubject(name, classes[name], photos, live if is_live else objects, is_live, found_masks))
    return out


@dataclass(frozen=True)
class WorkItem:
    subject: str
    index: int  # prompt index in the subject's template list
    prompt: str


def work_items(subjects: Sequence[DreamSubject], limit_prompts: int | None = None) -> list[WorkItem]:
    items = []
    for s in subjects:
        count = len(s.templates) if limit_prompts is None else min(limit_prompts, len(s.templates))
        items.extend(WorkItem(s.name, k, s.prompt(k)) for k in range(count))
    return items


def shard(items: Sequence, index: int, count: int) -> list:
    """This process's share: every count-th item from `index` (disjoint, covering, balanced within one item)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process {index} of {count}: the index must be in 0 … count−1.")
    return list(items[index::count])


def image_path(images_dir, subject: str, index: int, seed: int) -> Path:
    return Path(images_dir) / subject / f"p{index:02d}_s{seed}.png"


def missing_images(items: Sequence[WorkItem], images_dir, seeds: Sequence[int]) -> list[tuple[WorkItem, list[int]]]:
    """(item, the seeds whose image does not exist yet) for each item with at least one missing: existing images
    are never redone."""
    todo = []
    for item in items:
        missing = [s for s in seeds if not image_path(images_dir, item.subject, item.index, s).exists()]
        if missing:
            todo.append((item, missing))
    return todo


def generate_missing(models, subjects: Sequence[DreamSubject], items: Sequence[WorkItem], images_dir, seeds: Sequence[int],
                     *, reference: int = 0, steps: int = 50, guidance: float = 7.5, width: int = 512, height: int = 512,
                     sampler: str = "ddpm", fit: str = "crop", quiet: bool = False) -> int:
    """Generate every missing image of `items`; returns how many were written. One image per seed: image i of a
    prompt uses seed i, the same pixels whether it is made alone or in a batch (core.pipeline's seed rule)."""
    from ..core.cli import save_images
    from ..core.pipeline import SubjectInput, generate

    by_name = {s.name: s for s in subjects}
    todo = missing_images(items, images_dir, seeds)
    total = sum(len(m) for _, m in todo)
    bar = _bar(total, "generate", quiet)
    written = 0
    for item, missing in todo:
        s = by_name[item.subject]
        photo = s.photos[min(reference, len(s.photos) - 1)]
        subject = SubjectInput(s.cls, str(photo), str(s.masks[photo.name]) if photo.name in s.masks else None)
        result = generate(models, item.prompt, [subject], seed=list(missing), batch=len(missing), steps=steps,
                          guidance=guidance, width=width, height=height, fit=fit, sampler=sampler)
        for seed, image in zip(missing, result.images):
            path = image_path(images_dir, item.subject, item.index, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_images(image[None], path)
            written += 1
        bar.update(len(missing))
    bar.close()
    return written


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str, quiet: bool):
    if quiet or total == 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)  # tqdm shows the ETA


def find_images(images_dir, subjects: Sequence[DreamSubject], limit_prompts: int | None = None) -> list[tuple[DreamSubject, int, int, Path]]:
    """(subject, prompt index, seed, path) of every image named p<k>_s<seed>.<ext> under IMAGES/<subject>/."""
    found = []
    for s in subjects:
        folder = Path(images_dir) / s.name
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            match = IMAGE_NAME.match(path.name)
            if not match:
                continue
            k, seed = int(match.group(1)), int(match.group(2))
            if k >= len(s.templates) or (limit_prompts is not None and k >= limit_prompts):
                continue
            found.append((s, k, seed, path))
    return sorted(found, key=lambda t: (t[0].name, t[1], t[2]))


def score_images(scorer, subjects: Sequence[DreamSubject], images_dir, limit_prompts: int | None = None,
                 quiet: bool = False) -> list[dict]:
    """One row per generated image (CSV_FIELDS), subject by subject; each subject's real photos embedded once."""
    found = find_images(images_dir, subjects, limit_prompts)
    rows = []
    bar = _bar(len(found), "score", quiet)
    for s in subjects:
        mine = [f for f in found if f[0] is s]
        for start in range(0, len(mine), 32):
            chunk = mine[start:start + 32]
            prompts = [s.prompt(k) for _, k, _, _ in chunk]
            scores = scorer.score([p for *_, p in chunk], prompts, s.name, [str(p) for p in s.photos])
            for (_, k, seed, path), prompt, sc in zip(chunk, prompts, scores):
                rows.append({"subject": s.name, "prompt": prompt, "seed": seed,
                             "image": path.relative_to(images_dir).as_posix(), **sc})
            bar.update(len(chunk))
    bar.close()
    return rows


def write_scores(rows: Sequence[dict], path) -> Path:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if k in METRICS else row[k]) for k in CSV_FIELDS})
    return _write_text(path, buf.getvalue())


def _write_text(path, text: str) -> Path:
    """Write via a temporary file and rename: a stopped run never leaves half a file."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_scores(path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "scores.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in CSV_FIELDS if rows and k not in rows[0]]
    if missing:
        raise DatasetError(f"{path}: not a scores.csv (missing columns {', '.join(missing)}).")
    for row in rows:
        for k in METRICS:
            row[k] = float(row[k])
        row["seed"] = int(row["seed"])
    return rows


def means(rows: Sequence[dict]) -> dict[str, float]:
    return {k: (sum(r[k] for r in rows) / len(rows) if rows else math.nan) for k in METRICS}


def per_subject(rows: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["subject"], []).append(row)
    return groups


def summary_markdown(rows: Sequence[dict], settings: dict[str, object] | None = None) -> str:
    m = means(rows)
    lines = ["# Dreambench evaluation", "",
             f"{len(rows)} generated images, {len(per_subject(rows))} subjects, "
             f"{len({(r['subject'], r['prompt']) for r in rows})} (subject, prompt) pairs.", "",
             "| | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|",
             "| this run | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |",
             "| paper (λ-ECLIPSE, Table 2) | " + " | ".join(f"{PAPER[k]:.3f}" for k in METRICS) + " |",
             "| difference | " + " | ".join(f"{m[k] - PAPER[k]:+.3f}" for k in METRICS) + " |", "",
             "The paper's row averages 30 subjects × 25 prompts × 4 images; a run with fewer subjects, prompts or "
             "images, other metric weights or another resolution is not directly comparable.", "",
             "## Per subject", "", "| subject | images | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|---:|"]
    for name, group in sorted(per_subject(rows).items()):
        g = means(group)
        lines.append(f"| {name} | {len(group)} | " + " | ".join(f"{g[k]:.3f}" for k in METRICS) + " |")
    if settings:
        lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def plot_scores(rows: Sequence[dict], path) -> Path:
    """Per-subject distributions (one dot per image, a bar at the mean) of the three metrics, drawn with PIL."""
    from PIL import Image, ImageDraw

    groups = sorted(per_subject(rows).items())
    label_w, panel_w, row_h, top, pad = 150, 260, 18, 40, 12
    width = label_w + len(METRICS) * (panel_w + pad) + pad
    height = top + max(1, len(groups)) * row_h + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for col, metric in enumerate(METRICS):
        values = [r[metric] for r in rows] + [PAPER[metric]]
        lo, hi = min(values), max(values)
        lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-6 else (lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        x0 = label_w + pad + col * (panel_w + pad)

        def x(v):
            return x0 + (v - lo) / (hi - lo) * panel_w

        draw.text((x0, 6), f"{LABELS[metric]}  (paper {PAPER[metric]:.3f}: dashed)", fill="black")
        draw.rectangle((x0, top - 4, x0 + panel_w, height - 26), outline="grey")
        px = x(PAPER[metric])
        for yy in range(top - 4, height - 26, 6):
            draw.line((px, yy, px, yy + 3), fill="red")
        draw.text((x0, height - 22), f"{lo:.2f}", fill="grey")
        draw.text((x0 + panel_w - 30, height - 22), f"{hi:.2f}", fill="grey")
        for i, (name, group) in enumerate(groups):
            y = top + i * row_h + row_h // 2
            if col == 0:
                draw.text((pad, y - 6), name[:22], fill="black")
            for r in group:
                draw.ellipse((x(r[metric]) - 2, y - 2, x(r[metric]) + 2, y + 2), fill=(70, 110, 200))
            mx = x(means(group)[metric])
            draw.line((mx, y - 7, mx, y + 7), fill="black", width=2)
    from ..core.outputs import save_image_atomic

    return save_image_atomic(img, Path(path))
