"""RULER's two metrics on hand-made predictions."""

from __future__ import annotations

import pytest

from longrecipe.evaluate.metrics import (
    clean_prediction,
    score,
    string_match_all,
    string_match_part,
)


def test_all_counts_the_share_of_references_found():
    refs = ["1234567", "7654321", "5550000", "9999999"]
    assert string_match_all("The numbers are 1234567 and 7654321.", refs) == 50.0
    assert string_match_all("1234567 7654321 5550000 9999999", refs) == 100.0
    assert string_match_all("none of them", refs) == 0.0


def test_part_is_all_or_nothing():
    refs = ["Paris", "the city of Paris"]
    assert string_match_part("It is paris.", refs) == 100.0
    assert string_match_part("It is Lyon.", refs) == 0.0


def test_case_insensitive_both_ways():
    assert string_match_all("ANSWER: QUIET-BEAR", ["quiet-bear"]) == 100.0
    assert string_match_all("answer: quiet-bear", ["Quiet-Bear"]) == 100.0
    assert string_match_part("UUID 0A1B", ["0a1b"]) == 100.0


def test_control_characters_become_newlines_then_strip():
    # A reference split by a control character is not found (it becomes a newline),
    # a tab or NUL around the answer does not matter.
    assert clean_prediction("\x00\t 1234567\x07\r\n") == "1234567"
    assert clean_prediction("12\x0034") == "12\n34"
    assert string_match_all("123\x004567", ["1234567"]) == 0.0
    assert string_match_all("\x1b 1234567 \x1f", ["1234567"]) == 100.0
    # A reference containing a newline matches a prediction whose control char became one.
    assert string_match_all("foo\tbar", ["foo\nbar"]) == 100.0


def test_score_dispatches_and_rejects_bad_input():
    assert score("all", "a b", ["a", "c"]) == 50.0
    assert score("part", "a b", ["a", "c"]) == 100.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("exact", "a", ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("a", [])
