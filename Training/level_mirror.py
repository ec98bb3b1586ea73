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

import json
import sys

import numpy as np
import torch
from level_eval import cv_run_parser, held_out_scans, run_network, score
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
from SpineKneeSegLib.engine.preprocessing import canonical_orientation
from SpineKneeSegLib.tasks.spine.level_decoding import decode_levels
from SpineKneeSegLib.core.atomic import write_text_atomic


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
    parser = cv_run_parser(__doc__.split("\n\n")[0], "JSON of the per-scan figures (default RUN/mirror.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    summary = json.loads(args.summary.read_text(encoding="utf-8"))
    for f, cid, image, truth, weights, net, params in held_out_scans(args.run, summary):
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
    write_text_atomic(out, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
