"""The Kandinsky 2.2 decoder (UNet + MoVQ + scheduler): image embeddings → pixels.

`decode` repeats diffusers' `KandinskyV22Pipeline.__call__` (and, with `init_image`,
`KandinskyV22Img2ImgPipeline.__call__`) operation for operation, with one seed per image and a choice of
diffusers samplers. Loading lives in `decoder_files`; its names are re-exported here.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .seeds import generator as torch_generator
from .seeds import seed_list
from .errors import InputError, ModelFileError, NonFiniteError
from .loading import resolve_dtype

log = logging.getLogger("lambda_eclipse")

DECODER_URL = "https://huggingface.co/kandinsky-community/kandinsky-2-2-decoder"
DECODER_HUB_ID = "kandinsky-community/kandinsky-2-2-decoder"
LEARNED_VARIANCE = ("learned", "learned_range")
_HALF = (torch.float16, torch.bfloat16)

# Sampler name → (diffusers scheduler class, config overrides). Each is built from the decoder's own
# scheduler config with `from_config`, so betas, train steps, spacing and offset stay the model's.
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "euler_a")
RECOMMENDED_STEPS = {"ddpm": 50, "ddim": 50, "dpmpp_2m": 20, "dpmpp_2m_karras": 20, "unipc": 20, "euler_a": 30}
# DPM-Solver's own learned-variance handling keeps 3 channels (pixel models); the variance channels are
# dropped here instead, so its variance_type is cleared.
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "variance_type": None}
_SAMPLER_SPECS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(_DPMPP_2M)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(_DPMPP_2M, use_karras_sigmas=True)),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
}
# Schedulers whose step() reads the learned-variance channels (the others get the noise channels only).
_VARIANCE_READERS = ("DDPMScheduler", "DDPMParallelScheduler", "UnCLIPScheduler")


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

    def new_scheduler(self, sampler: str | None = None):
        """A fresh scheduler: `sampler` (one of SAMPLERS) built from the saved config, or with None the
        class the config names (`_class_name`; DDPMScheduler when absent)."""
        if sampler is None:
            return _scheduler_from_config(self.scheduler_config, self.source)
        return make_scheduler(self.scheduler_config, sampler, self.source)


def _scheduler_from_config(config: Mapping[str, Any], where: str):
    import diffusers

    name = config.get("_class_name") or "DDPMScheduler"
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelFileError(
            f"The scheduler config of {where} names the scheduler class {name!r}, which this "
            f"diffusers ({diffusers.__version__}) does not have. Use the published DDPMScheduler config from {DECODER_URL}."
        )
    try:
        return cls.from_config(dict(config))
    except Exception as exc:  # a malformed config: say where it came from
        raise ModelFileError(f"The scheduler config of {where} is not usable by {name} ({exc}).") from exc


def check_sampler(sampler: str) -> str:
    if sampler not in _SAMPLER_SPECS:
        raise InputError(f"Unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}.")
    return sampler


def make_scheduler(scheduler_config: Mapping[str, Any], sampler: str = "ddpm", where: str = "the decoder"):
    """The diffusers scheduler for `sampler`, built with `from_config` from the decoder's scheduler config."""
    import diffusers

    class_name, overrides = _SAMPLER_SPECS[check_sampler(sampler)]
    cls = getattr(diffusers, class_name)
    try:
        return cls.from_config(dict(scheduler_config), **overrides)
    except Exception as exc:
        raise ModelFileError(f"The scheduler config of {where} is not usable by {class_name} ({exc}).") from exc


def _uses_learned_variance(scheduler) -> bool:
    variance_type = getattr(scheduler.config, "variance_type", None)
    return variance_type in LEARNED_VARIANCE and type(scheduler).__name__ in _VARIANCE_READERS


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
    """The pack's one seed rule (core.seeds): image i uses seed + i, wrapping at 2^64."""
    return seed_list(seeds, batch, what="seeds")


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not (0 < float(strength) <= 1):
        raise InputError(f"strength must be a number in (0, 1] (1 = repaint fully, small = stay close); got {strength!r}.")
    return float(strength)


