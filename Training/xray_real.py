"""What the real JSRT radiographs teach the femur model (issue 24, part 4), and how it is measured.

There is no real hip radiograph with a femur mask here. What the chest data does give: real
exposure, noise, blur, texture and bony clutter (ribs, clavicles, spine). Training: a share of the
femur phantoms is drawn over a real radiograph of the chest task's training split (the drawn
bones' transmission multiplies the real one: `xray_femur_phantom(background=...)`), so the model
meets real texture behind the bones it must outline. Measured, on what nobody trained on:

- held-out phantoms as before (`xray.evaluate`: clean and seed 001's noise);
- held-out composites: the test phantoms drawn over the chest task's 50 held-out radiographs
  (xray-multiclass too, with `--task xray-multiclass`: Dice is the mean over its bones);
- real radiographs without a femur: the 50 held-out chest radiographs as they are, where every
  femur pixel the model reports is a false positive (share of the image, and how many
  radiographs get a femur of at least 1 cm2), before and after the product's radiograph-level
  rule (`femur_presence`: a femur smaller than half the smallest training phantom's is no femur).

    python Training/xray_real.py evaluate --weights Training/runs/xray-femur-real/best.pt [--n 24]
    python Training/xray_real.py phantom-femur-areas   # the anatomy that rule's threshold comes from
"""
from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from evalhelpers import dice_or
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.tasks.xray.polarity import inverted
from SpineKneeSegLib.core.atomic import write_text_atomic

JSRT = "xray/jsrt-scr"
FP_AREA_MM2 = 100.0  # a "femur" of at least 1 cm2 on a chest radiograph counts as one found


@lru_cache(maxsize=2)
def chest_backgrounds(side: str) -> list[tuple[str, np.ndarray]]:
    """(case id, display 0..1 with bone bright) of the chest task's training or held-out split
    (xray_chest.split: the same 148 / 50 radiographs, identical images on one side)."""
    from xray_chest import case_ids, split

    root = data_root()
    if root is None or not (root / JSRT).exists():
        raise SystemExit(f"no JSRT radiographs at {root}/{JSRT} (set SPINEKNEESEG_DATA)")
    train, test, _ = split(case_ids(root / JSRT), root / JSRT, 0.25, 0)
    ids = train if side == "train" else test
    out = []
    for case in ids:
        image = inverted(read_image(root / JSRT / case / "image.nii.gz"))  # stored inverted
        out.append((case, (image.array[0].astype(np.float32) / 255.0)))
    return out


def radiograph(display: np.ndarray):
    """A 16-bit single-slice Image (JSRT's 0.7 mm pixels) of display values 0..1."""
    from SpineKneeSegLib.core.image import Image

    return Image((display * 65535.0).round().astype(np.float32)[None], (0.7, 0.7, 1.0))


def phantom_femur_areas(n: int = 160) -> dict:
    """Area (mm2) of every femur in training phantoms 0..n-1 (each pelvis view shows two): the
    smallest femur a radiograph can show, which `anatomy.MIN_FEMUR_MM2` halves."""
    from SpineKneeSegLib.tasks.xray.anatomy import drop_implausible_femurs
    from xray import make_case

    areas = {"pelvis": [], "hip": []}
    for seed in range(n):
        image, labels, ph = make_case("xray-femur", seed)
        # the product rule's own component areas, with nothing dropped
        areas[ph.extra["view"]] += drop_implausible_femurs(labels.array, image.spacing[0] * image.spacing[1], 0.0)[1]
    every = np.concatenate([areas["pelvis"], areas["hip"]])
    return {"phantoms": n, "femurs": len(every), "min_mm2": round(float(every.min()), 1),
            "p5_mm2": round(float(np.percentile(every, 5)), 1), "median_mm2": round(float(np.median(every)), 1),
            **{f"{view}_min_mm2": round(float(min(a)), 1) for view, a in areas.items()}}


def _net(task: str, weights_path: Path):
    from SpineKneeSegLib.engine.inference import load_network
    from SpineKneeSegLib.engine.weights import resolve_weights

    weights = resolve_weights(TASKS[task], weights_path)
    return weights, load_network(weights, torch.device("cpu"))


