"""The shipped presets (configs/*.yaml) name only known keys and hold only what they change.

The pydantic models hold the only defaults: a preset value equal to its default would hide a later
change of that default (the preset silently keeps the old value), so every key of a preset must
change the resolved config.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from pydantic import BaseModel

from pipeline.commands.report import ReportConfig
from pipeline.config import (
    ConfigError,
    StrictModel,
    default_config_path,
    load_config,
    preset_names,
    read_yaml,
)
from pipeline.data.demo.cohort import DemoCohortConfig
from pipeline.data.ingest import IngestConfig
from pipeline.data.scale import ScaleCohortConfig
from pipeline.data.sources import ManifestConfig
from pipeline.explain.run import ExplainConfig
from pipeline.inference import ApplyConfig
from pipeline.prior.train import PriorConfig
from pipeline.simplebits.audit import AuditConfig
from pipeline.simplebits.condense import CondenseConfig
from pipeline.simplebits.joint import JointConfig
from pipeline.training.classifier import ClassifyConfig
from pipeline.workflow import RunConfig

# preset name -> the config model it is loaded into (the command's config_from_args model)
PRESET_MODELS: dict[str, type[BaseModel]] = {
    "apply": ApplyConfig,
    "classify": ClassifyConfig,
    "demo_cohort": DemoCohortConfig,
    "explain": ExplainConfig,
    "ingest": IngestConfig,
    "manifest": ManifestConfig,
    "prior": PriorConfig,
    "prior_in_domain": PriorConfig,
    "report": ReportConfig,
    "run": RunConfig,
    "scale_cohort": ScaleCohortConfig,
    "simplify_audit": AuditConfig,
    "simplify_condense": CondenseConfig,
    "simplify_joint": JointConfig,
}
# values the command line always supplies (the model has no default for them)
REQUIRED_FROM_COMMAND_LINE: dict[str, dict[str, Any]] = {
    "manifest": {"format": "folder", "root": "images", "out": "manifest.csv"},
}


def key_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key of a nested mapping, sections and the values inside them, as paths."""
    for key, value in data.items():
        yield (*prefix, key)
        if isinstance(value, Mapping):
            yield from key_paths(value, (*prefix, key))


def without(data: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    pruned = copy.deepcopy(dict(data))
    node = pruned
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return pruned


def repeated_defaults(model: type[BaseModel], preset: Mapping[str, Any],
                      required: Mapping[str, Any] | None = None) -> list[str]:
    """Keys of ``preset`` whose removal leaves the resolved config unchanged.

    Loading the preset also fails (ConfigError) on a key the model does not know.
    """
    required = dict(required or {})
    resolved = load_config(model, base={**required, **preset})

    def resolved_without(path: tuple[str, ...]) -> BaseModel | None:
        try:
            return load_config(model, base={**required, **without(preset, path)})
        except ConfigError:  # e.g. one entry of a mapping that must be given whole: the key is needed
            return None

    return [".".join(path) for path in key_paths(preset) if resolved_without(path) == resolved]


@pytest.mark.parametrize("name", preset_names())
def test_preset_names_known_keys_and_changes_only(name):
    assert name in PRESET_MODELS, f"configs/{name}.yaml: add its config model to PRESET_MODELS"
    preset = read_yaml(default_config_path(name))
    repeated = repeated_defaults(PRESET_MODELS[name], preset, REQUIRED_FROM_COMMAND_LINE.get(name))
    assert not repeated, f"configs/{name}.yaml repeats model defaults: {repeated}"


# --- the check itself can fail ------------------------------------------------------------------


class Net(StrictModel):
    name: str = "small"
    kwargs: dict[str, Any] = {}


class Example(StrictModel):
    epochs: int = 2
    net: Net = Net(kwargs={"width": 8})


def test_a_repeated_default_is_found():
    assert repeated_defaults(Example, {"epochs": 2, "net": {"kwargs": {"width": 8}}}) == [
        "epochs", "net", "net.kwargs"]
    assert repeated_defaults(Example, {"epochs": 3, "net": {"name": "large"}}) == []


def test_an_unknown_preset_key_is_an_error():
    with pytest.raises(ConfigError, match="epoch"):
        repeated_defaults(Example, {"epoch": 3})


def test_a_partial_section_keeps_its_field_default():
    # the preset changes one value: the rest of the section is the field's default, not the class's
    assert load_config(Example, base={"net": {"name": "small"}}).net.kwargs == {"width": 8}
    # --set changes one value of the complete tree
    assert load_config(Example, overrides=["net.kwargs.depth=3"]).net.kwargs == {"width": 8, "depth": 3}
    # another network starts from its class defaults: the default network's kwargs would not fit it
    assert load_config(Example, base={"net": {"name": "large"}}).net.kwargs == {}
