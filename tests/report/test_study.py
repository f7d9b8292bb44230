"""Per-study panel + JSON: content, bits saved, atomic/resumable writing, speed-friendly rendering."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from synthetic_run import SIMPLIFY_NAME
from PIL import Image

import pipeline.report.study as study
from pipeline.report.study import (
    REPORT_NAME,
    caption_lines,
    difference_overlay,
    make_study_report,
    parse_simplify_name,
    render_panel,
    write_run_study_reports,
    write_study_report,
)

ROW = {"study_id": "std-00aa11bb22cc", "label": 1, "p_orig": 0.91, "p_simpl": 0.62, "bpd_orig": 4.5,
       "bpd_simpl": 1.5, "split": "test", "view": "PA", "sex": "F", "age_band": "60-79", "source": "demo"}


def images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    original = np.tile(np.arange(size, dtype=np.uint8) * 10, (size, 1))
    simplified = original.copy()
    simplified[: size // 2] = 100  # top half flattened
    return original, simplified


def test_record_fields_and_bits_saved():
    report = make_study_report(ROW, dims=64 * 64, task="effusion", setting="joint")
    record = report.to_dict()
    assert record["bits_saved"] == pytest.approx((4.5 - 1.5) * 4096)
    assert record["bits_orig"] == pytest.approx(4.5 * 4096) and record["bits_simpl"] == pytest.approx(1.5 * 4096)
    assert record["label_name"] == "effusion" and record["positive_name"] == "effusion"
    assert record["correct_orig"] is True and record["correct_simpl"] is True
    assert record["attributes"] == {"view": "PA", "sex": "F", "age_band": "60-79", "source": "demo", "split": "test"}
    negative = make_study_report({**ROW, "label": 0}, 10, "sex", "audit", class_names={"sex": ("F", "M")})
    assert negative.label_name == "F" and negative.positive_name == "M" and not negative.correct_orig


def test_unlabelled_study_has_no_verdict():
    report = make_study_report({**ROW, "label": pd.NA}, 10, "effusion", "joint")
    assert report.label is None and report.label_name == "unlabelled"
    assert report.to_dict()["correct_orig"] is None and report.to_dict()["correct_simpl"] is None
    assert "truth: unlabelled" in caption_lines(report)[0]


def test_caption_says_ids_labels_probabilities_and_bits():
    text = "\n".join(caption_lines(make_study_report(ROW, 4096, "effusion", "joint")))
    for expected in ("std-00aa11bb22cc", "truth: effusion", "0.91", "0.62", "4.50", "1.50", "12,288 bits", "67%"):
        assert expected in text


def test_difference_overlay_is_signed_and_symmetric():
    original = np.full((4, 4), 100, np.uint8)
    simplified = original.copy()
    simplified[0, 0], simplified[3, 3] = 150, 50  # +50 and -50
    overlay, limit = difference_overlay(original, simplified)
    assert limit == 50
    red, blue = overlay[0, 0].astype(int), overlay[3, 3].astype(int)
    assert red[0] > red[2] and blue[2] > blue[0]  # brighter -> red, darker -> blue
    np.testing.assert_array_equal(overlay[1, 1], [100, 100, 100])  # unchanged pixels keep the anatomy
    with pytest.raises(ValueError, match="differ in shape"):
        difference_overlay(original, simplified[:2])


def test_panel_layout_enlarges_the_original_blockwise_and_the_simplified_smoothly():
    original, simplified = images(16)
    panel = render_panel(original, simplified, make_study_report(ROW, 256, "effusion", "joint"), tile=64)
    assert panel.mode == "RGB" and panel.size[0] == 2 * 10 + 3 * 64 + 2 * 8
    pixels = np.asarray(panel)
    # The original tile sits at (x=10, y=36) and each source pixel became a 4x4 block.
    tile = pixels[36:36 + 64, 10:10 + 64, 0]
    np.testing.assert_array_equal(tile[::4, ::4], original)
    # The simplified tile (next one right) is bicubic: 4x4 blocks are not constant where it changes.
    smooth = pixels[36:36 + 64, 10 + 64 + 8:10 + 2 * 64 + 8, 0].astype(int)
    blocks = smooth.reshape(16, 4, 16, 4).transpose(0, 2, 1, 3).reshape(16, 16, 16)
    varies = np.ptp(simplified.astype(int), axis=None) > 0
    assert varies and (np.ptp(blocks, axis=-1) > 0).mean() > 0.2
    with pytest.raises(ValueError, match="std-00aa11bb22cc"):
        render_panel(original, simplified[:8], make_study_report(ROW, 256, "effusion", "joint"))


def test_panel_shows_the_source_radiograph_with_the_simplified_image_on_its_geometry(monkeypatch):
    """A non-square source (rows 48 x cols 32) sits centred on the square the working image covers
    (ingest's square pad), at the source's resolution; the simplified image is upsampled onto it."""
    original, simplified = images(16)
    source = np.zeros((48, 32), np.uint8)
    source[:, :] = 40
    source[::2, ::2] = 220  # fine detail that only the source has (a checkerboard of single pixels)
    report = make_study_report(ROW, 256, "effusion", "joint")
    titles = []
    compose = study._compose
    monkeypatch.setattr(study, "_compose", lambda tiles, names, *rest: titles.extend(names) or compose(tiles, names, *rest))
    panel = render_panel(original, simplified, report, tile=48, full_original=source)
    assert titles[0] == "Original (32 x 48 px source)"
    pixels = np.asarray(panel)[36:36 + 48]  # tiles: 48 x 48 (the source's larger side), titles above
    shown = pixels[:, 10:10 + 48, 0]
    np.testing.assert_array_equal(shown[:, 8:40], source)  # the source's own pixels, not the 16-px cache
    assert (shown[:, :8] == 40).all() and (shown[:, 40:] == 40).all()  # padded with its minimum
    smooth = pixels[:, 10 + 48 + 8:10 + 2 * 48 + 8, 0].astype(int)
    upsampled = np.asarray(Image.fromarray(simplified).resize((48, 48), Image.Resampling.BICUBIC)).astype(int)
    np.testing.assert_array_equal(smooth, upsampled)
    overlay_tile = pixels[:, 10 + 2 * (48 + 8):10 + 3 * 48 + 2 * 8]
    unchanged = overlay_tile[40:, 8:40]  # the bottom rows: simplified == original there
    np.testing.assert_array_equal(unchanged[..., 0], source[40:])  # the change is drawn on the source


def test_write_study_report_files_and_resume(tmp_path):
    original, simplified = images(16)
    report = make_study_report(ROW, original.size, "effusion", "joint")
    folder = write_study_report(tmp_path / "studies", original, simplified, report, tile=64)
    assert sorted(p.name for p in folder.iterdir()) == ["original.png", "panel.png", REPORT_NAME, "simplified.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "original.png")), original)
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "simplified.png")), simplified)
    assert json.loads((folder / REPORT_NAME).read_text())["study_id"] == "std-00aa11bb22cc"
    stamp = (folder / "panel.png").stat().st_mtime_ns
    write_study_report(tmp_path / "studies", original, simplified, report, tile=64)
    assert (folder / "panel.png").stat().st_mtime_ns == stamp  # unchanged record: skipped
    changed = make_study_report({**ROW, "p_simpl": 0.3}, original.size, "effusion", "joint")
    write_study_report(tmp_path / "studies", original, simplified, changed, tile=64)
    assert json.loads((folder / REPORT_NAME).read_text())["p_simpl"] == 0.3
    assert not list(folder.glob(".*tmp"))  # no temporary files left behind


def test_run_folder_reports(run_folder):
    folders = write_run_study_reports(run_folder, SIMPLIFY_NAME, splits=["test"])
    predictions = pd.read_csv(run_folder / "simplify" / SIMPLIFY_NAME / "predictions.csv")
    assert sorted(f.name for f in folders) == sorted(predictions.loc[predictions.split == "test", "study_id"])
    record = json.loads((folders[0] / REPORT_NAME).read_text())
    assert record["dims"] == 32 * 32 and record["setting"] == "joint" and record["task"] == "effusion"
    labelled = predictions.set_index("study_id")["effusion"]
    for folder in folders:
        record = json.loads((folder / REPORT_NAME).read_text())
        assert record["label"] == (None if pd.isna(labelled[folder.name]) else int(labelled[folder.name]))
    assert record["attributes"]["age_band"] in {"<40", "40-59", "60-79", ">=80"}
    assert "patient_id" not in json.dumps(record) and "image_path" not in json.dumps(record)


def test_bad_inputs_name_the_file(tmp_path):
    from pipeline.data.store import image_loader, write_images

    with pytest.raises(FileNotFoundError, match="not a cohort store"):
        image_loader(tmp_path / "missing")("std-00000000")
    write_images(tmp_path / "store", ["std-00000001"], np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(KeyError, match="std-00000002"):
        image_loader(tmp_path / "store")("std-00000002")
    assert parse_simplify_name("audit-sex") == ("audit", "sex")
    with pytest.raises(ValueError, match="<setting>-<task>"):
        parse_simplify_name("joint")
