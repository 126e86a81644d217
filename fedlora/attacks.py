"""Model-poisoning attacks for simulated adversaries, behind one registry.

An attack maps a malicious participant's honest update (a flat float32 vector) to the
update it sends; `benign` holds this round's honest updates so omniscient attacks
(e.g. "A Little Is Enough", Baruch et al. 2019) can be written as plugins
`<module>:<function>` with the same signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

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


def _number(spec: str, arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise ValueError(f"simulation.attack: {spec!r} needs a number after ':'") from None


def resolve_attack(spec: str) -> Attack:
    """Turn 'sign-flip', 'scaling:<factor>', 'gaussian:<std>' or '<module>:<function>' into an attack."""
    name, _, arg = spec.partition(":")
    if name == "sign-flip" and not arg:
        return sign_flip
    if name == "scaling":
        return scaling(_number(spec, arg))
    if name == "gaussian":
        return gaussian(_number(spec, arg))
    if arg:
        try:
            function = getattr(importlib.import_module(name), arg)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"simulation.attack: cannot load {spec!r} ({err})") from err
        if not callable(function):
            raise ValueError(f"simulation.attack: {spec!r} is not callable")
        return function
    raise ValueError(
        f"simulation.attack: {spec!r} is not one of sign-flip, scaling:<factor>, gaussian:<std>, <module>:<function>"
    )


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
