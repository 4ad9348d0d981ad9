"""Regional subjects: each embedding steers the decoder's noise prediction in its own part of the picture.

The Kandinsky 2.2 UNet predicts noise per latent pixel, so the prediction made from one embedding can be used in
one region and another's elsewhere (as ComfyUI weighs masked conditionings in comfy/samplers.py, and MultiDiffusion
blends panoramas). At every step the UNet predicts, each with classifier-free guidance against its own negative, the
noise for the base embedding and for each region; per latent pixel the predictions are blended with

    w_r = strength_r · mask_r  (each region),   S = Σ_r w_r,   w_base = max(0, 1 − S),

normalised by max(1, S). Inside a full-strength region its own prediction replaces the base's; where regions overlap
they are averaged by weight; outside every region the base is untouched.

Exact by construction (tested bit for bit where each branch runs in its own UNet call, the CPU default):
- a region whose mask is empty contributes 0·n, so the base picture comes out unchanged;
- one region with a full mask at strength 1 gives coefficient 0 to the base and 1 to itself: its own picture;
- a region holding the base's own embedding is counted as the base (coefficient 1 − S_other where S ≤ 1), so it
  changes nothing;
- regions are summed in a canonical order (by content), so their order in the list does not matter;
- regions that cover the picture (S ≥ 1 everywhere) leave the base with coefficient 0: the base does not matter.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import InputError


@dataclass
class Region:
    """One region: image embeddings [1|B,E] and their negatives (None: the base's), a mask 0…1 of any size
    ([H,W], [1,H,W] or [B,H,W]: resized to the latent grid), a strength 0…1 and an optional feather in pixels."""

    embeds: torch.Tensor
    negative: torch.Tensor | None
    mask: torch.Tensor
    strength: float = 1.0
    feather: float = 0.0


def as_region(item) -> Region:
    if isinstance(item, Region):
        return item
    if isinstance(item, (tuple, list)) and len(item) in (3, 4, 5):
        return Region(*item)
    raise InputError(
        "A region must be Region(embeds, negative, mask, strength) or the tuple (embeds, negative, mask, strength); "
        f"got {type(item).__name__}."
    )


def _rows(t: torch.Tensor | None, batch: int, dim: int, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise InputError(f"{what} must be a float tensor [1 or {batch}, {dim}].")
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != dim or t.shape[0] not in (1, batch):
        raise InputError(f"{what} has shape {list(t.shape)}; expected [1 or {batch}, {dim}] (the decoder's embedding size).")
    if not torch.isfinite(t).all():
        raise InputError(f"{what} holds NaN or infinite values.")
    return t.expand(batch, -1)


def _mask(mask, batch: int, index: int) -> torch.Tensor:
    what = f"region {index + 1}'s mask"
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{what} must be a tensor [H,W] or [batch,H,W] (ComfyUI's MASK); got {type(mask).__name__}.")
    m = mask.detach().float().cpu()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or m.shape[0] not in (1, batch) or min(m.shape[1:]) < 1:
        raise InputError(f"{what} has shape {list(mask.shape)}; expected [H,W] or [1 or {batch}, H, W].")
    if not torch.isfinite(m).all():
        raise InputError(f"{what} holds NaN or infinite values.")
    return m.clamp(0, 1)


def _strength(value, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) <= 1.0):
        raise InputError(f"region {index + 1}'s strength must be a number from 0 to 1; got {value!r}.")
    return float(value)


def _feather(value, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) < 4096) \
            or not math.isfinite(float(value)):
        raise InputError(f"region {index + 1}'s feather must be a number of pixels ≥ 0; got {value!r}.")
    return float(value)


def _gaussian_blur(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,1,h,w] with reflected borders (a soft edge, the mass kept at the frame)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x * x) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    pad_h, pad_w = min(radius, m.shape[-2] - 1), min(radius, m.shape[-1] - 1)
    out = m
    if pad_w > 0:
        k = kernel[radius - pad_w: radius + pad_w + 1]
        k = k / k.sum()
        out = torch.nn.functional.conv2d(torch.nn.functional.pad(out, (pad_w, pad_w, 0, 0), mode="reflect"),
                                         k.view(1, 1, 1, -1))
    if pad_h > 0:
        k = kernel[radius - pad_h: radius + pad_h + 1]
        k = k / k.sum()
        out = torch.nn.functional.conv2d(torch.nn.functional.pad(out, (0, 0, pad_h, pad_h), mode="reflect"),
                                         k.view(1, 1, -1, 1))
    return out


def latent_weight(region: Region, index: int, batch: int, latent_hw: tuple[int, int], scale: int) -> torch.Tensor:
    """strength · mask on the latent grid, [B,1,h,w] float32 on the CPU (feathered when asked)."""
    m = _mask(region.mask, batch, index)
    h, w = latent_hw
    m = m[:, None]
    if tuple(m.shape[-2:]) != (h, w):
        if m.shape[-2] >= h and m.shape[-1] >= w:  # the usual case (an image-size MASK): each latent pixel's mean
            m = torch.nn.functional.adaptive_avg_pool2d(m, (h, w))
        else:
            m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        # a full or empty mask stays exactly full or empty after the resize's rounding
        m = torch.where(m > 1 - 1e-6, torch.ones_like(m), torch.where(m < 1e-6, torch.zeros_like(m), m))
    feather = _feather(region.feather, index)
    if feather > 0:
        m = _gaussian_blur(m, feather / (2.0 * scale))
    m = m.clamp(0, 1).expand(batch, -1, -1, -1)
    return m * _strength(region.strength, index)


def _content_key(embeds: torch.Tensor, negative: torch.Tensor | None, weight: torch.Tensor) -> bytes:
    digest = hashlib.sha256()
    for t in (embeds, negative, weight):
        if t is not None:
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        digest.update(b"|")
    return digest.digest()


@dataclass
class Branch:
    embeds: torch.Tensor  # [B,E] the condition
    negative: torch.Tensor | None  # [B,E]
    coefficient: torch.Tensor  # [B,1,h,w]


def plan(base_embeds: torch.Tensor, base_negative: torch.Tensor | None, regions: Sequence, latent_hw, scale: int,
         dim: int) -> list[Branch]:
    """The branches to predict and each one's per-pixel coefficient; the base first. Branches whose coefficient is
    zero everywhere are dropped (their term would be an exact 0)."""
    batch = base_embeds.shape[0]
    items = []
    for index, raw in enumerate(regions):
        region = as_region(raw)
        embeds = _rows(region.embeds, batch, dim, f"region {index + 1}'s embeds")
        negative = _rows(region.negative, batch, dim, f"region {index + 1}'s negative") \
            if region.negative is not None else base_negative
        weight = latent_weight(region, index, batch, latent_hw, scale)
        same = torch.equal(embeds, base_embeds) and (
            (negative is None and base_negative is None)
            or (negative is not None and base_negative is not None and torch.equal(negative, base_negative)))
        items.append((same, embeds, negative, weight))
    zeros = torch.zeros(batch, 1, *latent_hw)
    other = [it for it in items if not it[0]]
    other.sort(key=lambda it: _content_key(it[1], it[2], it[3]))  # a canonical order: the list order never matters
    total = zeros.clone()
    for it in sorted(items, key=lambda it: _content_key(it[1], it[2], it[3])):
        total = total + it[3]
    s_other = zeros.clone()
    for it in other:
        s_other = s_other + it[3]
    s_same = zeros.clone()
    for it in sorted((it for it in items if it[0]), key=lambda it: _content_key(it[1], it[2], it[3])):
        s_same = s_same + it[3]
    # where S ≤ 1: the base keeps 1 − S_other (regions holding the base's own embedding are the base);
    # where S > 1: the base has only those regions' share, S_same / S.
    base = torch.where(total <= 1, 1 - s_other, s_same / total.clamp_min(1))
    norm = total.clamp_min(1)
    branches = [Branch(base_embeds, base_negative, base)]
    for _same, embeds, negative, weight in other:
        branches.append(Branch(embeds, negative, weight / norm))
    return [b for i, b in enumerate(branches) if i == 0 or bool((b.coefficient != 0).any())]


def blend(predictions: Sequence[torch.Tensor], coefficients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ coefficient_i · prediction_i, in the branches' order (the base first, then the canonical region order)."""
    out = None
    for pred, coef in zip(predictions, coefficients):
        term = pred * coef.to(device=pred.device, dtype=pred.dtype)
        out = term if out is None else out + term
    return out


# -- layouts: where regions go without painting a mask ----------------------------------------------------

# name → (x0, y0, x1, y1) as fractions of the picture
AREAS = {
    "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0),
    "top-left": (0.0, 0.0, 0.5, 0.5), "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0), "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75), "full": (0.0, 0.0, 1.0, 1.0),
}
# layout name → the areas its regions take, in order
LAYOUTS = {
    "left-right": ("left", "right"),
    "top-bottom": ("top", "bottom"),
    "grid-2x2": ("top-left", "top-right", "bottom-left", "bottom-right"),
}


