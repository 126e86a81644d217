"""Model-poisoning attacks for simulated adversaries, behind one registry.

An attack maps a malicious participant's honest update (a flat float32 vector) to the update
it sends. `benign` holds this round's honest updates: omniscient attacks (`alie`, `ipm`) read
them. Under secure aggregation nobody sees them and attacks get `benign = []` (docs/decisions.md,
"Simulated attacks under secure aggregation run on the participant, blind"); each attack says
what it does then. `simulation.attack` also takes a plugin `<module>:<function>` with the same
signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from fedlora.aggregate.robust import SpecForm, parse_spec

if TYPE_CHECKING:  # the secure-aggregation stages import this module; they need no torch
    from fedlora.data import Example

Attack = Callable[[np.ndarray, list[np.ndarray], np.random.Generator], np.ndarray]


def sign_flip(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    return -update


def scaling(factor: float) -> Attack:
    def scale(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        return update * np.float32(factor)

    return scale


def gaussian(std: float) -> Attack:
    def noise(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        return rng.normal(0.0, std, size=update.shape).astype(np.float32)

    return noise


def _visible(update: np.ndarray, benign: list[np.ndarray]) -> np.ndarray | None:
    """The honest updates an omniscient attacker can combine with its own, stacked as float64:
    those of its shape (heterogeneous LoRA ranks give other lengths) with finite values (a broken
    honest update is screened out later anyway). None when there is none."""
    usable = [b for b in benign if np.shape(b) == update.shape and np.isfinite(b).all()]
    return np.stack(usable).astype(np.float64) if usable else None


def alie(z: float) -> Attack:
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


def ipm(eps: float) -> Attack:
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


@dataclass(frozen=True)
class _DefaultArg(SpecForm):
    """A form whose argument may be left out: `name` alone means `name:<default>`."""

    default: float = 1.0

    def usage(self) -> str:
        return f"{self.name}[:<{self.arg}>] ({self.range_text()}, default {self.default:g})"


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

ATTACK_FORMS: tuple[SpecForm, ...] = (
    SpecForm("sign-flip"),
    SpecForm("label-flip"),
    SpecForm("scaling", "factor"),
    SpecForm("gaussian", "std", low=0.0),
    _DefaultArg("alie", "z", low=0.0, low_open=True, default=1.0),
    SpecForm("ipm", "eps", low=0.0, low_open=True),
    # Listed so that every error names it; a spec with ':' and no built-in name never gets here.
    SpecForm("<module>", "function"),
)
_BUILDERS: dict[str, Callable[..., Attack]] = {
    "sign-flip": lambda: sign_flip,
    "label-flip": lambda: honest_update,
    "scaling": scaling,
    "gaussian": gaussian,
    "alie": alie,
    "ipm": ipm,
}


def _load_plugin(spec: str, module: str, function: str) -> Attack:
    try:
        attack = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as err:  # ValueError: an empty module name
        forms = ", ".join(form.usage() for form in ATTACK_FORMS)
        raise ValueError(f"simulation.attack: cannot load {spec!r} ({err}); valid forms: {forms}") from err
    if not callable(attack):
        raise ValueError(f"simulation.attack: {spec!r} is not callable")
    return attack


def resolve_attack(spec: str) -> Attack:
    """Turn `simulation.attack` ('sign-flip', 'scaling:<factor>', 'gaussian:<std>', 'alie[:<z>]',
    'ipm:<eps>' or a plugin '<module>:<function>') into an attack."""
    name, colon, arg = spec.strip().partition(":")
    if colon and name not in _BUILDERS:
        return _load_plugin(spec, name, arg)
    form = next((f for f in ATTACK_FORMS if f.name == name), None)
    if isinstance(form, _DefaultArg) and not colon:
        spec = f"{name}:{form.default!r}"
    name, value = parse_spec(spec, ATTACK_FORMS, "simulation.attack")
    return _BUILDERS[name]() if value is None else _BUILDERS[name](value)


def attack_updates(
    updates: dict[str, np.ndarray], malicious: set[str], attack: Attack, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """What each participant sends when those in `malicious` attack; they see the honest updates."""
    benign = [vector for name, vector in updates.items() if name not in malicious]
    return {name: np.asarray(attack(vector, benign, rng)) if name in malicious else vector for name, vector in updates.items()}


def choose_adversaries(num_participants: int, fraction: float, seed: int) -> list[int]:
    """Partition ids of the malicious participants, fixed by the seed."""
    count = int(round(fraction * num_participants))
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(rng.choice(num_participants, size=count, replace=False).tolist())
