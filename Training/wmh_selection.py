"""Choose the lesion decoder (probability threshold, minimum lesion volume; one rule for thin and
one for thick slices) for lesion F1, never on the case being scored, and tabulate a
leave-one-case-out run (issue 22).

    python Training/wmh_selection.py --run Training/runs/brain-wmh-v3-ft [--split-mm 2]

For each left-out case the rules are chosen on the other cases' left-out probabilities (saved by
``brain_wmh.py loo``) and the case is scored with them; the rules chosen on every case are what
the shipped checkpoint carries. The decoder itself is the Lib's (``lesions.decode_lesions``), the
one ``run`` uses.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from SpineKneeSegLib.tasks.brain.lesions import (  # noqa: E402
    DecodingRule,
    decode_lesions,
    label_lesions,
)
from SpineKneeSegLib.core.atomic import write_text_atomic  # noqa: E402
from wmh_metrics import all_metrics  # noqa: E402

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))
MIN_VOLUMES_MM3 = (0.0, 2.0, 4.0, 6.0, 10.0, 15.0, 25.0)


def load_views(run: Path, cfg) -> dict:
    """{case: {view: (probabilities uint8, truth, spacing ijk)}} from a LOO run's folds."""
    from brain_wmh import brain_cases, eval_views
    from SpineKneeSegLib.core.datasets import data_root

    out = {}
    for case in brain_cases(data_root()):
        saved = run / f"fold-{case['id']}" / "probabilities.npz"
        if not saved.exists():
            continue
        probs = np.load(saved)
        out[case["id"]] = {name: (probs[name], truth > 0, img.spacing) for name, img, truth, _ in eval_views(case, cfg)}
    return out


def f1_grid(views: dict) -> dict:
    """{(case, view): array (thresholds, min volumes) of lesion F1}. One labelling per threshold:
    dropping lesions below a volume equals ``decode_lesions`` with that minimum (checked in
    Testing/test_brain_training.py)."""
    grid = {}
    for case, per_view in views.items():
        for view, (probs, truth, spacing) in per_view.items():
            tc, tn = label_lesions(truth, 26)
            scores = np.zeros((len(THRESHOLDS), len(MIN_VOLUMES_MM3)))
            for a, t in enumerate(THRESHOLDS):
                pc, pn = label_lesions(decode_lesions(probs, spacing, DecodingRule(t, 0.0)), 26)
                volume = np.bincount(pc.ravel(), minlength=pn + 1) * float(np.prod(spacing))
                both = (pc > 0) & (tc > 0)
                pairs = np.unique(np.stack([pc[both], tc[both]], 1), axis=0) if both.any() else np.zeros((0, 2), int)
                for b, v in enumerate(MIN_VOLUMES_MM3):
                    keep = volume >= v
                    kept = pairs[keep[pairs[:, 0]]]
                    n_pred = int(keep[1:].sum())
                    recall = len(np.unique(kept[:, 1])) / tn if tn else 1.0
                    precision = len(np.unique(kept[:, 0])) / n_pred if n_pred else 1.0
                    scores[a, b] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            grid[(case, view)] = scores
    return grid


def view_slice_mm(views: dict, view: str) -> float:
    return float(max(next(iter(views.values()))[view][2]))


def choose_rules(grid: dict, views: dict, cases: list[str], split_mm: float | None) -> list[DecodingRule]:
    """Best mean lesion F1 over ``cases`` (all their views); with ``split_mm`` one rule for views
    whose thickest voxel side is <= split_mm and one for thicker ones."""
    names = list(next(iter(views.values())))
    groups = ([(split_mm, [v for v in names if view_slice_mm(views, v) <= split_mm]),
               (None, [v for v in names if view_slice_mm(views, v) > split_mm])] if split_mm else [(None, names)])
    rules = []
    for limit, group in groups:
        if not group:
            continue
        mean = np.mean([grid[(c, v)] for c in cases for v in group], axis=0)
        a, b = np.unravel_index(int(np.argmax(mean)), mean.shape)  # first best: lowest threshold, smallest size
        rules.append(DecodingRule(THRESHOLDS[a], MIN_VOLUMES_MM3[b], limit))
    return rules


def score(views: dict, rules_for_case: dict) -> dict:
    """{case: {view: metrics}} with each case decoded by its own (not-chosen-on-it) rules."""
    from SpineKneeSegLib.tasks.brain.lesions import rule_for

    table = {}
    for case, per_view in views.items():
        table[case] = {}
        for view, (probs, truth, spacing) in per_view.items():
            rule = rule_for(rules_for_case[case], max(spacing))
            pred = decode_lesions(probs, spacing, rule)
            m = all_metrics(pred, truth, tuple(spacing[::-1]))
            table[case][view] = {**m["wmh2017"], "f3": m["seed002"]["f3"], "rule": rule.__dict__,
                                 "brackets": m["seed002"]["brackets"]}
    return table


def summarise(table: dict) -> dict:
    views = list(next(iter(table.values())))
    out = {}
    for v in views:
        rows = [table[c][v] for c in table]
        brackets = {}
        for name in rows[0]["brackets"]:
            n = sum(r["brackets"][name]["lesions"] for r in rows)
            brackets[name] = {"lesions": n,
                              "recall_any_overlap": sum(r["brackets"][name]["any_overlap"] for r in rows) / n if n else None,
                              "recall_over_60pct": sum(r["brackets"][name]["detected"] for r in rows) / n if n else None}
        out[v] = {"dice": float(np.mean([r["dice"] for r in rows])),
                  "lesion_f1": float(np.mean([r["lesion_f1"] for r in rows])),
                  "lesion_recall": float(np.mean([r["lesion_recall"] for r in rows])),
                  "hd95_mm": float(np.median([r["hd95_mm"] for r in rows])),
                  "avd_percent": float(np.mean([r["avd_percent"] for r in rows])),
                  "brackets_pooled": brackets}
    return out


