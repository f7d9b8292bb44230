"""Weights named by an MLflow URI: ``models:/NAME/VERSION`` (or ``models:/NAME@ALIAS``, ``models:/m-<id>``)
and ``runs:/RUN_ID/PATH``, wherever a command takes weights (``--classifier``, ``--independent``,
``--prior``, ``--simplifier``, ``--classifier-init``, and the same fields of its config).

MLflow downloads the model (or run artifact) to a scratch folder; the package's own weights file in it
(``extra_files/<stem>.safetensors`` of a model logged by :meth:`Tracker.log_model`, or a loose
``.safetensors``) is handed to the package's loaders with its side-car ``.json`` beside it, exactly as
a local path would be. The scratch folders are removed when the process exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger(__name__)

SCHEMES = ("models:/", "runs:/")
_scratch: list[str] = []


def is_model_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEMES)


def local_weights(value: str | None, what: str, tracking_uri: str | None = None) -> str | None:
    """``value`` itself when it is a local path (or None); for a ``models:/`` or ``runs:/`` URI, the
    downloaded package weights file. ``what`` names the flag or config field in errors;
    ``tracking_uri``: the store the URI refers to (default ``MLFLOW_TRACKING_URI``)."""
    if not is_model_uri(value):
        return value
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError(f"{what} {value}: no MLflow store to look it up in; set MLFLOW_TRACKING_URI, "
                        "tracking.uri or --run DIR")
    local = Path(_download(value, what, uri))
    weights = local if local.is_file() else _package_weights(local, value, what)
    log.info("%s %s: %s", what, value, weights)
    return str(weights)


def with_local_weights(config: Any, fields: Mapping[str, str]) -> Any:
    """``config`` (a command's pydantic config) with each weights field that holds a ``models:/`` or
    ``runs:/`` URI replaced by the downloaded weights file. ``fields``: flag -> dotted field, e.g.
    ``{"--independent": "independent.path"}``; the URIs are looked up in ``config.tracking.uri``'s store."""
    tracking_uri = getattr(getattr(config, "tracking", None), "uri", None)
    for what, dotted in fields.items():
        *parents, leaf = dotted.split(".")
        owners = [config]
        for name in parents:
            owners.append(getattr(owners[-1], name))
        value = getattr(owners[-1], leaf)
        local = local_weights(value, what, tracking_uri)
        if local == value:
            continue
        updated = owners[-1].model_copy(update={leaf: local})
        for owner, name in zip(reversed(owners[:-1]), reversed(parents)):
            updated = owner.model_copy(update={name: updated})
        config = updated
    return config


def _download(value: str, what: str, tracking_uri: str) -> str:
    """``value`` downloaded into a fresh scratch folder; a one-line :class:`UserError` if MLflow cannot."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from pipeline.runtime.tracking import _disable_telemetry, fluent_store

    _disable_telemetry()
    dst = tempfile.mkdtemp(prefix="simplebits-weights-")
    _scratch.append(dst)
    # models:/ URIs resolve through the global tracking URI whatever download_artifacts is given; the
    # registry is the tracking store's (where Tracker.log_model registers)
    with fluent_store(tracking_uri):
        try:
            local = download_artifacts(artifact_uri=value, dst_path=dst, tracking_uri=tracking_uri,
                                       registry_uri=tracking_uri)
        except (MlflowException, OSError, ValueError) as err:
            reason = " ".join(str(err).split())[:300]
            raise UserError(f"{what} {value}: cannot fetch it from {tracking_uri} ({reason})") from None
        if Path(local).is_file():  # a loose weights file: its side-car, if the run has one, goes beside it
            try:
                sidecar = value[: len(value) - len(Path(local).suffix)] + ".json"
                download_artifacts(artifact_uri=sidecar, dst_path=str(Path(local).parent),
                                   tracking_uri=tracking_uri, registry_uri=tracking_uri)
            except (MlflowException, OSError):
                log.info("%s %s: no .json side-car beside it in the run", what, value)
    return local


def _package_weights(folder: Path, value: str, what: str) -> Path:
    """The one ``.safetensors`` file of the downloaded folder (with its side-car ``.json``)."""
    found = sorted(p for p in folder.rglob("*.safetensors") if p.with_suffix(".json").is_file())
    if len(found) != 1:
        names = ", ".join(p.relative_to(folder).as_posix() for p in found) or "none"
        raise UserError(f"{what} {value}: expected one .safetensors file with its .json side-car in it, "
                        f"found {names} (log networks with simplebits' training commands)")
    return found[0]


@atexit.register
def _remove_scratch() -> None:
    for folder in _scratch:
        shutil.rmtree(folder, ignore_errors=True)
