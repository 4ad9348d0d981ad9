"""What the Dreambench and Multibench runs share, so that a third benchmark only says what is its own (its items,
their image paths, prompts and subjects, and how an image is scored): work sharding, the run folder checks,
`--reference`, progress bars, the pack's atomic writer, the resume rule (missing_images), image generation for a
list of (prompt, subjects, seed → path) jobs, finding images by name, scoring in chunks, the scores.csv layouts and
reader, the summary's table rows and settings, and the per-group plot."""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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


def check_reference(reference: int, subjects: Sequence) -> int:
    """`--reference N` picks photo N (from 0, in name order) of every subject (objects with .name and .photos):
    refused, before anything loads, when it is negative or some subject has fewer photos."""
    if reference < 0:
        raise DatasetError(f"--reference must be 0 or more (0 = each subject's first photo in name order); got "
                           f"{reference}.")
    short = [s for s in subjects if reference >= len(s.photos)]
    if short:
        fewest = min(len(s.photos) for s in subjects)
        named = ", ".join(f"{s.name} ({len(s.photos)})" for s in short[:5]) + (
            f" and {len(short) - 5} more" if len(short) > 5 else "")
        raise DatasetError(f"--reference {reference}: photo #{reference} (counting from 0, in name order) does not exist "
                           f"for every subject; these have fewer photos: {named}. Choose 0 … {fewest - 1}, which "
                           "every subject has.")
    return reference


def reference_photo(subject, reference: int) -> Path:
    """The subject image of `subject`: its photo number `reference` in name order (see check_reference)."""
    check_reference(reference, [subject])
    return subject.photos[reference]


def check_out_folder(folder, flag: str = "--out") -> Path:
    """Refuse now, before anything is loaded and creating nothing, a run folder that cannot be written: a file
    where the folder should be, a file among its parents, or a folder (or the nearest existing parent) that is
    not writable (tried for real, so read-only disks and ACLs count)."""
    from ..core.errors import OutputPathError
    from ..core.outputs import check_output_path

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{flag} {folder} is a file, not a folder. Give a folder for the run's files (it is "
                              "created if needed).")
    check_output_path(f"{folder}{os.sep}summary.md", overwrite=True, suffixes=(".md",), what=flag)
    return folder


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


def write_text(path, text: str, *, overwrite: bool = True) -> Path:
    """The pack's one writer (core.fsio): a temporary file, fsync'ed, then renamed, so a stopped run never leaves
    half a file; the file gets a plain open()'s mode, a failed write leaves no temporary file behind, and an OSError
    (read-only folder, full disk) becomes one OutputPathError naming the file. With ``overwrite=False`` an existing
    file is never replaced (OutputExistsError)."""
    from ..core.fsio import write_text_atomic

    return write_text_atomic(text, path, overwrite=overwrite)


def write_csv(rows: Sequence[dict], fields: Sequence[str], path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if k in METRICS else row[k]) for k in fields})
    return write_text(path, buf.getvalue())


#: A scores.csv of the full Multibench is a few MB; anything far larger is not one (and is not read into memory).
MAX_SCORES_BYTES = 256 << 20


def _scores_text(given: Path, path: Path) -> str:
    from ..core.fsio import require_regular_file

    if not path.exists():
        if given.is_dir():
            raise DatasetError(f"{given} has no scores.csv: it is not a scored dreambench / multibench run (run it, "
                               "or score its images with --score-only).")
        raise DatasetError(f"{path} does not exist. Give a run folder (with scores.csv) or a scores.csv file.")
    require_regular_file(path, "scores file", DatasetError)
    size = path.stat().st_size
    if size > MAX_SCORES_BYTES:
        raise DatasetError(f"{path} is {size / 2**20:.0f} MB: not a scores.csv of dreambench / multibench (a full "
                           "run's is a few MB); it was not read.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}), so it is not a scores.csv "
                           "written by dreambench / multibench.") from None


