import numpy as np
import pytest

from fedlora.attacks import ATTACK_FORMS, Knowledge, attack_updates, choose_adversaries, resolve_attack

RNG = np.random.default_rng(0)
OWN = np.array([1.0, -2.0, 3.0], dtype=np.float32)
BENIGN = [np.array([1.0, 0.0, 4.0], np.float32), np.array([3.0, 0.0, 2.0], np.float32), np.array([2.0, 3.0, 3.0], np.float32)]
# By hand, per coordinate: mean = [2, 1, 3]; deviations [-1, 1, 0], [-1, -1, 2], [1, -1, 0] -> std = [sqrt(2/3), sqrt(2), sqrt(2/3)].
MEAN = np.array([2.0, 1.0, 3.0])
STD = np.sqrt([2 / 3, 2.0, 2 / 3])


def test_sign_flip_scaling_and_gaussian_do_what_their_names_say() -> None:
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(resolve_attack("sign-flip")(OWN, [], rng).update, -OWN)
    np.testing.assert_array_equal(resolve_attack("scaling:10")(OWN, [], rng).update, 10 * OWN)
    noise = resolve_attack("gaussian:2.0")(np.zeros(20000, np.float32), [], rng).update
    assert abs(noise.std() - 2.0) < 0.05


def test_alie_sends_the_benign_mean_minus_z_standard_deviations() -> None:
    sent = resolve_attack("alie:1.5")(OWN, BENIGN, RNG).update
    assert sent.dtype == np.float32 and sent.shape == OWN.shape
    np.testing.assert_allclose(sent, MEAN - 1.5 * STD, rtol=1e-6)


def test_alie_alone_uses_z_equal_to_one() -> None:
    np.testing.assert_allclose(resolve_attack("alie")(OWN, BENIGN, RNG).update, MEAN - STD, rtol=1e-6)


def test_ipm_sends_minus_eps_times_the_benign_mean() -> None:
    sent = resolve_attack("ipm:0.5")(OWN, BENIGN, RNG).update
    assert sent.dtype == np.float32 and sent.shape == OWN.shape
    np.testing.assert_allclose(sent, [-1.0, -0.5, -1.5])


def test_omniscient_attacks_ignore_benign_updates_of_another_shape_or_with_nan() -> None:
    seen = [*BENIGN, np.ones(5, np.float32), np.array([np.nan, 0.0, 0.0], np.float32)]
    np.testing.assert_allclose(resolve_attack("alie:1.5")(OWN, seen, RNG).update, MEAN - 1.5 * STD, rtol=1e-6)
    np.testing.assert_allclose(resolve_attack("ipm:0.5")(OWN, seen, RNG).update, [-1.0, -0.5, -1.5])


def test_without_benign_updates_alie_sends_its_own_update_unchanged() -> None:
    sent = resolve_attack("alie:1.5")(OWN.astype(np.float64), [], RNG).update  # one sample: std 0, mean = own
    assert sent.dtype == np.float32
    np.testing.assert_array_equal(sent, OWN)


def test_without_benign_updates_ipm_sends_minus_eps_times_its_own_update() -> None:
    sent = resolve_attack("ipm:0.5")(OWN, [], RNG).update
    assert sent.dtype == np.float32
    np.testing.assert_array_equal(sent, [-0.5, 1.0, -1.5])


def test_omniscient_attacks_are_deterministic_whatever_the_rng() -> None:
    for spec in ("alie:1.5", "ipm:0.5"):
        attack = resolve_attack(spec)
        first = attack(OWN, BENIGN, np.random.default_rng(1)).update
        np.testing.assert_array_equal(first, attack(OWN, BENIGN, np.random.default_rng(2)).update)


def test_every_attacker_sees_only_the_honest_updates() -> None:
    updates = {"a": OWN, "b": BENIGN[0], "c": BENIGN[1], "d": BENIGN[2]}
    sent = attack_updates(updates, {"a"}, resolve_attack("ipm:0.5"), RNG)
    np.testing.assert_allclose(sent["a"].update, [-1.0, -0.5, -1.5])
    assert set(sent) == {"a"}  # the honest send what they trained


