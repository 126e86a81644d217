"""Generation quality of free-form answers: greedy decoding on held-out records, scored per round (issue 26)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedlora.config import ConfigError, load_config
from fedlora.data import load_examples
from fedlora.evaluate import evaluate, greedy_answers
from fedlora.model import load_model
from tests.conftest import SMALL, lying_evaluator

FREE_FORM = Path(__file__).resolve().parents[1] / "examples" / "freeform.jsonl"
FAST = [*SMALL, f"data.dataset={FREE_FORM}", "data.max_examples=0", "model.quantization=none", "evaluation.max_new_tokens=8"]


@pytest.fixture(scope="module")
def free_form():
    cfg = load_config(None, FAST)
    return cfg, load_model(cfg.model, cfg.lora, [], cfg.federation.seed), load_examples(cfg.data, cfg.federation.seed)


def test_a_free_form_task_is_scored_by_generation_in_the_unit_interval(free_form) -> None:
    cfg, loaded, examples = free_form
    ten = load_config(None, [*FAST, "evaluation.generate_examples=10"]).evaluation
    result = evaluate(loaded.model, loaded.tokenizer, examples[:20], "generation", [], cfg.data.max_length, generation=ten, prompt_format=loaded.prompt_format)
    assert result.generated == 10 and result.examples == 20 and math.isnan(result.accuracy)
    for score in (result.exact_match, result.token_f1, result.rouge_l):
        assert 0.0 <= score <= 1.0


def test_batched_left_padded_answers_equal_answers_decoded_one_by_one(free_form) -> None:
    _, loaded, examples = free_form
    questions = examples[:6]  # records of different lengths: padded in one batch
    batched = greedy_answers(loaded.model, loaded.tokenizer, questions, loaded.prompt_format, 96, 8)
    assert batched == [greedy_answers(loaded.model, loaded.tokenizer, [q], loaded.prompt_format, 96, 8)[0] for q in questions]


def test_the_time_bound_stops_after_the_first_batch_and_says_how_many(free_form) -> None:
    cfg, loaded, examples = free_form
    bounded = load_config(None, [*FAST, "evaluation.generate_examples=20", "evaluation.generate_time_s=1e-6"]).evaluation
    result = evaluate(loaded.model, loaded.tokenizer, examples[:20], "generation", [], cfg.data.max_length, generation=bounded, prompt_format=loaded.prompt_format)
    assert result.generated == 8  # one batch of greedy_answers


def test_choice_tasks_and_a_zero_budget_keep_the_loss_and_decode_nothing(free_form) -> None:
    cfg, loaded, examples = free_form
    off = load_config(None, [*FAST, "evaluation.generate_examples=0"]).evaluation
    for labels, generation in ((sorted({e.response for e in examples[:8]}), cfg.evaluation), ([], off)):
        result = evaluate(loaded.model, loaded.tokenizer, examples[:8], "generation", labels, cfg.data.max_length, generation=generation, prompt_format=loaded.prompt_format)
        assert result.generated == 0 and math.isfinite(result.loss)
        assert all(math.isnan(score) for score in (result.exact_match, result.token_f1, result.rouge_l))


@pytest.mark.parametrize(
    "override",
    ["evaluation.generate_examples=-1", "evaluation.max_new_tokens=0", "evaluation.generate_time_s=-1", "evaluation.max_new_tokens=128"],
)
def test_bad_generation_budgets_are_refused_naming_the_key(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])  # 128 = data.max_length: no room left for the prompt


def test_each_round_reports_the_scores_and_a_liar_cannot_corrupt_them(tmp_path) -> None:
    """Participant 0 claims ROUGE-L 5 and a NaN token F1, participant 1 an infinite exact match: each claim is
    refused alone, and the row averages the others' scores with the weights their counts give them."""
    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from fedlora.aggregate.weights import claimed_average
    from fedlora.cli import simulation_summary

    lies = {0: {"eval_rouge_l": 5.0, "eval_token_f1": math.nan}, 1: {"eval_exact_match": math.inf}}
    reported: dict[int, dict] = {}  # the honest scores each participant computed (the last evaluation)
    lying_app = lying_evaluator(lies, reported)
    cfg = load_config(None, [*FAST, "federation.rounds=1", "train.local_steps=1", "evaluation.generate_examples=4"])
    grid = LocalGrid(lying_app, {p + 1: {"partition-id": p, "num-partitions": 3} for p in range(3)})
    rows = Coordinator(cfg, tmp_path).run(grid)
    assert [row["round"] for row in rows] == [0, 1]

    def honest_average(key: str) -> float:
        kept = [reported[p] for p in sorted(reported) if key not in lies.get(p, {})]
        return claimed_average([m[key] for m in kept], [m["eval_generated"] for m in kept], "capped", 2.0)

    for key in ("eval_exact_match", "eval_token_f1", "eval_rouge_l"):
        assert 0.0 <= rows[-1][key] <= 1.0
        assert rows[-1][key] == pytest.approx(honest_average(key), rel=1e-9), key
    assert math.isnan(rows[-1]["eval_accuracy"]) and np.isfinite(rows[-1]["eval_loss"])
    summary = simulation_summary(rows, 1, tmp_path)  # `fedlora simulate`'s last line: the scores, not a NaN accuracy
    assert f"ROUGE-L {rows[0]['eval_rouge_l']:.3f} -> {rows[-1]['eval_rouge_l']:.3f}" in summary and "accuracy" not in summary
