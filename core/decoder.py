"""The Kandinsky 2.2 decoder (UNet + MoVQ + scheduler from a diffusers folder): image embeddings → pixels.

`decode` repeats diffusers' `KandinskyV22Pipeline.__call__` operation for operation, with one seed per image.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import InputError, MissingModelsError, ModelFileError
from .loading import read_json, resolve_dtype

log = logging.getLogger("lambda_eclipse")

DECODER_URL = "https://huggingface.co/kandinsky-community/kandinsky-2-2-decoder"
DECODER_HUB_ID = "kandinsky-community/kandinsky-2-2-decoder"
EXPECTED_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "movq/config.json",
    "movq/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)
SUBFOLDERS = ("unet", "movq", "scheduler")
# model_index.json classes whose unet/movq/scheduler are the text-to-image decoder.
DECODER_PIPELINES = {
    "KandinskyV22Pipeline",
    "KandinskyV22Img2ImgPipeline",
    "KandinskyV22CombinedPipeline",
    "KandinskyV22Img2ImgCombinedPipeline",
}
LEARNED_VARIANCE = ("learned", "learned_range")
_WEIGHT_STEM = "diffusion_pytorch_model"
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class KandinskyDecoder:
    """The three decoder parts. The scheduler is kept as its config so every run gets a fresh one."""

    unet: Any  # diffusers.UNet2DConditionModel
    movq: Any  # diffusers.VQModel
    scheduler_config: dict
    source: str

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device=None, dtype=None) -> "KandinskyDecoder":
        for module in (self.unet, self.movq):
            kwargs = {}
            if device is not None:
                kwargs["device"] = torch.device(device)
            # Only when it changes: diffusers' ModelMixin.to() logs a (misleading) warning for every dtype argument.
            if dtype is not None and resolve_dtype(dtype) != module.dtype:
                kwargs["dtype"] = resolve_dtype(dtype)
            if kwargs:
                module.to(**kwargs)
        return self

    @property
    def embedding_dim(self) -> int:
        return int(self.unet.config.encoder_hid_dim)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def movq_scale_factor(self) -> int:
        # Same formula as KandinskyV22Pipeline.__init__.
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    def new_scheduler(self):
        """A fresh scheduler built from the saved config (its `_class_name`; DDPMScheduler when absent)."""
        return _scheduler_from_config(self.scheduler_config, self.source)


def _scheduler_from_config(config: Mapping[str, Any], where: str):
    import diffusers

    name = config.get("_class_name") or "DDPMScheduler"
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelFileError(
            f"scheduler/scheduler_config.json of {where} names the scheduler class {name!r}, which this "
            f"diffusers ({diffusers.__version__}) does not have. Use the published DDPMScheduler config from {DECODER_URL}."
        )
    try:
        return cls.from_config(dict(config))
    except Exception as exc:  # a malformed config: say where it came from
        raise ModelFileError(f"The scheduler config of {where} is not usable by {name} ({exc}).") from exc


# -- loading ---------------------------------------------------------------------------------------

def _expected_layout(folder: str | Path) -> str:
    folder = Path(folder)
    return "\n".join(f"    {folder / name}" for name in EXPECTED_FILES)


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))


def _check_unet_config(config: Mapping[str, Any], where: str, latent_channels: int | None = None):
    hid_type = config.get("encoder_hid_dim_type")
    if hid_type != "image_proj":
        raise ModelFileError(
            f"The UNet in {where} is not an image-embedding UNet (encoder_hid_dim_type={hid_type!r}; the "
            "Kandinsky 2.2 decoder uses 'image_proj'). Kandinsky 2.1 ('text_image_proj') or Stable Diffusion "
            f"UNets cannot decode λ-ECLIPSE embeddings. Use {DECODER_URL}."
        )
    added = config.get("addition_embed_type")
    if added != "image":
        hint = " (that is the ControlNet-depth decoder, which also needs a hint image)" if added == "image_hint" else ""
        raise ModelFileError(
            f"The UNet in {where} has addition_embed_type={added!r}{hint}; the text-to-image Kandinsky 2.2 "
            f"decoder has 'image'. Use {DECODER_URL}."
        )
    in_channels = config.get("in_channels")
    if latent_channels is not None and in_channels != latent_channels:
        hint = " (the inpainting decoder takes image + mask channels)" if in_channels == 9 else ""
        raise ModelFileError(
            f"The UNet in {where} takes {in_channels} input channels but the MoVQ makes {latent_channels}-channel "
            f"latents{hint}. Use the text-to-image decoder from {DECODER_URL}."
        )


def _weights_variant(folder: Path) -> tuple[bool, str | None]:
    """(use_safetensors, variant) for a diffusers model folder; raises when it holds no weights."""
    for variant in (None, "fp16"):
        stem = _WEIGHT_STEM if variant is None else f"{_WEIGHT_STEM}.{variant}"
        if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
            return True, variant
        if (folder / f"{stem}.bin").is_file() or (folder / f"{stem}.bin.index.json").is_file():
            return False, variant
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise ModelFileError(
        f"No weights in {folder}: expected {_WEIGHT_STEM}.safetensors (or .bin); found {found}. "
        f"Download it from {DECODER_URL} (folder {folder.name}/)."
    )


def _from_pretrained(cls, source: str, what: str, **kwargs):
    try:
        return cls.from_pretrained(source, **kwargs)
    except ModelFileError:
        raise
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError/SafetensorError
        where = f"{source}/{kwargs['subfolder']}" if kwargs.get("subfolder") else source
        raise ModelFileError(
            f"The {what} weights in {where} could not be read ({type(exc).__name__}: {exc}). "
            f"Re-download them from {DECODER_URL}; a partial download is the usual cause."
        ) from exc


def _reject_other_folder(folder: Path):
    """Say what a folder is when it is clearly not the decoder."""
    index = folder / "model_index.json"
    if index.is_file():
        name = read_json(index).get("_class_name")
        if name in DECODER_PIPELINES:
            return
        if name == "KandinskyV22PriorPipeline":
            raise ModelFileError(
                f"{folder} is the Kandinsky 2.2 prior (model_index.json: {name}), not the decoder. "
                f"The decoder is {DECODER_URL}."
            )
        raise ModelFileError(
            f"{folder} is a {name or 'unknown'} folder (model_index.json), not the Kandinsky 2.2 decoder "
            f"(KandinskyV22Pipeline). Download {DECODER_URL}."
        )
    config = folder / "config.json"
    if config.is_file() and not (folder / "unet").is_dir():
        name = read_json(config).get("_class_name")
        if name == "PriorTransformer":
            raise ModelFileError(
                f"{folder} is a prior (config.json: PriorTransformer), not the Kandinsky 2.2 decoder. Load it as "
                f"the λ-ECLIPSE prior; the decoder is a separate download: {DECODER_URL}."
            )
        raise ModelFileError(
            f"{folder} holds a single {name or 'unknown'} model (config.json), not the Kandinsky 2.2 decoder "
            f"pipeline folder. Expected:\n{_expected_layout(folder)}\nDownload: {DECODER_URL}"
        )


def _load_local(folder: Path, dtype: torch.dtype) -> KandinskyDecoder:
    from diffusers import UNet2DConditionModel, VQModel

    _reject_other_folder(folder)
    missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise ModelFileError(
            f"{folder} is not a complete Kandinsky 2.2 decoder folder: {', '.join(n + '/' for n in missing)} "
            f"missing. Expected:\n{_expected_layout(folder)}\nDownload: {DECODER_URL}"
        )
    if not (folder / "model_index.json").is_file():
        log.debug("%s has no model_index.json; loading unet/, movq/ and scheduler/ anyway", folder)
    for name, file in (("unet", "config.json"), ("movq", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / name / file).is_file():
            raise ModelFileError(f"{folder / name / file} is missing. Download it from {DECODER_URL}.")

    unet_config = read_json(folder / "unet" / "config.json")
    movq_config = read_json(folder / "movq" / "config.json")
    _check_unet_config(unet_config, str(folder / "unet"), movq_config.get("latent_channels", 4))
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    _scheduler_from_config(scheduler_config, str(folder))  # fail now, not at the first decode
    if (folder / "model_index.json").is_file():
        listed = (read_json(folder / "model_index.json").get("scheduler") or [None, None])[-1]
        named = scheduler_config.get("_class_name", "DDPMScheduler")
        if listed and listed != named:
            log.warning(
                "%s: model_index.json lists the scheduler %s but scheduler_config.json says %s; using %s "
                "(diffusers' from_pretrained would use %s).", folder, listed, named, named, listed,
            )

    parts = {}
    for name, cls in (("unet", UNet2DConditionModel), ("movq", VQModel)):
        use_safetensors, variant = _weights_variant(folder / name)
        parts[name] = _from_pretrained(
            cls, str(folder / name), name.upper() if name == "movq" else "UNet",
            torch_dtype=dtype, use_safetensors=use_safetensors, variant=variant, local_files_only=True,
        )
    return KandinskyDecoder(parts["unet"].eval(), parts["movq"].eval(), dict(scheduler_config), str(folder))


def _load_hub(repo_id: str, dtype: torch.dtype) -> KandinskyDecoder:
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    unet = _from_pretrained(UNet2DConditionModel, repo_id, "UNet", subfolder="unet", torch_dtype=dtype)
    movq = _from_pretrained(VQModel, repo_id, "MOVQ", subfolder="movq", torch_dtype=dtype)
    _check_unet_config(unet.config, f"{repo_id}/unet", movq.config.latent_channels)
    try:
        scheduler_config = DDPMScheduler.load_config(repo_id, subfolder="scheduler")
    except Exception as exc:
        raise ModelFileError(f"{repo_id}/scheduler/scheduler_config.json could not be read ({exc}).") from exc
    scheduler_config = dict(scheduler_config)
    _scheduler_from_config(scheduler_config, repo_id)
    return KandinskyDecoder(unet.eval(), movq.eval(), scheduler_config, repo_id)


def load_decoder(
    path: str | os.PathLike, device="cpu", dtype="fp32", allow_download: bool = False
) -> KandinskyDecoder:
    """Load the Kandinsky 2.2 decoder from its diffusers folder (or, only if allowed, from a hub id)."""
    torch_dtype = resolve_dtype(dtype)
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelFileError(
                f"{folder} is a file; the Kandinsky 2.2 decoder is a diffusers folder. Give the folder that "
                f"holds:\n{_expected_layout('<decoder folder>')}\nDownload: {DECODER_URL}"
            )
        decoder = _load_local(folder, torch_dtype)
    elif allow_download and _looks_like_hub_id(text):
        log.info("downloading the decoder %s from the Hugging Face hub (if not cached)", text)
        decoder = _load_hub(text, torch_dtype)
    else:
        hint = ""
        if _looks_like_hub_id(text):
            hint = f" '{text}' looks like a Hugging Face id, but downloading is off."
        raise MissingModelsError(
            f"Kandinsky 2.2 decoder not found: {folder} does not exist.{hint} Download the decoder into a "
            f"folder holding:\n{_expected_layout(folder)}\nfrom {DECODER_URL}"
        )
    decoder.to(device=device)
    log.info(
        "Kandinsky 2.2 decoder from %s: %s, %s, scheduler %s",
        decoder.source, decoder.dtype, decoder.device, decoder.scheduler_config.get("_class_name", "DDPMScheduler"),
    )
    return decoder


# -- decoding --------------------------------------------------------------------------------------

def round_size(width: int, height: int, multiple: int = 64) -> tuple[int, int, bool]:
    """Round up to `multiple` as diffusers does (latent = ceil(size/64)*8); returns (w, h, changed)."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InputError(f"{name} must be a positive whole number of pixels; got {value!r}.")
    width, height = int(width), int(height)
    w = math.ceil(width / multiple) * multiple
    h = math.ceil(height / multiple) * multiple
    return w, h, (w, h) != (width, height)


