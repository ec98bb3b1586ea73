"""Scoring of lumbar level models on held-out scans (issue 21): per case and per field of view
(the whole scan, cut just above L2, cut just below L5), per-level Dice, level identification and
the failure kind, for the anatomical decoding (the product) and for the old clean-up (largest
component per level of the raw labels, v0.1.0's pipeline). Everything runs through the Lib's own
inference and decoding.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.inference import load_network, segment_slices
from SpineKneeSegLib.engine.postprocessing import dice, largest_component_per_label
from SpineKneeSegLib.engine.weights import resolve_weights
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.tasks.spine.level_decoding import DecodingParameters, decode_levels
from SpineKneeSegLib.core.atomic import write_text_atomic

CARD = TASKS["lumbar-foramina"]
N_LEVELS = 5
# ordinal position along the column of each label value: T11 -1, T12 0, L1..L5 1..5
POSITION = {7: -1, 6: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5}
NAME = {-1: "T11", 0: "T12", 1: "L1", 2: "L2", 3: "L3", 4: "L4", 5: "L5"}


def superior_axis(image: Image) -> tuple[int, bool]:
    """(numpy axis closest to patient superior, whether its index increases toward superior)."""
    direction = image.direction  # columns: i, j, k in LPS
    ijk = int(np.argmax(np.abs(direction[2, :])))
    return 2 - ijk, bool(direction[2, ijk] > 0)


def crop_along(image: Image, labels: np.ndarray, axis: int, start: int, stop: int) -> tuple[Image, np.ndarray]:
    """The scan and its labels restricted to indices [start, stop) of numpy ``axis``: a smaller
    field of view of the same physical image (origin moved accordingly)."""
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    corner = [0, 0, 0]
    corner[2 - axis] = start  # ijk order
    origin = image.ijk_to_lps_points([corner])[0]
    cropped = Image(np.ascontiguousarray(image.array[tuple(index)]), image.spacing, tuple(origin),
                    image.direction.copy(), dict(image.meta))
    return cropped, np.ascontiguousarray(labels[tuple(index)])


def field_of_view_variants(image: Image, labels: np.ndarray, margin_px: int = 3) -> dict:
    """{name: (image, labels)}: the whole scan; cut just above L2 (the field of view starts right
    below L1's lowest voxel, so L1 lies wholly outside); cut through L1 (it starts halfway down
    L1: its lower half inside, T12 outside, as in a lumbar scan whose field of view begins at L1);
    cut just below L5 (``margin_px`` below L5's lowest voxel: the sacrum outside)."""
    axis, up_increasing = superior_axis(image)
    out = {"full": (image, labels)}
    n = labels.shape[axis]

    def extent(level):
        idx = np.flatnonzero(np.moveaxis(labels == level, axis, 0).reshape(n, -1).any(1))
        return (idx.min(), idx.max()) if len(idx) else None

    l1, l5 = extent(1), extent(5)
    if l1 is not None:
        out["cut above L2"] = (crop_along(image, labels, axis, 0, l1[0]) if up_increasing
                               else crop_along(image, labels, axis, l1[1] + 1, n))
        mid = (l1[0] + l1[1] + 1) // 2
        out["cut through L1"] = (crop_along(image, labels, axis, 0, mid) if up_increasing
                                 else crop_along(image, labels, axis, mid, n))
    if l5 is not None:
        out["cut below L5"] = (crop_along(image, labels, axis, max(0, l5[0] - margin_px), n) if up_increasing
                               else crop_along(image, labels, axis, 0, min(n, l5[1] + margin_px + 1)))
    return out


def identify(pred: np.ndarray, truth: np.ndarray, image: Image) -> dict:
    """Where each predicted level lies: on which labelled body (T11, T12, L1..L5) or, off every
    labelled body, above or below the labelled column; and the failure kinds."""
    axis, up_increasing = superior_axis(image)
    coords = {}
    for value in POSITION:
        mask = truth == value
        if mask.any():
            coords[value] = float(np.argwhere(mask)[:, axis].mean())
    sign = 1.0 if up_increasing else -1.0  # superior-ness of a numpy index
    top = max(coords.values(), key=lambda c: sign * c) if coords else None
    bottom = min(coords.values(), key=lambda c: sign * c) if coords else None
    where, positions, missing = {}, {}, []
    for k in range(1, N_LEVELS + 1):
        mask = pred == k
        in_truth = bool((truth == k).any())
        if not mask.any():
            where[f"L{k}"] = "missing" if in_truth else "absent (outside the field of view)"
            if in_truth:
                missing.append(k)
            continue
        overlap = np.bincount(truth[mask].astype(np.int64), minlength=8)
        overlap[0] = 0
        if overlap.any():
            position = POSITION[int(overlap.argmax())]
            where[f"L{k}"] = NAME[position]
        else:
            c = sign * float(np.argwhere(mask)[:, axis].mean())
            if top is not None and c > sign * top:
                position, where[f"L{k}"] = 0, "above the labelled bodies"
            elif bottom is not None and c < sign * bottom:
                position, where[f"L{k}"] = 6, "below L5 (sacrum)"
            else:
                position, where[f"L{k}"] = None, "off every body"
        positions[k] = position
    return classify(where, positions, missing)


def classify(where: dict, positions: dict, missing: list) -> dict:
    """Failure kinds from where each predicted level lies: ``positions`` {k: ordinal position of
    its body (T12 0, L1..L5 1..5, below L5 6) or None off every body}, ``missing`` the levels
    present in the scan but not predicted."""
    kinds = ["missing" for _ in missing]
    for k, position in positions.items():
        if position is None:
            kinds.append("misplaced")
        elif position < k:
            kinds.append("shift up")
        elif position > k:
            kinds.append("shift down")
    bodies = [w for w in where.values() if w.startswith(("T1", "L"))]
    if len(bodies) != len(set(bodies)):
        kinds.append("duplicate")
    ok = not kinds
    if kinds and "missing" not in kinds and "duplicate" not in kinds:
        found = [k for k in range(1, N_LEVELS + 1) if where[f"L{k}"].startswith(("L", "T1"))]
        names = [where[f"L{k}"] for k in found]
        pos = [next(p for p, n in NAME.items() if n == name) for name in names]
        if any(b - a > 1 for a, b in zip(pos, pos[1:])):
            kinds.append("gap")
    return {"all_correct": ok, "kinds": sorted(set(kinds)), "where": where}


def score(pred: np.ndarray, truth: np.ndarray, image: Image) -> dict:
    present = [k for k in range(1, N_LEVELS + 1) if (truth == k).any()]
    return {"dice": {f"L{k}": round(dice(pred == k, truth == k), 4) for k in present},
            "identification": identify(pred, truth, image)}


# body-mask thresholds scored for every case, so cv-report can choose one on the other folds
BODY_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8)
# L5's weight in a run's score (DecodingParameters.run_weights: counting from the sacrum), each at
# every body threshold; 1: the seed's equal weights
L5_WEIGHTS = (1.0, 1.5, 2.0, 3.0)


