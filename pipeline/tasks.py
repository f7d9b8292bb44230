"""The task registry: every binary target the pipeline trains, audits and reports, as data.

A task turns manifest rows into labels 1.0 / 0.0 / NaN (NaN = no label for this task):

- ``finding``: a finding column of the manifest (:data:`FINDINGS`; raw CheXpert-style codes 1, 0,
  -1 = uncertain, blank = not mentioned) under the task's label policy: ``uncertain`` (drop ->
  unlabeled, or positive / negative), ``blank`` (unlabeled or negative) and ``negative_requires``
  (findings that must be 1 for a negative to count: the SimpleBits paper's MIMIC policy needs
  ``no_finding``);
- ``sex``: M = 1, F = 0;
- ``age``: age >= ``age_threshold`` = 1, below = 0;
- ``view``: ``positive_view`` (AP) = 1, ``negative_view`` (PA) = 0, other views unlabeled.

Each task also carries its per-stage config deviations (``settings``: sections ``classify``,
``independent``, ``joint``, ``audit``), the one place per-task settings live: ``simplebits run``
merges them into its sections for that task (:meth:`pipeline.workflow.RunConfig.for_task`), the
single-step commands into their own config (:func:`stage_settings`).

Built-in tasks: every finding of :data:`FINDINGS` (policy: uncertain dropped, blank unlabeled),
``effusion_paper`` (the paper's MIMIC policy), ``sex``, ``age_65`` and ``view_ap``. More tasks:

- :func:`register_task` in Python;
- a ``task_definitions`` mapping in the run config (``{name: {kind: finding, column: edema,
  uncertain: positive}}``); an entry with a built-in's name is merged onto the built-in, so
  ``{sex: {settings: {audit: {audit: {lam: 1.0}}}}}`` changes only that value;
- a YAML file of such a mapping named by the environment variable ``SIMPLEBITS_TASKS`` (read once,
  on first use, in every command and every torchrun process).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import AfterValidator, BeforeValidator, ValidationError, model_validator

from pipeline.config import StrictModel
from pipeline.errors import UserError

#: CheXpert / MIMIC-CXR-JPG label header -> manifest column (the 14 CheXpert labels).
CHEXPERT_FINDINGS: dict[str, str] = {
    "No Finding": "no_finding",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung_opacity",
    "Lung Lesion": "lung_lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "effusion",
    "Pleural Other": "pleural_other",
    "Fracture": "fracture",
    "Support Devices": "support_devices",
}
#: NIH ChestX-ray14 ``Finding Labels`` entry -> manifest column (its 14 findings and "No Finding").
NIH_FINDINGS: dict[str, str] = {
    "No Finding": "no_finding",
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Effusion": "effusion",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Hernia": "hernia",
    "Infiltration": "infiltration",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pleural_Thickening": "pleural_thickening",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}
#: Canonical finding columns of the manifest: CheXpert's 14 labels, then NIH's findings CheXpert lacks.
#: Pleural effusion keeps the manifest's historical column name ``effusion``.
FINDINGS: tuple[str, ...] = (
    *CHEXPERT_FINDINGS.values(),
    *(c for c in NIH_FINDINGS.values() if c not in CHEXPERT_FINDINGS.values()),
)
#: Reader-facing names of the findings (reports, help texts).
FINDING_NAMES: dict[str, str] = {
    **{column: header.lower() for header, column in CHEXPERT_FINDINGS.items()},
    **{column: label.replace("_", " ").lower() for label, column in NIH_FINDINGS.items()},
    "effusion": "pleural effusion",
}

TaskKind = Literal["finding", "sex", "age", "view"]
TaskSection = Literal["classify", "independent", "joint", "audit"]
TASK_SECTIONS: tuple[str, ...] = ("classify", "independent", "joint", "audit")
DEFAULT_TASKS: tuple[str, ...] = ("effusion", "sex")
TASKS_ENV = "SIMPLEBITS_TASKS"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KIND_COLUMNS = {"sex": "sex", "age": "age", "view": "view"}


class TaskSpec(StrictModel):
    """One binary task: how its label comes from the manifest, and its per-stage settings."""

    name: str
    kind: TaskKind = "finding"
    column: str = ""  # manifest column; default: the name (finding), else sex / age / view
    description: str = ""  # what the classifier recognises, in words (reports); default from the column
    class_names: tuple[str, str] | None = None  # (negative, positive) names; default from the kind
    # label policy of a finding (raw codes 1, 0, -1 = uncertain, blank = not mentioned)
    uncertain: Literal["drop", "positive", "negative"] = "drop"
    blank: Literal["unlabeled", "negative"] = "unlabeled"
    negative_requires: list[str] = []  # findings that must be 1 for a negative to count (paper: no_finding)
    age_threshold: float | None = None  # age: positive = age >= threshold
    positive_view: str = "AP"  # view: this view = 1, negative_view = 0, any other view unlabeled
    negative_view: str = "PA"
    # per-stage config deviations, merged into that stage's config for this task only
    # (a mapping naming a network, i.e. with a ``name`` key, replaces the old one whole)
    settings: dict[TaskSection, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"task name {self.name!r} must be lower-case letters, digits and _ "
                             "(it names folders)")
        if not self.column:
            self.column = self.name if self.kind == "finding" else _KIND_COLUMNS[self.kind]
        if self.kind == "finding" and self.column not in FINDINGS:
            raise ValueError(f"task {self.name!r}: column {self.column!r} is not a finding column; "
                             f"known: {', '.join(FINDINGS)}")
        if self.kind != "finding" and self.column != _KIND_COLUMNS[self.kind]:
            raise ValueError(f"task {self.name!r}: a {self.kind} task reads column "
                             f"{_KIND_COLUMNS[self.kind]!r}, not {self.column!r}")
        unknown = [c for c in self.negative_requires if c not in FINDINGS]
        if unknown:
            raise ValueError(f"task {self.name!r}: negative_requires {unknown} are not finding columns")
        if self.negative_requires and self.kind != "finding":
            raise ValueError(f"task {self.name!r}: negative_requires applies to finding tasks only")
        if (self.kind == "age") != (self.age_threshold is not None):
            raise ValueError(f"task {self.name!r}: age_threshold is required for, and only for, an age task")
        self.positive_view = self.positive_view.strip().upper()
        self.negative_view = self.negative_view.strip().upper()
        if self.kind == "view" and self.positive_view == self.negative_view:
            raise ValueError(f"task {self.name!r}: positive_view and negative_view must differ")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """Every manifest column the labels are computed from."""
        return tuple(dict.fromkeys([self.column, *self.negative_requires]))

    @property
    def label_names(self) -> tuple[str, str]:
        """(negative, positive) class names for readers."""
        if self.class_names is not None:
            return self.class_names
        if self.kind == "sex":
            return ("female", "male")
        if self.kind == "age":
            return (f"age < {self.age_threshold:g}", f"age >= {self.age_threshold:g}")
        if self.kind == "view":
            return (self.negative_view, self.positive_view)
        name = "effusion" if self.column == "effusion" else FINDING_NAMES.get(self.column, self.column)
        return (f"no {name}", name)

    @property
    def text(self) -> str:
        """What the classifier recognises, in words ("pleural effusion", "the patient's sex")."""
        if self.description:
            return self.description
        if self.kind == "sex":
            return "the patient's sex"
        if self.kind == "age":
            return f"age {self.age_threshold:g} or older"
        if self.kind == "view":
            return f"{self.positive_view} (vs {self.negative_view}) projection"
        return FINDING_NAMES.get(self.column, self.column)

    def labels(self, frame: pd.DataFrame) -> pd.Series:
        """Per row 1.0 / 0.0, NaN where this task has no label (policy applied); index of ``frame``."""
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise UserError(f"task {self.name!r} needs manifest column(s) {missing}, which this cohort "
                            "lacks (rebuild the manifest with simplebits manifest, or choose another task)")
        if self.kind == "sex":
            return _text(frame[self.column]).str.upper().map({"M": 1.0, "F": 0.0}).astype("float64")
        if self.kind == "view":
            view = _text(frame[self.column]).str.upper()
            out = pd.Series(np.nan, index=frame.index, dtype="float64")
            out[view == self.positive_view] = 1.0
            out[view == self.negative_view] = 0.0
            return out
        values = _numbers(frame[self.column])
        if self.kind == "age":
            return pd.Series(np.where(values.isna(), np.nan, (values >= self.age_threshold).astype(float)),
                             index=frame.index, dtype="float64")
        codes = values.copy()
        codes[values == -1.0] = {"drop": np.nan, "positive": 1.0, "negative": 0.0}[self.uncertain]
        if self.blank == "negative":
            codes[values.isna()] = 0.0
        for column in self.negative_requires:
            codes[(codes == 0.0) & (_numbers(frame[column]) != 1.0)] = np.nan
        return codes.where(codes.isin([0.0, 1.0])).astype("float64")


def _text(values: pd.Series) -> pd.Series:
    return values.astype(object).where(values.notna(), "").astype(str).str.strip()


def _numbers(values: pd.Series) -> pd.Series:
    """Codes as float64, NaN for blank: from Int64, float or text (``"1"``, ``"-1.0"``, ``""``)."""
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values.astype("float64")
    return pd.to_numeric(_text(values).replace("", np.nan), errors="coerce").astype("float64")


# --- the registry ---------------------------------------------------------------------------------

_SEX_SETTINGS: dict[str, dict[str, Any]] = {
    # The NF-WRN hardly learns the demo cohort's sex feature (soft breast shadows; val AUROC <= 0.80):
    # a GroupNorm ResNet does and is batch-free, so joint training works with it too.
    "classify": {"model": {"name": "monai_resnet18_gn", "kwargs": {}},
                 "train": {"lr": 5e-3, "lr_schedule": "cosine"}},
    # the check classifier: another architecture than the GroupNorm ResNet under audit
    "independent": {"model": {"name": "monai_densenet121",
                              "kwargs": {"init_features": 16, "growth_rate": 8}}},
    # this classifier's evidence tolerates far more change than the NF-WRN's: at lam 8 / tau 0.1 the
    # independent check fell to 0.72x
    "audit": {"audit": {"lam": 0.5, "tau": 0.01}},
}


def _builtin_tasks() -> dict[str, TaskSpec]:
    specs = [TaskSpec(name=column) for column in FINDINGS if column != "no_finding"]
    specs.insert(0, TaskSpec(name="no_finding", class_names=("some finding", "no finding")))
    specs += [
        TaskSpec(name="effusion_paper", column="effusion", negative_requires=["no_finding"],
                 description="pleural effusion (the SimpleBits paper's MIMIC policy: negatives need "
                             "No Finding; uncertain and blank unlabeled)"),
        TaskSpec(name="sex", kind="sex", settings=_SEX_SETTINGS),
        TaskSpec(name="age_65", kind="age", age_threshold=65.0),
        TaskSpec(name="view_ap", kind="view", positive_view="AP", negative_view="PA"),
    ]
    return {spec.name: spec for spec in specs}


BUILTIN_TASKS: dict[str, TaskSpec] = _builtin_tasks()
_registry: dict[str, TaskSpec] = dict(BUILTIN_TASKS)
_env_loaded: str | None = None  # the SIMPLEBITS_TASKS value last read


def _current() -> dict[str, TaskSpec]:
    """The registry, with the ``SIMPLEBITS_TASKS`` file's tasks once it is set (re-read if it changes)."""
    global _env_loaded
    value = os.environ.get(TASKS_ENV) or None
    if value != _env_loaded:
        _env_loaded = value
        if value:
            import yaml

            path = Path(value)
            if not path.is_file():
                raise UserError(f"{TASKS_ENV}={value}: task file not found")
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise UserError(f"{path}: a task file is a mapping of task name -> task definition")
            for spec in define_tasks(data, source=str(path)).values():
                _registry[spec.name] = spec
    return _registry


