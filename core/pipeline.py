"""The whole λ-ECLIPSE job as functions: subjects + prompt (+ edge map) → prior embeddings → images."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .canny import canny_edges, control_embedding
from .clip import ClipEncoder, load_clip
from .errors import InputError
from .interleave import Prompt, Subject, interleave_prompt
from .interpolate import bilinear_grid
from .loading import resolve_dtype
from .seeds import check_seed, generator, seed_list
from .prior import LambdaEclipsePrior, load_prior

log = logging.getLogger("lambda_eclipse")


@dataclass
class Embeds:
    """Prior outputs and the negatives the decoder guides against, [B,E] each."""

    embeds: torch.Tensor
    negative: torch.Tensor
    seeds: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass
class SubjectInput:
    word: str
    image: object  # path, PIL image, array or [H,W,3] tensor
    mask: object | None = None
    weight: float = 1.0


@dataclass
class Models:
    clip: ClipEncoder
    prior: LambdaEclipsePrior
    decoder: object  # core.decoder.KandinskyDecoder


def seeds_for(seed: int | Sequence[int], batch: int) -> list[int]:
    """Image i uses seed + i (wrapping at 2^64): the pack's one seed rule (core.seeds)."""
    return seed_list(seed, batch)


def prior_noise(seeds: Sequence[int], dim: int) -> torch.Tensor:
    """[B,dim] N(0,1) noise, one CPU generator per seed: image i is reproducible alone (the official noise is unseeded)."""
    return torch.cat([torch.randn(1, dim, generator=generator(s)) for s in seeds])


@torch.inference_mode()
def sample_prior(
    prior: LambdaEclipsePrior,
    prompt: Prompt,
    blank: torch.Tensor,
    control: torch.Tensor | None = None,
    seeds: Sequence[int] = (0,),
) -> Embeds:
    """One prior forward per batch: noise, pooled text, interleaved tokens, mask, control → image embeddings."""
    seeds = list(seeds)
    batch = len(seeds)
    if batch < 1:
        raise InputError("Batch size must be at least 1.")
    param = prior.proj_in.weight
    device, dtype = param.device, param.dtype
    dim = prior.config.embedding_dim
    if prompt.tokens.shape[-1] != dim:
        raise InputError(
            f"The prompt was encoded by a CLIP with {prompt.tokens.shape[-1]}-d features but the prior expects {dim}-d. "
            "Use the CLIP the prior was trained with (OpenCLIP ViT-bigG/14)."
        )
    control = blank if control is None else control
    rows = lambda vector: vector.reshape(1, -1).expand(batch, -1).to(device, dtype)  # noqa: E731
    out = prior.predict(
        prior_noise(seeds, dim).to(device, dtype),
        rows(prompt.pooled),
        prompt.tokens.expand(batch, -1, -1).to(device, dtype),
        prompt.mask.expand(batch, -1).to(device),
        rows(control),
    )
    negative = blank.reshape(1, -1).float().expand(batch, -1)
    return Embeds(out.float(), negative.to(out.device).clone(), seeds)


def encode_subjects(
    clip: ClipEncoder, subjects: Sequence[SubjectInput], fit: str = "crop", cache: dict | None = None
) -> list[Subject]:
    """Subject photos → embeddings. `cache` lets several calls share the encoding of the same photo and mask."""
    from .images import open_image

    def key(source):
        return str(source) if isinstance(source, (str, Path)) else id(source)

    out = []
    for s in subjects:
        cache_key = (key(s.image), key(s.mask), fit)
        if cache is None or cache_key not in cache:
            image = open_image(s.image) if isinstance(s.image, (str, Path)) else s.image
            mask = open_image(s.mask, what="subject mask") if isinstance(s.mask, (str, Path)) else s.mask
            embedding = clip.encode_subject(image, mask, fit)
            if cache is not None:
                cache[cache_key] = embedding
        else:
            embedding = cache[cache_key]
        out.append(Subject(s.word, embedding, s.weight))
    return out


