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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .common import (DREAMBENCH_FIELDS, PHOTO_SUFFIXES, DatasetError, generate_missing_images,  # noqa: F401
                     matching_files, means, means_row, photos_in, plot_groups, progress_bar,
                     read_scores, score_in_chunks, settings_lines, shard, subject_input, write_csv, write_text)
from .common import missing_images as common_missing
from .metrics import METRICS, PAPER

LIVE_CLASSES = frozenset({"cat", "dog"})
IMAGE_NAME = re.compile(r"^p(\d+)_s(\d+)\.(png|jpg|jpeg|webp)$", re.IGNORECASE)
CSV_FIELDS = DREAMBENCH_FIELDS
_TEMPLATE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")
# DatasetError, means, read_scores, shard and PHOTO_SUFFIXES are also reached through this module (common.py
# holds them for Multibench too); _bar and _write_text are their old names here.
_bar, _write_text = progress_bar, write_text


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
        photos = photos_in(folder)
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


def image_path(images_dir, subject: str, index: int, seed: int) -> Path:
    return Path(images_dir) / subject / f"p{index:02d}_s{seed}.png"


def missing_images(items: Sequence[WorkItem], images_dir, seeds: Sequence[int]) -> list[tuple[WorkItem, list[int]]]:
    """(item, the seeds whose image does not exist yet) for each item with at least one missing: existing images
    are never redone."""
    return common_missing(items, seeds, lambda item, seed: image_path(images_dir, item.subject, item.index, seed))


def generate_missing(models, subjects: Sequence[DreamSubject], items: Sequence[WorkItem], images_dir, seeds: Sequence[int],
                     *, reference: int = 0, steps: int = 50, guidance: float = 7.5, width: int = 512, height: int = 512,
                     sampler: str = "ddpm", fit: str = "crop", quiet: bool = False) -> int:
    """Generate every missing image of `items`; returns how many were written. One image per seed: image i of a
    prompt uses seed i, the same pixels whether it is made alone or in a batch (core.pipeline's seed rule)."""
    by_name = {s.name: s for s in subjects}
    return generate_missing_images(
        models, items, seeds, lambda item, seed: image_path(images_dir, item.subject, item.index, seed),
        lambda item: item.prompt, lambda item: [subject_input(by_name[item.subject].cls, by_name[item.subject], reference)],
        steps=steps, guidance=guidance, width=width, height=height, sampler=sampler, fit=fit, quiet=quiet)


def find_images(images_dir, subjects: Sequence[DreamSubject], limit_prompts: int | None = None) -> list[tuple[DreamSubject, int, int, Path]]:
    """(subject, prompt index, seed, path) of every image named p<k>_s<seed>.<ext> under IMAGES/<subject>/."""
    found = []
    for s in subjects:
        for match, path in matching_files(Path(images_dir) / s.name, IMAGE_NAME):
            k, seed = int(match.group(1)), int(match.group(2))
            if k >= len(s.templates) or (limit_prompts is not None and k >= limit_prompts):
                continue
            found.append((s, k, seed, path))
    return sorted(found, key=lambda t: (t[0].name, t[1], t[2]))


def score_images(scorer, subjects: Sequence[DreamSubject], images_dir, limit_prompts: int | None = None,
                 quiet: bool = False) -> list[dict]:
    """One row per generated image (CSV_FIELDS), subject by subject; each subject's real photos embedded once."""
    found = find_images(images_dir, subjects, limit_prompts)

    def score(chunk):  # one subject per chunk: its photos are the reference of every image in it
        s = chunk[0][0]
        prompts = [s.prompt(k) for _, k, _, _ in chunk]
        scores = scorer.score([p for *_, p in chunk], prompts, s.name, [str(p) for p in s.photos])
        return [{"subject": s.name, "prompt": prompt, "seed": seed, "image": path.relative_to(images_dir).as_posix(),
                 **sc} for (_, k, seed, path), prompt, sc in zip(chunk, prompts, scores)]

    in_order = [f for s in subjects for f in found if f[0] is s]
    return score_in_chunks(in_order, score, quiet=quiet, key=lambda f: f[0].name)


def write_scores(rows: Sequence[dict], path) -> Path:
    return write_csv(rows, CSV_FIELDS, path)


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
             means_row("this run", m), means_row("paper (λ-ECLIPSE, Table 2)", PAPER),
             means_row("difference", {k: m[k] - PAPER[k] for k in METRICS}, "{:+.3f}"), "",
             "The paper's row averages 30 subjects × 25 prompts × 4 images; a run with fewer subjects, prompts or "
             "images, other metric weights or another resolution is not directly comparable.", "",
             "## Per subject", "", "| subject | images | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|---:|"]
    for name, group in sorted(per_subject(rows).items()):
        lines.append(means_row(f"{name} | {len(group)}", means(group)))
    return "\n".join(lines + settings_lines(settings)) + "\n"


def plot_scores(rows: Sequence[dict], path) -> Path:
    """Per-subject distributions (one dot per image, a bar at the mean) of the three metrics, drawn with PIL."""
    return plot_groups([(name, group, PAPER) for name, group in sorted(per_subject(rows).items())], path)
