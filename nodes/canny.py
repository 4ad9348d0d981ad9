"""Canny Condition: a layout image → its edge map's CLIP embedding (CONTROL) for Prior Sample."""

from __future__ import annotations

import numpy as np
import torch

from ..core.canny import as_edge_map, canny_edges, control_embedding
from ..core.errors import InputError
from . import comfy


class LambdaEclipseCannyCondition:
    DESCRIPTION = (
        "Makes a Canny edge map of a layout image (OpenCV, as the official code) and encodes it with the CLIP vision "
        "tower. Prior Sample then follows the layout. Turn on image_is_edge_map to use an edge map made by another node."
    )
    CATEGORY = "λ-ECLIPSE"
    RETURN_TYPES = ("LAMBDA_ECLIPSE_CONTROL", "IMAGE")
    RETURN_NAMES = ("control", "edge_map")
    OUTPUT_TOOLTIPS = (
        "The edge-map embedding for Prior Sample's control input.",
        "The edge map that was encoded (white edges on black), to preview.",
    )
    FUNCTION = "condition"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("LAMBDA_ECLIPSE_CLIP", {"tooltip": "OpenCLIP ViT-bigG/14 (the same CLIP as the prompt)."}),
                "image": ("IMAGE", {"tooltip": "The layout image (first image of a batch is used)."}),
                "low_threshold": ("INT", {"default": 100, "min": 0, "max": 255, "step": 1, "tooltip": "Canny low threshold (official: 100). Lower keeps fainter edges."}),
                "high_threshold": ("INT", {"default": 200, "min": 0, "max": 255, "step": 1, "tooltip": "Canny high threshold (official: 200); must be ≥ the low threshold."}),
                "image_is_edge_map": ("BOOLEAN", {"default": False, "tooltip": "On: the image already is an edge map (e.g. from ComfyUI's Canny node); it is encoded as given and the thresholds are ignored."}),
            },
        }

    def condition(self, clip, image, low_threshold=100, high_threshold=200, image_is_edge_map=False):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise InputError(f"The layout must be an IMAGE [batch, height, width, 3]; got shape {list(image.shape)}.")
        first = image[0, ..., :3]
        edges = as_edge_map(first) if image_is_edge_map else canny_edges(first, low_threshold, high_threshold)
        embedding = control_embedding(clip.ready(), edges).float().reshape(1, -1)
        preview = torch.from_numpy(np.array(edges, dtype=np.float32, copy=True)).div(255.0)[None]
        device = comfy.intermediate_device()
        return (embedding.to(device), preview.to(device))


NODES = {"LambdaEclipseCannyCondition": (LambdaEclipseCannyCondition, "λ-ECLIPSE Canny Condition")}
