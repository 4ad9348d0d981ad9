"""Dataset readers: a JSONL manifest and COCO-style annotations → records with subjects.

A *record* is cheap (paths and numbers, no pixels). Checks that need pixels (missing or unreadable
image, empty or too-small mask) run at extraction time; every skip is counted under a named reason
and reported, never silent.

JSONL, one example per line::

    {"image": "imgs/0001.jpg", "caption": "a dog wearing a hat",
     "subjects": [{"word": "dog", "mask": "masks/0001_dog.png"},
                  {"word": "hat", "box": [x0, y0, x1, y1]}]}

Paths are relative to the manifest's folder. A subject gives either `mask` (a grey/binary image,
white = subject) or `box` (pixels, exclusive right/bottom), or `polygon` ([[x,y,...], ...]) or
`rle` (COCO RLE dict) like the COCO reader.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The paper's filters (Appendix B).
DEFAULT_MIN_BOX_AREA = 0.08
DEFAULT_MAX_BOX_AREA = 0.7
DEFAULT_MIN_MASK_FILL = 0.4
DEFAULT_MAX_SUBJECTS = 4


@dataclass
class SubjectRef:
    word: str
    mask: str | None = None  # path to a mask image
    box: list[float] | None = None  # [x0, y0, x1, y1] pixels
    polygon: list[list[float]] | None = None  # COCO polygons
    rle: dict | None = None  # COCO RLE (counts list or compressed string)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Record:
    key: str  # stable id (manifest line / COCO ann id), used for the held-out split
    image: str
    caption: str
    subjects: list[SubjectRef] = field(default_factory=list)


@dataclass
class FilterConfig:
    min_box_area: float = DEFAULT_MIN_BOX_AREA
    max_box_area: float = DEFAULT_MAX_BOX_AREA
    min_mask_fill: float = DEFAULT_MIN_MASK_FILL
    max_subjects: int = DEFAULT_MAX_SUBJECTS
    min_subjects: int = 1


class SkipCounter(Counter):
    """Counts of skipped examples / subjects by reason ("example:<why>" / "subject:<why>")."""

    def example(self, why: str):
        self["example:" + why] += 1

    def subject(self, why: str):
        self["subject:" + why] += 1

    def describe(self) -> str:
        if not self:
            return "nothing skipped"
        return ", ".join(f"{k}={v}" for k, v in sorted(self.items()))


def read_jsonl(path: str | Path, skips: SkipCounter | None = None) -> list[Record]:
    path = Path(path)
    root = path.parent
    records = []
    skips = skips if skips is not None else SkipCounter()
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                row = json.loads(line)
                image = row["image"]
                caption = str(row["caption"])
                subjects = []
                for s in row.get("subjects", []):
                    ref = SubjectRef(
                        word=str(s["word"]),
                        mask=str(root / s["mask"]) if s.get("mask") else None,
                        box=[float(v) for v in s["box"]] if s.get("box") is not None else None,
                        polygon=s.get("polygon"), rle=s.get("rle"),
                    )
                    subjects.append(ref)
            except (ValueError, KeyError, TypeError) as exc:
                skips.example("bad_manifest_line")
                import logging

                logging.getLogger("lambda_eclipse").warning("%s:%d skipped: %s", path, lineno, exc)
                continue
            records.append(Record(str(row.get("id", f"{path.name}:{lineno}")), str(root / image), caption, subjects))
    return records


def read_coco(captions_json: str | Path, instances_json: str | Path, image_dir: str | Path,
              skips: SkipCounter | None = None) -> list[Record]:
    """COCO captions + instances → one record per caption; subjects = categories named in the caption.

    Word matching here is a cheap lower-case word test; the exact token-span test runs at extraction.
    Of several instances of one category the largest is kept (one word can hold one subject).
    """
    import re

    skips = skips if skips is not None else SkipCounter()
    caps = json.loads(Path(captions_json).read_text(encoding="utf-8"))
    inst = json.loads(Path(instances_json).read_text(encoding="utf-8"))
    images = {im["id"]: im for im in caps.get("images", []) + inst.get("images", [])}
    cats = {c["id"]: c["name"] for c in inst.get("categories", [])}
    by_image: dict[int, list[dict]] = {}
    for ann in inst.get("annotations", []):
        if ann.get("iscrowd", 0) and not isinstance(ann.get("segmentation"), (dict, list)):
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)
    records = []
    for cap in caps.get("annotations", []):
        im = images.get(cap["image_id"])
        if im is None:
            skips.example("caption_without_image_entry")
            continue
        caption = cap["caption"].strip()
        text = " " + " ".join(re.findall(r"[a-z0-9']+", caption.lower())) + " "
        best: dict[str, dict] = {}
        for ann in by_image.get(cap["image_id"], []):
            name = cats.get(ann["category_id"])
            if name is None:
                continue
            if f" {name.lower()} " not in text:
                continue
            if name not in best or ann.get("area", 0) > best[name].get("area", 0):
                best[name] = ann
        subjects = []
        for name, ann in best.items():
            seg = ann.get("segmentation")
            ref = SubjectRef(word=name)
            if isinstance(seg, list) and seg:
                ref.polygon = seg
            elif isinstance(seg, dict):
                ref.rle = seg
            elif ann.get("bbox"):
                x, y, w, h = ann["bbox"]
                ref.box = [x, y, x + w, y + h]
            subjects.append(ref)
        records.append(Record(f"coco:{cap.get('id', cap['image_id'])}", str(Path(image_dir) / im["file_name"]), caption, subjects))
    return records


# -- masks --------------------------------------------------------------------------------------

def rle_decode(rle: dict, height: int, width: int) -> np.ndarray:
    """COCO RLE (uncompressed `counts` list or compressed LEB128-like string) → bool [H,W]."""
    counts = rle["counts"]
    h, w = rle.get("size", [height, width])
    if isinstance(counts, (str, bytes)):
        counts = _rle_string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for run in counts:
        run = int(run)
        if value:
            flat[pos:pos + run] = True
        pos += run
        value = not value
    return flat.reshape(w, h).T  # COCO RLE is column-major


def _rle_string_to_counts(s: str) -> list[int]:
    """pycocotools' compressed counts (rleFrString)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_encode(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a bool mask (used by tests and tools)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    counts, value, run = [], False, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
        if len(pts) >= 3:
            draw.polygon(pts, fill=255)
    return np.asarray(canvas) > 127


