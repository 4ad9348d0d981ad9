"""Tiny random-weight metric models in the real on-disk layouts, for tests and dry runs (their scores mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .metrics import IMAGENET_MEAN, IMAGENET_STD

TINY_EVAL_CLIP_NAME = "tiny-eval-clip"


def write_tiny_dino(folder, seed: int = 0, weights: str = "safetensors") -> Path:
    """A transformers ViTModel folder (save_pretrained) + preprocessor_config.json, as facebook/dino-vits16 ships.
    weights="bin": the weights as pytorch_model.bin (a torch.save state dict), the file that repository's main has."""
    from transformers import ViTConfig, ViTModel

    folder = Path(folder)
    config = ViTConfig(image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, qkv_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(str(folder))
    if weights == "bin":
        (folder / "model.safetensors").unlink()
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    elif weights != "safetensors":
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "image_processor_type": "ViTImageProcessor",
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "resample": 2, "size": 224,
    }, indent=2))
    return folder


def write_tiny_timm_dino(folder, seed: int = 0) -> Path:
    """A timm hub-layout folder (config.json with architecture + model_args, model.safetensors). Needs timm."""
    import timm
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = dict(patch_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("vit_small_patch16_224", pretrained=False, **args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch16_224", "num_classes": 0, "model_args": args,
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                           "num_classes": 0, "crop_pct": 0.875, "interpolation": "bicubic"},
    }, indent=2))
    return folder


def register_tiny_eval_clip() -> str:
    """Register the tiny OpenCLIP config under TINY_EVAL_CLIP_NAME (open_clip.add_model_config) and return the name."""
    import open_clip

    from ..core.tiny import TINY_CLIP_CONFIG

    if open_clip.get_model_config(TINY_EVAL_CLIP_NAME) is None:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="tiny_eval_clip_cfg_"))
        (folder / f"{TINY_EVAL_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG["model_cfg"]))
        open_clip.add_model_config(folder)
    return TINY_EVAL_CLIP_NAME


def write_tiny_eval_clip(path, seed: int = 0, folder: bool = False) -> Path:
    """The tiny CLIP as a single weights file of the registered config (folder=False) or an OpenCLIP hub folder."""
    from ..core.tiny import make_tiny_clip, write_tiny_clip

    if folder:
        return write_tiny_clip(path, seed)
    from safetensors.torch import save_file

    register_tiny_eval_clip()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in make_tiny_clip(seed).state_dict().items()}, str(path))
    return path
