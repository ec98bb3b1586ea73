"""Memory over a long cohort: the lumbar scans of ../shared/data/spine listed --passes times (new
case ids each pass) through one `spinekneeseg run --manifest` process; its resident memory is
read from /proc as each case ends (the JSON progress stream says when). A leak shows as growth
from pass to pass once every scan size has been met; the command line keeps freed memory for the
next array (core/memory.py), so the first pass climbs to the largest case's peak and stays there.

    python Testing/benchmarks/bench_cohort_memory.py [--passes 5] [--workers 2] [--limit 54]

Prints the resident memory after the first case, each pass's peak and end, and the trend of the
peaks from the second pass on (least squares) in MB per 100 cases. With two workers the peaks
wander by some 100 MB (which cases happen to run side by side): judge the trend over 5 passes or
more, not one pass's difference.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
import subprocess
import sys
import tempfile

import numpy as np

from bench_batch import TASK, lumbar_cases


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=54)
    args = parser.parse_args(argv)
    cases = lumbar_cases(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "cases.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "input"])
            writer.writerows((f"pass{p}-{case_id}", image) for p in range(args.passes) for case_id, image in cases)
        command = [sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", TASK, "--manifest", str(manifest),
                   "-o", str(Path(tmp) / "out"), "--workers", str(args.workers), "--progress", "json"]
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        memory, failed = [], 0
        for line in run.stdout:
            event = json.loads(line)
            if event.get("stage") == "cohort":  # a case has ended
                memory.append(resident_mb(run.pid))
            failed += event.get("level") == "error"
        if run.wait() != 0 or failed:
            print(f"the cohort did not run cleanly (exit {run.returncode}, {failed} failed cases)")
            return 1
    n = len(cases)
    passes = [memory[p * n:(p + 1) * n] for p in range(args.passes)]
    print(f"{args.passes} passes of {n} lumbar scans, {args.workers} worker(s), one process: resident memory "
          f"{memory[0]:.0f} MB after the first case")
    for p, seen in enumerate(passes, start=1):
        print(f"  pass {p}: peak {max(seen):.0f} MB, end {seen[-1]:.0f} MB")
    later = [max(seen) for seen in passes[1:]]
    if len(later) >= 2:
        slope = float(np.polyfit(np.arange(len(later)), later, 1)[0])  # MB per pass
        print(f"trend of the peaks from pass 2 on: {100 * slope / n:+.1f} MB per 100 cases "
              f"(first pass's peak {max(passes[0]):.0f} MB, the largest after it {max(later):.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
