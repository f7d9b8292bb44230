"""The cohort HTML report: self-contained, complete, links the study panels and next steps."""

from __future__ import annotations

import json
import re

import pandas as pd
from synthetic_run import SIMPLIFY_NAME, make_sweep

from pipeline.report.html import write_run_cohort_report
from pipeline.report.study import write_run_study_reports


def test_cohort_report_folder(run_folder):
    write_run_study_reports(run_folder, SIMPLIFY_NAME)
    index = write_run_cohort_report(run_folder, SIMPLIFY_NAME, sweep=make_sweep())
    out = run_folder / "cohort_report"
    assert index == out / "index.html"
    assert {p.name for p in out.iterdir()} >= {"index.html", "studies.csv", "studies.parquet", "subgroups.csv", "plots"}
    assert {p.name for p in (out / "plots").iterdir()} == {"tradeoff.png", "bpd_hist.png", "subgroups.png"}
    page = index.read_text()
    for heading in ("How to read this report", "Key numbers", "By finding", "Subgroups", "Simplicity and performance",
                    "Studies", "Data and next steps", "Bits per pixel", "MacroStd", "not for diagnosis"):
        assert heading in page, heading
    assert page.count('src="data:image/png;base64,') == 3  # plots embedded: the page travels alone
    assert not re.search(r'(src|href)="https?://', page)  # nothing fetched from the network
    table = pd.read_csv(out / "studies.csv")
    panels = re.findall(r'<img loading="lazy" src="\.\./studies/(std-[0-9a-f]+)/panel\.png"', page)
    assert sorted(panels) == sorted(table["study_id"])
    for sid in panels:
        assert (run_folder / "studies" / sid / "panel.png").is_file()  # every link resolves
    assert f"simplebits review {run_folder}" in page and f"sqlite:///{run_folder}/mlflow.db" in page
    assert "/data/p" not in page and "image_path" not in page  # no source paths


def test_report_without_sweep_or_manifest(run_folder):
    (run_folder / "ingest" / "manifest.csv").unlink()
    page = write_run_cohort_report(run_folder, SIMPLIFY_NAME).read_text()
    assert "Trade-off" not in page and "Subgroups" in page
    # bpd histogram + subgroups by sex (predictions carry sex); age/view/source came from the manifest
    assert page.count('src="data:image/png;base64,') == 2
    assert "sex" in page and "60-79" not in page


def test_checks_section_flags_a_kept_shortcut(run_folder):
    name = SIMPLIFY_NAME
    metrics_path = run_folder / "simplify" / name / "metrics.json"
    checks = {"val_shortcut_kept": True, "val_distractor_pull_simpl": 0.115, "val_distractor_pull_p_simpl": 0.003,
              "val_distractor_pull_orig": 0.143, "val_distractor_pull_p_orig": 0.001,
              "val_independent_auroc_orig": 0.926, "val_independent_auroc_simpl": 0.877,
              "val_mean_distractor_retention": 0.27, "val_mean_sign_preference": 1.08}
    metrics_path.write_text(json.dumps(checks))
    page = write_run_cohort_report(run_folder, name).read_text()
    assert "<h2>Checks</h2>" in page and "shortcut kept" in page and "no shortcut detected" not in page
    assert "0.115" in page and "0.003" in page and "27%" in page and "1.08×" in page and "0.877" in page
    metrics_path.write_text(json.dumps({**checks, "val_shortcut_kept": False}))
    page = write_run_cohort_report(run_folder, name).read_text()
    assert "no shortcut detected" in page and "shortcut kept" not in page
    metrics_path.write_text(json.dumps({"auroc_simpl": 0.9}))  # a run without checks: no section
    assert "<h2>Checks</h2>" not in write_run_cohort_report(run_folder, name).read_text()


def test_secondary_capture_note_counts_the_de_identified_originals(tmp_path):
    from pipeline.io.dicom_write import ORIGINAL_FILE, SIMPLIFIED_FILE
    from pipeline.report.html import secondary_capture_note

    captures = []
    for study in ("a", "b", "c"):
        (tmp_path / study).mkdir()
        captures.append(tmp_path / study / SIMPLIFIED_FILE)
        captures[-1].write_bytes(b"")
    for study in ("a", "b"):
        (tmp_path / study / ORIGINAL_FILE).write_bytes(b"")
    note = secondary_capture_note(captures, None, tmp_path)
    assert note.startswith("3 simplified images")
    assert "2 of these studies also hold their de-identified original" in note
    assert "burned-in annotation" in note
    (tmp_path / "c" / ORIGINAL_FILE).write_bytes(b"")
    assert "burned-in" not in secondary_capture_note(captures, None, tmp_path)
    assert "original" not in secondary_capture_note(captures[:0] or None, None, tmp_path)
