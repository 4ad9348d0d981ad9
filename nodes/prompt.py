"""Interleave Prompt: the prompt's CLIP token features with each subject's embedding written over its word."""

from __future__ import annotations

from dataclasses import replace

from ..core.interleave import interleave_prompt
from . import comfy


class LambdaEclipseInterleavePrompt:
    DESCRIPTION = (
        "Encodes the prompt with the CLIP text tower and writes each subject's image embedding over the tokens of "
        "its word (every occurrence). Fails, saying what to change, if a subject word is not in the prompt."
    )
    CATEGORY = "λ-ECLIPSE"
    RETURN_TYPES = ("LAMBDA_ECLIPSE_PROMPT", "STRING")
    RETURN_NAMES = ("prompt", "report")
    OUTPUT_TOOLTIPS = (
        "The interleaved prompt for Prior Sample.",
        "Which token positions hold which subject (connect a text display node to see it).",
    )
    FUNCTION = "interleave"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("LAMBDA_ECLIPSE_CLIP", {"tooltip": "OpenCLIP ViT-bigG/14: the same CLIP that encoded the subjects."}),
                "text": ("STRING", {"multiline": True, "default": "a dog wearing a hat", "tooltip": "The prompt. Name every subject with its word, e.g. 'a cat wearing glasses at a park'."}),
            },
            "optional": {
                "subjects": ("LAMBDA_ECLIPSE_SUBJECTS", {"tooltip": "Optional: subjects from Encode Subject. Without them the prompt is plain text."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def interleave(self, clip, text, subjects=None, unique_id=None):
        subjects = list(subjects or ())
        prompt = interleave_prompt(clip.ready(), text, subjects)
        # what the user should know (a prompt past 77 tokens, a subject's own notes): in the report and on the node
        notes = [f"subject {s.word!r}: {n}" for s in subjects for n in getattr(s, "notes", ())]
        if notes:
            prompt = replace(prompt, warnings=list(prompt.warnings) + notes)
        if prompt.warnings:
            comfy.tell_node(unique_id, "\n".join(prompt.warnings))
        device = comfy.intermediate_device()  # cached outputs must not hold GPU memory
        prompt = replace(prompt, pooled=prompt.pooled.to(device), tokens=prompt.tokens.to(device),
                         mask=prompt.mask.to(device), ids=prompt.ids.to(device))
        return (prompt, prompt.describe())


NODES = {"LambdaEclipseInterleavePrompt": (LambdaEclipseInterleavePrompt, "λ-ECLIPSE Interleave Prompt")}
