"""Per-study report: a PNG panel (original | simplified | difference) and a JSON record; where
``simplebits explain`` made saliency maps for the study, a second panel (original | simplified | one
overlay per method) and each overlay on its own for the review page.

Panels are composed with numpy + PIL rather than one matplotlib figure per study: that is two orders
of magnitude faster, so a cohort of hundreds of studies is rendered in seconds. Where the study's
source file can be read, the panel's original is the source radiograph under its DICOM VOI (the
review page's ``original_full.png``), centre-padded to a square as ingest pads it and shown at up to
:data:`FULL_TILE` px; the working-resolution simplified image and the change are upsampled smoothly
(bicubic) onto the same square, as the review page shows them. Without a source, the working image
(e.g. 64x64) is enlarged with nearest-neighbour, so that the reader sees the pixels the classifier saw.

Everything written here is keyed by the pseudonymous study id and carries no identifying field.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import PathNotFoundError, UserError
from pipeline.report.maps import (
    EXPLAIN_PANEL_NAME,
    StudyMaps,
    map_file_name,
    maps_loader,
    method_key,
    method_title,
    no_maps,
)
from pipeline.runtime.atomic import atomic_write_bytes, atomic_write_text
from pipeline.runtime.progress import progress

PANEL_NAME = "panel.png"
ORIGINAL_NAME = "original.png"
SIMPLIFIED_NAME = "simplified.png"
REPORT_NAME = "report.json"
#: Largest tile side of a panel whose original is the source radiograph (a 3000-px source is
#: downsampled to it; the review page shows the native pixels).
FULL_TILE = 512

#: Human-readable class names for the binary tasks (index = label value). Config may override.
DEFAULT_CLASS_NAMES: dict[str, tuple[str, str]] = {
    "effusion": ("no effusion", "effusion"),
    "sex": ("female", "male"),
}


def class_names_for(task: str, class_names: Mapping[str, tuple[str, str]] | None = None) -> tuple[str, str]:
    """Names of label 0 and label 1 for ``task``: configured, built-in, the task registry's
    (``support_devices`` -> ``no support devices`` / ``support devices``), else from the task's name."""
    names = {**DEFAULT_CLASS_NAMES, **(class_names or {})}
    if task in names:
        return names[task]
    from pipeline.tasks import get_task

    try:
        return get_task(task).label_names
    except UserError:  # a task of another session's registry: its name still reads
        pass
    words = task.replace("_", " ")
    return f"no {words}", words


#: Manifest attributes copied into the JSON record: pseudonymous or coarse by construction.
RECORD_ATTRIBUTES = ("view", "sex", "age_band", "source", "split")
_OVERLAY_MAX_ALPHA = 0.85
_CAPTION_FONT_SIZE = 15
_TITLE_FONT_SIZE = 16


@dataclass(frozen=True)
class StudyReport:
    """What one study's report says; ``to_dict`` is the ``report.json`` content."""

    study_id: str
    task: str
    setting: str
    label: int | None  # None: the study has no label for this task
    label_name: str
    positive_name: str
    p_orig: float
    p_simpl: float
    bpd_orig: float
    bpd_simpl: float
    dims: int
    attributes: dict[str, Any] = field(default_factory=dict)
    maps: tuple[str, ...] = ()  # methods of simplebits explain shown in explain.png, in tile order
    source_size: tuple[int, int] | None = None  # rows, cols of the source radiograph the panel shows

    @property
    def bits_saved(self) -> float:
        """Total code length saved by simplification: ``(bpd_orig - bpd_simpl) * D``."""
        return (self.bpd_orig - self.bpd_simpl) * self.dims

    @property
    def correct_orig(self) -> bool | None:
        return None if self.label is None else int(self.p_orig >= 0.5) == self.label

    @property
    def correct_simpl(self) -> bool | None:
        return None if self.label is None else int(self.p_simpl >= 0.5) == self.label

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            bits_orig=self.bpd_orig * self.dims,
            bits_simpl=self.bpd_simpl * self.dims,
            bits_saved=self.bits_saved,
            correct_orig=self.correct_orig,
            correct_simpl=self.correct_simpl,
        )
        return out