def mean_class_dice(pred: np.ndarray, truth: np.ndarray, values) -> float:
    """Mean Dice over the classes the truth holds (a hip view shows no sacrum)."""
    scores = [dice_or(pred == v, truth == v) for v in values if (truth == v).any()]
    return float(np.mean(scores)) if scores else float("nan")


def evaluate_real(weights_path: Path, n: int = 24, log=print, task: str = "xray-femur") -> dict:
    """Held-out clean phantoms and composites (Dice, mean over the task's bones) and false
    positives on held-out chest radiographs (any bone marked), from the network's own labels and
    after the product's post-processing (xray-femur: its radiograph-level femur_presence rule)."""
    from SpineKneeSegLib.engine.inference import segment_slices
    from SpineKneeSegLib.engine.pipeline import postprocess
    from xray import TEST_SEED0, make_case

    card = TASKS[task]
    values = [spec.value for spec in card.labels]
    rule = "femur_presence" in card.postprocessors
    weights, net = _net(task, weights_path)
    settings = weights.checkpoint.get("metadata", {}).get("postprocessing", {})

    def predict(image):
        raw = segment_slices(card, image, net, torch.device("cpu"), weights.preprocessing).labels
        return raw, postprocess(card, image, raw, settings=settings)

    held = chest_backgrounds("test")
    composites = []
    for k, seed in enumerate(range(TEST_SEED0, TEST_SEED0 + n)):
        case, background = held[k % len(held)]
        for name, bg in (("clean", None), ("composite", background)):
            image, labels, _ = make_case(task, seed, bg)
            raw, final = predict(image)
            row = {"seed": seed, "kind": name, "background": case if bg is not None else None,
                   "dice": mean_class_dice(raw, labels.array, values),
                   "dice_after_rule": mean_class_dice(final.labels.array, labels.array, values)}
            if rule:
                row["femur_found"] = final.summaries["femur_presence"]["femur_found"]
            composites.append(row)
    false_positives = []
    for case, display in held:
        image = radiograph(display)
        raw, final = predict(image)
        false_positives.append({"case": case, "marked_mm2": round(float((raw > 0).sum()) * 0.7 * 0.7, 1),
                                "share": round(float((raw > 0).mean()), 5),
                                "reported_mm2": round(float((final.labels.array > 0).sum()) * 0.7 * 0.7, 1)})

    def mean(kind, key, fn=np.mean):
        return round(float(fn([c[key] for c in composites if c["kind"] == kind])), 4)

    summary = {"clean_dice_mean": mean("clean", "dice"), "composite_dice_mean": mean("composite", "dice"),
               "composite_dice_min": mean("composite", "dice", np.min),
               "chest_fp_share_mean": round(float(np.mean([f["share"] for f in false_positives])), 5),
               "chest_fp_radiographs": sum(f["marked_mm2"] >= FP_AREA_MM2 for f in false_positives),
               "chest_radiographs_with_bone_reported": sum(f["reported_mm2"] > 0 for f in false_positives),
               "chest_radiographs": len(false_positives)}
    if rule:
        summary.update({"clean_dice_after_rule": mean("clean", "dice_after_rule"),
                        "composite_dice_after_rule": mean("composite", "dice_after_rule"),
                        "phantoms_without_femur_after_rule": sum(not c["femur_found"] for c in composites)})
    log(json.dumps(summary))
    return {"task": task, "weights": str(weights_path), "sha256": weights.sha256, "summary": summary,
            "composites": composites, "chest_false_positives": false_positives}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("evaluate", "phantom-femur-areas"))
    parser.add_argument("--weights", type=Path, help="evaluate: the checkpoint")
    parser.add_argument("--task", default="xray-femur", choices=("xray-femur", "xray-multiclass"))
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--out", type=Path, help="write the JSON here (default: beside the weights)")
    args = parser.parse_args(argv)
    if args.command == "phantom-femur-areas":
        print(json.dumps(phantom_femur_areas()))
        return 0
    if args.weights is None:
        parser.error("evaluate needs --weights")
    result = evaluate_real(args.weights, args.n, task=args.task)
    out = args.out or args.weights.parent / f"evaluation-real-{args.weights.stem}.json"
    write_text_atomic(out, json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
