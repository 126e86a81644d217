"""The linear baseline on the pooled raw columns (fedlora/baseline.py): the yardstick a simulation reports."""

from __future__ import annotations

import pytest

from fedlora.baseline import federation_baseline, linear_baseline
from fedlora.config import load_config
from fedlora.data import Example, label_column


def records(n: int, flip: bool = False) -> list[Example]:
    """A table whose class is whether `dose` (numeric) exceeds 5, with a categorical column and a gap."""
    out = []
    for i in range(n):
        dose = (i * 7) % 11
        answer = ("yes" if dose > 5 else "no") if not flip else ("no" if dose > 5 else "yes")
        fields = {"dose": float(dose) if i % 13 else None, "ward": "A" if i % 2 else "B", "Outcome": answer}
        out.append(Example(f"record {i}", answer, fields))
    return out


def test_a_linear_rule_in_the_raw_columns_is_learned_and_the_label_column_is_not_a_feature() -> None:
    baseline = linear_baseline(records(200), records(60), "Outcome")
    assert baseline.accuracy >= 0.9 and baseline.columns == 2 and (baseline.train_records, baseline.test_records) == (200, 60)
    # trained on the opposite rule, it is wrong wherever the dose is known: it never read the answer from the label column
    assert linear_baseline(records(200, flip=True), records(60), "Outcome").accuracy <= 0.1


def test_a_table_task_gets_its_baseline_and_instructions_get_none(tmp_path) -> None:
    cfg = load_config(None, ["data.dataset=diabetes", "federation.participants=3"])
    assert label_column(cfg.data) == "Outcome"
    baseline = federation_baseline(cfg)
    assert baseline is not None and 0.6 < baseline.accuracy <= 1.0 and baseline.columns == 8
    path = tmp_path / "notes.jsonl"
    path.write_text('{"instruction": "Say hi", "output": "hi"}\n' * 4)
    assert federation_baseline(load_config(None, [f"data.dataset={path}"])) is None


def test_no_records_no_baseline() -> None:
    with pytest.raises(ValueError, match="needs training and held-out records"):
        linear_baseline([], records(5), "Outcome")
