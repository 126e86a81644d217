"""[distillation] (fedlora/distill.py): predictions on public prompts travel in the update vector, come back as
soft targets, and pull local training towards them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator, initial_adapter
from fedlora.adapter import adapter_vector, load_adapter_vector
from fedlora.config import Config, ConfigError, load_config
from fedlora.data import Example
from fedlora.distill import encode_block, file_sha256, load_public_prompts, predict, soft_targets, split_upload
from participant.app import app
from participant.runtime import ParticipantRuntime, get_runtime, train_round
from participant.site import Refusal
from tests.conftest import SMALL

PUBLIC = Path(__file__).resolve().parents[1] / "examples" / "data" / "diabetes-public.csv"
SHA = file_sha256(PUBLIC)
PROMPTS = 8
DISTIL = [
    *SMALL, "model.task=classification", "lora.mode=frozen-a", f"distillation.public_data={PUBLIC}",
    f"distillation.public_sha256={SHA}", f"distillation.max_prompts={PROMPTS}",
]

GENERATION = [*DISTIL, "model.task=generation"]  # diabetes as a causal LM answering "no" or "yes"
FREE_FORM = ["model.task=generation", f"data.dataset={PUBLIC.parent.parent / 'freeform.jsonl'}"]


def nodes(participants: int) -> dict[int, dict]:
    return {p + 1: {"partition-id": p, "num-partitions": participants} for p in range(participants)}


def run(tmp_path: Path, *overrides: str) -> tuple[Coordinator, list[dict]]:
    cfg = load_config(None, [*DISTIL, *overrides])
    coordinator = Coordinator(cfg, tmp_path)
    return coordinator, coordinator.run(LocalGrid(app, nodes(cfg.federation.participants)))


def predictions(runtime: ParticipantRuntime, cfg: Config, prompts: list[Example], temperature: float = 1.0) -> np.ndarray:
    """What the site would send for `prompts` (unscaled): softmax of its scores at `temperature`."""
    loaded = runtime.loaded
    return predict(
        loaded.model, loaded.tokenizer, prompts, cfg.model.task, loaded.label_names, cfg.data.max_length, temperature,
        prompt_format=loaded.prompt_format,
    )


def kl(target: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.sum(target * (np.log(target + 1e-12) - np.log(predicted + 1e-12))) / len(target))


def test_the_block_is_bounded_and_its_mean_gives_back_the_mean_predictions() -> None:
    rng = np.random.default_rng(0)
    predictions = [rng.dirichlet(np.ones(3), size=PROMPTS) for _ in range(4)]
    blocks = [encode_block(p, 0.5) for p in predictions]
    assert max(np.linalg.norm(b) for b in blocks) <= 0.5 + 1e-6
    np.testing.assert_allclose(soft_targets(np.mean(blocks, axis=0), PROMPTS, 3, 0.5), np.mean(predictions, axis=0), atol=1e-6)
    noisy = soft_targets(np.full(PROMPTS * 3, -1.0), PROMPTS, 3, 0.5)  # noise can leave a row with no mass
    np.testing.assert_allclose(noisy, 1 / 3)


def round_targets(run_dir: Path, server_round: int) -> np.ndarray:
    """The soft targets a round produced, from its checkpoint (what the next round's instruction carries)."""
    from coordinator.checkpoint import VERSION_CHECKPOINTS, load_checkpoint

    return np.asarray(load_checkpoint(run_dir / VERSION_CHECKPOINTS / f"round-{server_round:04d}.npz")["soft_targets"])


@pytest.mark.slow  # two federations of two rounds per task
@pytest.mark.parametrize("task", ["classification", "generation"])  # diabetes: two classes, or the answers "no" and "yes"
def test_the_secure_sum_of_prediction_blocks_is_their_plaintext_sum(tmp_path: Path, task: str) -> None:
    plain, rows = run(tmp_path / "plain", f"model.task={task}")
    secure, secure_rows = run(tmp_path / "secure", f"model.task={task}", "secagg.enabled=true")
    assert "secagg" in secure_rows[-1] and "secagg" not in rows[-1]
    assert secure_rows[1]["distillation"]["block_size"] == PROMPTS * 2
    # Both coordinators turn their aggregate's block into targets; the secure one only ever held bucket sums.
    np.testing.assert_allclose(round_targets(tmp_path / "secure", 1), round_targets(tmp_path / "plain", 1), atol=1e-5)
    # Round 2 trained towards them, under a binding that includes their hash (every member was sent the same).
    assert secure_rows[-1]["applied"] and secure_rows[-1]["distillation"]["soft_targets_sent"] and secure_rows[-1]["distill_loss"] > 0
    np.testing.assert_allclose(secure.soft_targets, plain.soft_targets, atol=1e-4)
    # ... and round 1's are the mean of what each site predicted, recomputed here in the clear.
    cfg = load_config(None, [*DISTIL, f"model.task={task}"])
    blocks, weights = [], []
    for node in nodes(3).values():
        runtime = get_runtime(cfg, node, own_rank=True)
        upload, metrics = train_round(runtime, cfg, initial_adapter(cfg).vector, 1)
        blocks.append(split_upload(upload, PROMPTS * 2)[1])
        weights.append(metrics["num-examples"])
    mean = np.average(blocks, axis=0, weights=weights)
    expected = soft_targets(mean, PROMPTS, 2, cfg.distillation.prediction_clip)
    np.testing.assert_allclose(round_targets(tmp_path / "plain", 1), expected, atol=1e-5)


def test_a_site_whose_public_prompts_differ_refuses(tmp_path: Path) -> None:
    other = tmp_path / "public.csv"
    shutil.copy(PUBLIC, other)
    other.write_text(other.read_text().replace("\n4,", "\n5,", 1))
    cfg = load_config(None, [*DISTIL, f"distillation.public_data={other}"])
    runtime = get_runtime(cfg, nodes(3)[1], own_rank=True)
    start, _ = adapter_vector(runtime.loaded.model)
    with pytest.raises(Refusal, match=f"refuses round 1: distillation.public_sha256: .* have sha256 {file_sha256(other)}, but the run names {SHA}"):
        train_round(runtime, cfg, start, 1)
    with pytest.raises(ValueError, match="distillation.public_sha256"):  # the coordinator checks its own copy too
        Coordinator(cfg, tmp_path / "run")
    missing = load_config(None, [*DISTIL, f"distillation.public_data={tmp_path / 'gone.csv'}"])
    with pytest.raises(Refusal, match="gone.csv does not exist here"):
        train_round(runtime, missing, start, 1)


def test_soft_targets_pull_the_sites_predictions_towards_them() -> None:
    cfg = load_config(None, [*DISTIL, "distillation.weight=20", "train.local_steps=6", "distillation.temperature=1"])
    runtime = get_runtime(cfg, nodes(3)[1], own_rank=True)
    prompts = load_public_prompts(cfg)
    start, _ = adapter_vector(runtime.loaded.model)
    before = predictions(runtime, cfg, prompts)
    target = np.tile([[0.05, 0.95]], (PROMPTS, 1)).astype(np.float32)  # far from what the sites' data teach
    _, metrics = train_round(runtime, cfg, start, 2, soft_targets=target)
    pulled = predictions(runtime, cfg, prompts)
    _, plain_metrics = train_round(runtime, cfg, start, 2)  # the same round without targets (round 1 of a run)
    alone = predictions(runtime, cfg, prompts)
    assert metrics["distill_loss"] > 0 and "distill_loss" not in plain_metrics
    assert kl(target, pulled) < 0.5 * min(kl(target, before), kl(target, alone))
    with pytest.raises(ValueError, match="soft targets"):
        train_round(runtime, cfg, start, 2, soft_targets=target[:3])


def test_prediction_only_sends_predictions_alone_and_sites_keep_their_adapters(tmp_path: Path) -> None:
    cfg = load_config(None, [*DISTIL, "distillation.variant=prediction-only"])
    runtime = get_runtime(cfg, nodes(3)[1], own_rank=True)
    start, _ = adapter_vector(runtime.loaded.model)
    upload, metrics = train_round(runtime, cfg, start, 1)
    assert upload.size == PROMPTS * 2 == metrics["distill_block"]  # no adapter coordinate leaves the site
    coordinator, rows = run(tmp_path, "distillation.variant=prediction-only")
    np.testing.assert_array_equal(coordinator.adapter.vector, initial_adapter(coordinator.cfg).vector)  # never moved: nothing to move it
    assert [row["distillation"]["adapter_size"] for row in rows[1:]] == [0, 0]
    assert [row["distillation"]["soft_targets_sent"] for row in rows[1:]] == [False, True]
    assert rows[-1]["applied"] and rows[-1]["distill_loss"] > 0
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]  # each site evaluates its own trained adapter


