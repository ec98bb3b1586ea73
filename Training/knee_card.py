"""Knee-bones model card and ``ship`` (copy the weights, write the card, register the SHA256)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from knee_data import ALL_ANATOMIES, HELD_OUT, TASK
from knee_eval import BONE_NAMES
from knee_synth import SynthConfig
from modelcard import publish, render

def _series_table(evaluation: dict) -> str:
    rows = "\n".join(
        f"| {r['series']} | " + " | ".join(f"{r.get(b, float('nan')):.3f} ({r.get(b + '_raw', float('nan')):.3f})"
                                          for b in BONE_NAMES.values()) + " |" for r in evaluation["series"])
    mean = evaluation["mean_dice"]
    means = " | ".join(f"{mean[b]:.3f}" for b in BONE_NAMES.values())
    return f"| series | femur | tibia | fibula | patella |\n|---|---|---|---|---|\n{rows}\n| **mean** | {means} |"


MAP_SOURCES = {"spl-atlas-labels.nrrd": "SPL Knee Atlas, Richolt/Jakab/Kikinis, Apache-2.0",
               "pymskt-dess-labels.nrrd": "pymskt, Gatti et al., MIT; a sagittal 3D DESS right knee"}


def _real_series_figures(plaus: dict) -> str:
    """The plausibility figures a reader of a card wants beside pass/fail: the network's raw pieces
    (>= 1 % of a bone), raw-vs-final Dice per bone and the fibula's widest cross-section."""
    checks = plaus.get("checks", {})
    pieces = checks.get("one_component_per_bone", {})
    pieces = pieces.get("raw_components", pieces.get("components", {}))
    dice = checks.get("raw_vs_final_dice", {}).get("dice", {})
    section = checks.get("fibula_cross_section", {})
    return ("/".join(str(pieces.get(b, "—")) for b in BONE_NAMES.values()) + "; "
            + "/".join("—" if dice.get(b) is None else f"{dice[b]:.2f}" for b in BONE_NAMES.values()) + "; "
            + (f"{section['widest_left_right_mm']:.0f} x {section['widest_anterior_posterior_mm']:.0f} mm"
               if "widest_left_right_mm" in section else "—"))