def make_study_report(
    row: Mapping[str, Any],
    dims: int,
    task: str,
    setting: str,
    class_names: Mapping[str, tuple[str, str]] | None = None,
) -> StudyReport:
    """A report from one study-table row (:func:`pipeline.report.cohort.build_study_table`)."""
    names = class_names_for(task, class_names)
    label = None if _plain(row["label"]) is None else int(row["label"])
    attributes = {k: _plain(row[k]) for k in RECORD_ATTRIBUTES if k in row and _plain(row[k]) is not None}
    return StudyReport(
        study_id=str(row["study_id"]),
        task=task,
        setting=setting,
        label=label,
        label_name="unlabelled" if label is None else names[label],
        positive_name=names[1],
        p_orig=float(row["p_orig"]),
        p_simpl=float(row["p_simpl"]),
        bpd_orig=float(row["bpd_orig"]),
        bpd_simpl=float(row["bpd_simpl"]),
        dims=int(dims),
        attributes=attributes,
    )


def _plain(value: Any) -> Any:
    """numpy/pandas scalars -> JSON-able Python values; missing -> None."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------- pixels


@lru_cache(maxsize=4)
def _diverging_lut(name: str = "RdBu_r") -> np.ndarray:
    """256 x 3 uint8 colour table; matplotlib is used only for its colormap values."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def difference_overlay(original: np.ndarray, simplified: np.ndarray,
                       base: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Signed difference (simplified - original) as a colour overlay on the original.

    Symmetric colour limits ``±m`` with ``m`` = the largest absolute change (at least one grey level),
    so white/grey means "unchanged", red "brighter", blue "darker". Alpha grows with the magnitude so the
    anatomy stays visible where nothing changed. ``base``: the grey image to draw on instead of
    ``original`` (e.g. the source radiograph as displayed); the difference, taken at working
    resolution, is upsampled smoothly onto it. Returns the RGB overlay and ``m`` in grey levels.
    """
    if original.shape != simplified.shape:
        raise ValueError(f"original {original.shape} and simplified {simplified.shape} differ in shape")
    diff = simplified.astype(np.float32) - original.astype(np.float32)
    limit = max(float(np.abs(diff).max()), 1.0)
    if base is None:
        base = original
    elif base.shape != diff.shape:
        rows, cols = base.shape
        diff = np.asarray(Image.fromarray(diff, "F").resize((cols, rows), Image.Resampling.BICUBIC))
    index = np.clip(np.round((diff / limit + 1.0) * 127.5), 0, 255).astype(np.uint8)
    colour = _diverging_lut()[index].astype(np.float32)
    alpha = np.clip(_OVERLAY_MAX_ALPHA * np.abs(diff) / limit, 0.0, _OVERLAY_MAX_ALPHA)[..., None]
    grey = np.repeat(base[..., None].astype(np.float32), 3, axis=-1)
    return np.clip(grey * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8), limit


def square_padded(image: np.ndarray) -> np.ndarray:
    """A rows x cols grey image centred on a square of side ``max(rows, cols)``, padded with its
    minimum: the geometry ingest gives the working image (:class:`pipeline.data.transforms.SquarePad`),
    so that the simplified image lies exactly on it."""
    rows, cols = image.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    out = np.full((side, side), image.min(), dtype=image.dtype)
    out[top:top + rows, left:left + cols] = image
    return out


def _enlarge(image: Image.Image, tile: int, smooth: bool = False) -> Image.Image:
    """Fit into ``tile x tile``: integer upscaling, nearest-neighbour (pixels kept honest) or, with
    ``smooth``, bicubic (a simplified image is a smooth signal, not blocks, and reads as one)."""
    width, height = image.size
    if max(width, height) <= tile:
        factor = max(1, tile // max(width, height))
        resample = Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST
        return image.resize((width * factor, height * factor), resample)
    scale = tile / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _colorbar(width: int, height: int) -> Image.Image:
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    return Image.fromarray(np.repeat(_diverging_lut()[ramp][None], height, axis=0), "RGB")


def caption_lines(report: StudyReport) -> list[str]:
    """The text under a panel; short enough to read at a glance."""
    attrs = report.attributes
    names = {"view": "view", "sex": "sex", "age_band": "age"}
    who = ", ".join(f"{names[k]} {attrs[k]}" for k in names if k in attrs)
    saved_pct = 100.0 * (1 - report.bpd_simpl / report.bpd_orig) if report.bpd_orig > 0 else 0.0
    return [
        f"Study {report.study_id}   |   truth: {report.label_name}   |   {who}",
        f"P({report.positive_name}) original {report.p_orig:.2f}  ->  simplified {report.p_simpl:.2f}"
        f"   ({report.setting}-{report.task} classifier)",
        f"Code length original {report.bpd_orig:.2f} bits/pixel  ->  simplified {report.bpd_simpl:.2f} bits/pixel"
        f"   |   saved {report.bits_saved:,.0f} bits ({saved_pct:.0f}%)",
    ]


def _tile(image: np.ndarray, tile: int, smooth: bool = False) -> Image.Image:
    """A grey (H, W) or colour (H, W, 3) uint8 image, enlarged to fit ``tile`` (see :func:`_enlarge`)."""
    return _enlarge(Image.fromarray(image, "L" if image.ndim == 2 else "RGB").convert("RGB"), tile, smooth)


def _compose(tiles: list[Image.Image], titles: list[str], keys: Mapping[int, tuple[Image.Image | None, str]],
             lines: list[str]) -> Image.Image:
    """Tiles in a row with their titles above, an optional colour key under tile ``i`` (``keys[i]``:
    a colour bar or None, and its text) and the caption lines below."""
    gap, margin, title_h, bar_h = 8, 10, 26, 30
    line_h = _CAPTION_FONT_SIZE + 7
    tile_w = max(t.size[0] for t in tiles)
    tile_h = max(t.size[1] for t in tiles)
    width = 2 * margin + len(tiles) * tile_w + (len(tiles) - 1) * gap
    height = margin + title_h + tile_h + bar_h + len(lines) * line_h + margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (image, title) in enumerate(zip(tiles, titles)):
        x = margin + i * (tile_w + gap)
        draw.text((x, margin + 4), title, fill=(20, 20, 20), font=_font(_TITLE_FONT_SIZE))
        canvas.paste(image, (x + (tile_w - image.size[0]) // 2, margin + title_h))
    for i, (bar, text) in keys.items():
        x0, y0 = margin + i * (tile_w + gap), margin + title_h + tile_h + 6
        if bar is not None:
            canvas.paste(bar, (x0, y0))
        draw.text((x0, y0 + (12 if bar is not None else 0)), text, fill=(60, 60, 60), font=_font(11))
    y = margin + title_h + tile_h + bar_h
    for line in lines:
        draw.text((margin, y), line, fill=(20, 20, 20), font=_font(_CAPTION_FONT_SIZE))
        y += line_h
    return canvas


def _check_pair(original: np.ndarray, simplified: np.ndarray, report: StudyReport) -> None:
    if original.shape != simplified.shape or original.ndim != 2:
        raise ValueError(
            f"study {report.study_id}: original {original.shape} and simplified {simplified.shape} "
            "must be equal H x W arrays"
        )


def render_panel(original: np.ndarray, simplified: np.ndarray, report: StudyReport, tile: int = 256,
                 full_original: np.ndarray | None = None) -> Image.Image:
    """Original | simplified | difference overlay, titles above and the caption below.

    ``full_original``: the source radiograph (rows x cols, uint8, as displayed under its VOI). It is
    then the original tile, at up to :data:`FULL_TILE` px, and the simplified image and the change are
    upsampled smoothly onto its geometry; otherwise the working image ``original`` is.
    """
    _check_pair(original, simplified, report)
    if full_original is None:
        overlay, limit = difference_overlay(original, simplified)
        tiles = [_tile(original, tile), _tile(simplified, tile, smooth=True), _tile(overlay, tile, smooth=True)]
        titles = ["Original (working resolution)", "Simplified", "Change (simplified - original)"]
    else:
        shown = _tile(square_padded(full_original), max(tile, min(FULL_TILE, max(full_original.shape))))
        size = shown.size
        base = np.asarray(shown.convert("L"))
        overlay, limit = difference_overlay(original, simplified, base=base)
        tiles = [shown, Image.fromarray(simplified, "L").resize(size, Image.Resampling.BICUBIC).convert("RGB"),
                 Image.fromarray(overlay, "RGB")]
        rows, cols = full_original.shape
        titles = [f"Original ({cols} x {rows} px source)", "Simplified (upsampled)", "Change (simplified - original)"]
    # Colour key under the difference tile: which colour means brighter/darker, and by how much.
    key = (_colorbar(max(t.size[0] for t in tiles) // 2, 10),
           f"-{limit:.0f}  darker | brighter  +{limit:.0f} grey levels")
    return _compose(tiles, titles, {2: key}, caption_lines(report))


def explain_caption_lines(report: StudyReport) -> list[str]:
    """The text under the maps' panel: which study, and what the maps explain."""
    return [
        f"Study {report.study_id}   |   truth: {report.label_name}   |   "
        f"P({report.positive_name}) original {report.p_orig:.2f}  ->  simplified {report.p_simpl:.2f}",
        f"Saliency maps (simplebits explain) of the {report.task} classifier's log-odds of "
        f"{report.positive_name}, on the original image; each map scaled to its own largest value",
    ]


