import argparse
from importlib.resources import files

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    StrictModel,
    add_config_arguments,
    apply_overrides,
    config_from_args,
    config_source,
    load_config,
    save_resolved_config,
)


class Train(StrictModel):
    lr: float = 1e-3
    epochs: int = 2


class Example(StrictModel):
    name: str = "x"
    sizes: list[int] = [64]
    train: Train = Train()


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-yaml\ntrain:\n  lr: 0.5\n")
    cfg = load_config(Example, path, ["train.epochs=7", "sizes=[32, 128]"])
    assert cfg.name == "from-yaml"
    assert cfg.train.lr == 0.5
    assert cfg.train.epochs == 7
    assert cfg.sizes == [32, 128]


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(Example, None, ["trian.lr=1"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["no-equals-sign"])


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Example, None, ["train.lr=0.25"])
    out = save_resolved_config(cfg, tmp_path)
    assert Example.model_validate(yaml.safe_load(out.read_text())) == cfg


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="clasify.yaml"):
        config_source(str(tmp_path / "clasify.yaml"), "classify")


def test_config_names_a_file_or_a_shipped_preset(tmp_path, monkeypatch):
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\n")
    assert config_source(str(own), "run") == own
    # no --config: the command's preset, read as package data (not from a path in the checkout)
    assert config_source(None, "run") == files("pipeline.configs") / "run.yaml"
    monkeypatch.chdir(tmp_path)  # a preset's name works from any folder
    assert config_source("classify", "run") == files("pipeline.configs") / "classify.yaml"


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, "run")
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\ntrain: {lr: 0.5}\n")
    args = parser.parse_args(["--config", str(own), "--set", "train.epochs=7", "--print-config"])
    with pytest.raises(SystemExit) as stop:
        config_from_args(Example, args, name="flag")
    assert stop.value.code == 0
    printed = Example.model_validate(yaml.safe_load(capsys.readouterr().out))
    assert printed == Example(name="flag", train=Train(lr=0.5, epochs=7))


def test_invalid_config_is_described_in_one_line_by_key():
    with pytest.raises(ConfigError) as err:
        load_config(Example, None, ["train.lr=fast", "trian.lr=1"])
    message = str(err.value)
    assert "\n" not in message and "train.lr:" in message and "trian:" in message