def report(run: Path, split_mm: float | None = 2.0) -> dict:
    from brain_wmh import Config

    cfg_dict = json.loads((run / "loo.json").read_text(encoding="utf-8")).get("config", {})
    cfg = Config(**{k: v for k, v in cfg_dict.items() if k in Config.__dataclass_fields__})
    views = load_views(run, cfg)
    cases = sorted(views)
    grid = f1_grid(views)
    nested = {c: choose_rules(grid, views, [o for o in cases if o != c], split_mm) for c in cases}
    plain = {c: [DecodingRule()] for c in cases}
    result = {"split_mm": split_mm,
              "nested_rules": {c: [r.__dict__ for r in rules] for c, rules in nested.items()},
              "rules_all_cases": [r.__dict__ for r in choose_rules(grid, views, cases, split_mm)],
              "nested": score(views, nested), "plain_0.5": score(views, plain)}
    result["summary"] = {"nested": summarise(result["nested"]), "plain_0.5": summarise(result["plain_0.5"])}
    name = f"selection{'-split' + format(split_mm, 'g') if split_mm else '-single'}.json"
    write_text_atomic(run / name, json.dumps(result, indent=2, default=float))
    return result


DECODER_MARGIN = 0.01  # mean lesion F1 the chosen rules must gain over the plain cut to ship


def shipped_decoder(result: dict) -> str:
    """"nested" (rules chosen by leave-one-case-out) when it beats the plain 0.5 cut by more than
    DECODER_MARGIN on the mean lesion F1 over all slice thicknesses in that same leave-one-case-out,
    else "plain_0.5": two more parameters must earn their place (a tie of 0.3233 vs 0.3226 would
    have shipped a 0.85 threshold and a 25 mm3 minimum that drop the small lesions)."""
    def mean_f1(who):
        return float(np.mean([v["lesion_f1"] for v in result["summary"][who].values()]))
    return "nested" if mean_f1("nested") > mean_f1("plain_0.5") + DECODER_MARGIN else "plain_0.5"


def shipped_rules(result: dict) -> list[dict]:
    return result["rules_all_cases"] if shipped_decoder(result) == "nested" else [DecodingRule().__dict__]


def markdown(result: dict, who: str | None = None) -> str:
    """Per-case table, means and pooled per-bracket recall for decoder ``who`` (default: the one
    that would ship), the other decoder's lesion F1 in brackets."""
    who = who or shipped_decoder(result)
    other = "plain_0.5" if who == "nested" else "nested"
    lines = [f"Decoder: {'rules chosen on the other cases' if who == 'nested' else 'the plain 0.5 cut'} "
             f"(in brackets: lesion F1 with {'the plain 0.5 cut' if who == 'nested' else 'rules chosen on the other cases'}).",
             "", "| case | slices | rule (threshold, min mm3) | Dice | lesion recall | lesion F1 | HD95 mm | AVD % | "
             "true / predicted lesions |", "|---|---|---|---|---|---|---|---|---|"]
    for case, per_view in result[who].items():
        for view, m in per_view.items():
            alt = result[other][case][view]
            lines.append(f"| {case} | {view} | {m['rule']['threshold']:.2f}, {m['rule']['min_volume_mm3']:g} | "
                         f"{m['dice']:.3f} | {m['lesion_recall']:.3f} | {m['lesion_f1']:.3f} ({alt['lesion_f1']:.3f}) | "
                         f"{m['hd95_mm']:.1f} | {m['avd_percent']:.0f} | {m['true_lesions']} / {m['predicted_lesions']} |")
    lines += ["", "| slices | decoder | Dice | lesion recall | lesion F1 | HD95 mm (median) | AVD % |",
              "|---|---|---|---|---|---|---|"]
    for name in ("nested", "plain_0.5"):
        for view, s in result["summary"][name].items():
            lines.append(f"| {view} | {name} | {s['dice']:.3f} | {s['lesion_recall']:.3f} | {s['lesion_f1']:.3f} | "
                         f"{s['hd95_mm']:.1f} | {s['avd_percent']:.0f} |")
    names = list(next(iter(result["summary"][who].values()))["brackets_pooled"])
    lines += ["", f"Lesion recall per size bracket (voxels on the evaluated grid), all cases pooled, {who}: "
              "any overlap / > 60 % found (seed 002)", "",
              "| slices | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for view, s in result["summary"][who].items():
        cells = [f"{b['recall_any_overlap']:.2f} / {b['recall_over_60pct']:.2f} (n={b['lesions']})"
                 if b["lesions"] else "- (n=0)" for b in s["brackets_pooled"].values()]
        lines.append(f"| {view} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--split-mm", type=float, default=2.0, help="0: one rule for every slice thickness")
    args = parser.parse_args(argv)
    result = report(args.run, args.split_mm or None)
    print(markdown(result))
    print("rules chosen on all cases:", json.dumps(result["rules_all_cases"]))
    print(f"would ship: {shipped_decoder(result)} -> {json.dumps(shipped_rules(result))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
