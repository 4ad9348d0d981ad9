"""Whole-word matching, warnings carried to the report, and the tokenizer-only check (no model loaded)."""

from __future__ import annotations

import pytest

from lambda_eclipse.core.errors import InterleaveError
from lambda_eclipse.core.interleave import check_prompt_words, default_tokenizer, plan_prompt


def test_digit_words_match_whole_words_only():
    tok = default_tokenizer()
    _, plans, _ = plan_prompt(tok, "a w10 dog and a w1 cat", ["w1", "w10"])
    # 'w1' is tokens 'w','1' at positions 7-8 (after SOT a w 1 0 dog and a); never inside 'w10' (2-4)
    assert plans[1] == [2, 3, 4]
    assert plans[0] == [8, 9]
    with pytest.raises(InterleaveError, match="only as part of a longer word"):
        plan_prompt(tok, "a photo of w10 on the grass", ["w1"])


def test_piece_of_a_longer_word_is_not_the_subject():
    tok = default_tokenizer()
    ids = tok.encode("sunglasses")
    if len(ids) > 1:  # BPE splits it: the last piece must not count as a separate word
        last = tok.decoder[ids[-1]].replace("</w>", "")
        with pytest.raises(InterleaveError, match="only as part of a longer word"):
            plan_prompt(tok, "a dog wearing sunglasses", [last])
    _, plans, _ = plan_prompt(tok, "a dog wearing sunglasses, glasses too", ["glasses"])
    assert len(plans[0]) == len(tok.encode("glasses"))


def test_punctuation_is_not_glue():
    tok = default_tokenizer()
    _, plans, _ = plan_prompt(tok, "a dog, a hat.", ["dog", "hat"])
    assert plans == [[2], [5]]


def test_long_prompt_warns_and_the_warning_is_returned():
    prompt = "a dog " + "very " * 90 + "happy"
    warnings = check_prompt_words(prompt, ["dog"])
    assert len(warnings) == 1 and "CLIP reads only the first 77" in warnings[0]
    with pytest.raises(InterleaveError, match="past CLIP's 77-token limit"):
        check_prompt_words("a " + "very " * 90 + "happy dog", ["dog"])


def test_checks_need_no_model(monkeypatch):
    import lambda_eclipse.core.clip as clip

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(clip, "load_clip_towers", no_model, raising=False)
    with pytest.raises(InterleaveError, match="not in the prompt"):
        check_prompt_words("a cat on a mat", ["dog"])
    with pytest.raises(InterleaveError, match="both claim token"):
        check_prompt_words("a red car", ["red car", "car"])
    with pytest.raises(InterleaveError, match="prompt is empty"):
        check_prompt_words("  ", ["dog"])
