"""λ-ECLIPSE Region: an embedding for one part of the picture (a MASK), chained into REGIONS for Kandinsky Decode."""

from __future__ import annotations

from ..core.errors import InputError
from ..core.regions import Region

REGIONS = "LAMBDA_ECLIPSE_REGIONS"


class LambdaEclipseRegion:
    DESCRIPTION = (
        "Puts one embedding in one part of the picture. Kandinsky Decode predicts the noise for the base embedding and "
        "for each region (each with guidance against its own negative) and blends them per pixel: inside a "
        "full-strength region its own prediction replaces the base's, overlapping regions are averaged by weight, and "
        "outside every region the base is untouched. Give each subject its own Prior Sample (from a one-subject prompt) "
        "so identities do not bleed into each other, and the whole scene as the base."
    )
    CATEGORY = "λ-ECLIPSE"
    RETURN_TYPES = (REGIONS,)
    RETURN_NAMES = ("regions",)
    OUTPUT_TOOLTIPS = ("The regions so far (previous ones first), for Kandinsky Decode's regions input or the next Region.",)
    FUNCTION = "region"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embeds": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "The embedding for this region, from Prior Sample, Embedding Lerp, … (batch 1, or the same batch as the base)."}),
                "mask": ("MASK", {"tooltip": "Where this region is: 1 = here, 0 = not here, soft values blend. Any size (resized to the picture); e.g. SolidMask + MaskComposite, or a painted mask from Load Image (its MASK is 1 where the image is transparent: use Invert Mask if needed)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "How much this region's prediction counts inside its mask: 1 replaces the base there, 0 leaves the base."}),
            },
            "optional": {
                "regions": (REGIONS, {"tooltip": "Optional: regions from a previous Region node, to chain several."}),
                "feather": ("INT", {"default": 0, "min": 0, "max": 512, "step": 8, "tooltip": "Soften the mask's edge by about this many pixels (a Gaussian blur), so the regions blend into each other."}),
            },
        }

    def region(self, embeds, mask, strength=1.0, regions=None, feather=0):
        if not hasattr(embeds, "embeds"):
            raise InputError("embeds must come from Prior Sample, Embedding Lerp or another λ-ECLIPSE EMBEDS output.")
        if mask is None or mask.ndim not in (2, 3):
            raise InputError(f"mask must be a MASK [batch, height, width]; got {None if mask is None else list(mask.shape)}.")
        negative = embeds.negative if getattr(embeds, "negative", None) is not None else None
        region = Region(embeds.embeds.detach().float().cpu(), None if negative is None else negative.detach().float().cpu(),
                        mask.detach().float().cpu(), float(strength), float(feather))
        return (tuple(regions or ()) + (region,),)


NODES = {"LambdaEclipseRegion": (LambdaEclipseRegion, "λ-ECLIPSE Region")}
