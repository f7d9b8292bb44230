"""Demo renders written in the CheXpert, MIMIC-CXR-JPG and NIH layouts: the files where the real datasets
put them, the real headers, and manifests whose labels are the demo's ground truth."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.data.demo.dataset_layouts import LAYOUTS, NIH_HEADER, read_demo_studies, write_demo_layout
from pipeline.data.sources import ManifestConfig, build_manifest
from pipeline.io.readers import read_radiograph

# where each layout keeps its images, relative to the dataset root
IMAGE_PATHS = {
    "chexpert": re.compile(r"^(train|valid)/patient\d{5}/study\d+/view1_frontal\.jpg$"),
    "mimic-cxr-jpg": re.compile(r"^files/p(\d{2})/p(\d{8})/s\d{8}/[0-9a-f]{8}(-[0-9a-f]{8}){4}\.jpg$"),
    "nih": re.compile(r"^images/\d{8}_\d{3}\.png$"),
}
LABEL_FILES = {
    "chexpert": ["train.csv", "valid.csv"],
    "mimic-cxr-jpg": ["mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz",
                      "mimic-cxr-2.0.0-split.csv.gz", "patients.csv.gz"],
    "nih": ["Data_Entry_2017.csv"],
}


def _wheel_header(name: str) -> str:
    """First line of a label table shipped in the torchxrayvision wheel (the real datasets' headers)."""
    from importlib.util import find_spec

    spec = find_spec("torchxrayvision")  # located, not imported: its import needs torchvision
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision (whose wheel ships the real label headers) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    with gzip.open(path, "rt") as handle:
        return handle.readline().rstrip("\n")


@pytest.fixture(scope="module")
def layouts(demo_renders: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("layouts")
    return {layout: write_demo_layout(layout, out / layout, cohort_dir=demo_renders) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_images_and_tables_where_the_dataset_keeps_them(layouts, demo_renders, layout):
    root = layouts[layout]
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".jpg", ".png"))
    assert len(images) == len(pd.read_csv(demo_renders / "manifest.csv"))
    assert all(IMAGE_PATHS[layout].match(path) for path in images), images[:3]
    assert all((root / name).is_file() for name in LABEL_FILES[layout])
    assert not list(root.rglob("*.dcm")), "the demo DICOMs (synthetic identities) must stay out of the layout"
    if layout == "mimic-cxr-jpg":  # pXX is the subject's first two digits
        assert all(m.group(2)[:2] == m.group(1) for m in map(IMAGE_PATHS[layout].match, images))


def test_headers_are_the_real_ones(layouts):
    chexpert = (layouts["chexpert"] / "train.csv").read_text().splitlines()[0]
    assert chexpert == _wheel_header("chexpert_train.csv.gz")
    # the 2017 release: the v2020 header plus the trailing comma of every line
    assert NIH_HEADER == _wheel_header("Data_Entry_2017_v2020.csv.gz") + ","
    lines = (layouts["nih"] / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == NIH_HEADER and all(line.endswith(",") for line in lines)


def _demo_truth(demo_renders: Path) -> pd.DataFrame:
    manifest = pd.read_csv(demo_renders / "manifest.csv")
    truth = pd.read_csv(demo_renders / "ground_truth.csv")
    return manifest.merge(truth[["study_id", "distractor_present"]], on="study_id")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_manifest_labels_are_the_demo_ground_truth(layouts, demo_renders, layout):
    root = layouts[layout]
    manifest = build_manifest(ManifestConfig(format=layout, root=str(root), out=str(root / "m.csv")))
    demo = _demo_truth(demo_renders)
    assert len(manifest) == len(demo)
    assert manifest["patient_id"].nunique() == demo["patient_id"].nunique()

    def counts(frame: pd.DataFrame, columns: list[str]) -> list[tuple]:
        return sorted(frame[columns].astype(str).itertuples(index=False, name=None))

    built = manifest.assign(age=manifest["age"].astype(int), effusion=manifest["effusion"].astype(int))
    expected = demo.assign(age=demo["age"].astype(int))
    assert counts(built, ["sex", "age", "effusion"]) == counts(expected, ["sex", "age", "effusion"])
    if layout != "nih":  # NIH has no Support Devices label
        assert counts(manifest.assign(s=manifest["support_devices"].astype(int)), ["effusion", "s"]) == \
            counts(demo.rename(columns={"distractor_present": "s"}), ["effusion", "s"])
    assert (manifest["no_finding"].fillna(0).astype(int) == 1 - manifest["effusion"].astype(int)).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pixels_are_the_demo_renders(layouts, demo_renders, layout):
    demo = sorted(s.image.tobytes() for s in read_demo_studies(demo_renders))
    root = layouts[layout]
    written = [np.round(read_radiograph(p)[0] * 255).astype(np.uint8)
               for p in sorted(root.rglob("*")) if p.suffix in (".jpg", ".png")]
    if layout == "nih":  # PNG: lossless
        assert sorted(image.tobytes() for image in written) == demo
    else:  # JPEG at quality 95: each image within a few grey levels of one demo render
        renders = np.stack([np.frombuffer(b, np.uint8) for b in demo]).astype(float)
        for image in written:
            error = np.abs(renders - image.reshape(-1).astype(float)).mean(axis=1)
            assert error.min() < 2.0


def test_demo_layout_command(demo_renders, tmp_path, capsys):
    assert main(["demo-layout", "--format", "nih", "--out", str(tmp_path / "nih"),
                 "--cohort", str(demo_renders)]) == 0
    assert "simplebits manifest --format nih" in capsys.readouterr().out
    assert len(list((tmp_path / "nih" / "images").glob("*.png"))) == len(pd.read_csv(demo_renders / "manifest.csv"))
