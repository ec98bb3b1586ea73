"""Mirror test-time averaging for the level model, measured on the cross-validation (issue 21's Dice
target; named the next thing to try in session 12): each fold model runs on its held-out scans as
given and mirrored left-right (the sagittal slice order reversed, geometry kept), the two
probability maps are averaged, and the average is decoded with the fold's own decoder settings
(body threshold and L5 weight chosen on the other folds by ``cv-report``). Prints per scan the
mean per-level Dice and whether all five levels are right, plain against mirror-averaged.

    python Training/level_mirror.py --run Training/runs/levels-ctx-D32 --summary Training/results/levels-ctx-D32/cv_summary.json

The mirror doubles the network's time (about 1.3 s -> 2.6 s per lumbar case on two CPU cores), so
on the CPU it would break the task's 2 s per case; this measures what it would buy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from level_column import case_labels, spine_cases
from level_eval import fold_models, run_network, score
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
from SpineKneeSegLib.engine.preprocessing import canonical_orientation
from SpineKneeSegLib.tasks.spine.level_decoding import decode_levels


def mirrored(image: Image) -> tuple[Image, int]:
    """The image mirrored left-right on the same grid (its sagittal slice axis reversed), and that axis."""
    axis = canonical_orientation(image, "sagittal").axes[0]
    return Image(np.flip(image.array, axis).copy(), image.spacing, image.origin, image.direction), axis


def probabilities(net, pre: dict, image: Image, mirror: bool) -> np.ndarray:
    """(5, *shape) float level probabilities; ``mirror``: averaged with the mirrored image's, flipped back."""
    def run(img):
        return run_network(net, pre, img).probabilities.astype(np.float32) / 255

    p = run(image)
    if mirror:
        flipped, axis = mirrored(image)
        p = (p + np.flip(run(flipped), axis + 1)) / 2
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the cv run folder (foldN/final.pt, folds.json)")
    parser.add_argument("--summary", type=Path, required=True, help="cv-report's cv_summary.json (decoder per fold)")
    parser.add_argument("--out", type=Path, help="JSON of the per-scan figures (default RUN/mirror.json)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = data_root()
    if root is None:
        print("no shared data: set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    cases = {c["id"]: c for c in spine_cases(root, log=lambda *_: None)}
    rows = {}
    for f, held_out, weights, net, params in fold_models(args.run, json.loads(args.summary.read_text())):
        for cid in held_out:
            image, truth = read_image(cases[cid]["image"]), case_labels(cases[cid])
            row = {"fold": f}
            for name, mirror in (("plain", False), ("mirror", True)):
                d = decode_levels(probabilities(net, weights.preprocessing, image, mirror), image, params)
                s = score(largest_component_per_label(d.labels), truth, image)
                row[name] = {"right": s["identification"]["all_correct"],
                             "dice": round(float(np.mean(list(s["dice"].values()))), 4),
                             "confidence": round(d.level_confidence, 3)}
            rows[cid] = row
            print(f"{cid:22s} fold {f} plain {row['plain']['dice']:.3f} {'ok ' if row['plain']['right'] else 'BAD'} "
                  f"mirror {row['mirror']['dice']:.3f} {'ok ' if row['mirror']['right'] else 'BAD'}", flush=True)
    for name in ("plain", "mirror"):
        print(f"{name:7s} all five right {sum(r[name]['right'] for r in rows.values())} of {len(rows)}, mean "
              f"per-level Dice {np.mean([r[name]['dice'] for r in rows.values()]):.4f}")
    gain = [r["mirror"]["dice"] - r["plain"]["dice"] for r in rows.values()]
    print(f"mirror - plain per scan: median {np.median(gain):+.4f}, better on {sum(g > 0 for g in gain)} of {len(gain)}")
    out = args.out or args.run / "mirror.json"
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