def model_card(version: str, meta: dict, evaluation: dict, real: list[dict], variants: list[dict],
               held_out: dict | None = None, notes: str = "", evaluation_tissue: dict | None = None) -> str:
    """``evaluation``: this checkpoint's synthetic series (of HELD_OUT). When the checkpoint saw
    every anatomy (--held-out none), ``held_out`` = {"version", "evaluation", "meta"} of the run
    that held HELD_OUT out, whose figures stand for generalisation. ``notes``: what the overlays
    showed (markdown, written after looking at them)."""
    cfg = meta["config"]
    val = meta["val"]["dice"]
    all_maps = meta["held_out"] == ALL_ANATOMIES
    variant_rows = "\n".join(f"| {v['variant']} | " + " | ".join(
        f"{v[k]:.3f}" if k in v else "—" for k in ("femur", "tibia", "fibula", "patella", "any_bone", "bone")) + " |"
        for v in variants)
    real_rows = []
    for r in real:
        plaus = r["summaries"].get("knee_plausibility", {})
        real_rows.append(f"| {r['series']} | {'passed' if plaus.get('passed') else 'FAILED'} | "
                         f"{_real_series_figures(plaus)} | "
                         f"{'; '.join(r['warnings']) or 'none'} | {r['timings_s'].get('total', float('nan')):.2f} |")
    trained_on = "; ".join(f"{m} ({MAP_SOURCES.get(m, 'data you brought')})" for m in meta["trained_on"])
    synth = {**asdict(SynthConfig()), **cfg.get("synth", {})}
    tissue_text = (f"""
- Tissue classes (SynthSeg's generation classes): in {synth['shared_tissue_p']:.0%} of the samples the
  structures of one tissue share one random intensity (within +-{synth['tissue_jitter']}): the four bones one
  marrow signal, all muscles one, as in real MR. The classes come from the label map's Slicer colour
  table (the SPL atlas colours every muscle alike) or the data README (pymskt: cartilage, menisci).""" if
                   synth["shared_tissue_p"] > 0 else "")
    if synth.get("distractor_p", 0) > 0:
        lo, hi = synth["distractors"]
        tissue_text += f"""
- Bone-like distractors: in {synth['distractor_p']:.0%} of the samples, {lo}-{hi} smooth-edged blobs
  ({synth['distractor_mm'][0]:g}-{synth['distractor_mm'][1]:g} mm semi-axes) over non-bone pixels, labelled
  background; {synth['distractor_mimic_p']:.0%} of them take a bone's marrow intensity and a dark rim, as
  a muscle belly can look."""
    if synth.get("bone_shift_mm", 0) > 0:
        names = ", ".join(BONE_NAMES[b] for b in synth["shift_bones"])
        tissue_text += f"""
- Per-bone shift: the {names} moved by a random offset (uniform +-{synth['bone_shift_mm']:g} mm per axis)
  relative to the other bones before the image is drawn, its old place unlabelled tissue, so that its place
  relative to the tibia varies as between people."""
    if synth.get("fascia_p", 0) > 0 or synth.get("streak_p", 0) > 0:
        tissue_text += f"""
- Lines in the soft tissues, which flat synthetic tissues lack and real muscle has: in
  {synth['fascia_p']:.0%} of the samples a 1-px line (fascia) between every two soft tissues, in
  {synth['streak_p']:.0%} thin streaks along a direction within {synth['streak_tilt_deg']:g} degrees of S-I
  (fat septa along muscle fibres, amplitude up to {synth['streak_amp']:g}); dark in
  {synth['line_dark_p']:.0%} of the samples, so a thin dark rim no longer means bone only."""
    loss_text = ("Soft F1 (Dice) loss" if not cfg.get("ce_weight") else
                 f"Soft F1 (Dice) loss plus {cfg['ce_weight']:g} x pixel cross-entropy (the seed's soft F1 alone: "
                 "`--ce-weight 0`)")
    slab_text = f"slabs anywhere across the bones and up to {synth['through_plane_margin_mm']:g} mm beyond"
    if synth.get("beyond_volume") == "extend":
        slab_text += ("; beyond a label map's first and last labelled axial slices those slices continue "
                      "along S-I (shafts and muscles reach the window's edge instead of stopping)")
    tissue_table = "" if evaluation_tissue is None else f"""

The same series with one marrow intensity for all four bones (`evaluate --synth shared_tissue_p=1`;
real MR shows every bone's marrow alike):

{_series_table(evaluation_tissue)}"""
    init = f" Fine-tuned from `{Path(cfg['init']).name}` (fresh optimiser)." if cfg.get("init") else ""
    swa, soup = meta.get("swa"), meta.get("soup")
    at_text = "at this checkpoint" if not swa else (
        f"at iteration {swa['last']} (the last averaged snapshot; the average itself is measured by the series below)")
    checkpoint_text = (f"iteration {meta['iteration']} of the planned {cfg['iterations']}" if not swa else
                       f"the weight average (SWA, `average`) of the {swa['snapshots']} snapshots at iterations "
                       f"{swa['first']}-{swa['last']} of the planned {cfg['iterations']}, batch-norm statistics "
                       f"re-estimated on {swa['bn_batches']} fresh synthetic batches")
    if soup:
        runs = soup["runs"]
        at_text = (f"of the seed-{cfg['seed']} run at iteration {meta['iteration']} (one of the averaged runs; the "
                   "average itself is measured by the series below)")
        spans = {None if not r["swa"] else (r["swa"]["first"], r["swa"]["last"]) for r in runs}
        each_text = (f"each the weight average (SWA) of its snapshots at iterations {runs[0]['swa']['first']}-"
                     f"{runs[0]['swa']['last']}" if len(spans) == 1 and runs[0]["swa"] else
                     "; ".join(f"{r['file']} at iteration {r['iteration']}" for r in runs))
        checkpoint_text = (f"the uniform weight average (`soup`, a model soup) of {len(runs)} runs of this recipe that "
                           f"differ only in their random seed ({', '.join(str(r['seed']) for r in runs)}), "
                           f"{each_text} of the planned {cfg['iterations']}; batch-norm statistics re-estimated on "
                           f"{soup['bn_batches']} fresh synthetic batches")
    coronal_patella = [r["patella"] for r in evaluation["series"]
                       if r["series"].startswith("coronal") and "patella" in r]
    coronal_text = ("\n- Coronal input: the patella is missed (Dice "
                    + ", ".join(f"{d:.2f}" for d in coronal_patella) + " on the coronal synthetic series); femur and "
                    "tibia hold." if coronal_patella and max(coronal_patella) < 0.2 else "")
    shaft_text = ("Beyond the label maps' ends (the SPL atlas covers ~119 mm along the leg) the shafts and muscles "
                  "are straight\n  continuations of the last labelled slice, not real anatomy."
                  if synth.get("beyond_volume") == "extend" else
                  "Label maps end where the atlases end (SPL covers ~119 mm along the leg): long-bone shafts beyond "
                  "that\n  were never seen as bone far from the joint.")
    if all_maps:
        ho = held_out["meta"]
        held_text = f"""- **No anatomy is held out from this model**: it saw both label maps, the final-model step once
  the held-out figures exist. Validation (checkpoint choice) used fixed synthetic slices of both maps,
  drawn apart from the training stream. Generalisation to an unseen anatomy is measured on the same
  recipe with {HELD_OUT} held out entirely: v{held_out['version']} (trained on {', '.join(ho['trained_on'])},
  iteration {ho['iteration']}), which this model started from."""
        figures = f"""## Held-out synthetic figures (unseen anatomy: v{held_out['version']}, trained without {HELD_OUT})
2D validation slices, Dice: femur {ho['val']['dice']['femur']:.3f}, tibia {ho['val']['dice']['tibia']:.3f},
fibula {ho['val']['dice']['fibula']:.3f}, patella {ho['val']['dice']['patella']:.3f}.

Synthetic 3D series of the held-out anatomy through the product's inference (Dice after
post-processing, raw network output in brackets):

{_series_table(held_out['evaluation'])}

## This model on the same synthetic series (anatomy seen in training; new synthesis draws)
These are not held-out figures: the DESS anatomy was in this model's training set. 2D validation
slices (both maps) at this checkpoint, Dice: femur {val['femur']:.3f}, tibia {val['tibia']:.3f},
fibula {val['fibula']:.3f}, patella {val['patella']:.3f}.

{_series_table(evaluation)}"""
    else:
        held_text = f"""- Held out entirely (validation and every figure below): {meta['held_out']}
  ({MAP_SOURCES.get(meta['held_out'], '')})."""
        figures = f"""## Held-out synthetic figures
2D validation slices {at_text}, Dice: femur {val['femur']:.3f}, tibia {val['tibia']:.3f},
fibula {val['fibula']:.3f}, patella {val['patella']:.3f}.

Synthetic 3D series of the held-out anatomy through the product's inference (Dice after
post-processing, raw network output in brackets):

{_series_table(evaluation)}{tissue_table}"""
    return render(f"knee-bones v{version} (starter, trained on synthetic images only)", [
        ("Data", f"""- **No labelled real knee MRI was available.** Training images are synthesised on the fly from
  label maps, the SynthSeg way (Billot et al., MedIA 2023; `Training/knee_synth.py`): random
  per-structure intensities and texture, pseudo-tissues in unlabelled regions, a dark cortical rim,
  partial volume over 0.5-4 mm slabs, blur, resolution loss, bias field, gamma, Rician noise,
  random 110-200 mm windows near the joint, rotation, anisotropic scale, elastic displacement,
  left/right mirroring, sagittal and coronal planes, {slab_text}.{tissue_text}
- Trained on: {trained_on}.
{held_text}
- Real series checked (no labels; nothing tuned on them): pyKNEEr DESS (GPL-3.0 repository) and pymskt
  multi-echo T2 (MIT) from ../shared/data/knee."""),
        ("Preprocessing (the task card; stored with the weights)", """Slices along the acquisition axis (largest spacing; sagittal or coronal), canonical orientation. An axial series runs on sagittal reformats (the model never saw axial
slices; `Training/knee_planes.py`); a checkpoint whose preprocessing says `plane: acquisition` keeps the old rule.
The rest:
fast N4 (estimated on a shrunk, masked image, applied at full resolution); a 160 mm square window
centred on the femorotibial joint, resampled to 224x224; per-volume z-score over the foreground.
The synthetic training population has random intensities by design, so it has no meaningful fixed
mean/std: statistics are the input's own (mean/std of voxels above the 5th percentile). The seed's
population-statistics variant is `normalisation: fixed` with `stats` in a checkpoint (for models
trained on one protocol's real images)."""),
        ("Network and training", f"""2D U-Net, constant {cfg['channels']} channels x {cfg['levels']} levels, ELU, batch norm, dropout
{cfg['dropout']} at the end of the contracting path, softmax background + 4 bones
({'lighter than ' if cfg['channels'] < 32 else ''}the seed's constant 32, selectable: `--channels 32`).
{loss_text}, Adam {cfg['lr']:g} decaying exponentially toward {cfg['lr_final']:g} over
{cfg['iterations']} iterations, batches of {cfg['batch_size']} random {cfg['patch']}x{cfg['patch']} crops of
224x224 synthetic slices, early stopping patience {cfg['patience']} evaluations ({cfg['eval_every']}
iterations each) on {cfg['val_samples']} fixed synthetic validation slices.{init}
This checkpoint: {checkpoint_text} (CPU, 2 cores; training resumes
with `Training/knee_bones.py train --resume`; a GPU session is the place to finish it).

{figures}"""),
        ("Seed variants (same synthetic data, same schedule, validation Dice at equal iterations)", f"""| variant | femur | tibia | fibula | patella | any bone | merged "bone" |
|---|---|---|---|---|---|---|
{variant_rows}

Merged "bone" is seed 000's single any-bone channel; compare it with the multiclass model's "any
bone" (prediction > 0 against truth > 0). The fibula variant is the seed's separate per-bone model;
compare it with the multiclass fibula column. The variant runs were stopped at {variants[0]['iteration']}
iterations to leave the CPU to the main model, so this is an early-training comparison. The seed's
finding that a merged channel learns more easily holds here too. Both variants run in the product:
a merged checkpoint (`--weights`, metadata `variant: merged`) is split into bones by
`SpineKneeSegLib.tasks.knee.bone_split.split_any_bone`; a per-bone fibula model runs beside the main one with
`--aux-weights fibula=FILE` and its fibula replaces the main one's."""),
        ("Real series (plausibility check, no labels)", f"""| series | plausibility | raw pieces fem/tib/fib/pat; raw-vs-final Dice; fibula widest R-L x A-P | warnings | total s |
|---|---|---|---|---|
{chr(10).join(real_rows)}

{notes.strip() or "Overlays: no observations recorded."}"""),
        ("Known limits", f"""- A starter model: {'two' if all_maps else 'one'} training {'anatomies' if all_maps else 'anatomy'}, synthetic
  images only, stopped far short of its schedule.{coronal_text}
- {shaft_text}
- Nothing was measured on labelled real images; the figures above are synthetic."""),
        ("Licence of the data", """SPL Knee Atlas: Apache-2.0. pymskt label map and T2 series: MIT. pyKNEEr DESS series: GPL-3.0 repository."""),
    ], """**Task** `knee-bones` (seed 000): femur, tibia, fibula, patella in knee MRI, slice-wise 2D U-Net.""")


