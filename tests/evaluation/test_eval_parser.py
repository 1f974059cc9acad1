"""The documented multiple-choice answer parser (evaluation.answer_parser)."""

from __future__ import annotations

import pytest

from slidechat.evaluation.answer_parser import parse_choice

OPTIONS = {"A": "Adenocarcinoma", "B": "Squamous cell carcinoma", "C": "Carcinoma", "D": ""}

CASES = [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("[b]", "B"), ("B.", "B"), ("B)", "B"), ("**C**", "C"), (" a. ", "A"),
    ("Answer: B", "B"), ("answer: (c)", "C"), ("The answer is (B).", "B"), ("the answer is b", "B"),
    ("The correct answer is C", "C"), ("Option C", "C"), ("I choose C", "C"), ("the answer is a", "A"),
    ("B. Squamous cell carcinoma", "B"), ("C) carcinoma", "C"), ("B: squamous", "B"),
    ("Squamous cell carcinoma", "B"), ("adenocarcinoma.", "A"), ("It is a carcinoma", "C"),
    ("The slide shows squamous cell carcinoma.", "B"),  # 'carcinoma' (C) is inside B's text: longest wins
    ("squamous cell carcinoma (B)", "B"), ("Based on the slide, (B) is correct", "B"), ("It is C.", "C"),
    ("answer is A adenocarcinoma", "A"), ("The answer is a adenocarcinoma", "A"),
]
UNPARSEABLE = [
    "", "   ", None, "I do not know", "The answer is a tumour",  # 'a' is an article here
    "D",  # option D is empty, so D is not a valid answer
    "Answer: E",
    "adenocarcinoma or squamous cell carcinoma",  # two different options named
    "B or C",
]


@pytest.mark.parametrize("text,expected", CASES)
def test_parser_maps_free_text_to_letter(text, expected):
    assert parse_choice(text, OPTIONS) == expected


@pytest.mark.parametrize("text", UNPARSEABLE)
def test_parser_returns_none_when_unparseable(text):
    assert parse_choice(text, OPTIONS) is None


def test_parser_without_options_accepts_letters_only():
    assert parse_choice("(d)", None) == "D"
    assert parse_choice("Answer: C", None) == "C"
    assert parse_choice("adenocarcinoma", None) is None


def test_training_answer_format_is_parsed():
    # training/synth_data.py supervises answers as "<option text> (<letter>)"
    opts = {"A": "upper-left", "B": "upper-right", "C": "lower-left", "D": "lower-right"}
    assert parse_choice("lower-left (C)", opts) == "C"
    assert parse_choice("upper-right", opts) == "B"