def test_plugin_attack_is_loaded_by_module_and_name() -> None:
    attack = resolve_attack("tests.plugin_attacks:little_is_enough")
    benign = [np.array([1.0, 0.0], np.float32), np.array([3.0, 0.0], np.float32)]
    np.testing.assert_allclose(attack(benign[0], benign, np.random.default_rng(0)).update, [2.0 - 1.5, 0.0])


def test_a_three_argument_plugin_still_works_where_attacks_get_the_attackers_knowledge() -> None:
    benign = [np.array([1.0, 0.0], np.float32), np.array([3.0, 0.0], np.float32)]
    updates = {"a": benign[0], "b": benign[1], "x": np.array([9.0, 9.0], np.float32)}
    sent = attack_updates(updates, {"x"}, resolve_attack("tests.plugin_attacks:little_is_enough"), RNG, Knowledge(clip_norm=0.1))
    np.testing.assert_allclose(sent["x"].update, [2.0 - 1.5, 0.0])
    assert sent["x"].num_examples is None and not sent["x"].metrics  # it claims nothing: the honest count stays


def test_a_plugin_with_the_fourth_argument_knows_the_clip_bound_and_claims_a_count_and_metrics() -> None:
    from coordinator.gather import Member, as_sent

    members = [Member(1, "a", 60, {"train_loss": 0.9, "partition_id": 0}, BENIGN[0]), Member(2, "x", 60, {"train_loss": 0.8, "partition_id": 1}, OWN)]
    attack = resolve_attack("tests.plugin_attacks:claims_everything")
    honest, liar = as_sent(members, attack_updates({m.name: m.vector for m in members}, {"x"}, attack, RNG, Knowledge(clip_norm=2.0)))
    assert honest == members[0]
    assert np.linalg.norm(liar.vector) == pytest.approx(2.0) and float(liar.vector @ OWN) < 0
    assert liar.num_examples == 10**6 and liar.metrics == {"train_loss": 0.0, "partition_id": 1, "num-examples": 10**6}  # under its own name


def test_an_attack_may_not_claim_another_partition_id() -> None:
    with pytest.raises(ValueError, match="sets \\['partition_id'\\] in Sent.metrics"):
        resolve_attack("tests.plugin_attacks:renames_itself")(OWN, [], RNG)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("teleport", "'teleport' is not a known name"),
        ("ipm", "'ipm' needs <eps> after 'ipm:'"),
        ("ipm:-1", "'ipm:-1' needs eps > 0, got '-1'"),
        ("alie:0", "'alie:0' needs z > 0, got '0'"),
        ("gaussian:-1", "'gaussian:-1' needs std >= 0"),
        ("sign-flip:2", "'sign-flip:2' takes no argument"),
        ("ipm-clip:2", "'ipm-clip:2' takes no argument"),
        ("count-inflation", "'count-inflation' needs <claim>"),
        ("count-inflation:0.5", "needs integer claim >= 1"),
        ("sacrifice:-1", "needs integer count >= 0"),
        ("no_such_module_xyz:fn", "cannot load 'no_such_module_xyz:fn'"),
        ("tests.plugin_attacks:missing", "cannot load 'tests.plugin_attacks:missing'"),
    ],
)
def test_a_bad_attack_spec_says_what_is_wrong_and_lists_every_form(spec: str, problem: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve_attack(spec)
    message = str(err.value)
    assert message.startswith("simulation.attack: ") and problem in message
    for form in ("sign-flip", "scaling:<factor>", "gaussian:<std>", "alie[:<z>]", "alie-auto", "ipm:<eps>", "ipm-clip", "count-inflation:<claim>", "sacrifice[:<count>]", "<module>:<function>"):
        assert form in message
    assert all(form.usage() in message for form in ATTACK_FORMS)


def test_adversaries_are_fixed_by_seed() -> None:
    first = choose_adversaries(10, 0.3, seed=4)
    assert first == choose_adversaries(10, 0.3, seed=4)
    assert len(first) == 3 and len(set(first)) == 3 and all(0 <= i < 10 for i in first)


def test_alie_under_secure_aggregation_is_refused_because_it_would_be_no_attack() -> None:
    from fedlora.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="simulation.attack: alie needs the round's honest updates"):
        load_config(None, ["simulation.adversaries=0.25", "simulation.attack=alie", "secagg.enabled=true"])
    with pytest.raises(ConfigError, match="simulation.attack: alie-auto needs the round's honest updates"):
        load_config(None, ["simulation.adversaries=0.25", "simulation.attack=alie-auto", "secagg.enabled=true"])
    for blind in ("ipm:0.5", "ipm-clip", "count-inflation:1000000", "sacrifice"):
        load_config(None, ["simulation.adversaries=0.25", f"simulation.attack={blind}", "secagg.enabled=true"])


