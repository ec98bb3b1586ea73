"""Keep a level cv run's scored results in the repository (issue 21).

A CPU recipe takes five fold models and a final one at about 50 minutes each in bfloat16 (110 in
float32), more than one session holds, and ``Training/runs`` does not outlive a session. What the
cross-validation needs from a finished fold is small: its held-out scoring (``evaluation.json``),
its external scoring, and which model produced them. ``keep`` copies those into a committed folder laid out like the run
(``folds.json``, ``foldN/evaluation.json``), so ``spine_levels.py cv-report --out`` reads it once
every fold is there, and records each model's SHA256, steps, time and last losses in
``foldN/model.json``. ``--weights`` also copies ``foldN/final.pt`` (2.7 MB a fold), for a folder
kept OUTSIDE the repository: the tree refuses unregistered weights (test_weights), so fold
weights cannot be committed, and a new checkout loses them (session 29 lost every fold model;
re-running fold models on their held-out scans then needs them trained again). A kept folder with
weights is a cv run for those scripts (``--run DIR``).

    python Training/spine_levels.py keep --out Training/runs/levels-ctx-D --to Training/results/levels-ctx-D
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from SpineKneeSegLib.core.atomic import atomic_path, write_text_atomic
from SpineKneeSegLib.engine.weights import load_checkpoint, sha256_of


def model_summary(checkpoint: Path) -> dict:
    """What identifies a trained model and how it was trained, without its weights."""
    meta = load_checkpoint(checkpoint).get("metadata", {})
    losses = meta.get("loss_history", [])  # [step, mean loss over the steps since the one before]
    return {"file": checkpoint.name, "sha256": sha256_of(checkpoint),
            **{k: meta[k] for k in ("steps", "train_seconds", "median_step_s", "device", "fold", "held_out",
                                    "trained_on", "config") if k in meta},
            "last_losses": losses[-3:]}


def keep(run: Path, to: Path, log=print, weights: bool = False) -> list[str]:
    """Copy what each scored fold (and the final model, if trained) of ``run`` left into ``to``,
    with its weights if ``weights`` (never into the repository: see above); folds without an evaluation are skipped.
    Everything is checked before anything is written. Returns what was kept."""
    folds_json = run / "folds.json"
    if not folds_json.exists():
        raise FileNotFoundError(f"{folds_json}: not a cv run (no folds.json)")
    earlier = to / "folds.json"
    if earlier.exists() and json.loads(earlier.read_text())["folds"] != json.loads(folds_json.read_text())["folds"]:
        raise ValueError(f"{earlier}: its folds differ from {folds_json}'s; keep each run in its own folder")
    jobs = []
    for fold_dir in sorted(p for p in run.iterdir() if p.is_dir()):
        final = fold_dir / "final.pt"
        scored = [fold_dir / n for n in ("evaluation.json", "external.json") if (fold_dir / n).exists()]
        if not final.exists() or (not (fold_dir / "evaluation.json").exists() and fold_dir.name != "final"):
            continue
        for src in scored:
            if src.stat().st_mtime < final.stat().st_mtime:  # scored an earlier model of that name
                raise ValueError(f"{src} is older than {final}: score the model again before keeping it")
        jobs.append((fold_dir, final, scored))
    to.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folds_json, earlier)
    kept = []
    for fold_dir, final, scored in jobs:
        dest = to / fold_dir.name
        dest.mkdir(exist_ok=True)
        summary = model_summary(final)
        for src in scored:
            write_text_atomic(dest / src.name, json.dumps(json.loads(src.read_text()), indent=1))
            kept.append(str(dest / src.name))
        if weights:
            with atomic_path(dest / final.name) as tmp:
                shutil.copyfile(final, tmp)
            if sha256_of(dest / final.name) != summary["sha256"]:
                raise OSError(f"{dest / final.name}: the copy's SHA256 differs from {final}'s")
            kept.append(str(dest / final.name))
        write_text_atomic(dest / "model.json", json.dumps(summary, indent=1))
        kept.append(str(dest / "model.json"))
        log(f"kept {fold_dir.name}: {summary['sha256'][:12]}, {summary.get('steps')} steps, "
            f"{summary.get('train_seconds')} s")
    return kept
