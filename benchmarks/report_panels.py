"""Per-study report throughput: our numpy/PIL panel vs one matplotlib figure per study, side by side.

Both draw the same three tiles (original, simplified, signed difference overlay) with titles and the
caption; the matplotlib variant is what a straightforward implementation would do. Also times
:func:`pipeline.report.study.write_study_report` end to end (3 PNGs + JSON, atomic writes).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/report_panels.py [--studies 100] [--size 64] [--tile 256]``
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np


def matplotlib_panel(original: np.ndarray, simplified: np.ndarray, caption: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = simplified.astype(float) - original.astype(float)
    limit = max(float(np.abs(diff).max()), 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(8, 3.6))
    for ax, image, title in zip(axes, (original, simplified), ("Original", "Simplified")):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title)
    axes[2].imshow(original, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes[2].imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.6, interpolation="nearest")
    axes[2].set_title("Change")
    for ax in axes:
        ax.axis("off")
    fig.text(0.01, 0.01, "\n".join(caption), fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    from pipeline.report.study import png_bytes, caption_lines, make_study_report, render_panel, write_study_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tile", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(args.studies):
        original = rng.integers(0, 256, (args.size, args.size), dtype=np.uint8)
        simplified = (original // 32 * 32).astype(np.uint8)
        row = {"study_id": f"std-{i:012x}", "label": i % 2, "p_orig": 0.7, "p_simpl": 0.6,
               "bpd_orig": 4.0, "bpd_simpl": 1.5, "view": "PA", "sex": "F", "age_band": "60-79"}
        pairs.append((original, simplified, make_study_report(row, original.size, "effusion", "joint")))

    timings = {}
    start = time.perf_counter()
    for original, simplified, report in pairs:
        png_bytes(render_panel(original, simplified, report, args.tile))
    timings["panel, numpy/PIL (ours)"] = time.perf_counter() - start
    start = time.perf_counter()
    for original, simplified, report in pairs:
        matplotlib_panel(original, simplified, caption_lines(report))
    timings["panel, matplotlib figure"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for original, simplified, report in pairs:
            write_study_report(Path(tmp), original, simplified, report, args.tile)
        timings["write_study_report (3 PNG + JSON)"] = time.perf_counter() - start

    print(f"{args.studies} studies of {args.size}x{args.size}, tile {args.tile}")
    for name, seconds in timings.items():
        print(f"  {name:36s} {seconds:7.2f} s   {args.studies / seconds:8.1f} studies/s")
    ratio = timings["panel, matplotlib figure"] / timings["panel, numpy/PIL (ours)"]
    print(f"  speed-up of ours over matplotlib: {ratio:.1f}x")


if __name__ == "__main__":
    main()
