"""Scores of a generated answer against its reference, each in [0, 1].

Exact match and token F1 follow the SQuAD evaluation script (Rajpurkar et al. 2016): both texts
are normalised (lower case, punctuation and the articles a/an/the removed, whitespace collapsed)
so "The patient has diabetes." matches "the patient has diabetes"; F1 is over the bag of
normalised tokens, so it credits a partly right answer. ROUGE-L (Lin 2004) is Google's
`rouge-score` package (the one the Hugging Face `evaluate` metric wraps), F-measure of the longest
common subsequence: unlike F1 it rewards the answer's word order.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall over the two bags of normalised tokens (1 when both are empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge_scorer():  # built once: the package compiles its tokeniser per scorer
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure, with `rouge-score`'s own tokeniser (lower case, alphanumeric tokens) and no stemming."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def mean_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Each metric of METRICS averaged over the (prediction, reference) pairs; NaN for all when there are none."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return dict.fromkeys(METRICS, float("nan"))
    return {name: sum(map(score, predictions, references)) / len(predictions) for name, score in METRICS.items()}
