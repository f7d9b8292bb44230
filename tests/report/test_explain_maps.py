"""Saliency maps of ``simplebits explain`` in the study panels, the cohort report, the review server
and ``simplebits run``'s explain stage: shown where a study has maps, nothing changes where none has."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from synthetic_run import EXPLAIN_METHODS, SIMPLIFY_NAME, request, running_review_server

from pipeline.errors import UserError
from pipeline.explain.overlay import overlay_rgb
from pipeline.explain.run import map_path, read_map_rows
from pipeline.report.html import example_studies, write_run_cohort_report
from pipeline.report.maps import EXPLAIN_PANEL_NAME, METHOD_TITLES, map_file_name
from pipeline.report.study import REPORT_NAME, write_run_study_reports
from pipeline.run_folder import RunFolder

TASK = SIMPLIFY_NAME.rpartition("-")[2]


def maps_dir(run: Path) -> Path:
    return RunFolder(run).explain(TASK)


def with_maps(run: Path) -> list[str]:
    return sorted({row["study_id"] for row in read_map_rows(maps_dir(run))})


def record(run: Path, study_id: str) -> dict:
    return json.loads((run / "studies" / study_id / REPORT_NAME).read_text())


def test_every_explain_method_has_a_title():
    from pipeline.explain.methods import METHODS

    assert list(METHOD_TITLES) == list(METHODS)  # the tiles' order is the command's


def test_panel_shows_original_simplified_and_each_map_at_the_same_scale(explained_run):
    run, studies = explained_run, with_maps(explained_run)
    assert len(studies) == 3
    for folder in sorted((run / "studies").iterdir()):
        has_maps = folder.name in studies
        assert record(run, folder.name)["maps"] == (list(EXPLAIN_METHODS) if has_maps else [])
        expected = {EXPLAIN_PANEL_NAME, *(map_file_name(m) for m in EXPLAIN_METHODS)}
        assert expected <= {p.name for p in folder.iterdir()} if has_maps else \
            not expected & {p.name for p in folder.iterdir()}
    sid = studies[0]
    original = np.asarray(Image.open(run / "studies" / sid / "original.png"))
    panel = np.asarray(Image.open(run / "studies" / sid / EXPLAIN_PANEL_NAME).convert("RGB"))
    tile, margin, gap, top = 256, 10, 8, 36  # 32 px images enlarged 8x, as in the difference panel
    assert panel.shape[1] == 2 * margin + 4 * tile + 3 * gap  # original | simplified | ig | gradcam
    tiles = [panel[top:top + tile, margin + i * (tile + gap):margin + i * (tile + gap) + tile] for i in range(4)]
    np.testing.assert_array_equal(tiles[0][::8, ::8, 0], original)
    for i, method in enumerate(EXPLAIN_METHODS, start=2):
        overlay = overlay_rgb(original, np.load(map_path(maps_dir(run), sid, method)))
        np.testing.assert_array_equal(tiles[i][::8, ::8], overlay)  # each map over its own study, same scale
        np.testing.assert_array_equal(np.asarray(Image.open(run / "studies" / sid / map_file_name(method))), overlay)


def test_maps_leave_the_study_folder_with_the_explain_folder(explained_run):
    sid = with_maps(explained_run)[0]
    shutil.rmtree(maps_dir(explained_run))
    write_run_study_reports(explained_run, SIMPLIFY_NAME)
    assert record(explained_run, sid)["maps"] == []
    assert sorted(p.name for p in (explained_run / "studies" / sid).iterdir()) == \
        ["original.png", "original_full.png", "panel.png", REPORT_NAME, "simplified.png"]  # (its source exists)


def test_a_map_of_another_size_names_its_file(explained_run):
    sid = with_maps(explained_run)[0]
    path = map_path(maps_dir(explained_run), sid, "ig")
    np.save(path, np.zeros((16, 16), np.float32))
    with pytest.raises(UserError, match=re.escape(str(path))):
        write_run_study_reports(explained_run, SIMPLIFY_NAME, overwrite=True)


def test_cohort_report_shows_example_maps_and_their_cost(explained_run):
    page = write_run_cohort_report(explained_run, SIMPLIFY_NAME).read_text()
    section = page[page.index('<section id="saliency-maps">'):]
    section = section[:section.index("</section>")]
    shown = re.findall(r'<img loading="lazy"\s+src="\.\./studies/(std-[0-9a-f]+)/explain\.png"', section)
    assert sorted(shown) == with_maps(explained_run)  # 3 studies with maps, fewer than MAP_EXAMPLES
    for sid in shown:
        assert (explained_run / "studies" / sid / EXPLAIN_PANEL_NAME).is_file()  # every link resolves
    rows = pd.DataFrame(read_map_rows(maps_dir(explained_run)))
    for method in EXPLAIN_METHODS:
        seconds = rows.loc[rows["method"] == method, "seconds"].astype(float).mean()
        title = METHOD_TITLES[method][0]
        assert re.search(rf"<td class=\"l\">{title}</td><td>3</td><td>{seconds:.3f}</td>", section), title
    # the gallery links the maps of exactly the studies that have them
    linked = re.findall(r'href="\.\./studies/(std-[0-9a-f]+)/explain\.png">saliency maps', page)
    assert sorted(linked) == with_maps(explained_run)


def test_cohort_report_without_maps_has_no_maps_section(reported_run):
    page = write_run_cohort_report(reported_run, SIMPLIFY_NAME).read_text()
    assert "saliency-maps" not in page and "explain.png" not in page


def test_examples_take_positives_and_negatives_in_turn():
    table = pd.DataFrame({"study_id": [f"std-{i}" for i in range(6)], "label": [1, 1, 1, 0, 0, None]})
    picked = example_studies(table, ["std-0", "std-1", "std-2", "std-3", "std-5"], n=4)
    assert picked["study_id"].tolist() == ["std-0", "std-3", "std-5", "std-1"]


def test_review_api_lists_and_serves_the_maps(explained_run, tmp_path):
    studies = with_maps(explained_run)
    other = next(p.name for p in (explained_run / "studies").iterdir() if p.name not in studies)
    folder = explained_run / "studies" / studies[1]
    (folder / "map-evil.png").write_bytes(b"not a method")  # an unknown method is not served
    (tmp_path / "secret.png").write_bytes(b"outside")
    os.remove(folder / map_file_name("gradcam"))
    os.symlink(tmp_path / "secret.png", folder / map_file_name("gradcam"))  # a map leading out of studies/
    with running_review_server(explained_run) as base:
        listed = {s["study_id"]: s["maps"] for s in json.loads(request(base, "GET", "/api/studies")[1])["studies"]}
        first = listed[studies[0]]
        assert [m["method"] for m in first] == list(EXPLAIN_METHODS)
        assert first[0] == {"method": "ig", "title": "Integrated Gradients",
                            "url": f"/studies/{studies[0]}/map-ig.png"}
        for item in first:
            status, body = request(base, "GET", item["url"])
            assert status == 200 and body == (explained_run / item["url"].lstrip("/")).read_bytes()
        assert request(base, "GET", f"/studies/{studies[0]}/{EXPLAIN_PANEL_NAME}")[0] == 200
        assert [m["method"] for m in listed[studies[1]]] == ["ig"]  # the symlinked map is not offered
        assert listed[other] == []
        for path in (f"/studies/{studies[1]}/map-evil.png", f"/studies/{studies[1]}/map-gradcam.png",
                     f"/studies/{other}/map-ig.png", f"/studies/{studies[0]}/map-..%2Fig.png"):
            status, body = request(base, "GET", path)
            assert status in (403, 404) and b"outside" not in body and b"not a method" not in body, path


def test_explain_stage_writes_the_maps_of_each_task(run_folder, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "explain"))
    from tiny_models import tiny_glow

    from pipeline.models.classifiers import create_classifier, save_classifier
    from pipeline.prior import save_prior
    from pipeline.runtime.tracking import Tracker
    from pipeline.workflow import ExplainStageConfig, RunConfig, _explain_stage

    assert RunConfig().explain.enabled is False  # make demo's time does not grow
    folder = RunFolder(run_folder)
    save_classifier(create_classifier("nf_cnn", widths=[8, 16, 32]), folder.classifier_weights(TASK), task=TASK)
    save_prior(tiny_glow(), folder.prior_weights)
    stage = ExplainStageConfig(enabled=True, methods=["gradcam", "latent_shift"], limit=2, device="cpu",
                               latent_shift={"steps": 2})
    summary = _explain_stage(stage, folder, TASK, Tracker(run_folder, enabled=False))
    assert summary["maps_written"] == 4 and summary["task"] == TASK
    manifest = pd.read_csv(run_folder / "ingest" / "manifest.csv")
    first_test = manifest.loc[manifest["split"] == "test", "study_id"].tolist()[:2]
    assert with_maps(run_folder) == sorted(first_test)
    inputs = json.loads((folder.explain(TASK) / "inputs.json").read_text())
    assert "prior/prior.safetensors" in inputs  # the run's prior, not the shipped one


def test_explain_section_paths_come_from_the_run():
    from pipeline.config import ConfigError, load_config
    from pipeline.workflow import RunConfig

    config = load_config(RunConfig, None, ["explain.enabled=true", "explain.methods=[ig]", "explain.limit=2"])
    assert config.explain.methods == ["ig"] and config.for_task("effusion").explain.limit == 2
    with pytest.raises(ConfigError, match="out: set by the run"):
        load_config(RunConfig, None, ["explain.out=elsewhere"])
