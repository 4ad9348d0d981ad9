"""Concept fine-tuning of the Kandinsky 2.2 decoder (paper §3.3, App. D, Eq. 2), as a LoRA or in full.

    L = E_{ε, t, z_x} ‖ε − h_φ(x_t, t, z_x)‖²

z_x is the bigG image embedding of the concept photo itself (the UNet's ``added_cond_kwargs={"image_embeds": z_x}``),
x_t the photo's MoVQ latent (``movq.encode(x).latents``, x in [−1, 1]) noised with diffusers' DDPMScheduler.add_noise
built from the decoder's own scheduler config. The UNet outputs 8 channels (ε and the learned variance); the loss is
on the ε half, the part the decoder's sampler uses. Latents and z_x are computed once, before the loop.

In a fraction `--uncond-prob` (default 10 %) of the examples z_x is replaced by the blank-image embedding: at
inference the decoder's unconditional branch of classifier-free guidance *is* the blank embedding, so training the
LoRA only on z_x would let the conditional and unconditional predictions drift apart and over-amplify the concept at
guidance 4; keeping some unconditional steps keeps the guidance calibrated. No prior preservation (App. D).

Outputs in --out: ``concept_lora.safetensors`` (diffusers' PEFT key layout for a UNet, ``unet.<module>.lora_A/B.weight``,
with metadata: base decoder, rank, alpha, steps, images) or with --full ``concept_unet.safetensors`` (a whole decoder
UNet file for Load Decoder); ``checkpoint/state.safetensors`` (trainable weights, optimizer, RNG states, step, as
tensors + JSON: nothing is pickled; written atomically) from which --resume continues bit-identically on the CPU (on
a GPU with --deterministic); ``metrics.csv`` (its header always first); ``finetune_config.json``. A
``checkpoint/state.pt`` of an earlier version is still resumed, read without unpickling code (trainer/state_io.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.errors import OutputPathError
from .errors import CheckpointError, ConfigError, DataError, ResumeError, TrainingDivergedError
from .fsio import RunLock, atomic_write, check_output_folder, save_file_atomic, write_json_atomic
from .plot import plot_loss
from .state_io import load_legacy, load_state, read_state_metadata, save_state

log = logging.getLogger("lambda_eclipse.trainer")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LORA_FILE = "concept_lora.safetensors"
FULL_FILE = "concept_unet.safetensors"
CHECKPOINT = "checkpoint/state.safetensors"
LEGACY_CHECKPOINT = "checkpoint/state.pt"  # written by earlier versions (a pickle: read with weights_only=True)
METRICS_HEADER = ["step", "loss", "lr", "uncond", "seconds"]
# Settings that must not change within one run (a resume with another value is refused).
_FIXED = ("rank", "alpha", "lr", "batch_size", "resolution", "seed", "full", "uncond_prob", "weight_decay", "images",
          "masks", "mixed_precision", "max_grad_norm")


@dataclass
class FinetuneConfig:
    out: str
    images: list = field(default_factory=list)
    masks: str | None = None  # folder of masks: MASKS/<photo stem>.png, white = subject
    decoder: str | None = None
    decoder_unet: str | None = None
    decoder_movq: str | None = None
    clip: str | None = None
    clip_vision: str | None = None
    steps: int = 400
    rank: int = 4
    alpha: float | None = None  # None: = rank (scale 1, what diffusers assumes for a file without alphas)
    lr: float | None = None  # None: 1e-4 for the LoRA, 1e-5 for --full (App. D)
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    save_every: int = 100
    resume: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    full: bool = False
    uncond_prob: float = 0.1
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    cpu: bool = False
    deterministic: bool = False  # deterministic kernels: bit-identical resume on a GPU too (slower)
    sample_every: int = 0  # 0: no samples; N: decode each concept embedding every N steps (and at step 0)
    sample_steps: int = 20
    progress: bool = True

    def check(self):
        from .settings import FINETUNE_RULES, check_value

        def need(cond, msg):
            if not cond:
                raise ConfigError(f"finetune-decoder: {msg}")

        # every number finite and in its range (the command line's own rules): --weight-decay inf, --lr nan, …
        problems = [check_value(name, getattr(self, name), rule) for name, rule in FINETUNE_RULES.items()
                    if name != "resolution"]
        problems = [p for p in problems if p]
        need(not problems, "; ".join(problems))
        need(isinstance(self.steps, int) and self.steps >= 1, f"--steps must be ≥ 1; got {self.steps!r}")
        need(isinstance(self.rank, int) and self.rank >= 1, f"--rank must be ≥ 1; got {self.rank!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"--batch-size must be ≥ 1; got {self.batch_size!r}")
        need(isinstance(self.save_every, int) and self.save_every >= 1, f"--save-every must be ≥ 1; got {self.save_every!r}")
        need(isinstance(self.resolution, int) and self.resolution >= 64 and self.resolution % 64 == 0,
             f"--resolution must be a multiple of 64 (the decoder works in 64-px blocks); got {self.resolution!r}")
        need(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"--lr must be > 0; got {self.lr!r}")
        need(self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0), f"--alpha must be > 0; got {self.alpha!r}")
        need(0 <= self.uncond_prob < 1, f"--uncond-prob must be in [0, 1); got {self.uncond_prob!r}")
        need(self.weight_decay >= 0 and self.max_grad_norm >= 0, "--weight-decay and --max-grad-norm must be ≥ 0")
        need(isinstance(self.sample_every, int) and self.sample_every >= 0,
             f"--sample-every must be ≥ 0 (0 = no samples); got {self.sample_every!r}")
        need(isinstance(self.sample_steps, int) and 1 <= self.sample_steps <= 1000,
             f"--sample-steps must be between 1 and 1000; got {self.sample_steps!r}")
        need(self.mixed_precision in ("no", "fp16", "bf16"), f"--mixed-precision must be no, fp16 or bf16; got {self.mixed_precision!r}")
        need(bool(self.images), "missing --images (3–5 photos of the concept: files and/or folders)")
        need(self.decoder or (self.decoder_unet and self.decoder_movq),
             "missing the decoder: --decoder FOLDER, or --decoder-unet FILE and --decoder-movq FILE")
        need(not (self.decoder and (self.decoder_unet or self.decoder_movq)), "give --decoder or --decoder-unet/--decoder-movq, not both")
        need(self.clip or self.clip_vision, "missing the CLIP: --clip-vision FILE (bigG vision tower) or --clip FOLDER/FILE")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.lr is None:
            self.lr = 1e-5 if self.full else 1e-4
        return self


# -- data ----------------------------------------------------------------------------------------------------

def collect_images(entries) -> list[Path]:
    """Files and folders (their image files, sorted, not recursive) → image paths; DataError when none."""
    out: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"--images {path}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)}).")
            out += found
        elif path.is_file():
            out.append(path)
        elif path.exists():
            raise DataError(f"--images {path}: not a regular file or folder (a pipe or device); give image files.")
        else:
            raise DataError(f"--images {path}: no such file or folder.")
    if not out:
        raise DataError("--images: no image given (3–5 photos of the concept are typical).")
    return list(dict.fromkeys(out))


def find_masks(paths, masks_dir) -> dict:
    """photo path → its mask file MASKS/<photo stem>.<png|jpg|…> (white = subject); DataError when none matches."""
    if not masks_dir:
        return {}
    folder = Path(masks_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"--masks {folder}: no such folder (masks are MASKS/<photo stem>.png, white = subject).")
    found = {}
    for path in paths:
        for suffix in IMAGE_SUFFIXES:
            if (folder / f"{path.stem}{suffix}").is_file():
                found[path] = folder / f"{path.stem}{suffix}"
                break
    if not found:
        raise DataError(f"--masks {folder}: no mask named after any photo (expected e.g. {folder / (paths[0].stem + '.png')}).")
    missing = [p.name for p in paths if p not in found]
    if missing:
        log.warning("No mask for %s: used whole (or by its alpha).", ", ".join(missing))
    return found


def photo_pixels(image, resolution: int, mask=None) -> torch.Tensor:
    """PIL image (RGBA or with `mask`: subject composited on white) → [3, R, R] float32 in [−1, 1]: short side to
    R, centre crop."""
    import numpy as np
    from PIL import Image

    from ..core.images import subject_on_white

    pil, _ = subject_on_white(image, mask)
    w, h = pil.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        pil = pil.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    pil = pil.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def open_photos(paths, masks: dict | None = None) -> list[tuple]:
    """[(photo, mask or None)] decoded once; `masks`: photo path → mask file (white = subject)."""
    from ..core.images import open_image

    masks = masks or {}
    return [(open_image(p, what="concept photo"), open_image(masks[p], what="mask") if p in masks else None)
            for p in paths]


@torch.no_grad()
def concept_embeddings(photos, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_x [N,E], blank [E]) float32 on the CPU: each photo as Encode Subject encodes it (cropped to its mask)."""
    embeds = torch.stack([clip.encode_subject(im, m).float().cpu() for im, m in photos])
    return embeds, clip.blank_embedding().float().cpu()


