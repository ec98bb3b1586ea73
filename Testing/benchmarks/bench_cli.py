"""The wait a user sees for one case: ``spinekneeseg run`` as a fresh process, from the command to
its exit, on one real shared case per task, with the writer process (the default) and with
``--no-writer-process`` (every output written in the run's own process), alternated.

    python Testing/benchmarks/bench_cli.py [--runs 4] [--tasks knee-bones ...]

Prints medians: the wall time, and the report's startup, total, network and outside
(total - network). The writer process moves slicer-core's start-up (and highdicom's for a DICOM
input) off the run's path; what it costs inside ``total`` shows in "outside".
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.demo import SHARED_CASES

MODES = {"writer process": [], "in-process": ["--no-writer-process"]}


def one_run(task: str, source: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", task, str(source), "-o", str(out),
                    "--progress", "none", *extra], check=True)
    wall = time.perf_counter() - t
    timings = json.loads((out / "report.json").read_text(encoding="utf-8"))["timings_s"]
    return {"wall": wall, "startup": timings["startup"], "total": timings["total"], "network": timings["network"],
            "outside": timings["total"] - timings["network"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--tasks", nargs="*", default=list(SHARED_CASES))
    args = parser.parse_args(argv)
    root = data_root()
    if root is None:
        raise SystemExit("no shared data folder (SPINEKNEESEG_DATA)")
    print(f"{'task':16} {'mode':15} {'wall':>6} {'startup':>8} {'total':>6} {'network':>8} {'outside':>8}"
          f"   (medians of {args.runs} fresh processes, alternated; seconds)")
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            source = root / SHARED_CASES[task][0]
            rows = {mode: [] for mode in MODES}
            for _ in range(args.runs):
                for mode, extra in MODES.items():
                    rows[mode].append(one_run(task, source, Path(tmp) / "out", extra))
            for mode, samples in rows.items():
                med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
                print(f"{task:16} {mode:15} {med['wall']:6.2f} {med['startup']:8.2f} {med['total']:6.2f} "
                      f"{med['network']:8.2f} {med['outside']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