def read_scores(path) -> list[dict]:
    """The rows of a Dreambench or a Multibench scores.csv (a run folder or the file), metrics as floats. Anything
    else (a missing, binary or non-UTF-8 file, a short or long row, a value that is not a finite number) is a
    DatasetError naming the file and the line."""
    given = Path(path).expanduser()
    path = given / "scores.csv" if given.is_dir() else given
    reader = csv.DictReader(io.StringIO(_scores_text(given, path), newline=""))
    try:
        header = reader.fieldnames
        if not header:
            raise DatasetError(f"{path} is empty: not a scores.csv (expected the header "
                               f"{','.join(DREAMBENCH_FIELDS)} or {','.join(MULTIBENCH_FIELDS)}).")
        fields = MULTIBENCH_FIELDS if "subjects" in header else DREAMBENCH_FIELDS
        missing = [k for k in fields if k not in header]
        if missing:
            raise DatasetError(f"{path}: not a scores.csv (missing columns {', '.join(missing)}).")
        rows = []
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DatasetError(f"{path}, line {line}: more values than the {len(header)} columns of the header "
                                   "(a broken row). Fix or delete that line.")
            short = [k for k in header if row[k] is None]
            if short:
                raise DatasetError(f"{path}, line {line}: a short row ({len(header) - len(short)} of "
                                   f"{len(header)} values; no {', '.join(short)}). Fix or delete that line.")
            try:
                for k in METRICS:
                    row[k] = float(row[k])
                    if not math.isfinite(row[k]):
                        raise ValueError(f"{k} is {row[k]}")
                row["seed"] = int(row["seed"])
                if "count" in row:
                    row["count"] = int(row["count"])
            except ValueError as exc:
                raise DatasetError(f"{path}, line {line}: a value that is not a finite number ({exc}). Fix or delete "
                                   "that line.") from None
            rows.append(row)
    except csv.Error as exc:
        raise DatasetError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}).") from None
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


# -- what every benchmark does with its own items (a Dreambench (subject, prompt), a Multibench composition) -----------

def missing_images(items: Sequence, seeds: Sequence[int], path_of: Callable) -> list[tuple[object, list[int]]]:
    """(item, the seeds whose image `path_of(item, seed)` does not exist yet) for each item with one missing:
    existing images are never redone (the resume rule of every benchmark)."""
    todo = []
    for item in items:
        missing = [s for s in seeds if not path_of(item, s).exists()]
        if missing:
            todo.append((item, missing))
    return todo


def subject_input(word: str, subject, reference: int):
    """The pipeline's input for a benchmark subject (anything with .photos and .masks): photo number `reference`,
    with its mask when there is one."""
    from ..core.pipeline import SubjectInput

    photo = reference_photo(subject, reference)
    return SubjectInput(word, str(photo), str(subject.masks[photo.name]) if photo.name in subject.masks else None)


def generate_missing_images(models, items: Sequence, seeds: Sequence[int], path_of: Callable, prompt_of: Callable,
                            inputs_of: Callable, **settings) -> int:
    """Make every missing image of `items` (see missing_images), one batch per item: `prompt_of(item)` with the
    subjects `inputs_of(item)` (SubjectInputs); `settings` go to generate_jobs. Returns how many were written."""
    jobs = [GenerationJob(prompt_of(item), inputs_of(item), {seed: path_of(item, seed) for seed in missing})
            for item, missing in missing_images(items, seeds, path_of)]
    return generate_jobs(models, jobs, **settings)


def matching_files(folder, pattern: re.Pattern) -> list[tuple[re.Match, Path]]:
    """(match, path) of each file directly in `folder` whose name matches `pattern`, in name order."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        match = pattern.match(path.name)
        if match:
            found.append((match, path))
    return found


def score_in_chunks(found: Sequence, score_chunk: Callable, quiet: bool = False, size: int = 32,
                    key: Callable | None = None) -> list[dict]:
    """`score_chunk(chunk)` → rows, over `found` in chunks of at most `size` (a new chunk also wherever `key` of
    the items changes, e.g. one subject per chunk), with one progress bar for all of them."""
    chunks: list[list] = []
    for item in found:
        if not chunks or len(chunks[-1]) >= size or (key is not None and key(chunks[-1][-1]) != key(item)):
            chunks.append([])
        chunks[-1].append(item)
    rows = []
    bar = progress_bar(len(found), "score", quiet)
    for chunk in chunks:
        rows += score_chunk(chunk)
        bar.update(len(chunk))
    bar.close()
    return rows


def means_row(label: str, values: dict, fmt: str = "{:.3f}") -> str:
    """A markdown table row: the label, then DINO, CLIP-I, CLIP-T formatted with `fmt`."""
    return f"| {label} | " + " | ".join(fmt.format(values[k]) for k in METRICS) + " |"


def settings_lines(settings: dict | None) -> list[str]:
    """The "## Settings" section of a summary.md (nothing when there are no settings)."""
    return ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in settings.items()] if settings else []


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
