"""The self-contained cohort report: ``cohort_report/index.html`` plus tables and plots.

One HTML file with inline CSS/JS and the plots embedded, so it can be mailed or opened from a
share without a server; the study gallery links the per-study panels under ``studies/`` by
relative path. Written for radiologists: short explanations before each number.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader

from pipeline.report import cohort
from pipeline.report.maps import EXPLAIN_PANEL_NAME, CohortMaps, cohort_maps
from pipeline.report.study import PANEL_NAME
from pipeline.runtime.atomic import atomic_write_text

TEMPLATE = Path(__file__).parent / "templates" / "cohort.html"
REPORT_DIR = "cohort_report"
#: Studies whose maps the report shows in full (the gallery links every study's maps).
MAP_EXAMPLES = 4
#: What the classifier recognises, in words, per task (else the registry's TaskSpec.text).
TASK_DESCRIPTIONS = {"effusion": "pleural effusion", "sex": "the patient's sex"}


def task_description(task: str, positive_name: str) -> str:
    """What a classifier for ``task`` recognises, in words (registry: ``TaskSpec.text``)."""
    if task in TASK_DESCRIPTIONS:
        return TASK_DESCRIPTIONS[task]
    from pipeline.errors import UserError
    from pipeline.tasks import get_task

    try:
        return get_task(task).text
    except UserError:
        return positive_name

EXPLAINER = """
<p class="explain"><b>What was done.</b> A <i>classifier</i> was trained to recognise {task_text} on the
radiographs. A second network, the <i>simplifier</i>, then rewrote every image so that it contains as
little information as possible while the classifier still gives the same answer. What survives
simplification is, roughly, what the classifier relies on; what is removed it did not need.</p>
<p class="explain"><b>Bits per pixel (bpd)</b> measure how much information an image holds: a model of
typical radiographs (the <i>density prior</i>) assigns every image a code length, the number of bits a
compressor would need for it, divided by the number of pixels. Lower means simpler, more predictable
content. <b>Bits saved</b> is the whole-image difference between original and simplified.</p>
<p class="explain"><b>AUROC</b> (area under the ROC curve) measures how well the classifier separates
positive from negative studies: 1.0 is perfect, 0.5 is chance. The simplified images are
<b>research outputs, not for diagnosis</b>.</p>
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def html_table(frame: pd.DataFrame, columns: Mapping[str, str], digits: int = 3) -> str:
    """A plain HTML table of the given ``{column: header}`` (all values escaped)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in columns.values())
    def cell(value: Any) -> str:
        text_class = ' class="l"' if isinstance(value, str) else ""  # text left, numbers right
        return f"<td{text_class}>{_fmt(value, digits)}</td>"

    body = "".join("<tr>" + "".join(cell(row.get(c)) for c in columns) + "</tr>" for row in frame.to_dict("records"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _figure(png: Path, caption: str) -> str:
    return (f'<figure><img class="plot" src="{_data_uri(png)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _card(key: str, original: float, simplified: float, digits: int = 3) -> str:
    return (f'<div class="card"><div class="k">{html.escape(key)}</div>'
            f'<div class="v">{_fmt(simplified, digits)} <small>simplified</small></div>'
            f'<div class="k">{_fmt(original, digits)} on the originals</div></div>')


def _truth(label: Any, positive_name: str) -> str:
    return "unlabelled" if pd.isna(label) else positive_name if int(label) else f"no {positive_name}"


def example_studies(table: pd.DataFrame, with_maps: Iterable[str], n: int = MAP_EXAMPLES) -> pd.DataFrame:
    """Up to ``n`` rows of ``table`` among the studies ``with_maps``, positives and negatives taken
    in turn (by study id), so that the examples show the maps with and without the finding."""
    rows = table[table["study_id"].isin(set(with_maps))].sort_values("study_id")
    turn = rows.groupby(rows["label"].fillna(-1), sort=False).cumcount()  # 0, 1, ... within each label
    order = rows.assign(turn=turn, positive=rows["label"].ne(1)).sort_values(["turn", "positive", "study_id"])
    return order.drop(columns=["turn", "positive"]).head(n)


def _maps_section(table: pd.DataFrame, maps: CohortMaps, studies_href: str, positive_name: str) -> str | None:
    """The saliency maps of a few studies (their explain panels) and what each method cost."""
    examples = example_studies(table, maps.studies)
    if examples.empty:  # maps of studies this report does not show
        return None
    environment = Environment(loader=FileSystemLoader(TEMPLATE.parent), autoescape=True)
    return environment.get_template("explain_section.html").render(
        positive_name=positive_name, studies_href=studies_href, panel_name=EXPLAIN_PANEL_NAME,
        n_studies=int(table["study_id"].isin(set(maps.studies)).sum()),
        examples=[{**row, "truth": _truth(row["label"], positive_name)} for row in examples.to_dict("records")],
        cost=maps.cost.to_dict("records"),
    )


def _gallery(table: pd.DataFrame, studies_href: str, positive_name: str,
             with_maps: Collection[str] = ()) -> str:
    cards = []
    for row in table.sort_values("study_id").to_dict("records"):
        sid = html.escape(str(row["study_id"]))
        label = None if pd.isna(row["label"]) else int(row["label"])
        truth = _truth(row["label"], positive_name)
        tags = f'<span class="tag {"pos" if label else "neg"}">{html.escape(truth)}</span>'
        verdicts = {}
        for which in ("simpl", "orig"):
            ok = row[f"correct_{which}"]
            verdicts[which] = "" if pd.isna(ok) else str(int(bool(ok)))
            if verdicts[which]:
                word = "simplified" if which == "simpl" else "original"
                tags += (f'<span class="tag {"ok" if ok else "bad"}">{word} '
                         f'{"correct" if ok else "wrong"}</span>')
        bits = row.get("bits_saved", row["bpd_drop"])
        href = f"{studies_href}/{sid}/{PANEL_NAME}"
        maps_link = (f' · <a href="{studies_href}/{sid}/{EXPLAIN_PANEL_NAME}">saliency maps</a>'
                     if row["study_id"] in with_maps else "")
        cards.append(
            f'<div class="study" data-id="{sid}" data-label="{"" if label is None else label}" '
            f'data-correct-orig="{verdicts["orig"]}" data-correct-simpl="{verdicts["simpl"]}" '
            f'data-flip="{int(row["pred_orig"] != row["pred_simpl"])}" data-bits="{float(bits):.3f}" '
            f'data-pchange="{abs(float(row["p_simpl"]) - float(row["p_orig"])):.4f}">'
            f'<a href="{href}"><img loading="lazy" src="{href}" alt="study {sid}"></a>'
            f'<div class="meta"><b>{sid}</b> {tags}<br>P original {float(row["p_orig"]):.2f} → simplified '
            f'{float(row["p_simpl"]):.2f} · bpd {float(row["bpd_orig"]):.2f} → {float(row["bpd_simpl"]):.2f}{maps_link}</div></div>'
        )
    toolbar = (
        '<div class="toolbar"><label>Show <select id="g-filter">'
        '<option value="all">all studies</option><option value="misclassified">misclassified (original or simplified)</option>'
        '<option value="flipped">answer changed by simplification</option>'
        f'<option value="positive">{html.escape(positive_name)} present</option>'
        f'<option value="negative">{html.escape(positive_name)} absent</option></select></label>'
        '<label>Sort by <select id="g-sort"><option value="-bits">most bits saved</option>'
        '<option value="bits">fewest bits saved</option><option value="-pchange">largest probability change</option>'
        '<option value="id">study id</option></select></label>'
        '<label>Study id <input id="g-search" type="search" placeholder="std-…"></label>'
        '<span class="count" id="g-count"></span></div>'
    )
    return toolbar + '<div class="gallery" id="gallery">' + "".join(cards) + "</div>"


def _checks_section(metrics: Mapping[str, Any], split: str = "val") -> str | None:
    """The run's checks against an independent classifier and the demo cohort's ground truth, with the
    shortcut flag first and in red when the simplified images still carry a mark the classifier uses."""
    def get(key: str) -> Any:  # the audit reports its independent check once, without a split prefix
        return metrics.get(f"{split}_{key}", metrics.get(key))

    items = []
    if get("shortcut_kept") is not None:
        pull = (f"moves the predicted probability by {_fmt(get('distractor_pull_simpl'))} on simplified "
                f"images (p = {_fmt(get('distractor_pull_p_simpl'))}; originals "
                f"{_fmt(get('distractor_pull_orig'))}, p = {_fmt(get('distractor_pull_p_orig'))})")
        if get("shortcut_kept"):
            items.append(f'<li><span class="tag bad">shortcut kept</span> A burned-in mark (text tag or '
                         f"marker) {pull}. The classifier responds to the mark itself, not only to the "
                         "finding, and the simplified images keep it: look at the marked studies below.</li>")
        else:
            items.append(f'<li><span class="tag ok">no shortcut detected</span> Burned-in marks {pull}.</li>')
    if get("independent_auroc_orig") is not None:
        items.append("<li>An <b>independent classifier</b> (another architecture, trained on originals only) "
                     f"scores AUROC {_fmt(get('independent_auroc_orig'))} on originals and "
                     f"{_fmt(get('independent_auroc_simpl'))} on simplified images.</li>")
    if get("mean_distractor_retention") is not None:
        items.append(f"<li>Burned-in marks keep {_fmt(100 * get('mean_distractor_retention'), 0)}% of their "
                     "contrast in the simplified images (ground-truth masks).</li>")
    preference = get("mean_sign_preference")
    if preference is not None and not math.isnan(preference):
        items.append(f"<li>The projected fluid keeps its contrast {_fmt(preference, 2)}× better than the lung "
                     "texture around it (above 1: the effusion sign is preferentially kept).</li>")
    if items and get("mean_distractor_retention") is None:
        items.append("<li>No ground-truth checks: how much of a burned-in mark survives, and the shortcut flag, "
                     "need the masks that only the demo cohort has.</li>")
    if not items:
        return None
    return ('<section><h2>Checks</h2><p class="explain">Validation split. Measured against an independent '
            "classifier and, on the demo cohort, against ground-truth masks.</p><ul>"
            + "".join(items) + "</ul></section>")


def render_cohort_html(
    table: pd.DataFrame,
    subgroups: pd.DataFrame,
    plots: Mapping[str, Path],
    task: str,
    setting: str,
    positive_name: str,
    run_dir_hint: str = "RUN_DIR",
    studies_href: str = "../studies",
    run_metrics: Mapping[str, Any] | None = None,
    secondary_captures: str | None = None,
    maps: CohortMaps | None = None,
) -> str:
    """The report page as a string. ``plots`` maps ``tradeoff|bpd_hist|subgroups`` to PNG files;
    ``secondary_captures``: a sentence on the DICOM Secondary Captures (:func:`secondary_capture_note`);
    ``maps``: the run's saliency maps (a section and a link per study with maps)."""
    overall = cohort.summarise(table).iloc[0]
    by_label = cohort.summarise(table, by="label")
    by_label["label"] = by_label["label"].map(
        lambda v: "unlabelled" if pd.isna(v) else positive_name if v == 1 else f"no {positive_name}")
    ms_orig = cohort.macro_std(subgroups, "auroc_orig")
    ms_simpl = cohort.macro_std(subgroups, "auroc_simpl")
    bits_col = "bits_saved" if "bits_saved" in table else "bpd_drop"
    perf_cols = {"n": "studies", "n_positive": positive_name, "auroc_orig": "AUROC original",
                 "auroc_simpl": "AUROC simplified", "accuracy_orig": "accuracy original",
                 "accuracy_simpl": "accuracy simplified", "mean_bpd_orig": "bpd original",
                 "mean_bpd_simpl": "bpd simplified"}
    sections = [
        f"<section><h2>How to read this report</h2>"
        f"{EXPLAINER.format(task_text=html.escape(task_description(task, positive_name)))}</section>",
        "<section><h2>Key numbers</h2><div class=\"cards\">"
        + _card("AUROC", overall["auroc_orig"], overall["auroc_simpl"])
        + _card("accuracy", overall["accuracy_orig"], overall["accuracy_simpl"])
        + _card("mean bits per pixel", overall["mean_bpd_orig"], overall["mean_bpd_simpl"], 2)
        + _card("MacroStd of AUROC across subgroups", ms_orig, ms_simpl)
        + f'<div class="card"><div class="k">mean bits saved per image</div>'
          f'<div class="v">{float(table[bits_col].mean()):,.0f}</div>'
          f'<div class="k">{len(table)} studies</div></div></div></section>',
        *([checks] if (checks := _checks_section(run_metrics or {})) else []),
        "<section><h2>By finding</h2><p class=\"explain\">Per true label: how often the classifier is right, "
        "and how many bits the images cost before and after simplification.</p>"
        + html_table(by_label, {"label": "truth", **{k: v for k, v in perf_cols.items() if "auroc" not in k}})
        + "</section>",
    ]
    subgroup_section = (
        "<section><h2>Subgroups</h2><p class=\"explain\">Does the classifier work equally well for all patients? "
        "AUROC per sex, age band, view and data source. <b>MacroStd</b> summarises the discrepancy: "
        "the spread (standard deviation) of AUROC across the subgroups of each family, averaged over "
        "families; 0 means equal performance. Small subgroups give noisy numbers.</p>"
        + html_table(subgroups.assign(family=subgroups["family"].map(lambda f: cohort.FAMILY_NAMES.get(f, f))),
                     {"family": "family", "subgroup": "subgroup", **perf_cols})
    )
    if "subgroups" in plots:
        subgroup_section += '<div class="plots">' + _figure(plots["subgroups"], "AUROC by subgroup") + "</div>"
    sections.append(subgroup_section + "</section>")
    figures = []
    if "tradeoff" in plots:
        figures.append(_figure(plots["tradeoff"], "Trade-off: simpler inputs (left) against AUROC, for SimpleBits "
                                                  "at several strengths λ and for baselines (blur, JPEG, …)."))
    if "bpd_hist" in plots:
        figures.append(_figure(plots["bpd_hist"], "Code length of each image before and after simplification."))
    if figures:
        sections.append("<section><h2>Simplicity and performance</h2><div class=\"plots\">"
                        + "".join(figures) + "</div></section>")
    if maps is not None and (maps_section := _maps_section(table, maps, studies_href, positive_name)):
        sections.append(maps_section)
    sections.append(
        "<section><h2>Studies</h2><p class=\"explain\">Each panel shows the original, the simplified image and "
        "a colour map of what changed (red = brighter, blue = darker after simplification). Click a panel to "
        "enlarge it.</p>" + _gallery(table, studies_href, positive_name, maps.studies if maps else ())
        + "</section>"
    )
    hint = html.escape(run_dir_hint)
    sections.append(
        "<section><h2>Data and next steps</h2><ul>"
        '<li>All studies as a table: <a href="studies.csv">studies.csv</a> · <a href="studies.parquet">studies.parquet</a></li>'
        f"<li>Rate the simplified images side by side with the originals:<pre>simplebits review {hint}</pre></li>"
        f"<li>Browse runs, metrics and artifacts in MLflow:<pre>mlflow ui --backend-store-uri sqlite:///{hint}/mlflow.db</pre></li>"
        + (f"<li>{html.escape(secondary_captures)}</li>" if secondary_captures else "")
        + "</ul></section>"
    )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Template(TEMPLATE.read_text()).substitute(
        title=html.escape(f"SimpleBits cohort report: {positive_name} ({setting} simplification)"),
        subtitle=html.escape(f"{len(table)} studies · classifier task: {task} · generated {when} · "
                             "research output, not for diagnosis"),
        body="\n".join(sections),
    )


