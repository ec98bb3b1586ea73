"""Axial knee series: the network on the acquisition's own (axial) slices, or on sagittal reformats?

The knee model is trained on sagittal and coronal slices only. Its card's plane was "acquisition"
(slices as acquired, whatever the plane), so an axial series ran on axial slices the network had
never seen. This compares that rule ("acquisition") with "acquisition:sagittal,coronal" (an axial
acquisition runs on sagittal reformats), and, for information, coronal reformats, on:

* synthetic axial series of the held-out anatomy (pymskt DESS labels; the same synthesis as
  ``knee_bones.py evaluate``): Dice against the true bones, after the product's post-processing;
* the real DESS (sagittal, 1.5 mm) reformatted to axial slabs: agreement with the product's run on
  the sagittal original, on the axial grid. That run is a reference, not the truth (no real labels).

    python Training/knee_bones.py prepare --out /tmp/kneevol
    python Training/knee_planes.py --volumes /tmp/kneevol/volumes.pt --json Training/results/knee-planes.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from knee_data import HELD_OUT, load_volumes
from knee_eval import BONE_NAMES, load_knee_checkpoint
from knee_synth import SynthConfig, synthesise_volume

RULES = {"as acquired (old)": "acquisition", "sagittal reformats (new)": "acquisition:sagittal,coronal",
         "coronal reformats (for information)": "acquisition:coronal,sagittal"}
AXIAL_SERIES = (  # (slices, slice mm, pixel mm, mirror): clinical axial knee protocols (PD/T2, 3-4 mm; 3D 1.5 mm)
    (40, 3.0, 0.4, False), (30, 4.0, 0.4, True), (80, 1.5, 0.5, False))
DESS_SLABS_MM = (1.5, 3.0, 4.5)


def _dices(labels: np.ndarray, truth: np.ndarray) -> dict:
    from SpineKneeSegLib.engine.postprocessing import dice

    out = {}
    for value, name in BONE_NAMES.items():
        d = dice(labels == value, truth == value)
        out[name] = float("nan") if d is None else round(d, 4)
    out["mean"] = round(float(np.nanmean([out[n] for n in BONE_NAMES.values()])), 4)
    return out


def _run(image, rule: str, weights, net) -> tuple[np.ndarray, float]:
    from SpineKneeSegLib.engine.inference import segment_slices
    from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
    from SpineKneeSegLib.tasks import TASKS

    t = time.perf_counter()
    raw = segment_slices(TASKS["knee-bones"], image, net, torch.device("cpu"),
                         {**weights.preprocessing, "plane": rule}).labels
    return largest_component_per_label(raw), time.perf_counter() - t


def synthetic_axial(volumes: Path, seeds: list[int], log=print) -> list[dict]:
    from SpineKneeSegLib.core.image import Image

    weights, _, net = load_knee_checkpoint(_shipped())
    held = [v for v in load_volumes(volumes) if v.name == HELD_OUT][0]
    rows = []
    for seed in seeds:
        for i, (n, slice_mm, pixel_mm, mirror) in enumerate(AXIAL_SERIES):
            s = synthesise_volume(held, SynthConfig(), torch.Generator().manual_seed(seed + i), plane="axial",
                                  n_slices=n, slice_mm=slice_mm, pixel_mm=pixel_mm,
                                  size_px=int(round(160 / pixel_mm)), mirror=mirror)
            image = Image(s["image"], s["spacing"], tuple(s["origin"]), s["direction"])
            for name, rule in RULES.items():
                labels, seconds = _run(image, rule, weights, net)
                row = {"series": f"axial {n}x{slice_mm} mm{' mirrored' if mirror else ''}", "seed": seed,
                       "rule": name, **_dices(labels, s["labels"]), "seconds": round(seconds, 1)}
                rows.append(row)
                log(json.dumps(row))
    return rows


def real_dess_axial(data: Path, log=print) -> list[dict]:
    """The real DESS reformatted to axial slabs (block-averaged: a thicker slice sums its thinner
    ones), each rule against the sagittal original's labels brought onto the axial grid."""
    import SimpleITK as sitk
    from SpineKneeSegLib.core.image import Image
    from SpineKneeSegLib.core.image_io import read_image

    weights, _, net = load_knee_checkpoint(_shipped())
    dess = read_image(data / "knee" / "dess-dicom")
    reference, _ = _run(dess, "acquisition", weights, net)  # sagittal: the same under both rules
    source = dess.to_sitk()
    corners = np.array([source.TransformIndexToPhysicalPoint([int(a * (n - 1)) for a, n in zip(c, source.GetSize())])
                        for c in np.ndindex(2, 2, 2)])
    lo, hi = corners.min(0), corners.max(0)
    rows = []
    for slab in DESS_SLABS_MM:
        fine = (0.5, 0.5, 0.5)  # an axial grid at 0.5 mm, averaged over the slab along S-I
        size = [int((hi[d] - lo[d]) / fine[d]) for d in range(3)]
        per = int(round(slab / fine[2]))
        size[2] -= size[2] % per
        resampled = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, tuple(lo), fine,
                                  (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0, sitk.sitkFloat32)
        array = sitk.GetArrayFromImage(resampled)  # (k, j, i)
        slabs = array.reshape(size[2] // per, per, size[1], size[0]).mean(axis=1)
        origin = tuple(lo + np.array([0, 0, (per - 1) * fine[2] / 2]))
        axial = Image(slabs.astype(np.float32), (fine[0], fine[1], slab), origin, np.eye(3))
        ref_image = dess.with_array(reference)
        ref_on_axial = sitk.GetArrayFromImage(sitk.Resample(ref_image.to_sitk(), axial.to_sitk(),
                                                            sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        inside = sitk.GetArrayFromImage(sitk.Resample(dess.with_array(np.ones_like(reference)).to_sitk(),
                                                      axial.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        for name, rule in RULES.items():
            labels, seconds = _run(axial, rule, weights, net)
            row = {"series": f"real DESS as axial {slabs.shape[0]}x{slab} mm", "rule": name,
                   **_dices(np.where(inside > 0, labels, 0), ref_on_axial), "seconds": round(seconds, 1)}
            rows.append(row)
            log(json.dumps(row))
    return rows


def _shipped() -> Path:
    from SpineKneeSegLib.engine.weights import find_entry

    return find_entry("knee-bones").path()


def summary(rows: list[dict]) -> dict:
    out = {}
    for name in RULES:
        mine = [r for r in rows if r["rule"] == name]
        out[name] = {k: round(float(np.nanmean([r[k] for r in mine])), 4) for k in (*BONE_NAMES.values(), "mean")}
    return out


def main(argv=None) -> int:
    from SpineKneeSegLib.core.datasets import data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=Path, required=True, help="knee_bones.py prepare's volumes.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[777, 1777])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    synthetic = synthetic_axial(args.volumes, args.seeds)
    root = data_root()
    real = real_dess_axial(root) if root is not None and (root / "knee" / "dess-dicom").is_dir() else []
    result = {"synthetic_axial": synthetic, "synthetic_mean": summary(synthetic),
              "real_dess_axial": real, "real_mean": summary(real) if real else {}}
    print(json.dumps({"synthetic_mean": result["synthetic_mean"], "real_mean": result["real_mean"]}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
