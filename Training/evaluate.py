"""Evaluation for the lumbar task (seed 004's metrics) — functions plus a command line.

    python Training/evaluate.py levels --weights best.pt [--cases validation|all] [--json out.json]
    python Training/evaluate.py foramina --truth-dir T --pred-dir P          # *.mrk.json per case
    python Training/evaluate.py compare --a A.json --b B.json                # exact binomial test

Level metrics: per-level Dice and level identification (each level's largest component must
overlap its own body; off-by-one shifts counted). Foramen metrics: in-plane (sagittal, A-S) error
in mm, lateral (R-L) error in mm, % within 5 mm (a missed foramen counts as wrong), missed count;
two models are compared with the exact binomial (sign) test on the discordant foramina.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

WITHIN_MM = 5.0


def foramen_errors(truth: dict[str, tuple], pred: dict[str, tuple]) -> dict:
    """``truth``/``pred``: label -> RAS point (a foramen with several points: their mean). Errors
    per expected foramen; a foramen in truth but not predicted is missed (and counts as wrong)."""
    rows = {}
    for label, t in truth.items():
        if label not in pred:
            rows[label] = {"missed": True, "in_plane_mm": None, "lateral_mm": None, "within": False}
            continue
        d = np.asarray(pred[label], float) - np.asarray(t, float)
        in_plane = float(np.hypot(d[1], d[2]))  # sagittal plane: anterior-posterior and superior-inferior
        rows[label] = {"missed": False, "in_plane_mm": round(in_plane, 3), "lateral_mm": round(abs(float(d[0])), 3),
                       "within": bool(np.linalg.norm(d) <= WITHIN_MM)}
    return rows


def summarise_foramina(rows: dict) -> dict:
    found = [r for r in rows.values() if not r["missed"]]
    return {"foramina": len(rows), "missed": sum(r["missed"] for r in rows.values()),
            "percent_within_5mm": round(100.0 * sum(r["within"] for r in rows.values()) / max(len(rows), 1), 2),
            "mean_in_plane_mm": round(float(np.mean([r["in_plane_mm"] for r in found])), 3) if found else None,
            "mean_lateral_mm": round(float(np.mean([r["lateral_mm"] for r in found])), 3) if found else None}


def exact_binomial_comparison(a_within: list[bool], b_within: list[bool]) -> dict:
    """Seed 004: compare two models on the same foramina by the exact binomial test on the
    discordant pairs (A right and B wrong vs A wrong and B right)."""
    from scipy.stats import binomtest

    if len(a_within) != len(b_within):
        raise ValueError("both models must be scored on the same foramina")
    a_only = sum(a and not b for a, b in zip(a_within, b_within))
    b_only = sum(b and not a for a, b in zip(a_within, b_within))
    n = a_only + b_only
    p = binomtest(a_only, n, 0.5).pvalue if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "discordant": n, "p_value": float(p)}


def read_markers(path: Path) -> dict[str, tuple]:
    """A .mrk.json file -> foramen label -> mean RAS of its defined points (a model's unconfirmed
    predictions included: this scores files, whoever wrote them; unnamed points ignored)."""
    from SpineKneeSegLib.annotation.foramen_labels import read_marker_records

    points: dict[str, list] = {}
    for record in read_marker_records(path):
        if record.foramen is not None and record.ras is not None:
            points.setdefault(record.foramen, []).append(record.ras)
    return {label: tuple(np.mean(p, axis=0)) for label, p in points.items()}


def evaluate_levels_cli(args) -> dict:
    import torch
    from spine_levels import evaluate_cases, spine_cases, split
    from SpineKneeSegLib.core.datasets import data_root
    from SpineKneeSegLib.engine.inference import load_network
    from SpineKneeSegLib.engine.weights import resolve_weights
    from SpineKneeSegLib.tasks import TASKS

    weights = resolve_weights(TASKS["lumbar-foramina"], args.weights)
    net = load_network(weights, torch.device("cpu"))
    cases = spine_cases(data_root())
    if args.cases == "validation":
        cases = split(cases)[1]
    spacing = weights.preprocessing.get("in_plane_spacing_mm")
    return evaluate_cases(net, cases, {"spacing_mm": spacing} if spacing else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    levels = sub.add_parser("levels")
    levels.add_argument("--weights")
    levels.add_argument("--cases", choices=("validation", "all"), default="validation")
    levels.add_argument("--json")
    foramina = sub.add_parser("foramina")
    foramina.add_argument("--truth-dir", required=True)
    foramina.add_argument("--pred-dir", required=True)
    foramina.add_argument("--json")
    compare = sub.add_parser("compare")
    compare.add_argument("--a", required=True, help="foramina --json output of model A")
    compare.add_argument("--b", required=True)
    args = parser.parse_args(argv)
    if args.command == "levels":
        result = evaluate_levels_cli(args)
    elif args.command == "foramina":
        rows = {}
        for truth_file in sorted(Path(args.truth_dir).glob("*.mrk.json")):
            pred_file = Path(args.pred_dir) / truth_file.name
            pred = read_markers(pred_file) if pred_file.exists() else {}
            for label, row in foramen_errors(read_markers(truth_file), pred).items():
                rows[f"{truth_file.name}:{label}"] = row
        result = {"summary": summarise_foramina(rows), "foramina": rows}
    else:
        a, b = (json.loads(Path(p).read_text(encoding="utf-8"))["foramina"] for p in (args.a, args.b))
        keys = sorted(set(a) & set(b))
        result = exact_binomial_comparison([a[k]["within"] for k in keys], [b[k]["within"] for k in keys])
    text = json.dumps(result, indent=2)
    if getattr(args, "json", None):
        from SpineKneeSegLib.core.atomic import write_text_atomic

        write_text_atomic(Path(args.json), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
