"""Transitional lumbosacral anatomy check (4 or 6 lumbar-type vertebrae), from the image and the
level segmentation. It flags; it never relabels (seed 004: a wrong count must not silently shift
every level).

Method (our own; the seed has none): follow the column axis below the lowest segmented level (the
L4->L5 centroid direction) and read a mean-intensity profile through the middle of the bodies.
Each position is scored between the segmented bodies' intensity (0) and the measured L4/L5 disc's
(1). Then, below L5:
- no disc-like run at all: L5 looks fused to the sacrum (sacralised L5, 4 mobile lumbar segments);
- a disc, a body of lumbar height, and a second full disc: a mobile lumbar-type vertebra below L5
  (lumbarised S1 / L6: 6 lumbar-type vertebrae);
- one disc then continuous bone: the usual 5.
A missing L5 with L1-L4 present is also flagged. Sagittal MRI alone cannot settle the count
(that needs a whole-spine localiser), so the result is a flag for the reader, with its evidence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .image import Image


@dataclass(frozen=True)
class TransitionalParameters:
    disc_score: float = 0.5  # fraction of the way from body to disc level that counts as disc
    min_disc_fraction: float = 0.65  # a disc run must be this long relative to the L4/L5 disc's run
    body_range: tuple[float, float] = (0.6, 1.5)  # body below L5: this range x the L5 body height
    min_contrast_sd: float = 0.5  # disc minus body profile level (body SDs) needed to judge at all
    step_mm: float = 0.5


@dataclass
class TransitionalResult:
    status: str  # "typical" | "suspected-4" | "suspected-6" | "undetermined"
    message: str
    evidence: dict = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return self.status.startswith("suspected")

    def as_dict(self) -> dict:
        return {"status": self.status, "flagged": self.flagged, "message": self.message, **self.evidence}


def _points(labels: np.ndarray, image: Image, level: int) -> np.ndarray | None:
    kji = np.argwhere(labels == level)
    if len(kji) < 20:
        return None
    if len(kji) > 20000:
        kji = kji[np.linspace(0, len(kji) - 1, 20000).astype(int)]
    return image.ijk_to_ras_points(kji[:, ::-1].astype(float))


def _column_path(centres: dict[int, np.ndarray], step_mm: float, beyond: float):
    """Points along the column from the middle of L4 to ``beyond`` segments below L5: a quadratic
    through the lowest body centroids (follows lordosis), sampled every ``step_mm`` of arclength.
    Returns (points, unit tangents pointing down)."""
    levels = sorted(centres)[-4:]
    ks = np.array(levels, float)
    xyz = np.array([centres[k] for k in levels])
    coeffs = np.polyfit(ks, xyz, min(2, len(ks) - 1))
    fine = np.linspace(4.0, 5.0 + beyond, 2000)
    curve = np.stack([np.polyval(coeffs[:, c], fine) for c in range(3)], 1)
    arclength = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))]
    ts = np.arange(0.0, arclength[-1], step_mm)
    points = np.stack([np.interp(ts, arclength, curve[:, c]) for c in range(3)], 1)
    tangents = np.gradient(points, axis=0)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    return points, tangents


def _profile(image: Image, points: np.ndarray, tangents: np.ndarray, half_depth: float, half_width: float,
             body_mean: float, body_sd: float) -> np.ndarray:
    """At each path point, the mean |z-score| against the body intensity over a cross-section
    grid (+-70 % of the body's half-depth and half-width): low inside a body, high in a disc
    whether the disc is brighter or darker than marrow."""
    right = np.array([1.0, 0.0, 0.0])
    posterior = np.array([0.0, -1.0, 0.0])[None] - (tangents @ np.array([0.0, -1.0, 0.0]))[:, None] * tangents
    posterior /= np.linalg.norm(posterior, axis=1, keepdims=True)
    f = np.linspace(-0.7, 0.7, 5)
    grid = [(a * half_depth, b * half_width) for a in f for b in f]
    ras = np.stack([points + a * posterior + b * right for a, b in grid], 1)
    ijk = image.ras_to_ijk_points(ras.reshape(-1, 3))
    values = ndimage.map_coordinates(image.array.astype(np.float32), ijk[:, ::-1].T, order=1, mode="nearest")
    return np.abs(values.reshape(len(points), len(grid)) - body_mean).mean(1) / body_sd


def _inside(body: np.ndarray, points: np.ndarray, tolerance_mm: float = 1.5) -> np.ndarray:
    """Path points within ``tolerance_mm`` of the body's voxels."""
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(body).query(points)
    return distance <= tolerance_mm


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index pairs of True runs."""
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def check_transitional(labels: np.ndarray, image: Image,
                       params: TransitionalParameters = TransitionalParameters()) -> TransitionalResult:
    bodies = {k: _points(labels, image, k) for k in range(1, 6)}
    present = [k for k, v in bodies.items() if v is not None]
    if 5 not in present and {1, 2, 3, 4} <= set(present):
        return TransitionalResult("suspected-4", "L5 not found below L4: 4 lumbar-type vertebrae (sacralised L5) "
                                  "or L5 missed; check the count", {"levels_found": present})
    if not {4, 5} <= set(present):
        return TransitionalResult("undetermined", "L4 and L5 are needed to check the lumbosacral junction",
                                  {"levels_found": present})
    l4, l5 = bodies[4], bodies[5]
    centres = {k: v.mean(0) for k, v in bodies.items() if v is not None}
    down = centres[5] - centres[4]
    down /= np.linalg.norm(down)
    posterior = np.array([0.0, -1.0, 0.0]) - np.dot([0.0, -1.0, 0.0], down) * down
    posterior /= np.linalg.norm(posterior)
    heights = {k: float(np.ptp(np.percentile(bodies[k] @ down, [3, 97]))) for k in (4, 5)}
    half_depth = float(np.ptp(np.percentile(l5 @ posterior, [3, 97]))) / 2
    half_width = float(np.ptp(np.percentile(l5 @ np.array([1.0, 0.0, 0.0]), [3, 97]))) / 2
    body_values = np.concatenate([image.array[labels == k].astype(np.float32) for k in (4, 5)])
    body_mean, body_sd = float(np.median(body_values)), float(body_values.std()) + 1e-6
    points, tangents = _column_path(centres, params.step_mm, beyond=2.6)
    profile = _profile(image, points, tangents, half_depth, half_width, body_mean, body_sd)
    # positions along the path relative to the segmented bodies (nearest body voxels along the path)
    t = np.arange(len(points)) * params.step_mm
    inside = {k: _inside(bodies[k], points) for k in (4, 5)}
    if not (inside[4].any() and inside[5].any()):
        return TransitionalResult("undetermined", "the column path misses the L4 or L5 body",
                                  {"levels_found": present})
    l4_bottom, l5_top, l5_bottom = t[inside[4]].max(), t[inside[5]].min(), t[inside[5]].max()
    disc_height = max(float(l5_top - l4_bottom), 1.0)
    in_gap = (t > l4_bottom - 3.0) & (t < l5_top + 3.0)  # with the endplates
    in_body = (t > l5_top + 0.25 * heights[5]) & (t < l5_bottom - 0.25 * heights[5])
    disc_level = float(np.percentile(profile[in_gap], 90)) if in_gap.any() else 0.0
    body_level = float(np.median(profile[in_body])) if in_body.any() else 0.0
    contrast = disc_level - body_level
    evidence = {"levels_found": present, "l4_l5_gap_mm": round(disc_height, 1),
                "l5_height_mm": round(heights[5], 1), "disc_body_contrast_sd": round(contrast, 2)}
    if contrast < params.min_contrast_sd:
        return TransitionalResult("undetermined", "discs and vertebral bodies too similar in intensity to count "
                                  "segments below L5", evidence)
    not_body = profile > body_level + params.disc_score * contrast
    # a disc whose nucleus matches marrow shows as two rims: close gaps up to 1.3 gaps between labelled bodies
    closing = max(1, int(round(1.3 * disc_height / params.step_mm)))
    not_body = ndimage.binary_closing(np.r_[False, not_body, False], np.ones(closing, bool))[1:-1]
    all_runs = [(t[a], t[b - 1]) for a, b in _runs(not_body)]
    middle = (l4_bottom + l5_top) / 2
    reference = [r for r in all_runs if r[0] - 1.0 <= middle <= r[1] + 1.0]
    if not reference:
        return TransitionalResult("undetermined", "the L4/L5 disc is not seen on the column profile", evidence)
    ref_len = reference[0][1] - reference[0][0]
    runs = [r for r in all_runs if r[0] > l5_bottom - 0.5 * disc_height
            and (r[1] - r[0]) >= params.min_disc_fraction * ref_len]
    evidence["l4_l5_disc_profile_mm"] = round(float(ref_len), 1)
    evidence["disc_runs_below_l5_mm"] = [[round(float(a - l5_bottom), 1), round(float(b - l5_bottom), 1)]
                                         for a, b in runs]
    if not runs or runs[0][0] > l5_bottom + 1.5 * disc_height:
        return TransitionalResult("suspected-4", "no disc below L5: L5 looks fused to the sacrum (sacralised L5, "
                                  "4 mobile lumbar segments); check the count", evidence)
    first_end = runs[0][1]
    lo, hi = params.body_range
    second = [r for r in runs[1:] if lo * heights[5] <= r[0] - first_end <= hi * heights[5]]
    if second:
        evidence["body_below_l5_mm"] = round(second[0][0] - first_end, 1)
        return TransitionalResult("suspected-6", "a mobile lumbar-type vertebra below L5 (lumbarised S1 or L6: "
                                  "6 lumbar-type vertebrae); levels are counted from the top and not relabelled",
                                  evidence)
    return TransitionalResult("typical", "5 lumbar vertebrae: one disc below L5, then the sacrum", evidence)
