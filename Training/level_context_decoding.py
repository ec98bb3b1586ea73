"""Does the context-targets network's own "above L1" / "below L5" evidence name levels better?
(issue 21, session 30). A context-targets level model is trained with two extra outputs, the
half-planes beyond L1's top and L5's bottom, which the product has so far thrown away. The decoder
can score the bodies it leaves outside the L1-L5 run by them (DecodingParameters.context_weight).

This script scores, for kept fold models that kept their context heads, each held-out scan in the
four fields of view of level_eval, decoded twice with the same settings: the seed's run score and
the same with ``--context-weight`` (fixed before anything was scored: 1, the context classes
weighted as the levels). Nothing is chosen here; the figures say whether the variant is worth a
full cross-validation (every fold and the final model need their context heads: models saved
before session 30 get them with ``spine_levels.py attach-context``).

    python Training/level_context_decoding.py --run Training/results/levels-ctx-D32-s1 --fold 0 --external \\
        --out Training/results/levels-context-decoding/s1-fold0.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from level_column import N_LEVELS, case_labels, spine_cases, with_context_heads
from level_external import external_cases
from level_eval import CARD, field_of_view_variants, run_network, score
from SpineKneeSegLib.core.atomic import write_text_atomic
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.inference import load_network
from SpineKneeSegLib.engine.models import build_network, fold_batch_norm
from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
from SpineKneeSegLib.engine.weights import load_checkpoint, resolve_weights
from SpineKneeSegLib.tasks.spine.level_decoding import DecodingParameters, decode_levels


class ContextAsLevels(torch.nn.Module):
    """The training network's two context outputs where the product reads levels 1-2 (levels 3-5
    held at a logit of -30), so that the product's own slicing and resampling carry them onto the
    scan's grid exactly as the levels."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.size_multiple = net.size_multiple  # the product pads its inputs to this

    def forward(self, x):
        context = self.net(x)[:, N_LEVELS:]
        return torch.cat([context, torch.full_like(context[:, :1], -30.0).expand(-1, N_LEVELS - 2, -1, -1)], 1)


def context_network(checkpoint: Path) -> torch.nn.Module:
    config, state = with_context_heads(load_checkpoint(checkpoint))
    net = build_network("multinet", config)
    net.load_state_dict(state)
    return ContextAsLevels(fold_batch_norm(net.eval()).to(memory_format=torch.channels_last)).eval()


def decode_both(levels_net, ctx_net, pre: dict, image, params: DecodingParameters, context_weight: float):
    """(the seed's decoding, the decoding with context evidence) of one scan, on its own grid."""
    prob = run_network(levels_net, pre, image).probabilities
    context = run_network(ctx_net, pre, image).probabilities[:2]
    return (decode_levels(prob, image, params),
            decode_levels(prob, image, replace(params, context_weight=context_weight), context))


def row_of(seed, with_context, scored) -> dict:
    return {"seed": {**scored(seed), "level_confidence": round(seed.level_confidence, 4),
                     "assignment": seed.assignment()},
            "context": {**scored(with_context), "level_confidence": round(with_context.level_confidence, 4),
                        "assignment": with_context.assignment()},
            "beyond": [[round(float(v), 3) for v in b.context] for b in with_context.bodies]}


def log_row(cid: str, fov: str, row: dict, log=print) -> None:
    log(f"{cid:22s} {fov:14s} seed {'ok ' if row['seed']['identification']['all_correct'] else 'BAD'}"
        f" ({row['seed']['level_confidence']:.2f})  context "
        f"{'ok ' if row['context']['identification']['all_correct'] else 'BAD'}"
        f" ({row['context']['level_confidence']:.2f})  beyond {row['beyond']}")