def task_names() -> list[str]:
    """Every registered task name: findings in :data:`FINDINGS` order, then the others."""
    return list(_current())


def _unknown(name: object, known: Iterable[str]) -> UserError:
    return UserError(f"unknown task {name!r}; known tasks: {', '.join(known)}")


def get_task(task: str | TaskSpec, definitions: Mapping[str, TaskSpec] | None = None) -> TaskSpec:
    """The :class:`TaskSpec` of a name (``definitions`` first, then the registry); a spec passes through."""
    if isinstance(task, TaskSpec):
        return task
    if definitions and task in definitions:
        return definitions[task]
    registry = _current()
    if task not in registry:
        raise _unknown(task, [*registry, *(d for d in (definitions or {}) if d not in registry)])
    return registry[task]


def check_task_name(name: str, definitions: Mapping[str, TaskSpec] | None = None) -> str:
    """``name`` if it is a known task, else UserError (for pydantic validators and argparse ``type``)."""
    return get_task(name, definitions).name if isinstance(name, str) else name


#: A config field naming a registered task (checked when the config is validated).
TaskName = Annotated[str, AfterValidator(check_task_name)]


def parse_tasks(text: str | Iterable[str], definitions: Mapping[str, TaskSpec] | None = None,
                check: bool = True) -> list[str]:
    """``"effusion, cardiomegaly,sex"`` (or a list) -> ``["effusion", "cardiomegaly", "sex"]``, checked
    against the registry and ``definitions`` (``check=False``: left to a config that may define more
    tasks, e.g. RunConfig's ``task_definitions``), duplicates removed; an empty list is an error."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names:
        raise UserError(f"no task given; known tasks: {', '.join(task_names())}")
    return [check_task_name(name, definitions) for name in names] if check else names


def task_argument(text: str) -> str:
    """argparse ``type`` of a ``--task`` flag: a known task name, else argparse's one-line error."""
    import argparse

    try:
        return check_task_name(text.strip())
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def tasks_argument(text: str) -> list[str]:
    """argparse ``type`` of a ``--tasks`` flag: ``"effusion,cardiomegaly,sex"`` -> checked names."""
    import argparse

    try:
        return parse_tasks(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register_task(spec: TaskSpec | Mapping[str, Any], *, replace: bool = False) -> TaskSpec:
    """Add a task to this process's registry (``replace`` to redefine an existing name)."""
    spec = spec if isinstance(spec, TaskSpec) else TaskSpec.model_validate(spec)
    registry = _current()
    if spec.name in registry and not replace and registry[spec.name] != spec:
        raise UserError(f"task {spec.name!r} is already registered (pass replace=True to redefine it)")
    registry[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(definitions: Mapping[str, TaskSpec]) -> Iterator[None]:
    """Register ``definitions`` (replacing same-named tasks) for the duration of the block."""
    registry = _current()
    previous = {name: registry.get(name) for name in definitions}
    registry.update(definitions)
    try:
        yield
    finally:
        for name, spec in previous.items():
            if spec is None:
                registry.pop(name, None)
            else:
                registry[name] = spec


def define_tasks(raw: Mapping[str, Any] | None, source: str = "task definitions") -> dict[str, TaskSpec]:
    """``{name: partial definition}`` -> specs: an entry with a known name is merged onto that task
    (:func:`merge_settings`), a new name needs a full definition (at least ``kind`` or ``column``
    where the name is not a finding)."""
    out: dict[str, TaskSpec] = {}
    registry = _current()  # while the environment's task file is read, the registry as it is
    for name, value in (raw or {}).items():
        if isinstance(value, TaskSpec):
            value = value.model_dump()
        if not isinstance(value, Mapping):
            raise UserError(f"{source}: task {name!r} must be a mapping of its fields")
        if value.get("name", name) != name:
            raise UserError(f"{source}: task {name!r} has name {value['name']!r}")
        base = registry[name].model_dump() if name in registry else {}
        try:
            out[name] = TaskSpec.model_validate(merge_settings(base, {**value, "name": name}))
        except ValidationError as err:
            reasons = "; ".join(e["msg"].removeprefix("Value error, ") + (
                f" ({'.'.join(map(str, e['loc']))})" if e["loc"] else "") for e in err.errors())
            raise UserError(f"{source}: task {name!r}: {reasons}") from err
    return out


def _definitions(value: Any) -> Any:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        try:
            return define_tasks(value)
        except UserError as err:
            raise ValueError(str(err)) from err
    return value


#: Pydantic field type of a config's ``task_definitions`` mapping (partial entries merged onto built-ins).
TaskDefinitions = Annotated[dict[str, TaskSpec], BeforeValidator(_definitions)]


def task_labels(frame: pd.DataFrame, task: str | TaskSpec,
                definitions: Mapping[str, TaskSpec] | None = None) -> pd.Series:
    """Per-row label of ``task``: float 1.0 / 0.0, NaN = unlabeled or dropped by the label policy."""
    return get_task(task, definitions).labels(frame)


def label_columns(tasks: Iterable[str | TaskSpec], base: Iterable[str] = DEFAULT_TASKS) -> tuple[str, ...]:
    """The manifest columns that ``base`` and ``tasks`` read (order kept, no repeats): what a
    predictions table must carry to recompute their labels."""
    columns: list[str] = []
    for task in [*base, *tasks]:
        columns += get_task(task).columns
    return tuple(dict.fromkeys(columns))


# --- per-task settings ----------------------------------------------------------------------------

def merge_settings(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Nested merge, except that a mapping naming a network (a ``name`` key) replaces the old one whole:
    another network's kwargs would not fit it."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and "name" not in value and isinstance(out.get(key), Mapping):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = copy.deepcopy(value)  # the result never shares a mapping with ``update``
    return out


def stage_settings(task: str | TaskSpec, stage: Literal["classify", "joint", "audit"],
                   definitions: Mapping[str, TaskSpec] | None = None) -> dict[str, Any]:
    """The task's deviations as a patch of one single-step command's config, for ``stage``:

    - ``classify`` (ClassifyConfig): ``settings.classify``;
    - ``joint`` (JointConfig): ``settings.joint``, with ``classifier`` = the classify model (joint
      training starts from that classifier) and ``independent`` = ``settings.independent``;
    - ``audit`` (AuditConfig): ``settings.audit``, with ``independent`` = ``settings.independent``.

    The same values :meth:`pipeline.workflow.RunConfig.for_task` merges into the run's sections.
    """
    settings = copy.deepcopy(get_task(task, definitions).settings)  # callers may edit the patch
    patch = dict(settings.get(stage, {}))  # type: ignore[call-overload]
    if stage in ("joint", "audit") and settings.get("independent"):
        patch = merge_settings({"independent": settings["independent"]}, patch)
    if stage == "joint" and "model" in settings.get("classify", {}):
        patch["classifier"] = settings["classify"]["model"]
    return patch


def apply_stage_settings(config: Any, stage: Literal["classify", "joint", "audit"],
                         explicit: Iterable[str] = (), task: str | None = None) -> Any:
    """``config`` (a stage config with a ``task``) with its task's settings merged in, except the keys
    the user set explicitly (``explicit``: dotted paths as given to ``--set``, e.g. ``train.lr``; a
    set key also keeps everything below it). Validated again."""
    patch = stage_settings(task or config.task, stage)
    if not patch:
        return config
    for key in explicit:
        _drop_path(patch, key.split("."))
    merged = merge_settings(config.model_dump(), patch)
    return type(config).model_validate(merged)


def explicit_keys(overrides: Iterable[str]) -> list[str]:
    """The dotted keys of ``--set key=value`` overrides."""
    return [item.split("=", 1)[0].strip() for item in overrides if "=" in item]


def _leaf_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of a nested mapping's values (a mapping naming a network counts as one value)."""
    keys = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value and "name" not in value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def stage_config_from_args(model: type[Any], args: Any, stage: Literal["classify", "joint", "audit"],
                           **cli_values: Any) -> Any:
    """:func:`pipeline.config.config_from_args` for a single-step command, with the task's settings
    (:func:`stage_settings`) merged over the shipped preset: ``classify train --task sex`` trains the
    sex task's network without a config file of its own. What the user set wins over the task's
    settings: ``--set`` overrides, flags (``cli_values``) and the keys of their own ``--config`` file.
    ``--print-config`` prints the config with the task's settings in."""
    import argparse

    from pipeline.config import config_from_args, dump_config, read_yaml

    quiet = argparse.Namespace(**{**vars(args), "print_config": False})
    config = config_from_args(model, quiet, **cli_values)
    explicit = explicit_keys(getattr(args, "overrides", []))
    explicit += [key for key, value in cli_values.items() if value is not None]
    if getattr(args, "config", None) and Path(args.config).is_file():  # the user's own file, not a preset
        explicit += _leaf_keys(read_yaml(args.config))
    config = apply_stage_settings(config, stage, explicit)
    if getattr(args, "print_config", False):
        print(dump_config(config), end="")
        raise SystemExit(0)
    return config


def _drop_path(patch: dict[str, Any], path: list[str]) -> None:
    node: Any = patch
    for part in path[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)
