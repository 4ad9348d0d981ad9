"""Embeds to CLIP Vision: λ-ECLIPSE prior outputs as the CLIP vision output SDXL graphs already consume.

The prior predicts OpenCLIP ViT-bigG/14 image embeddings (1280-d): the same space as the `image_embeds` that
ComfyUI's CLIPVisionEncode makes with clip_vision_g.safetensors. Core unCLIPConditioning on an SDXL checkpoint
(ReVision: `model_base.sdxl_pooled` swaps SDXL's pooled text embedding for `unclip_adm(image_embeds)`, with
ComfyUI's noise augmentation and strength) and IP-Adapter's IPAdapterEmbeds (EMBEDS: a plain [N, 1280] tensor,
what IPAdapterEncoder gives for the non-plus ip-adapter_sdxl model) read exactly that, and nothing else.

No model math here: rows are selected and moved to ComfyUI's intermediate device as float32.
"""

from __future__ import annotations

import torch

from ..core.errors import InputError
from . import comfy

BIGG_DIM = 1280
WHICH = ["positive", "negative (blank)"]
# The fields ComfyUI's CLIPVisionEncode fills that a prior embedding has no counterpart for (no image went in).
ABSENT = ("last_hidden_state", "penultimate_hidden_states", "all_hidden_states", "mm_projected", "image_sizes")


def clip_vision_module():
    """ComfyUI's `comfy.clip_vision`, or None outside ComfyUI."""
    return comfy._import("comfy.clip_vision")


class _PlainOutput:
    """Outside ComfyUI: the same access as comfy.clip_vision.Output (attributes, and out["key"] too)."""

    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, item):
        setattr(self, key, item)


class _OnlyImageEmbeds:
    """Asking for a field we do not have fails at once, naming what is missing and why (never a faked tensor)."""

    def __getattr__(self, name):  # only called when normal lookup fails
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"'{name}' is not available: λ-ECLIPSE Embeds to CLIP Vision only carries image_embeds (the prior predicts "
            "the pooled 1280-d bigG embedding, no image went through a vision tower). Nodes that read hidden states "
            "(Apply Style Model / Redux, IP-Adapter plus models, WAN / Hunyuan image-to-video) need CLIP Vision Encode "
            "of a real picture."
        )


_OUTPUT_CLASSES: dict = {}


def output_class():
    """comfy.clip_vision.Output (subclassed only to explain absent fields) when ComfyUI is here, else a plain stand-in."""
    module = clip_vision_module()
    base = getattr(module, "Output", None) if module is not None else None
    bases = (_OnlyImageEmbeds, base) if base is not None else (_OnlyImageEmbeds, _PlainOutput)
    cls = _OUTPUT_CLASSES.get(bases)
    if cls is None:
        cls = type("LambdaEclipseCLIPVisionOutput", bases, {"__module__": __name__})
        _OUTPUT_CLASSES[bases] = cls
    return cls


def make_clip_vision_output(image_embeds: torch.Tensor):
    out = output_class()()
    out["image_embeds"] = image_embeds
    return out


def select_rows(embeds, index: int = -1, which: str = "positive") -> torch.Tensor:
    """The chosen [N, 1280] rows of an Embeds (N = its batch for index -1, else 1), float32 on the intermediate device."""
    if which not in WHICH:
        raise InputError(f"which must be one of {WHICH}; got {which!r}.")
    table = embeds.embeds if which == "positive" else embeds.negative
    if not isinstance(table, torch.Tensor) or table.ndim != 2:
        shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise InputError(f"Expected embeddings of shape [batch, {BIGG_DIM}]; got {shape}. Connect Prior Sample's embeds.")
    if table.shape[-1] != BIGG_DIM:
        raise InputError(
            f"These embeddings are {table.shape[-1]}-d, not {BIGG_DIM}-d OpenCLIP ViT-bigG/14 (clip_vision_g). "
            "SD 2.1 unCLIP or Stable Cascade use 1024/768-d CLIP spaces: this bridge is for SDXL (bigG)."
        )
    count = table.shape[0]
    index = int(index)
    if index < -1 or index >= count:
        raise InputError(f"index {index} is outside the batch of {count} embeddings: use -1 (all) or 0…{count - 1}.")
    rows = table if index == -1 else table[index:index + 1]
    return rows.detach().to(device=comfy.intermediate_device(), dtype=torch.float32).clone()


class LambdaEclipseEmbedsToCLIPVision:
    DESCRIPTION = (
        "λ-ECLIPSE image embeddings (OpenCLIP bigG, 1280-d) as a CLIP_VISION_OUTPUT for core unCLIPConditioning on an "
        "SDXL checkpoint (ReVision) and as IP-Adapter EMBEDS for IPAdapterEmbeds (ip-adapter_sdxl, the bigG model). "
        "Only image_embeds is filled: nodes that read hidden states need CLIP Vision Encode of a real picture."
    )
    CATEGORY = "λ-ECLIPSE/sdxl"
    RETURN_TYPES = ("CLIP_VISION_OUTPUT", "EMBEDS")
    RETURN_NAMES = ("clip_vision_output", "embeds")
    OUTPUT_TOOLTIPS = (
        "Like CLIP Vision Encode with clip_vision_g, image_embeds only. Works with: unCLIPConditioning on SDXL (ReVision). "
        "Not with: SD 2.1 unCLIP, Stable Cascade, SVD / Zero123 (other CLIP spaces), Apply Style Model / Redux, "
        "IP-Adapter plus, WAN / Hunyuan (they read hidden states, which a prior embedding does not have).",
        "[N, 1280] tensor (IP-Adapter's EMBEDS) for IPAdapterEmbeds' pos_embed (which = positive) or neg_embed "
        "(which = negative (blank)), with ip-adapter_sdxl.safetensors (bigG, not the vit-h or plus models).",
    )
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embeds": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "Image embeddings from Prior Sample (or the interpolation nodes)."}),
            },
            "optional": {
                "index": ("INT", {"default": -1, "min": -1, "max": 4095, "tooltip": (
                    "-1: every embedding of the batch. 0, 1, …: only that one. unCLIPConditioning adds up all the rows it "
                    "gets (each × strength, as for a batch of pictures in CLIP Vision Encode): pick one, or lower the "
                    "strength, when Prior Sample made several.")}),
                "which": (WHICH, {"default": "positive", "tooltip": (
                    "positive: the prior's predictions. negative (blank): the blank-image embedding the Kandinsky decoder "
                    "guides against, e.g. as IPAdapterEmbeds' neg_embed.")}),
            },
        }

    def convert(self, embeds, index=-1, which="positive"):
        rows = select_rows(embeds, index, which)
        return (make_clip_vision_output(rows), rows)


NODES = {"LambdaEclipseEmbedsToCLIPVision": (LambdaEclipseEmbedsToCLIPVision, "λ-ECLIPSE Embeds to CLIP Vision")}
