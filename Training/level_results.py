"""Keep a level cv run's scored results in the repository (issue 21).

A CPU recipe takes five fold models and a final one at about 50 minutes each in bfloat16 (110 in
float32), more than one session holds, and ``Training/runs`` does not outlive a session. What the
cross-validation needs from a finished fold is small: its held-out scoring (``evaluation.json``),
its external scoring, and which model produced them. ``keep`` copies those into a committed folder laid out like the run
(``folds.json``, ``foldN/evaluation.json``), so ``spine_levels.py cv-report --out`` reads it once
every fold is there, and records each model's SHA256, steps, time and last losses in
``foldN/model.json``. ``--weights`` also keeps ``foldN/final.pt`` (2.7 MB a fold), registered in
``foldN/registry.json`` (SHA256, size) with a fold card ``foldN/card.md``: the tree refuses
unregistered weights (test_weights, test_module_static), and without the weights a new checkout
cannot re-run a fold model on its held-out scans (session 29 lost every fold model and had to
train them again). Fold weights are never bundled into the extension (not in CMakeLists, not in
the module's registry): they are study material, not releases. A kept folder with weights is a cv
run for the scripts that need out-of-fold predictions (``--run DIR``).

    python Training/spine_levels.py keep --out Training/runs/levels-ctx-D --to Training/results/levels-ctx-D
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from SpineKneeSegLib.core.atomic import atomic_path, write_text_atomic
from SpineKneeSegLib.engine.weights import load_checkpoint, register_model, sha256_of
from level_eval import mean_level_dice


def model_summary(checkpoint: Path) -> dict:
    """What identifies a trained model and how it was trained, without its weights."""
    meta = load_checkpoint(checkpoint).get("metadata", {})
    losses = meta.get("loss_history", [])  # [step, mean loss over the steps since the one before]
    return {"file": checkpoint.name, "sha256": sha256_of(checkpoint),
            **{k: meta[k] for k in ("steps", "train_seconds", "median_step_s", "device", "fold", "held_out",
                                    "trained_on", "config") if k in meta},
            "last_losses": losses[-3:], "context_heads_kept": "context_heads" in meta}


def held_out_figures(evaluation: dict) -> tuple[int, int, float]:
    """(scans named right, scans, mean per-level Dice) on the whole field of view, at the
    evaluation's default decoding."""
    decoded = [c["full"]["decoded"] for c in evaluation["cases"].values()]
    dice = [mean_level_dice(d) for d in decoded]
    return sum(d["identification"]["all_correct"] for d in decoded), len(decoded), sum(dice) / len(dice)


def fold_card(run: Path, fold_name: str, summary: dict, evaluation: dict | None, scans: int) -> str:
    """A short card for a kept fold model: what it is, what it saw, what it scored, and that it is
    not a release."""
    lines = [f"# {run.name}/{fold_name}: a cross-validation fold model (not a release)", "",
             "Kept so that the cross-validation's out-of-fold predictions can be made again (refiner inputs,",
             "nested recipe choices, error analyses). Not for use on patients; not bundled with the extension.",
             "", f"- SHA256: `{summary['sha256']}`",
             f"- trained on {scans - len(summary.get('held_out', []))} of {scans} scans for {summary.get('steps')} steps, "
             f"{summary.get('train_seconds')} s on {summary.get('device')}",
             f"- held out: {', '.join(summary.get('held_out', [])) or 'none (trained on every scan)'}"]
    if evaluation is not None:
        right, held, dice = held_out_figures(evaluation)
        lines.append(f"- held-out scans, whole field of view, default decoding: {right} of {held} named right, "
                     f"mean per-level Dice {dice:.3f} (every setting in evaluation.json)")
    if summary.get("context_heads_kept"):
        lines.append("- its context heads (\"above L1\", \"below L5\") are kept in the metadata: "
                     "level_column.with_context_heads rebuilds the 7-output training network")
    lines += ["- recipe: `model.json`'s config; commands in Training/README.md",
              "- data: ../shared/data/spine (MyoSegmenTUM CC BY 4.0; Zukić as published; see that README)", ""]
    return "\n".join(lines)


def keep(run: Path, to: Path, log=print, weights: bool = False) -> list[str]:
    """Copy what each scored fold (and the final model, if trained) of ``run`` left into ``to``,
    with its weights, registered with a fold card, if ``weights``; folds without an evaluation are skipped.
    Everything is checked before anything is written. Returns what was kept."""
    folds_json = run / "folds.json"
    if not folds_json.exists():
        raise FileNotFoundError(f"{folds_json}: not a cv run (no folds.json)")
    earlier = to / "folds.json"
    if earlier.exists() and (json.loads(earlier.read_text(encoding="utf-8"))["folds"]
                             != json.loads(folds_json.read_text(encoding="utf-8"))["folds"]):
        raise ValueError(f"{earlier}: its folds differ from {folds_json}'s; keep each run in its own folder")
    scans = sum(len(f) for f in json.loads(folds_json.read_text(encoding="utf-8"))["folds"])
    jobs = []
    for fold_dir in sorted(p for p in run.iterdir() if p.is_dir()):
        final = fold_dir / "final.pt"
        scored = [fold_dir / n for n in ("evaluation.json", "external.json") if (fold_dir / n).exists()]
        if not final.exists() or (not (fold_dir / "evaluation.json").exists() and fold_dir.name != "final"):
            continue
        for src in scored:
            if src.stat().st_mtime < final.stat().st_mtime:  # scored an earlier model of that name
                raise ValueError(f"{src} is older than {final}: score the model again before keeping it")
        earlier_weights = to / fold_dir.name / final.name
        if not weights and earlier_weights.exists() and sha256_of(earlier_weights) != sha256_of(final):
            raise ValueError(f"{earlier_weights} is another model than {final}: keep with --weights to replace it")
        jobs.append((fold_dir, final, scored))
    to.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folds_json, earlier)
    kept = []
    for fold_dir, final, scored in jobs:
        dest = to / fold_dir.name
        dest.mkdir(exist_ok=True)
        summary = model_summary(final)
        for src in scored:
            write_text_atomic(dest / src.name, json.dumps(json.loads(src.read_text(encoding="utf-8")), indent=1))
            kept.append(str(dest / src.name))
        if weights:
            with atomic_path(dest / final.name) as tmp:
                shutil.copyfile(final, tmp)
            if sha256_of(dest / final.name) != summary["sha256"]:
                raise OSError(f"{dest / final.name}: the copy's SHA256 differs from {final}'s")
            evaluation = fold_dir / "evaluation.json"
            write_text_atomic(dest / "card.md", fold_card(run, fold_dir.name, summary, json.loads(
                evaluation.read_text(encoding="utf-8")) if evaluation.exists() else None, scans))
            register_model(dest / final.name, "lumbar-levels", "0.0.0", "card.md",
                           f"cross-validation fold model {run.name}/{fold_dir.name}; not a release", root=dest)
            kept += [str(dest / final.name), str(dest / "card.md"), str(dest / "registry.json")]
        write_text_atomic(dest / "model.json", json.dumps(summary, indent=1))
        kept.append(str(dest / "model.json"))
        log(f"kept {fold_dir.name}: {summary['sha256'][:12]}, {summary.get('steps')} steps, "
            f"{summary.get('train_seconds')} s")
    return kept