def l5_weighted(weight: float) -> tuple:
    return (1.0,) * (N_LEVELS - 1) + (float(weight),)


@torch.inference_mode()
def run_network(net, weights_pre: dict, image: Image):
    """The product's level network on one scan, its probabilities kept on the input grid."""
    return segment_slices(CARD, image, net, torch.device("cpu"), weights_pre, batch_size=8, keep_probabilities=True)


def fold_models(run: Path, summary: dict):
    """Per fold of a cross-validation run: (fold, held-out case ids, weights, network, the decoder
    settings cv-report chose for that fold on the other folds)."""
    folds = json.loads((run / "folds.json").read_text(encoding="utf-8"))["folds"]
    for f, held_out in enumerate(folds):
        weights = resolve_weights(CARD, run / f"fold{f}" / "final.pt")
        params = DecodingParameters(threshold=summary["body_threshold"]["per_fold"][f],
                                    run_weights=l5_weighted(summary["l5_weight"]["per_fold"][f]))
        yield f, held_out, weights, load_network(weights, torch.device("cpu"), "float32"), params


def held_out_scans(run: Path, summary: dict):
    """Every labelled scan with the fold model that never saw it: (fold, case id, image, true
    labels, weights, network, that fold's decoder settings). FileNotFoundError without the data."""
    from level_column import case_labels, spine_cases
    from SpineKneeSegLib.core.datasets import data_root

    root = data_root()
    if root is None:
        raise FileNotFoundError("no shared data: set SPINEKNEESEG_DATA")
    cases = {c["id"]: c for c in spine_cases(root, log=lambda *_: None)}
    for f, held_out, weights, net, params in fold_models(run, summary):
        for cid in held_out:
            yield f, cid, read_image(cases[cid]["image"]), case_labels(cases[cid]), weights, net, params


