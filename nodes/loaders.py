"""Loader nodes for the three models: λ-ECLIPSE prior, OpenCLIP bigG, Kandinsky 2.2 decoder.

Loaded models are cached at module level by (path, mtime, size, dtype), so a second run or a second
loader node does not read the file again, and a replaced file is reloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.paths import SPECS
from . import comfy

log = logging.getLogger("lambda_eclipse")

CATEGORY = "λ-ECLIPSE/loaders"
DTYPES = ["auto", "fp32", "fp16", "bf16"]
PRIOR_FOLDERS = ("lambda_eclipse",)
CLIP_FOLDERS = ("lambda_eclipse", "text_encoders", "clip")
DECODER_FOLDERS = ("diffusers", "lambda_eclipse")


@dataclass
class Loaded:
    """What travels on a LAMBDA_ECLIPSE_PRIOR / _CLIP / _DECODER link: the core model and its ComfyUI patcher."""

    kind: str
    model: Any  # LambdaEclipsePrior, ClipEncoder or KandinskyDecoder
    patcher: Any  # comfy.model_patcher.ModelPatcher, or None outside ComfyUI
    name: str

    def ready(self):
        """Bring the model to its device through ComfyUI's memory manager (a no-op outside ComfyUI)."""
        comfy.load_models([self.patcher])
        return self.model


_CACHE: dict[tuple, Loaded] = {}


def clear_cache():
    _CACHE.clear()


def is_prior_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file() \
        and not (folder / "model_index.json").exists()


def is_clip_folder(folder: Path) -> bool:
    return (folder / "open_clip_config.json").is_file()


def is_decoder_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _other_model(*checks):
    return lambda folder: any(check(folder) for check in checks)


def _dtype(kind: str, choice: str):
    from ..core.loading import resolve_dtype

    if choice not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {choice!r}.")
    return comfy.auto_dtype(kind) if choice == "auto" else resolve_dtype(choice)


def _cached(kind: str, path: Path, dtype, name: str, load) -> Loaded:
    key = (kind,) + comfy.model_signature(path) + (str(dtype),)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    for old in [k for k in _CACHE if k[:2] == key[:2]]:  # same file, changed or other dtype: drop the old copy
        del _CACHE[old]
    model, patcher = load()
    loaded = Loaded(kind, model, patcher, name)
    _CACHE[key] = loaded
    return loaded


def _changed(folders, name) -> str:
    """IS_CHANGED: ComfyUI reruns the loader (and so reloads) when the file behind the name changes."""
    try:
        return repr(comfy.model_signature(comfy.resolve_model(folders, name, "model", "")))
    except Exception:  # a missing file: let the loader itself raise its message
        return ""


def _dtype_input(what: str):
    return (DTYPES, {"default": "auto", "tooltip": f"Weight precision of the {what}. auto = ComfyUI's choice for this machine "
                     "(fp32 for the small prior; fp16/bf16 on GPUs that support them)."})


class LambdaEclipseLoadPrior:
    DESCRIPTION = (
        "Loads the λ-ECLIPSE prior (34M parameters) from models/lambda_eclipse: a diffusers-style folder "
        "(config.json + diffusion_pytorch_model.safetensors, listed by folder name) or a single .safetensors file."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAMBDA_ECLIPSE_PRIOR",)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The λ-ECLIPSE prior: turns an interleaved prompt into a CLIP image embedding.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = comfy.list_models(PRIOR_FOLDERS, is_prior_folder, files=True,
                                  skip_folder=_other_model(is_clip_folder, is_decoder_folder))
        return {"required": {
            "prior_name": (names, {"tooltip": "The prior in models/lambda_eclipse. Default download: "
                                   f"{SPECS['prior'].url} into models/lambda_eclipse/Lambda-ECLIPSE-Prior-v1.0/."}),
            "dtype": _dtype_input("prior"),
        }}

    @classmethod
    def IS_CHANGED(cls, prior_name, dtype="auto"):
        return _changed(PRIOR_FOLDERS, prior_name)

    def load(self, prior_name, dtype="auto"):
        from ..core.prior import load_prior

        path = comfy.resolve_model(PRIOR_FOLDERS, prior_name, "λ-ECLIPSE prior", SPECS["prior"].url)
        torch_dtype = _dtype("prior", dtype)

        def load():
            model = load_prior(path, device=comfy.offload_device(), dtype=torch_dtype)
            return model, comfy.make_patcher("prior", prior=model)

        return (_cached("prior", path, torch_dtype, prior_name, load),)


