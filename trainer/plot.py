"""Training curves as a PNG drawn with PIL (no matplotlib)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"train": (31, 119, 180), "val": (214, 39, 40)}
PANELS = [("loss", "loss"), ("mse", "MSE"), ("contrastive", "contrastive"), ("cosine", "cosine to target"),
          ("top1", "top-1 retrieval"), ("top5", "top-5 retrieval")]


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _series(rows, split, key):
    pts = []
    for r in rows:
        if r.get("split") == split and r.get(key) not in (None, "", "nan"):
            try:
                pts.append((float(r["step"]), float(r[key])))
            except ValueError:
                pass
    return pts


def _panel(draw, box, series: dict, title: str, colors: dict, widths: dict | None = None):
    """One chart: axes box, title, y ticks, first/last x, a line per series (name → [(x, y)]), a legend."""
    left, top, right, bottom = box
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, top - 22), title, fill=(0, 0, 0))
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        draw.text((left + 10, top + 10), "no data", fill=(128, 128, 128))
        return
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = min(p[1] for p in pts), max(p[1] for p in pts)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymax, ymin = ymax + 0.5, ymin - 0.5
    pad = 0.05 * (ymax - ymin)
    ymin, ymax = ymin - pad, ymax + pad

    def xy(p):
        return (left + (p[0] - xmin) / (xmax - xmin) * (right - left),
                bottom - (p[1] - ymin) / (ymax - ymin) * (bottom - top))

    for frac in (0.0, 0.5, 1.0):
        v = ymin + frac * (ymax - ymin)
        y = bottom - frac * (bottom - top)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((left - 58, y - 6), f"{v:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"{xmin:.0f}", fill=(0, 0, 0))
    draw.text((right - 40, bottom + 6), f"{xmax:.0f}", fill=(0, 0, 0))
    for s, data in series.items():
        data = [p for p in data if math.isfinite(p[1])]
        if len(data) >= 2:
            draw.line([xy(p) for p in data], fill=colors[s], width=(widths or {}).get(s, 2))
        for p in data[-1:] if len(data) >= 2 else data:
            cx, cy = xy(p)
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colors[s])
    x = right - 8
    for s in reversed(list(series)):
        x -= 7 * len(s) + 10
        draw.text((x, top + 4), s, fill=colors[s])


def _save(img, png_path) -> Path:
    from .fsio import atomic_write

    return atomic_write(png_path, lambda tmp: img.save(tmp, format="PNG"))


def plot_curves(csv_path: str | Path, png_path: str | Path, width: int = 1200, height: int = 720) -> Path:
    """The prior trainer's metrics.csv (split, step, loss, mse, …): one panel per metric, train and val."""
    rows = read_metrics(csv_path)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    cols, nrows = 3, 2
    pw, ph = width // cols, height // nrows
    for k, (key, title) in enumerate(PANELS):
        x0, y0 = (k % cols) * pw, (k // cols) * ph
        box = (x0 + 60, y0 + 30, x0 + pw - 15, y0 + ph - 35)
        _panel(draw, box, {s: _series(rows, s, key) for s in ("train", "val")}, title, COLORS)
    return _save(img, png_path)


def plot_loss(csv_path: str | Path, png_path: str | Path, width: int = 900, height: int = 420, smoothing: float = 0.9) -> Path:
    """The decoder fine-tune's metrics.csv (step, loss, …): the per-step loss and its exponential moving average
    (weight `smoothing`, bias-corrected), which is what shows the trend of a one-example-per-step loss."""
    raw = []
    for r in read_metrics(csv_path):
        try:
            raw.append((float(r["step"]), float(r["loss"])))
        except (KeyError, TypeError, ValueError):
            pass
    ema, avg = [], 0.0
    for i, (x, y) in enumerate(raw, 1):
        avg = smoothing * avg + (1 - smoothing) * y
        ema.append((x, avg / (1 - smoothing ** i)))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    _panel(draw, (70, 40, width - 20, height - 35), {"loss": raw, "average": ema},
           "decoder fine-tune: Eq. 2 loss per step", {"loss": (170, 200, 230), "average": (31, 119, 180)},
           {"loss": 1, "average": 2})
    return _save(img, png_path)
