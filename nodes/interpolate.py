"""Embedding Lerp and Embedding Grid: blend prior outputs, e.g. the paper's two-dogs × two-hats grid."""

from __future__ import annotations

from ..core.errors import InputError
import math

from ..core.interpolate import bilinear_grid, blend, tile_images
from ..core.pipeline import Embeds

MODES = ["lerp", "slerp"]
MODE_TOOLTIP = "lerp: straight line, as the official script. slerp: along the sphere, keeping the embeddings' length."


def _first(embeds: Embeds, name: str):
    if len(embeds) != 1:
        raise InputError(f"Embedding Grid corner '{name}' has a batch of {len(embeds)}; each corner must be one embedding (batch_size 1 in Prior Sample).")
    return embeds.embeds[0], embeds.negative[0]


class LambdaEclipseEmbeddingLerp:
    DESCRIPTION = "Blends two EMBEDS: t = 0 gives a, t = 1 gives b. Both must have the same batch size."
    CATEGORY = "λ-ECLIPSE/interpolate"
    RETURN_TYPES = ("LAMBDA_ECLIPSE_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("The blended embeddings (negatives blended the same way).",)
    FUNCTION = "lerp"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "a": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "Embeddings at t = 0."}),
            "b": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "Embeddings at t = 1 (same batch size as a)."}),
            "t": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "How far from a towards b."}),
            "mode": (MODES, {"default": "lerp", "tooltip": MODE_TOOLTIP}),
        }}

    def lerp(self, a, b, t=0.5, mode="lerp"):
        if a.embeds.shape != b.embeds.shape:
            raise InputError(
                f"Embedding Lerp needs a and b of the same shape; got {list(a.embeds.shape)} and {list(b.embeds.shape)}. "
                "Use the same batch_size (and the same prior) for both."
            )
        embeds = blend(a.embeds, b.embeds.to(a.embeds.device), t, mode)
        negative = blend(a.negative, b.negative.to(a.negative.device), t, mode)
        return (Embeds(embeds, negative, list(a.seeds)),)


class LambdaEclipseEmbeddingGrid:
    DESCRIPTION = (
        "The paper's interpolation figure: four corner embeddings → a (steps+1)×(steps+1) grid as one batch, row by row "
        "(top row left→right first). Rows blend top→bottom, columns left→right. Decode it with one seed for every cell."
    )
    CATEGORY = "λ-ECLIPSE/interpolate"
    RETURN_TYPES = ("LAMBDA_ECLIPSE_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("(steps+1)² embeddings in row-major order.",)
    FUNCTION = "grid"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "top_left": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "Corner embedding (batch of 1), e.g. dog A with hat A."}),
            "top_right": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "Corner embedding, e.g. dog A with hat B."}),
            "bottom_left": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "Corner embedding, e.g. dog B with hat A."}),
            "bottom_right": ("LAMBDA_ECLIPSE_EMBEDS", {"tooltip": "Corner embedding, e.g. dog B with hat B."}),
            "steps": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip": "Intervals per side: 2 gives 3×3 = 9 images, 4 gives 5×5 = 25."}),
            "mode": (MODES, {"default": "lerp", "tooltip": MODE_TOOLTIP}),
        }}

    def grid(self, top_left, top_right, bottom_left, bottom_right, steps=2, mode="lerp"):
        corners = [_first(e, n) for e, n in ((top_left, "top_left"), (top_right, "top_right"),
                                            (bottom_left, "bottom_left"), (bottom_right, "bottom_right"))]
        device = corners[0][0].device
        embeds = bilinear_grid(*(c[0].to(device) for c in corners), steps=steps, mode=mode)
        negative = bilinear_grid(*(c[1].to(device) for c in corners), steps=steps, mode=mode)
        return (Embeds(embeds, negative, list(top_left.seeds) * embeds.shape[0]),)


class LambdaEclipseImageGrid:
    DESCRIPTION = (
        "Lays a batch of pictures out as one picture, row by row: the interpolation grid as the paper shows it. "
        "columns 0 makes a square grid (3 columns for 9 pictures, 5 for 25)."
    )
    CATEGORY = "λ-ECLIPSE/interpolate"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("One picture holding the whole batch.",)
    FUNCTION = "tile"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The pictures, e.g. Kandinsky Decode's output for an Embedding Grid."}),
            "columns": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Pictures per row; 0 = a square grid (ceil of the square root of the count)."}),
            "gap": ("INT", {"default": 8, "min": 0, "max": 256, "tooltip": "White space between pictures, in pixels."}),
        }}

    def tile(self, images, columns=0, gap=8):
        count = images.shape[0]
        columns = int(columns) or math.ceil(math.sqrt(count))
        return (tile_images(images, columns, gap),)


NODES = {
    "LambdaEclipseImageGrid": (LambdaEclipseImageGrid, "λ-ECLIPSE Image Grid"),
    "LambdaEclipseEmbeddingLerp": (LambdaEclipseEmbeddingLerp, "λ-ECLIPSE Embedding Lerp"),
    "LambdaEclipseEmbeddingGrid": (LambdaEclipseEmbeddingGrid, "λ-ECLIPSE Embedding Grid"),
}