def write_cohort_report(
    out_dir: str | Path,
    table: pd.DataFrame,
    task: str,
    setting: str,
    positive_name: str,
    sweep: pd.DataFrame | None = None,
    families: tuple[str, ...] = cohort.SUBGROUP_FAMILIES,
    min_subgroup_size: int = 1,
    run_dir_hint: str = "RUN_DIR",
    studies_href: str = "../studies",
    run_metrics: Mapping[str, Any] | None = None,
    secondary_captures: str | None = None,
    maps: CohortMaps | None = None,
) -> Path:
    """Tables, plots and ``index.html`` into ``out_dir`` (normally ``RUN_DIR/cohort_report``);
    ``run_metrics``: the simplification run's ``metrics.json`` (its checks get a section);
    ``secondary_captures``: a sentence on the DICOM Secondary Captures; ``maps``: the saliency maps
    of simplebits explain (their panels under ``studies_href``)."""
    out_dir = Path(out_dir)
    cohort.write_study_table(table, out_dir)
    subgroups = cohort.subgroup_performance(table, families, min_subgroup_size)
    atomic_write_text(out_dir / "subgroups.csv", subgroups.to_csv(index=False))
    plots = {"bpd_hist": cohort.plot_bpd_histograms(table, out_dir / "plots" / "bpd_hist.png")}
    if len(subgroups):
        plots["subgroups"] = cohort.plot_subgroup_auroc(subgroups, out_dir / "plots" / "subgroups.png")
    if sweep is not None and len(sweep):
        plots["tradeoff"] = cohort.plot_tradeoff(sweep, out_dir / "plots" / "tradeoff.png")
    page = render_cohort_html(table, subgroups, plots, task, setting, positive_name, run_dir_hint, studies_href,
                              run_metrics, secondary_captures, maps)
    atomic_write_text(out_dir / "index.html", page)
    return out_dir / "index.html"


