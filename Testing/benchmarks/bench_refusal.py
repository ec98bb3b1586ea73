"""How long a refused input takes (issue 27: well under 1 s): the checks that need no torch or
MRML run first. Prints the median wall time of the CLI, as a fresh process, over several runs.

    python Testing/benchmarks/bench_refusal.py [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cases(folder: Path) -> dict[str, list[str]]:
    from SpineKneeSegLib.core.image import Image
    from SpineKneeSegLib.core.image_io import write_image

    write_image(Image(np.full((8, 32, 32), 7.0, np.float32)), folder / "constant.nii.gz")
    write_image(Image((np.arange(64 * 64).reshape(1, 64, 64) % 255).astype(np.uint8)), folder / "radiograph.png")
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    return {"missing file": [str(folder / "missing.nii.gz")], "not an image": [str(folder / "broken.nii.gz")],
            "2D image to a 3D task": [str(folder / "radiograph.png")], "constant volume": [str(folder / "constant.nii.gz")]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        worst = 0.0
        for name, inputs in cases(folder).items():
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", "knee-bones",
                                       *inputs, "-o", str(folder / "out"), "--progress", "none"],
                                      capture_output=True, text=True)
                times.append(time.perf_counter() - t)
                assert done.returncode == 2, done.stderr
            median = statistics.median(times)
            worst = max(worst, median)
            print(f"{name:24s} exit 2 in {median:.2f} s (median of {args.runs})")
    print(f"slowest refusal: {worst:.2f} s ({'under' if worst < 1.0 else 'NOT under'} 1 s)")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
