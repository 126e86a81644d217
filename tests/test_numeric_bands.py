"""data.numeric_bins (fedlora/data.py `banded`): each number of a table record is written with its band among
the participant's own training records, the cuts taken from those records only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedlora.config import ConfigError, load_config
from fedlora.data import band_cuts, banded, load_examples
from fedlora.partition import split_holdout


def test_numbers_get_the_band_of_the_training_records_and_words_stay_as_they_are() -> None:
    cfg = load_config(None, ["data.dataset=hypertension", "data.numeric_bins=5"]).data
    shard = split_holdout(load_examples(cfg), cfg.test_fraction, 0)
    train, test = banded(shard.train, shard.test, cfg)
    ages = np.array([e.fields["Age"] for e in shard.train], dtype=float)
    cuts = np.quantile(ages, [0.2, 0.4, 0.6, 0.8])
    words = ["very low", "low", "mid", "high", "very high"]
    for original, written in zip([*shard.train[:20], *shard.test[:20]], [*train[:20], *test[:20]]):
        age = original.fields["Age"]
        assert f"Age: {age} ({words[int(np.searchsorted(cuts, age, side='right'))]})" in written.prompt
        assert f"BP_History: {original.fields['BP_History']};" in written.prompt  # a word column keeps its value alone
        assert written.response == original.response and written.fields == original.fields
        assert written.request[0][1].startswith(written.prompt.split("\n")[1])  # the chat turn says the same record


def test_the_cuts_come_from_the_training_records_alone() -> None:
    cfg = load_config(None, ["data.dataset=diabetes", "data.numeric_bins=5"]).data
    shard = split_holdout(load_examples(cfg), cfg.test_fraction, 0)
    extreme = [dataclasses.replace(e, fields=e.fields | {"Glucose": 10_000}) for e in shard.test]
    _, test = banded(shard.train, extreme, cfg)
    assert all("Glucose: 10000 (very high)" in e.prompt for e in test)
    moved_train, _ = banded([*shard.train[:-1], extreme[0]], shard.test, cfg)  # a training record moves the cuts
    assert band_cuts(shard.train, ["Glucose"], 5)["Glucose"][-1] <= band_cuts([*shard.train[:-1], extreme[0]], ["Glucose"], 5)["Glucose"][-1]
    assert moved_train[-1].prompt.count("Glucose: 10000 (very high)") == 1


def test_three_bands_none_and_columns_with_few_values() -> None:
    cfg = load_config(None, ["data.dataset=diabetes", "data.numeric_bins=3"]).data
    shard = split_holdout(load_examples(cfg), cfg.test_fraction, 0)
    train, _ = banded(shard.train, shard.test, cfg)
    assert all(any(f"({w})" in e.prompt for w in ("low", "mid", "high")) for e in train)
    assert "very" not in train[0].prompt
    plain = dataclasses.replace(cfg, numeric_bins=0)
    assert banded(shard.train, shard.test, plain) == (shard.train, shard.test)  # as load_examples wrote them
    assert band_cuts([dataclasses.replace(e, fields={"flag": i % 2}) for i, e in enumerate(shard.train)], ["flag"], 5) == {}
    with pytest.raises(ConfigError, match="data.numeric_bins"):
        load_config(None, ["data.numeric_bins=4"])
