"""Foramen localisation from per-level probability maps (seed 004) and foramen naming.

"L<k> left|right" is the foramen of the L<k>/L<k+1> motion segment (L5 = L5/S1), on the patient's
side as the direction matrix says (RAS +x = patient right). Written by hand because the seed
defines it: threshold, connected components, k-means (k=2) on the lateral coordinate of the
candidates to split left/right (fall back to the middle slice when there are too few candidates or
they are not spread), largest component per side = that level's foramen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .image import Image

LEVELS = (1, 2, 3, 4, 5)
SIDES = ("left", "right")


def foramen_label(level: int, side: str) -> str:
    if level not in LEVELS or side not in SIDES:
        raise ValueError(f"no foramen L{level} {side}")
    return f"L{level} {side}"


def motion_segment(level: int) -> str:
    return f"L{level}/S1" if level == 5 else f"L{level}/L{level + 1}"


def side_of(ras_x: float, midline_x: float) -> str:
    return "right" if ras_x > midline_x else "left"


@dataclass
class Foramen:
    level: int
    side: str
    ras: tuple[float, float, float]
    probability: float
    voxels: int
    slices: tuple[int, int]  # first and last slice index (along the lateral axis) it spans

    @property
    def label(self) -> str:
        return foramen_label(self.level, self.side)

    @property
    def description(self) -> str:
        return (f"foramen {motion_segment(self.level)} {self.side}; predicted; p={self.probability:.2f}; "
                f"slices {self.slices[0]}-{self.slices[1]}")


def lateral_axis(image: Image) -> int:
    """Numpy axis whose direction is closest to patient left-right."""
    return 2 - int(np.argmax(np.abs(image.direction[0, :])))


def _kmeans_1d(values: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Two-cluster Lloyd's on 1D values, initialised at the extremes (deterministic)."""
    centres = np.array([values.min(), values.max()], dtype=float)
    assign = np.zeros(len(values), dtype=int)
    for _ in range(iterations):
        assign = np.abs(values[:, None] - centres[None, :]).argmin(axis=1)
        new = np.array([values[assign == c].mean() if np.any(assign == c) else centres[c] for c in (0, 1)])
        if np.allclose(new, centres):
            break
        centres = new
    return assign


def localise_foramina(probabilities: np.ndarray, image: Image, threshold: float = 0.5,
                      min_candidates: int = 5, min_spread_slices: float = 4.0) -> list[Foramen]:
    """``probabilities``: (5, *image.array.shape), float 0..1 or uint8 0..255, one map per level."""
    scale = 255.0 if probabilities.dtype == np.uint8 else 1.0
    lat = lateral_axis(image)
    middle_slice = (image.array.shape[lat] - 1) / 2.0
    structure = np.ones((3, 3, 3), dtype=bool)
    found: list[Foramen] = []
    midline_x = image.ijk_to_ras_points([(np.array(image.size_ijk) - 1) / 2.0])[0, 0]
    for level_index, level in enumerate(LEVELS):
        prob = probabilities[level_index]
        comp, n = ndimage.label(prob >= threshold * scale, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        lateral = _mean_index_per_component(comp, n, sizes, lat)
        # Candidates are components; when few or not spread apart, split at the middle slice.
        if n > min_candidates and np.ptp(lateral) >= min_spread_slices:
            groups = _kmeans_1d(lateral)
        else:
            groups = (lateral > middle_slice).astype(int)
        sides = []
        for g in (0, 1):
            members = np.flatnonzero(groups == g)
            if len(members):
                best = int(members[np.argmax(sizes[members])])
                sides.append((best, _describe_component(comp, best + 1, prob)))
        if len(sides) == 2:  # name the two sides by their relative RAS x: +x is patient right
            xs = [image.ijk_to_ras_points([d["centre"][::-1]])[0, 0] for _, d in sides]
            names = ["right", "left"] if xs[0] > xs[1] else ["left", "right"]
        else:
            names = [side_of(image.ijk_to_ras_points([sides[0][1]["centre"][::-1]])[0, 0], midline_x)]
        for (best, d), side in zip(sides, names):
            ras = image.ijk_to_ras_points([d["centre"][::-1]])[0]
            found.append(Foramen(level, side, tuple(round(float(v), 3) for v in ras), d["mean"] / scale,
                                 int(sizes[best]), d["span"][lat]))
    return found


def _mean_index_per_component(comp: np.ndarray, n: int, sizes: np.ndarray, axis: int) -> np.ndarray:
    """Mean voxel index along ``axis`` of every component in one vectorised pass (noisy maps can
    hold thousands of specks; a per-component loop was most of the run time)."""
    shape = [1, 1, 1]
    shape[axis] = comp.shape[axis]
    index = np.broadcast_to(np.arange(comp.shape[axis], dtype=np.float32).reshape(shape), comp.shape)
    return np.bincount(comp.ravel(), weights=index.ravel(), minlength=n + 1)[1:] / np.maximum(sizes, 1)


def _describe_component(comp: np.ndarray, c: int, prob: np.ndarray) -> dict:
    """Centre (k, j, i), index span per axis and mean probability of component ``c``."""
    coords = np.nonzero(comp == c)
    return {"centre": [float(x.mean()) for x in coords], "span": [(int(x.min()), int(x.max())) for x in coords],
            "mean": float(prob[coords].mean())}


def foramina_summary(foramina: list[Foramen]) -> dict:
    found = {f.label for f in foramina}
    expected = [foramen_label(level, side) for level in LEVELS for side in SIDES]
    return {"found": len(found), "expected": len(expected), "missing": [e for e in expected if e not in found]}
