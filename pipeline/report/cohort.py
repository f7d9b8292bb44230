"""Cohort analysis: one table of all studies, summaries per label and subgroup, MacroStd, plots.

Pure functions over DataFrames (testable without the rest of the pipeline); the plotting functions
write PNGs atomically with matplotlib's Agg backend.

Inputs (see ARCHITECTURE.md):
- ``predictions``: ``study_id, split, p_orig, p_simpl, bpd_orig, bpd_simpl`` and either ``label`` or the
  task's own label columns (``effusion`` 1/0/-1, ``sex`` M/F, ... as written by ``simplebits apply``;
  the task's label policy is applied, :func:`pipeline.tasks.task_labels`); optional ``bits_saved``.
  Studies without a label are kept (shown, counted) but left out of AUROC/accuracy;
- ``manifest``: ``study_id, patient_id, view, sex, age, split, source`` and its finding columns
  (``effusion``, ``support_devices``, ...) (pseudonymous);
- trade-off ``sweep``: one row per (method, strength) with ``method, strength|lam, mean_bpd, auroc``;
  optional ``auroc_orig`` (the same classifier on original images).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.runtime.atomic import atomic_write_bytes
from pipeline.tasks import FINDINGS, get_task, task_labels

#: Subgroup families analysed by default (columns of the study table).
SUBGROUP_FAMILIES = ("sex", "age_band", "view", "source")
#: Reader-facing names of the subgroup families.
FAMILY_NAMES = {"sex": "sex", "age_band": "age", "view": "view", "source": "data source", "split": "split"}
#: Age bands as (lower inclusive, upper exclusive, label).
AGE_BANDS = ((0.0, 40.0, "<40"), (40.0, 60.0, "40-59"), (60.0, 80.0, "60-79"), (80.0, math.inf, ">=80"))
#: Manifest columns allowed into the study table. ``image_path`` is left out on purpose: source paths
#: of real datasets embed the original patient/study identifiers.
MANIFEST_COLUMNS = ("study_id", "patient_id", "view", "sex", "age", "effusion", "split", "source",
                    *(c for c in FINDINGS if c != "effusion"))
PREDICTION_COLUMNS = ("study_id", "p_orig", "p_simpl", "bpd_orig", "bpd_simpl")
SWEEP_COLUMNS = ("method", "mean_bpd", "auroc")


def age_band(age: pd.Series) -> pd.Series:
    """Ages -> ordered categorical bands (:data:`AGE_BANDS`); missing ages stay missing."""
    edges = [lo for lo, _, _ in AGE_BANDS] + [math.inf]
    labels = [name for _, _, name in AGE_BANDS]
    return pd.cut(pd.to_numeric(age, errors="coerce"), bins=edges, right=False, labels=labels)


def task_label(predictions: pd.DataFrame, task: str | None) -> pd.Series:
    """The 0/1 label per study (pandas ``Int64``, ``<NA>`` = unlabelled).

    ``label`` if the table has it, else derived from the task's label columns with the task's label
    policy (:func:`pipeline.tasks.task_labels`: effusion 1/0, sex M=1/F=0, ...).
    """
    if "label" in predictions.columns:
        values = pd.to_numeric(predictions["label"], errors="coerce")
    elif task is not None and set(get_task(task).columns) <= set(predictions.columns):
        values = task_labels(predictions, task)
    else:
        raise ValueError(f"predictions table has neither a 'label' nor the label columns of task {task!r}")
    return values.round().astype("Int64")


def build_study_table(
    predictions: pd.DataFrame,
    manifest: pd.DataFrame | None = None,
    dims: int | None = None,
    threshold: float = 0.5,
    task: str | None = None,
) -> pd.DataFrame:
    """One row per study: predictions joined with manifest attributes, plus derived columns.

    Adds ``label`` (see :func:`task_label`), ``age_band``, ``pred_orig/pred_simpl`` (at ``threshold``),
    ``correct_orig/correct_simpl`` (``<NA>`` when unlabelled), ``bpd_drop`` and, when ``dims`` (pixels
    per image) is known and the table has none, ``bits_saved = bpd_drop * dims``.
    """
    missing = set(PREDICTION_COLUMNS) - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions table lacks columns {sorted(missing)}")
    table = predictions.copy()
    table["label"] = task_label(predictions, task)
    if manifest is not None:
        if "study_id" not in manifest.columns:
            raise ValueError("manifest lacks the study_id column")
        keep = [c for c in MANIFEST_COLUMNS if c in manifest.columns and (c == "study_id" or c not in table)]
        table = table.merge(manifest[keep], on="study_id", how="left", validate="one_to_one")
    if "age" in table.columns:
        table["age_band"] = age_band(table["age"])
    table["pred_orig"] = (table["p_orig"] >= threshold).astype(int)
    table["pred_simpl"] = (table["p_simpl"] >= threshold).astype(int)
    table["correct_orig"] = (table["pred_orig"] == table["label"]).astype("boolean")
    table["correct_simpl"] = (table["pred_simpl"] == table["label"]).astype("boolean")
    table["bpd_drop"] = table["bpd_orig"] - table["bpd_simpl"]
    if dims is not None and "bits_saved" not in table.columns:
        table["bits_saved"] = table["bpd_drop"] * dims
    return table


def auroc(labels: Sequence[int] | pd.Series, scores: Sequence[float] | pd.Series) -> float:
    """Area under the ROC curve; NaN when only one class is present (undefined, not 0.5)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores)))