@torch.no_grad()
def concept_latents(photos, decoder, resolution: int) -> torch.Tensor:
    """[N,4,r,r] float32 on the CPU: the MoVQ latents of the photos on white, computed in fp32 (with the MoVQ's
    weights as loaded: bf16-rounded when the decoder was loaded in bf16 for a mixed-precision LoRA)."""
    movq = decoder.movq
    dtype = movq.dtype
    # torch's own Module.to: diffusers' ModelMixin.to warns about "_keep_in_fp32_modules" on every dtype change.
    torch.nn.Module.to(movq, torch.float32)
    try:
        pixels = torch.stack([photo_pixels(im, resolution, m) for im, m in photos])
        latents = torch.cat([movq.encode(pixels[i:i + 1].to(movq.device)).latents.float().cpu()
                             for i in range(len(photos))])
    finally:
        torch.nn.Module.to(movq, dtype)
    return latents.contiguous()


def check_embedding_dim(embeds, decoder):
    if embeds.shape[-1] != decoder.embedding_dim:
        raise ConfigError(f"The CLIP gives {embeds.shape[-1]}-d image embeddings but the decoder expects "
                          f"{decoder.embedding_dim}-d: use the bigG vision tower the decoder was trained with.")


def encode_concept(paths, decoder, clip, resolution: int, masks: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [N,4,r,r], z_x [N,E], blank [E]) float32 on the CPU, computed once. `masks`: photo path → mask
    file (white = subject): the subject is put on white for the latents and cropped to for CLIP, as at inference."""
    photos = open_photos(paths, masks)
    embeds, blank = concept_embeddings(photos, clip)
    check_embedding_dim(embeds, decoder)
    return concept_latents(photos, decoder, resolution), embeds, blank


# -- model ---------------------------------------------------------------------------------------------------

def lora_targets(unet) -> list[str]:
    """The LoRA target suffixes present in `unet` (to_q/to_k/to_v/to_out.0, add_k_proj/add_v_proj of AttnAddedKV)."""
    from ..core.lora import LORA_TARGETS

    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    return [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]


def add_lora(unet, rank: int, alpha: float, seed: int) -> list[str]:
    """Freeze `unet` and add a peft LoRA (as diffusers' train_dreambooth_lora: unet.add_adapter(LoraConfig))."""
    from peft import LoraConfig

    targets = lora_targets(unet)
    if not targets:
        from ..core.lora import LORA_TARGETS

        raise ConfigError(f"The decoder UNet has none of the attention projections a LoRA targets ({', '.join(LORA_TARGETS)}).")
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return targets


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA of a peft-adapted UNet in diffusers' PEFT layout for a UNet: unet.<module>.lora_A/lora_B.weight."""
    from peft.utils import get_peft_model_state_dict

    return {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def diffusion_loss(unet, latents, embeds, timesteps, noise, noise_scheduler) -> torch.Tensor:
    """Eq. 2: MSE between ε and the ε half (first latent channels) of the UNet output on the noised latents."""
    x_t = noise_scheduler.add_noise(latents, noise, timesteps)
    out = unet(sample=x_t, timestep=timesteps, encoder_hidden_states=None,
               added_cond_kwargs={"image_embeds": embeds}, return_dict=False)[0]
    eps = out[:, : latents.shape[1]]
    return torch.nn.functional.mse_loss(eps.float(), noise.float())


def _load_clip(cfg: FinetuneConfig, device):
    """The bigG vision tower, in the precision `generate` uses on this device (bf16/fp16 on CUDA, else fp32)."""
    from ..core.cli import _dtype
    from ..core.clip import load_clip_towers

    return load_clip_towers(vision=cfg.clip_vision or cfg.clip, device=device, dtype=_dtype("auto", str(device)))


def _load_decoder(cfg: FinetuneConfig, device, dtype):
    from ..core.decoder_files import load_decoder, load_decoder_files

    if cfg.decoder:
        return load_decoder(cfg.decoder, device=device, dtype=dtype)
    return load_decoder_files(cfg.decoder_unet, cfg.decoder_movq, device=device, dtype=dtype)


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def half_dtype(accelerator) -> torch.dtype | None:
    """The autocast dtype when mixed precision is in effect (None: fp32 training)."""
    if not accelerator.native_amp:
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision))


