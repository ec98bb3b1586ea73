"""Cohort throughput (issue 25, part 3): the lumbar scans of ../shared/data/spine (44 MyoSegmenTUM +
10 Zukic T2) through `spinekneeseg run --manifest` in one process (workers 1 and 2), against one
CLI call per case (measured on the first --single cases), and the resume rule: a manifest run
killed part-way, then run again, redoes no finished case.

    python Testing/benchmarks/bench_batch.py [--single 5] [--limit 54]

Prints wall-clock seconds, cases per minute and the ratio to one CLI call per case.
"""
from __future__ import annotations

import argparse
import csv
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.engine.batch import SUMMARY_LOCK

TASK = "lumbar-foramina"


def lumbar_cases(limit: int) -> list[tuple[str, Path]]:
    root = data_root() / "spine"
    cases = [(f"{source}-{p.name}", p / "image.nii.gz") for source in ("myosegmentum", "zukic-t2")
             for p in sorted((root / source).iterdir()) if (p / "image.nii.gz").exists()]
    return cases[:limit]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", TASK, "--progress", "none", *map(str, args)]


def write_manifest(path: Path, cases) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "input"])
        writer.writerows([(case_id, str(image)) for case_id, image in cases])
    return path


def timed(command) -> float:
    t = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - t


def finished(folder: Path) -> set[str]:
    return {p.parent.name for p in folder.glob("*/report.json")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=5, help="cases run as one CLI call each")
    parser.add_argument("--limit", type=int, default=54)
    args = parser.parse_args(argv)
    cases = lumbar_cases(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_manifest(tmp / "cases.csv", cases)
        single = [timed(cli(image, "-o", tmp / "single" / case_id)) for case_id, image in cases[:args.single]]
        per_case = sum(single) / len(single)
        print(f"one CLI call per case: {per_case:.2f} s per case ({60 / per_case:.1f} cases/min; "
              f"{args.single} cases)")
        for workers in (1, 2):
            seconds = timed(cli("--manifest", manifest, "-o", tmp / f"batch{workers}", "--workers", workers))
            rate = 60 * len(cases) / seconds
            print(f"--manifest, {workers} worker(s): {len(cases)} cases in {seconds:.1f} s = {rate:.1f} cases/min, "
                  f"{rate / (60 / per_case):.1f} x one call per case")
        # resume: kill -9 part-way, then run again
        out = tmp / "resume"
        proc = subprocess.Popen(cli("--manifest", manifest, "-o", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(finished(out)) < max(2, len(cases) // 3) and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = {case: (out / case / "report.json").stat().st_mtime_ns for case in finished(out)}
        seconds = timed(cli("--manifest", manifest, "-o", out))
        redone = [case for case, mtime in before.items() if (out / case / "report.json").stat().st_mtime_ns != mtime]
        leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != SUMMARY_LOCK]  # it stays
        print(f"resume after kill -9 with {len(before)} finished: re-run took {seconds:.1f} s, finished cases redone: "
              f"{len(redone)}, all {len(finished(out))}/{len(cases)} done, hidden leftovers: {leftovers or 'none'}")


if __name__ == "__main__":
    main()
