"""Tiny random-weight models of the real architectures, written in the real on-disk layouts.

Used by `check` (to prove the plumbing without real weights) and by the tests. Their pictures are
noise by construction: only shapes, files and code paths are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .loading import write_json_atomic
from .prior import LambdaEclipsePrior, PriorConfig, save_prior

TINY_EMBED = 32

TINY_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": TINY_EMBED,
        # Real 224 px input and real preprocessing; a coarse patch keeps it fast.
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TINY_EMBED, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}

TINY_PRIOR_CONFIG = PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=TINY_EMBED)

TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=8,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
    cross_attention_dim=32, encoder_hid_dim=TINY_EMBED, encoder_hid_dim_type="image_proj",
    addition_embed_type="image", resnet_time_scale_shift="scale_shift",
)

TINY_MOVQ_CONFIG = dict(
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
    latent_channels=4, vq_embed_dim=4, num_vq_embeddings=64, layers_per_block=1, norm_num_groups=8,
    norm_type="spatial",
)

# The published kandinsky-2-2-decoder scheduler settings.
DECODER_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="epsilon", steps_offset=1, variance_type="fixed_small", clip_sample=False,
    timestep_spacing="leading", thresholding=False,
)


def make_tiny_clip(seed: int = 0):
    """The tiny open_clip model (random weights; the same for the same seed) behind every tiny CLIP file."""
    import open_clip

    with torch.random.fork_rng(devices=[]):  # never disturb the caller's global RNG
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG["model_cfg"])
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:
                    param.normal_(0.0, 0.05)
    return model.eval()


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """An open_clip folder (open_clip_config.json + open_clip_model.safetensors) loadable by `load_clip`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = make_tiny_clip(seed)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def tiny_clip_tower_tensors(tower: str, seed: int = 0, dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(transformers-key tensors, metadata with the tower's config) of the tiny CLIP's text or vision tower: the
    layout of ComfyUI's clip_g / clip_vision_g files, made from the tiny open_clip model by the inverse key map."""
    from .clip_formats import CONFIG_METADATA_KEY, openclip_to_transformers, transformers_config

    state = make_tiny_clip(seed).state_dict()
    tensors = {k: v.to(dtype) for k, v in openclip_to_transformers(state, towers=(tower,)).items()}
    cfg = TINY_CLIP_CONFIG["model_cfg"]
    heads = cfg["text_cfg"]["heads"] if tower == "text" else cfg["vision_cfg"]["width"] // cfg["vision_cfg"]["head_width"]
    config = transformers_config(tower, tensors, heads=heads)
    return tensors, {CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)}


def write_tiny_clip_towers(folder: str | Path, seed: int = 0, dtype=torch.float32,
                           text_name: str = "tiny_clip_text.safetensors",
                           vision_name: str | None = "tiny_clip_vision.safetensors") -> dict[str, Path]:
    """The tiny CLIP as two single files with transformers keys and the config in the metadata, equal to
    `write_tiny_clip`'s model for the same seed. `folder` may be one folder, or a (text, vision) pair of folders."""
    from .loading import save_file_atomic

    text_folder, vision_folder = (folder, folder) if not isinstance(folder, (tuple, list)) else folder
    out = {}
    for tower, base, name in (("text", text_folder, text_name), ("vision", vision_folder, vision_name)):
        if not name:
            continue
        tensors, metadata = tiny_clip_tower_tensors(tower, seed, dtype)
        out[tower] = Path(base) / name
        save_file_atomic(tensors, out[tower], metadata=metadata)
    return out


def make_tiny_prior(seed: int = 0, config: PriorConfig | None = None) -> LambdaEclipsePrior:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LambdaEclipsePrior(config or PriorConfig(**TINY_PRIOR_CONFIG.__dict__))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in ("clip_mean", "clip_std"):
                    continue
                # Spread every tensor (LayerNorm weights around 1) so that each input matters.
                param.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1 if param.ndim < 2 else 0.05)
    return model.eval()


def write_tiny_prior(path: str | Path, seed: int = 0, single_file: bool = False) -> Path:
    return save_prior(make_tiny_prior(seed), path, single_file=single_file)


def make_tiny_decoder_components(seed: int = 0):
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        movq = VQModel(**TINY_MOVQ_CONFIG)
    scheduler = DDPMScheduler(**DECODER_SCHEDULER_CONFIG)
    return unet.eval(), movq.eval(), scheduler


def write_tiny_decoder(folder: str | Path, seed: int = 0) -> Path:
    """A kandinsky-2-2-decoder-layout folder (model_index.json, unet/, movq/, scheduler/).

    Written component by component: constructing diffusers' KandinskyV22Pipeline needs `transformers`,
    which the decoder itself does not.
    """
    import diffusers

    folder = Path(folder)
    unet, movq, scheduler = make_tiny_decoder_components(seed)
    unet.save_pretrained(str(folder / "unet"))
    movq.save_pretrained(str(folder / "movq"))
    scheduler.save_pretrained(str(folder / "scheduler"))
    write_json_atomic({
        "_class_name": "KandinskyV22Pipeline",
        "_diffusers_version": diffusers.__version__,
        "movq": ["diffusers", "VQModel"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }, folder / "model_index.json")
    return folder


def write_tiny_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Every model in a ComfyUI-like models/ tree, in both layouts.

    The five single files at the manifest's names (what the bundled workflows and `--models` look for first:
    keys prior_file, clip_text, clip_vision, decoder_unet, decoder_movq), and the first release's folders
    (keys prior, clip, decoder). Both hold the same weights.
    """
    from .paths import LEGACY_LAYOUT

    root = Path(root)
    paths = {
        "prior": write_tiny_prior(root / LEGACY_LAYOUT["prior"], seed),
        "clip": write_tiny_clip(root / LEGACY_LAYOUT["clip"], seed),
        **_tiny_clip_tower_files(root, seed),
        "decoder": write_tiny_decoder(root / LEGACY_LAYOUT["decoder"], seed),
        **write_tiny_single_files(root, seed, clip=False),
    }
    write_json_atomic({"note": "tiny random-weight models: their pictures are noise"}, root / "TINY_MODELS.json")
    return paths


def write_tiny_single_files(root: str | Path, seed: int = 0, clip: bool = True) -> dict[str, Path]:
    """The single files at the manifest's names, each with its config in the safetensors metadata."""
    from .decoder import KandinskyDecoder
    from .decoder_files import save_decoder_files
    from .paths import manifest

    root = Path(root)
    entries = manifest()
    out = {"prior_file": write_tiny_prior(root / entries["prior"].folder / entries["prior"].name, seed, single_file=True)}
    if clip:
        out.update(_tiny_clip_tower_files(root, seed))
    unet, movq, scheduler = make_tiny_decoder_components(seed)
    decoder = KandinskyDecoder(unet, movq, dict(scheduler.config), "tiny")
    out["decoder_unet"], out["decoder_movq"] = save_decoder_files(
        decoder, root / entries["decoder_unet"].folder / entries["decoder_unet"].name,
        root / entries["decoder_movq"].folder / entries["decoder_movq"].name)
    return out


def _tiny_clip_tower_files(root: Path, seed: int) -> dict[str, Path]:
    """The tiny towers ("clip_text", "clip_vision") at the manifest's names (models/text_encoders, models/clip_vision)."""
    from .paths import manifest

    entries = manifest()
    text, vision = entries["clip_text"], entries["clip_vision"]
    files = write_tiny_clip_towers((root / text.folder, root / vision.folder), seed, text_name=text.name, vision_name=vision.name)
    return {"clip_text": files["text"], "clip_vision": files["vision"]}