def layout_name(text) -> str:
    """'left / right', 'Left_Right', 'grid 2x2' → 'left-right', 'grid-2x2' (the LAYOUTS keys)."""
    import re

    return re.sub(r"[\s/_-]+", "-", str(text).strip().lower())


def area_mask(name: str, width: int, height: int) -> torch.Tensor:
    """[H,W] float mask, 1 inside the named area (AREAS) or an 'x0,y0,x1,y1' box in fractions of the picture."""
    key = str(name).strip().lower().replace("_", "-")
    if key in AREAS:
        box = AREAS[key]
    else:
        try:
            box = tuple(float(v) for v in key.split(","))
        except ValueError:
            box = ()
        if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
            raise InputError(
                f"{name!r} is not an area: use one of {', '.join(AREAS)}, a box 'x0,y0,x1,y1' in fractions of the picture "
                "(e.g. '0,0,0.4,1' for the left 40%), or a mask image file."
            )
    x0, y0, x1, y1 = box
    mask = torch.zeros(height, width)
    mask[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = 1
    return mask


@dataclass
class RegionSpec:
    """A region as a user writes it: its own prompt and subjects, and where it goes (an area name, a box, or a mask
    image file), before any model has run."""

    prompt: str
    subjects: list = None  # [(word, image, mask)]
    where: str = ""  # area name, 'x0,y0,x1,y1', or a mask image path
    strength: float = 1.0
    feather: float = 0.0

    def __post_init__(self):
        self.subjects = list(self.subjects or [])


def parse_layout(data, base_dir=None) -> list[RegionSpec]:
    """A layout file's content → RegionSpecs. Format (JSON):

        {"layout": "left-right",                    # optional: gives each region its area in order
         "feather": 32,                             # optional default for every region (pixels)
         "regions": [
            {"prompt": "a dog on a beach", "subjects": {"dog": "dog.jpg"}},
            {"prompt": "a cat on a beach", "subjects": {"cat": "cat.jpg"}, "strength": 0.9},
            {"prompt": "a hat", "subjects": {"hat": "hat.jpg"}, "where": "0.3,0,0.7,0.3"}   # or an area / mask file
         ]}

    Subject images and mask files are relative to the layout file's folder.
    """
    from pathlib import Path

    if not isinstance(data, dict) or not isinstance(data.get("regions"), list) or not data["regions"]:
        raise InputError('A layout needs a "regions" list, e.g. {"layout": "left-right", "regions": [{"prompt": "a dog", '
                         '"subjects": {"dog": "dog.jpg"}}, {"prompt": "a cat", "subjects": {"cat": "cat.jpg"}}]}.')
    unknown = set(data) - {"layout", "regions", "feather"}
    if unknown:
        raise InputError(f"Unknown layout key(s) {sorted(unknown)}: a layout has layout, feather and regions.")
    areas: tuple = ()
    if data.get("layout") is not None:
        name = layout_name(data["layout"])
        if name not in LAYOUTS:
            raise InputError(f"Unknown layout {data['layout']!r}: use one of {', '.join(LAYOUTS)}, or give each region a 'where'.")
        areas = LAYOUTS[name]
        if len(data["regions"]) > len(areas):
            raise InputError(f"Layout {name!r} has {len(areas)} areas but {len(data['regions'])} regions are given.")
    base = Path(base_dir) if base_dir is not None else None
    out = []
    for i, raw in enumerate(data["regions"]):
        if not isinstance(raw, dict):
            raise InputError(f"Region {i + 1} of the layout must be an object with prompt, subjects and where.")
        extra = set(raw) - {"prompt", "subjects", "where", "strength", "feather"}
        if extra:
            raise InputError(f"Region {i + 1}: unknown key(s) {sorted(extra)} (use prompt, subjects, where, strength, feather).")
        prompt = raw.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"Region {i + 1} of the layout has no prompt: give it its own, e.g. \"a dog on a beach\".")
        where = raw.get("where") or (areas[i] if i < len(areas) else "")
        if not where:
            raise InputError(f"Region {i + 1} has no 'where' and the layout names no area for it: add \"where\": \"left\" "
                             "(an area, a box 'x0,y0,x1,y1' or a mask file), or a \"layout\".")
        subjects = raw.get("subjects") or {}
        if not isinstance(subjects, dict):
            raise InputError(f"Region {i + 1}: subjects must be an object word → image file, e.g. {{\"dog\": \"dog.jpg\"}}.")

        def resolve(value):
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() or base is None else base / p

        parsed = []
        for word, image in subjects.items():
            image, _, mask = str(image).partition("::")  # word: "photo.png::mask.png" for a subject mask
            parsed.append((str(word), resolve(image), resolve(mask) if mask else None))
        where_text = str(where)
        is_file = where_text.lower() not in AREAS and "," not in where_text
        out.append(RegionSpec(prompt, parsed, str(resolve(where_text)) if is_file else where_text,
                              _strength(raw.get("strength", 1.0), i),
                              _feather(raw.get("feather", data.get("feather", 0.0)), i)))
    return out


