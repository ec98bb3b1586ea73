"""Which true lesions a leave-one-out run misses, by size and by how much they stand out (issue 22):
each 26-connected lesion of the truth at 1 mm, its size, its contrast (mean FLAIR of the lesion
minus the mean of its 2-voxel shell of non-lesion brain, in brain SDs) and whether the left-out
prediction (plain 0.5 cut of the saved probabilities) touches it.

    python Training/wmh_contrast.py --run Training/runs/brain-wmh-v3-blob-axial [--run OTHER ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from brain_wmh import brain_cases
from scipy import ndimage
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.tasks.brain.lesions import label_lesions

SIZE_BRACKETS = ((0, 10), (10, 400), (400, None))
CONTRAST_BINS = (0.0, 0.6, 0.9, 1.2, None)  # brain SDs


def lesion_rows(flair: np.ndarray, truth: np.ndarray, found: np.ndarray) -> list[dict]:
    """One row per true lesion: voxels, shell contrast (brain SDs), touched by ``found``."""
    brain = flair > 0
    z = (flair - flair[brain].mean()) / flair[brain].std()
    comp, n = label_lesions(truth > 0, 26)
    rows = []
    for index, box in enumerate(ndimage.find_objects(comp), start=1):
        wide = tuple(slice(max(b.start - 3, 0), b.stop + 3) for b in box)
        lesion = comp[wide] == index
        shell = ndimage.binary_dilation(lesion, iterations=2) & ~(truth[wide] > 0) & brain[wide]
        contrast = float(z[wide][lesion].mean() - z[wide][shell].mean()) if shell.any() else float("nan")
        rows.append({"voxels": int(lesion.sum()), "contrast_sd": contrast, "found": bool(found[wide][lesion].any())})
    return rows


def _bin(value, edges) -> int:
    for k in range(len(edges) - 1):
        if value >= edges[k] and (edges[k + 1] is None or value < edges[k + 1]):
            return k
    return 0


def table(rows: list[dict]) -> str:
    """Recall (found / lesions) by size bracket (rows) and contrast bin (columns), all cases pooled."""
    names = [f"[{lo}, {hi if hi is not None else 'inf'})" for lo, hi in SIZE_BRACKETS]
    bins = [f"{CONTRAST_BINS[k]:g}-{CONTRAST_BINS[k + 1]:g} SD" if CONTRAST_BINS[k + 1] is not None
            else f">= {CONTRAST_BINS[k]:g} SD" for k in range(len(CONTRAST_BINS) - 1)]
    bins[0] = f"< {CONTRAST_BINS[1]:g} SD"
    lines = ["| lesion voxels | " + " | ".join(bins) + " | all |", "|---" * (len(bins) + 2) + "|"]
    for s, (lo, hi) in enumerate(SIZE_BRACKETS):
        cells = []
        sel = [r for r in rows if r["voxels"] >= lo and (hi is None or r["voxels"] < hi)]
        for c in range(len(bins)):
            group = [r for r in sel if _bin(r["contrast_sd"], CONTRAST_BINS) == c]
            cells.append(f"{sum(r['found'] for r in group)}/{len(group)}" if group else "-")
        cells.append(f"{sum(r['found'] for r in sel)}/{len(sel)}")
        lines.append(f"| {names[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_rows(run: Path, root: Path) -> list[dict]:
    rows = []
    for case in brain_cases(root):
        saved = np.load(run / f"fold-{case['id']}" / "probabilities.npz")["1mm"]
        flair = read_image(case["flair"]).array.astype(np.float64)
        truth = read_image(case["labels"]).array
        found = saved >= 128  # uint8 probabilities: the plain 0.5 cut
        rows += [{"case": case["id"], **r} for r in lesion_rows(flair, truth, found)]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--data")
    args = parser.parse_args(argv)
    root = Path(args.data) if args.data else data_root()
    for run in args.run:
        rows = run_rows(run, root)
        found = [r["contrast_sd"] for r in rows if r["found"]]
        missed = [r["contrast_sd"] for r in rows if not r["found"]]
        print(f"## {run.name}: {len(rows)} true lesions at 1 mm, found {len(found)} "
              f"(median contrast found {np.nanmedian(found):.2f} SD, missed {np.nanmedian(missed):.2f} SD)\n")
        print(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
