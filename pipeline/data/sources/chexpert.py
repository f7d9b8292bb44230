"""CheXpert (v1.0 and v1.0-small): ``train.csv`` and, if present, ``valid.csv`` in the dataset root.

``Path`` looks like ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``. The patient
is ``patient00001``; the study pseudonym is taken from ``patient00001/study1/view1_frontal`` (one row
per image, and the same ids for the full-size and the small release). Images are looked up under the
root from the ``train``/``valid`` component on, so the root is the folder holding ``train.csv``.
View: ``LATERAL`` for lateral images, else the ``AP/PA`` column (AP, PA, and a few LL/RL).
Findings: the 14 label columns (``No Finding`` ... ``Support Devices``), raw codes, to the manifest's
finding columns (:data:`pipeline.tasks.CHEXPERT_FINDINGS`; ``Pleural Effusion`` -> ``effusion``).
Official split: ``train.csv`` -> train/val per patient, ``valid.csv`` -> test.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data.manifest import ManifestError
from pipeline.data.sources import (
    TRAINVAL,
    ManifestConfig,
    find_label_file,
    label_codes,
    normalise_sex,
    normalise_view,
    parse_ages,
    pseudonymise,
    read_label_csv,
)
from pipeline.tasks import CHEXPERT_FINDINGS

REQUIRED_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
_FROM_SPLIT_FOLDER = r"(?:^|/)((?:train|valid|test)/.*)$"
# patient00001/study1/view1_frontal.jpg -> key patient00001/study1/view1_frontal
_IMAGE_KEY = r"(?:^|/)(?P<patient>patient\d+)/(?P<study>study\d+)/(?P<image>[^/]+?)(?:\.[^./]*)?$"
_OFFICIAL_SPLIT = {"train.csv": TRAINVAL, "valid.csv": "test"}


def read_records(root: Path, config: ManifestConfig) -> pd.DataFrame:
    frames = [read_label_file(find_label_file(root, "train.csv"), root)]
    valid = [p for p in (root / "valid.csv", root / "valid.csv.gz") if p.is_file()]
    if valid:  # optional: some copies ship only the training labels
        frames.append(read_label_file(valid[0], root))
    return pd.concat(frames, ignore_index=True)


def read_label_file(path: Path, root: Path) -> pd.DataFrame:
    """Records from one CheXpert label CSV (``train.csv`` or ``valid.csv``, optionally gzipped)."""
    df = read_label_csv(path, REQUIRED_COLUMNS, dtype={"Path": str, "Sex": str, "AP/PA": str})
    posix = df["Path"].fillna("").astype(str).str.strip().str.replace("\\", "/", regex=False)
    # From the split folder on, so the root is the folder holding train.csv.
    from_split = posix.str.extract(_FROM_SPLIT_FOLDER, expand=False)
    relative = from_split.fillna(posix)
    parts = posix.str.extract(_IMAGE_KEY)
    if parts.isna().any(axis=None):
        bad = df.loc[parts.isna().any(axis=1), "Path"].head(3).tolist()
        raise ManifestError(f"{path}: Path must contain patientNNNNN/studyN/<image>, e.g. {bad}")
    key = parts["patient"] + "/" + parts["study"] + "/" + parts["image"]
    lateral = df["Frontal/Lateral"].fillna("").astype(str).str.strip().str.lower() == "lateral"
    view = normalise_view(df["AP/PA"]).where(~lateral, "LATERAL")
    base = root.resolve()
    return pd.DataFrame(
        {
            "study_id": pseudonymise(key, "study"),
            "patient_id": pseudonymise(parts["patient"], "patient"),
            "image_path": f"{base}/" + relative,
            "view": view,
            "sex": normalise_sex(df["Sex"]),
            "age": parse_ages(df["Age"]),
            **{f"{column}_code": label_codes(df[header], path, header)
               for header, column in CHEXPERT_FINDINGS.items()},
            "official_split": _OFFICIAL_SPLIT[path.name.removesuffix(".gz")],
        }
    )

