import numpy as np
import pytest

from fedlora.attacks import choose_adversaries, resolve_attack


def test_builtin_attacks() -> None:
    rng = np.random.default_rng(0)
    update = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(resolve_attack("sign-flip")(update, [], rng), -update)
    np.testing.assert_array_equal(resolve_attack("scaling:10")(update, [], rng), 10 * update)
    noise = resolve_attack("gaussian:2.0")(np.zeros(20000, np.float32), [], rng)
    assert abs(noise.std() - 2.0) < 0.05


def test_plugin_attack_is_loaded_by_module_and_name() -> None:
    attack = resolve_attack("tests.plugin_attacks:little_is_enough")
    benign = [np.array([1.0, 0.0], np.float32), np.array([3.0, 0.0], np.float32)]
    np.testing.assert_allclose(attack(benign[0], benign, np.random.default_rng(0)), [2.0 - 1.5, 0.0])


def test_unknown_attack_lists_choices() -> None:
    with pytest.raises(ValueError, match="sign-flip, scaling"):
        resolve_attack("teleport")
    with pytest.raises(ValueError, match="cannot load"):
        resolve_attack("no_such_module_xyz:fn")


def test_adversaries_are_fixed_by_seed() -> None:
    first = choose_adversaries(10, 0.3, seed=4)
    assert first == choose_adversaries(10, 0.3, seed=4)
    assert len(first) == 3 and len(set(first)) == 3 and all(0 <= i < 10 for i in first)
