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


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """An open_clip folder (open_clip_config.json + open_clip_model.safetensors) loadable by `load_clip`."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # never disturb the caller's global RNG
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG["model_cfg"])
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:
                    param.normal_(0.0, 0.05)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


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
    """All three in a ComfyUI-like models/ tree, at the default names the README documents."""
    from .paths import DEFAULT_LAYOUT

    root = Path(root)
    paths = {
        "prior": write_tiny_prior(root / DEFAULT_LAYOUT["prior"], seed),
        "clip": write_tiny_clip(root / DEFAULT_LAYOUT["clip"], seed),
        "decoder": write_tiny_decoder(root / DEFAULT_LAYOUT["decoder"], seed),
    }
    write_json_atomic({"note": "tiny random-weight models: their pictures are noise"}, root / "TINY_MODELS.json")
    return paths
