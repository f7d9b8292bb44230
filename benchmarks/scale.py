"""Memory vs cohort size: peak RSS of classify train, simplify audit and apply on scale cohorts.

Builds scale cohorts (``simplebits scale-cohort``) of each ``--sizes`` at 64x64 from ``--source``
(an ingest folder; without one, a 200-study demo cohort is rendered and ingested at 64 px), runs
each stage as a child process with small model settings and a small Glow prior (the data path is
the real one) and prints
the command lines and a table: peak RSS per size and the ratio largest / smallest (target <= 1.3,
i.e. memory flat in cohort size: the stages must stream from the store, not load the cohort).

Memory is measured two ways: ``peak`` is the peak RSS of the largest single process of the child's
tree, exact (``wait4`` rusage, what ``/usr/bin/time -v`` reports); ``tree`` is the proportional set
size (PSS) summed over the child and its descendants (DataLoader workers, torchrun ranks), sampled
every 0.1 s from ``/proc/<pid>/smaps_rollup`` (Linux), so it may miss short spikes. PSS rather than
RSS because forked workers share the parent's pages (torch, numpy): an RSS sum counts them once per
process (2000 studies, apply with 2 workers: RSS sum 2.3 GiB vs 0.8 GiB for the main process).

    OMP_NUM_THREADS=2 python benchmarks/scale.py --sizes 10000 100000 [--source INGEST_DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLI = [sys.executable, "-m", "pipeline.cli"]
# --set overrides per stage. Small models, one epoch, evaluation extras off (minutes, not hours, on
# 2 cores); the data path is the one real runs take.
STAGE_SETTINGS = {
    "scale-cohort": [],
    "classify": ["train.epochs=1", "model.name=nf_cnn", "model.kwargs={}", "tracking.enabled=false"],
    "audit": ["train.epochs=1", "simplifier.base_channels=4", "simplifier.levels=2",
              "simplifier.max_channels=16", "independent.enabled=false", "evaluate.baselines=[]",
              "evaluate.retrain=false", "tracking.enabled=false"],
    "apply": [],
}
STAGES = tuple(STAGE_SETTINGS)


@dataclass
class Measurement:
    returncode: int
    seconds: float
    peak_bytes: int  # peak RSS of the largest single process, exact
    tree_bytes: int  # peak PSS summed over the process tree, sampled


def tree_pss(pid: int) -> int:
    """PSS in bytes of ``pid`` and all its descendants (0 where /proc cannot tell)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
        except OSError:  # exited meanwhile
            continue
        total += sum(int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:"))
    return total


def measure(command: list[str], log_path: Path) -> Measurement:
    """Run ``command`` (output to ``log_path``), sampling its tree's PSS until it exits."""
    print("$ " + shlex.join(command), flush=True)
    start, tree_peak = time.perf_counter(), 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while True:
            # wait4 (not Popen.poll) so that the exit also hands back the child's rusage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree_peak = max(tree_peak, tree_pss(proc.pid))
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    if proc.returncode != 0:
        print(f"  failed with exit code {proc.returncode}; last lines of {log_path}:")
        print("    " + "\n    ".join(log_path.read_text(errors="replace").splitlines()[-15:]))
    return Measurement(proc.returncode, seconds, peak, tree_peak)


def make_source(work: Path) -> Path:
    """A 200-study demo cohort rendered at 128 px and ingested at 64 px."""
    cohort, ingest = work / "source-cohort", work / "source-ingest"
    for command in ([*CLI, "demo-cohort", "--n", "200", "--size", "128", "--out", str(cohort)],
                    [*CLI, "ingest", "--manifest", str(cohort / "manifest.csv"), "--out", str(ingest),
                     "--size", "64"]):
        name = command[len(CLI)]
        if measure(command, work / f"{name}.log").returncode != 0:
            raise SystemExit(f"{name} failed; see {work / f'{name}.log'}")
    return ingest


def tiny_prior(work: Path) -> Path:
    """A small Glow (2 levels x 2 steps, 16 hidden channels) for the audit and apply runs.

    The shipped prior is what real runs use, but on 2 CPU cores its bits for one epoch over 80k
    training studies take hours; memory is about the data path, which is the same with this one.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.models.glow import Glow
    from pipeline.prior import save_prior

    torch.manual_seed(0)
    glow = Glow(in_channels=1, levels=2, steps_per_level=2, hidden_channels=16)
    glow.train()
    with torch.no_grad():  # data-dependent ActNorm init on smooth images, so bpd is finite
        smooth = 0.5 + 0.03 * F.interpolate(torch.randn(16, 1, 4, 4), size=64, mode="bilinear")
        glow.log_prob(smooth * 255 / 256 - 0.5 + 1 / 512)
    return save_prior(glow.eval(), work / "tiny-prior")


def run_size(source: Path, n: int, size: int, work: Path, stage_settings: dict[str, list[str]],
             prior: Path) -> dict[str, Measurement]:
    folder = work / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    ingest, classifier, audit = folder / "ingest", folder / "classifier", folder / "audit"

    commands = {
        "scale-cohort": ["scale-cohort", "--source", str(source), "--n", str(n), "--size", str(size),
                         "--out", str(ingest)],
        "classify": ["classify", "train", "--ingest", str(ingest), "--out", str(classifier)],
        "audit": ["simplify", "audit", "--ingest", str(ingest), "--out", str(audit), "--prior", str(prior),
                  "--classifier", str(classifier / "model.safetensors")],
        "apply": ["apply", "--ingest", str(ingest), "--simplifier", str(audit / "simplifier.safetensors"),
                  "--classifier", str(classifier / "model.safetensors"), "--out", str(folder / "apply"),
                  "--prior", str(prior), "--no-mlflow"],
    }
    results: dict[str, Measurement] = {}
    for stage, args in commands.items():
        overrides = [arg for item in stage_settings[stage] for arg in ("--set", item)]
        results[stage] = measure([*CLI, *args, *overrides], folder / f"{stage}.log")
        if results[stage].returncode != 0:
            break  # later stages need this one's outputs
        print(f"  {stage}: {results[stage].seconds:.1f} s, peak {mib(results[stage].peak_bytes)}, "
              f"tree {mib(results[stage].tree_bytes)}", flush=True)
    return results


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def print_table(results: dict[int, dict[str, Measurement]], target: float) -> None:
    small, large = min(results), max(results)
    print(f"\npeak memory, {small} vs {large} studies (target ratio <= {target}); peak = RSS of the largest "
          "process (exact), tree = PSS of the process tree (sampled)")
    print(f"{'stage':<13} {f'{small} peak':>12} {f'{large} peak':>12} {'ratio':>6} "
          f"{f'{small} tree':>12} {f'{large} tree':>12} {'ratio':>6} {f'{small} s':>8} {f'{large} s':>8}")
    for stage in STAGES:
        a, b = results[small].get(stage), results[large].get(stage)

        def cell(m: Measurement | None, field: str) -> str:
            if m is None:
                return "-"
            return f"exit {m.returncode}" if m.returncode else mib(getattr(m, field))

        def ratio(field: str) -> str:
            if not (a and b) or a.returncode or b.returncode or not getattr(a, field):
                return "-"
            value = getattr(b, field) / getattr(a, field)
            return f"{value:.2f}" + ("" if value <= target else "!")

        seconds = [f"{m.seconds:.0f}" if m else "-" for m in (a, b)]
        print(f"{stage:<13} {cell(a, 'peak_bytes'):>12} {cell(b, 'peak_bytes'):>12} {ratio('peak_bytes'):>6} "
              f"{cell(a, 'tree_bytes'):>12} {cell(b, 'tree_bytes'):>12} {ratio('tree_bytes'):>6} "
              f"{seconds[0]:>8} {seconds[1]:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="source ingest folder (default: render a demo cohort)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="studies per cohort")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--work", type=Path, help="working folder, kept (default: a temporary one, removed)")
    parser.add_argument("--target", type=float, default=1.3, help="largest / smallest peak RSS allowed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help=f"extra config override for one stage ({', '.join(STAGES)}), e.g. "
                             "classify:train.num_workers=2 (repeatable; wins over the built-in settings)")
    args = parser.parse_args()
    settings = {stage: list(items) for stage, items in STAGE_SETTINGS.items()}
    for item in args.overrides:
        stage, _, setting = item.partition(":")
        if stage not in settings or "=" not in setting:
            parser.error(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of {', '.join(STAGES)}")
        settings[stage].append(setting)
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        source = args.source or make_source(work)
        prior = tiny_prior(work)
        results = {n: run_size(source, n, args.size, work, settings, prior) for n in sorted(args.sizes)}
        print_table(results, args.target)


if __name__ == "__main__":
    main()
