"""Shared helpers of the synthetic phantoms (each task's generator lives in tasks/<task>/phantom.py).

Each generator draws everything from one seeded ``numpy.random.Generator``, so the same seed gives
bit-identical arrays. Anatomy is described analytically in patient (RAS) millimetres and sampled
at the voxel centres of a realistic, deliberately non-trivial grid (non-unit spacing, non-zero
origin, permuted/flipped direction matrices), so the labels are exact by construction.

This module must share no code with the segmentation methods it is used to test: it imports only
``image.Image`` (the geometry container), ``lazy.LazyModule`` and numpy/scipy.

Conventions: ``Image.array`` is ``[k, j, i]``; RAS +x = patient Right, +y = Anterior,
+z = Superior (LPS +x = patient Left). Label values follow ``labels.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py): a refused input does not wait for it


@dataclass
class Phantom:
    task: str                 # the task card's name
    image: Image              # float32 scan
    labels: Image             # uint8 ground truth, same geometry
    points: list = field(default_factory=list)   # markers (foramina), each a dict with "ras"
    extra: dict = field(default_factory=dict)    # task-specific truth (see each generator)
    description: str = ""


# ------------------------------------------------------------------------------------------------
# shared helpers (geometry, intensity realism) of the task phantoms; used by nothing else
# ------------------------------------------------------------------------------------------------

def origin_for_centre(centre_lps, direction, spacing, size_ijk):
    """Origin that puts the grid centre at ``centre_lps``."""
    half = (np.asarray(size_ijk, float) - 1.0) / 2.0 * np.asarray(spacing, float)
    return tuple(np.asarray(centre_lps, float) - np.asarray(direction, float) @ half)


def ras_grid(img: Image):
    """RAS coordinates of every voxel centre as three float32 arrays shaped like ``img.array``."""
    m = img.ijk_to_ras.astype(np.float32)
    k_n, j_n, i_n = img.array.shape
    i = np.arange(i_n, dtype=np.float32)[None, None, :]
    j = np.arange(j_n, dtype=np.float32)[None, :, None]
    k = np.arange(k_n, dtype=np.float32)[:, None, None]
    shape = img.array.shape
    return tuple(np.broadcast_to(m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3], shape)
                 .astype(np.float32) for r in range(3))


def bias_field(coords, rng, amplitude, scale_mm):
    """Smooth multiplicative field exp(quadratic polynomial) over physical coordinates."""
    x, y, z = ((c - np.float32(0.5 * (c.min() + c.max()))) / np.float32(scale_mm) for c in coords)
    c = rng.normal(0.0, 1.0, 9) * amplitude
    log_b = (c[0] * x + c[1] * y + c[2] * z + 0.5 * (c[3] * x * x + c[4] * y * y + c[5] * z * z)
             + 0.5 * (c[6] * x * y + c[7] * y * z + c[8] * x * z))
    return np.exp(log_b).astype(np.float32)


def rician(rng, img, sigma):
    n1 = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2 ** 2)


_ST2D = np.zeros((3, 3, 3), bool)
_ST2D[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]  # in-plane (per-slice) 4-neighbourhood (generate_binary_structure(2, 1))


def cortical_rim(mask, px):
    """In-plane (per-slice) outer rim of ``mask`` about ``px`` pixels thick (cortical bone)."""
    return mask & ~ndimage.binary_erosion(mask, _ST2D, iterations=px)


def dilate2d(mask, px):
    return ndimage.binary_dilation(mask, _ST2D, iterations=px)


def in_plane_blur(vol, sigma_px):
    return ndimage.gaussian_filter(vol, (0.0, sigma_px, sigma_px)).astype(np.float32)


def finish_scan(tissue, coords, rng, *, bias=0.2, bias_scale=80.0, noise=0.025, blur=0.6, scale=1000.0):
    img = tissue.astype(np.float32)
    if blur:
        img = in_plane_blur(img, blur)
    img *= bias_field(coords, rng, bias, bias_scale)
    img = rician(rng, img, noise)
    return (img * np.float32(scale)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# knee
# ------------------------------------------------------------------------------------------------

def sagittal_direction(k_toward_right: bool, oblique_deg: float = 0.0):
    """LPS direction: i anterior->posterior, j superior->inferior, k toward patient right/left;
    optional rotation of the whole grid about the superior axis (oblique sagittal)."""
    col_i = np.array([0.0, 1.0, 0.0])
    col_j = np.array([0.0, 0.0, -1.0])
    col_k = np.array([-1.0, 0.0, 0.0]) if k_toward_right else np.array([1.0, 0.0, 0.0])
    d = np.c_[col_i, col_j, col_k]
    if oblique_deg:
        t = math.radians(oblique_deg)
        rz = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
        d = rz @ d
    return d


def unit_vector(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


# ------------------------------------------------------------------------------------------------
# lumbar spine
# ------------------------------------------------------------------------------------------------

def largest_component(vox, shape):
    lo = vox.min(0)
    box = np.zeros(tuple(vox.max(0) - lo + 1), bool)
    box[tuple((vox - lo).T)] = True
    lab, n = ndimage.label(box, np.ones((3, 3, 3), bool))
    if n > 1:
        keep = np.argmax(np.bincount(lab.ravel())[1:]) + 1
        box = lab == keep
    return np.argwhere(box) + lo


def grow_blob(rng, c, n, shape):
    """n face-connected voxels grown from c (a tiny lesion)."""
    vox = [tuple(int(v) for v in c)]
    seen = set(vox)
    steps = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    while len(vox) < n:
        base = vox[rng.integers(len(vox))]
        st = steps[rng.integers(6)]
        q = (base[0] + st[0], base[1] + st[1], base[2] + st[2])
        if q in seen or not all(0 <= q[d] < shape[d] for d in range(3)):
            continue
        seen.add(q)
        vox.append(q)
    return np.array(vox)


def ellipsoid_voxels(rng, c, radii_mm, sp, shape, target):
    """Voxels of a randomly rotated, slightly lumpy ellipsoid centred on voxel c; its size is
    rescaled (a few secant steps) so the voxel count lands near ``target``."""
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    bumps = rng.normal(0, 0.08, 3)
    reach = np.ceil(radii_mm.max() * 1.5 / sp).astype(int) + 1
    lo = np.maximum(np.asarray(c) - reach, 0)
    hi = np.minimum(np.asarray(c) + reach + 1, shape)
    kk, jj, ii = np.meshgrid(*(np.arange(lo[d], hi[d]) for d in range(3)), indexing="ij")
    off = np.stack([(kk - c[0]) * sp[0], (jj - c[1]) * sp[1], (ii - c[2]) * sp[2]], -1) @ rot
    q = np.sqrt(((off / radii_mm) ** 2).sum(-1))
    ang = np.arctan2(off[..., 1], off[..., 0])
    q = q * (1.0 + bumps[0] * np.cos(2 * ang) + bumps[1] * np.sin(3 * ang) + bumps[2] * off[..., 2] / radii_mm[2])
    qs = np.sort(q.ravel())
    if target >= len(qs):
        return None
    thr = 0.5 * (qs[target - 1] + qs[target]) if target < len(qs) else qs[-1]
    if thr > 1.4:
        return None  # clipped by the grid edge
    inside = q <= thr
    pts = np.argwhere(inside) + lo
    # keep the component containing the centre (lumps can detach a few voxels)
    lab, _ = ndimage.label(inside, np.ones((3, 3, 3)))
    keep = lab[tuple(np.asarray(c) - lo)]
    if keep == 0:
        return None
    return np.argwhere(lab == keep) + lo if len(pts) else None


# ------------------------------------------------------------------------------------------------
# X-ray (AP pelvis / hip)
# ------------------------------------------------------------------------------------------------

FONT = {
    "A": ".###.#...##...#######...##...##...#", "P": "####.#...##...#####.#....#....#....",
    "E": "######....#....####.#....#....#####", "L": "#....#....#....#....#....#....#####",
    "V": "#...##...##...##...##...#.#.#...#..", "I": ".###...#....#....#....#....#...###.",
    "S": ".#####....#.....###.....#....#####.", "R": "####.#...##...#####.#.#..#..#.#...#",
    "H": "#...##...##...#######...##...##...#", "K": "#...##..#.#.#..##...#.#..#..#.#...#",
    "M": "#...###.###.#.##.#.##...##...##...#", "T": "#####..#....#....#....#....#....#..",
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####", "3": "#####...#...#.....#.....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#...#..##..",
    " ": "." * 35, ":": ".......#....#.........#....#.......", "-": "................###................",
    ".": "................................#..", "/": "....#....#...#...#...#...#....#....",
}


def text_mask(text, px):
    """Boolean mask of ``text`` in a 5x7 bitmap font, each font dot ``px`` pixels."""
    cols = []
    for ch in text.upper():
        bits = FONT.get(ch, FONT[" "])
        glyph = np.array([c == "#" for c in bits[:35]], bool).reshape(7, 5)
        cols.append(np.pad(glyph, ((0, 0), (0, 1))))
    m = np.concatenate(cols, 1)
    return np.kron(m, np.ones((px, px), bool))
