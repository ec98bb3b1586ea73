"""Knee series acquired axially or coronally: the network on the acquisition's own slices, or on
sagittal (or coronal) reformats?

The knee model is trained on sagittal and coronal slices. Its card's plane was "acquisition"
(slices as acquired, whatever the plane), so an axial series ran on axial slices the network had
never seen. For each acquisition this runs the network on each plane (its own slices, or reformats
across them) and scores:

* synthetic series of the held-out anatomy (pymskt DESS labels; the same synthesis as
  ``knee_bones.py evaluate``), axial and coronal: Dice against the true bones, after the product's
  post-processing;
* the real DESS (sagittal, 1.5 mm) reformatted to axial and coronal slabs: agreement with the
  product's run on the sagittal original, on the slab grid. That run is a reference, not the truth
  (no real labels).

Reformats (as close as the series' pixels, 0.4-0.5 mm) run every ~1.5 mm with linear interpolation
between (the card's reformat_slice_mm, session 47); an axial series' sagittal reformats also run on
every slice, to measure what that costs.

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
from evalhelpers import dice_per_label, mean_per_key, nanmean, write_json
from knee_data import HELD_OUT, load_volumes
from knee_eval import BONE_NAMES, EVAL_SERIES, load_knee_checkpoint
from knee_synth import SynthConfig, synthesise_volume

NETWORK_PLANES = ("acquisition", "sagittal", "coronal")  # "acquisition": the series' own slices
# reformats run every ~1.5 mm (the card's reformat_slice_mm, linear between) and, for the axial
# series' sagittal reformats the product uses, also every reformat slice (session 46's way)
EVERY_SLICE = "sagittal, every reformat slice"
SERIES = (  # (plane, slices, slice mm, pixel mm, mirror): clinical axial knee protocols (PD/T2, 3-4 mm;
    # 3D 1.5 mm), and evaluate's two coronal series
    ("axial", 40, 3.0, 0.4, False), ("axial", 30, 4.0, 0.4, True), ("axial", 80, 1.5, 0.5, False),
    *(s for s in EVAL_SERIES if s[0] == "coronal"))
DESS_SLABS_MM = (1.5, 3.0, 4.5)


def _dices(labels: np.ndarray, truth: np.ndarray) -> dict:
    out = {BONE_NAMES[v]: round(d, 4) for v, d in dice_per_label(labels, truth, BONE_NAMES).items()}
    return {**out, "mean": nanmean(out.values(), 4)}


def _runs(acquired: str) -> list[str]:
    """The network planes to run a series acquired in ``acquired`` on."""
    planes = [p for p in NETWORK_PLANES if p != acquired]  # its own plane is "acquisition"
    return planes + [EVERY_SLICE] if acquired == "axial" else planes


def _run(image, rule: str, weights, net, acquired: str | None = None) -> tuple[np.ndarray, float]:
    """``rule``: a network plane; an axial series' sagittal reformats run by the card's own rule
    (the product's way: every ~reformat_slice_mm), or on every slice (EVERY_SLICE)."""
    from SpineKneeSegLib.engine.inference import segment_slices
    from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
    from SpineKneeSegLib.tasks import TASKS

    card_rule = TASKS["knee-bones"].preprocessing.plane  # acquisition:sagittal,coronal
    overrides = ({"plane": card_rule, "reformat_slice_mm": None} if rule == EVERY_SLICE else
                 {"plane": card_rule} if rule == "sagittal" and acquired == "axial" else {"plane": rule})
    t = time.perf_counter()
    raw = segment_slices(TASKS["knee-bones"], image, net, torch.device("cpu"),
                         {**weights.preprocessing, **overrides}).labels
    return largest_component_per_label(raw), time.perf_counter() - t


def synthetic_series(volumes: Path, seeds: list[int], log=print) -> list[dict]:
    from SpineKneeSegLib.core.image import Image

    weights, _, net = load_knee_checkpoint(_shipped())
    held = [v for v in load_volumes(volumes) if v.name == HELD_OUT][0]
    rows = []
    for seed in seeds:
        for i, (plane, n, slice_mm, pixel_mm, mirror) in enumerate(SERIES):
            s = synthesise_volume(held, SynthConfig(), torch.Generator().manual_seed(seed + i), plane=plane,
                                  n_slices=n, slice_mm=slice_mm, pixel_mm=pixel_mm,
                                  size_px=int(round(160 / pixel_mm)), mirror=mirror)
            image = Image(s["image"], s["spacing"], tuple(s["origin"]), s["direction"])
            for network_plane in _runs(plane):
                labels, seconds = _run(image, network_plane, weights, net, plane)
                row = {"series": f"{plane} {n}x{slice_mm} mm{' mirrored' if mirror else ''}", "acquired": plane,
                       "seed": seed, "network_plane": network_plane, **_dices(labels, s["labels"]),
                       "seconds": round(seconds, 1)}
                rows.append(row)
                log(json.dumps(row))
    return rows


def real_dess_slabs(data: Path, log=print) -> list[dict]:
    """The real DESS reformatted to axial and coronal slabs (block-averaged: a thicker slice sums its
    thinner ones), each network plane against the sagittal original's labels on the slab grid."""
    import SimpleITK as sitk
    from SpineKneeSegLib.core.image import Image
    from SpineKneeSegLib.core.image_io import read_image

    weights, _, net = load_knee_checkpoint(_shipped())
    dess = read_image(data / "knee" / "dess-dicom")
    reference, _ = _run(dess, "acquisition", weights, net)  # sagittal: its own slices
    source = dess.to_sitk()
    corners = np.array([source.TransformIndexToPhysicalPoint([int(a * (n - 1)) for a, n in zip(c, source.GetSize())])
                        for c in np.ndindex(2, 2, 2)])
    lo, hi = corners.min(0), corners.max(0)
    # LPS direction columns (i, j, k) of each slab grid: axial k superior; coronal k posterior, j inferior
    grids = {"axial": np.eye(3), "coronal": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)}
    rows = []
    for plane, direction in grids.items():
        for slab in DESS_SLABS_MM:
            fine = 0.5  # a grid at 0.5 mm, averaged over the slab along k
            extent = np.abs(direction.T @ (hi - lo))  # size of the box along i, j, k
            start = np.where(direction.T @ (hi - lo) >= 0, direction.T @ lo, direction.T @ hi)
            per = int(round(slab / fine))
            size = [int(e / fine) for e in extent]
            size[2] -= size[2] % per
            origin = direction @ start
            resampled = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, tuple(origin), (fine,) * 3,
                                      tuple(direction.ravel()), 0.0, sitk.sitkFloat32)
            array = sitk.GetArrayFromImage(resampled)  # (k, j, i)
            slabs = array.reshape(size[2] // per, per, size[1], size[0]).mean(axis=1)
            slab_origin = tuple(origin + direction[:, 2] * (per - 1) * fine / 2)
            image = Image(slabs.astype(np.float32), (fine, fine, slab), slab_origin, direction)
            on_slabs = [sitk.GetArrayFromImage(sitk.Resample(dess.with_array(a).to_sitk(), image.to_sitk(),
                                                             sitk.Transform(), sitk.sitkNearestNeighbor, 0))
                        for a in (reference, np.ones_like(reference))]
            for network_plane in _runs(plane):
                labels, seconds = _run(image, network_plane, weights, net, plane)
                row = {"series": f"real DESS as {plane} {slabs.shape[0]}x{slab} mm", "acquired": plane,
                       "network_plane": network_plane,
                       **_dices(np.where(on_slabs[1] > 0, labels, 0), on_slabs[0]), "seconds": round(seconds, 1)}
                rows.append(row)
                log(json.dumps(row))
    return rows


def _shipped() -> Path:
    from SpineKneeSegLib.engine.weights import find_entry

    return find_entry("knee-bones").path()


def summary(rows: list[dict]) -> dict:
    """Mean Dice (and seconds) per acquisition and network plane."""
    out = {}
    for acquired in dict.fromkeys(r["acquired"] for r in rows):
        for plane in (*NETWORK_PLANES, EVERY_SLICE):
            mine = [r for r in rows if r["acquired"] == acquired and r["network_plane"] == plane]
            if mine:
                out[f"{acquired} on {plane}"] = mean_per_key(mine, (*BONE_NAMES.values(), "mean", "seconds"))
    return out


def main(argv=None) -> int:
    from SpineKneeSegLib.core.datasets import data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=Path, required=True, help="knee_bones.py prepare's volumes.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[777, 1777])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    synthetic = synthetic_series(args.volumes, args.seeds)
    root = data_root()
    real = real_dess_slabs(root) if root is not None and (root / "knee" / "dess-dicom").is_dir() else []
    result = {"synthetic": synthetic, "synthetic_mean": summary(synthetic),
              "real_dess": real, "real_mean": summary(real) if real else {}}
    print(json.dumps({"synthetic_mean": result["synthetic_mean"], "real_mean": result["real_mean"]}, indent=1))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