def evaluate(checkpoint: Path, cases: list[dict], external: list[dict], params: DecodingParameters,
             context_weight: float, log=print) -> tuple[dict, dict]:
    """The fold model's held-out ``cases`` (level_eval's fields of view, scored against their body
    labels) and the ``external`` scans (level_external's cuts, scored against their discs)."""
    from level_external import disc_levels, field_of_view_cuts, identify_by_discs

    weights = resolve_weights(CARD, checkpoint)
    levels_net, ctx_net = load_network(weights, torch.device("cpu")), context_network(checkpoint)
    held_out, others = {}, {}
    for case in cases:
        image, truth = read_image(case["image"]), case_labels(case)
        for fov, (img, lab) in field_of_view_variants(image, truth).items():
            seed, with_context = decode_both(levels_net, ctx_net, weights.preprocessing, img, params, context_weight)
            row = row_of(seed, with_context, lambda d: score(largest_component_per_label(d.labels), lab, img))
            held_out.setdefault(case["id"], {})[fov] = row
            log_row(case["id"], fov, row, log)
    for case in external:
        whole = read_image(case["image"])
        discs = read_image(case["discs"]).array.astype(np.int64)
        discs_s = disc_levels(discs, whole)
        for fov, (img, _, expected) in field_of_view_cuts(whole, discs).items():
            seed, with_context = decode_both(levels_net, ctx_net, weights.preprocessing, img, params, context_weight)
            row = row_of(seed, with_context, lambda d: {"identification": identify_by_discs(
                largest_component_per_label(d.labels), None, img, discs_s, expected), "dice": {}})
            others.setdefault(case["id"], {})[fov] = row
            log_row(case["id"], fov, row, log)
    return held_out, others


def tally(results: dict, doubtful_below: float) -> dict:
    """Per field of view and decoding: right, wrong and flagged, wrong and silent."""
    out = {}
    for rows in results.values():
        for fov, row in rows.items():
            for kind in ("seed", "context"):
                r, t = row[kind], out.setdefault(fov, {}).setdefault(kind, {"right": 0, "wrong, flagged": 0,
                                                                              "wrong, silent": 0, "dice": []})
                ok = r["identification"]["all_correct"]
                t["right" if ok else ("wrong, flagged" if r["level_confidence"] < doubtful_below else "wrong, silent")] += 1
                if r["dice"]:  # external scans: names only (disc labels)
                    t["dice"].append(float(np.mean(list(r["dice"].values()))) if ok else 0.0)
    for fov in out.values():
        for t in fov.values():
            t["dice"] = round(float(np.mean(t["dice"])), 4) if t["dice"] else None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a cv run or kept folder (folds.json, foldN/final.pt)")
    parser.add_argument("--fold", type=int, action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threshold", type=float, default=0.4, help="body threshold (the shipped model's)")
    parser.add_argument("--l5-weight", type=float, default=3.0, help="L5's run weight (the shipped model's)")
    parser.add_argument("--doubtful-below", type=float, default=0.6, help="the shipped model's")
    parser.add_argument("--context-weight", type=float, default=1.0)
    parser.add_argument("--external", action="store_true", help="also the ivd-t2 scans cut as level_external --fov")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = data_root()
    if root is None:
        print("no spine data: set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    cases = {c["id"]: c for c in spine_cases(root, log=lambda *_: None)}
    folds = json.loads((args.run / "folds.json").read_text(encoding="utf-8"))["folds"]
    params = DecodingParameters(threshold=args.threshold, run_weights=(1.0,) * (N_LEVELS - 1) + (args.l5_weight,))
    held_out, external = {}, {}
    others = external_cases(root) if args.external else []
    for f in args.fold:
        try:
            h, e = evaluate(args.run / f"fold{f}" / "final.pt", [cases[c] for c in folds[f]], others, params,
                            args.context_weight)
        except ValueError as error:
            print(f"{args.run / f'fold{f}' / 'final.pt'}: {error}", file=sys.stderr)
            return 2
        held_out.update(h)
        external.update({f"fold{f}/{k}": v for k, v in e.items()})
    summary = {"held_out": tally(held_out, args.doubtful_below), "external": tally(external, args.doubtful_below)}
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"run": str(args.run), "folds": args.fold, "decoder": params.__dict__,
                                            "context_weight": args.context_weight,
                                            "doubtful_below": args.doubtful_below, "summary": summary,
                                            "held_out": held_out, "external": external}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