def render_explain_panel(original: np.ndarray, simplified: np.ndarray, maps: Mapping[str, np.ndarray],
                         report: StudyReport, tile: int = 256) -> Image.Image:
    """Original | simplified | one overlay per method (``maps``, in that order), all at the same
    scale, so that a reader can hold what the simplifier kept against what each map points at."""
    from pipeline.explain.overlay import overlay_rgb

    _check_pair(original, simplified, report)
    if not maps:
        raise ValueError(f"study {report.study_id}: no maps to show")
    tiles = [_tile(original, tile), _tile(simplified, tile, smooth=True),
             *(_tile(overlay_rgb(original, attribution), tile) for attribution in maps.values())]
    titles = ["Original", "Simplified", *(method_title(m) for m in maps)]
    keys = {2 + i: (None, method_key(m, report.positive_name)) for i, m in enumerate(maps)}
    return _compose(tiles, titles, keys, explain_caption_lines(report))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- writing


def write_study_report(
    studies_dir: str | Path,
    original: np.ndarray,
    simplified: np.ndarray,
    report: StudyReport,
    tile: int = 256,
    overwrite: bool = False,
    maps: Mapping[str, np.ndarray] | None = None,
    full_original: np.ndarray | None = None,
) -> Path:
    """``studies/<study_id>/{panel.png, original.png, simplified.png, report.json}``, each atomic;
    with ``maps`` (method -> saliency map, in tile order) also ``explain.png`` and one
    ``map-<method>.png`` overlay each (at working resolution, for the review page). ``full_original``:
    the source radiograph the panel shows (:func:`render_panel`).

    An existing folder whose ``report.json`` already says the same (the maps' methods included) is
    left alone (resumable); ``report.json`` is written last so that its presence means the folder is
    complete.
    """
    maps = dict(maps or {})
    report = replace(report, maps=tuple(maps),
                     source_size=None if full_original is None else tuple(full_original.shape))
    out = Path(studies_dir) / report.study_id
    record = json.dumps(report.to_dict(), indent=2, sort_keys=True)
    existing = out / REPORT_NAME
    if not overwrite and existing.is_file() and existing.read_text() == record:
        return out
    atomic_write_bytes(out / ORIGINAL_NAME, png_bytes(Image.fromarray(original, "L")))
    atomic_write_bytes(out / SIMPLIFIED_NAME, png_bytes(Image.fromarray(simplified, "L")))
    atomic_write_bytes(out / PANEL_NAME, png_bytes(render_panel(original, simplified, report, tile, full_original)))
    write_study_maps(out, original, simplified, maps, report, tile)
    atomic_write_text(existing, record)
    return out


