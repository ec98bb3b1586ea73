"""Where the level model's Dice is lost (issue 21's 0.88 target): each fold model runs on its
held-out scans with its own decoder settings, and every level's wrong voxels are split by the
sagittal slice they lie in:

- ``edge``: slices where only one of prediction and truth has the level at all (the body's
  lateral ends, where a 4 mm slice is part bone, part not);
- ``in_plane``: slices where both have it: the outline within the slice (endplates, cortex).

It also prints the Dice each level would have if the slice extent were perfect (both restricted
to the truth's slices), and the ratio of predicted to true volume (under- or over-segmentation).

    python Training/level_dice_errors.py --run Training/runs/levels-ctx-D32 --summary Training/results/levels-ctx-D32/cv_summary.json
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
from level_eval import cv_run_parser, held_out_scans, run_network, score
from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
from SpineKneeSegLib.engine.preprocessing import canonical_orientation
from SpineKneeSegLib.tasks.spine.level_decoding import decode_levels
from SpineKneeSegLib.core.atomic import write_text_atomic

LEVELS = ("L1", "L2", "L3", "L4", "L5")


def split_errors(pred: np.ndarray, truth: np.ndarray, slice_axis: int) -> dict:
    """Per level: wrong voxels in edge slices and in shared slices, and what Dice would be with
    the truth's slice extent (prediction outside the truth's slices dropped, truth kept)."""
    other = tuple(a for a in range(pred.ndim) if a != slice_axis)
    out = {}
    for k, name in enumerate(LEVELS, start=1):
        p, t = pred == k, truth == k
        p_in, t_in = p.any(axis=other), t.any(axis=other)
        both = p_in & t_in
        wrong = (p ^ t).sum(axis=other)
        inter, total = int((p & t).sum()), int(p.sum() + t.sum())
        p_clip = int(p.sum(axis=other)[t_in].sum())
        out[name] = {"dice": 2 * inter / total if total else 1.0,
                     "edge": int(wrong[~both].sum()), "in_plane": int(wrong[both].sum()),
                     "edge_slices": int((p_in ^ t_in).sum()), "extra_slices": int((p_in & ~t_in).sum()),
                     "missing_slices": int((t_in & ~p_in).sum()),
                     "dice_true_extent": 2 * inter / (p_clip + int(t.sum())) if t.any() else 1.0,
                     "volume_ratio": float(p.sum() / t.sum()) if t.any() else float("nan")}
    return out


def main(argv=None) -> int:
    parser = cv_run_parser(__doc__.split("\n\n")[0], "JSON of the per-scan figures (default RUN/dice_errors.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    summary = json.loads(args.summary.read_text(encoding="utf-8"))
    for f, cid, image, truth, weights, net, params in held_out_scans(args.run, summary):
        d = decode_levels(run_network(net, weights.preprocessing, image).probabilities, image, params)
        pred = largest_component_per_label(d.labels)
        if not score(pred, truth, image)["identification"]["all_correct"]:
            print(f"{cid:22s} fold {f}: levels not all right, left out of the split", flush=True)
            continue
        axis = canonical_orientation(image, "sagittal").axes[0]
        rows[cid] = {"fold": f, "levels": split_errors(pred, truth, axis)}
        lv = rows[cid]["levels"].values()
        edge, inp = sum(v["edge"] for v in lv), sum(v["in_plane"] for v in lv)
        print(f"{cid:22s} fold {f} Dice {np.mean([v['dice'] for v in lv]):.3f} "
              f"with true extent {np.mean([v['dice_true_extent'] for v in lv]):.3f}  wrong voxels: "
              f"edge slices {edge / (edge + inp):.0%}  extra / missing slices "
              f"{sum(v['extra_slices'] for v in lv)} / {sum(v['missing_slices'] for v in lv)}  "
              f"volume ratio {np.mean([v['volume_ratio'] for v in lv]):.2f}", flush=True)
    all_levels = [v for r in rows.values() for v in r["levels"].values()]
    edge, inp = sum(v["edge"] for v in all_levels), sum(v["in_plane"] for v in all_levels)
    print(f"{len(rows)} scans named right: mean per-level Dice {np.mean([v['dice'] for v in all_levels]):.4f}, "
          f"with the truth's slice extent {np.mean([v['dice_true_extent'] for v in all_levels]):.4f}; "
          f"wrong voxels in edge slices {edge / (edge + inp):.1%}; extra slices "
          f"{sum(v['extra_slices'] for v in all_levels)}, missing slices {sum(v['missing_slices'] for v in all_levels)} "
          f"over {len(all_levels)} levels; median predicted / true volume "
          f"{np.median([v['volume_ratio'] for v in all_levels]):.3f}")
    out = args.out or args.run / "dice_errors.json"
    write_text_atomic(out, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