def prepare_unet(unet, cfg: FinetuneConfig, frozen_dtype: torch.dtype | None = None):
    """Set `unet` up for training: (LoRA targets, trainable parameters, their names).

    Trainable weights are fp32 (autocast gives the mixed precision). With a LoRA and mixed precision the frozen
    base weights are stored in `frozen_dtype`, as diffusers' LoRA trainers do: autocast would cast them to that
    dtype at every matmul/conv anyway, and it halves the UNet's memory.
    """
    if unet.dtype != torch.float32 and (cfg.full or frozen_dtype is None):
        unet.to(dtype=torch.float32)
    if cfg.full:
        unet.requires_grad_(True)
        targets = []
    else:
        targets = add_lora(unet, cfg.rank, cfg.alpha, cfg.seed)
        if frozen_dtype is not None:
            for p in unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(frozen_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    params = [p for p in unet.parameters() if p.requires_grad]
    return targets, params, names


def training_step(unet, accelerator, optimizer, params, noise_scheduler, latents, cond, timesteps, noise,
                  max_grad_norm: float) -> float:
    """One optimizer step of Eq. 2 on this process's batch (CPU tensors; moved to the accelerator's device).

    Returns the loss averaged over the processes. Every process sees that same value, so a non-finite loss skips
    the step on all of them alike (no process waits in a gradient all-reduce the others never join)."""
    device = accelerator.device
    with accelerator.autocast():
        loss = diffusion_loss(unet, latents.to(device), cond.to(device), timesteps.to(device), noise.to(device),
                              noise_scheduler)
    mean = loss.detach().float()
    if accelerator.num_processes > 1:
        mean = accelerator.reduce(mean.clone(), reduction="mean")
    if not torch.isfinite(mean):
        return float(mean)
    accelerator.backward(loss)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(mean)


@torch.no_grad()
def sample_concepts(decoder, embeds, blank, resolution: int, steps: int, seed: int, path, autocast=None) -> Path:
    """Decode each concept photo's own embedding z_x (up to 8) with the decoder's current weights, one seed for
    all and the same at every call (dpmpp_2m, guidance 4, the blank embedding as negative): a strip PNG that
    shows what the fine-tune does to the concept. The RNG states of the training run are left untouched."""
    import contextlib

    from ..core.decoder import decode
    from ..core.outputs import save_image_atomic

    unet = decoder.unet
    was_training = unet.training
    device = decoder.device
    unet.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                (autocast() if autocast is not None else contextlib.nullcontext()):
            images = decode(decoder, embeds[:8], blank[None], width=resolution, height=resolution, steps=steps,
                            guidance=4.0, seeds=[seed] * min(8, len(embeds)), sampler="dpmpp_2m")
    finally:
        unet.train(was_training)
    strip = torch.cat(list(images), dim=1)  # [H, N·W, 3]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_image_atomic(strip, path)


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; without it, no bar
        enabled = False
    if not enabled:
        class _Off:
            def update(self, n=1):
                pass

            def set_postfix(self, **kw):
                pass

            def close(self):
                pass
        return _Off()
    return tqdm(total=total, initial=initial, desc="finetune-decoder", unit="step", dynamic_ncols=True)


# -- run -----------------------------------------------------------------------------------------------------

def _fingerprint(cfg: FinetuneConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in _FIXED}


def _read_metrics(path: Path, keep_through: int) -> list[list[str]]:
    """The rows of an earlier metrics.csv up to the checkpoint's step (later ones are trained again after a
    resume). An empty or headerless file (a kill before its first flush) is read as rows; a garbled one is
    refused before anything is written (DataError), so nothing is lost."""
    from .fsio import read_small_text

    if not path.exists() and not path.is_symlink():
        return []
    advice = (f"Move {path} away (or delete it) and run the same command again: the checkpoint is intact, and the "
              "rows from the checkpoint on are written to a new metrics.csv.")
    lines = list(csv.reader(io.StringIO(read_small_text(path, "The metrics file", DataError, max_bytes=1 << 30,
                                                        advice=advice))))
    first = 1
    if lines and lines[0] == METRICS_HEADER:
        lines, first = lines[1:], 2
    body = []
    for number, row in enumerate(lines, first):
        if not row:
            continue
        try:
            if len(row) != len(METRICS_HEADER):
                raise ValueError(f"{len(row)} columns, expected {len(METRICS_HEADER)}: {', '.join(METRICS_HEADER)}")
            step = int(row[0])
        except ValueError as exc:
            raise DataError(f"{path} line {number} is not a metrics row ({str(exc)[:200]}). {advice}") from None
        if step <= keep_through:
            body.append(row)
    return body


def _rewrite_metrics(path: Path, rows: list[list[str]]):
    """metrics.csv as the header and `rows`, in one atomic step: the header is always the first line."""
    buf = io.StringIO()
    csv.writer(buf).writerows([METRICS_HEADER] + rows)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))


