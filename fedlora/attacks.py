"""Model-poisoning attacks for simulated adversaries, behind one registry.

An attack maps a malicious participant's honest update (a flat float32 vector) to what it sends.
`benign` holds this round's honest updates: omniscient attacks (`alie`, `ipm`) read them. Under
secure aggregation nobody sees them and attacks get `benign = []` (docs/decisions.md, "Simulated
attacks under secure aggregation run on the participant, blind"); each attack says what it does then.

An attacker controls everything it sends, not its update only: an attack may return a `Sent`
with the example count it claims and the metrics it reports, and one that takes a fourth argument
gets `Knowledge`: the defence as configured (rule, clip bound, screens), which every participant
reads in the run configuration, and its coalition this round. `simulation.attack` also takes a
plugin `<module>:<function>`: `(update, benign, rng) -> update`, or with `knowledge` and/or a `Sent`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.aggregate.robust import SpecForm, make_rule, parse_spec

if TYPE_CHECKING:  # the secure-aggregation stages import this module; they need no torch
    from fedlora.config import Config
    from fedlora.data import Example

UNCLAIMABLE = ("num-examples", "partition_id")  # a count is `Sent.num_examples`; the partition names the simulated node


@dataclass(frozen=True)
class Knowledge:
    """What a strong simulated attacker knows: the defence as configured, and its coalition.

    The rule, clip bound and screens are in the run configuration every participant receives
    (Kerckhoffs's principle: the defence is public). Colluders also know how many of them take
    part and which one each is, so they can split roles (`sacrifice`). Under secure aggregation
    (`secure`) the coalition is as planned: the round's sample is not known to a participant.
    """

    rule: str = "mean"  # robust.rule
    clip_norm: float = 10.0  # robust.clip_norm
    clip_screen: bool = False  # units longer than clip_norm are set aside
    max_norm_ratio: float = 0.0  # ... and those longer than this times the round's median unit norm (0: off)
    participants: int = 1  # n: this round's participants
    attackers: int = 1  # m: the attackers among them
    index: int = 0  # this attacker's place among them, 0 .. m - 1
    secure: bool = False  # it masks its own input: blind, bounded only by the encoding

    @classmethod
    def of(cls, cfg: Config, **coalition: int) -> Knowledge:
        ratio, bound = cfg.norm_screens
        rule, clip_norm = cfg.robust.rule, cfg.robust.clip_norm
        return cls(rule, clip_norm, bound is not None, ratio, secure=cfg.secagg.enabled, **coalition)


@dataclass(frozen=True)
class Sent:
    """What an attacker sends: its update, and the claims beside it (None or absent: the honest ones)."""

    update: np.ndarray
    num_examples: int | None = None  # the example count it claims, which weighs its update
    metrics: Mapping[str, float] = field(default_factory=dict)  # reported metrics it replaces (train_loss, ...)

    def claims(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The reply's metrics with this attacker's claims in their place."""
        count = {} if self.num_examples is None else {"num-examples": self.num_examples}
        return {**metrics, **self.metrics, **count}


AttackFunction = Callable[..., "np.ndarray | Sent"]  # as written: (update, benign, rng[, knowledge])
Attack = Callable[[np.ndarray, list[np.ndarray], np.random.Generator, Knowledge], Sent]  # as resolved


def sign_flip(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    return -update


def scaling(factor: float) -> AttackFunction:
    def scale(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        return update * np.float32(factor)

    return scale


def gaussian(std: float) -> AttackFunction:
    def noise(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        return rng.normal(0.0, std, size=update.shape).astype(np.float32)

    return noise


def _visible(update: np.ndarray, benign: list[np.ndarray]) -> np.ndarray | None:
    """The honest updates an omniscient attacker can combine with its own, stacked as float64:
    those of its shape (heterogeneous LoRA ranks give other lengths) with finite values (a broken
    honest update is screened out later anyway). None when there is none."""
    usable = [b for b in benign if np.shape(b) == update.shape and np.isfinite(b).all()]
    return np.stack(usable).astype(np.float64) if usable else None


def alie(z: float) -> AttackFunction:
    """`alie:<z>`: "A Little Is Enough" (Baruch, Baruch & Goldberg, "A Little Is Enough:
    Circumventing Defenses For Distributed Learning", NeurIPS 2019).

    Every attacker sends mean(benign) - z * std(benign), coordinate by coordinate (std over the
    honest updates themselves, ddof = 0): a shift small enough to stay within the honest spread,
    so that median- and distance-based rules keep it, and consistent across attackers and rounds.
    The paper picks z = Phi^-1((n - s) / n) with s = floor(n / 2 + 1) - m supporters needed, for
    n participants of which m attack (n = 50, m = 12: z ~ 0.58); `alie` alone uses z = 1.

    Without honest updates (secure aggregation, or only attackers in the round) the attacker's
    only sample is its own update: the mean estimate is that update and the std of one sample is
    0, so it sends its own honest update. `alie` is then no attack at all.
    """

    def little_is_enough(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        stacked = _visible(update, benign)
        if stacked is None:
            return np.array(update, dtype=np.float32)
        return (stacked.mean(axis=0) - z * stacked.std(axis=0)).astype(np.float32)

    return little_is_enough


def ipm(eps: float) -> AttackFunction:
    """`ipm:<eps>`: Inner Product Manipulation (Xie, Koyejo & Gupta, "Fall of Empires: Breaking
    Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2019, PMLR 115, 2020).

    Every attacker sends -eps * mean(benign), so that the aggregate's inner product with the
    honest mean turns small or negative: small eps (e.g. 0.1) slips past median- and
    distance-based rules, large eps (e.g. 100) swamps a plain mean.

    Without honest updates (secure aggregation, or only attackers in the round) the attacker's
    own update stands in for the honest mean: it sends -eps * its own update.
    """

    def manipulate(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        stacked = _visible(update, benign)
        mean = np.asarray(update, dtype=np.float64) if stacked is None else stacked.mean(axis=0)
        return (-eps * mean).astype(np.float32)

    return manipulate


def _against_honest(update: np.ndarray, benign: list[np.ndarray]) -> np.ndarray:
    """The unit vector opposite the honest mean (blind: opposite its own update); 0 where that is 0."""
    stacked = _visible(update, benign)
    mean = np.asarray(update, dtype=np.float64) if stacked is None else stacked.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return -mean / norm if norm > 0 else np.zeros_like(mean)


def ipm_clip(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator, knowledge: Knowledge) -> np.ndarray:
    """`ipm-clip`: inner-product manipulation (Xie, Koyejo & Gupta, UAI 2019, PMLR 115, 2020) sized
    to the clip bound: -C * mean(benign) / ||mean(benign)||, C = robust.clip_norm.

    The longest update against the honest direction that the clip screen lets through (a unit
    longer than C is set aside), so every weighted rule takes it at full strength.

    Blind (secure aggregation) it points against its own update, with norm C: masked unclipped
    it could be longer, but its bucket's mean would then exceed C and be screened.
    """
    return (knowledge.clip_norm * _against_honest(update, benign)).astype(np.float32)


def count_inflation(claim: int) -> AttackFunction:
    """`count-inflation:<claim>`: claim `claim` examples, with `ipm-clip`'s update (norm exactly C).

    FedAvg weighs each update by its example count (McMahan et al., AISTATS 2017), which only the
    participant knows: the claim is the attack, and the update passes every norm screen. Weighted
    by claims (`robust.weighting = "claimed"`), one such attacker of 15 turns the mean, the
    geometric median and centred clipping against the honest direction; capped (the default) it
    weighs robust.weight_cap median claims (docs/decisions.md, "Aggregation weights").

    Blind (secure aggregation) the update points against its own; the claim travels in the
    plaintext metadata, which sizes its bucket's weight reference, and in its weight slot.
    """

    def inflate(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator, knowledge: Knowledge) -> Sent:
        return Sent(ipm_clip(update, benign, rng, knowledge), num_examples=claim)

    return inflate


def alie_z(participants: int, attackers: int) -> float:
    """Baruch et al.'s z for n participants of which m attack: z = Phi^-1((n - s) / n), where
    s = floor(n / 2 + 1) - m honest participants must side with the attackers for them to hold a
    majority. An attacker majority needs no supporter: its z is that of s = 1."""
    supporters = max(1, math.floor(participants / 2 + 1) - attackers)
    return NormalDist().inv_cdf((participants - supporters) / participants)


def _within_screens(vector: np.ndarray, knowledge: Knowledge, stacked: np.ndarray) -> np.ndarray:
    """`vector` scaled down, if need be, to pass the norm screens it knows of: the clip bound, and
    max_norm_ratio times the honest median norm (its estimate of the round's median)."""
    limit = knowledge.clip_norm if knowledge.clip_screen else math.inf
    if knowledge.max_norm_ratio > 0:
        limit = min(limit, knowledge.max_norm_ratio * float(np.median(np.linalg.norm(stacked, axis=1))))
    norm = float(np.linalg.norm(vector))
    return vector * (limit / norm) if norm > limit else vector


def alie_auto(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator, knowledge: Knowledge) -> np.ndarray:
    """`alie-auto`: `alie` (Baruch, Baruch & Goldberg, NeurIPS 2019) with the paper's z for this
    round's n participants and m attackers (`alie_z`: n = 50, m = 12 gives z ~ 0.58), scaled down
    if need be to pass the norm screens.

    Blind (secure aggregation) it sends its own update, as `alie` does: refused there.
    """
    stacked = _visible(update, benign)
    if stacked is None:
        return np.array(update, dtype=np.float32)
    n = max(knowledge.participants, stacked.shape[0] + knowledge.attackers)  # it sees the honest ones
    z = alie_z(n, knowledge.attackers)
    return _within_screens(stacked.mean(axis=0) - z * stacked.std(axis=0), knowledge, stacked).astype(np.float32)


BLIND_SACRIFICE = 1e6  # times clip_norm: beyond any encoding, which cuts it to the widest it has


def sacrifice(count: int | None = None) -> AttackFunction:
    """`sacrifice[:<count>]`: screening-aware collusion. `count` attackers send updates the screens
    must set aside; the others attack the units that remain.

    Screening lowers the rule's tolerance when it leaves fewer units than the rule needs
    (`fedlora.aggregate.robust.rule_after_screening`: `multi-krum:2` over 8 units, 2 of them
    screened, runs as `multi-krum:1`): an attack tailored to the configured rule and screens, as
    Shejwalkar & Houmansadr tailor theirs to the aggregation rule ("Manipulating the Byzantine",
    NDSS 2021). By default `count` is the fewest that force that fallback, n - min_units + 1,
    keeping at least one attacker. Sacrificed updates are twice as long as the screens allow (the
    clip bound, else max_norm_ratio times the longest honest update); the rest send `alie-auto`
    among the n - count units and m - count attackers left.

    Blind (secure aggregation) the sacrificed updates are far beyond any bound (masked unclipped,
    the encoding cuts them to its widest), so each sets aside its whole bucket, honest members
    included; the rest send `ipm-clip`, since `alie` needs the honest updates.
    """

    def collude(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator, knowledge: Knowledge) -> np.ndarray:
        n, m = knowledge.participants, knowledge.attackers
        sacrificed = count if count is not None else min(m - 1, max(0, n - make_rule(knowledge.rule).min_units() + 1))
        if knowledge.index >= sacrificed:
            if knowledge.secure:
                return ipm_clip(update, benign, rng, knowledge)
            return alie_auto(update, benign, rng, replace(knowledge, participants=n - sacrificed, attackers=m - sacrificed))
        stacked = _visible(update, benign)
        longest = float(np.linalg.norm(update if stacked is None else stacked, axis=-1).max())
        bound = knowledge.clip_norm if knowledge.clip_screen or knowledge.max_norm_ratio == 0 else knowledge.max_norm_ratio * longest
        norm = BLIND_SACRIFICE * knowledge.clip_norm if knowledge.secure else 2 * bound
        return (norm * _against_honest(update, benign)).astype(np.float32)

    return collude


@dataclass(frozen=True)
class _DefaultArg(SpecForm):
    """A form whose argument may be left out: `name` alone means `name:<default>` (None: the builder's own)."""

    default: float | None = 1.0
    default_text: str = ""  # what `default: None` means, for the usage line

    def usage(self) -> str:
        default = self.default_text if self.default is None else f"{self.default:g}"
        return f"{self.name}[:<{self.arg}>] ({self.range_text()}, default {default})"


def honest_update(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The update as trained: for data poisoning, where the harm was done in training."""
    return update


def flip_labels(examples: list[Example], label_names: list[str]) -> list[Example]:
    """Label flipping (data poisoning): every answer becomes the next one in `label_names`.

    The poisoned participant trains normally on wrong answers, so its update has the norm and
    shape of an honest one and passes every norm check (Tolpegin et al., ESORICS 2020).
    """
    shifted = {name: label_names[(k + 1) % len(label_names)] for k, name in enumerate(label_names)}
    return [replace(example, response=shifted.get(example.response, example.response)) for example in examples]


DATA_ATTACKS = ("label-flip",)  # attacks done in local training, not on the update


@dataclass(frozen=True)
class BadData:
    """What a simulated participant trains on instead of its shard (`simulation.bad_data`)."""

    kind: str  # a name in BAD_DATA_FORMS
    dataset: str = ""  # other-task: the dataset its records come from

    def examples(self, shard: list[Example], label_names: list[str], seed: int) -> list[Example]:
        """The records it trains on, as many as its shard holds (so its claimed count is true)."""
        if self.kind == "label-flip":
            return flip_labels(shard, label_names)
        return other_task(self.dataset, len(shard), label_names, seed)


BAD_DATA_FORMS = ("label-flip", "other-task:<dataset>")


def parse_bad_data(entries: list[str]) -> dict[int, BadData]:
    """`simulation.bad_data` ('<partition id>=<kind>' entries) as partition id -> BadData."""
    out: dict[int, BadData] = {}
    for entry in entries:
        where, equals, kind = (part.strip() for part in entry.partition("="))
        name, colon, dataset = kind.partition(":")
        problem = (
            "is not '<partition id>=<kind>'" if not (equals and where.isdigit())
            else f"names partition {where} twice" if int(where) in out
            else "needs a dataset after 'other-task:'" if name == "other-task" and not dataset
            else None if (name == "label-flip" and not colon) or name == "other-task"
            else f"has an unknown kind {kind!r}"
        )
        if problem:
            raise ValueError(f"simulation.bad_data: {entry!r} {problem}; kinds are {', '.join(BAD_DATA_FORMS)}")
        out[int(where)] = BadData(name, dataset)
    return out


def other_task(dataset: str, count: int, label_names: list[str], seed: int) -> list[Example]:
    """`count` records of another dataset (a built-in task or a .jsonl file), its answers mapped in
    sorted order onto `label_names` (kept as they are when the run's answers are free-form).

    A participant whose records answer another question: its update is as long as an honest one
    and honestly trained, and pulls the model towards nothing the federation asks.
    """
    from fedlora.config import DataSection
    from fedlora.data import load_examples

    records = load_examples(DataSection(dataset=dataset), seed)[:count]
    answers = sorted({record.response for record in records})
    mapped = {answer: label_names[k % len(label_names)] for k, answer in enumerate(answers)} if label_names else {}
    return [replace(record, response=mapped.get(record.response, record.response)) for record in records]
OMNISCIENT = ("alie", "alie-auto")  # no attack at all without the honest updates: refused under secure aggregation

ATTACK_FORMS: tuple[SpecForm, ...] = (
    SpecForm("sign-flip"),
    SpecForm("label-flip"),
    SpecForm("scaling", "factor"),
    SpecForm("gaussian", "std", low=0.0),
    _DefaultArg("alie", "z", low=0.0, low_open=True, default=1.0),
    SpecForm("alie-auto"),
    SpecForm("ipm", "eps", low=0.0, low_open=True),
    SpecForm("ipm-clip"),
    SpecForm("count-inflation", "claim", low=1, integer=True),
    _DefaultArg("sacrifice", "count", low=0, integer=True, default=None, default_text="the fewest that force the rule's fallback"),
    # Listed so that every error names it; a spec with ':' and no built-in name never gets here.
    SpecForm("<module>", "function"),
)
_BUILDERS: dict[str, Callable[..., AttackFunction]] = {
    "sign-flip": lambda: sign_flip,
    "label-flip": lambda: honest_update,
    "scaling": scaling,
    "gaussian": gaussian,
    "alie": alie,
    "alie-auto": lambda: alie_auto,
    "ipm": ipm,
    "ipm-clip": lambda: ipm_clip,
    "count-inflation": count_inflation,
    "sacrifice": sacrifice,
}


def _takes_knowledge(function: AttackFunction) -> bool:
    """Whether an attack takes a fourth argument (the `Knowledge`); a 3-argument one is called without."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C function): the original 3 arguments
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def _as_attack(spec: str, function: AttackFunction) -> Attack:
    """`function` as every caller calls it: with the attacker's knowledge, returning a `Sent`."""
    knows = _takes_knowledge(function)

    def attack(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator, knowledge: Knowledge = Knowledge()) -> Sent:
        out = function(update, benign, rng, knowledge) if knows else function(update, benign, rng)
        sent = out if isinstance(out, Sent) else Sent(np.asarray(out))
        refused = sorted(set(sent.metrics) & set(UNCLAIMABLE))
        if refused:
            raise ValueError(f"simulation.attack {spec!r} sets {refused} in Sent.metrics; claim a count with Sent.num_examples")
        return sent

    return attack


def _load_plugin(spec: str, module: str, function: str) -> AttackFunction:
    try:
        attack = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as err:  # ValueError: an empty module name
        forms = ", ".join(form.usage() for form in ATTACK_FORMS)
        raise ValueError(f"simulation.attack: cannot load {spec!r} ({err}); valid forms: {forms}") from err
    if not callable(attack):
        raise ValueError(f"simulation.attack: {spec!r} is not callable")
    return attack


def resolve_attack(spec: str) -> Attack:
    """Turn `simulation.attack` (a name in ATTACK_FORMS, or a plugin '<module>:<function>') into an attack."""
    name, colon, arg = spec.strip().partition(":")
    if colon and name not in _BUILDERS:
        return _as_attack(spec, _load_plugin(spec, name, arg))
    form = next((f for f in ATTACK_FORMS if f.name == name), None)
    if isinstance(form, _DefaultArg) and not colon:
        if form.default is None:
            return _as_attack(spec, _BUILDERS[name]())
        spec = f"{name}:{form.default!r}"
    name, value = parse_spec(spec, ATTACK_FORMS, "simulation.attack")
    return _as_attack(spec, _BUILDERS[name]() if value is None else _BUILDERS[name](value))


def attack_updates(
    updates: dict[str, np.ndarray], malicious: set[str], attack: Attack, rng: np.random.Generator, knowledge: Knowledge = Knowledge()
) -> dict[str, Sent]:
    """What each participant in `malicious` sends, seeing the honest updates; `knowledge` with this
    round's coalition (every participant in `updates`, the attackers among them in name order)."""
    benign = [vector for name, vector in updates.items() if name not in malicious]
    attackers = sorted(name for name in updates if name in malicious)
    coalition = replace(knowledge, participants=len(updates), attackers=len(attackers))
    return {name: attack(updates[name], benign, rng, replace(coalition, index=k)) for k, name in enumerate(attackers)}


def choose_adversaries(num_participants: int, fraction: float, seed: int) -> list[int]:
    """Partition ids of the malicious participants, fixed by the seed."""
    count = int(round(fraction * num_participants))
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(rng.choice(num_participants, size=count, replace=False).tolist())
