"""Attacks written as plugins, as a researcher would: `tests.plugin_attacks:little_is_enough` (the original
three arguments) and `tests.plugin_attacks:claims_everything` (with the attacker's knowledge, returning a `Sent`)."""

import numpy as np

from fedlora.attacks import Knowledge, Sent


def little_is_enough(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Baruch et al. 2019: stay within z standard deviations of the honest mean, against its direction."""
    stacked = np.stack(benign)
    return (stacked.mean(axis=0) - 1.5 * stacked.std(axis=0)).astype(np.float32)


def claims_everything(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator, knowledge: Knowledge) -> Sent:
    """A plugin with the fourth argument: its own update flipped to the clip bound, a huge count and a perfect loss."""
    flipped = -update * (knowledge.clip_norm / np.linalg.norm(update))
    return Sent(flipped.astype(np.float32), num_examples=10**6, metrics={"train_loss": 0.0})


def renames_itself(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator, knowledge: Knowledge) -> Sent:
    """Claims another partition id: the simulation's name of a node, which no attacker controls."""
    return Sent(update, metrics={"partition_id": 0})
