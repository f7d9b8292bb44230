import pytest
import yaml

from pipeline.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
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
