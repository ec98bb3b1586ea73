"""bfloat16 against float32 inference (`--precision bfloat16`): for every task, the network time and
the whole run's time in both precisions (medians of interleaved runs), and how far the outputs
move: per-label Dice between the float32 and the bfloat16 label maps, voxels that change label,
and for lumbar-foramina whether the decoded level names and the doubtful flag stay the same.

    python Testing/benchmarks/bench_precision.py [--runs 3] [--tasks ...] [--data]

Inputs and weights as bench_overhead.py (registered weights; --data: one real shared case per
task). On a CPU without native bfloat16 the bfloat16 runs fall back to float32 (the report warns),
which this script says instead of printing figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench_overhead import prepare, run_once
from bench_process import add_process_flags, set_up_process
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.inference import native_bfloat16, pick_device
from SpineKneeSegLib.engine.postprocessing import dice
from SpineKneeSegLib.tasks import TASKS

PRECISIONS = ("float32", "bfloat16")


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-label Dice of two label maps (labels present in either) and the share of voxels whose
    label differs."""
    labels = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    return {"dice": {int(k): round(dice(a == k, b == k), 4) for k in labels},
            "changed": float((a != b).mean())}


def level_names(report: dict) -> tuple | None:
    decoding = report.get("summaries", {}).get("level_decoding")
    if not decoding:
        return None
    return tuple(b["name"] for b in decoding["bodies"]), bool(decoding["doubtful"])


def bench_task(plan: dict, runs: int, workdir: Path) -> dict:
    plans = {p: {**plan, "options": replace(plan["options"], precision=p)} for p in PRECISIONS}
    reports = {p: [] for p in PRECISIONS}
    for p in PRECISIONS:  # warm-up, not counted
        run_once(plans[p], workdir / p, 0)
    for i in range(1, runs + 1):
        for p in PRECISIONS:
            reports[p].append(run_once(plans[p], workdir / p, i))
    med = {p: {k: statistics.median(r["timings_s"][k] for r in reports[p]) for k in ("network", "total")}
           for p in PRECISIONS}
    labels = {p: read_image(workdir / p / f"out-{plan['task']}-{runs}" / "labels.nii.gz").array for p in PRECISIONS}
    return {"task": plan["task"], "source": plan["source"], "weights": plan["kind"], "median": med,
            "ran_as": reports["bfloat16"][-1].get("precision"), **agreement(labels["float32"], labels["bfloat16"]),
            "levels": {p: level_names(reports[p][-1]) for p in PRECISIONS}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_process_flags(parser)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--data", action="store_true", help="use one real shared case per task when present")
    args = parser.parse_args(argv)
    set_up_process(args)  # as the command line does
    if not native_bfloat16(pick_device("auto")):
        print("this machine has no native bfloat16: --precision bfloat16 runs in float32 here; nothing to compare")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_task(prepare(task, args.data, Path(tmp), with_aux=False), args.runs, Path(tmp))
                   for task in args.tasks]
    print(f"{'task':16} {'weights':9} {'input':40} {'network fp32':>12} {'bf16':>6} {'total fp32':>10} {'bf16':>6}  "
          f"agreement (Dice fp32 vs bf16 per label; voxels changed)   (medians of {args.runs}, seconds)")
    for r in results:
        m = r["median"]
        dices = " ".join(f"{k}:{v:.3f}" for k, v in r["dice"].items())
        print(f"{r['task']:16} {r['weights']:9} {r['source'][:40]:40} {m['float32']['network']:12.3f} "
              f"{m['bfloat16']['network']:6.3f} {m['float32']['total']:10.3f} {m['bfloat16']['total']:6.3f}  "
              f"{dices}; {100 * r['changed']:.3f} %")
        if r["levels"]["float32"] is not None:
            same = r["levels"]["float32"] == r["levels"]["bfloat16"]
            print(f"{'':26} level names and doubtful flag {'the same' if same else 'DIFFER'}: {r['levels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
