"""What the real JSRT radiographs teach the femur model (issue 24, part 4), and how it is measured.

There is no real hip radiograph with a femur mask here. What the chest data does give: real
exposure, noise, blur, texture and bony clutter (ribs, clavicles, spine). Training: a share of the
femur phantoms is drawn over a real radiograph of the chest task's training split (the drawn
bones' transmission multiplies the real one: `xray_femur_phantom(background=...)`), so the model
meets real texture behind the bones it must outline. Measured, on what nobody trained on:

- held-out phantoms as before (`xray.evaluate`: clean and seed 001's noise);
- held-out composites: the test phantoms drawn over the chest task's 50 held-out radiographs;
- real radiographs without a femur: the 50 held-out chest radiographs as they are, where every
  femur pixel the model reports is a false positive (share of the image, and how many
  radiographs get a femur of at least 1 cm2).

    python Training/xray_real.py evaluate --weights Training/runs/xray-femur-real/best.pt [--n 24]
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


def _net(weights_path: Path):
    from SpineKneeSegLib.engine.inference import load_network
    from SpineKneeSegLib.engine.weights import resolve_weights

    weights = resolve_weights(TASKS["xray-femur"], weights_path)
    return weights, load_network(weights, torch.device("cpu"))


def evaluate_real(weights_path: Path, n: int = 24, log=print) -> dict:
    """Held-out composites (Dice) and femur false positives on held-out chest radiographs."""
    from SpineKneeSegLib.engine.inference import segment_slices
    from xray import TEST_SEED0, make_case

    card = TASKS["xray-femur"]
    weights, net = _net(weights_path)
    held = chest_backgrounds("test")
    composites = []
    for k, seed in enumerate(range(TEST_SEED0, TEST_SEED0 + n)):
        case, background = held[k % len(held)]
        image, labels, _ = make_case("xray-femur", seed, background)
        pred = segment_slices(card, image, net, torch.device("cpu"), weights.preprocessing).labels
        composites.append({"seed": seed, "background": case, "dice": dice_or(pred == 1, labels.array == 1)})
    false_positives = []
    for case, display in held:
        image = radiograph(display)
        pred = segment_slices(card, image, net, torch.device("cpu"), weights.preprocessing).labels
        area_mm2 = float((pred == 1).sum()) * 0.7 * 0.7
        false_positives.append({"case": case, "femur_mm2": round(area_mm2, 1),
                                "share": round(float((pred == 1).mean()), 5)})
    summary = {"composite_dice_mean": round(float(np.mean([c["dice"] for c in composites])), 4),
               "composite_dice_min": round(float(np.min([c["dice"] for c in composites])), 4),
               "chest_fp_share_mean": round(float(np.mean([f["share"] for f in false_positives])), 5),
               "chest_fp_radiographs": sum(f["femur_mm2"] >= FP_AREA_MM2 for f in false_positives),
               "chest_radiographs": len(false_positives)}
    log(json.dumps(summary))
    return {"weights": str(weights_path), "sha256": weights.sha256, "summary": summary,
            "composites": composites, "chest_false_positives": false_positives}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("evaluate",))
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--out", type=Path, help="write the JSON here (default: beside the weights)")
    args = parser.parse_args(argv)
    result = evaluate_real(args.weights, args.n)
    out = args.out or args.weights.parent / f"evaluation-real-{args.weights.stem}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
