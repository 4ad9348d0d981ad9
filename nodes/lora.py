"""λ-ECLIPSE Load Decoder LoRA: a concept LoRA of the Kandinsky 2.2 decoder UNet on the decoder.

Files from `python -m lambda_eclipse.trainer finetune-decoder`, diffusers (save_lora_adapter / save_lora_weights, and
the 0.22–0.25 Kandinsky 2.2 decoder LoRA script's save_attn_procs) and peft (PeftModel.save_pretrained: keep
adapter_model.safetensors and adapter_config.json together in a subfolder of models/loras) are listed; every format
and where its alpha comes from is in `core.lora`. The menu lists exactly the files that load (header checks, cached by
file signature); a file picked anyway (an old workflow) gets a message saying what it is.

The decoder on the input link is shared: ComfyUI caches it, and other nodes may decode with it. This node never
changes it. It returns a new LAMBDA_ECLIPSE_DECODER whose model shares the same UNet, MoVQ and ComfyUI patcher
(nothing is copied; memory management is unchanged) and turns the LoRA on only while its own decodes run
(`core.lora.apply_decoder_lora`: forward hooks registered for the duration of each UNet call, then removed).
Chain several of these nodes to stack LoRAs; strength 0 gives the base decoder's pixels exactly.
"""

from __future__ import annotations

import weakref

from ..core.errors import MissingModelsError
from . import comfy
from .loaders import Loaded

CATEGORY = "λ-ECLIPSE/loaders"
LORA_FOLDERS = ("loras",)
_LORAS: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()


def _accept(path) -> bool:
    from ..core.lora import looks_like_decoder_lora

    return looks_like_decoder_lora(path)


def _problem(path) -> str | None:
    from ..core.lora import decoder_lora_problem

    return decoder_lora_problem(path)


def _resolve(lora_name: str):
    try:
        return comfy.resolve_model(LORA_FOLDERS, lora_name, "Decoder LoRA", "python -m lambda_eclipse.trainer finetune-decoder")
    except MissingModelsError as exc:
        raise MissingModelsError(
            f"Decoder LoRA {lora_name!r} was not found in models/loras. Train one with `python -m lambda_eclipse.trainer "
            "finetune-decoder` (TRAINING.md), copy its concept_lora.safetensors into models/loras/, then press R."
        ) from exc


def _load(path):
    from ..core.lora import decoder_lora_signature, load_decoder_lora

    key = decoder_lora_signature(path)
    lora = _LORAS.get(key)
    if lora is None:
        lora = load_decoder_lora(path)
        _LORAS[key] = lora
    return lora


class LambdaEclipseLoadDecoderLoRA:
    DESCRIPTION = (
        "Applies a concept LoRA of the Kandinsky 2.2 decoder (trained with `python -m lambda_eclipse.trainer "
        "finetune-decoder`, paper §3.3, or with diffusers' or peft's LoRA tools) at a strength. The input decoder is "
        "left unchanged for every other node: the LoRA is active only in decodes that use this node's output. "
        "Chainable."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAMBDA_ECLIPSE_DECODER",)
    RETURN_NAMES = ("decoder",)
    OUTPUT_TOOLTIPS = ("The decoder with the LoRA applied (shares the loaded weights; nothing is copied).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "decoder": ("LAMBDA_ECLIPSE_DECODER", {"tooltip": "From λ-ECLIPSE Load Kandinsky Decoder (or another Load Decoder LoRA)."}),
            "lora_name": (comfy.list_model_files(LORA_FOLDERS, _accept, folders=False), {"tooltip": (
                "A decoder LoRA in models/loras: concept_lora.safetensors from the trainer's finetune-decoder, a "
                "diffusers LoRA of the Kandinsky 2.2 decoder (pytorch_lora_weights.safetensors), or a peft folder "
                "(adapter_model.safetensors + adapter_config.json). Only files that load are listed.")}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip": (
                "How strongly the LoRA acts: 1 = as trained, 0 = off (the base decoder exactly), between = partial.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        """Our message before anything runs (instead of ComfyUI's "Value not in list"): where the file should be,
        how to make one, or what a file there is when it is no decoder LoRA that loads (core.lora's header checks)."""
        try:
            path = _resolve(lora_name)
        except Exception as exc:  # MissingModelsError / ModelFileError: already worded for the user
            return str(exc)
        problem = _problem(path)
        if problem is not None:
            return f"Decoder LoRA {lora_name!r}: {problem}"
        return True

    @classmethod
    def IS_CHANGED(cls, decoder=None, lora_name="", strength=1.0):
        try:
            from ..core.lora import decoder_lora_signature

            return str(decoder_lora_signature(_resolve(lora_name)))
        except Exception:
            return lora_name

    def apply(self, decoder, lora_name, strength=1.0):
        from ..core.lora import apply_decoder_lora

        lora = _load(_resolve(lora_name))
        model = apply_decoder_lora(decoder.model, lora, float(strength))
        return (Loaded(decoder.kind, model, decoder.patcher, f"{decoder.name} + {lora_name}@{float(strength):g}"),)


NODES = {"LambdaEclipseLoadDecoderLoRA": (LambdaEclipseLoadDecoderLoRA, "λ-ECLIPSE Load Decoder LoRA")}