def write_study_maps(out: Path, original: np.ndarray, simplified: np.ndarray, maps: Mapping[str, np.ndarray],
                     report: StudyReport, tile: int = 256) -> None:
    """The maps' panel and overlays of one study folder; those of methods no longer among ``maps``
    are removed, so that the folder never shows a map its ``report.json`` does not list."""
    from pipeline.explain.overlay import overlay_rgb

    keep = {map_file_name(m) for m in maps}
    for stale in out.glob(map_file_name("*")):  # map-*.png: every method's overlay
        if stale.name not in keep:
            stale.unlink()
    if not maps:
        (out / EXPLAIN_PANEL_NAME).unlink(missing_ok=True)
        return
    for method, attribution in maps.items():
        atomic_write_bytes(out / map_file_name(method),
                           png_bytes(Image.fromarray(overlay_rgb(original, attribution), "RGB")))
    atomic_write_bytes(out / EXPLAIN_PANEL_NAME,
                       png_bytes(render_explain_panel(original, simplified, maps, report, tile)))


def write_study_reports(
    table: pd.DataFrame,
    load_original: Callable[[str], np.ndarray],
    load_simplified: Callable[[str], np.ndarray],
    studies_dir: str | Path,
    task: str,
    setting: str,
    class_names: Mapping[str, tuple[str, str]] | None = None,
    tile: int = 256,
    overwrite: bool = False,
    load_maps: StudyMaps = no_maps,
    load_full_original: Callable[[str], np.ndarray | None] | None = None,
) -> list[Path]:
    """Reports for every row of a study table; returns the study folders.

    ``table`` has ``study_id, label, p_orig, p_simpl, bpd_orig, bpd_simpl`` (``label`` may be missing
    per row) and optionally the columns in :data:`RECORD_ATTRIBUTES`, as
    :func:`pipeline.report.cohort.build_study_table` returns it. ``load_maps``: the study's saliency
    maps (:func:`pipeline.report.maps.maps_loader`), shown where there are any.
    ``load_full_original``: the study's source radiograph for its panel, or None where there is none.
    """
    missing = {"study_id", "label", "p_orig", "p_simpl", "bpd_orig", "bpd_simpl"} - set(table.columns)
    if missing:
        raise ValueError(f"study table lacks columns {sorted(missing)}")
    written = []
    for row in progress(table.to_dict("records"), desc="study reports", total=len(table)):
        original = load_original(row["study_id"])
        simplified = load_simplified(row["study_id"])
        report = make_study_report(row, original.size, task, setting, class_names)
        maps = load_maps(row["study_id"], original.shape)
        full = load_full_original(row["study_id"]) if load_full_original else None
        written.append(write_study_report(studies_dir, original, simplified, report, tile, overwrite, maps, full))
    return written