def spec_mask(spec: RegionSpec, width: int, height: int) -> torch.Tensor:
    """The region's mask [H,W] at the picture's size: an area, a box, or a mask image (white = here)."""
    where = spec.where
    if where.strip().lower().replace("_", "-") in AREAS or "," in where:
        return area_mask(where, width, height)
    from .images import mask_array, open_image

    image = open_image(where, what="region mask")
    return torch.from_numpy(mask_array(image, (width, height))).float().clamp(0, 1)


def sample_regions(models, specs: Sequence[RegionSpec], seeds: Sequence[int], width: int, height: int,
                   fit: str = "crop", cache: dict | None = None) -> list[Region]:
    """Each RegionSpec's own prompt and subjects through CLIP and the prior (with the run's seeds), its mask at the
    picture's size: the Regions `decode` takes. `cache` shares subject encodings with the base (same photo, once)."""
    from .interleave import interleave_prompt
    from .pipeline import SubjectInput, encode_subjects, sample_prior

    clip = models.clip
    blank = clip.blank_embedding()
    out = []
    for spec in specs:
        subjects = [SubjectInput(word, image, mask) for word, image, mask in spec.subjects]
        prompt = interleave_prompt(clip, spec.prompt, encode_subjects(clip, subjects, fit, cache=cache))
        embeds = sample_prior(models.prior, prompt, blank, None, list(seeds))
        out.append(Region(embeds.embeds, embeds.negative, spec_mask(spec, width, height), spec.strength, spec.feather))
    return out


def check_specs(specs: Sequence[RegionSpec], width: int, height: int):
    """Everything about the regions that can be known before a model loads: words against their prompts (the
    tokenizer alone), the images and masks readable, each mask not empty."""
    from .images import open_image
    from .interleave import check_prompt_words

    for i, spec in enumerate(specs):
        check_prompt_words(spec.prompt, [word for word, _image, _mask in spec.subjects])
        for _word, image, mask in spec.subjects:
            open_image(image, what=f"region {i + 1} subject image")
            if mask is not None:
                open_image(mask, what=f"region {i + 1} subject mask")
        if not bool((spec_mask(spec, width, height) > 0).any()):
            raise InputError(f"Region {i + 1}'s mask ({spec.where}) is empty at {width}×{height}: nothing of the picture "
                             "would use it. Paint it, or choose another area.")
