"""Encode Subject: photo(s) of one subject (+ optional mask) and its prompt word → a SUBJECTS list."""

from __future__ import annotations

import logging

import torch

from ..core.errors import InputError
from ..core.images import subject_on_white
from ..core.interpolate import average_embeddings
from ..core.interleave import Subject
from . import comfy

log = logging.getLogger("lambda_eclipse")


def _check_mask(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise InputError(f"The mask must be a MASK [batch, height, width]; got shape {list(mask.shape)}.")
    batch, height, width = image.shape[0], image.shape[1], image.shape[2]
    if tuple(mask.shape[1:]) != (height, width):
        if tuple(mask.shape[1:]) == (64, 64) and not bool(mask.any()):
            raise InputError(
                "The mask is LoadImage's empty 64×64 placeholder: that image has no alpha channel. Paint the subject "
                "in the mask editor (right-click the image → Open in MaskEditor) or disconnect the mask."
            )
        raise InputError(
            f"The mask is {mask.shape[2]}×{mask.shape[1]} but the image is {width}×{height}. Use a mask made for "
            "this image (same size), or resize it to the image first."
        )
    if mask.shape[0] not in (1, batch):
        raise InputError(
            f"The mask batch has {mask.shape[0]} masks for {batch} images. Give one mask for all images or one per image."
        )
    return mask


MASK_SUBJECT = "1 = subject"
MASK_BACKGROUND = "1 = background (Load Image alpha)"
MASK_MODES = ["auto", MASK_SUBJECT, MASK_BACKGROUND]
AUTO_MARGIN = 0.25  # auto: border mean − centre mean at or above this → the mask is Load Image's (1 = background)


def mask_border_centre(mask: torch.Tensor) -> tuple[float, float]:
    """Mean of the mask on its outer frame (a 1/16 of each side, at least 1 px) and in its central half box."""
    height, width = mask.shape[-2], mask.shape[-1]
    band_h, band_w = max(1, height // 16), max(1, width // 16)
    frame = torch.ones(height, width, dtype=torch.bool)
    frame[band_h:height - band_h, band_w:width - band_w] = False
    m = mask.float().reshape(-1, height, width)
    border = m[:, frame].mean().item()
    centre = m[:, height // 4:height - height // 4, width // 4:width - width // 4].mean().item()
    return border, centre


def resolve_mask_mode(mask: torch.Tensor, mode: str) -> tuple[str, str]:
    """(the convention to use, why). auto: Load Image's 1 = background when the border is clearly more 1 than the centre."""
    if mode not in MASK_MODES:
        raise InputError(f"mask_mode must be one of {', '.join(repr(m) for m in MASK_MODES)}; got {mode!r}.")
    if mode != "auto":
        return mode, "as set"
    border, centre = mask_border_centre(mask)
    chosen = MASK_BACKGROUND if border - centre >= AUTO_MARGIN else MASK_SUBJECT
    return chosen, f"auto: border {border:.2f}, centre {centre:.2f}"


def _empty_mask_message(mask_mode: str, alpha: bool) -> str:
    inside = " inside the image's opaque part" if alpha else ""
    flip = (
        "If this mask comes from Load Image (1 = transparent background), set mask_mode to "
        f"'{MASK_BACKGROUND}'; if it is a painted mask, set '{MASK_SUBJECT}'."
        if mask_mode == "auto" else
        f"mask_mode is '{mask_mode}': if the mask uses the other convention, switch it."
    )
    return (
        f"The subject mask is empty (no pixel above 0.5{inside}), so nothing of the subject is left. {flip} "
        "Or paint the subject in the mask, or disconnect the mask to use the whole image."
    )


_TRANSPARENT = ("The subject picture is fully transparent (its alpha is 0 everywhere): nothing of the subject is "
                "visible. Re-export it with the subject opaque, or pick another picture in Load Image.")
_UNWIRED_CUTOUT = ("the picture in Load Image is a cut-out (it has a transparent background), but Load Image's MASK "
                   "is not connected to this node's mask, so the transparent background is used as it is (Load Image "
                   "drops the alpha). Connect Load Image's MASK output to mask (mask_mode auto reads it) to keep only "
                   "the subject, on white.")


def _load_image_alpha(prompt, unique_id) -> str | None:
    """When this node's image comes straight from Load Image and its mask is not wired: 'transparent' (alpha 0
    everywhere), 'cutout' (some transparency), or None (opaque, not from Load Image, or unknown)."""
    if not isinstance(prompt, dict) or unique_id is None:
        return None
    me = prompt.get(str(unique_id)) or {}
    link = (me.get("inputs") or {}).get("image")
    if not (isinstance(link, list) and len(link) == 2 and link[1] == 0):
        return None
    source = prompt.get(str(link[0])) or {}
    if source.get("class_type") != "LoadImage":
        return None
    name = (source.get("inputs") or {}).get("image")
    path = comfy.annotated_input_path(name) if isinstance(name, str) else None
    if path is None or not path.is_file():
        return None
    try:
        from PIL import Image

        with Image.open(path) as pil:
            if pil.mode not in ("RGBA", "LA", "PA") and not (pil.mode == "P" and "transparency" in pil.info):
                return None
            low, high = pil.convert("RGBA").getchannel("A").getextrema()
    except Exception:  # unreadable here: Load Image itself reports it
        return None
    if high == 0:
        return "transparent"
    return "cutout" if low < 255 else None


class LambdaEclipseEncodeSubject:
    DESCRIPTION = (
        "Encodes a subject photo with the CLIP vision tower and ties it to a word of the prompt. Chain nodes "
        "through 'subjects' to use several subjects; their order is kept. A batch of several photos of the same "
        "subject gives one embedding: the normalised mean (mean of the unit-length embeddings, rescaled to their "
        "mean length). With a mask, the subject is cut out onto white and cropped to the mask, as the paper does. "
        "A mask straight from Load Image (1 = transparent background) is recognised and inverted (see mask_mode); "
        "an RGBA image's alpha is used as the subject mask."
    )
    CATEGORY = "λ-ECLIPSE"
    RETURN_TYPES = ("LAMBDA_ECLIPSE_SUBJECTS",)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("The subjects so far (previous ones first, this one last), for Interleave Prompt or the next Encode Subject.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("LAMBDA_ECLIPSE_CLIP", {"tooltip": "OpenCLIP ViT-bigG/14 from Load CLIP (bigG); use the same CLIP for the prompt."}),
                "image": ("IMAGE", {"tooltip": "One photo of the subject, or a batch of photos of the same subject (their embeddings are averaged: normalised mean). An image with 4 channels (RGBA) uses its alpha as the subject mask: the subject is blended onto white and cropped to its opaque part."}),
                "word": ("STRING", {"default": "dog", "tooltip": "The word naming this subject in the prompt, e.g. 'dog'. It must appear in the prompt as the same CLIP token(s): 'dog' does not match 'dogs'."}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "Scale of the subject embedding written over the word (1.0 = as in the paper). Lower gives the text more say."}),
                "fit": (["crop", "pad"], {"default": "crop", "tooltip": "crop: CLIP's centre crop (as the paper). pad: pad to a white square first, so a tall or wide subject is not cut off."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional: where the subject is. The rest becomes white and the image is cropped to the mask. One mask, or one per image. Load Image's MASK output is 1 = transparent background; mask_mode tells which convention this mask uses."}),
                "subjects": ("LAMBDA_ECLIPSE_SUBJECTS", {"tooltip": "Optional: subjects from a previous Encode Subject, to chain several subjects."}),
                "mask_mode": (MASK_MODES, {"default": "auto", "tooltip": "How to read the mask. '1 = subject': painted masks, segmentation nodes. '1 = background (Load Image alpha)': the MASK output of Load Image for a cut-out PNG (it is 1 − alpha), inverted here. auto: treated as Load Image's when the mask's border is clearly more 1 than its centre (border mean − centre mean ≥ 0.25), else as 1 = subject; the choice is logged. A mask that is 1 everywhere is refused in auto (from Load Image it means a fully transparent picture)."}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def encode(self, clip, image, word, weight=1.0, fit="crop", mask=None, subjects=None, mask_mode="auto",
               prompt=None, unique_id=None):
        word = (word or "").strip()
        if not word:
            raise InputError("The subject word is empty. Type the word that names this subject in the prompt, e.g. 'dog'.")
        previous = tuple(subjects or ())
        for index, other in enumerate(previous):
            if other.word.lower() == word.lower():
                raise InputError(
                    f"Subject word {word!r} is already used by subject {index + 1}. Each subject needs its own word in the "
                    "prompt; to average several photos of one subject, batch the images into a single Encode Subject."
                )
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise InputError(f"The image must be an IMAGE [batch, height, width, 3] (or 4 channels with alpha); got shape {list(image.shape)}.")
        mask = _check_mask(image, mask)
        notes: list[str] = []
        if mask is None and image.shape[-1] == 3:
            cutout = _load_image_alpha(prompt, unique_id)
            if cutout == "transparent":
                raise InputError(_TRANSPARENT)
            if cutout == "cutout":
                notes.append(_UNWIRED_CUTOUT)
        if mask is not None and mask_mode == "auto" and bool((mask >= 0.5).all()):
            raise InputError(
                "The subject mask is 1 everywhere. From Load Image's MASK that means the picture is fully transparent: "
                "nothing of the subject is visible (re-export it with the subject opaque). If you painted the whole "
                f"image on purpose, disconnect the mask (the whole image is used), or set mask_mode to '{MASK_SUBJECT}'."
            )
        if mask is not None:
            mode, why = resolve_mask_mode(mask, mask_mode)
            log.info("subject %r: mask read as %s (%s)", word, mode, why)
            if mode == MASK_BACKGROUND:
                mask = 1.0 - mask.float()
        has_alpha = image.shape[-1] == 4
        prepared = []
        for i in range(image.shape[0]):
            m = None if mask is None else mask[i if mask.shape[0] > 1 else 0]
            if has_alpha:  # the alpha is the subject (soft edges), within the mask if there is one
                what = "subject image" if image.shape[0] == 1 else f"subject image {i + 1} of {image.shape[0]}"
                rgb, keep = subject_on_white(image[i], m, what)
                if keep is not None and not keep.any():
                    raise InputError(_empty_mask_message(mask_mode, alpha=True))
                prepared.append((rgb, keep))
            else:
                if m is not None and not bool((m > 0.5).any()):
                    raise InputError(_empty_mask_message(mask_mode, alpha=False))
                prepared.append((image[i], m))
        encoder = clip.ready()
        rows = [encoder.encode_subject(img, m, fit, notes).float().cpu() for img, m in prepared]
        embedding = average_embeddings(torch.stack(rows))
        log.info("subject %r: %d photo(s), weight %.2f%s", word, len(rows), weight,
                 ", alpha used as the subject mask" if has_alpha else "")
        notes = list(dict.fromkeys(notes))
        if notes:
            comfy.tell_node(unique_id, f"subject {word!r}: " + " ".join(notes))
        return (previous + (Subject(word, embedding, float(weight), tuple(notes)),),)


NODES = {"LambdaEclipseEncodeSubject": (LambdaEclipseEncodeSubject, "λ-ECLIPSE Encode Subject")}
