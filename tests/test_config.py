import tomllib
from pathlib import Path

import pytest

from fedlora.config import Config, ConfigError, build_config, config_from_flat, load_config


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = Config()
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["federation.rounds=7", "lora.target_modules=q_proj,v_proj", "train.lr=0.01", "secagg.enabled=false"])
    assert cfg.federation.rounds == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == pytest.approx(0.01)


def test_unknown_key_names_the_key_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key federation\.roundz.*rounds"):
        load_config(None, ["federation.roundz=3"])


def test_unknown_section_lists_sections() -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[fedration\].*federation"):
        build_config({"fedration": {"rounds": 1}})


def test_bad_value_names_key_and_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization: 'nf3' is not one of nf4, int8, none"):
        load_config(None, ["model.quantization=nf3"])
    with pytest.raises(ConfigError, match=r"federation\.rounds: expected an integer"):
        load_config(None, ["federation.rounds=three"])
    with pytest.raises(ConfigError, match=r"federation\.min_participants"):
        load_config(None, ["federation.participants=2", "federation.min_participants=5"])


def test_missing_file_and_bad_attack_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="simulation.attack"):
        load_config(None, ["simulation.adversaries=0.25", "simulation.attack=teleport"])


def test_flower_run_config_maps_onto_sections() -> None:
    cfg = config_from_flat({"config-file": "", "federation.rounds": 5, "lora.r": 4})
    assert (cfg.federation.rounds, cfg.lora.r) == (5, 4)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    cfg = load_config(path, [])
    assert cfg.federation.rounds >= 1


EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("robust", ["robust.toml", "robust-secure.toml"])
def test_the_robust_examples_are_clean_and_the_attack_file_layers_on_them_key_by_key(robust: str) -> None:
    clean = load_config(EXAMPLES / robust, [])
    assert clean.simulation.adversaries == 0  # a clean starting point: what the defences cost with nobody attacking
    attacked = load_config([EXAMPLES / robust, EXAMPLES / "attack.toml"], ["federation.seed=3"])
    assert (attacked.simulation.adversaries, attacked.simulation.attack) == (0.2, "scaling:10")
    assert (attacked.robust, attacked.lora, attacked.secagg) == (clean.robust, clean.lora, clean.secagg)
    assert attacked.federation.seed == 3  # overrides still win over every file


def test_fedlora_config_layers_repeated_config_files(capsys: pytest.CaptureFixture[str]) -> None:
    from fedlora.cli import main

    assert main(["config", "--config", str(EXAMPLES / "robust.toml"), "--config", str(EXAMPLES / "attack.toml")]) == 0
    printed = build_config(tomllib.loads(capsys.readouterr().out))
    assert (printed.robust.rule, printed.simulation.attack) == ("geomedian", "scaling:10")


def test_a_missing_layer_is_named() -> None:
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load_config([EXAMPLES / "robust.toml", EXAMPLES / "nope.toml"])


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["robust.rule=multi-krum:2", "federation.participants=6"], "needs at least 7 units per round, got 6"),
        (["robust.rule=median", "secagg.enabled=true", "federation.participants=8", "secagg.bucket_size=4"], "got 2"),
        (["robust.rule=krum"], "valid forms: mean, trimmed-mean:<beta>"),
    ],
)
def test_a_robust_rule_that_cannot_work_with_a_rounds_units_is_refused_at_load_time(overrides, words) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith("robust.rule") and words in str(err.value)
