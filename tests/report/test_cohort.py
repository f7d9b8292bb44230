"""Cohort analysis: study table, age bands, subgroup AUROC, MacroStd, plots, tables on disk."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from synthetic_run import make_sweep
from PIL import Image

from pipeline.report import cohort


def predictions() -> pd.DataFrame:
    return pd.DataFrame({
        "study_id": [f"std-{i:02d}" for i in range(8)],
        "split": ["test"] * 8,
        "label": [0, 1, 0, 1, 0, 1, 0, 1],
        "p_orig": [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.6, 0.4],
        "p_simpl": [0.2, 0.7, 0.6, 0.9, 0.1, 0.8, 0.3, 0.2],
        "bpd_orig": [4.0] * 8,
        "bpd_simpl": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0],
    })


def manifest() -> pd.DataFrame:
    return pd.DataFrame({
        "study_id": [f"std-{i:02d}" for i in range(8)],
        "patient_id": [f"pat-{i:02d}" for i in range(8)],
        "image_path": [f"/secret/p{i}.dcm" for i in range(8)],
        "view": ["PA", "PA", "PA", "PA", "AP", "AP", "AP", "AP"],
        "sex": ["F", "F", "F", "F", "M", "M", "M", "M"],
        "age": [25, 39.9, 40, 59, 60, 79, 80, np.nan],
        "effusion": [0, 1, 0, 1, 0, 1, 0, 1],
        "split": ["test"] * 8,
        "source": ["demo"] * 8,
    })


def test_age_bands_edges():
    bands = cohort.age_band(pd.Series([0, 39.9, 40, 59.5, 60, 79, 80, 101, None]))
    assert list(bands.astype(object).where(bands.notna(), None)) == [
        "<40", "<40", "40-59", "40-59", "60-79", "60-79", ">=80", ">=80", None]


def test_study_table_joins_and_derives():
    table = cohort.build_study_table(predictions(), manifest(), dims=100)
    assert "image_path" not in table.columns  # source paths can embed raw identifiers
    assert len(table) == 8 and table["split"].tolist() == ["test"] * 8
    assert table["bits_saved"].tolist() == pytest.approx([300, 200] * 4)
    assert table["correct_orig"].tolist() == [True, True, True, True, True, True, False, False]
    assert table["age_band"].astype(str).tolist()[:3] == ["<40", "<40", "40-59"]
    with pytest.raises(ValueError, match="p_simpl"):
        cohort.build_study_table(predictions().drop(columns="p_simpl"))


def test_labels_from_task_columns_as_apply_writes_them():
    apply_style = predictions().drop(columns="label").assign(
        effusion=[0, 1, 0, 1, 0, 1, 0, None], sex=["F", "F", "F", "F", "M", "M", "M", "M"], bits_saved=7.0)
    table = cohort.build_study_table(apply_style, manifest(), dims=100, task="effusion")
    assert table["label"].isna().tolist() == [False] * 7 + [True]
    assert table["bits_saved"].tolist() == [7.0] * 8  # the producer's value is kept
    assert table["correct_orig"].isna().sum() == 1
    summary = cohort.summarise(table).iloc[0]
    assert summary["n"] == 8 and summary["n_labelled"] == 7 and summary["n_positive"] == 3
    by_sex = cohort.build_study_table(apply_style, task="sex")
    assert by_sex["label"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # M = 1, as the classifiers are trained
    with pytest.raises(ValueError, match="'label' nor the label columns of task 'sex'"):
        cohort.build_study_table(apply_style.drop(columns="sex"), task="sex")
    # any registered task, its label policy applied: uncertain (-1) and blank are unlabelled
    devices = apply_style.assign(support_devices=[1, 0, -1, None, 1, 0, 1, 0])
    table = cohort.build_study_table(devices, task="support_devices")
    assert table["label"].tolist()[:4] == [1, 0, pd.NA, pd.NA]


def test_unknown_attribute_values_form_their_own_subgroup():
    table = cohort.build_study_table(predictions(), manifest().assign(view=["PA"] * 4 + [""] * 4))
    sub = cohort.subgroup_performance(table, families=("view", "age_band"))
    assert sub.loc[sub.family == "view", "subgroup"].tolist() == ["PA", "unknown"]
    assert sub.loc[(sub.family == "age_band") & (sub.subgroup == "unknown"), "n"].tolist() == [1]


def test_subgroup_auroc_and_macro_std_by_hand():
    table = cohort.build_study_table(predictions(), manifest())
    sub = cohort.subgroup_performance(table, families=("sex", "view", "missing_column"))
    assert set(sub["family"]) == {"sex", "view"}
    females = sub[(sub.family == "sex") & (sub.subgroup == "F")].iloc[0]
    males = sub[(sub.family == "sex") & (sub.subgroup == "M")].iloc[0]
    assert females["auroc_orig"] == 1.0  # scores separate the classes perfectly
    # Males: negatives 0.3, 0.6; positives 0.7, 0.4 -> pairs (pos > neg): 0.7>0.3, 0.7>0.6, 0.4>0.3 = 3/4
    assert males["auroc_orig"] == pytest.approx(0.75)
    # sex and view split the same studies here, so MacroStd = std(1.0, 0.75) = 0.125
    assert cohort.macro_std(sub, "auroc_orig") == pytest.approx(0.125)
    assert cohort.auroc([1, 1], [0.2, 0.3]) != cohort.auroc([1, 1], [0.2, 0.3])  # NaN, undefined


def test_macro_std_skips_undefined_and_single_subgroups():
    sub = pd.DataFrame({"family": ["a", "a", "a", "b", "c", "c"],
                        "auroc": [0.6, 0.8, math.nan, 0.9, 0.5, 0.5]})
    assert cohort.macro_std(sub, "auroc") == pytest.approx((0.1 + 0.0) / 2)
    assert math.isnan(cohort.macro_std(sub[sub.family == "b"], "auroc"))


def test_summaries_per_label():
    table = cohort.build_study_table(predictions(), manifest())
    by_label = cohort.summarise(table, by="label")
    assert by_label["n"].tolist() == [4, 4] and by_label["n_positive"].tolist() == [0, 4]
    assert by_label["accuracy_orig"].tolist() == [0.75, 0.75]
    assert by_label["mean_bpd_simpl"].tolist() == [1.0, 2.0]
    assert cohort.summarise(table).iloc[0]["n"] == 8


def test_plots_and_tables_written(tmp_path):
    table = cohort.build_study_table(predictions(), manifest(), dims=100)
    sub = cohort.subgroup_performance(table)
    paths = [
        cohort.plot_tradeoff(make_sweep(), tmp_path / "plots" / "tradeoff.png"),
        cohort.plot_bpd_histograms(table, tmp_path / "plots" / "bpd.png"),
        cohort.plot_subgroup_auroc(sub, tmp_path / "plots" / "sub.png"),
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    parquet, csv = cohort.write_study_table(table, tmp_path)
    back = pd.read_parquet(parquet)
    assert back["study_id"].tolist() == table["study_id"].tolist()
    assert pd.read_csv(csv)["bits_saved"].tolist() == pytest.approx(table["bits_saved"].tolist())


def test_sweep_columns_are_checked():
    assert cohort.normalise_sweep(make_sweep())["strength"].notna().all()
    with pytest.raises(ValueError, match="auroc"):
        cohort.normalise_sweep(make_sweep().drop(columns="auroc"))
    with pytest.raises(ValueError, match="strength"):
        cohort.normalise_sweep(pd.DataFrame({"method": ["x"], "mean_bpd": [1.0], "auroc": [0.5]}))
