"""A classifier's true reliance on a rendered feature: R = mean |P(x) - P(x without the feature)|.

The demo cohort rendered with ``counterfactuals`` holds, for every study with a device or an
effusion, the same study without it (``counterfactuals/no_<feature>/<study_id>.dcm``: same pose,
exposure, noise and encoding). Both files go through the ingest chain of the classifier's ingest
folder (its size, VOI and padding), so the classifier sees them exactly as it sees its cohort; R is
averaged over the studies of one split (test by default) that have the feature.

R is also reported on the log-odds scale, ``reliance_log_odds`` = mean |z(x) − z(x without it)| with
z = logit₁ − logit₀: an overconfident classifier can put P = 1.0000 on every study (seen on the
faithfulness benchmark: val AUROC 0.83, yet every R on probabilities ≈ 0), and only its log-odds
still show what a feature moves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from pipeline.config import RESOLVED_CONFIG_NAME
from pipeline.data.demo.cohort import COUNTERFACTUALS_DIR
from pipeline.data.ingest import MANIFEST_NAME, read_ingested_manifest
from pipeline.data.transforms import ingest_transforms
from pipeline.errors import UserError

PREFIX = "no_"


def cohort_features(cohort_dir: str | Path) -> list[str]:
    """Features with counterfactual renders in ``cohort_dir`` (``chest_drain``, ``effusion`` ...)."""
    root = Path(cohort_dir) / COUNTERFACTUALS_DIR
    if not root.is_dir():
        raise UserError(f"{cohort_dir}: no {COUNTERFACTUALS_DIR}/ folder; render the cohort with "
                        "simplebits demo-cohort --counterfactuals")
    return sorted(p.name.removeprefix(PREFIX) for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX))


def _ingest_chain(ingest_dir: Path):
    resolved = ingest_dir / RESOLVED_CONFIG_NAME
    if not resolved.is_file():
        raise UserError(f"{resolved}: not found; --ingest must be a folder written by simplebits ingest")
    settings = yaml.safe_load(resolved.read_text()) or {}
    return ingest_transforms(size=settings["size"], voi=settings.get("voi", "auto"),
                             pad_mode=settings.get("pad_mode", "min"))


@torch.no_grad()
def _scores(classifier: torch.nn.Module, chain, paths: list[Path], batch_size: int,
            device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """P(positive) and the log-odds logit₁ − logit₀ (exact where P has saturated to 1 or 0)."""
    p, log_odds = [np.zeros(0)], [np.zeros(0)]
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([torch.as_tensor(np.asarray(chain({"image": str(path)})["image"]))
                             for path in paths[start:start + batch_size]])
        logits = classifier(batch.float().div(255.0).to(device)).float()
        p.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
        log_odds.append((logits[:, 1] - logits[:, 0]).cpu().numpy())
    return np.concatenate(p), np.concatenate(log_odds)


def reliance_table(cohort_dir: str | Path, ingest_dir: str | Path, classifier: torch.nn.Module,
                   split: str | None = "test", batch_size: int = 64, device: str | torch.device = "cpu"
                   ) -> pd.DataFrame:
    """One row per (study, feature): ``study_id, feature, p, p_without, log_odds, log_odds_without``
    over the ``split`` studies of the ingest folder (None: all) that have a counterfactual for the
    feature."""
    cohort_dir, ingest_dir = Path(cohort_dir), Path(ingest_dir)
    frame = read_ingested_manifest(ingest_dir / MANIFEST_NAME)
    ids = frame["study_id"] if split is None else frame.loc[frame["split"] == split, "study_id"]
    chain = _ingest_chain(ingest_dir)
    device = torch.device(device)
    classifier = classifier.to(device).eval()
    rows = []
    for feature in cohort_features(cohort_dir):
        folder = cohort_dir / COUNTERFACTUALS_DIR / f"{PREFIX}{feature}"
        with_feature = [s for s in ids if (folder / f"{s}.dcm").is_file()]
        originals = [cohort_dir / "dicom" / f"{s}.dcm" for s in with_feature]
        p, z = _scores(classifier, chain, originals, batch_size, device)
        p_without, z_without = _scores(classifier, chain, [folder / f"{s}.dcm" for s in with_feature],
                                       batch_size, device)
        rows += [{"study_id": s, "feature": feature, "p": a, "p_without": b, "log_odds": c, "log_odds_without": d}
                 for s, a, b, c, d in zip(with_feature, p, p_without, z, z_without)]
    return pd.DataFrame(rows, columns=["study_id", "feature", "p", "p_without", "log_odds", "log_odds_without"])


def summarise_reliance(table: pd.DataFrame) -> pd.DataFrame:
    """Per feature: ``n``, ``reliance`` = mean |P(x) - P(x without it)|, ``shift`` = mean signed
    difference (positive: the feature pushes P(positive) up) and, where the table has log-odds,
    ``reliance_log_odds`` = mean |z(x) - z(x without it)|."""
    difference = table["p"] - table["p_without"]
    columns = {"reliance": difference.abs(), "shift": difference}
    aggregate = {"n": ("study_id", "size"), "reliance": ("reliance", "mean"), "shift": ("shift", "mean")}
    if "log_odds" in table:
        columns["reliance_log_odds"] = (table["log_odds"] - table["log_odds_without"]).abs()
        aggregate["reliance_log_odds"] = ("reliance_log_odds", "mean")
    return table.assign(**columns).groupby("feature").agg(**aggregate).reset_index()


def classifier_reliance(cohort_dir: str | Path, ingest_dir: str | Path, classifier_path: str | Path,
                        split: str | None = "test", batch_size: int = 64, device: str = "cpu",
                        **load: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`reliance_table` and its summary for a classifier file, loaded as ``simplebits apply`` does."""
    from pipeline.models.classifiers import load_classifier

    classifier = load_classifier(classifier_path, load.get("name"), load.get("kwargs"), load.get("adapter"),
                                 task=load.get("task"))
    table = reliance_table(cohort_dir, ingest_dir, classifier, split, batch_size, device)
    return table, summarise_reliance(table)
