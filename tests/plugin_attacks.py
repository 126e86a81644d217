"""An omniscient attack written as a plugin, as a researcher would: `tests.plugin_attacks:little_is_enough`."""

import numpy as np


def little_is_enough(update: np.ndarray, benign: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Baruch et al. 2019: stay within z standard deviations of the honest mean, against its direction."""
    stacked = np.stack(benign)
    return (stacked.mean(axis=0) - 1.5 * stacked.std(axis=0)).astype(np.float32)
