"""Contact sheet of demo studies with and without each feature (device, effusion, breasts), with mask
outlines.

One row per study: the study as rendered; the study without each of its devices, without its
effusion and without its breasts (the counterfactual renders, same acquisition and noise); and the
study again with the outline of every feature's mask (devices in colour, fluid in cyan, breasts in
magenta). The point is to look: is the drain a striped tube entering the chest wall, are the
electrodes electrodes, is a small effusion only a blunted angle, do the breasts shade the bases?
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.demo.cohort import DemoCohortConfig, DemoScene, StudyPlan, plan_cohort

OUTLINE_COLOURS = {"chest_drain": "tab:red", "ecg": "tab:orange", "pacemaker": "tab:purple", "fluid": "cyan",
                   "breast": "magenta"}


def pick_studies(plans: list[StudyPlan], count: int) -> list[StudyPlan]:
    """Up to ``count`` studies with a device or an effusion, those with the most features first."""
    with_features = [p for p in plans if p.devices or p.effusion]
    return sorted(with_features, key=lambda p: -(len(p.devices) + p.effusion))[:count]


def write_contact_sheet(config: DemoCohortConfig, out_png: str | Path, count: int = 6,
                        plans: list[StudyPlan] | None = None) -> Path:
    """Render ``count`` studies of ``config`` (with counterfactuals) and write the sheet to ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = config.model_copy(update={"counterfactuals": True})
    plans = plans if plans is not None else pick_studies(plan_cohort(config), count)
    scene = DemoScene(config)
    rendered = [scene.render(plan) for plan in plans]
    names = sorted({name for r in rendered for name in r.counterfactuals})
    columns = ["study", *names, "masks"]
    fig, axes = plt.subplots(len(plans), len(columns), figsize=(2.6 * len(columns), 2.8 * len(plans)),
                             squeeze=False)
    for row, (plan, study) in enumerate(zip(plans, rendered)):
        effusion = f"effusion L{plan.volume_left_ml:.0f}/R{plan.volume_right_ml:.0f} mL"
        features = [plan.sex, *plan.devices, *([effusion] if plan.effusion else [])]
        images = {"study": study.display, "masks": study.display,
                  **{name: display for name, (display, _) in study.counterfactuals.items()}}
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.set_axis_off()
            if name not in images:
                continue
            ax.imshow(images[name], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            title = name if row == 0 or name != "study" else ""
            if name == "study":
                title = ", ".join(features)
            ax.set_title(title, fontsize=7)
            if name == "masks":
                for key, colour in OUTLINE_COLOURS.items():
                    mask = study.masks.get(key)
                    if mask is not None and mask.any():
                        ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.6)
    fig.suptitle(f"demo cohort, {config.size} px: study | without each feature | mask outlines "
                 "(drain red, ECG orange, pacemaker purple, fluid cyan, breast magenta)", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