def _check_embeds(embeds, expected_dim: int, name: str) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor):
        raise InputError(f"{name} must be a tensor [batch, {expected_dim}]; got {type(embeds).__name__}.")
    if embeds.ndim == 1:
        embeds = embeds[None]
    if embeds.ndim != 2 or embeds.shape[0] < 1:
        raise InputError(f"{name} must have shape [batch, {expected_dim}]; got {list(embeds.shape)}.")
    if embeds.shape[1] != expected_dim:
        raise InputError(
            f"The decoder expects {expected_dim}-d image embeddings; got {embeds.shape[1]}-d {name}: "
            "the prior and decoder do not match."
        )
    if not embeds.is_floating_point():
        raise InputError(f"{name} must be floating point; got {embeds.dtype}.")
    if not torch.isfinite(embeds).all():
        raise InputError(f"{name} contain NaN or infinite values.")
    return embeds


def _seed_list(seeds: Sequence[int] | int, batch: int) -> list[int]:
    if isinstance(seeds, bool):
        raise InputError(f"seeds must be an int or a list of ints; got {seeds!r}.")
    if isinstance(seeds, numbers.Integral):
        return [(int(seeds) + i) % 2**64 for i in range(batch)]
    seeds = list(seeds)
    if len(seeds) != batch:
        raise InputError(f"Got {len(seeds)} seeds for {batch} images; give one seed per image (or a single int).")
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds):
        raise InputError(f"seeds must be whole numbers; got {seeds!r}.")
    return [int(s) % 2**64 for s in seeds]


