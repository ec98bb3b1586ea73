"""Seed 000's merged variant: one "any bone" mask split into femur, tibia, fibula and patella by
connected components and position (the seed found a merged channel trained better than three)."""
from __future__ import annotations

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.engine.hooks import label_decoder

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py): a refused input does not wait for it


def _lps_coords(image: Image, kji: np.ndarray) -> np.ndarray:
    return image.ijk_to_lps_points(kji[:, ::-1].astype(float))


def _joint_level(s: np.ndarray) -> float:
    """S coordinate of the narrowest 1 mm slab in the middle 60 % of a fused femur+tibia component
    (the joint space is where the merged bone is thinnest)."""
    lo, hi = np.percentile(s, (20, 80))
    bins = np.arange(np.floor(lo), np.ceil(hi) + 1.0)
    counts, edges = np.histogram(s, bins=bins)
    if len(counts) == 0:
        return float(np.median(s))
    i = int(np.argmin(counts))
    return float((edges[i] + edges[i + 1]) / 2)


def split_touching(mask: np.ndarray, spacing_kji, radius_mm: float = 1.5,
                   min_fraction: float = 0.02) -> list[np.ndarray]:
    """Bones that touch through a thin bridge (fibular head on the tibia, condyles on the plateau):
    erode, label the pieces, give every original voxel to the nearest piece. Largest first."""
    eroded = ndimage.distance_transform_edt(mask, sampling=spacing_kji) > radius_mm  # in mm: slices are thick
    seeds, n = ndimage.label(eroded, structure=np.ones((3, 3, 3), bool))
    if n < 2:
        return [mask]
    sizes = np.bincount(seeds.ravel())[1:]
    keep = [i + 1 for i in np.argsort(sizes)[::-1] if sizes[i] >= min_fraction * sizes.max()]
    if len(keep) < 2:
        return [mask]
    seeds = np.where(np.isin(seeds, keep), seeds, 0)
    _, nearest = ndimage.distance_transform_edt(seeds == 0, sampling=spacing_kji, return_indices=True)
    owner = seeds[tuple(nearest)]
    return [mask & (owner == k) for k in keep]


FUSED_RATIO = 0.25  # second piece below this share of the largest: femur and tibia are one piece
# (in a knee field of view the femur and tibia are of similar size; the patella is < 0.2 of either)


def split_any_bone(mask: np.ndarray, image: Image, min_ml: float = 0.3) -> np.ndarray:
    """Labels 1 femur, 2 tibia, 3 fibula, 4 patella from a boolean bone mask on ``image``'s grid.

    Components are first split where bones touch through a thin bridge (``split_touching``). The
    two largest pieces are femur (the higher one, patient superior) and tibia; a fused femur + tibia
    (the only piece, or the next one under FUSED_RATIO of it) is cut at its narrowest level. Of the
    rest (LPS: y posterior, z superior), the largest above the joint and anterior to the femur's
    centre is the patella, the largest below the joint and posterior to the tibia's centre the
    fibula; anything else is dropped as stray."""
    out = np.zeros(mask.shape, np.uint8)
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return out
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    sizes = np.bincount(components.ravel())[1:]
    order = [int(i) + 1 for i in np.argsort(sizes)[::-1] if sizes[i] * voxel_ml >= min_ml]
    if not order:
        return out
    spacing_kji = tuple(reversed(image.spacing))
    boxes = ndimage.find_objects(components)
    pieces = []  # (mask, LPS centroid, voxels): components, touching bones separated
    for c in order[:4]:
        box = boxes[c - 1]
        for sub in split_touching(components[box] == c, spacing_kji):  # on the component's box: fast
            if sub.sum() * voxel_ml >= min_ml:
                part = np.zeros(mask.shape, bool)
                part[box] = sub
                kji = np.argwhere(part)
                pieces.append((part, _lps_coords(image, kji[:: max(1, len(kji) // 20000)]).mean(axis=0), sub.sum()))
    pieces.sort(key=lambda p: -p[2])
    if len(pieces) == 1 or pieces[1][2] < FUSED_RATIO * pieces[0][2]:
        # femur and tibia fused beyond what erosion separates (the next piece is patella-sized):
        # cut the largest piece at its narrowest level; the other pieces stay candidates
        part = pieces[0][0]
        kji = np.argwhere(part)
        lps = _lps_coords(image, kji)
        upper = lps[:, 2] >= _joint_level(lps[:, 2])
        femur, tibia = np.zeros(mask.shape, bool), np.zeros(mask.shape, bool)
        femur[tuple(kji[upper].T)] = True
        tibia[tuple(kji[~upper].T)] = True
        femur_c, tibia_c = lps[upper].mean(axis=0), lps[~upper].mean(axis=0)
        rest = pieces[1:]
    else:
        (a, ca, _), (b, cb, _) = pieces[:2]
        (femur, femur_c), (tibia, tibia_c) = ((a, ca), (b, cb)) if ca[2] >= cb[2] else ((b, cb), (a, ca))
        rest = pieces[2:]
    out[femur], out[tibia] = 1, 2
    level = (femur_c[2] + tibia_c[2]) / 2
    patella = next((p for p in rest if p[1][2] > level and p[1][1] < femur_c[1]), None)
    fibula = next((p for p in rest if p is not patella and p[1][2] < level and p[1][1] > tibia_c[1]), None)
    if patella is not None:
        out[patella[0]] = 4
    if fibula is not None:
        out[fibula[0]] = 3
    return out


@label_decoder("merged", channels=2)
def decode_merged(labels: np.ndarray, image: Image) -> tuple[np.ndarray, dict]:
    """Seed 000's merged "any bone" network (0/1) split into femur, tibia, fibula and patella by
    ``split_any_bone``; the summary keeps the network's own bone mask honest: how much of it the
    split kept."""
    from SpineKneeSegLib.engine.postprocessing import dice

    bone = labels > 0
    split = split_any_bone(bone, image)
    return split, {"raw_bone_vs_split_dice": round(dice(bone, split > 0) or 0.0, 4)}