@pytest.mark.slow  # a secure federation of three rounds
def test_prediction_only_runs_every_round_under_secure_aggregation(tmp_path: Path) -> None:
    """The global adapter never moves in prediction-only, so every round trains from the same adapter: a site's
    replay record (participant/masked.py) must tell another round from a replayed one."""
    _, rows = run(tmp_path, "distillation.variant=prediction-only", "secagg.enabled=true", "federation.rounds=3")
    assert [row["applied"] for row in rows[1:]] == [True, True, True] and not any(row["skipped"] for row in rows[1:])


@pytest.mark.slow  # two base models in one federation
def test_prediction_only_sites_on_two_different_base_models_learn_from_each_other(tmp_path: Path) -> None:
    """Sites 1 and 2 hold MiniLM, site 0 the tiny Llama: no parameter is shared, only predictions, so the
    bases may differ; each trains and serves its own adapter on its own base."""
    two_bases = ['simulation.site_models=["1=builtin:minilm","2=builtin:minilm"]', "distillation.variant=prediction-only"]
    coordinator, rows = run(tmp_path, *two_bases)
    assert [row["applied"] for row in rows[1:]] == [True, True] and not any(row["skipped"] for row in rows[1:])
    assert rows[-1]["distill_loss"] > 0 and rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    cfg = load_config(None, [*DISTIL, *two_bases])
    minilm, llama = (get_runtime(cfg, nodes(3)[p], own_rank=True) for p in (2, 1))
    assert minilm.layout.size != llama.layout.size  # two adapters that could never be averaged
    with pytest.raises(ConfigError, match="simulation.site_models"):
        load_config(None, [*DISTIL, two_bases[0]])  # parameter averaging needs one base


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ([f"distillation.public_data={PUBLIC}"], "distillation.public_sha256"),
        ([*DISTIL, "distillation.public_sha256=abc"], "distillation.public_sha256"),
        ([*DISTIL, "distillation.variant=teacher"], "distillation.variant"),
        ([*DISTIL, *FREE_FORM], "data.label_names: .*free-form answers, which give no bounded candidate set"),
        ([*DISTIL, "distillation.prediction_clip=10"], "distillation.prediction_clip: 10 leaves nothing"),
        ([*DISTIL, "distillation.temperature=0"], "distillation.temperature"),
        ([*DISTIL, "distillation.max_prompts=0"], "distillation.max_prompts"),
        ([*DISTIL, "privacy.local_noise_multiplier=1"], "distillation.public_data: .*DP-SGD"),
        ([*GENERATION, "privacy.local_noise_multiplier=1"], "distillation.public_data: .*DP-SGD"),
        ([*DISTIL, "distillation.variant=prediction-only", "federation.personalization=finetune:2"], "federation.personalization"),
    ],
)
def test_a_bad_distillation_setting_is_refused_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["model.task=classification", *overrides])