def cv_run_parser(description: str, out_help: str):
    """The arguments of a script that re-runs a cross-validation's fold models on their scans."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=Path, required=True, help="the cv run folder (foldN/final.pt, folds.json)")
    parser.add_argument("--summary", type=Path, required=True, help="cv-report's cv_summary.json (decoder per fold)")
    parser.add_argument("--out", type=Path, help=out_help)
    parser.add_argument("--threads", type=int, default=2)
    return parser


@torch.inference_mode()
def evaluate_case(net, weights_pre: dict, image: Image, truth: np.ndarray) -> dict:
    out = run_network(net, weights_pre, image)
    decoded = decode_levels(out.probabilities, image)
    final = largest_component_per_label(decoded.labels)
    old = largest_component_per_label(out.labels)
    at, weighted = {}, {}
    for w in L5_WEIGHTS:
        for t in BODY_THRESHOLDS:
            d = decode_levels(out.probabilities, image, DecodingParameters(threshold=t, run_weights=l5_weighted(w)))
            weighted.setdefault(str(w), {})[str(t)] = {
                **score(largest_component_per_label(d.labels), truth, image),
                "level_confidence": round(d.level_confidence, 4), "end_conflict": round(d.end_conflict, 4)}
        at = weighted[str(1.0)]
    return {"decoded": score(final, truth, image), "old_cleanup": score(old, truth, image),
            "level_confidence": round(decoded.level_confidence, 4), "doubtful": decoded.doubtful,
            "end_conflict": round(decoded.end_conflict, 4),
            "assignment": decoded.assignment(), "network_s": round(out.network_s, 3), "decoded_at": at,
            "decoded_weighted": weighted}


def evaluate_fold(checkpoint: Path, cases: list[dict], out_json: Path, log=print, precision: str = "float32") -> dict:
    """``precision``: the product's --precision (bfloat16: the network under bfloat16 autocast)."""
    from level_column import case_labels

    weights = resolve_weights(CARD, checkpoint)
    net = load_network(weights, torch.device("cpu"), precision)
    results = {}
    for case in cases:
        image = read_image(case["image"])
        truth = case_labels(case)
        results[case["id"]] = {}
        for name, (img, lab) in field_of_view_variants(image, truth).items():
            r = evaluate_case(net, weights.preprocessing, img, lab)
            results[case["id"]][name] = r
            d = r["decoded"]
            log(f"{case['id']:22s} {name:13s} decoded {'ok ' if d['identification']['all_correct'] else 'BAD'} "
                f"{','.join(d['identification']['kinds']) or '-':18s} mean Dice "
                f"{np.mean(list(d['dice'].values())):.3f} conf {r['level_confidence']:.2f} | old "
                f"{'ok' if r['old_cleanup']['identification']['all_correct'] else 'BAD'} "
                f"{','.join(r['old_cleanup']['identification']['kinds'])}")
    evaluation = {"checkpoint": str(checkpoint), "precision": precision, "cases": results}
    write_text_atomic(out_json, json.dumps(evaluation, indent=2))
    return results


# ---- cross-validation report ------------------------------------------------------------------

VARIANTS = ("full", "cut above L2", "cut through L1", "cut below L5")


def mean_level_dice(result: dict) -> float:
    """Mean Dice over the levels of one decoded result (NaN when it has none)."""
    return float(np.mean(list(result["dice"].values()))) if result["dice"] else float("nan")


DEFAULT_BODY_THRESHOLD = DecodingParameters().threshold  # the decoder's own default, where nothing is swept
END_CONFLICT = DecodingParameters().end_conflict_doubtful  # flags on its own, whatever the margin (> 1: off)