def ship(out: Path, version: str, evaluation: Path, real: Path, variants: Path, held_out: Path | None = None,
         notes: Path | None = None, checkpoint: Path | None = None, evaluation_tissue: Path | None = None) -> int:
    """``held_out``: a JSON {"version", "evaluation": eval JSON path, "checkpoint": path} for a
    model trained on every anatomy (the held-out-anatomy run whose figures it carries).
    ``checkpoint``: the weights to ship (default OUT/best.pt, the best validation evaluation);
    ``evaluation_tissue``: the same series with one marrow intensity for all bones (evaluate --synth)."""
    checkpoint = checkpoint or out / "best.pt"
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["metadata"]
    held = None
    if held_out is not None:
        spec = json.loads(held_out.read_text(encoding="utf-8"))
        held = {"version": spec["version"],
                "evaluation": json.loads(Path(spec["evaluation"]).read_text(encoding="utf-8")),
                "meta": torch.load(spec["checkpoint"], map_location="cpu", weights_only=True)["metadata"]}
    elif meta["held_out"] == ALL_ANATOMIES:
        raise SystemExit("a model trained on every anatomy ships with --held-out-figures (its held-out run)")
    def read(path):
        return json.loads(path.read_text(encoding="utf-8"))

    text = (model_card(version, meta, read(evaluation), read(real), read(variants), held,
                       notes.read_text(encoding="utf-8") if notes else "",
                       read(evaluation_tissue) if evaluation_tissue else None))
    mean = (held or {}).get("evaluation") or json.loads(evaluation.read_text(encoding="utf-8"))
    mean = mean["mean_dice"]
    maps = "both label maps" if held else "one label map"
    entry = publish(TASK, version, text, f"starter knee-bones trained on synthetic images from {maps}: held-out "
                                         "synthetic Dice femur/tibia/fibula/patella "
                                         + "/".join(f"{mean[b]:.2f}" for b in BONE_NAMES.values()), checkpoint)
    print(f"registered {entry.file} sha256 {entry.sha256}")
    return 0