def decode(
    decoder: KandinskyDecoder,
    image_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    *,
    width: int = 512,
    height: int = 512,
    steps: int = 50,
    guidance: float = 4.0,
    seeds: Sequence[int] | int = 0,
    callback: Callable[[int, int], None] | None = None,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image embeddings [B,E] (negatives [1,E] or [B,E]) → images [B,H,W,3], float32 in [0,1], on the CPU.

    Image i starts from `torch.Generator().manual_seed(seeds[i])`, so it is the same picture whether it is
    decoded alone or in a batch. `callback(step_index, total_steps)` runs after every step (step_index
    counts from 0); an exception it raises (e.g. `Cancelled`) stops the run at once.
    """
    from diffusers.utils.torch_utils import randn_tensor

    embed_dim = decoder.embedding_dim
    image_embeds = _check_embeds(image_embeds, embed_dim, "image_embeds")
    batch = image_embeds.shape[0]
    guidance = float(guidance)
    if not math.isfinite(guidance):
        raise InputError(f"guidance must be a finite number; got {guidance}.")
    do_cfg = guidance > 1  # KandinskyV22Pipeline.do_classifier_free_guidance
    if do_cfg:
        if negative_embeds is None:
            raise InputError("negative_embeds are needed when guidance > 1 (classifier-free guidance).")
        negative_embeds = _check_embeds(negative_embeds, embed_dim, "negative_embeds")
        if negative_embeds.shape[0] not in (1, batch):
            raise InputError(
                f"negative_embeds has batch {negative_embeds.shape[0]}; it must be 1 or {batch} (the image_embeds batch)."
            )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise InputError(f"steps must be a whole number ≥ 1; got {steps!r}.")
    steps = int(steps)
    seed_list = _seed_list(seeds, batch)

    scale = decoder.movq_scale_factor
    out_w, out_h, changed = round_size(width, height, scale**2)
    if changed:
        log.warning(
            "The decoder works in blocks of %d px: %dx%d was rounded up to %dx%d.", scale**2, width, height, out_w, out_h
        )
    shape = (batch, decoder.latent_channels, out_h // scale, out_w // scale)
    if latents is not None and tuple(latents.shape) != shape:
        raise InputError(f"latents have shape {list(latents.shape)}; expected {list(shape)} for {out_w}x{out_h}.")

    unet, movq = decoder.unet, decoder.movq
    device, dtype = decoder.device, decoder.dtype
    scheduler = decoder.new_scheduler()
    # CPU generators, one per image: randn_tensor draws image i from generator i (on the CPU, then moves it).
    generator = [torch.Generator().manual_seed(s) for s in seed_list]

    with torch.inference_mode():
        embeds = image_embeds.to(device=device, dtype=dtype)
        if do_cfg:
            negative = negative_embeds.to(device=device, dtype=dtype).expand(batch, -1)
            embeds = torch.cat([negative, embeds], dim=0)

        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma

        learned_variance = hasattr(scheduler.config, "variance_type") and scheduler.config.variance_type in LEARNED_VARIANCE
        added_cond_kwargs = {"image_embeds": embeds}
        total = len(timesteps)
        # As in the pipeline, there is no scheduler.scale_model_input (identity for DDPM/DDIM/UnCLIP).
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            noise_pred = unet(
                sample=model_input, timestep=t, encoder_hidden_states=None,
                added_cond_kwargs=added_cond_kwargs, return_dict=False,
            )[0]
            if do_cfg:
                noise_pred, variance_pred = noise_pred.split(latents.shape[1], dim=1)
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                _, variance_pred_text = variance_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
                noise_pred = torch.cat([noise_pred, variance_pred_text], dim=1)
            if not learned_variance:
                noise_pred, _ = noise_pred.split(latents.shape[1], dim=1)
            latents = scheduler.step(noise_pred, t, latents, generator=generator)[0]
            if callback is not None:
                callback(i, total)

        if dtype in _HALF and not torch.isfinite(latents).all():
            log.warning("The UNet produced non-finite latents in %s; the image will be wrong. Try bf16 or fp32.", dtype)
        image = movq.decode(latents.to(movq.dtype), force_not_quantize=True).sample

    if image.dtype in _HALF and not torch.isfinite(image).all():
        log.warning("The MoVQ decode overflowed in %s; decoding again in fp32.", image.dtype)
        image = _decode_fp32(movq, latents)

    # Outside inference mode, so the caller gets an ordinary tensor it may modify in place.
    with torch.no_grad():
        image = image * 0.5 + 0.5
        image = image.clamp(0, 1)
        return image.cpu().permute(0, 2, 3, 1).float().contiguous()


def _decode_fp32(movq, latents: torch.Tensor) -> torch.Tensor:
    # A temporary fp32 copy leaves the shared model untouched (another run may be using it).
    with torch.no_grad():
        movq32 = copy.deepcopy(movq).to(torch.float32)
        try:
            return movq32.decode(latents.float(), force_not_quantize=True).sample
        finally:
            del movq32