def _init_pixels(init_image, batch: int, width: int, height: int) -> torch.Tensor:
    """init_image → [B,3,H,W] float32 in [−1,1] at the output size, as VaeImageProcessor.preprocess makes it.

    PIL images are resized with PIL bicubic (reducing_gap=1) exactly as the img2img pipeline does. Tensors
    ([B,H,W,3] / [H,W,3], 0..1, ComfyUI's IMAGE) of another size are resized with antialiased bicubic
    (diffusers would use nearest neighbour); at the output size they are used as they are.
    """
    import numpy as np
    from PIL import Image

    if isinstance(init_image, Image.Image) or (
        isinstance(init_image, (list, tuple)) and init_image and all(isinstance(i, Image.Image) for i in init_image)
    ):
        images = [init_image] if isinstance(init_image, Image.Image) else list(init_image)
        arrays = []
        for image in images:
            image = image.convert("RGB")  # the pipeline would read an RGBA image as 4 latent channels
            image = image.resize((width, height), resample=Image.BICUBIC, reducing_gap=1)
            arrays.append(np.array(image).astype(np.float32) / 255.0)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif isinstance(init_image, torch.Tensor):
        pixels = init_image.detach()
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[0] < 1:
            raise InputError(
                f"init_image must be an RGB image tensor [batch, height, width, 3] (ComfyUI IMAGE); got {list(pixels.shape)}."
            )
        if not pixels.is_floating_point():
            raise InputError(f"init_image must be a float tensor with values 0..1; got {pixels.dtype}.")
        pixels = pixels.float().cpu()
        if not torch.isfinite(pixels).all():
            raise InputError("init_image contains NaN or infinite values.")
        low, high = pixels.min().item(), pixels.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise InputError(f"init_image values must be in 0..1; got {low:.3g}..{high:.3g}.")
        pixels = pixels.permute(0, 3, 1, 2)
        if tuple(pixels.shape[-2:]) != (height, width):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0, 1)
    else:
        raise InputError(
            f"init_image must be a PIL image, a list of them, or a tensor [batch, height, width, 3]; got {type(init_image).__name__}."
        )
    if pixels.shape[0] not in (1, batch):
        raise InputError(f"init_image has {pixels.shape[0]} images; give 1 (used for all) or {batch} (one per embedding).")
    # Keeps the channels-last strides of the permute, as the pipeline's numpy_to_pt does (the MoVQ encoder's
    # convolutions round differently on the two layouts).
    return 2.0 * pixels - 1.0


def _encode(movq, pixels: torch.Tensor, batch: int, device) -> torch.Tensor:
    """MoVQ-encode as KandinskyV22Img2ImgPipeline: `movq.encode(image).latents` (unquantized, unscaled)."""
    dtype = movq.dtype
    latents = movq.encode(pixels.to(device=device, dtype=dtype)).latents
    if latents.dtype in _HALF and not torch.isfinite(latents).all():
        log.warning("The MoVQ encode overflowed in %s; encoding again in fp32.", latents.dtype)
        with torch.no_grad():
            movq32 = copy.deepcopy(movq).to(torch.float32)
            try:
                latents = movq32.encode(pixels.to(device=device, dtype=torch.float32)).latents.to(dtype)
            finally:
                del movq32
    if latents.shape[0] != batch:
        latents = latents.expand(batch, -1, -1, -1)
    # The MoVQ returns channels-last strides; the pipeline's repeat_interleave makes them contiguous, and the
    # UNet's convolutions round differently on the two layouts.
    return latents.contiguous()


