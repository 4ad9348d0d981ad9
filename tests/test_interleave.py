"""Interleaving on real tokenizer output: contiguous spans, the official bag-of-ids difference, errors."""

import pytest
import torch

from lambda_eclipse.core.errors import InterleaveError
from lambda_eclipse.core.interleave import (
    Subject,
    find_spans,
    interleave_prompt,
    official_positions,
    substitute,
)


def subj(word, value, weight=1.0):
    return Subject(word, torch.full((32,), float(value)), weight)


def full_ids(clip, text):
    return [49406] + clip.word_ids(text) + [49407]


def test_single_token_words_equal_the_official_rule(tiny_clip):
    prompt = "a dog is wearing a hat"
    result = interleave_prompt(tiny_clip, prompt, [subj("dog", 1), subj("hat", 2)])
    ids = full_ids(tiny_clip, prompt)
    assert result.positions == {2: 0, 6: 1}
    assert [p.positions for p in result.placements] == [official_positions(ids, tiny_clip.word_ids(w)) for w in ("dog", "hat")]
    assert torch.equal(result.tokens[0, 2], torch.full((32,), 1.0)) and torch.equal(result.tokens[0, 6], torch.full((32,), 2.0))
    plain = tiny_clip.encode_text(prompt)
    untouched = [i for i in range(77) if i not in (2, 6)]
    assert torch.equal(result.tokens[0, untouched], plain.tokens[0, untouched])
    assert torch.equal(result.pooled, plain.pooled) and torch.equal(result.mask, plain.mask)
    assert "'dog' → token 2" in result.describe()


def test_teddy_bear_does_not_touch_an_unrelated_bear(tiny_clip):
    prompt = "a teddy bear next to a bear"
    ids = full_ids(tiny_clip, prompt)
    result = interleave_prompt(tiny_clip, prompt, [subj("teddy bear", 1)])
    assert result.placements[0].positions == [2, 3]
    assert official_positions(ids, tiny_clip.word_ids("teddy bear")) == [2, 3, 7]  # the official bug
    plain = tiny_clip.encode_text(prompt)
    assert torch.equal(result.tokens[0, 7], plain.tokens[0, 7])


def test_red_car_does_not_touch_red_barn(tiny_clip):
    prompt = "a red car and a red barn"
    result = interleave_prompt(tiny_clip, prompt, [subj("red car", 1)])
    assert result.placements[0].positions == [2, 3]
    assert official_positions(full_ids(tiny_clip, prompt), tiny_clip.word_ids("red car")) == [2, 3, 6]


def test_every_occurrence_and_case_insensitive(tiny_clip):
    result = interleave_prompt(tiny_clip, "A Dog chasing another DOG", [subj("dog", 1)])
    assert result.placements[0].positions == [2, 5]


def test_weights_scale_the_substituted_feature(tiny_clip):
    result = interleave_prompt(tiny_clip, "a dog", [subj("dog", 2, weight=0.5)])
    assert torch.equal(result.tokens[0, 2], torch.full((32,), 1.0))


def test_three_subjects(tiny_clip):
    result = interleave_prompt(tiny_clip, "a dog wearing a hat and sunglasses on a beach", [subj("dog", 1), subj("hat", 2), subj("sunglasses", 3)])
    assert result.positions == {2: 0, 5: 1, 7: 2}


def test_find_spans_pure():
    assert find_spans([1, 2, 3, 2, 3], [2, 3]) == [1, 3]
    assert find_spans([1, 2, 3], []) == []
    assert find_spans([1, 2], [1, 2, 3]) == []


def test_missing_word_names_the_prompt_words(tiny_clip):
    with pytest.raises(InterleaveError) as err:
        interleave_prompt(tiny_clip, "a cat wearing sunglasses", [subj("glasses", 1)])
    msg = str(err.value)
    assert "'glasses' is not in the prompt" in msg and "sunglasses" in msg and "a, cat, wearing, sunglasses" in msg


def test_plural_is_not_a_match(tiny_clip):
    with pytest.raises(InterleaveError, match="Did you mean 'dogs'"):
        interleave_prompt(tiny_clip, "two dogs", [subj("dog", 1)])


def test_overlapping_subjects(tiny_clip):
    with pytest.raises(InterleaveError, match="both claim token 3"):
        interleave_prompt(tiny_clip, "a teddy bear", [subj("bear", 1), subj("teddy bear", 2)])


def test_word_past_the_token_limit(tiny_clip):
    prompt = "a " * 80 + "dog"
    with pytest.raises(InterleaveError, match="past CLIP's 77-token limit"):
        interleave_prompt(tiny_clip, prompt, [subj("dog", 1)])
    # A word straddling the limit counts as cut off too.
    prompt = "a " * 74 + "teddy bear"
    with pytest.raises(InterleaveError, match="77-token limit"):
        interleave_prompt(tiny_clip, prompt, [subj("teddy bear", 1)])
    # The last usable position (75) still works.
    result = interleave_prompt(tiny_clip, "a " * 74 + "dog", [subj("dog", 1)])
    assert result.placements[0].positions == [75]


def test_empty_inputs(tiny_clip):
    with pytest.raises(InterleaveError, match="empty word"):
        interleave_prompt(tiny_clip, "a dog", [subj("  ", 1)])
    with pytest.raises(InterleaveError, match="prompt is empty"):
        interleave_prompt(tiny_clip, "   ", [])


def test_no_subjects_is_a_plain_prompt(tiny_clip):
    result = interleave_prompt(tiny_clip, "a dog", [])
    assert torch.equal(result.tokens, tiny_clip.encode_text("a dog").tokens)
    assert "no subject" in result.describe()


def test_wrong_embedding_width():
    with pytest.raises(InterleaveError, match="different CLIP"):
        substitute(torch.zeros(1, 77, 32), [[2]], [torch.zeros(1280)])