def test_label_flip_poisons_the_adversaries_training_records_and_leaves_the_update_alone() -> None:
    from types import SimpleNamespace

    from fedlora.attacks import choose_adversaries, flip_labels
    from fedlora.config import load_config
    from fedlora.data import Example
    from participant.runtime import training_examples

    records = [Example("p", answer) for answer in ("no", "yes", "maybe", "no")]
    assert [e.response for e in flip_labels(records, ["maybe", "no", "yes"])] == ["yes", "maybe", "no", "yes"]
    update = np.arange(3, dtype=np.float32)
    assert resolve_attack("label-flip")(update, [], np.random.default_rng(0)).update is update  # harm done in training

    cfg = load_config(None, ["federation.participants=4", "simulation.adversaries=0.25", "simulation.attack=label-flip"])
    (bad,) = choose_adversaries(4, 0.25, cfg.federation.seed)
    for pid in range(4):
        runtime = SimpleNamespace(
            partition_id=pid, shard=SimpleNamespace(train=records), loaded=SimpleNamespace(label_names=["maybe", "no", "yes"]), site=None
        )
        flipped = [e.response for e in training_examples(cfg, runtime)] != [e.response for e in records]
        assert flipped == (pid == bad)


def test_bad_data_gives_chosen_participants_flipped_or_another_tasks_records_and_never_a_deployed_site() -> None:
    from pathlib import Path
    from types import SimpleNamespace

    from fedlora.config import ConfigError, load_config
    from fedlora.data import Example
    from participant.runtime import training_examples

    labels = ["high", "low", "medium"]
    records = [Example(f"### Record\nstress {k}", labels[k % 3]) for k in range(12)]
    cfg = load_config(None, ["federation.participants=4", "simulation.bad_data=0=label-flip,2=other-task:diabetes"])

    def trained(pid: int, site: Path | None = None) -> list[Example]:
        runtime = SimpleNamespace(partition_id=pid, shard=SimpleNamespace(train=records), loaded=SimpleNamespace(label_names=labels), site=site)
        return training_examples(cfg, runtime)

    assert [e.response for e in trained(0)] == [labels[(k + 1) % 3] for k in range(12)]
    other = trained(2)
    assert len(other) == len(records) and all("diabetes" in e.prompt for e in other)  # as many records, another question
    assert {e.response for e in other} <= {"high", "low"}  # diabetes' no/yes mapped in order onto this run's labels
    assert trained(1) == records and trained(3) == records
    assert trained(0, site=Path("/srv/site")) == records  # a deployed site trains on its own records, whatever the run says
    with pytest.raises(ConfigError, match="kinds are label-flip, other-task:<dataset>"):
        load_config(None, ["simulation.bad_data=0=noise"])
    with pytest.raises(ConfigError, match="partitions \\[7\\]"):
        load_config(None, ["federation.participants=4", "simulation.bad_data=7=label-flip"])
