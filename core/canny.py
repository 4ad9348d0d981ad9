"""Canny edge map of a layout image, exactly as the official code makes it, and its control embedding."""

from __future__ import annotations

import numpy as np
import torch

from .clip import to_pil
from .errors import InputError

DEFAULT_LOW, DEFAULT_HIGH = 100, 200


def canny_edges(image, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH) -> np.ndarray:
    """uint8 [H,W,3] edge map (0/255 in every channel): 8-bit grey, cv2.Canny(low, high) at the image's own size.

    The official script reads the file with cv2.IMREAD_GRAYSCALE; from decoded RGB we use OpenCV's
    RGB→grey weights, which equal it for PNG (a JPEG decoded straight to grey can differ by ±1).
    """
    import cv2

    if not (0 <= low <= high):
        raise InputError(f"Canny thresholds must satisfy 0 ≤ low ≤ high; got low={low}, high={high}.")
    rgb = np.asarray(to_pil(image))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, float(low), float(high))
    return np.repeat(edges[..., None], 3, axis=-1)


def as_edge_map(image) -> np.ndarray:
    """An edge map made elsewhere (e.g. ComfyUI's Canny node), used as given: uint8 [H,W,3]."""
    return np.asarray(to_pil(image))


def control_embedding(clip, edge_map) -> torch.Tensor:
    """[E] CLIP image embedding of an edge map; `None` gives the blank embedding (no edge input)."""
    if edge_map is None:
        return clip.blank_embedding()
    return clip.encode_images([edge_map])[0]
