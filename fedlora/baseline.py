"""The linear baseline: a logistic regression on the pooled raw columns of a simulated federation's table.

A federation that turns records into text and fine-tunes a language model should at least learn
what a linear model learns from the table's own numbers. This baseline pools every participant's
training records, which no deployment may do, so it exists in simulation only: it is the
researcher's yardstick, reported beside the federation's held-out accuracy, on exactly the
participants' held-out splits. Numeric columns are imputed (median) and standardised,
categorical ones imputed (most frequent) and one-hot encoded; scikit-learn does all of it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from fedlora.config import Config
from fedlora.data import Example, label_column, load_examples
from fedlora.partition import shard_for

log = logging.getLogger("fedlora")
BASELINE_FILE = "baseline.json"


@dataclass(frozen=True)
class Baseline:
    accuracy: float  # on every participant's held-out split, pooled (each record counts once)
    train_records: int
    test_records: int
    columns: int  # raw columns used


def linear_baseline(train: list[Example], test: list[Example], label: str) -> Baseline:
    """Fit on `train`'s raw columns (all but `label`), score on `test`: the answer is the class."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    if not train or not test:
        raise ValueError("the linear baseline needs training and held-out records")
    frames = [pd.DataFrame([e.fields for e in part]).drop(columns=[label], errors="ignore") for part in (train, test)]
    observed = [c for c in frames[0].columns if frames[0][c].notna().any()]  # a column with no value says nothing
    frames = [frame.reindex(columns=observed) for frame in frames]
    numeric = [c for c in frames[0].columns if pd.api.types.is_numeric_dtype(frames[0][c])]
    categorical = [c for c in frames[0].columns if c not in numeric]
    features = ColumnTransformer([
        ("numeric", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
        ("categorical", make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")), categorical),
    ])
    model = make_pipeline(features, LogisticRegression(max_iter=2000))
    model.fit(frames[0].astype({c: str for c in categorical}), [e.response for e in train])
    predicted = model.predict(frames[1].astype({c: str for c in categorical}))
    accuracy = float(sum(p == e.response for p, e in zip(predicted, test, strict=True)) / len(test))
    return Baseline(accuracy, len(train), len(test), len(numeric) + len(categorical))


def federation_baseline(cfg: Config) -> Baseline | None:
    """The linear baseline on the simulated participants' own shards; None when the records have no raw
    columns (JSONL instructions) or the task is no classification of a table."""
    label = label_column(cfg.data)
    if label is None:
        return None
    examples = load_examples(cfg.data, cfg.federation.seed)
    n, fed = cfg.federation.participants, cfg.federation
    shards = [shard_for(examples, cfg.data.partition, n, p, cfg.data.test_fraction, fed.seed) for p in range(n)]
    return linear_baseline([e for s in shards for e in s.train], [e for s in shards for e in s.test], label)


def announce_baseline(cfg: Config) -> Baseline | None:
    """Compute the baseline and say it, before the federation starts: the yardstick for what follows."""
    baseline = federation_baseline(cfg)
    if baseline is None:
        log.info("linear baseline: none (the records have no raw columns)")
    else:
        log.info(
            "linear baseline (logistic regression on all participants' raw columns, pooled centrally: simulation only): "
            "held-out accuracy %.3f", baseline.accuracy,
        )
    return baseline


def keep_baseline(baseline: Baseline, run_dir: Path) -> None:
    """Keep the baseline beside the run's metrics (`baseline.json`)."""
    document = {"model": "logistic regression on the pooled raw columns", **asdict(baseline)}
    (run_dir / BASELINE_FILE).write_text(json.dumps(document, indent=2) + "\n")
