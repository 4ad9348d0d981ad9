"""Interleave: write each subject's image embedding over its word's token features in the prompt.

We match a subject word's BPE ids as a *contiguous span* of the prompt (every occurrence), where the
official code replaces every occurrence of every id of the word (a bag of ids): with it "teddy bear"
also overwrites an unrelated "bear" and "red car" touches the "red" of "red barn". For single-token
words both rules give the same positions. A word that is absent, empty, overlapping another subject
or cut off by the 77-token limit is an error here (the official code only prints a message).

A span must also be whole words: CLIP's tokenizer splits digits one by one, so the ids of "w1" are a run
inside "w10" (and "glasses" can be the end of "sunglasses"); a run that starts or ends inside a word of
the prompt (letters or digits glued to it, no space or punctuation between) is not that subject's word.

`check_prompt_words` runs every one of these checks with the tokenizer alone, so a command can stop on a
bad word before any model is loaded; `interleave_prompt` runs the same code with the loaded CLIP.
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
    notes: tuple = ()  # what the user should hear about this subject (a tiny photo, an unwired cut-out mask)


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
    warnings: list[str] = field(default_factory=list)  # said to the user (log, node report), never an error

    @property
    def positions(self) -> dict[int, int]:
        """Token position → subject index."""
        return {pos: p.subject_index for p in self.placements for pos in p.positions}

    def describe(self) -> str:
        if not self.placements:
            text = f"{self.text!r}: no subject (plain text prompt)"
        else:
            parts = [f"{p.word!r} → token{'s' if len(p.positions) > 1 else ''} {', '.join(map(str, p.positions))}"
                     for p in self.placements]
            text = f"{self.text!r}: " + "; ".join(parts)
        return "\n".join([text] + [f"warning: {w}" for w in self.warnings])


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
    glued: Sequence[bool] | None = None,
    warnings: list[str] | None = None,
) -> list[list[int]]:
    """Token positions for each subject word.

    `prompt_ids` is the *untruncated* id list including SOT and EOT, so a word lying beyond the
    context limit can be reported as cut off rather than missing. `glued[i]` (same indexing) is True
    when token i continues the word of token i-1; a span must not start or end inside a word.
    Warnings (an occurrence past the limit) are appended to `warnings` when given.
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
        if glued is not None:
            inside = [st for st in starts if glued[st] or (st + len(ids) < len(glued) and glued[st + len(ids)])]
            starts = [st for st in starts if st not in inside]
        else:
            inside = []
        if not starts and inside:
            raise InterleaveError(
                f"Subject word {word!r} occurs in the prompt {prompt!r} only as part of a longer word "
                f"(CLIP splits digits and some words into pieces, so {word!r} is a piece of it there). "
                "Use a subject word that stands alone in the prompt, e.g. with a space or punctuation around it."
            )
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
            said = (f"subject word {word!r} also occurs past CLIP's {context_length}-token limit; only the earlier "
                    "occurrences are used")
            log.warning(said)
            if warnings is not None:
                warnings.append(said)
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


def word_glue(prompt: str, encode) -> list[bool] | None:
    """glued[i] for the prompt's BPE ids (without SOT/EOT): True when id i continues the written word of id i-1
    (letters or digits touching: the '1' and '0' of 'w10', the 'glasses' of 'sunglasses'). None when the
    prompt's ids are not the concatenation of its whitespace-separated words' ids (then no whole-word check)."""
    ids: list[int] = []
    glued: list[bool] = []
    for chunk in prompt.split():
        chunk_ids = list(encode(chunk))
        pieces = [_piece(encode, i) for i in chunk_ids]
        for j, _ in enumerate(chunk_ids):
            glued.append(j > 0 and _alnum_end(pieces[j - 1]) and _alnum_start(pieces[j]))
        ids += chunk_ids
    if ids != list(encode(prompt)):
        return None
    return glued


def _piece(encode, token_id: int) -> str:
    tokenizer = getattr(encode, "__self__", None)
    decoder = getattr(tokenizer, "decoder", None)
    text = decoder.get(token_id, "") if isinstance(decoder, dict) else ""
    return text.replace("</w>", "")


def _alnum_end(piece: str) -> bool:
    return bool(piece) and piece[-1].isalnum()


def _alnum_start(piece: str) -> bool:
    return bool(piece) and piece[0].isalnum()


def plan_prompt(tokenizer, prompt: str, words: Sequence[str], context_length: int = 77
                ) -> tuple[list[int], list[list[int]], list[str]]:
    """(the prompt's untruncated ids with SOT/EOT, each word's token positions, warnings), from the tokenizer alone.
    Raises InterleaveError for an empty prompt, a word absent, empty, inside a longer word, overlapping another
    subject or cut off by the limit."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InterleaveError("The prompt is empty. Write a prompt that names each subject, e.g. 'a dog wearing a hat'.")
    encode = tokenizer.encode
    body = list(encode(prompt))
    full_ids = [tokenizer.sot_token_id] + body + [tokenizer.eot_token_id]
    warnings: list[str] = []
    if len(full_ids) > context_length:
        kept = tokenizer.decode(full_ids[1:context_length - 1]).strip()
        said = (f"the prompt is {len(full_ids)} CLIP tokens; CLIP reads only the first {context_length}, so the text "
                f"after '…{kept[-40:]}' is ignored. Shorten the prompt to keep it all.")
        log.warning(said)
        warnings.append(said)
    glue = word_glue(prompt, encode)
    glued = None if glue is None else [False] + glue + [False]
    plans = plan_positions(prompt, full_ids, list(words), [list(encode(w)) if w else [] for w in words],
                           context_length, glued=glued, warnings=warnings)
    return full_ids, plans, warnings


_DEFAULT_TOKENIZER = []


def default_tokenizer():
    """bigG's tokenizer (open_clip's SimpleTokenizer with its bundled vocabulary: no model, no download)."""
    if not _DEFAULT_TOKENIZER:
        import open_clip

        _DEFAULT_TOKENIZER.append(open_clip.get_tokenizer("ViT-bigG-14"))
    return _DEFAULT_TOKENIZER[0]


def check_prompt_words(prompt: str, words: Sequence[str], tokenizer=None, context_length: int = 77) -> list[str]:
    """Every check `interleave_prompt` makes on the words, before any model is loaded; returns the warnings."""
    return plan_prompt(tokenizer or default_tokenizer(), prompt, words, context_length)[2]


def interleave_prompt(clip, prompt: str, subjects: Sequence[Subject]) -> Prompt:
    """Encode `prompt` with `clip` and substitute every subject at its word's tokens."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InterleaveError("The prompt is empty. Write a prompt that names each subject, e.g. 'a dog wearing a hat'.")
    words = [s.word for s in subjects]
    full_ids, plans, warnings = plan_prompt(clip.tokenizer, prompt, words, clip.context_length)
    features = clip.encode_text(prompt)
    tokens = substitute(features.tokens, plans, [s.embedding for s in subjects], [s.weight for s in subjects])
    placements = [Placement(i, s.word, plans[i], s.weight) for i, s in enumerate(subjects)]
    result = Prompt(prompt, features.pooled, tokens, features.mask, features.ids, placements, warnings)
    log.info("interleaved %s", result.describe())
    return result


def official_positions(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """The official bag-of-ids rule (every occurrence of every id), kept only to document the difference."""
    ids = set(word_ids)
    return [i for i, t in enumerate(prompt_ids) if t in ids]

