"""Same numbers under load: compare every result file of two ``simplebits run`` folders.

Run ``make demo`` twice, once on an idle machine and once beside a CPU-heavy process (e.g. another
pipeline run), then:

    python benchmarks/reproducibility.py RUN_A RUN_B

It prints, per result file (every ``metrics.json``, ``predictions.csv``, ``baselines.csv``, ``bpd.csv``,
the cohort report's tables, the ground truth, and the image shards of the ingest and simplified
stores), whether the two runs' copies are byte-identical,
and for JSON metrics that differ the keys whose values differ. Timings, MLflow ids and file paths are
not results and are ignored (``metrics.json`` keys ending in ``_seconds`` or ``_s``; MLflow's artifact
copies). Exit status 1
when any result differs, so a script can gate on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULT_NAMES = ("metrics.json", "predictions.csv", "baselines.csv", "bpd.csv", "studies.csv", "subgroups.csv",
                "ground_truth.csv", "shard-*.npy")
IGNORED_SUFFIXES = ("_seconds", "_s")


def result_files(run: Path) -> set[str]:
    """Result files by path in the run; MLflow's copies (``mlartifacts/<run id>/``) are left out: their
    folder names are run ids, new every run, and their contents are the files compared here."""
    return {p.relative_to(run).as_posix() for name in RESULT_NAMES for p in run.rglob(name)
            if "mlartifacts" not in p.relative_to(run).parts}


def _numbers(path: Path) -> dict[str, object]:
    """A metrics.json flattened to ``a.b.c -> value``, without timings."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif not prefix.endswith(IGNORED_SUFFIXES):
            flat[prefix] = value

    walk("", json.loads(path.read_text()))
    return flat


def compare(run_a: Path, run_b: Path) -> list[str]:
    """One line per result file; returns the lines of files that differ."""
    differing = []
    files_a, files_b = result_files(run_a), result_files(run_b)
    for name in sorted(files_a | files_b):
        if name not in files_a or name not in files_b:
            line = f"MISSING   {name} (only in {run_a if name in files_a else run_b})"
        elif name.endswith(".json"):
            a, b = _numbers(run_a / name), _numbers(run_b / name)
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            line = f"identical {name} ({len(a)} values)" if not keys else (
                f"DIFFERENT {name}: " + ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in keys[:8]))
        else:
            same = (run_a / name).read_bytes() == (run_b / name).read_bytes()
            line = f"{'identical' if same else 'DIFFERENT'} {name}"
        print(line)
        if not line.startswith("identical"):
            differing.append(line)
    return differing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    differing = compare(args.run_a, args.run_b)
    total = len(result_files(args.run_a) | result_files(args.run_b))
    print(f"{total - len(differing)} of {total} result files identical")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
