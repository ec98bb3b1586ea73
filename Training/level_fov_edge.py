"""Does a body cut by the top of the field of view warn of a wrong count? (issue 21: the silent
failures left are scans whose field of view starts within L1.) For every held-out prediction of
the cross-validation (each fold model on its scans at the four fields of view) and every run on
the five ivd-t2 scans of another centre, records the level confidence, whether the levels are
right, and two field-of-view features of the decoding: body voxels (level probabilities summed
over the decoder's threshold) in the two superior-most rows that are left unnamed ("edge
unnamed": a cut body above the named L1 -- perhaps L1 itself), and the named L1 touching those
rows ("L1 at edge"). Prints how a rule "doubtful also when edge unnamed" would flag failures and
correct predictions against the confidence threshold alone.

    python Training/level_fov_edge.py --run Training/runs/levels-ctx-D32 --summary Training/results/levels-ctx-D32/cv_summary.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from level_column import case_labels, spine_cases
from level_eval import field_of_view_variants, fold_models, run_network, score, superior_axis
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
from SpineKneeSegLib.tasks.spine.level_decoding import DecodingParameters, decode_levels
from SpineKneeSegLib.core.atomic import write_text_atomic

EDGE_ROWS = 2


def edge_features(prob: np.ndarray, labels: np.ndarray, image: Image, threshold: float) -> dict:
    """Body voxels in the ``EDGE_ROWS`` superior-most rows: left unnamed, or named L1."""
    axis, up_increasing = superior_axis(image)
    n = image.array.shape[axis]
    rows = slice(n - EDGE_ROWS, n) if up_increasing else slice(0, EDGE_ROWS)
    index = [slice(None)] * 3
    index[axis] = rows
    body = prob[(slice(None), *index)].astype(np.uint16).sum(0) >= threshold * 255
    named = labels[tuple(index)]
    return {"edge_unnamed": int((body & (named == 0)).sum()), "l1_at_edge": int((named == 1).sum())}


def predict(net, pre: dict, image: Image, params: DecodingParameters):
    out = run_network(net, pre, image)
    d = decode_levels(out.probabilities, image, params)
    return d, edge_features(out.probabilities, d.labels, image, params.threshold)


def tally(rows: list[dict], threshold: float, min_voxels: int) -> str:
    def flagged(r, with_edge):
        return r["confidence"] < threshold or (with_edge and r["edge_unnamed"] >= min_voxels)

    fail = [r for r in rows if not r["right"]]
    ok = [r for r in rows if r["right"]]
    out = []
    for with_edge in (False, True):
        out.append(f"{'confidence + edge' if with_edge else 'confidence alone':18s}: failures flagged "
                   f"{sum(flagged(r, with_edge) for r in fail)} of {len(fail)}, correct flagged "
                   f"{sum(flagged(r, with_edge) for r in ok)} of {len(ok)}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--external", type=Path, help="level_external.py's external.json of the fold models "
                                                      "(default RUN/final/external.json)")
    parser.add_argument("--min-voxels", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    root = data_root()
    if root is None:
        print("no shared data: set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    summary = json.loads(args.summary.read_text(encoding="utf-8"))
    threshold = summary["doubtful_threshold"]["threshold"]
    cases = {c["id"]: c for c in spine_cases(root, log=lambda *_: None)}
    external = json.loads((args.external or args.run / "final" / "external.json").read_text(encoding="utf-8"))
    cv_rows, ext_rows = [], []
    for f, held_out, weights, net, params in fold_models(args.run, summary):
        for cid in held_out:
            image, truth = read_image(cases[cid]["image"]), case_labels(cases[cid])
            for variant, (img, lab) in field_of_view_variants(image, truth).items():
                d, feats = predict(net, weights.preprocessing, img, params)
                s = score(largest_component_per_label(d.labels), lab, img)
                cv_rows.append({"case": cid, "fold": f, "variant": variant, "right": s["identification"]["all_correct"],
                                "kinds": s["identification"]["kinds"], "confidence": round(d.level_confidence, 3),
                                **feats})
                r = cv_rows[-1]
                print(f"{cid:22s} {variant:14s} {'ok ' if r['right'] else 'BAD'} conf {r['confidence']:.2f} "
                      f"edge unnamed {r['edge_unnamed']:5d} L1 at edge {r['l1_at_edge']:5d}", flush=True)
        # the same fold model on the other centre's scans, judged as level_external.py judged it
        for cid, judged in external["cases"].get(f"fold{f}", {}).items():
            image = read_image(root / "spine" / "ivd-t2" / cid.split("/")[1] / "image.nii.gz")
            d, feats = predict(net, weights.preprocessing, image, DecodingParameters())
            ext_rows.append({"case": cid, "fold": f, "right": judged["identification"]["all_correct"],
                             "confidence": judged["level_confidence"], **feats})
            r = ext_rows[-1]
            print(f"external {cid:13s} fold {f} {'ok ' if r['right'] else 'BAD'} conf {r['confidence']:.2f} "
                  f"edge unnamed {r['edge_unnamed']:5d} L1 at edge {r['l1_at_edge']:5d}", flush=True)
    write_text_atomic(args.run / "fov_edge.json", json.dumps({"cv": cv_rows, "external": ext_rows}, indent=1))
    print(f"\ndoubtful below {threshold}; edge rule: >= {args.min_voxels} unnamed body voxels in the top "
          f"{EDGE_ROWS} rows")
    print("cross-validation (all fields of view):\n" + tally(cv_rows, threshold, args.min_voxels))
    print("ivd-t2, five fold models:\n" + tally(ext_rows, threshold, args.min_voxels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
