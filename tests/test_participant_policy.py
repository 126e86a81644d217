"""A deployed participant's own configuration and policy (participant/local_config.py, site.py).

Pure checks of `policy_violations`, `effective_config` and `load_local_config`, then the
ClientApp's refusal path: a policy violation or a malformed instruction is refused before
anything is trained, and the refusal is written to the site's events.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from coordinator.local_grid import LocalGrid
from fedlora.config import Config, ConfigError, load_config
from fedlora.wire import instruction_content
from participant import app as participant_app
from participant.app import TRAINED, checked_instruction
from participant.local_config import (
    LOCAL_CONFIG,
    LocalConfig,
    LocalDataSection,
    LocalModelSection,
    LocalPrivacySection,
    PolicySection,
    SiteSection,
    effective_config,
    load_local_config,
    policy_violations,
)
from participant.site import EVENTS, Refusal
from tests.conftest import SMALL

SHA = "a" * 64
OTHER_SHA = "b" * 64
LABELS = ["no", "yes"]
# A run that agrees with the site below on everything but the rule under test.
AGREED = [f"model.sha256={SHA}", "data.label_names=no,yes"]
SECURE = ["federation.participants=4", "secagg.enabled=true", "secagg.bucket_size=2"]  # 4 sampled, buckets [2, 2]
DP = ["privacy.noise_multiplier=1.0", "federation.participants=4", "federation.fraction=0.5"]  # as in test_central_dp


def run_config(*overrides: str) -> Config:
    return load_config(None, [*SMALL, *AGREED, *overrides])


def site(
    *,
    epsilon_budget: float = 0.0,
    model_sha256: str = SHA,
    label_names: list[str] | None = None,
    **policy,
) -> LocalConfig:
    policy.setdefault("require_secagg", False)
    policy.setdefault("require_approval", False)  # approval has its own tests (tests/test_run_approval.py)
    return LocalConfig(
        site=SiteSection(name="hospital-a"),
        model=LocalModelSection(path="builtin:tiny-llama", sha256=model_sha256),
        data=LocalDataSection(
            path="/data/hospital-a/records.csv",
            label_column="Outcome",
            drop_columns=["patient_id"],
            label_names=list(LABELS if label_names is None else label_names),
            test_fraction=0.3,
            max_examples=50,
        ),
        privacy=LocalPrivacySection(epsilon_budget=epsilon_budget),
        policy=PolicySection(**policy),
    )


def rules(run: Config, local: LocalConfig) -> list[str]:
    return [violation.split(":")[0] for violation in policy_violations(run, local)]


# --- policy_violations -----------------------------------------------------------------

def test_an_agreeing_run_has_no_violations() -> None:
    assert policy_violations(run_config(), site()) == []
    assert policy_violations(run_config(*SECURE), site(require_secagg=True)) == []


def test_a_plaintext_run_is_refused_under_require_secagg() -> None:
    violations = policy_violations(run_config(), site(require_secagg=True))
    assert len(violations) == 1 and violations[0].startswith("policy.require_secagg")
    assert policy_violations(run_config(), site(require_secagg=False)) == []


def test_the_default_policy_requires_secure_aggregation() -> None:
    assert PolicySection().require_secagg is True
    assert rules(run_config(), site(require_secagg=True)) == ["policy.require_secagg"]


def test_buckets_below_the_sites_minimum_are_refused() -> None:
    run = run_config(*SECURE)
    assert run.secagg.enabled and run.secagg.bucket_size == 2
    violations = policy_violations(run, site(require_secagg=True, min_bucket_size=3))
    assert len(violations) == 1 and violations[0].startswith("policy.min_bucket_size")
    assert "2" in violations[0] and "3" in violations[0]
    assert policy_violations(run, site(require_secagg=True, min_bucket_size=2)) == []


def test_one_bucket_of_everyone_counts_as_a_bucket_of_all_sampled() -> None:
    """secagg.bucket_size=0 means one secure sum over every sampled participant (here 4)."""
    run = run_config("federation.participants=4", "secagg.enabled=true", "secagg.bucket_size=0")
    assert policy_violations(run, site(require_secagg=True)) == []  # the default minimum of 2
    assert policy_violations(run, site(require_secagg=True, min_bucket_size=4)) == []
    violations = policy_violations(run, site(require_secagg=True, min_bucket_size=5))
    assert rules(run, site(require_secagg=True, min_bucket_size=5)) == ["policy.min_bucket_size"]
    assert "buckets of 4" in violations[0]


def test_min_bucket_size_does_not_apply_to_plaintext_runs() -> None:
    assert policy_violations(run_config(), site(require_secagg=False, min_bucket_size=50)) == []


def test_max_epsilon_refuses_runs_without_user_level_dp() -> None:
    local = site(max_epsilon=8.0)
    violations = policy_violations(run_config(), local)
    assert len(violations) == 1 and violations[0].startswith("policy.max_epsilon") and "no user-level DP" in violations[0]
    # A budget without noise promises nothing.
    assert rules(run_config("privacy.epsilon_budget=5"), local) == ["policy.max_epsilon"]
    # Noise without a budget promises no bound either.
    assert rules(run_config(*DP), local) == ["policy.max_epsilon"]


def test_max_epsilon_compares_the_runs_budget() -> None:
    run = run_config(*DP, "privacy.epsilon_budget=10")
    above = policy_violations(run, site(max_epsilon=8.0))
    assert len(above) == 1 and above[0].startswith("policy.max_epsilon") and "epsilon 10" in above[0]
    assert policy_violations(run, site(max_epsilon=12.0)) == []
    assert policy_violations(run, site(max_epsilon=10.0)) == []  # at most: the bound itself is fine
    assert policy_violations(run_config(), site(max_epsilon=0.0)) == []  # 0 = no requirement


def test_the_run_must_be_for_the_sites_own_base_model() -> None:
    assert policy_violations(run_config(), site()) == []
    other = policy_violations(run_config(f"model.sha256={OTHER_SHA}"), site())
    assert len(other) == 1 and other[0].startswith("policy.allowed_base_sha256") and OTHER_SHA in other[0]
    unstated = policy_violations(load_config(None, [*SMALL, "data.label_names=no,yes"]), site())
    assert len(unstated) == 1 and unstated[0].startswith("policy.allowed_base_sha256") and "no base model fingerprint" in unstated[0]


def test_allowed_base_sha256_decides_by_membership() -> None:
    allowed = site(allowed_base_sha256=[OTHER_SHA, "c" * 64])
    assert policy_violations(run_config(f"model.sha256={OTHER_SHA}"), allowed) == []
    # The list replaces the site's own fingerprint: its own model is not implied.
    assert rules(run_config(), allowed) == ["policy.allowed_base_sha256"]
    assert rules(load_config(None, [*SMALL, "data.label_names=no,yes"]), allowed) == ["policy.allowed_base_sha256"]


@pytest.mark.parametrize("run_labels", ["yes,no", "no", "no,yes,maybe", "No,Yes"])
def test_label_names_must_match_exactly_in_order(run_labels: str) -> None:
    run = load_config(None, [*SMALL, f"model.sha256={SHA}", f"data.label_names={run_labels}"])
    violations = policy_violations(run, site())
    assert len(violations) == 1 and violations[0].startswith("data.label_names")


def test_a_run_without_label_names_is_refused_by_a_site_that_has_them() -> None:
    assert rules(load_config(None, [*SMALL, f"model.sha256={SHA}"]), site()) == ["data.label_names"]


def test_every_broken_rule_is_listed() -> None:
    run = load_config(None, [*SMALL, "data.label_names=a,b"])
    assert rules(run, site(require_secagg=True, max_epsilon=1.0)) == [
        "policy.require_secagg",
        "policy.max_epsilon",
        "policy.allowed_base_sha256",
        "data.label_names",
    ]


# --- effective_config ------------------------------------------------------------------

def test_effective_config_takes_data_and_model_from_the_site() -> None:
    run = run_config(
        "data.dataset=/coordinator/chooses/this.csv",
        "data.label_column=Sneaky",
        "data.drop_columns=nothing",
        "data.test_fraction=0.5",
        "data.max_examples=7",
        "model.name=builtin:minilm",
        "train.lr=0.02",
    )
    local = site()
    effective = effective_config(run, local)
    assert effective.data.dataset == local.data.path
    assert effective.data.label_column == "Outcome"
    assert effective.data.drop_columns == ["patient_id"]
    assert effective.data.label_names == LABELS
    assert effective.data.test_fraction == 0.3
    assert effective.data.max_examples == 50
    assert effective.model.name == "builtin:tiny-llama" and effective.model.sha256 == SHA
    # What the round is stays the run's.
    assert effective.train.lr == 0.02 and effective.federation == run.federation and effective.lora == run.lora
    assert effective.data.max_length == run.data.max_length and effective.data.partition == run.data.partition
    # The run's own configuration object is left as it was.
    assert run.data.dataset == "/coordinator/chooses/this.csv" and run.model.name == "builtin:minilm"


@pytest.mark.parametrize(
    ("run_budget", "site_budget", "expected"),
    [(5.0, 0.0, 5.0), (0.0, 3.0, 3.0), (5.0, 3.0, 3.0), (2.0, 3.0, 2.0), (0.0, 0.0, 0.0)],
)
def test_the_lower_positive_local_budget_applies(run_budget: float, site_budget: float, expected: float) -> None:
    run = run_config(f"privacy.local_epsilon_budget={run_budget}")
    assert effective_config(run, site(epsilon_budget=site_budget)).privacy.local_epsilon_budget == expected


# --- load_local_config -----------------------------------------------------------------

def test_local_config_round_trips_through_its_toml(tmp_path: Path) -> None:
    local = site(require_secagg=True, min_bucket_size=3, max_epsilon=4.0, allowed_base_sha256=[SHA, OTHER_SHA], epsilon_budget=2.0)
    (tmp_path / LOCAL_CONFIG).write_text(local.to_toml())
    assert load_local_config(tmp_path) == local


def test_a_missing_participant_toml_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_local_config(tmp_path)
    assert "fedlora participant init" in str(err.value) and str(tmp_path) in str(err.value)


def test_an_unknown_key_is_named_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / LOCAL_CONFIG
    path.write_text(site().to_toml().replace("require_secagg", "require_secgg"))
    with pytest.raises(ConfigError) as err:
        load_local_config(tmp_path)
    assert str(path) in str(err.value) and "policy.require_secgg" in str(err.value)


def test_an_unknown_section_is_named_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / LOCAL_CONFIG
    path.write_text(site().to_toml() + "\n[train]\nlr = 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_local_config(tmp_path)
    assert str(path) in str(err.value) and "[train]" in str(err.value)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (f'[model]\nsha256 = "{SHA}"\n', "data.path"),
        ('[data]\npath = "records.csv"\n', "model.sha256"),
        (f'[data]\npath = "records.csv"\ntest_fraction = 1.5\n[model]\nsha256 = "{SHA}"\n', "data.test_fraction"),
        (f'[data]\npath = "records.csv"\n[model]\nsha256 = "{SHA}"\n[policy]\nmin_bucket_size = 0\n', "policy.min_bucket_size"),
        ("this is = not [toml", ""),
    ],
)
def test_an_invalid_participant_toml_is_a_config_error_naming_file_and_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / LOCAL_CONFIG
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_local_config(tmp_path)
    assert str(path) in str(err.value) and key in str(err.value)


# --- the ClientApp's refusal path --------------------------------------------------------

NODE = 7


def events(directory: Path) -> list[dict]:
    path = directory / EVENTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def secure_only_site(tmp_path: Path) -> Path:
    (tmp_path / LOCAL_CONFIG).write_text(site(require_secagg=True).to_toml())
    return tmp_path


def _context(directory: Path) -> Context:
    return Context(run_id=1, node_id=NODE, node_config={"participant-dir": str(directory)}, state=RecordDict(), run_config={})


def _message(content: RecordDict) -> Message:
    LocalGrid(participant_app.app, {})  # sets Flower's task identity, which a Message needs
    return Message(content, dst_node_id=NODE, message_type="train", group_id="3")


def test_a_plaintext_instruction_is_refused_by_a_secure_only_site_and_logged(secure_only_site: Path) -> None:
    run = run_config()
    message = _message(instruction_content(np.zeros(8, dtype=np.float32), 3, run.to_toml()))
    with pytest.raises(Refusal) as err:
        checked_instruction(message, _context(secure_only_site), "a train request")
    assert "policy.require_secagg" in str(err.value) and "hospital-a" in str(err.value) and "round 3" in str(err.value)
    logged = events(secure_only_site)
    assert len(logged) == 1
    assert logged[0]["event"] == "refused" and logged[0]["round"] == 3 and "policy.require_secagg" in logged[0]["reason"]


def test_an_agreeing_instruction_gets_the_sites_configuration(secure_only_site: Path) -> None:
    run = run_config(*SECURE, "data.dataset=elsewhere.csv")
    message = _message(instruction_content(np.zeros(8, dtype=np.float32), 2, run.to_toml()))
    instruction, cfg = checked_instruction(message, _context(secure_only_site), "a train request")
    assert instruction.server_round == 2 and instruction.config == run
    assert cfg.data.dataset == "/data/hospital-a/records.csv" and cfg.model.sha256 == SHA
    assert events(secure_only_site) == []


def test_a_malformed_instruction_is_refused_and_logged(secure_only_site: Path) -> None:
    content = instruction_content(np.zeros(8, dtype=np.float32), 3, run_config(*SECURE).to_toml())
    del content["round"]
    with pytest.raises(Refusal) as err:
        checked_instruction(_message(content), _context(secure_only_site), "a train request")
    assert "malformed" in str(err.value) and "KeyError" in str(err.value)
    logged = events(secure_only_site)
    assert len(logged) == 1 and logged[0]["event"] == "refused" and "malformed" in logged[0]["reason"]


def test_an_instruction_with_an_invalid_run_config_is_refused_as_malformed(secure_only_site: Path) -> None:
    toml = run_config(*SECURE).to_toml().replace("local_steps", "local_stepz")
    with pytest.raises(Refusal) as err:
        checked_instruction(_message(instruction_content(np.zeros(8, dtype=np.float32), 3, toml)), _context(secure_only_site), "a train request")
    assert "malformed" in str(err.value) and "train.local_stepz" in str(err.value)
    assert len(events(secure_only_site)) == 1


def test_the_refusal_reaches_the_coordinator_as_an_error_reply_and_nothing_is_trained(secure_only_site: Path) -> None:
    grid = LocalGrid(participant_app.app, {NODE: {"participant-dir": str(secure_only_site)}})
    message = grid.create_message(instruction_content(np.zeros(8, dtype=np.float32), 1, run_config().to_toml()), "train", NODE, "1")
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and "Refusal" in reply.error.reason and "policy.require_secagg" in reply.error.reason
    assert TRAINED not in grid.contexts[NODE].state  # refused before the replay guard recorded the round
    assert [e["event"] for e in events(secure_only_site)] == ["refused"]


def test_an_oversized_instruction_is_refused_as_malformed(secure_only_site: Path) -> None:
    toml = run_config(*SECURE).to_toml() + "\n" + "#" * (80 * 1024)
    with pytest.raises(Refusal, match="malformed.*over the"):
        checked_instruction(_message(instruction_content(np.zeros(8, dtype=np.float32), 3, toml)), _context(secure_only_site), "a train request")
    assert len(events(secure_only_site)) == 1


def test_a_replayed_train_request_is_refused_and_logged(tmp_path: Path) -> None:
    """A train request for a round this node already trained in this run is a replay."""
    context = _context(tmp_path)  # no participant.toml needed: the guard acts before training
    participant_app.refuse_stale(context, 2)
    for replayed in (2, 1):
        with pytest.raises(Refusal, match="replay"):
            participant_app.refuse_stale(context, replayed)
    participant_app.refuse_stale(context, 3)  # the next round is fine
    assert [e["event"] for e in events(tmp_path)] == ["refused", "refused"]


def test_a_reply_that_answers_no_open_request_is_refused() -> None:
    """A reply whose reply_to is not one of this round's messages (a closed round's) is dropped."""
    from coordinator.rounds import exchange

    class ReplayingGrid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            stale = replies[0]
            stale.metadata.__dict__["_reply_to_message_id"] = "an-earlier-round's-message"
            return replies

    grid = ReplayingGrid(participant_app.app, {NODE: {}, NODE + 1: {}})
    content = instruction_content(np.zeros(8, dtype=np.float32), 1, "not toml")
    replies = exchange(grid, [NODE, NODE + 1], content, "train", 1, 10.0)
    assert replies[NODE] is None  # refused: answers nothing this round asked
    assert replies[NODE + 1] is not None and replies[NODE + 1].has_error()  # a real (error) reply is kept


def test_the_deployment_examples_agree_with_each_other() -> None:
    """examples/deployment: the example site accepts the example run (its terms too), and refuses it in plaintext
    or before it approved the run's hash."""
    import tomllib

    from coordinator.deploy import run_config_sha256
    from fedlora.config import build_sections
    from participant.approvals import CONFIG, Approval, approval_violations
    from participant.local_config import LOCAL_SECTIONS, LocalConfig

    examples = Path(__file__).parent.parent / "examples" / "deployment"
    run = load_config(examples / "run.toml")
    site = LocalConfig(**build_sections(tomllib.loads((examples / "participant.toml").read_text()), LOCAL_SECTIONS))
    assert policy_violations(run, site) == []
    plaintext = load_config(examples / "run.toml", ["secagg.enabled=false"])
    assert [v.split(":")[0] for v in policy_violations(plaintext, site)] == ["policy.require_secagg"]
    sha = run_config_sha256(examples / "run.toml")  # and it takes part once it approves the run's hash
    assert approval_violations(site.policy, set(), sha, 1) and not approval_violations(site.policy, {Approval(CONFIG, sha)}, sha, 1)