def _checkpoint_step(ckpt_path: Path, legacy_path: Path) -> str:
    """The step of the checkpoint in --out, for a message (from the header only; '?' when unreadable)."""
    try:
        if ckpt_path.exists():
            return str(int(read_state_metadata(ckpt_path).get("step", "?")))
        return str(int(load_legacy(legacy_path, "fine-tuning checkpoint")["step"]))
    except (CheckpointError, KeyError, TypeError, ValueError):
        return "?, unreadable"


def load_finetune_state(ckpt_path: Path, legacy_path: Path) -> dict:
    """The checkpoint of the run in --out (this version's .safetensors, or an earlier version's state.pt read
    without unpickling code), checked for the entries a resume needs."""
    path = ckpt_path if ckpt_path.exists() or ckpt_path.is_symlink() else legacy_path
    advice = f"Delete {path.parent} to start this run over, or choose another --out."
    if path == ckpt_path:
        state = load_state(path, "fine-tuning checkpoint", advice)
    else:
        state = load_legacy(path, "fine-tuning checkpoint", advice)
    need = {"step": int, "config": dict, "trainable": dict, "optimizer": dict, "generator": torch.Tensor,
            "torch_rng": torch.Tensor}
    wrong = [k for k, t in need.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if wrong:
        raise ResumeError(f"The fine-tuning checkpoint {path} is damaged (missing or wrong: {', '.join(wrong)}). {advice}")
    return state


def check_inputs(cfg: FinetuneConfig):
    """Everything that can be known from the arguments and file headers, before any model is loaded: the output
    folder can be written, the decoder's files are there and are what their flags say (a MoVQ given as the UNet,
    the two swapped), the CLIP file or folder is there."""
    from ..core.decoder_files import MOVQ_FILE, MOVQ_FOLDERS, UNET_FILE, UNET_FOLDERS, _check_file, _slot_message
    from ..core.errors import MissingModelsError, ModelFileError

    check_output_folder(cfg.out)
    if cfg.decoder:
        folder = Path(cfg.decoder).expanduser()
        if not folder.is_dir():
            raise (ModelFileError if folder.exists() else MissingModelsError)(
                f"--decoder {folder}: {'not a folder' if folder.exists() else 'no such folder'}. It takes the Kandinsky "
                "2.2 decoder's diffusers folder (model_index.json, unet/, movq/, scheduler/); for the two single files "
                "use --decoder-unet FILE --decoder-movq FILE.")
    else:
        unet, movq = Path(cfg.decoder_unet).expanduser(), Path(cfg.decoder_movq).expanduser()
        _check_file(unet, "UNet", UNET_FOLDERS, UNET_FILE)
        _check_file(movq, "MoVQ", MOVQ_FOLDERS, MOVQ_FILE)
        _slot_message(unet, "unet", movq)  # headers only: what each file is
        _slot_message(movq, "movq", unet)
    clip_flag, clip = ("--clip-vision", cfg.clip_vision) if cfg.clip_vision else ("--clip", cfg.clip)
    clip_path = Path(clip).expanduser()
    if not clip_path.exists():
        raise MissingModelsError(f"{clip_flag} {clip_path} does not exist. Give the bigG vision tower "
                                 "(ComfyUI: models/clip_vision/clip_vision_g.safetensors).")
    if not (clip_path.is_file() or clip_path.is_dir()):
        raise ModelFileError(f"{clip_flag} {clip_path} is not a regular file or folder (a pipe or device).")


def _export(cfg, unet, out: Path, step: int, source: str, image_names, scheduler_config, targets) -> Path:
    from ..core.lora import lora_metadata

    if cfg.full:
        from ..core.decoder_files import METADATA_CONFIG, METADATA_SCHEDULER, _public_config

        tensors = {k: v for k, v in unet.state_dict().items()}
        metadata = {"format": "pt", METADATA_CONFIG: json.dumps(_public_config(unet), sort_keys=True),
                    METADATA_SCHEDULER: json.dumps(dict(scheduler_config), sort_keys=True),
                    "base_decoder": source, "steps": str(step), "images": json.dumps(image_names)}
        return save_file_atomic(tensors, out / FULL_FILE, metadata)
    metadata = lora_metadata(base_decoder=source, rank=str(cfg.rank), alpha=str(float(cfg.alpha)), steps=str(step),
                             images=image_names, target_modules=targets, lr=str(cfg.lr))
    return save_file_atomic(lora_state_dict(unet), out / LORA_FILE, metadata)


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train; returns {"output", "steps", "final_loss", "resumed_from"}. User errors raise LambdaEclipseError types.

    Every check that the arguments and file headers allow runs before any model is loaded; a second run on the
    same --out is refused at once (core.fsio.FolderLock), naming the first one's PID."""
    from .extras import require_extras

    require_extras("finetune-decoder", ("accelerate", "peft"))
    cfg.check()
    out = Path(cfg.out).expanduser()
    check_output_folder(out)
    with RunLock(out, "trainer finetune-decoder") as lock:
        lock.take_if_exists()
        return _finetune(cfg, out, lock)


def _finetune(cfg: FinetuneConfig, out: Path, lock: RunLock) -> dict:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    ckpt_path, legacy_path = out / CHECKPOINT, out / LEGACY_CHECKPOINT
    state = None
    if ckpt_path.exists() or legacy_path.exists():
        if not cfg.resume:
            raise ResumeError(f"{out} already holds a fine-tuning run (checkpoint at step "
                              f"{_checkpoint_step(ckpt_path, legacy_path)}); pass --resume to continue it, "
                              "or choose another --out.")
        state = load_finetune_state(ckpt_path, legacy_path)
    check_inputs(cfg)
    paths = collect_images(cfg.images)
    cfg.images = [str(p.resolve()) for p in paths]
    masks = find_masks(paths, cfg.masks)  # before any model loads
    if cfg.masks:
        cfg.masks = str(Path(cfg.masks).expanduser().resolve())
    old_rows = _read_metrics(out / "metrics.csv", int(state["step"]) if state is not None else 0)
    if state is not None:
        old, new = state["config"], _fingerprint(cfg)
        # A setting an older checkpoint does not record (masks, mixed_precision, …) is not held against it.
        diff = [f"{k}: {old[k]!r} → {new[k]!r}" for k in _FIXED if k in old and old[k] != new[k]]
        if diff:
            raise ResumeError("--resume with other settings than the checkpoint's: " + "; ".join(diff)
                              + ". Use the same settings (only --steps and --save-every may change) or another --out.")
        if state["step"] >= cfg.steps:
            log.info("The checkpoint is already at step %d ≥ --steps %d.", state["step"], cfg.steps)

    try:
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        # Several processes wait for the main one while it writes checkpoints or samples: a long timeout.
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                                  kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))])
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--mixed-precision {cfg.mixed_precision}: {exc}") from exc
    device = accelerator.device
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if state is not None and int(state.get("processes", 1)) != world:
        raise ResumeError(f"{ckpt_path} was trained with {state.get('processes', 1)} process(es) and this run has "
                          f"{world}: each step's examples depend on it. Resume with the same number of processes.")
    if cfg.mixed_precision != "no" and not accelerator.native_amp:
        log.warning("--mixed-precision %s has no effect on %s (accelerate trains in fp32 there); "
                    "use --mixed-precision bf16 or no.", cfg.mixed_precision, device)
    # One big model on the device at a time: the CLIP gives the embeddings and goes, then the decoder comes, its
    # frozen UNet already in the autocast dtype for a mixed-precision LoRA (no fp32 copy of it on the device).
    photos = open_photos(paths, masks)
    clip = _load_clip(cfg, device)
    embeds, blank = concept_embeddings(photos, clip)
    del clip
    _free(device)
    frozen = None if cfg.full else half_dtype(accelerator)
    decoder = _load_decoder(cfg, device, frozen or torch.float32)
    check_embedding_dim(embeds, decoder)
    latents = concept_latents(photos, decoder, cfg.resolution)
    del photos
    image_names = [p.name for p in paths]
    log.info("%d concept photo(s) encoded: latents %s, embeddings %s", len(paths), list(latents.shape[1:]), embeds.shape[-1])

    unet = decoder.unet
    targets, params, names = prepare_unet(unet, cfg, frozen)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    noise_scheduler = DDPMScheduler.from_config(dict(decoder.scheduler_config))
    num_t = int(noise_scheduler.config.num_train_timesteps)

    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if state is not None:
        by_name = dict(unet.named_parameters())
        try:
            with torch.no_grad():
                for n, v in state["trainable"].items():
                    by_name[n].copy_(v)
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except Exception as exc:  # a checkpoint of the right format holding the wrong tensors
            raise ResumeError(f"The fine-tuning checkpoint in {out / 'checkpoint'} does not fit this decoder "
                              f"({type(exc).__name__}: {str(exc)[:200]}). Delete it to start over, or choose another "
                              "--out.") from exc
        start = int(state["step"])
        log.info("Resumed from %s at step %d", ckpt_path, start)
    if cfg.deterministic:
        from .train import set_deterministic

        set_deterministic(cfg.seed)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if state is not None and state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])  # fp16: the loss scale goes on where it was
    plain = accelerator.unwrap_model(unet)

    # Files are written by the main process only; the others wait for it where it matters.
    metrics = out / "metrics.csv"
    handle = writer = None
    if main:
        lock.take()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"Cannot create the run folder {out} ({exc.strerror or exc}).") from exc
        write_json_atomic({**asdict(cfg), "targets": targets, "base_decoder": decoder.source, "processes": world},
                          out / "finetune_config.json")
        _rewrite_metrics(metrics, old_rows)  # header first, atomically: a kill now leaves a file with its header
        try:
            handle = metrics.open("a", newline="", encoding="utf-8")
        except OSError as exc:
            raise OutputPathError(f"Cannot open {metrics} ({exc.strerror or exc}).") from exc
        writer = csv.writer(handle)

    def save(step: int):
        if main:
            save_state({
                "step": step, "config": _fingerprint(cfg), "processes": world,
                "trainable": {n: p.detach().cpu().clone() for n, p in plain.named_parameters() if n in set(names)},
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "torch_rng": torch.get_rng_state(),
            }, ckpt_path, metadata={"step": str(step)})
            if legacy_path.exists():  # resumed from an earlier version's pickle: this file replaces it
                legacy_path.unlink()
            _export(cfg, plain, out, step, decoder.source, image_names, decoder.scheduler_config, targets)
            plot_loss(metrics, out / "loss.png")
        accelerator.wait_for_everyone()

    samples = out / "samples"

    def sample(step: int):
        if main:
            sample_concepts(decoder, embeds, blank, cfg.resolution, cfg.sample_steps, cfg.seed,
                            samples / f"step_{step:06d}.png", accelerator.autocast)
        accelerator.wait_for_everyone()

    first = None
    if cfg.sample_every and start == 0:
        first = 0  # the base decoder's rendering: what the steps after it are compared with
    elif cfg.sample_every and (start % cfg.sample_every == 0 or start >= cfg.steps) \
            and not (samples / f"step_{start:06d}.png").exists():
        first = start  # a kill came between the checkpoint and its sample: make it now
    accelerator.wait_for_everyone()  # every process has decided before the main one writes a sample
    if first is not None:
        sample(first)
    bar = _progress(cfg.steps, start, cfg.progress and main)
    loss_value = float("nan")
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            # Every process draws the whole step's examples from the same generator and trains on its own slice:
            # n processes × --batch-size b make the same step as one process with n·b (gradients are averaged),
            # and the generator state in the checkpoint is every process's.
            b, total = cfg.batch_size, cfg.batch_size * world
            idx = torch.randint(len(paths), (total,), generator=generator)
            timesteps = torch.randint(0, num_t, (total,), generator=generator)
            noise = torch.randn((total,) + tuple(latents.shape[1:]), generator=generator)
            drop = torch.rand(total, generator=generator) < cfg.uncond_prob
            cond = torch.where(drop[:, None], blank[None].expand(total, -1), embeds[idx])
            mine = slice(rank * b, (rank + 1) * b)
            loss_value = training_step(unet, accelerator, optimizer, params, noise_scheduler, latents[idx][mine],
                                       cond[mine], timesteps[mine], noise[mine], cfg.max_grad_norm)
            if not math.isfinite(loss_value):
                raise TrainingDivergedError(f"the loss became {loss_value} at step {step + 1}: lower --lr or use "
                                            "--mixed-precision no/bf16.")
            if writer is not None:
                try:
                    writer.writerow([step + 1, f"{loss_value:.6g}", f"{cfg.lr:g}", int(drop.sum()),
                                     f"{time.perf_counter() - t0:.2f}"])
                    handle.flush()
                except OSError as exc:
                    raise OutputPathError(f"Could not add a row to {metrics} ({exc.strerror or exc}). Check the free "
                                          "space and the permissions of --out; the checkpoint is intact.") from exc
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save(step + 1)
            if cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps):
                sample(step + 1)
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    if state is not None and start >= cfg.steps and main:
        # A kill between the final checkpoint and its export leaves no (or an older) LoRA file: write it again.
        _export(cfg, plain, out, start, decoder.source, image_names, decoder.scheduler_config, targets)
        plot_loss(metrics, out / "loss.png")
    return {"output": str(out / (FULL_FILE if cfg.full else LORA_FILE)), "steps": max(start, cfg.steps),
            "final_loss": loss_value, "resumed_from": start if state is not None else None}
