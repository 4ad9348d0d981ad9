"""Combining embeddings: lerp, norm-aware slerp, the paper's 4-corner bilinear grid, and the average of several photos."""

from __future__ import annotations

import torch

from .errors import InputError


def _t(t, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def lerp(a: torch.Tensor, b: torch.Tensor, t) -> torch.Tensor:
    """a·(1−t) + b·t, as the official interpolation script computes it."""
    return a * (1 - _t(t, a)) + b * _t(t, a)


def slerp(a: torch.Tensor, b: torch.Tensor, t, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of the directions, linear interpolation of the norms (embeddings carry scale)."""
    tt = _t(t, a)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(eps), b / nb.clamp_min(eps)
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    nearly_parallel = so.abs() < 1e-4
    wa = torch.where(nearly_parallel, 1 - tt, torch.sin((1 - tt) * omega) / so)
    wb = torch.where(nearly_parallel, tt, torch.sin(tt * omega) / so)
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    return direction * (na * (1 - tt) + nb * tt)


def blend(a: torch.Tensor, b: torch.Tensor, t, mode: str = "lerp") -> torch.Tensor:
    if a.shape != b.shape:
        raise InputError(f"Cannot blend embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}; give both the same batch size.")
    if mode == "lerp":
        return lerp(a, b, t)
    if mode == "slerp":
        return slerp(a, b, t)
    raise InputError(f"Unknown blend mode {mode!r}; use 'lerp' or 'slerp'.")


def bilinear_grid(top_left, top_right, bottom_left, bottom_right, steps: int, mode: str = "lerp") -> torch.Tensor:
    """[(steps+1)², E] in row-major order: rows go top→bottom (left pair), columns left→right.

    Row r: left = blend(TL, BL, r/S), right = blend(TR, BR, r/S); column c: blend(left, right, c/S),
    which is the official interpolation.py grid (S=1 gives the 2×2 corners, S=4 the 5×5 figure).
    """
    if steps < 1:
        raise InputError(f"Grid steps must be at least 1 (2×2); got {steps}.")
    corners = [c.reshape(-1) for c in (top_left, top_right, bottom_left, bottom_right)]
    if len({c.shape for c in corners}) != 1:
        raise InputError("The four grid corners must be embeddings of the same size.")
    tl, tr, bl, br = corners
    rows = []
    for r in range(steps + 1):
        left = blend(tl, bl, r / steps, mode)
        right = blend(tr, br, r / steps, mode)
        for c in range(steps + 1):
            rows.append(blend(left, right, c / steps, mode))
    return torch.stack(rows)


def average_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """Normalised mean of [N,E]: mean of the unit directions, rescaled to the mean norm (one photo: unchanged).

    A plain mean would shrink the result when the photos disagree; CLIP embeddings carry meaning in
    their direction and the prior was trained on single-photo norms, so the mean norm is kept.
    """
    if embeddings.shape[0] == 1:
        return embeddings[0]
    norms = embeddings.norm(dim=-1, keepdim=True)
    direction = (embeddings / norms.clamp_min(1e-12)).mean(0)
    return direction / direction.norm().clamp_min(1e-12) * norms.mean()


def tile_images(images: torch.Tensor, columns: int, gap: int = 0, background: float = 1.0) -> torch.Tensor:
    """[B,H,W,C] pictures → one [1,rows·H,columns·W,C] picture, row by row (empty cells and gaps in `background`)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise InputError(f"Expected a batch of images [B,H,W,C]; got {getattr(images, 'shape', type(images).__name__)}.")
    if isinstance(columns, bool) or int(columns) < 1:
        raise InputError(f"columns must be at least 1; got {columns!r}.")
    if int(gap) < 0:
        raise InputError(f"gap must be 0 or more pixels; got {gap!r}.")
    count, height, width, channels = images.shape
    columns, gap = min(int(columns), count), int(gap)
    rows = -(-count // columns)
    canvas = images.new_full((1, rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, channels), background)
    for i in range(count):
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        canvas[0, top:top + height, left:left + width] = images[i]
    return canvas
