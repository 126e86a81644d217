"""Sample-level DP-SGD on each participant (Opacus) on the real NF4 + LoRA tiny Llama."""

from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from fedlora.adapter import adapter_vector
from fedlora.config import ConfigError, load_config
from fedlora.data import make_batch
from fedlora.privacy import local_dp
from fedlora.train import train_local
from participant import runtime
from tests.conftest import SMALL

NODE = {"partition-id": 0, "num-partitions": 3}


def dp_config(*overrides: str):
    return load_config(None, SMALL + ["privacy.local_noise_multiplier=1.0", *overrides])


@pytest.fixture(autouse=True)
def fresh_accountants():
    runtime._ACCOUNTANTS.clear()
    yield
    runtime._ACCOUNTANTS.clear()


@pytest.fixture(scope="module")
def participant():
    """Partition 0's runtime (NF4 base, the default) and a fixed global adapter to start from."""
    rt = runtime.get_runtime(dp_config(), NODE, own_rank=True)
    return rt, adapter_vector(rt.loaded.model)[0].copy()


def opacus_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=z, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_config_with_local_dp_sgd_loads() -> None:
    cfg = load_config(None, ["privacy.local_noise_multiplier=1.1", "privacy.local_epsilon_budget=8"])
    assert cfg.privacy.local_noise_multiplier == 1.1 and cfg.privacy.local_epsilon_budget == 8.0


def test_opacus_per_example_gradients_on_the_nf4_lora_model_are_each_records_own(participant) -> None:
    rt, _ = participant
    model = rt.loaded.model
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_layers)
    records = runtime.training_examples(dp_config(), rt)[:3]
    batch = make_batch(records, rt.loaded.tokenizer, "generation", [], 64, rt.loaded.prompt_format)
    labels = batch.pop("labels")
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with local_dp.per_example_gradients(model):
        local_dp.example_losses(model(**batch).logits, labels, "generation").mean().backward()
        per_example = [p.grad_sample.clone() for p in trainable]
    model.zero_grad(set_to_none=True)
    assert not any(hasattr(p, "grad_sample") for p in trainable)  # hooks and their state are gone
    for i in range(len(records)):
        one = {key: value[i : i + 1] for key, value in batch.items()}
        own = torch.autograd.grad(local_dp.example_losses(model(**one).logits, labels[i : i + 1], "generation").sum(), trainable)
        for sample, grad in zip(per_example, own):
            torch.testing.assert_close(sample[i], grad, atol=1e-4, rtol=1e-4)
    model.eval()


def test_dp_sgd_runs_on_the_quantised_model_and_reports_opacus_rdp_epsilon(participant) -> None:
    rt, start = participant
    cfg = dp_config("privacy.local_delta=1e-4")
    upload, metrics = runtime.train_round(rt, cfg, start, server_round=1)
    assert np.all(np.isfinite(upload)) and np.linalg.norm(upload) > 0
    q = cfg.train.batch_size / len(rt.shard.train)
    assert metrics["local_delta"] == 1e-4
    assert metrics["local_epsilon"] == pytest.approx(opacus_epsilon(1.0, q, cfg.train.local_steps, 1e-4), rel=1e-12)
    (state,) = runtime._ACCOUNTANTS.values()
    assert state["history"] == [(1.0, q, cfg.train.local_steps)]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_the_noise_is_not_fixed_by_the_run_seed_but_plain_training_is(participant) -> None:
    rt, start = participant
    noisy = dp_config("privacy.local_noise_multiplier=10000", "train.local_steps=2")
    first, second = (runtime.train_round(rt, noisy, start, server_round=1)[0] for _ in range(2))
    assert abs(cosine(first, second)) < 0.2  # the same seed, two unrelated noise draws
    plain = load_config(None, SMALL + ["train.local_steps=2"])
    first, second = (runtime.train_round(rt, plain, start, server_round=1)[0] for _ in range(2))
    assert np.array_equal(first, second) and np.linalg.norm(first) > 0


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_each_example_gradient_is_clipped_to_local_max_grad_norm(participant, monkeypatch) -> None:
    rt, start = participant
    cfg = dp_config("privacy.local_max_grad_norm=0.001", "privacy.local_noise_multiplier=0.01")
    seen = []
    clip_and_accumulate = DPOptimizer.clip_and_accumulate

    def spy(self):  # per-example norms before clipping, and the clipped sum after it
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in self.grad_samples], dim=1).norm(dim=1)  # an empty draw: no rows
        clip_and_accumulate(self)
        total = torch.stack([p.summed_grad.norm() for p in self.params]).norm()
        seen.append((norms, float(total)))

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    runtime.train_round(rt, cfg, start, server_round=1)
    assert len(seen) == cfg.train.local_steps
    assert any(len(norms) and norms.max() > 100 * 0.001 for norms, _ in seen)  # clipping had work to do
    for norms, total in seen:
        assert total <= len(norms) * 0.001 * (1 + 1e-4)