class LambdaEclipseLoadCLIP:
    DESCRIPTION = (
        "Loads OpenCLIP ViT-bigG/14 (laion2b_s39b_b160k) with both towers: text for the prompt, vision for "
        "subjects, edge maps and the blank embedding. Lists open_clip folders (with open_clip_config.json) and "
        "checkpoint files in models/lambda_eclipse, models/text_encoders and models/clip. ComfyUI's "
        "clip_vision_g / SDXL text encoders are not this model."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAMBDA_ECLIPSE_CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("OpenCLIP ViT-bigG/14 for Encode Subject, Interleave Prompt, Canny Condition and Prior Sample.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = comfy.list_models(CLIP_FOLDERS, is_clip_folder, files=True,
                                  skip_folder=_other_model(is_prior_folder, is_decoder_folder))
        return {"required": {
            "clip_name": (names, {"tooltip": "The OpenCLIP bigG folder or checkpoint. Default download: "
                                  f"{SPECS['clip'].url} (open_clip_config.json + open_clip_model.safetensors) into "
                                  "models/lambda_eclipse/CLIP-ViT-bigG-14-laion2B-39B-b160k/."}),
            "dtype": _dtype_input("CLIP"),
        }}

    @classmethod
    def IS_CHANGED(cls, clip_name, dtype="auto"):
        return _changed(CLIP_FOLDERS, clip_name)

    def load(self, clip_name, dtype="auto"):
        from ..core.clip import load_clip

        path = comfy.resolve_model(CLIP_FOLDERS, clip_name, "OpenCLIP ViT-bigG/14", SPECS["clip"].url)
        torch_dtype = _dtype("clip", dtype)

        def load():
            encoder = load_clip(path, device=comfy.offload_device("text"), dtype=torch_dtype)
            return encoder, comfy.make_patcher("clip", clip=encoder.model)

        return (_cached("clip", path, torch_dtype, clip_name, load),)


class LambdaEclipseLoadDecoder:
    DESCRIPTION = (
        "Loads the Kandinsky 2.2 decoder (UNet + MoVQ + scheduler) from a diffusers folder (with model_index.json) "
        "in models/diffusers or models/lambda_eclipse."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAMBDA_ECLIPSE_DECODER",)
    RETURN_NAMES = ("decoder",)
    OUTPUT_TOOLTIPS = ("The Kandinsky 2.2 decoder: turns image embeddings into pictures.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = comfy.list_models(DECODER_FOLDERS, is_decoder_folder, files=False,
                                  skip_folder=_other_model(is_prior_folder, is_clip_folder))
        return {"required": {
            "decoder_name": (names, {"tooltip": "The decoder folder. Default download: "
                                     f"{SPECS['decoder'].url} into models/diffusers/kandinsky-2-2-decoder/."}),
            "dtype": _dtype_input("decoder"),
        }}

    @classmethod
    def IS_CHANGED(cls, decoder_name, dtype="auto"):
        return _changed(DECODER_FOLDERS, decoder_name)

    def load(self, decoder_name, dtype="auto"):
        from ..core.decoder import load_decoder

        path = comfy.resolve_model(DECODER_FOLDERS, decoder_name, "Kandinsky 2.2 decoder", SPECS["decoder"].url)
        torch_dtype = _dtype("decoder", dtype)

        def load():
            decoder = load_decoder(path, device=comfy.offload_device(), dtype=torch_dtype)
            return decoder, comfy.make_patcher("decoder", unet=decoder.unet, movq=decoder.movq)

        return (_cached("decoder", path, torch_dtype, decoder_name, load),)


NODES = {
    "LambdaEclipseLoadPrior": (LambdaEclipseLoadPrior, "λ-ECLIPSE Load Prior"),
    "LambdaEclipseLoadCLIP": (LambdaEclipseLoadCLIP, "λ-ECLIPSE Load CLIP (bigG)"),
    "LambdaEclipseLoadDecoder": (LambdaEclipseLoadDecoder, "λ-ECLIPSE Load Kandinsky Decoder"),
}
