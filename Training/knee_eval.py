"""Knee-bones evaluation: Dice on 2D synthetic slices (validation, ``fit``), the product's
inference on synthetic 3D series of the held-out anatomy (``evaluate``), variant comparison at one
iteration (``compare``), the real-series check (``check-real``) and raw components (``components``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from evalhelpers import dice_or, dice_per_label, mean_per_key, nanmean
from knee_data import HELD_OUT, TASK, Config, load_volumes, validation_set
from knee_synth import SynthConfig, synthesise_volume
from knee_train import out_channels, variant_target

@torch.no_grad()
def evaluate_slices(net, x: torch.Tensor, y: torch.Tensor, variant: str, batch: int = 16) -> dict:
    net.eval()
    preds = torch.cat([net(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    truth = variant_target(y.to(preds.device), variant)
    classes = range(1, out_channels(variant))
    d = dice_per_label(preds, truth, classes)
    names = {"multiclass": {1: "femur", 2: "tibia", 3: "fibula", 4: "patella"}, "merged": {1: "bone"},
             "fibula": {1: "fibula"}}[variant]
    per = {names[c]: round(v, 4) for c, v in d.items()}
    if variant == "multiclass":  # comparable with the merged variant's single channel
        per["any_bone"] = round(dice_or(preds > 0, truth > 0), 4)
    return {"dice": per, "mean_dice": nanmean(d.values(), 4)}



# ---- evaluation on synthetic 3D series of the held-out anatomy ---------------------------------

EVAL_SERIES = (  # (plane, slices, slice mm, pixel mm, mirror): like clinical knee protocols
    ("sagittal", 80, 1.5, 0.6, False), ("sagittal", 36, 3.0, 0.5, True), ("sagittal", 120, 1.0, 0.7, False),
    ("coronal", 40, 3.0, 0.5, False), ("coronal", 80, 1.5, 0.6, True), ("sagittal", 30, 4.0, 0.4, True),
)
BONE_NAMES = {1: "femur", 2: "tibia", 3: "fibula", 4: "patella"}


def load_knee_checkpoint(checkpoint: Path):
    """(weights, label variant, network on the CPU) of a knee checkpoint, main or per-bone model."""
    from SpineKneeSegLib.engine.inference import load_network
    from SpineKneeSegLib.engine.weights import load_checkpoint, resolve_weights
    from SpineKneeSegLib.tasks import TASKS

    weights = resolve_weights(TASKS[TASK], str(checkpoint), load_checkpoint(checkpoint).get("model", "labels"))
    variant = weights.checkpoint["metadata"].get("variant", "multiclass")
    return weights, variant, load_network(weights, torch.device("cpu"))


def evaluate_series(checkpoint: Path, volumes_path: Path, seed: int = 777, log=print,
                    synth: dict | None = None) -> dict:
    """Run the product's inference (task card + checkpoint preprocessing) on synthetic series of
    the held-out anatomy; per-bone Dice of the raw network labels and after post-processing.
    ``synth``: SynthConfig overrides for the series (e.g. shared_tissue_p=1: one marrow intensity
    for the four bones, as in real MR; default: every structure its own intensity, as in v0.1.0's card)."""
    from SpineKneeSegLib.core.image import Image
    from SpineKneeSegLib.engine.inference import segment_slices
    from SpineKneeSegLib.engine.postprocessing import dice, largest_component_per_label
    from SpineKneeSegLib.tasks import TASKS
    from SpineKneeSegLib.tasks.knee.bone_split import split_any_bone

    card = TASKS[TASK]
    weights, variant, net = load_knee_checkpoint(checkpoint)
    held = [v for v in load_volumes(volumes_path) if v.name == HELD_OUT][0]
    overrides = dict(synth or {})
    synth = SynthConfig(**overrides)
    rows = []
    for i, (plane, n, slice_mm, pixel_mm, mirror) in enumerate(EVAL_SERIES):
        gen = torch.Generator().manual_seed(seed + i)
        s = synthesise_volume(held, synth, gen, plane=plane, n_slices=n, slice_mm=slice_mm, pixel_mm=pixel_mm,
                              size_px=int(round(160 / pixel_mm)), mirror=mirror)
        image = Image(s["image"], s["spacing"], tuple(s["origin"]), s["direction"])
        t = time.time()
        raw = segment_slices(card, image, net, torch.device("cpu"), weights.preprocessing).labels
        if variant == "merged":  # seed 000's merged channel, split into bones by components and position
            raw = split_any_bone(raw > 0, image)
        elif variant == "fibula":  # the per-bone model: its one class is the fibula
            raw = np.where(raw > 0, 3, 0).astype(np.uint8)
        final = largest_component_per_label(raw)
        row = {"series": f"{plane} {n}x{slice_mm} mm{' mirrored' if mirror else ''}",
               "seconds": round(time.time() - t, 2)}
        for value, name in BONE_NAMES.items():
            truth = s["labels"] == value
            if truth.sum() == 0 or (variant == "fibula" and value != 3):
                continue
            d = {name: dice(final == value, truth), f"{name}_raw": dice(raw == value, truth),
                 f"{name}_raw_vs_final": dice(raw == value, final == value)}
            row.update({k: float("nan") if v is None else round(v, 4) for k, v in d.items()})
        rows.append(row)
        log(json.dumps(row))
    return {"checkpoint": str(checkpoint), "held_out": HELD_OUT, "synthesis": overrides, "seed": seed, "series": rows,
            "mean_dice": mean_series_dice(rows)}


def mean_series_dice(rows: list[dict]) -> dict:
    """Per-bone Dice averaged over series rows (a bone absent from a series does not count there)."""
    return mean_per_key(rows, BONE_NAMES.values())


def pool_evaluations(results: list[dict]) -> dict:
    """evaluate_series results with different seeds (other contrasts and poses of the same six series
    layouts) -> one result over all their series (one draw's fibula Dice differed by up to 0.25 between
    draws in session 10). One result is returned as it is: the model cards' seed-777 JSON."""
    if len(results) == 1:
        return results[0]
    rows = [dict(r, seed=res["seed"]) for res in results for r in res["series"]]
    return {**results[0], "seed": [res["seed"] for res in results], "series": rows, "mean_dice": mean_series_dice(rows)}


def slice_fit(checkpoint: Path, volumes_path: Path, anatomy: str, synth: dict | None = None, samples: int = 150,
              seed: int = 4242) -> dict:
    """Per-bone Dice (slices pooled) of a checkpoint on ``samples`` 2D synthetic slices of one prepared
    anatomy (name prefix), drawn like training samples with ``synth`` overrides and a fixed seed. On a
    *training* anatomy this measures how well the network fits its own training distribution (not
    generalisation); varying one SynthConfig field at a time shows which augmentation costs a bone."""
    _, variant, net = load_knee_checkpoint(checkpoint)
    matches = [v for v in load_volumes(volumes_path) if v.name.startswith(anatomy)]
    if len(matches) != 1:
        raise SystemExit(f"--anatomy {anatomy!r} matches {len(matches)} of the prepared volumes in {volumes_path}")
    x, y = validation_set(matches, Config(val_samples=samples), SynthConfig(**(synth or {})), seed)
    result = evaluate_slices(net, x, y, variant)
    return {"checkpoint": str(checkpoint), "anatomy": matches[0].name, "synthesis": dict(synth or {}),
            "samples": samples, "seed": seed, **result}


# ---- variant comparison, real-series check, model card -----------------------------------------

def compare_variants(runs: dict[str, Path], at_iteration: int) -> list[dict]:
    """Validation Dice of each variant's run at the same iteration (same validation slices)."""
    rows = []
    for variant, run in runs.items():
        history = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["state"]["history"]
        entry = next((h for h in history if h["iteration"] == at_iteration), None)
        if entry is None:
            raise SystemExit(f"{run}: no evaluation at iteration {at_iteration}")
        rows.append({"variant": variant, "iteration": at_iteration, **entry["dice"]})
    return rows


def check_real_series(checkpoint: Path, out: Path, log=print) -> list[dict]:
    """Run the product (CLI code path) on the two real knee series; nothing here is tuned on them."""
    from SpineKneeSegLib.core.datasets import data_root
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.engine.render import save_label_montage
    from SpineKneeSegLib.tasks import TASKS

    results = []
    for name in ("dess-dicom", "mese-t2-dicom"):
        series = data_root() / "knee" / name
        report = run_case(TASKS[TASK], [str(series)], out / name, RunOptions(weights=str(checkpoint)))
        montage = save_label_montage(out / name / "montage.png", read_image(series),
                                     read_image(out / name / "labels.nii.gz"), TASKS[TASK])
        results.append({"series": name, "summaries": report["summaries"], "warnings": report["warnings"],
                        "timings_s": report["timings_s"], "outputs": report["outputs"], "montage": str(montage)})
        log(json.dumps({"series": name, "warnings": report["warnings"], "timings_s": report["timings_s"]}))
    return results


def describe_components(labels: np.ndarray, image, bone: int, reference: int = 2) -> list[dict]:
    """Every 26-connected component of ``bone`` in a label map on ``image``'s grid, largest first:
    volume, slice range and centroid offset (mm, RAS: right, anterior, superior) from the
    ``reference`` bone's centroid (default the tibia). Shows where a network's stray pieces lie."""
    from scipy import ndimage
    from SpineKneeSegLib.tasks.knee.anatomy import _to_ras

    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    ref = np.argwhere(labels == reference)
    ref_ras = _to_ras(image, ref.mean(axis=0, keepdims=True))[0] if len(ref) else None
    comp, _ = ndimage.label(labels == bone, structure=np.ones((3, 3, 3)))
    rows = []
    for i, box in enumerate(ndimage.find_objects(comp), start=1):
        vox = np.argwhere(comp[box] == i) + [sl.start for sl in box]
        centre = _to_ras(image, vox.mean(axis=0, keepdims=True))[0]
        rows.append({"ml": round(len(vox) * voxel_ml, 3), "slices": [int(vox[:, 0].min()), int(vox[:, 0].max())],
                     "offset_ras_mm": None if ref_ras is None else [round(float(v), 1) for v in centre - ref_ras]})
    return sorted(rows, key=lambda r: -r["ml"])


def raw_components(checkpoint: Path, series: Path, bone: int) -> list[dict]:
    """The network's own (raw, before clean-up) labels of ``checkpoint`` on a series -> describe_components."""
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.engine.inference import load_network, segment_slices
    from SpineKneeSegLib.engine.weights import resolve_weights
    from SpineKneeSegLib.tasks import TASKS

    card = TASKS[TASK]
    image = read_image(str(series))
    weights = resolve_weights(card, str(checkpoint))
    net = load_network(weights, torch.device("cpu"))
    raw = segment_slices(card, image, net, torch.device("cpu"), {**weights.preprocessing}).labels
    return describe_components(np.asarray(raw), image, bone)

