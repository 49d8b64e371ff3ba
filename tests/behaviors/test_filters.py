"""Quality filters on real sentences and responses of the kind SmolLM2-135M actually produces."""

from __future__ import annotations

import pytest

from blsp.behaviors.filters import (
    ECHO,
    ECHO_PREFIX,
    EMPTY,
    REFUSAL,
    TRUNCATED,
    echo_match,
    is_refusal,
    judge,
    normalize_words,
)


def test_normalize_words_drops_case_and_punctuation_keeps_apostrophes_and_unicode():
    assert normalize_words("It's easy to tell the depth of a well.") == [
        "it's", "easy", "to", "tell", "the", "depth", "of", "a", "well",
    ]  # fmt: skip
    assert normalize_words("Kate loves CHINA!!") == ["kate", "loves", "china"]
    assert normalize_words("It\u2019s  Zürich — 2024") == ["it's", "zürich", "2024"]
    assert normalize_words(" ... !? ") == []


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I cannot continue this text.",
        "I\u2019m sorry for your loss. I'm here to help.",
        "As an AI language model, I don't have personal experiences.",
        "I cannot assist with that request.",
        "I'm ready to assist. What's your request?",
        "I apologize, but the text is unclear.",
    ],
)
def test_refusals_are_detected(text):
    assert is_refusal(text)
    assert judge(text, "Four hours of steady work faced us.").reject == REFUSAL


@pytest.mark.parametrize(
    "text",
    [
        "The young boy's eyes lit up with awe as he took in the breathtaking sight.",
        "I cannot wait to see the lake at dawn, when the mist rises off the water.",
        "She was sorry she had missed the train, but the next one came soon.",
    ],
)
def test_ordinary_continuations_are_not_refusals(text):
    assert not is_refusal(text)


@pytest.mark.parametrize(
    ("transcript", "response"),
    [
        ("The birch canoe slid on the smooth planks.", "The birch canoe slid on the smooth planks."),
        ("Kate loves china.", "Kate loves China."),
        ("These days a chicken leg is a rare dish.", "The chicken leg is a rare dish."),
        ("Rice is often served in round bowls", "Rice is often served in round bowls."),
    ],
)
def test_echoes_are_dropped_by_default_and_flagged_on_request(transcript, response):
    assert echo_match(response, transcript).is_echo
    assert judge(response, transcript).reject == ECHO
    v = judge(response, transcript, echo="flag")
    assert v.reject is None and v.flags == [ECHO]


@pytest.mark.parametrize(
    ("transcript", "response"),
    [
        ("Glue the sheet to the dark blue background", "The room was filled with a mix of people."),
        (
            "What joy there is in living.",
            "Life is full of endless possibilities, and joy is the most precious gift.",
        ),
        ("Her purse was full of useless trash.", "The purse was filled with a mix of useless trash."),
    ],
)
def test_real_continuations_are_kept_without_flags(transcript, response):
    v = judge(response, transcript)
    assert v.reject is None and v.flags == []


def test_repeat_then_continue_is_kept_with_echo_prefix_flag():
    transcript = "A yacht slid around the point into the bay"
    response = "The yacht slid around the point into the bay, a scene of pure chaos and utter destruction."
    m = echo_match(response, transcript)
    assert not m.is_echo and m.is_echo_prefix
    assert judge(response, transcript).flags == [ECHO_PREFIX]


def test_empty_and_truncated():
    assert judge("", "Two blue fish swam in the tank.").reject == EMPTY
    assert judge("  ...  ", "Two blue fish swam in the tank.").reject == EMPTY
    v = judge(
        "The fish circled slowly, watching the children press",
        "Two blue fish swam in the tank.",
        truncated=True,
    )
    assert v.reject is None and v.flags == [TRUNCATED]


def test_invalid_echo_policy():
    with pytest.raises(ValueError):
        judge("x y", "a b", echo="keep")