def choose_doubtful_threshold(rows: list[tuple[bool, float, float]], default: float = 0.3) -> dict:
    """The level-confidence threshold below which the count is reported doubtful: the one (0.05 ..
    0.60) that best separates the cross-validation's failures from its correct predictions
    (Youden's J: share of failures flagged minus share of correct ones flagged, the end-conflict
    rule counted too; ties: the lower). ``rows``: (correct, confidence, end conflict) of every
    held-out prediction; with no failure, ``default``."""
    failures = [(c, e) for ok, c, e in rows if not ok]
    correct = [(c, e) for ok, c, e in rows if ok]

    def flagged(items, t):
        return sum(c < t or e >= END_CONFLICT for c, e in items)

    if failures and correct:
        candidates = [round(0.05 * i, 2) for i in range(1, 13)]
        j = {t: flagged(failures, t) / len(failures) - flagged(correct, t) / len(correct) for t in candidates}
        threshold = max(candidates, key=lambda t: (round(j[t], 9), -t))
        how = f"best separation of the cross-validation's failures from its correct predictions (J = {j[threshold]:.2f})"
    else:
        threshold, how = default, "no cross-validation failure: the default"
    return {"threshold": threshold, "how": how, "end_conflict": END_CONFLICT,
            "failures_flagged": flagged(failures, threshold), "failures": len(failures),
            "correct_flagged": flagged(correct, threshold), "correct": len(correct),
            "flagged_by_end_conflict": sum(e >= END_CONFLICT for _, _, e in rows)}


def choose_body_threshold(per_case: dict, fold_of: dict, n_folds: int) -> dict:
    """The decoder's body-mask threshold: for each fold, the one with the best mean whole-field
    Dice on the OTHER folds' scans (so no scan is scored at a threshold chosen on it); for the
    shipped model, the best over all folds."""
    def best(ids):
        if not ids:  # a partial report's only scored fold: nothing else to choose on, so the default
            return DEFAULT_BODY_THRESHOLD, {}
        means = {t: np.mean([mean_level_dice(per_case[c]["full"]["decoded_at"][str(t)]) for c in ids])
                 for t in BODY_THRESHOLDS}
        return max(means, key=means.get), means

    if not all("decoded_at" in r["full"] for r in per_case.values()):
        return {"per_fold": [DEFAULT_BODY_THRESHOLD] * n_folds, "final": DEFAULT_BODY_THRESHOLD,
                "how": "not swept: the default"}
    per_fold = [best([c for c in per_case if fold_of[c] != f])[0] for f in range(n_folds)]
    final, means = best(list(per_case))
    return {"per_fold": per_fold, "final": final, "how": "best mean Dice on the other folds (per fold); "
            "on all folds (shipped)", "mean_dice_by_threshold": {str(t): round(float(m), 4) for t, m in means.items()}}


def choose_l5_weight(per_case: dict, fold_of: dict, n_folds: int, thresholds: dict) -> dict:
    """The decoder's L5 run weight: for each fold, the one that names all five levels right on
    the most held-out predictions of the OTHER folds (whole field and both cuts, each scan at its
    fold's body threshold; ties: the smaller weight, the seed's 1 first); for the shipped model,
    the same over all folds at the shipped threshold."""
    if not all("decoded_weighted" in r["full"] for r in per_case.values()):
        return {"per_fold": [1.0] * n_folds, "final": 1.0, "how": "not swept: the seed's equal weights"}

    def right(ids, t_of):
        return {w: sum(r[v]["decoded_weighted"][str(w)][str(t_of(c))]["identification"]["all_correct"]
                       for c in ids for v, r in ((v, per_case[c]) for v in VARIANTS) if v in r)
                for w in L5_WEIGHTS}

    def best(counts):
        return max(L5_WEIGHTS, key=lambda w: (counts[w], -w))

    per_fold = [best(right([c for c in per_case if fold_of[c] != f], lambda c, f=f: thresholds["per_fold"][f]))
                for f in range(n_folds)]
    overall = right(list(per_case), lambda c: thresholds["final"])
    return {"per_fold": per_fold, "final": best(overall),
            "how": "most predictions named right on the other folds (per fold); on all folds (shipped)",
            "right_by_weight": {str(w): n for w, n in overall.items()},
            "predictions": sum(v in r for r in per_case.values() for v in VARIANTS)}