def test_an_empty_poisson_draw_is_a_step_of_noise_alone(participant, monkeypatch) -> None:
    rt, start = participant
    cfg = dp_config()
    monkeypatch.setattr(local_dp, "poisson_batches", lambda examples, rate, steps, generator: iter([[]] * steps))
    model = rt.loaded.model
    before = adapter_vector(model)[0]
    accountant = RDPAccountant()
    result = train_local(model, rt.loaded.tokenizer, rt.shard.train, cfg.train, "generation", [], 64, 0, cfg.privacy, accountant, prompt_format=rt.loaded.prompt_format)
    assert result.examples_seen == 0 and np.isnan(result.mean_loss)
    assert accountant.history[0][2] == cfg.train.local_steps and result.local_epsilon > 0
    assert not np.array_equal(adapter_vector(model)[0], before)


@pytest.mark.parametrize(("overrides", "key"), [
    (["train.fedprox_mu=0.1"], "train.fedprox_mu"),
    (["train.gradient_checkpointing=true"], "train.gradient_checkpointing"),
    (["privacy.local_noise_multiplier=-1"], "privacy.local_noise_multiplier"),
])
def test_dp_sgd_settings_that_cannot_work_are_refused_at_load(overrides: list, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        dp_config(*overrides)


def test_the_accountant_persists_across_rounds(participant) -> None:
    rt, start = participant
    cfg = dp_config()
    q, steps = cfg.train.batch_size / len(rt.shard.train), cfg.train.local_steps
    eps1 = runtime.train_round(rt, cfg, start, server_round=1)[1]["local_epsilon"]
    eps2 = runtime.train_round(rt, cfg, start, server_round=2)[1]["local_epsilon"]
    assert eps1 < eps2 == pytest.approx(opacus_epsilon(1.0, q, 2 * steps, cfg.privacy.local_delta), rel=1e-12)


def test_a_participant_refuses_to_train_past_its_local_epsilon_budget(participant) -> None:
    rt, start = participant
    train, delta = dp_config().train, dp_config().privacy.local_delta
    q, steps = train.batch_size / len(rt.shard.train), train.local_steps
    eps1, eps2 = opacus_epsilon(1.0, q, steps, delta), opacus_epsilon(1.0, q, 2 * steps, delta)
    cfg = dp_config(f"privacy.local_epsilon_budget={(eps1 + eps2) / 2}")
    assert runtime.train_round(rt, cfg, start, server_round=1)[1]["local_epsilon"] == pytest.approx(eps1)
    with pytest.raises(RuntimeError, match=r"privacy\.local_epsilon_budget") as refused:
        runtime.train_round(rt, cfg, start, server_round=2)
    assert f"{eps1:.4g}" in str(refused.value)
    (state,) = runtime._ACCOUNTANTS.values()
    assert state["history"] == [(1.0, q, steps)]  # the refused round spent nothing


class FreshWorkerEachMessage(dict):
    """A worker process's memory when Flower serves every message of a site from another worker: nothing stays."""

    def __setitem__(self, key, value) -> None:
        pass


@pytest.mark.slow  # a whole federation
def test_a_simulated_sites_spending_survives_being_served_by_another_worker(tmp_path, monkeypatch) -> None:
    """Flower's simulation may run one site's messages in different worker processes, so a site's accountant lives
    in its node state: its epsilon counts every round's and every fine-tune's steps whichever process ran them."""
    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from participant.app import app

    monkeypatch.setattr(runtime, "_ACCOUNTANTS", FreshWorkerEachMessage())
    cfg = dp_config("federation.personalization=finetune:3")
    nodes = {p + 1: {"partition-id": p, "num-partitions": 3} for p in range(3)}
    rows = Coordinator(cfg, tmp_path).run(LocalGrid(app, nodes))
    steps, fine_tune = cfg.train.local_steps, cfg.federation.personalization_steps
    for p, node in nodes.items():
        q = local_dp.sample_rate(cfg.train.batch_size, len(runtime.get_runtime(cfg, node).shard.train))
        # round r's reply: the fine-tunes of evaluations 0 .. r-1 and the training of rounds 1 .. r, all at rate q
        expected = [opacus_epsilon(1.0, q, r * (steps + fine_tune), cfg.privacy.local_delta) for r in (1, 2)]
        reported = [row["local_epsilon"][f"participant-{p - 1}"] for row in rows[1:3]]
        assert reported == pytest.approx(expected, rel=1e-9)
        # its evaluation replies show it too, the last one with the last fine-tune (never followed by training)
        (last,) = [site for site in rows[2]["participant_evaluations"] if site["participant"] == f"participant-{p - 1}"]
        assert last["local_epsilon"] == pytest.approx(opacus_epsilon(1.0, q, 2 * (steps + fine_tune) + fine_tune, cfg.privacy.local_delta), rel=1e-9)


def test_under_a_target_epsilon_each_site_derives_its_own_noise_and_spends_at_most_the_target() -> None:
    """One multiplier for every site is set by the smallest; with privacy.local_epsilon_target each site calibrates
    its own to its records and the run's planned steps (rounds and fine-tunes), so a larger site adds less noise."""
    cfg = load_config(None, [*SMALL, "privacy.local_epsilon_target=6", "data.partition=dirichlet:0.3", "federation.personalization=finetune:3"])
    planned = cfg.federation.rounds * cfg.train.local_steps + (cfg.federation.rounds + 1) * 3
    sites = []
    for p in range(3):
        rt = runtime.get_runtime(cfg, {"partition-id": p, "num-partitions": 3})
        own = runtime.site_privacy(cfg, rt).privacy
        q = local_dp.sample_rate(cfg.train.batch_size, len(rt.shard.train))
        assert own.local_epsilon_budget == 6 and own.local_epsilon_target == 0
        assert 6 * 0.98 <= opacus_epsilon(own.local_noise_multiplier, q, planned, own.local_delta) <= 6
        sites.append((len(rt.shard.train), own.local_noise_multiplier))
    sizes = [size for size, _ in sites]
    assert len(set(sizes)) == 3  # the skewed split gives the sites different sizes ...
    assert [noise for _, noise in sorted(sites)] == sorted((noise for _, noise in sites), reverse=True)  # ... the smaller, the noisier
    assert runtime.site_privacy(dp_config(), rt) == dp_config()  # a multiplier for all stays as it is


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["privacy.local_epsilon_target=-1"], "privacy.local_epsilon_target"),
        (["privacy.local_epsilon_target=8", "privacy.local_noise_multiplier=1"], "privacy.local_epsilon_target"),
        (["privacy.local_epsilon_target=8", "lora.mode=sb"], "lora.mode"),
        (["privacy.local_epsilon_target=8", "train.fedprox_mu=0.1"], "train.fedprox_mu"),
    ],
)
def test_a_target_epsilon_is_checked_like_a_noise_multiplier(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_under_a_target_epsilon_the_rounds_and_the_fine_tune_run_dp_sgd_at_the_sites_own_noise(participant) -> None:
    """No multiplier is set, so without its own (`site_privacy`) a site would train without any DP."""
    from participant.personal import personalise

    rt, start = participant
    cfg = load_config(None, SMALL + ["privacy.local_epsilon_target=6", "federation.personalization=finetune:3"])
    own = runtime.site_privacy(cfg, rt).privacy
    q = local_dp.sample_rate(cfg.train.batch_size, len(rt.shard.train))
    _, metrics = runtime.train_round(rt, cfg, start, server_round=1)
    assert metrics["local_epsilon"] == pytest.approx(opacus_epsilon(own.local_noise_multiplier, q, cfg.train.local_steps, own.local_delta), rel=1e-9)
    personalise(rt, cfg, start, server_round=1)
    (state,) = runtime._ACCOUNTANTS.values()
    assert state["history"] == [(own.local_noise_multiplier, q, cfg.train.local_steps + 3)]
