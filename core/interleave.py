"""Interleave: write each subject's image embedding over its word's token features in the prompt.

We match a subject word's BPE ids as a *contiguous span* of the prompt (every occurrence), where the
official code replaces every occurrence of every id of the word (a bag of ids): with it "teddy bear"
also overwrites an unrelated "bear" and "red car" touches the "red" of "red barn". For single-token
words both rules give the same positions. A word that is absent, empty, overlapping another subject
or cut off by the 77-token limit is an error here (the official code only prints a message).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import InterleaveError

log = logging.getLogger("lambda_eclipse")


@dataclass
class Subject:
    """One subject: the word that names it in the prompt, its CLIP image embedding [E], a weight (1.0 = official)."""

    word: str
    embedding: torch.Tensor
    weight: float = 1.0


@dataclass
class Placement:
    subject_index: int
    word: str
    positions: list[int]
    weight: float = 1.0


@dataclass
class Prompt:
    """An interleaved prompt, ready for the prior (batch 1)."""

    text: str
    pooled: torch.Tensor  # [1, E]
    tokens: torch.Tensor  # [1, L, E] with subject embeddings substituted
    mask: torch.Tensor  # [1, L] bool
    ids: torch.Tensor  # [1, L]
    placements: list[Placement] = field(default_factory=list)

    @property
    def positions(self) -> dict[int, int]:
        """Token position → subject index."""
        return {pos: p.subject_index for p in self.placements for pos in p.positions}

    def describe(self) -> str:
        if not self.placements:
            return f"{self.text!r}: no subject (plain text prompt)"
        parts = [f"{p.word!r} → token{'s' if len(p.positions) > 1 else ''} {', '.join(map(str, p.positions))}" for p in self.placements]
        return f"{self.text!r}: " + "; ".join(parts)


def find_spans(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """Start positions of every occurrence of `word_ids` as a contiguous run in `prompt_ids`."""
    n, m = len(prompt_ids), len(word_ids)
    if m == 0:
        return []
    word = list(word_ids)
    return [i for i in range(n - m + 1) if list(prompt_ids[i:i + m]) == word]


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words as a person reads them (for error messages)."""
    return list(dict.fromkeys(re.findall(r"[\w'-]+", prompt.lower())))


def _near_misses(word: str, words: list[str]) -> list[str]:
    w = word.lower().strip()
    return [x for x in words if x != w and (w in x or x in w) and len(x) > 1][:3]


def plan_positions(
    prompt: str,
    prompt_ids: Sequence[int],
    words: Sequence[str],
    word_ids: Sequence[Sequence[int]],
    context_length: int = 77,
) -> list[list[int]]:
    """Token positions for each subject word.

    `prompt_ids` is the *untruncated* id list including SOT and EOT, so a word lying beyond the
    context limit can be reported as cut off rather than missing.
    """
    # Truncation keeps positions 0..L-2 and writes EOT at L-1, so a usable word ends before L-1.
    limit = context_length - 1
    plans: list[list[int]] = []
    owner: dict[int, int] = {}
    for index, (word, ids) in enumerate(zip(words, word_ids)):
        if not word or not word.strip():
            raise InterleaveError(f"Subject {index + 1} has an empty word. Type the word that names it in the prompt (e.g. 'dog').")
        if not ids:
            raise InterleaveError(f"Subject word {word!r} has no letters CLIP can tokenise. Use a plain word from the prompt.")
        starts = find_spans(prompt_ids, ids)
        if not starts:
            words_in_prompt = prompt_words(prompt)
            near = _near_misses(word, words_in_prompt)
            hint = f" Did you mean {' or '.join(repr(x) for x in near)}? Words match whole CLIP tokens ('dog' ≠ 'dogs')." if near else ""
            raise InterleaveError(
                f"Subject word {word!r} is not in the prompt {prompt!r}.{hint} "
                f"The prompt's words are: {', '.join(words_in_prompt) or '(none)'}. "
                "Change the subject word or the prompt so they match."
            )
        kept = [s for s in starts if s + len(ids) <= limit]
        cut = [s for s in starts if s + len(ids) > limit]
        if not kept:
            raise InterleaveError(
                f"Subject word {word!r} is at token {cut[0]} of {len(prompt_ids)}, past CLIP's {context_length}-token limit, "
                "so the prompt is cut off before it. Shorten the prompt or move the word earlier."
            )
        if cut:
            log.warning("subject word %r also occurs past the %d-token limit; only the earlier occurrences are used", word, context_length)
        positions = [s + k for s in kept for k in range(len(ids))]
        for pos in positions:
            if pos in owner:
                other = owner[pos]
                raise InterleaveError(
                    f"Subjects {other + 1} ({words[other]!r}) and {index + 1} ({word!r}) both claim token {pos} of the prompt. "
                    "Each subject needs its own word; rename one subject or reword the prompt."
                )
            owner[pos] = index
        plans.append(positions)
    return plans


def substitute(
    tokens: torch.Tensor,
    positions: Sequence[Sequence[int]],
    embeddings: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """A copy of `tokens` [B,L,E] with each subject's embedding (× weight) written at its positions."""
    out = tokens.clone()
    weights = weights if weights is not None else [1.0] * len(embeddings)
    for pos, emb, w in zip(positions, embeddings, weights):
        if not pos:
            continue
        emb = emb.reshape(-1).to(out.device, out.dtype)
        if emb.shape[0] != out.shape[-1]:
            raise InterleaveError(
                f"A subject embedding has {emb.shape[0]} values but the text features have {out.shape[-1]}: "
                "the subject was encoded with a different CLIP. Encode subjects and prompt with the same CLIP."
            )
        out[:, list(pos)] = emb * float(w)
    return out


def interleave_prompt(clip, prompt: str, subjects: Sequence[Subject]) -> Prompt:
    """Encode `prompt` with `clip` and substitute every subject at its word's tokens."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InterleaveError("The prompt is empty. Write a prompt that names each subject, e.g. 'a dog wearing a hat'.")
    features = clip.encode_text(prompt)
    full_ids = [clip.tokenizer.sot_token_id] + clip.word_ids(prompt) + [clip.tokenizer.eot_token_id]
    if len(full_ids) > clip.context_length:
        kept = clip.tokenizer.decode(full_ids[1:clip.context_length - 1]).strip()
        log.warning(
            "the prompt is %d CLIP tokens; CLIP reads only the first %d, so the text after '…%s' is ignored. "
            "Shorten the prompt to keep it all.", len(full_ids), clip.context_length, kept[-40:])
    words = [s.word for s in subjects]
    plans = plan_positions(prompt, full_ids, words, [clip.word_ids(w) if w else [] for w in words], clip.context_length)
    tokens = substitute(features.tokens, plans, [s.embedding for s in subjects], [s.weight for s in subjects])
    placements = [Placement(i, s.word, plans[i], s.weight) for i, s in enumerate(subjects)]
    result = Prompt(prompt, features.pooled, tokens, features.mask, features.ids, placements)
    log.info("interleaved %s", result.describe())
    return result


def official_positions(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """The official bag-of-ids rule (every occurrence of every id), kept only to document the difference."""
    ids = set(word_ids)
    return [i for i, t in enumerate(prompt_ids) if t in ids]

