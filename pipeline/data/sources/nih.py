"""NIH ChestX-ray14: ``Data_Entry_2017*.csv`` (2017 or v2020 release) in the dataset root.

Each of the 14 findings (:data:`pipeline.tasks.NIH_FINDINGS`; ``Effusion`` -> ``effusion``,
``Pleural_Thickening`` -> ``pleural_thickening``) is positive iff it is one of the ``|``-separated
Finding Labels and negative otherwise (the NIH labels have no uncertain or blank state); No Finding
is the label ``No Finding``. A label outside these 15 stops the build (a misread file).
Both header variants are read: the 2017 file ends in a trailing comma (an empty extra column) and
older copies write ages as ``058Y``; v2020 has clean integer ages. Ages above 120 become unknown.
Images are found anywhere under the root by file name (``images/``, or Kaggle's
``images_001/images/`` …); names not found are expected in ``images/``. Official split (optional):
``test_list.txt`` -> test, ``train_val_list.txt`` -> train/val per patient.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.manifest import ManifestError
from pipeline.data.sources import (
    TRAINVAL,
    ManifestConfig,
    normalise_sex,
    normalise_view,
    parse_ages,
    pseudonymise,
    read_label_csv,
)
from pipeline.tasks import NIH_FINDINGS

REQUIRED_COLUMNS = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "View Position"]
SEX_COLUMNS = ("Patient Gender", "Patient Sex")
OFFICIAL_SPLIT_FILES = {"test_list.txt": "test", "train_val_list.txt": TRAINVAL}


def read_records(root: Path, config: ManifestConfig) -> pd.DataFrame:
    path = Path(config.nih.data_entry_csv) if config.nih.data_entry_csv else find_data_entry(root)
    df = read_label_csv(path, REQUIRED_COLUMNS, dtype={"Image Index": str, "Patient ID": str})
    sex_column = next((c for c in SEX_COLUMNS if c in df.columns), None)
    if sex_column is None:
        raise ManifestError(f"{path}: missing columns ['Patient Gender'] (or 'Patient Sex')")
    names = df["Image Index"].astype(str).str.strip()
    findings = df["Finding Labels"].fillna("").astype(str).str.split("|")
    findings = findings.map(lambda labels: {label.strip() for label in labels} - {""})
    unknown = sorted(set().union(*findings) - set(NIH_FINDINGS)) if len(findings) else []
    if unknown:
        raise ManifestError(f"{path}: Finding Labels has labels {unknown[:5]}; known: {sorted(NIH_FINDINGS)}")
    located = locate_images(root)
    base = root.resolve()
    return pd.DataFrame(
        {
            "study_id": pseudonymise(names, "study"),
            "patient_id": pseudonymise(df["Patient ID"].astype(str).str.strip(), "patient"),
            "image_path": names.map(lambda n: str(base / located.get(n, f"images/{n}"))),
            "view": normalise_view(df["View Position"]),
            "sex": normalise_sex(df[sex_column]),
            "age": parse_ages(df["Patient Age"]),
            **finding_codes(findings),
            "official_split": official_split(root, names),
        }
    )


def finding_codes(findings: pd.Series) -> dict[str, pd.Series]:
    """``<finding>_code`` per NIH label: 1.0 where the image lists it, else 0.0 (No Finding: 1.0 iff
    it is the only label)."""
    codes = {}
    for label, column in NIH_FINDINGS.items():
        if label == "No Finding":
            present = findings.map(lambda s: s == {"No Finding"})
        else:
            present = findings.map(lambda s, label=label: label in s)
        codes[f"{column}_code"] = present.astype("float64")
    return codes


def find_data_entry(root: Path) -> Path:
    """The last ``Data_Entry_2017*.csv(.gz)`` by name, so v2020 is preferred over the 2017 file."""
    candidates = sorted(p for p in root.glob("Data_Entry_2017*.csv*") if p.name.endswith((".csv", ".csv.gz")))
    if not candidates:
        raise ManifestError(f"{root}: no Data_Entry_2017*.csv label file found")
    return candidates[-1]


def locate_images(root: Path) -> dict[str, str]:
    """Image file name -> path relative to ``root``, for every PNG below it."""
    found: dict[str, str] = {}
    for folder, _, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        for name in files:
            if name.lower().endswith(".png"):
                found.setdefault(name, str(relative / name))
    return found


def official_split(root: Path, names: pd.Series) -> pd.Series:
    """Per image: ``test``, ``trainval`` or ``""`` from NIH's list files (all ``""`` if absent)."""
    split = pd.Series(np.full(len(names), "", dtype=object), index=names.index)
    for file_name, value in OFFICIAL_SPLIT_FILES.items():
        path = root / file_name
        if path.is_file():
            listed = {line.strip() for line in path.read_text().splitlines() if line.strip()}
            split[names.isin(listed)] = value
    return split
