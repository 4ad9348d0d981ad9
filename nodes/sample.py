"""Prior Sample: interleaved prompt (+ control) → image embeddings and their negatives, one seed per image."""

from __future__ import annotations

from ..core.errors import InputError
from ..core.pipeline import Embeds, sample_prior
from ..core.seeds import SEED_MAX, seed_list  # noqa: F401  (seed_list is used by nodes/decode.py too)
from . import comfy

def seed_input(what: str):
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                    "tooltip": f"Seed of the {what}. Image i of a batch uses seed + i, so it can be made again alone."})


class LambdaEclipsePriorSample:
    DESCRIPTION = (
        "Runs the λ-ECLIPSE prior once per image: noise + interleaved prompt (+ edge-map control) → CLIP image "
        "embeddings, plus the blank-image embedding as negatives for the decoder's guidance."
    )
    CATEGORY = "λ-ECLIPSE"
    RETURN_TYPES = ("LAMBDA_ECLIPSE_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Image embeddings [batch] and their negatives, for Kandinsky Decode or the interpolation nodes.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prior": ("LAMBDA_ECLIPSE_PRIOR", {"tooltip": "The λ-ECLIPSE prior from Load Prior."}),
                "clip": ("LAMBDA_ECLIPSE_CLIP", {"tooltip": "The CLIP used for the prompt; gives the blank-image embedding (negative, and control when none is given)."}),
                "prompt": ("LAMBDA_ECLIPSE_PROMPT", {"tooltip": "The interleaved prompt from Interleave Prompt."}),
                "seed": seed_input("prior noise"),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "How many embeddings (images) to make, with seeds seed, seed+1, …"}),
            },
            "optional": {
                "control": ("LAMBDA_ECLIPSE_CONTROL", {"tooltip": "Optional: a Canny Condition, so the image follows the layout's edges."}),
            },
        }

    def sample(self, prior, clip, prompt, seed, batch_size=1, control=None):
        model = prior.ready()
        dim = model.config.embedding_dim
        encoder = clip.ready()
        if encoder.embed_dim != dim:
            raise InputError(
                f"The CLIP makes {encoder.embed_dim}-d embeddings but the prior expects {dim}-d. Load the CLIP the prior "
                "was trained with (OpenCLIP ViT-bigG/14) in Load CLIP."
            )
        if control is not None and control.shape[-1] != dim:
            raise InputError(
                f"The control was encoded by a CLIP with {control.shape[-1]}-d embeddings but the prior expects {dim}-d. "
                "Connect Canny Condition to the same Load CLIP (bigG) as the prompt."
            )
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1; got {batch_size}.")
        result = sample_prior(model, prompt, encoder.blank_embedding(), control, seed_list(seed, batch_size))
        device = comfy.intermediate_device()
        return (Embeds(result.embeds.to(device), result.negative.to(device), result.seeds),)


NODES = {"LambdaEclipsePriorSample": (LambdaEclipsePriorSample, "λ-ECLIPSE Prior Sample")}
