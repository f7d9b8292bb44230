"""Typed configs: YAML defaults plus ``--set key.sub=value`` overrides, resolved config saved per run.

Each command defines a pydantic model for its config (``extra="forbid"`` so that typos fail loudly)
and loads it with :func:`load_config`. The fully resolved config is written next to the outputs
with :func:`save_resolved_config`, timm-style.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import UserError
from pipeline.runtime.atomic import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
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
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def default_config_path(name: str) -> Path:
    """``configs/<name>.yaml`` in the repository."""
    return CONFIG_DIR / f"{name}.yaml"


def load_config(
    model: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Defaults of ``model`` <- ``base`` <- YAML ``path`` <- ``overrides``; validated."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        source = f" ({path})" if path else ""
        raise ConfigError(f"invalid config{source}:\n{err}") from err


def save_resolved_config(config: BaseModel, out_dir: str | Path, name: str = RESOLVED_CONFIG_NAME) -> Path:
    out = Path(out_dir) / name
    atomic_write_text(out, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """``--config`` (defaults to ``configs/<default_name>.yaml``) and repeatable ``--set`` overrides."""
    parser.add_argument(
        "--config",
        default=str(default_config_path(default_name)),
        help=f"YAML config (default: configs/{default_name}.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-3 (repeatable)",
    )


def config_from_args(model: type[T], args: argparse.Namespace, **cli_values: Any) -> T:
    """Config from ``--config``/``--set``; explicit CLI flags (non-None ``cli_values``) win last.

    ``cli_values`` keys use dots for nesting, e.g. ``{"data.manifest": args.manifest}``.
    """
    overrides = list(args.overrides)
    overrides += [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                  for k, v in cli_values.items() if v is not None]
    path = args.config if args.config and Path(args.config).exists() else None
    return load_config(model, path, overrides)