def write_run_cohort_report(
    run_dir: str | Path,
    simplify_name: str,
    sweep: pd.DataFrame | None = None,
    splits: tuple[str, ...] | None = None,
    class_names: Mapping[str, tuple[str, str]] | None = None,
    families: tuple[str, ...] = cohort.SUBGROUP_FAMILIES,
    min_subgroup_size: int = 1,
    secondary_captures: Sequence[Path] | None = None,
) -> Path:
    """The cohort report of one simplification run, into ``RUN_DIR/cohort_report``;
    ``secondary_captures``: the ones written for it, None if none were asked for. The maps of
    ``RUN_DIR/explain/<task>`` get a section where the run has them."""
    from pipeline.data.store import image_loader
    from pipeline.report.study import class_names_for, parse_simplify_name, read_manifest, read_predictions
    from pipeline.run_folder import RunFolder

    run_dir = Path(run_dir)
    sim_dir = run_dir / "simplify" / simplify_name
    setting, task = parse_simplify_name(simplify_name)
    predictions = read_predictions(sim_dir / "predictions.csv")
    if splits is not None:
        predictions = predictions[predictions["split"].isin(list(splits))]
    if predictions.empty:
        raise ValueError(f"{sim_dir / 'predictions.csv'}: no studies to report (splits={splits})")
    first = predictions["study_id"].iloc[0]
    dims = image_loader(sim_dir / "simplified")(first).size
    manifest = read_manifest(run_dir)
    table = cohort.build_study_table(predictions, manifest, dims=dims, task=task)
    names = class_names_for(task, class_names)
    metrics_path = sim_dir / "metrics.json"
    return write_cohort_report(
        run_dir / REPORT_DIR, table, task, setting, names[1], sweep, families, min_subgroup_size,
        run_dir_hint=str(run_dir),
        run_metrics=json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
        secondary_captures=secondary_capture_note(secondary_captures, manifest, run_dir),
        maps=cohort_maps(RunFolder(run_dir).explain(task)),
    )


