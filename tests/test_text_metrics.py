"""Scores of generated answers against references (fedlora/text_metrics.py), checked by hand."""

from __future__ import annotations

import math

import pytest

from fedlora.text_metrics import exact_match, mean_scores, normalize_answer, rouge_l, token_f1


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces() -> None:
    assert normalize_answer("  The Patient  has\tdiabetes. ") == "patient has diabetes"
    assert normalize_answer("An ACE-inhibitor!") == "aceinhibitor"  # SQuAD deletes punctuation, it does not split on it


def test_exact_match_is_one_only_for_the_same_normalised_answer() -> None:
    assert exact_match("the patient does not smoke", "The patient does not smoke.") == 1.0
    assert exact_match("The patient smokes.", "The patient does not smoke.") == 0.0


def test_token_f1_counts_the_shared_bag_of_tokens() -> None:
    # prediction: patient smokes (2 tokens); reference: patient does not smoke (4): 1 shared
    assert token_f1("The patient smokes.", "The patient does not smoke.") == pytest.approx(2 * (1 / 2) * (1 / 4) / (1 / 2 + 1 / 4))
    assert token_f1("no no", "no") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # a repeated token is shared once
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x y", "z") == 0.0


def test_rouge_l_rewards_the_longest_common_subsequence_in_order() -> None:
    # LCS of "the cat sat on the mat" (6) and "the cat on the mat" (5) is 5: P = 5/6, R = 1, F = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("mat on cat", "cat on mat") == pytest.approx(1 / 3)  # same bag, order lost: LCS 1 of 3
    assert token_f1("mat on cat", "cat on mat") == 1.0  # where F1 sees no difference


def test_mean_scores_average_over_pairs_and_are_nan_without_any() -> None:
    scores = mean_scores(["The patient smokes.", "The patient is 61 years old."], ["The patient smokes.", "The patient is 62 years old."])
    assert scores["exact_match"] == 0.5
    assert scores["token_f1"] == pytest.approx((1 + 4 / 5) / 2)  # patient is years old shared: P = R = 4/5
    assert scores["rouge_l"] == pytest.approx((1 + 5 / 6) / 2)  # rouge-score keeps "the": LCS 5 of 6 tokens
    assert all(math.isnan(value) for value in mean_scores([], []).values())
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        mean_scores(["a", "b"], ["a"])
