"""Exactness check for changes meant not to change any output: run lumbar-foramina on every shared
spine scan into a folder, then compare two such folders (labels voxel by voxel, report summaries,
foramen marker positions).

    python Testing/benchmarks/spine_outputs.py run OUT_BEFORE      # on the commit before
    python Testing/benchmarks/spine_outputs.py run OUT_AFTER       # on the change
    python Testing/benchmarks/spine_outputs.py compare OUT_BEFORE OUT_AFTER

59 scans, about 2 minutes a run on 2 cores. "compare" exits 1 when any scan differs. The report's
timings and the refiner's network seconds are left out of the comparison (they vary run to run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
from SpineKneeSegLib.tasks import TASKS

VARYING = ("level_refinement",)  # summaries holding seconds


def run_all(out: Path) -> int:
    root = data_root()
    if root is None:
        print("no shared data (set SPINEKNEESEG_DATA)")
        return 2
    paths = sorted((root / "spine").glob("*/case*/image.nii.gz"))
    for path in paths:
        name = f"{path.parent.parent.name}-{path.parent.name}"
        run_case(TASKS["lumbar-foramina"], [str(path)], out / name, RunOptions(threads=2, overwrite=True))
    print(f"ran {len(paths)} scans into {out}")
    return 0


def _markers(folder: Path) -> list:
    markups = json.loads((folder / "foramina.mrk.json").read_text(encoding="utf-8"))["markups"]
    return [p["position"] for p in markups[0]["controlPoints"]]


def _summaries(folder: Path) -> str:
    summaries = json.loads((folder / "report.json").read_text(encoding="utf-8"))["summaries"]
    return json.dumps({k: v for k, v in summaries.items() if k not in VARYING}, sort_keys=True)


def compare(a: Path, b: Path) -> int:
    names = sorted(d.name for d in a.iterdir() if d.is_dir())
    missing = [n for n in names if not (b / n).is_dir()]
    differ = 0
    for name in (n for n in names if n not in missing):
        voxels = int((read_image(a / name / "labels.nii.gz").array != read_image(b / name / "labels.nii.gz").array).sum())
        same_summaries = _summaries(a / name) == _summaries(b / name)
        same_markers = _markers(a / name) == _markers(b / name)
        if voxels or not same_summaries or not same_markers:
            differ += 1
            print(f"{name}: {voxels} label voxels differ; summaries {'same' if same_summaries else 'DIFFER'}; "
                  f"markers {'same' if same_markers else 'DIFFER'}")
    print(f"compared {len(names) - len(missing)} scans: {differ} differ" + (f"; missing in {b}: {missing}" if missing else ""))
    return 1 if differ or missing else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_argument("out", type=Path)
    both = sub.add_parser("compare")
    both.add_argument("a", type=Path)
    both.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    return run_all(args.out) if args.command == "run" else compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
