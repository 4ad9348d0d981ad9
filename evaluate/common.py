"""What the Dreambench and Multibench runs share: work sharding, progress bars, atomic writes, image generation
for a list of (prompt, subjects, seed → path) jobs, the scores.csv layouts and the per-group plot."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .metrics import LABELS, METRICS

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: scores.csv columns of a Dreambench run (one subject per image) and of a Multibench run (2 or 3 per image).
DREAMBENCH_FIELDS = ("subject", "prompt", "seed", "image", "dino", "clip_i", "clip_t")
MULTIBENCH_FIELDS = ("count", "composition", "subjects", "prompt", "seed", "image", "dino", "clip_i", "clip_t")


class DatasetError(ValueError):
    """A dataset, concept folder, prompt list or scores file is not in the expected layout (says what was found)."""


def photos_in(folder) -> list[Path]:
    """The photos directly in `folder`, in name order (sub-folders such as masks/ are not looked into)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES) if folder.is_dir() else []


def shard(items: Sequence, index: int, count: int) -> list:
    """This process's share: every count-th item from `index` (disjoint, covering, balanced within one item)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process {index} of {count}: the index must be in 0 … count−1.")
    return list(items[index::count])


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, quiet: bool):
    if quiet or total == 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)  # tqdm shows the ETA


def write_text(path, text: str) -> Path:
    """Write via a temporary file and rename: a stopped run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_csv(rows: Sequence[dict], fields: Sequence[str], path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if k in METRICS else row[k]) for k in fields})
    return write_text(path, buf.getvalue())


def read_scores(path) -> list[dict]:
    """The rows of a Dreambench or a Multibench scores.csv (a run folder or the file), metrics as floats."""
    path = Path(path)
    if path.is_dir():
        path = path / "scores.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows:
        header = set(rows[0])
        fields = MULTIBENCH_FIELDS if "subjects" in header else DREAMBENCH_FIELDS
        missing = [k for k in fields if k not in header]
        if missing:
            raise DatasetError(f"{path}: not a scores.csv (missing columns {', '.join(missing)}).")
    for row in rows:
        try:
            for k in METRICS:
                row[k] = float(row[k])
            row["seed"] = int(row["seed"])
            if "count" in row:
                row["count"] = int(row["count"])
        except ValueError as exc:
            raise DatasetError(f"{path}: a row has a value that is not a number ({exc}).") from None
    return rows


def benchmark_of(rows: Sequence[dict]) -> str:
    return "multibench" if rows and "subjects" in rows[0] else "dreambench"


def means(rows: Sequence[dict]) -> dict[str, float]:
    return {k: (sum(r[k] for r in rows) / len(rows) if rows else math.nan) for k in METRICS}


@dataclass
class GenerationJob:
    """One prompt with its subjects, and the images still to make: seed → where to write it."""

    prompt: str
    subjects: list  # core.pipeline.SubjectInput
    paths: dict[int, Path]


def generate_jobs(models, jobs: Sequence[GenerationJob], *, steps: int = 50, guidance: float = 7.5, width: int = 512,
                  height: int = 512, sampler: str = "ddpm", fit: str = "crop", quiet: bool = False) -> int:
    """Generate every job's images, one batch per prompt; returns how many were written. Image i of a prompt uses
    its own seed, the same pixels whether it is made alone or in a batch (core.pipeline's seed rule)."""
    from ..core.cli import save_images
    from ..core.pipeline import generate

    bar = progress_bar(sum(len(j.paths) for j in jobs), "generate", quiet)
    written = 0
    for job in jobs:
        seeds = list(job.paths)
        if not seeds:
            continue
        result = generate(models, job.prompt, job.subjects, seed=seeds, batch=len(seeds), steps=steps,
                          guidance=guidance, width=width, height=height, fit=fit, sampler=sampler)
        for seed, image in zip(seeds, result.images):
            path = job.paths[seed]
            path.parent.mkdir(parents=True, exist_ok=True)
            save_images(image[None], path)
            written += 1
        bar.update(len(seeds))
    bar.close()
    return written


def plot_groups(groups: Sequence[tuple[str, Sequence[dict], dict]], path, label_width: int = 150) -> Path:
    """Per-group distributions (one dot per image, a bar at the mean) of the three metrics, drawn with PIL.

    `groups`: (label, rows, the paper's values for that group). When every group has the same paper values they
    are one dashed line across the panel; otherwise each group's paper value is a short dashed mark on its row.
    """
    from PIL import Image, ImageDraw

    from ..core.outputs import save_image_atomic

    rows = [r for _, group, _ in groups for r in group]
    papers = [paper for _, _, paper in groups]
    shared = all(p == papers[0] for p in papers) if papers else True
    panel_w, row_h, top, pad = 260, 18, 40, 12
    width = label_width + len(METRICS) * (panel_w + pad) + pad
    height = top + max(1, len(groups)) * row_h + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for col, metric in enumerate(METRICS):
        values = [r[metric] for r in rows] + [p[metric] for p in papers]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-6 else (lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        x0 = label_width + pad + col * (panel_w + pad)

        def x(v):
            return x0 + (v - lo) / (hi - lo) * panel_w

        title = f"{LABELS[metric]}  (paper {papers[0][metric]:.3f}: dashed)" if shared and papers else \
            f"{LABELS[metric]}  (paper: dashed marks)"
        draw.text((x0, 6), title, fill="black")
        draw.rectangle((x0, top - 4, x0 + panel_w, height - 26), outline="grey")
        if shared and papers:
            px = x(papers[0][metric])
            for yy in range(top - 4, height - 26, 6):
                draw.line((px, yy, px, yy + 3), fill="red")
        draw.text((x0, height - 22), f"{lo:.2f}", fill="grey")
        draw.text((x0 + panel_w - 30, height - 22), f"{hi:.2f}", fill="grey")
        for i, (name, group, paper) in enumerate(groups):
            y = top + i * row_h + row_h // 2
            if col == 0:
                draw.text((pad, y - 6), name[: label_width // 7 + 1], fill="black")
            if not shared:
                px = x(paper[metric])
                for yy in range(y - 8, y + 8, 5):
                    draw.line((px, yy, px, yy + 2), fill="red")
            for r in group:
                draw.ellipse((x(r[metric]) - 2, y - 2, x(r[metric]) + 2, y + 2), fill=(70, 110, 200))
            if group:
                mx = x(means(group)[metric])
                draw.line((mx, y - 7, mx, y + 7), fill="black", width=2)
    return save_image_atomic(img, Path(path))