def asked_and_said(prompt: Example, answer: str, tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    """The prompt's tokens and the answer's (to its end marker), written out here from each format's definition:
    the built-in '### Answer' text after BOS, then the answer and EOS; or what the chat template renders."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if not chat:
        return [tokenizer.bos_token_id, *ids(prompt.prompt)], [*ids(answer), tokenizer.eos_token_id]
    messages = [{"role": role, "content": content} for role, content in prompt.request]
    asked = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    said = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    assert said.startswith(asked)
    return ids(asked), ids(said[len(asked) :])


@pytest.mark.parametrize("base", ["builtin:tiny-llama", "builtin:tiny-llama-chat"])
def test_a_generation_site_predicts_softmax_of_each_answer_choices_log_likelihood_given_the_prompt(base: str) -> None:
    """Computed here one prompt and one answer at a time, in the format the run trains in (built-in, or the
    base's chat template): no batching, no padding."""
    import torch

    cfg = load_config(None, [*GENERATION, f"model.name={base}"])
    runtime = get_runtime(cfg, nodes(3)[1], own_rank=True)
    loaded, prompts = runtime.loaded, load_public_prompts(cfg)
    assert loaded.label_names == ["no", "yes"] and (loaded.prompt_format.name == "chat-template") == base.endswith("chat")
    direct = np.zeros((PROMPTS, 2))
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            for column, answer in enumerate(loaded.label_names):
                asked, said = asked_and_said(prompt, answer, loaded.tokenizer, base.endswith("chat"))
                assert len(asked) + len(said) <= cfg.data.max_length  # nothing truncated, so the two must agree exactly
                logits = loaded.model(input_ids=torch.tensor([asked + said])).logits[0].float()
                logprobs = torch.log_softmax(logits[len(asked) - 1 : -1], dim=-1)
                direct[row, column] = logprobs.gather(-1, torch.tensor(said).unsqueeze(-1)).sum().item()
    for temperature in (1.0, 2.0):
        predicted = predictions(runtime, cfg, prompts, temperature)
        np.testing.assert_allclose(predicted.sum(axis=1), 1.0, atol=1e-6)
        expected = np.exp(direct / temperature) / np.exp(direct / temperature).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(predicted, expected, atol=1e-4)


def test_soft_targets_pull_a_generation_sites_answer_distribution_towards_them() -> None:
    """The untrained model answers "yes" (~0.99), its records teach "no" (~0.99 after these steps): targets
    between the two are far from both. A small lr, as Adam's first steps flip a yes/no answer readily."""
    overrides = ["distillation.weight=5", "train.local_steps=8", "train.lr=1e-3", "distillation.temperature=1"]
    cfg = load_config(None, [*GENERATION, *overrides])
    runtime = get_runtime(cfg, nodes(3)[1], own_rank=True)
    prompts = load_public_prompts(cfg)
    start = initial_adapter(cfg).vector
    load_adapter_vector(runtime.loaded.model, start, runtime.layout)
    before = predictions(runtime, cfg, prompts)
    target = np.tile([[0.3, 0.7]], (PROMPTS, 1)).astype(np.float32)
    _, metrics = train_round(runtime, cfg, start, 2, soft_targets=target)
    pulled = predictions(runtime, cfg, prompts)
    _, plain_metrics = train_round(runtime, cfg, start, 2)  # the same round without targets
    alone = predictions(runtime, cfg, prompts)
    assert metrics["distill_loss"] > 0 and "distill_loss" not in plain_metrics
    assert kl(target, pulled) < 0.5 * min(kl(target, before), kl(target, alone))


def test_a_generation_federation_distils_over_its_answer_choices_and_may_send_predictions_alone(tmp_path: Path) -> None:
    _, rows = run(tmp_path / "averaging", "model.task=generation")
    assert [row["distillation"]["classes"] for row in rows[1:]] == [2, 2] and rows[-1]["distillation"]["soft_targets_sent"]
    assert rows[-1]["applied"] and rows[-1]["distill_loss"] > 0
    _, alone = run(tmp_path / "prediction-only", "model.task=generation", "distillation.variant=prediction-only")
    assert [row["distillation"]["adapter_size"] for row in alone[1:]] == [0, 0] and alone[-1]["distill_loss"] > 0
    assert alone[-1]["eval_loss"] != alone[0]["eval_loss"]  # each site trained and evaluates its own adapter


def test_a_generation_run_distils_over_the_answer_choices_it_states_or_refuses_free_form_answers() -> None:
    from fedlora.distill import PredictionBlock

    stated = load_config(None, [*DISTIL, *FREE_FORM, 'data.label_names=["no","yes"]'])  # the run names its choices
    assert PredictionBlock.of(stated, len(stated.data.label_names)).size == PROMPTS * 2
    with pytest.raises(ValueError, match="free-form answers, so there is no bounded candidate set"):
        PredictionBlock.of(load_config(None, GENERATION), 0)  # a table whose answers turned out too many to be choices


def test_a_secure_instance_binding_other_soft_targets_is_refused() -> None:
    from fedlora.config import PrivacySection, SecaggSection
    from fedlora.secagg.plan import RunBinding, round_context
    from participant.terms import Terms, context_contradictions, parse_context

    held = Terms.of(SecaggSection(enabled=True), PrivacySection(), 1.0, RunBinding("c" * 64, "a" * 64, "t" * 64))
    assert Terms.from_dict(held.to_dict()) == held
    told = round_context(2, 1.0, binding=RunBinding("c" * 64, "a" * 64, "u" * 64))
    problems = context_contradictions(parse_context(told)[0], held, 2, told)
    assert len(problems) == 1 and "soft targets" in problems[0]
    same = round_context(2, 1.0, binding=held.binding)
    assert context_contradictions(parse_context(same)[0], held, 2, same) == []
    assert "targets_sha256" not in round_context(2, 1.0, binding=RunBinding("c" * 64, "a" * 64))  # other runs' contexts unchanged


def test_a_deployed_site_reads_the_public_prompts_from_its_own_copy() -> None:
    from participant.local_config import LocalConfig, LocalDataSection, LocalModelSection, effective_config

    run_cfg = load_config(None, [*DISTIL, "distillation.public_data=/coordinator/public.csv"])
    model = LocalModelSection(sha256="f" * 64)
    own = effective_config(run_cfg, LocalConfig(model=model, data=LocalDataSection(path="diabetes", public_data=str(PUBLIC))))
    assert own.distillation.public_data == str(PUBLIC) and own.distillation.public_sha256 == SHA  # the hash stays the run's
    named = effective_config(run_cfg, LocalConfig(model=model, data=LocalDataSection(path="diabetes")))
    assert named.distillation.public_data == "/coordinator/public.csv"


def test_the_adapter_part_gives_way_so_the_whole_upload_keeps_clip_norm() -> None:
    cfg = load_config(None, [*DISTIL, "robust.rule=median", "robust.clip_norm=1.2", "train.lr=5e-2"])  # a rule that clips
    runtime = get_runtime(cfg, nodes(3)[1], own_rank=True)
    start, _ = adapter_vector(runtime.loaded.model)
    upload, _ = train_round(runtime, cfg, start, 1)
    adapter, block = split_upload(upload, PROMPTS * 2)
    assert np.linalg.norm(adapter) == pytest.approx(np.sqrt(1.2**2 - 1.0), rel=1e-4)  # clipped to what the block leaves
    assert np.linalg.norm(block) <= 1.0 + 1e-6 and np.linalg.norm(upload) <= 1.2 + 1e-5


def test_a_signed_version_names_the_public_prompts_and_the_soft_targets_its_round_made(tmp_path: Path) -> None:
    import json

    from fedlora.wire import targets_sha256

    _, rows = run(tmp_path)
    facts = json.loads((tmp_path / "adapters" / "final" / "manifest.json").read_text())["facts"]
    assert facts["distillation"] == {
        "variant": "with-averaging", "public_sha256": SHA, "soft_targets_sha256": targets_sha256(round_targets(tmp_path, len(rows) - 1)),
    }
    round_one = json.loads((tmp_path / "adapters" / "round-0001" / "manifest.json").read_text())["facts"]
    assert round_one["distillation"]["soft_targets_sha256"] == targets_sha256(round_targets(tmp_path, 1)) != facts["distillation"]["soft_targets_sha256"]