def subject_mask(ref: SubjectRef, width: int, height: int) -> np.ndarray:
    """Bool [H,W] mask of a subject at the image's size. Raises OSError for an unreadable mask file."""
    from PIL import Image

    if ref.mask is not None:
        from ..core.fsio import not_regular_reason

        reason = not_regular_reason(ref.mask)  # a FIFO would block the whole extraction
        if reason is not None:
            raise OSError(f"mask {ref.mask} {reason}")
        with Image.open(ref.mask) as im:
            m = im.convert("L")
            if m.size != (width, height):
                m = m.resize((width, height), Image.NEAREST)
            return np.asarray(m) > 127
    if ref.polygon is not None:
        return polygon_mask(ref.polygon, height, width)
    if ref.rle is not None:
        m = rle_decode(ref.rle, height, width)
        if m.shape != (height, width):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 127
        return m
    if ref.box is not None:
        x0, y0, x1, y1 = ref.box
        out = np.zeros((height, width), dtype=bool)
        out[max(0, int(round(y0))):max(0, int(round(y1))), max(0, int(round(x0))):max(0, int(round(x1)))] = True
        return out
    raise ValueError(f"subject {ref.word!r} has no mask, box, polygon or rle")


def mask_check(mask: np.ndarray, filters: FilterConfig) -> str | None:
    """None if the mask passes the paper's filters, else the skip reason."""
    if not mask.any():
        return "empty_mask"
    rows, cols = np.where(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    frac = box_area / mask.size
    if frac < filters.min_box_area:
        return "box_too_small"
    if frac > filters.max_box_area:
        return "box_too_large"
    if mask.sum() / box_area < filters.min_mask_fill:
        return "mask_fill_too_low"
    return None


def read_records(manifest: str | Path | None = None, coco_captions=None, coco_instances=None, coco_images=None,
                 skips: SkipCounter | None = None) -> list[Record]:
    from ..core.fsio import not_regular_reason
    from .errors import DataError

    if manifest:
        if not_regular_reason(manifest):
            raise DataError(f"--manifest {manifest} {not_regular_reason(manifest)}; give a JSONL file, one example per line.")
        if not Path(manifest).is_file():
            raise DataError(f"--manifest {manifest} not found (a JSONL file, one example per line).")
        return read_jsonl(manifest, skips)
    if coco_captions and coco_instances and coco_images:
        for flag, path in (("--coco-captions", coco_captions), ("--coco-instances", coco_instances)):
            if not_regular_reason(path):
                raise DataError(f"{flag} {path} {not_regular_reason(path)}; give the COCO JSON file.")
            if not Path(path).is_file():
                raise DataError(f"{flag} {path} not found.")
        if not Path(coco_images).is_dir():
            raise DataError(f"--coco-images {coco_images} is not a folder.")
        try:
            return read_coco(coco_captions, coco_instances, coco_images, skips)
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not COCO's layout
            raise DataError(f"{coco_captions} / {coco_instances} are not COCO caption/instance files "
                            f"({type(exc).__name__}: {str(exc)[:200]}).") from exc
    raise DataError("Give --manifest FILE.jsonl, or --coco-captions, --coco-instances and --coco-images.")


def record_to_json(rec: Record) -> dict[str, Any]:
    return {"key": rec.key, "image": rec.image, "caption": rec.caption, "subjects": [s.to_json() for s in rec.subjects]}
