"""Dice ceiling of the lumbar level task at a network spacing (issue 21): what a perfect network
would score if its outputs were the true labels put on the network grid, brought back by the
inference's own bilinear logits resampling and argmax. Two ways onto the grid: "area" (one-hot
labels averaged like the input image: soft boundaries) and "nearest" (how training_slices makes
the training targets). Every labelled scan of ../shared/data/spine, per case and the means.

    python Training/level_ceiling.py [--spacing-mm 1.4 1.0] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from evalhelpers import dice_per_label
from level_column import case_labels, spine_cases
from spine_levels import N_LEVELS, level_labels
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.preprocessing import canonical_image, from_network_grid, network_grid, to_network_grid
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.core.atomic import write_text_atomic

CARD = TASKS["lumbar-foramina"]
MODES = {"area": "bilinear", "nearest": "nearest"}  # to_network_grid's mode for each way onto the grid


def case_ceilings(image, truth: np.ndarray, spacings: list[float]) -> dict[str, float]:
    canon, orientation = canonical_image(image, CARD.preprocessing.plane)
    t = orientation.apply(truth)
    onehot = torch.from_numpy(np.eye(N_LEVELS + 1, dtype=np.float32)[t]).permute(0, 3, 1, 2)
    out = {}
    for spacing in spacings:
        grid = network_grid(canon, 0, spacing, 1)
        for name, mode in MODES.items():
            back, _ = from_network_grid(to_network_grid(onehot, grid, mode=mode), grid)
            # a level absent from both counts as right (1.0), as the level evaluation scores it
            dice = dice_per_label(back.argmax(1).numpy(), t, range(1, N_LEVELS + 1), empty=1.0)
            out[f"{spacing:g} mm {name}"] = float(np.mean(list(dice.values())))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing-mm", type=float, nargs="+", default=[1.4, 1.0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    root = args.data or data_root()
    if root is None:
        raise SystemExit("no shared data (set SPINEKNEESEG_DATA or provide ../shared/data)")
    rows = {}
    for case in spine_cases(Path(root), log=lambda *a: None):
        rows[case["id"]] = case_ceilings(read_image(case["image"]), level_labels(case_labels(case)), args.spacing_mm)
        print(case["id"], "  ".join(f"{k} {v:.4f}" for k, v in rows[case["id"]].items()), flush=True)
    for key in next(iter(rows.values())):
        values = np.array([r[key] for r in rows.values()])
        print(f"{key:16s} mean {values.mean():.4f}  median {np.median(values):.4f}  worst {values.min():.4f}  "
              f"({len(values)} scans)")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