def _performance(group: pd.DataFrame) -> dict[str, float]:
    """Counts and bpd over all studies; AUROC and accuracy over the labelled ones."""
    labelled = group[group["label"].notna()]
    labels = labelled["label"].to_numpy(dtype=int)
    nan = float("nan")
    return {
        "n": len(group),
        "n_labelled": len(labelled),
        "n_positive": int(labels.sum()),
        "auroc_orig": auroc(labels, labelled["p_orig"]),
        "auroc_simpl": auroc(labels, labelled["p_simpl"]),
        "accuracy_orig": float(labelled["correct_orig"].astype(float).mean()) if len(labelled) else nan,
        "accuracy_simpl": float(labelled["correct_simpl"].astype(float).mean()) if len(labelled) else nan,
        "mean_bpd_orig": float(group["bpd_orig"].mean()),
        "mean_bpd_simpl": float(group["bpd_simpl"].mean()),
    }


def summarise(table: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Performance and bpd overall (``by=None``) or per value of column ``by`` (e.g. ``label``)."""
    if by is None:
        return pd.DataFrame([{"group": "all", **_performance(table)}])
    rows = [{by: key, **_performance(group)}
            for key, group in table.groupby(by, observed=True, sort=True, dropna=False)]
    return pd.DataFrame(rows)


def subgroup_performance(
    table: pd.DataFrame,
    families: Sequence[str] = SUBGROUP_FAMILIES,
    min_size: int = 1,
) -> pd.DataFrame:
    """Long table ``family, subgroup, n, n_positive, auroc_orig, auroc_simpl, accuracy_*, mean_bpd_*``.

    Families missing from the table are skipped; subgroups smaller than ``min_size`` are dropped.
    """
    rows = []
    for family in families:
        if family not in table.columns:
            continue
        # Unknown values (NaN or "" in the manifest) form their own "unknown" subgroup.
        keys = table[family].astype(object).where(table[family].notna(), "").astype(str).replace("", "unknown")
        for key, group in table.groupby(keys, sort=True):
            if len(group) >= min_size:
                rows.append({"family": family, "subgroup": str(key), **_performance(group)})
    columns = ["family", "subgroup", "n", "n_labelled", "n_positive", "auroc_orig", "auroc_simpl",
               "accuracy_orig", "accuracy_simpl", "mean_bpd_orig", "mean_bpd_simpl"]
    return pd.DataFrame(rows, columns=columns)


def macro_std(subgroups: pd.DataFrame, column: str) -> float:
    """MacroStd: the std (ddof=0) of ``column`` across the subgroups of each family, averaged over families.

    0 means every subgroup performs the same; larger means larger subgroup discrepancy. Subgroups
    with an undefined value (e.g. AUROC with one class) are ignored; families with fewer than two
    defined subgroups do not count. NaN if no family counts.
    """
    stds = []
    for _, family in subgroups.groupby("family", sort=False):
        values = family[column].dropna().to_numpy(dtype=float)
        if len(values) >= 2:
            stds.append(float(np.std(values)))
    return float(np.mean(stds)) if stds else float("nan")


def normalise_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    """Accept ``strength`` or ``lam`` as the strength column; check the required ones."""
    missing = set(SWEEP_COLUMNS) - set(sweep.columns)
    if missing:
        raise ValueError(f"trade-off table lacks columns {sorted(missing)} (needs method, strength|lam, mean_bpd, auroc)")
    out = sweep.copy()
    if "strength" not in out.columns and "lam" not in out.columns:
        raise ValueError("trade-off table needs a 'strength' or 'lam' column")
    # Rows may come from different producers (SimpleBits: lam, baselines: strength): take either.
    strength = out["strength"] if "strength" in out.columns else pd.Series(np.nan, index=out.index)
    out["strength"] = strength.fillna(out["lam"]) if "lam" in out.columns else strength
    if out["strength"].isna().any():
        raise ValueError("trade-off table has rows without a strength/lam value")
    return out


# ---------------------------------------------------------------------------------------------- plots


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def plot_tradeoff(sweep: pd.DataFrame, path: str | Path, title: str = "Simplicity vs. performance") -> Path:
    """Mean bpd (x) against AUROC on the simplified images (y), one line per method."""
    data = normalise_sweep(sweep)
    fig, ax = _figure(6.4, 4.4)
    for method, rows in data.groupby("method", sort=True):
        rows = rows.sort_values("mean_bpd")
        ax.plot(rows["mean_bpd"], rows["auroc"], marker="o", label=str(method))
        for _, row in rows.iterrows():
            ax.annotate(f"{row['strength']:g}", (row["mean_bpd"], row["auroc"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    if "auroc_orig" in data.columns and data["auroc_orig"].notna().any():
        ax.axhline(float(data["auroc_orig"].max()), color="grey", linestyle="--", linewidth=1,
                   label="classifier on original images")
    ax.set_xlabel("mean code length of the inputs (bits per pixel; lower = simpler)")
    ax.set_ylabel("AUROC")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_bpd_histograms(table: pd.DataFrame, path: str | Path) -> Path:
    """Distribution of bits per pixel for the original and the simplified images."""
    fig, ax = _figure(6.4, 4.0)
    values = np.concatenate([table["bpd_orig"].to_numpy(), table["bpd_simpl"].to_numpy()])
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-6, 31)
    ax.hist(table["bpd_orig"], bins=bins, alpha=0.6, label="original", color="#555555")
    ax.hist(table["bpd_simpl"], bins=bins, alpha=0.6, label="simplified", color="#d95f02")
    ax.set_xlabel("code length (bits per pixel)")
    ax.set_ylabel("number of studies")
    ax.set_title("How many bits each image costs under the density prior")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def plot_subgroup_auroc(subgroups: pd.DataFrame, path: str | Path) -> Path:
    """Horizontal bars: AUROC per subgroup on original and simplified images."""
    data = subgroups.reset_index(drop=True)
    labels = [f"{FAMILY_NAMES.get(f, f)}: {s} (n={n})" for f, s, n in zip(data["family"], data["subgroup"], data["n"])]
    fig, ax = _figure(6.4, max(2.5, 0.38 * len(data) + 1.2))
    y = np.arange(len(data))
    ax.barh(y - 0.2, data["auroc_orig"].fillna(0), height=0.4, label="original", color="#555555")
    ax.barh(y + 0.2, data["auroc_simpl"].fillna(0), height=0.4, label="simplified", color="#d95f02")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("AUROC (0.5 = chance; missing bar = only one class in the subgroup)")
    ax.set_title("Performance by subgroup", loc="left")
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    return _save_figure(fig, path)


def write_study_table(table: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    """``studies.parquet`` + ``studies.csv`` (atomic)."""
    out_dir = Path(out_dir)
    parquet = io.BytesIO()
    table.to_parquet(parquet, index=False)
    atomic_write_bytes(out_dir / "studies.parquet", parquet.getvalue())
    atomic_write_bytes(out_dir / "studies.csv", table.to_csv(index=False).encode("utf-8"))
    return out_dir / "studies.parquet", out_dir / "studies.csv"