#: Image files that are never DICOM: their studies have no DICOM study to add a Secondary Capture to.
_NON_DICOM_SUFFIXES = (".jpg", ".jpeg", ".png")


def secondary_capture_note(captures: Sequence[Path] | None, manifest: pd.DataFrame | None,
                           run_dir: str | Path) -> str:
    """One sentence for the report: how many Secondary Captures were written, or why there are none."""
    if captures is None:
        return ("No DICOM Secondary Captures were asked for (simplebits report --dicom writes them where the "
                "sources are DICOM files).")
    if captures:
        from pipeline.io.dicom_write import ORIGINAL_FILE

        note = (f"{len(captures)} simplified images were written as DICOM Secondary Captures, each as a new "
                f"series of its source study, to {Path(run_dir) / 'dicom_sc'}.")
        originals = sum((path.parent / ORIGINAL_FILE).is_file() for path in captures)
        if originals:
            note += f" {originals} of these studies also hold their de-identified original as a second series"
            note += "." if originals == len(captures) else (
                "; the others' sources declare burned-in annotation, whose pixels are not cleaned here.")
        return note
    if manifest is not None and manifest["image_path"].str.lower().str.endswith(_NON_DICOM_SUFFIXES).all():
        return ("No DICOM Secondary Captures: this cohort's images were read from JPEG/PNG files, which belong "
                "to no DICOM study that a simplified image could join as a new series.")
    return ("No DICOM Secondary Captures: none of the reported studies has a readable DICOM source file "
            "(they are written only into the DICOM studies the images came from).")
