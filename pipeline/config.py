"""Typed configs: YAML defaults plus ``--set key.sub=value`` overrides, resolved config saved per run.

Each command defines a pydantic model for its config (``extra="forbid"`` so that typos fail loudly)
and loads it with :func:`load_config`. The models hold the only defaults; a shipped preset
(``configs/<name>.yaml``, installed as the package data ``pipeline.configs``) holds only what that
command changes (tests/test_config_presets.py checks both). The fully resolved config is written
next to the outputs with :func:`save_resolved_config`, timm-style, and ``--print-config`` shows it
without running anything.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterable, Mapping
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import UserError
from pipeline.runtime.atomic import atomic_write_text

# configs/ of the repository, installed as this package's data (setup.py): found the same way in a
# checkout and in a wheel install, never through a path relative to the source tree
PRESET_PACKAGE = "pipeline.configs"
RESOLVED_CONFIG_NAME = "config.resolved.yaml"

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ConfigError(UserError):
    """A config file or override that cannot be applied."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``--set`` values into ``data``. Overrides of a network's ``name`` go first: one that names
    another network empties its section (the old network's kwargs would not fit the new one), and
    the section's other overrides then apply to the new network whatever their order. (A top-level
    ``name`` names the config, not a network.)"""
    parsed = [(item, *parse_override(item)) for item in overrides]
    parsed.sort(key=lambda entry: entry[1][-1] != "name")  # stable: otherwise the order given
    for item, path, value in parsed:
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        if len(path) > 1 and path[-1] == "name" and node.get("name", value) != value:
            node.clear()
        node[path[-1]] = value
    return data


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path | Traversable) -> dict[str, Any]:
    path = Path(path) if isinstance(path, str) else path
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def preset_names() -> list[str]:
    """Names of the shipped presets (``configs/<name>.yaml``)."""
    return sorted(entry.name.removesuffix(".yaml") for entry in files(PRESET_PACKAGE).iterdir()
                  if entry.name.endswith(".yaml"))


def default_config_path(name: str) -> Traversable:
    """The shipped preset ``configs/<name>.yaml`` (package data)."""
    return files(PRESET_PACKAGE) / f"{name}.yaml"


def config_source(config: str | None, preset: str) -> Path | Traversable:
    """What ``--config`` names: a YAML file, else a shipped preset's name; ``preset`` when not given.

    A path that exists nowhere is an error: running on other settings than the user asked for
    would be worse than stopping.
    """
    if config is None:
        return default_config_path(preset)
    path = Path(config)
    if path.is_file():
        return path
    if config in preset_names():
        return default_config_path(config)
    raise ConfigError(f"config file not found: {config} "
                      f"(nor is it a shipped preset: {', '.join(preset_names())})")


def load_config(
    model: type[T],
    path: str | Path | Traversable | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Defaults of ``model`` <- ``base`` <- YAML ``path`` <- ``overrides``; validated."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = apply_overrides(with_defaults(model, data), overrides)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        source = f" ({path})" if path else ""
        raise ConfigError(f"invalid config{source}: {describe_validation_error(err)}") from err


def describe_validation_error(err: ValidationError) -> str:
    """``"train.lr: Input should be a valid number; trian: Extra inputs are not permitted"``: each
    problem by its key, without pydantic's echo of the whole input (long, and it may hold paths)."""
    return "; ".join(f"{'.'.join(map(str, item['loc'])) or '<top level>'}: "
                     f"{item['msg'].removeprefix('Value error, ')}" for item in err.errors())


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML, in the model's field order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def with_defaults(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every value it leaves out taken from ``model``'s defaults, section by section.

    A section given in part (in a preset) keeps the rest of its *field's* default, which may differ
    from its class's (``model: ModelConfig = ModelConfig(kwargs=...)``), and ``--set`` then changes
    single values of the complete tree (``--set model.kwargs.dropout=0.1`` keeps the other kwargs).
    Only config sections are merged: any other value a preset gives, a ``kwargs`` mapping included,
    replaces the default whole, and a section naming another network (``model: {name: ...}``)
    starts from its class defaults: the default network's kwargs would not fit it. Unknown keys
    stay, so that validation names them.
    """
    defaults = {name: field.get_default(call_default_factory=True)
                for name, field in model.model_fields.items() if not field.is_required()}
    return _complete(defaults, data)


def _complete(defaults: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    completed = dict(data)
    for name, default in defaults.items():
        if name not in data:
            completed[name] = (default.model_dump() if isinstance(default, BaseModel)
                               else copy.deepcopy(default))
        elif isinstance(default, BaseModel) and isinstance(data[name], Mapping) \
                and not _names_another_network(default, data[name]):
            completed[name] = _complete(dict(default), data[name])
    return completed


def _names_another_network(default: BaseModel, section: Mapping[str, Any]) -> bool:
    """A section naming another network than its default keeps none of the default's settings."""
    return "name" in section and section["name"] != getattr(default, "name", section["name"])


def save_resolved_config(config: BaseModel, out_dir: str | Path, name: str = RESOLVED_CONFIG_NAME) -> Path:
    out = Path(out_dir) / name
    atomic_write_text(out, dump_config(config))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """``--config`` (defaults to the preset ``configs/<default_name>.yaml``), repeatable ``--set``
    overrides and ``--print-config``."""
    parser.add_argument(
        "--config",
        help=f"YAML config file, or the name of a shipped preset (default: {default_name}, i.e. "
             f"configs/{default_name}.yaml)",
    )
    parser.set_defaults(config_preset=default_name)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-3 (repeatable)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (preset, --config, --set and flags) as YAML and exit",
    )


def config_from_args(model: type[T], args: argparse.Namespace, **cli_values: Any) -> T:
    """Config from ``--config``/``--set``; explicit CLI flags (non-None ``cli_values``) win last.

    ``cli_values`` keys use dots for nesting, e.g. ``{"data.manifest": args.manifest}``. With
    ``--print-config`` the resolved config is printed and the command exits here, like ``--help``.
    """
    overrides = list(args.overrides)
    overrides += [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                  for k, v in cli_values.items() if v is not None]
    config = load_config(model, config_source(args.config, args.config_preset), overrides)
    if args.print_config:
        print(dump_config(config), end="")
        raise SystemExit(0)
    return config