def load_models(paths, device: str = "cpu", dtype="fp32", allow_download: bool = False) -> Models:
    """Load the three models from `resolve_models`' result (or a dict with the same keys).

    Keys: prior; clip_text + clip_vision (or clip: one source with both towers); decoder_unet + decoder_movq
    (or decoder: a diffusers folder). `allow_download` is kept for old callers and does nothing: use the
    `download` command (core.download) to fetch missing files.
    """
    from .clip import load_clip_towers
    from .decoder_files import load_decoder_parts

    paths = dict(getattr(paths, "paths", paths))
    dtype = resolve_dtype(dtype)
    text = paths.get("clip_text", paths.get("clip"))
    vision = paths.get("clip_vision", paths.get("clip"))
    unet = paths.get("decoder_unet", paths.get("decoder"))
    movq = paths.get("decoder_movq", paths.get("decoder"))
    return Models(
        clip=load_clip_towers(text=text, vision=vision, device=device, dtype=dtype),
        # The prior is 34M parameters: fp32 costs nothing and keeps the official numbers.
        prior=load_prior(paths["prior"], device=device, dtype=torch.float32),
        decoder=load_decoder_parts(unet, movq, device=device, dtype=dtype),
    )


@dataclass
class Result:
    images: torch.Tensor  # [B,H,W,3] float 0..1
    embeds: Embeds
    prompt: Prompt
    edge_map: object | None = None


def generate(
    models: Models,
    prompt: str,
    subjects: Sequence[SubjectInput] = (),
    *,
    canny_image=None,
    canny_low: float = 100,
    canny_high: float = 200,
    seed: int = 0,
    batch: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    width: int = 512,
    height: int = 512,
    fit: str = "crop",
    callback: Callable[[int, int], None] | None = None,
    sampler: str = "ddpm",
    init_image=None,
    strength: float = 1.0,
) -> Result:
    """Subjects + prompt (+ layout) → images. Image i uses seed+i for both the prior noise and the decoder latents."""
    from .decoder import decode

    clip = models.clip
    interleaved = interleave_prompt(clip, prompt, encode_subjects(clip, subjects, fit))
    edge_map = canny_edges(canny_image, canny_low, canny_high) if canny_image is not None else None
    control = control_embedding(clip, edge_map) if edge_map is not None else None
    seeds = seeds_for(seed, batch)
    embeds = sample_prior(models.prior, interleaved, clip.blank_embedding(), control, seeds)
    images = decode(
        models.decoder, embeds.embeds, embeds.negative, width=width, height=height, steps=steps,
        guidance=guidance, seeds=seeds, callback=callback, sampler=sampler, init_image=init_image, strength=strength,
    )
    return Result(images, embeds, interleaved, edge_map)


def interpolation_grid(
    models: Models,
    prompt: str,
    corners: Sequence[Sequence[SubjectInput]],
    *,
    grid_steps: int = 2,
    mode: str = "lerp",
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    width: int = 512,
    height: int = 512,
    fit: str = "crop",
    callback: Callable[[int, int], None] | None = None,
    sampler: str = "ddpm",
) -> Result:
    """The paper's interpolation figure: four subject combinations (TL, TR, BL, BR) → a (S+1)×(S+1) grid.

    All four corners use the same prior noise (the official script draws unseeded noise per corner) and
    every cell the same decoder seed, so the grid shows the blend and nothing else.
    """
    from .decoder import decode

    seed = check_seed(seed)
    if len(corners) != 4:
        raise InputError("An interpolation grid needs exactly four corners: top-left, top-right, bottom-left, bottom-right.")
    clip = models.clip
    blank = clip.blank_embedding()
    corner_embeds = []
    encoded: dict = {}  # the grid's photos recur across corners (2 dogs × 2 hats = 4 photos, 8 uses)
    for subjects in corners:
        interleaved = interleave_prompt(clip, prompt, encode_subjects(clip, subjects, fit, cache=encoded))
        corner_embeds.append(sample_prior(models.prior, interleaved, blank, None, [seed]).embeds[0])
    grid = bilinear_grid(*corner_embeds, steps=grid_steps, mode=mode)
    n = grid.shape[0]
    negative = blank.reshape(1, -1).float().expand(n, -1).to(grid.device)
    images = decode(
        models.decoder, grid, negative, width=width, height=height, steps=steps, guidance=guidance,
        seeds=[seed] * n, callback=callback, sampler=sampler,
    )
    return Result(images, Embeds(grid, negative, [seed] * n), interleaved)
