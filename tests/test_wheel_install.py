"""A wheel install resolves the same config as the checkout: the presets ship as package data.

The wheel is built from a copy of the sources (a build writes build/ and *.egg-info beside them),
installed without dependencies into a folder of its own and run from another folder with that
folder first on PYTHONPATH, so nothing of the checkout can be read. The dependencies come from the
test's own environment. ``--print-config`` resolves the config without running the pipeline; a second
test runs the whole main job from the wheel on a tiny config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cohort_fixtures import TINY_DEMO_RUN

pytestmark = pytest.mark.slow  # builds and installs a wheel

REPO = Path(__file__).resolve().parents[1]
# what a build of the project reads (pyproject.toml names README.md; setup.py maps configs/)
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "pipeline", "configs")
RUN_ARGS = ["run", "--set", "cohort.n=40", "--set", "classify.train.epochs=2", "--print-config"]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, installed (without dependencies) into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(root / "dist"),
         str(source)], cwd=root)
    (wheel,) = (root / "dist").glob("*.whl")
    target = root / "site"
    run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], cwd=root)
    return target


def test_wheel_resolves_the_same_config_as_the_checkout(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from_wheel = {"PYTHONPATH": str(installed)}
    where = run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], elsewhere, from_wheel)
    assert Path(where.strip()).is_relative_to(installed)

    cli = [sys.executable, "-m", "pipeline.cli", *RUN_ARGS]
    wheel_config = yaml.safe_load(run(cli, elsewhere, from_wheel))
    checkout_config = yaml.safe_load(run(cli, elsewhere))
    assert wheel_config == checkout_config
    # the preset was read (configs/run.yaml changes these from the model defaults), then --set
    assert wheel_config["cohort"]["distractor"]["mode"] == "independent"
    assert wheel_config["prior"]["finetune"] is False
    assert wheel_config["cohort"]["n"] == 40 and wheel_config["classify"]["train"]["epochs"] == 2


def test_wheel_runs_the_main_job_from_another_folder(installed, tmp_path):
    """The whole ``simplebits run`` from the wheel alone, tiny: every file it reads at run time (the
    shipped prior, the demo CT, report templates, the review page) must be package data."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    overrides = [arg for item in TINY_DEMO_RUN for arg in ("--set", item)]
    run([sys.executable, "-m", "pipeline.cli", "run", *overrides, "--out", "run"],
        elsewhere, {"PYTHONPATH": str(installed)})
    out = elsewhere / "run"
    for name in ("config.resolved.yaml", "mlflow.db", "cohort_report/index.html",
                 "classifier/effusion/model.safetensors", "simplify/audit-effusion/metrics.json",
                 "simplify/joint-effusion/metrics.json"):
        assert (out / name).is_file(), name
    assert any((out / "dicom_sc").rglob("*.dcm")), "no Secondary Captures"
    # the review page's own files and the run's studies, as the wheel's review server reads them
    review = ("from pipeline.report.review.server import STATIC_DIR, STATIC_FILES, ReviewApp\n"
              "assert all((STATIC_DIR / name).is_file() for name in STATIC_FILES), STATIC_DIR\n"
              "print(len(ReviewApp('run').studies()))")
    assert int(run([sys.executable, "-c", review], elsewhere, {"PYTHONPATH": str(installed)})) > 0
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["cohort"]["distractor"]["mode"] == "independent"  # the shipped preset, read from the wheel