def cv_report(run: Path, partial: bool = False) -> dict:
    """``partial``: report the folds scored so far (a recipe trained across sessions); the decoder's
    choices for each are still made on the other scored folds only."""
    folds = json.loads((run / "folds.json").read_text(encoding="utf-8"))
    per_case, fold_of, scored = {}, {}, []
    for f, ids in enumerate(folds["folds"]):
        path = run / f"fold{f}" / "evaluation.json"
        if not path.exists():
            if partial:
                continue
            raise FileNotFoundError(f"{path}: fold {f} not evaluated yet")
        scored.append(f)
        for cid, result in json.loads(path.read_text(encoding="utf-8"))["cases"].items():
            per_case[cid], fold_of[cid] = result, f
    if not per_case:
        raise FileNotFoundError(f"{run}: no fold evaluated yet")
    summary = {"cases": len(per_case), "folds": len(folds["folds"]), "folds_scored": scored,
               "duplicates": folds["duplicates"],
               "label_notes": folds["label_notes"],
               "body_threshold": choose_body_threshold(per_case, fold_of, len(folds["folds"]))}
    summary["l5_weight"] = choose_l5_weight(per_case, fold_of, len(folds["folds"]), summary["body_threshold"])
    for cid, r in per_case.items():  # score each scan at the threshold and weight chosen on the other folds
        t = str(summary["body_threshold"]["per_fold"][fold_of[cid]])
        w = str(summary["l5_weight"]["per_fold"][fold_of[cid]])
        for v in r.values():
            if "decoded_at" in v:
                chosen = v["decoded_weighted"][w][t] if "decoded_weighted" in v else v["decoded_at"][t]
                v["decoded_default"] = v["decoded"]
                v["decoded"] = {k: chosen[k] for k in ("dice", "identification")}
                v["level_confidence"] = chosen["level_confidence"]
                v["end_conflict"] = chosen.get("end_conflict", 0.0)
    for method in ("decoded", "old_cleanup"):
        for variant in VARIANTS:
            rs = [r[variant][method] for r in per_case.values() if variant in r]
            if not rs:  # evaluated before this field of view was scored
                continue
            kinds: dict[str, int] = {}
            for r in rs:
                for k in r["identification"]["kinds"]:
                    kinds[k] = kinds.get(k, 0) + 1
            levels = {f"L{k}": float(np.mean([r["dice"][f"L{k}"] for r in rs if f"L{k}" in r["dice"]]))
                      for k in range(1, 6) if any(f"L{k}" in r["dice"] for r in rs)}
            summary[f"{method}/{variant}"] = {
                "scans": len(rs), "all_levels_right": sum(r["identification"]["all_correct"] for r in rs),
                "failed": sorted(cid for cid, r in per_case.items()
                                 if variant in r and not r[variant][method]["identification"]["all_correct"]),
                "mean_dice": round(float(np.mean([mean_level_dice(r) for r in rs])), 4),
                "mean_dice_when_right": round(float(np.mean([mean_level_dice(r) for r in rs
                                                             if r["identification"]["all_correct"]] or [np.nan])), 4),
                "per_level_dice": {k: round(v, 4) for k, v in levels.items()}, "failure_kinds": kinds}
    rows = [(r[v]["decoded"]["identification"]["all_correct"], r[v]["level_confidence"], r[v].get("end_conflict", 0.0))
            for r in per_case.values() for v in VARIANTS if v in r]
    summary["doubtful_threshold"] = choose_doubtful_threshold(rows)
    t = summary["doubtful_threshold"]["threshold"]
    table = ["| case | fold | L1 | L2 | L3 | L4 | L5 | all five right | failure | confidence | cut above L2 | "
             "cut through L1 | cut below L5 | old clean-up |", "|" + "---|" * 14]
    for cid in sorted(per_case):
        r = per_case[cid]
        d = r["full"]["decoded"]

        def verdict(v):
            if v not in r:
                return "-"
            ident = r[v]["decoded"]["identification"]
            flag = " (doubtful)" if r[v]["level_confidence"] < t or r[v].get("end_conflict", 0) >= END_CONFLICT else ""
            return ("yes" if ident["all_correct"] else "NO " + ",".join(ident["kinds"])) + flag

        old = r["full"]["old_cleanup"]["identification"]
        table.append(f"| {cid} | {fold_of[cid]} | " + " | ".join(f"{d['dice'].get(f'L{k}', float('nan')):.3f}"
                                                                  for k in range(1, 6)) +
                     f" | {'yes' if d['identification']['all_correct'] else 'NO'} | "
                     f"{', '.join(f'{k}: {w}' for k, w in d['identification']['where'].items() if w != k) or '-'}"
                     f" | {r['full']['level_confidence']:.2f} | {verdict('cut above L2')} | "
                     f"{verdict('cut through L1')} | {verdict('cut below L5')} | "
                     f"{'yes' if old['all_correct'] else 'NO ' + ','.join(old['kinds'])} |")
    summary["table"] = "\n".join(table)
    write_text_atomic(run / "cv_summary.json", json.dumps(summary, indent=2))
    return summary
