"""Kandinsky Decode: image embeddings → pictures, with ComfyUI's progress bar and Cancel."""

from __future__ import annotations

import logging

from ..core.decoder import RECOMMENDED_STEPS, SAMPLERS, check_sampler, decode, round_size
from ..core.preview import preview_image
from ..core.errors import InputError
from . import comfy
from ..core.seeds import check_seed
from .sample import seed_input, seed_list

log = logging.getLogger("lambda_eclipse")


class LambdaEclipseKandinskyDecode:
    DESCRIPTION = (
        "Decodes image embeddings with the Kandinsky 2.2 decoder (UNet denoising + MoVQ). Image i uses seed + i. "
        "Width and height are multiples of 64."
    )
    CATEGORY = "λ-ECLIPSE"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The pictures, one per embedding.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "decoder": ("LAMBDA_ECLIPSE_DECODER", {"tooltip": "The Kandinsky 2.2 decoder from Load Kandinsky Decoder."}),
            "embeds": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "Image embeddings from Prior Sample or the interpolation nodes."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": "Image width in pixels (multiple of 64). The decoder was trained at 512–768."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": "Image height in pixels (multiple of 64)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 200, "tooltip": "Denoising steps (official: 50). Fewer is faster and rougher."}),
            "guidance": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip": "Classifier-free guidance against the blank-image embedding (official λ-ECLIPSE: 7.5). 1 turns it off."}),
            "seed": seed_input("decoder noise"),
        }, "optional": {
            "batch_seeds": (["increment", "same"], {"default": "increment", "tooltip": "increment: image i uses seed + i (each image reproducible alone). same: every image uses seed, so a grid shows only the blend (as in the paper's interpolation figure)."}),
            "sampler": (list(SAMPLERS), {"default": "ddpm", "tooltip": (
                "The denoising schedule, built from the decoder's own scheduler config with diffusers' schedulers. "
                "Recommended steps: " + ", ".join(f"{k} {v}" for k, v in RECOMMENDED_STEPS.items()) + ". ddpm is the "
                "official code's (default), ddim the paper's. Fewer steps are faster; quality per sampler has not been "
                "measured with the real weights yet.")}),
            "image": ("IMAGE", {"tooltip": "Optional: img2img. The picture is encoded by the MoVQ and denoised from part-way, "
                                "keeping its composition (as diffusers' KandinskyV22Img2ImgPipeline). Resized to width × height."}),
            "strength": ("FLOAT", {"default": 0.6, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                "img2img only: how much of the picture is redrawn. 1 = all of it (like no image); lower keeps more of "
                "the picture. int(steps × strength) steps are run.")}),
            "regions": ("LAMBDA_ECLIPSE_REGIONS", {"tooltip": (
                "Optional: regions from λ-ECLIPSE Region. Each region's embedding drives its own part of the picture; "
                "embeds (above) is the base, used wherever no region is. Needs one UNet prediction per region per step.")}),
        }}

    def decode(self, decoder, embeds, width=512, height=512, steps=50, guidance=7.5, seed=0, batch_seeds="increment",
               sampler="ddpm", image=None, strength=0.6, regions=None):
        w, h, changed = round_size(int(width), int(height))
        if changed:
            log.warning("width/height rounded up to multiples of 64: %dx%d", w, h)
        model = decoder.ready()
        if embeds.embeds.shape[-1] != model.embedding_dim:
            raise InputError(
                f"The embeddings are {embeds.embeds.shape[-1]}-d but this decoder expects {model.embedding_dim}-d: "
                "the prior and the decoder do not belong together. Use the Kandinsky 2.2 decoder with the λ-ECLIPSE prior."
            )
        if batch_seeds not in ("increment", "same"):
            raise InputError(f"batch_seeds must be 'increment' or 'same'; got {batch_seeds!r}.")
        seeds = seed_list(seed, len(embeds)) if batch_seeds == "increment" else [check_seed(seed)] * len(embeds)
        check_sampler(sampler)
        callback = comfy.step_callback(int(steps))
        preview = None
        if comfy.previews_enabled():
            preview = comfy.preview_callback(callback.bar, lambda latents: preview_image(model, latents))
        images = decode(
            model, embeds.embeds, embeds.negative, width=w, height=h, steps=int(steps), guidance=float(guidance),
            seeds=seeds, callback=callback, sampler=sampler, init_image=image,
            strength=float(strength) if image is not None else 1.0, preview=preview,
            regions=list(regions) if regions else None,
        )
        return (images.to(comfy.intermediate_device()),)


NODES = {"LambdaEclipseKandinskyDecode": (LambdaEclipseKandinskyDecode, "λ-ECLIPSE Kandinsky Decode")}
