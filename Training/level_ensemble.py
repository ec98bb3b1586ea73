"""An ensemble of whole-column level recipes trained on the same folds (issue 21): each fold's models
(and the final models) combined into one checkpoint whose probabilities are the members' mean
(`SpineKneeSegLib.engine.models.MeanOf`), laid out as a cv run that `spine_levels.py cv
--evaluate-only`, `cv-report` and `ship` read like any other.

    python Training/level_ensemble.py --member RUN/D/D --member RUN/Dseed1/Dseed1 --out RUN/D2

Members must share folds (refused otherwise). The run's recipe (folds.json "config") is the
members' recipe with each setting that differs listed per member (e.g. "seed": [0, 1]); the final
model carries the same, so ship's recipe check holds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from SpineKneeSegLib.engine.weights import load_checkpoint, save_ensemble
from SpineKneeSegLib.core.atomic import write_text_atomic


def merged_config(configs: list[dict]) -> dict:
    """One recipe for several: a setting the members share is kept, one that differs becomes the
    list of the members' values (in member order)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return {k: configs[0].get(k) if all(c.get(k) == configs[0].get(k) for c in configs)
            else [c.get(k) for c in configs] for k in keys}


def ensemble_metadata(checkpoints: list[dict]) -> dict:
    """What ship and the card read from a final or fold model, for the ensemble: the merged recipe,
    the members' training seconds summed, the rest of the first member's metadata."""
    metas = [c.get("metadata", {}) for c in checkpoints]
    per_member = ("config", "train_seconds", "loss_history", "median_step_s")  # kept per member by save_ensemble
    return {**{k: v for k, v in metas[0].items() if k not in per_member},
            "config": merged_config([m.get("config", {}) for m in metas]),
            "train_seconds": sum(m.get("train_seconds", 0) for m in metas), "ensemble_of": len(metas)}


def make_ensemble_run(members: list[Path], out: Path) -> list[Path]:
    """Write out/folds.json and out/fold*/final.pt (+ out/final/final.pt when every member has
    one); returns the checkpoints written."""
    folds = [json.loads((m / "folds.json").read_text(encoding="utf-8")) for m in members]
    for m, f in zip(members[1:], folds[1:]):
        if f["folds"] != folds[0]["folds"]:
            raise SystemExit(f"{m}: its folds differ from {members[0]}'s; an ensemble's cross-validation "
                             "needs the same folds")
    written = []
    models = [f"fold{k}" for k in range(len(folds[0]["folds"]))]
    if all((m / "final" / "final.pt").exists() for m in members):
        models.append("final")
    for name in models:
        paths = [m / name / "final.pt" for m in members]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise SystemExit(f"{missing[0]}: missing; every member needs every fold model")
        target = out / name / "final.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_ensemble(target, paths, "sigmoid", ensemble_metadata([load_checkpoint(p) for p in paths]))
        written.append(target)
    merged = {**folds[0], "config": merged_config([f["config"] for f in folds]), "members": [str(m) for m in members]}
    write_text_atomic(out / "folds.json", json.dumps(merged, indent=2))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member", type=Path, action="append", required=True, help="a cv run (folds.json, fold*/)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if len(args.member) < 2:
        parser.error("an ensemble needs at least two --member runs")
    for path in make_ensemble_run(args.member, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
