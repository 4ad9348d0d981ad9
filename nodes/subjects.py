"""Encode Subject: photo(s) of one subject (+ optional mask) and its prompt word → a SUBJECTS list."""

from __future__ import annotations

import logging

import torch

from ..core.errors import InputError
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


class LambdaEclipseEncodeSubject:
    DESCRIPTION = (
        "Encodes a subject photo with the CLIP vision tower and ties it to a word of the prompt. Chain nodes "
        "through 'subjects' to use several subjects; their order is kept. A batch of several photos of the same "
        "subject gives one embedding: the normalised mean (mean of the unit-length embeddings, rescaled to their "
        "mean length). With a mask, the subject is cut out onto white and cropped to the mask, as the paper does."
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
                "image": ("IMAGE", {"tooltip": "One photo of the subject, or a batch of photos of the same subject (their embeddings are averaged: normalised mean)."}),
                "word": ("STRING", {"default": "dog", "tooltip": "The word naming this subject in the prompt, e.g. 'dog'. It must appear in the prompt as the same CLIP token(s): 'dog' does not match 'dogs'."}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "Scale of the subject embedding written over the word (1.0 = as in the paper). Lower gives the text more say."}),
                "fit": (["crop", "pad"], {"default": "crop", "tooltip": "crop: CLIP's centre crop (as the paper). pad: pad to a white square first, so a tall or wide subject is not cut off."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional: where the subject is (1 = subject). The rest becomes white and the image is cropped to the mask. One mask, or one per image."}),
                "subjects": ("LAMBDA_ECLIPSE_SUBJECTS", {"tooltip": "Optional: subjects from a previous Encode Subject, to chain several subjects."}),
            },
        }

    def encode(self, clip, image, word, weight=1.0, fit="crop", mask=None, subjects=None):
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
            raise InputError(f"The image must be an IMAGE [batch, height, width, 3]; got shape {list(image.shape)}.")
        mask = _check_mask(image, mask)
        encoder = clip.ready()
        rows = []
        for i in range(image.shape[0]):
            m = None if mask is None else mask[i if mask.shape[0] > 1 else 0]
            rows.append(encoder.encode_subject(image[i, ..., :3], m, fit).float().cpu())
        embedding = average_embeddings(torch.stack(rows))
        log.info("subject %r: %d photo(s), weight %.2f", word, len(rows), weight)
        return (previous + (Subject(word, embedding, float(weight)),),)


NODES = {"LambdaEclipseEncodeSubject": (LambdaEclipseEncodeSubject, "λ-ECLIPSE Encode Subject")}