def _step_kwargs(scheduler, generator, eta: float = 0.0) -> dict:
    """What diffusers' SD pipelines pass (prepare_extra_step_kwargs): generator/eta only where step() takes them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


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
    sampler: str | None = "ddpm",
    init_image=None,
    strength: float = 1.0,
    preview: Callable[[int, int, torch.Tensor], None] | None = None,
    regions: Sequence | None = None,
    batch_regions: bool | None = None,
) -> torch.Tensor:
    """Image embeddings [B,E] (negatives [1,E] or [B,E]) → images [B,H,W,3], float32 in [0,1], on the CPU.

    Image i starts from `torch.Generator().manual_seed(seeds[i])`, so it is the same picture whether it is
    decoded alone or in a batch. `sampler` is one of SAMPLERS (None: the class the decoder's scheduler
    config names). `init_image` (PIL image(s) or a [B|1,H,W,3] 0..1 tensor) + `strength` in (0,1] turns on
    img2img: the image is MoVQ-encoded and noised to the first of the last int(steps·strength) timesteps.
    `latents` replaces the seeded starting noise. `callback(step_index, total_steps)` runs after every
    step (an exception it raises, e.g. `Cancelled`, stops the run at once); `preview(step_index, total,
    latents)` gets the scheduler's x0 prediction when it has one (else the current latents; do not modify).
    `regions` (core.regions.Region or (embeds, negative, mask, strength) tuples) blend each region's own noise
    prediction into its part of the picture (see core/regions.py); `batch_regions` runs all branches in one UNet
    call per step (default: on CUDA; elsewhere one call per branch, which is exact and no slower on a CPU), falling
    back to one call per branch when the GPU runs out of memory.
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
    if sampler is not None:
        check_sampler(sampler)
    strength = _check_strength(strength)
    img2img_steps = min(int(steps * strength), steps)  # KandinskyV22Img2ImgPipeline.get_timesteps
    if init_image is not None and img2img_steps < 1:
        raise InputError(
            f"strength {strength} × {steps} steps leaves no denoising step (int(steps·strength) = 0); "
            "raise strength or steps."
        )

    scale = decoder.movq_scale_factor
    out_w, out_h, changed = round_size(width, height, scale**2)
    if changed:
        log.warning(
            "The decoder works in blocks of %d px: %dx%d was rounded up to %dx%d.", scale**2, width, height, out_w, out_h
        )
    shape = (batch, decoder.latent_channels, out_h // scale, out_w // scale)
    if latents is not None and tuple(latents.shape) != shape:
        raise InputError(f"latents have shape {list(latents.shape)}; expected {list(shape)} for {out_w}x{out_h}.")
    pixels = _init_pixels(init_image, batch, out_w, out_h) if init_image is not None else None

    unet, movq = decoder.unet, decoder.movq
    device, dtype = decoder.device, decoder.dtype
    branches = None
    if regions:
        from .regions import plan

        base_negative = None
        if do_cfg:
            base_negative = negative_embeds.expand(batch, -1)
        branches = plan(image_embeds, base_negative, list(regions), (shape[2], shape[3]), scale, embed_dim)
        if batch_regions is None:
            batch_regions = torch.device(device).type == "cuda"
        log.info("decoding with %d region(s): %d UNet branch(es) per step, %s", len(regions), len(branches),
                 "one batched call" if batch_regions else "one call each")
    scheduler = decoder.new_scheduler(sampler)
    # CPU generators, one per image: randn_tensor draws image i from generator i (on the CPU, then moves it),
    # for the starting noise and for every DDPM/ancestral step noise alike.
    generator = [torch_generator(s) for s in seed_list]

    with torch.inference_mode():
        embeds = image_embeds.to(device=device, dtype=dtype)
        if do_cfg:
            negative = negative_embeds.to(device=device, dtype=dtype).expand(batch, -1)
            embeds = torch.cat([negative, embeds], dim=0)

        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        if pixels is None:
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            else:
                latents = latents.to(device=device, dtype=dtype)
            latents = latents * scheduler.init_noise_sigma
        else:
            # KandinskyV22Img2ImgPipeline: encode, keep the last int(steps·strength) timesteps (as SD's img2img
            # with the scheduler order and begin index, so sigma schedulers work too), noise to the first.
            init_latents = _encode(movq, pixels, batch, device)
            t_start = steps - img2img_steps
            order = getattr(scheduler, "order", 1)
            timesteps = timesteps[t_start * order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * order)
            if latents is None:
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            else:
                noise = latents.to(device=device, dtype=dtype)
            latents = scheduler.add_noise(init_latents.to(dtype), noise, timesteps[:1].repeat(batch))

        if sampler is None:  # the config's own class: as the pipeline does
            learned_variance = hasattr(scheduler.config, "variance_type") and scheduler.config.variance_type in LEARNED_VARIANCE
        else:
            learned_variance = _uses_learned_variance(scheduler)
        step_kwargs = _step_kwargs(scheduler, generator)
        added_cond_kwargs = {"image_embeds": embeds}
        total = len(timesteps)
        def guide(noise_pred):
            if do_cfg:
                noise_pred, variance_pred = noise_pred.split(latents.shape[1], dim=1)
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                _, variance_pred_text = variance_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
                noise_pred = torch.cat([noise_pred, variance_pred_text], dim=1)
            return noise_pred

        region_state = {"batched": bool(batch_regions)}
        if branches is not None:
            branch_embeds = []
            for branch in branches:
                cond = branch.embeds.to(device=device, dtype=dtype)
                if do_cfg:
                    cond = torch.cat([branch.negative.to(device=device, dtype=dtype), cond], dim=0)
                branch_embeds.append(cond)
            coefficients = [b.coefficient for b in branches]
            if not bool((coefficients[0] != 0).any()):  # regions cover the picture: the base is not needed
                branch_embeds, coefficients = branch_embeds[1:], coefficients[1:]

        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)  # identity for DDPM/DDIM/DPM-Solver
            if branches is None:
                noise_pred = guide(unet(
                    sample=model_input, timestep=t, encoder_hidden_states=None,
                    added_cond_kwargs=added_cond_kwargs, return_dict=False,
                )[0])
            else:
                noise_pred = _blend_branches(unet, model_input, t, branch_embeds, coefficients, guide, region_state)
            if not learned_variance:
                noise_pred, _ = noise_pred.split(latents.shape[1], dim=1)
            output = scheduler.step(noise_pred, t, latents, **step_kwargs)
            latents = output[0]
            if preview is not None:
                x0 = getattr(output, "pred_original_sample", None)
                preview(i, total, x0 if x0 is not None else latents)
            if callback is not None:
                callback(i, total)

        if not torch.isfinite(latents).all():
            raise NonFiniteError(_nonfinite_latents_message(unet, dtype))
        image = movq.decode(latents.to(movq.dtype), force_not_quantize=True).sample

    if image.dtype in _HALF and not torch.isfinite(image).all():
        log.warning("The MoVQ decode overflowed in %s; decoding again in fp32.", image.dtype)
        image = _decode_fp32(movq, latents)
    if not torch.isfinite(image).all():
        raise NonFiniteError(
            "The MoVQ turned finite latents into NaN/inf pixels, so the picture would be black. Its weights are "
            "probably damaged: run `python -m lambda_eclipse check` and re-download the MoVQ "
            "(kandinsky-2-2-movq.safetensors) if it is named there."
        )

    # Outside inference mode, so the caller gets an ordinary tensor it may modify in place.
    with torch.no_grad():
        image = image * 0.5 + 0.5
        image = image.clamp(0, 1)
        return image.cpu().permute(0, 2, 3, 1).float().contiguous()


