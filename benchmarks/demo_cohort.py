"""Demo cohort throughput, and how hard its tasks are for a pixel-level linear model.

Throughput: studies per second for a full ``generate_cohort`` run (render + DICOM + masks). Target:
1000 studies at 128x128 in at most 5 minutes on a 2-core CPU. Prints the scene setup time (CT cache
hit or build), render-only and write-only time per study measured on the same studies, and the
end-to-end rate.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/demo_cohort.py --n 1000 --size 128 --threads 2

Separability (``--separability N``): renders N studies at 64x64 in memory and fits a logistic
regression on raw pixels (75/25 split by patient), printing accuracy and AUROC for effusion and sex.
The defaults aim for "clearly above chance, well below perfect" (a small CNN should reach 0.85-0.98).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_cohort.py --separability 2000 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.data.demo.cohort import DemoCohortConfig, DemoScene, generate_cohort, plan_cohort, write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distractor", default="independent")
    parser.add_argument("--profile-studies", type=int, default=50, help="studies timed stage by stage")
    parser.add_argument("--separability", type=int, default=0, metavar="N",
                        help="instead of timing, fit pixel logistic regressions on N studies at 64x64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.separability:
        separability(args.separability)
        return
    config = DemoCohortConfig(n=args.n, size=args.size, seed=0, distractor={"mode": args.distractor},
                              render={"num_threads": args.threads})

    start = time.perf_counter()
    scene = DemoScene(config)
    setup = time.perf_counter() - start
    plans = plan_cohort(config)[: args.profile_studies]
    with tempfile.TemporaryDirectory() as tmp:
        render_s = write_s = 0.0
        for plan in plans:
            t0 = time.perf_counter()
            rendered = scene.render(plan)
            t1 = time.perf_counter()
            write_study(Path(tmp), plan, rendered)
            render_s, write_s = render_s + t1 - t0, write_s + time.perf_counter() - t1
        start, cpu_start = time.perf_counter(), time.process_time()
        generate_cohort(config, Path(tmp) / "cohort", show_progress=False)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    k = len(plans)
    print(f"size {args.size}, threads {args.threads}, n {args.n}")
    print(f"scene setup: {setup:.2f} s")
    print(f"per study: render {1000 * render_s / k:.1f} ms, write {1000 * write_s / k:.1f} ms "
          f"(render/write ratio {render_s / write_s:.1f})")
    print(f"end to end: {total:.1f} s for {args.n} studies = {args.n / total:.2f} studies/s; "
          f"1000 studies -> {1000 * total / args.n / 60:.2f} min (target <= 5 min)")
    # On a shared machine wall time depends on other load; CPU seconds per study do not.
    print(f"CPU time: {cpu / args.n:.3f} s per study ({cpu / total:.2f} cores busy on average)")


def separability(n: int, size: int = 64, seed: int = 11) -> None:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupShuffleSplit

    config = DemoCohortConfig(n=n, size=size, seed=seed)
    plans = plan_cohort(config)
    scene = DemoScene(config)
    start = time.perf_counter()
    pixels = np.stack([scene.render(plan).display.ravel() for plan in plans])
    print(f"rendered {n} studies at {size}x{size} in {time.perf_counter() - start:.0f} s")
    groups = [plan.patient_id for plan in plans]
    train, test = next(GroupShuffleSplit(1, test_size=0.25, random_state=0).split(pixels, groups=groups))
    labels = {"effusion": np.array([p.effusion for p in plans]),
              "sex": np.array([p.sex == "F" for p in plans])}
    for task, y in labels.items():
        for c in (0.01, 0.1, 1.0):
            model = LogisticRegression(C=c, max_iter=3000).fit(pixels[train], y[train])
            p = model.predict_proba(pixels[test])[:, 1]
            print(f"{task:8s} C={c:<5} held-out n={len(test)}: accuracy {((p > 0.5) == y[test]).mean():.3f}, "
                  f"AUROC {roc_auc_score(y[test], p):.3f}")


if __name__ == "__main__":
    main()