# ------------------------------------------------------------------------------------------ run folder


def parse_simplify_name(name: str) -> tuple[str, str]:
    """``"joint-effusion"`` -> ``("joint", "effusion")`` (folder ``simplify/<setting>-<task>``)."""
    setting, sep, task = name.rpartition("-")
    if not sep or not setting or not task:
        raise ValueError(f"simplify folder name {name!r} must look like <setting>-<task>")
    return setting, task


def read_predictions(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"{path}: predictions table not found")
    return pd.read_csv(path, dtype={"study_id": str})


def read_manifest(run_dir: str | Path) -> pd.DataFrame | None:
    """``ingest/manifest.csv`` if present (ids as strings)."""
    path = Path(run_dir) / "ingest" / "manifest.csv"
    return pd.read_csv(path, dtype={"study_id": str, "patient_id": str}) if path.is_file() else None


def write_run_study_reports(
    run_dir: str | Path,
    simplify_name: str,
    splits: Iterable[str] | None = None,
    class_names: Mapping[str, tuple[str, str]] | None = None,
    tile: int = 256,
    overwrite: bool = False,
) -> list[Path]:
    """Reports for one simplification run of a run folder, into ``RUN_DIR/studies``, with the maps of
    ``RUN_DIR/explain/<task>`` (``simplebits explain --run``) where it has them, and each panel's
    original decoded from the study's source file where it can be read (``original_full.png``)."""
    from pipeline.data.store import image_loader
    from pipeline.report.cohort import build_study_table
    from pipeline.report.review.fullres import FullOriginals
    from pipeline.run_folder import RunFolder

    run_dir = Path(run_dir)
    sim_dir = run_dir / "simplify" / simplify_name
    setting, task = parse_simplify_name(simplify_name)
    predictions = read_predictions(sim_dir / "predictions.csv")
    if splits is not None:
        predictions = predictions[predictions["split"].isin(list(splits))]
    table = build_study_table(predictions, read_manifest(run_dir), task=task)
    return write_study_reports(
        table,
        load_original=image_loader(run_dir / "ingest" / "store"),
        load_simplified=image_loader(sim_dir / "simplified"),
        studies_dir=run_dir / "studies",
        task=task,
        setting=setting,
        class_names=class_names,
        tile=tile,
        overwrite=overwrite,
        load_maps=maps_loader(RunFolder(run_dir).explain(task)),
        load_full_original=FullOriginals(run_dir, run_dir / "studies").load,
    )