def _blend_branches(unet, model_input, t, branch_embeds, coefficients, guide, state) -> torch.Tensor:
    """Each branch's guided noise prediction, blended per latent pixel (core.regions.blend). Batched into one UNet
    call while memory allows; after an out-of-memory error, one call per branch for the rest of the run."""
    from .regions import blend

    def one(embeds):
        return guide(unet(sample=model_input, timestep=t, encoder_hidden_states=None,
                          added_cond_kwargs={"image_embeds": embeds}, return_dict=False)[0])

    if state["batched"] and len(branch_embeds) > 1:
        try:
            out = unet(sample=torch.cat([model_input] * len(branch_embeds)), timestep=t, encoder_hidden_states=None,
                       added_cond_kwargs={"image_embeds": torch.cat(branch_embeds)}, return_dict=False)[0]
            predictions = [guide(part) for part in out.chunk(len(branch_embeds))]
            return blend(predictions, coefficients)
        except torch.OutOfMemoryError:
            state["batched"] = False
            log.warning("Out of memory with %d region branches in one UNet call; running them one at a time.",
                        len(branch_embeds))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return blend([one(e) for e in branch_embeds], coefficients)


def _nonfinite_latents_message(unet, dtype) -> str:
    lora = "; or a decoder LoRA applied to it holds extreme values (try it at strength 0)" if hasattr(unet, "loras") else ""
    half = (f" In {str(dtype).replace('torch.', '')} the UNet can overflow: try bf16 or fp32." if dtype in _HALF else "")
    return ("The decoder UNet produced NaN/inf latents, so the picture would be black; nothing was saved."
            f"{half} Otherwise its weights are damaged (run `python -m lambda_eclipse check`){lora}; check also the "
            "embeddings given to it (guidance, a Lerp of non-finite embeds).")


def _decode_fp32(movq, latents: torch.Tensor) -> torch.Tensor:
    # A temporary fp32 copy leaves the shared model untouched (another run may be using it).
    with torch.no_grad():
        movq32 = copy.deepcopy(movq).to(torch.float32)
        try:
            return movq32.decode(latents.float(), force_not_quantize=True).sample
        finally:
            del movq32


# -- loading (core/decoder_files.py), re-exported ------------------------------------------------------
# Resolved on first use (PEP 562) so that either module can be imported first.
_FILE_API = (
    "load_decoder", "load_decoder_files", "save_decoder_files", "sniff_decoder_file", "shipped_config",
    "EXPECTED_FILES", "SUBFOLDERS", "DECODER_PIPELINES", "CONFIG_DIR",
)


def __getattr__(name: str):
    if name in _FILE_API:
        from . import decoder_files

        return getattr(decoder_files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_FILE_API))
