"""Ship a trained checkpoint: copy it into SpineKneeSeg/Resources/Models, write its model card from
the validation figures measured in training, and register it (SHA256) in registry.json.

    python Training/export_model.py --run Training/runs/spine-levels --model lumbar-levels --version 0.1.0
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from SpineKneeSegLib.engine.models import build_network, count_parameters  # noqa: E402
from modelcard import publish, render
from SpineKneeSegLib.engine.weights import load_checkpoint  # noqa: E402

DATA_SOURCES = {
    "lumbar-levels": (
        "- MyoSegmenTUM spine (Burian et al., BMC Musculoskelet Disord 20:152, 2019): 44 T1 FFE "
        "(water-fat) sagittal lumbar MRI with L1..L5 body labels; article CC BY 4.0, data redistributed "
        "in the FastCleverSeg repository (GPL-3.0).\n"
        "- Zukić et al. (Comput Graph Forum 33:190, 2014; Zenodo 22304): 10 T2 TSE 1.5 T cases with "
        "L1..L5 (+ T12, T11 used as background negatives); redistributed in FastCleverSeg (GPL-3.0).\n"
        "- As converted in ../shared/data: 1 x 1 mm in-plane, 4 mm slices; laterality of the source "
        "volumes is unknown (k set to run toward patient right)."),
}


def _identification(result: dict) -> str:
    if result["all_correct"]:
        return "yes"
    parts = [f"L{a} on L{b}" for a, b in result["shifts"]]
    parts += [f"{result[k]} {k}" for k in ("missing", "misplaced") if result.get(k)]
    return "no: " + ", ".join(parts)


def model_card(model: str, version: str, checkpoint: dict, metrics: dict, history: list[dict]) -> str:
    meta = checkpoint["metadata"]
    cfg = meta.get("config", {})
    net = build_network(checkpoint["network"]["factory"], checkpoint["network"]["config"])
    per_level = metrics["per_level_dice"]
    cases = metrics["cases"]
    rows = "\n".join(f"| {cid} | " + " | ".join(f"{c['dice'][f'L{k}']:.3f}" for k in range(1, 6)) +
                     f" | {_identification(c['identification'])} |" for cid, c in cases.items())
    epochs = len(history)
    intro = """**Status: starter model**, trained on CPU in one session on 46 scans; validated on 8 held-out
scans. Not a medical device; not validated clinically."""
    sections = [
        ("What it does", f"""Task `lumbar-foramina`, level model: segments the five lumbar vertebral bodies by level
(label 1..5 = L1..L5) in sagittal lumbar MRI (T1 or T2). Network: seed 004's MultiNet
(`{checkpoint['network']['factory']}`, {json.dumps(checkpoint['network']['config'])}), {count_parameters(net):,}
parameters; 3 adjacent sagittal slices in, 5 sigmoid channels out."""),
        ("Data", f"""{DATA_SOURCES.get(model, '')}

Split (fixed, by case): validation = {', '.join(meta.get('validation_cases', []))}; every other
case of the two datasets is training (46 cases). Nothing was tuned on any other data."""),
        ("Preprocessing", f"""Canonical sagittal orientation (slices toward patient right, rows inferior, columns posterior),
in-plane resampling to {cfg.get('spacing_mm')} mm (slices kept), per-volume z-score over the
foreground, 3-slice context (edge slices padded with empty slices). Post-processing: largest
26-connected component per level."""),
        ("Training", f"""Loss `{cfg.get('loss')}` (seed 004's per-channel Dice weighted by inverse label frequency),
Adam lr {cfg.get('lr')}, batch {cfg.get('batch_size')} random {cfg.get('crop')}x{cfg.get('crop')} crops (80 % centred
near labelled bone); augmentation: rotation about the left-right axis within
+-{cfg.get('max_rotation_deg')} deg, +-10 % scale, smooth non-linear warp ({cfg.get('warp_px')} px), random
piecewise-linear contrast remapping (30 % inverted) with gain/offset so one model serves T1 and
T2, noise N(0, {cfg.get('noise_sd')}); seed {cfg.get('seed')}. Early stopping on validation mean Dice (patience
{cfg.get('patience')}); best epoch {meta.get('epoch')} of {epochs} run (stopped by the session's
time budget, not by early stopping). The checkpoint was *selected* on the same 8 validation cases
it is reported on, so the figures below are mildly optimistic; there is no separate test set."""),
        ("Validation (held-out cases, measured by Training/spine_levels.py with the Lib's inference)",
         f"""Mean per-level Dice: **{metrics['mean_dice']:.3f}** (L1 {per_level['L1']:.3f}, L2 {per_level['L2']:.3f},
L3 {per_level['L3']:.3f}, L4 {per_level['L4']:.3f}, L5 {per_level['L5']:.3f}).
Every level identified correctly (largest component on its own body): **{metrics['all_levels_identified']} of
{len(cases)}** cases.

| case | L1 | L2 | L3 | L4 | L5 | all levels right |
|---|---|---|---|---|---|---|
{rows}"""),
        ("Known limits", """- 8 validation cases from the same two sources as training: the figures say little about other
  scanners, protocols, pathology (fractures, scoliosis, implants) or children.
- Trained on 4 mm sagittal slices at 1 mm in-plane; other slice thicknesses are untested.
- Transitional anatomy (4 or 6 lumbar-type vertebrae) is not modelled: the pipeline flags it from
  this model's raw output (L5 missing below L4, or one level on two vertebrae) and never relabels.
- Laterality in the training data is unknown; it does not matter for level labels, but foramen
  sides come from the input's direction matrix, not from this model.
- No foramen model is shipped: foramen markers are estimated from these levels."""),
        ("Licence of the data", f"""MyoSegmenTUM: CC BY 4.0 (article), data as published; Zukić: as published by the authors; both
as redistributed in FastCleverSeg under GPL-3.0. Cite the sources above when using this model.

Generated {time.strftime('%Y-%m-%d')} by Training/export_model.py from the training run's own
validation figures."""),
    ]
    return render(f"{model} v{version}", sections, intro)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    args = parser.parse_args(argv)
    run = Path(args.run)
    checkpoint = load_checkpoint(run / "best.pt")
    trained_on = checkpoint.get("metadata", {}).get("trained_on", "")
    if checkpoint.get("model") != "labels" and "manifest" not in trained_on:
        print(f"refusing to ship {run / 'best.pt'}: a {checkpoint.get('model')} model trained on "
              f"{trained_on or 'unknown data'} only; foramen weights need real foramen labels", file=sys.stderr)
        return 2
    metrics = json.loads((run / "best_metrics.json").read_text(encoding="utf-8"))
    import torch

    history = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["state"]["history"]
    entry = publish(args.model, args.version, model_card(args.model, args.version, checkpoint, metrics, history),
                    f"starter {args.model}: validation mean Dice {metrics['mean_dice']:.3f}", run / "best.pt")
    print(f"registered {entry.file} sha256 {entry.sha256}; card {entry.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
