"""The level network's column window (session 35) judged on held-out scans: each scan run by the
fold model of a cross-validation run that never saw it, once on every slice, whole (the way the
cross-validated figures were measured), once as the product now runs (slices grown outward from
the middle, a 192-px window of columns after the middle four), over the field-of-view variants
of level_eval. Only scans wider than the window change (the Zukić T2 scans at 381 mm); the others
run exactly as before. Scores the decoded levels (before the refiner) against the labels.

    python Training/level_window_cv.py --run Training/results/levels-ctx-D32-s1 [--datasets zukic-t2] [--out F.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from level_column import case_labels, spine_cases  # noqa: E402
from level_eval import CARD, field_of_view_variants, score  # noqa: E402

from SpineKneeSegLib.core.atomic import write_text_atomic  # noqa: E402
from SpineKneeSegLib.core.datasets import data_root  # noqa: E402
from SpineKneeSegLib.core.image_io import read_image  # noqa: E402
from SpineKneeSegLib.engine.inference import load_network, segment_slices  # noqa: E402
from SpineKneeSegLib.engine.pipeline import postprocess  # noqa: E402
from SpineKneeSegLib.engine.weights import resolve_weights  # noqa: E402

MODES = {"every slice": {"grow_min_px": None, "column_px": None}, "product": {}}
# the product's post-processing up to the refiner: the decoding and the clean-up, run by the pipeline's own steps
DECODE_ONLY = dataclasses.replace(CARD, postprocessors=("level_decoding", "largest_component_per_label"))


def decoded_score(net, pre: dict, image, truth) -> dict:
    """The product's level network and its own decoding steps (no refiner), scored against ``truth``."""
    out = segment_slices(CARD, image, net, torch.device("cpu"), pre, keep_probabilities="network")
    result = postprocess(DECODE_ONLY, image, out.labels, {"probabilities": out.probabilities},
                         {"probabilities": out.probabilities_grid}, labels_box=out.labels_box)
    s = score(result.labels.array, truth, image)
    return {"mean_dice": round(float(np.mean(list(s["dice"].values()))), 4), "named_right": s["identification"]["all_correct"],
            "level_confidence": result.summaries["level_confidence"], "network_s": round(out.network_s, 3),
            "slice_growth": out.summaries.get("slice_growth")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a cross-validation run with folds.json and foldN/final.pt")
    parser.add_argument("--datasets", nargs="+", default=["zukic-t2"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folds = json.loads((args.run / "folds.json").read_text(encoding="utf-8"))["folds"]
    cases = [c for c in spine_cases(data_root(), log=lambda *_: None) if c["dataset"] in args.datasets]
    rows = []
    for f, held_out in enumerate(folds):
        mine = [c for c in cases if c["id"] in held_out]
        if not mine:
            continue
        weights = resolve_weights(CARD, args.run / f"fold{f}" / "final.pt")
        net = load_network(weights, torch.device("cpu"))
        for case in mine:
            for fov, (image, truth) in field_of_view_variants(read_image(case["image"]), case_labels(case)).items():
                row = {"case": case["id"], "fold": f, "fov": fov}
                for mode, override in MODES.items():
                    row[mode] = decoded_score(net, {**weights.preprocessing, **override}, image, truth)
                rows.append(row)
                a, b = row["every slice"], row["product"]
                print(f"{case['id']:18} fold {f} {fov:14} every slice {a['mean_dice']:.4f} "
                      f"{'ok ' if a['named_right'] else 'BAD'} conf {a['level_confidence']:.3f} {a['network_s']:.2f} s | "
                      f"product {b['mean_dice']:.4f} {'ok ' if b['named_right'] else 'BAD'} conf "
                      f"{b['level_confidence']:.3f} {b['network_s']:.2f} s", flush=True)
    for fov in dict.fromkeys(r["fov"] for r in rows):
        mine = [r for r in rows if r["fov"] == fov]
        line = [f"{fov:14} {len(mine)} scans:"]
        for mode in MODES:
            line.append(f"{mode} Dice {np.mean([r[mode]['mean_dice'] for r in mine]):.4f}, named right "
                        f"{sum(r[mode]['named_right'] for r in mine)}")
        print("  ".join(line))
    changed = [f"{r['case']} {r['fov']}" for r in rows if r["every slice"]["named_right"] != r["product"]["named_right"]]
    print(f"naming changed on: {', '.join(changed) or 'none'}")
    if args.out:
        write_text_atomic(args.out, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
