"""Axial FLAIR-like brain phantom with lesions of known size brackets.
Shares no code with the methods it tests (conventions: core/phantoms.py)."""
from __future__ import annotations

import math

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.core.phantoms import (
    Phantom,
    ellipsoid_voxels,
    finish_scan,
    grow_blob,
    largest_component,
    origin_for_centre,
    ras_grid,
)

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py): a refused input does not wait for it

# WMH size brackets in voxels (GUIDE section 4), half-open [lo, hi)
LESION_BRACKETS = ((0, 10), (10, 400), (400, 1000), (1000, math.inf))

def _bracket_name(b):
    lo, hi = LESION_BRACKETS[b]
    return f"[{lo},{'inf' if hi == math.inf else hi})"


def brain_phantom(seed=0, *, slice_thickness_mm=2.0, pixel_mm=2.0, in_plane=104, skull_stripped=True,
                  lesions_per_bracket=(2, 3, 1, 1), noise=0.025, bias=0.15) -> Phantom:
    """Axial FLAIR-like brain (skull-stripped unless ``skull_stripped=False``) with bright
    white-matter lesions, at least one per WMH size bracket, all 26-connected-separate.

    Label 1 = lesion. ``extra``: lesions (id, voxels, bracket, bracket_index, centroid_ras),
    instances (uint16 per-lesion id map), brain_mask, brackets.
    """
    rng = np.random.default_rng(seed)
    thk = float(slice_thickness_mm)
    k_n = int(round(150.0 / thk))
    shape = (k_n, in_plane, in_plane)
    spacing = (pixel_mm, pixel_mm, thk)
    direction = np.eye(3)
    centre_ras = np.array([rng.uniform(-4, 4), rng.uniform(-20, 0), rng.uniform(10, 30)])
    origin = origin_for_centre(centre_ras * np.array([-1, -1, 1]), direction, spacing,
                                (in_plane, in_plane, k_n))
    img = Image(np.zeros(shape, np.float32), spacing, origin, direction)
    X, Y, Z = ras_grid(img)
    g = 1.0 + rng.uniform(-0.05, 0.05)
    brain_c = centre_ras + np.array([rng.uniform(-2, 2), rng.uniform(-3, 3), 8.0])
    x = X - np.float32(brain_c[0])
    y = Y - np.float32(brain_c[1])
    z = Z - np.float32(brain_c[2])
    f32 = np.float32
    R = np.array([64.0, 80.0, 56.0]) * g

    def waves(n, k_lo, k_hi):
        out = np.zeros(shape, np.float32)
        for _ in range(n):
            kv = rng.normal(0, 1, 3)
            kv = kv / np.linalg.norm(kv) * rng.uniform(k_lo, k_hi)
            out += np.cos(f32(kv[0]) * x + f32(kv[1]) * y + f32(kv[2]) * z + f32(rng.uniform(0, 2 * np.pi)))
        return out / np.float32(math.sqrt(n / 2.0))

    rho = np.sqrt((x / f32(R[0])) ** 2 + (y / f32(R[1])) ** 2 + (z / f32(R[2])) ** 2)
    rho = rho * (1.0 + 0.03 * waves(4, 0.02, 0.05))       # lobar bumps
    flat_base = z > f32(-0.55 * R[2])                      # flattened skull base
    radial = np.sqrt(x * x + y * y + z * z) / np.maximum(rho, f32(1e-3))
    depth = (1.0 - rho) * radial                           # ~ mm below the brain surface
    cerebrum = (rho <= 1.0) & flat_base
    cb = ((x / f32(46 * g)) ** 2 + ((y + f32(40 * g)) / f32(28 * g)) ** 2 +
          ((z + f32(40 * g)) / f32(18 * g)) ** 2) <= 1.0
    stem = ((x ** 2 + (y + f32(14 * g)) ** 2) <= f32((10 * g) ** 2)) & (z < f32(-10 * g)) & (z > f32(-70 * g))
    brain = cerebrum | cb | stem
    cerebrum &= ~ndimage.binary_dilation(cb | stem, iterations=1)   # tentorium: cerebellum apart
    gyri = waves(10, 0.18, 0.32)
    tissue = np.zeros(shape, np.float32)
    tissue[brain] = 0.42                                  # white matter (FLAIR)
    sulcal_depth = 12.0 * np.clip(1.0 - np.abs(gyri) / 0.7, 0, 1)   # deepest on the folds
    gm = cerebrum & (depth < 4.5 + sulcal_depth)
    tissue[gm] = 0.56
    sulci = cerebrum & (np.abs(gyri) < 0.08) & (depth < sulcal_depth)
    fissure = cerebrum & (np.abs(x) < 1.3) & (z > f32(-5.0)) & (depth < 45)
    tissue[cb] = 0.5 + 0.06 * np.cos(z[cb] * 1.4)         # cerebellar folia
    tissue[stem] = 0.44
    deep = np.zeros(shape, bool)
    for sx in (-1, 1):
        deep |= ((x - f32(sx * 11 * g)) / f32(8 * g)) ** 2 + ((y + f32(8 * g)) / f32(13 * g)) ** 2 + \
            ((z - f32(2 * g)) / f32(9 * g)) ** 2 <= 1.0      # thalamus
        deep |= ((x - f32(sx * 21 * g)) / f32(7 * g)) ** 2 + ((y - f32(9 * g)) / f32(13 * g)) ** 2 + \
            ((z - f32(4 * g)) / f32(9 * g)) ** 2 <= 1.0      # basal ganglia
    tissue[deep] = 0.5
    vent = np.zeros(shape, bool)
    for sx in (-1, 1):
        vy = y / f32(30 * g)
        vent |= ((x - f32(sx * 7.5 * g)) / f32(5.5 * g)) ** 2 + vy ** 2 + \
            ((z - f32(16 * g) + f32(8 * g) * vy ** 2) / f32(8 * g)) ** 2 <= 1.0
    vent |= (np.abs(x) < f32(2.0)) & (np.abs(y + f32(4)) < f32(14 * g)) & (z < f32(8 * g)) & (z > f32(-6 * g))
    csf = (sulci | fissure | vent) & brain
    tissue[csf] = 0.06
    # white matter available for lesions: not cortex/sulci/deep/ventricles, away from them by 1 voxel
    wm = cerebrum & ~gm & ~csf & ~deep & (depth > 6.0)
    wm = ndimage.binary_erosion(wm, iterations=1)
    vent_near = ndimage.binary_dilation(vent, iterations=1)
    wm &= ~vent_near

    # ---- lesions
    instances = np.zeros(shape, np.uint16)
    forbid = np.zeros(shape, bool)                        # dilated (26-nbh) existing lesions
    st26 = np.ones((3, 3, 3), bool)
    targets = []
    bracket_targets = [(1, 9), (20, 300), (480, 900), (1150, 1700)]
    for b in (3, 2, 1, 0):                                # biggest first
        for _ in range(lesions_per_bracket[b]):
            targets.append((b, int(rng.integers(*bracket_targets[b]))))
    sp = np.array([thk, pixel_mm, pixel_mm])              # mm per (k, j, i)
    wm_depth = ndimage.distance_transform_edt(wm, sampling=sp)   # mm to the nearest non-WM voxel
    lesions = []
    lesion_id = 0
    for b, target in targets:
        placed = False
        r_eq = (target * float(np.prod(sp)) * 3 / (4 * math.pi)) ** (1 / 3)
        wm_idx = np.argwhere(wm_depth >= min(0.8 * r_eq, float(wm_depth.max()) * 0.8))
        for _attempt in range(300):
            c = wm_idx[rng.integers(len(wm_idx))]
            if b == 0:
                vox = grow_blob(rng, c, target, shape)
            else:
                vol_mm3 = target * float(np.prod(sp))
                ax_r = rng.uniform(0.6, 1.6, 3)
                ax_r *= (vol_mm3 / (4.0 / 3.0 * math.pi * np.prod(ax_r))) ** (1 / 3)
                vox = ellipsoid_voxels(rng, c, ax_r, sp, shape, target)
            if vox is None:
                continue
            kk, jj, ii = vox.T
            if b > 0 and not wm[kk, jj, ii].all():
                # conform a large lesion to the white matter: keep its biggest 26-connected part
                if wm[kk, jj, ii].mean() < 0.8:
                    continue
                vox = largest_component(vox[wm[kk, jj, ii]], shape)
                kk, jj, ii = vox.T
            if not (LESION_BRACKETS[b][0] <= len(vox) < LESION_BRACKETS[b][1]):
                continue
            if not wm[kk, jj, ii].all() or forbid[kk, jj, ii].any():
                continue
            lesion_id += 1
            instances[kk, jj, ii] = lesion_id
            box = tuple(slice(max(v.min() - 2, 0), v.max() + 3) for v in (kk, jj, ii))
            forbid[box] |= ndimage.binary_dilation(instances[box] == lesion_id, st26, iterations=2)
            cen = img.ijk_to_ras_points([[ii.mean(), jj.mean(), kk.mean()]])[0]
            lesions.append({"id": lesion_id, "voxels": int(len(vox)), "bracket_index": b,
                            "bracket": _bracket_name(b), "centroid_ras": tuple(float(v) for v in cen)})
            placed = True
            break
        if not placed:
            raise RuntimeError(f"could not place a lesion of {target} voxels (seed {seed})")
    lesion_mask = instances > 0
    lesion_int = np.zeros(shape, np.float32)
    for les in lesions:
        lesion_int[instances == les["id"]] = rng.uniform(0.8, 0.98)
    tissue = np.where(lesion_mask, lesion_int, tissue)

    brain_mask = brain.copy()
    if not skull_stripped:
        rho_s = np.sqrt((x / f32(R[0])) ** 2 + (y / f32(R[1])) ** 2 + (z / f32(R[2])) ** 2)
        dist = (rho_s - 1.0) * np.sqrt(x * x + y * y + z * z) / np.maximum(rho_s, f32(1e-3))
        outside = ~brain & (z > f32(-75 * g))
        layers = [(3.0, 0.05), (4.5, 0.03), (7.0, 0.45), (8.5, 0.03), (14.0, 0.78), (16.0, 0.4)]
        lo = -1e9
        for hi, val in layers:
            tissue[outside & (dist > lo) & (dist <= hi)] = val
            lo = hi
    arr = finish_scan(tissue, (X, Y, Z), rng, bias=bias, noise=noise, blur=0.0, bias_scale=100.0)
    if skull_stripped:  # brain-extraction tools set everything outside the brain to 0
        arr[~brain_mask] = 0.0
    labels = lesion_mask.astype(np.uint8)
    return Phantom(
        task="brain-wmh", image=img.with_array(arr), labels=img.with_array(labels), points=[],
        extra={"lesions": lesions, "instances": instances, "brain_mask": brain_mask,
               "brackets": [_bracket_name(b) for b in range(4)], "skull_stripped": skull_stripped,
               "slice_thickness_mm": thk, "label_names": {1: "lesion"}},
        description=(f"axial FLAIR-like brain{'' if skull_stripped else ' with skull'}, {len(lesions)} "
                     f"lesions, {shape} voxels, spacing {spacing} mm, seed {seed}"))
