"""Clinical acquisition geometries simulated from a thin-slice volume (issue 22): a thick 2D
acquisition averages the tissue of a whole slab into one slice (partial volume), and in-plane
pixels are area averages when coarser than the source. Image and labels are carried the same way
(the label's partial-volume fraction >= 0.5 makes the coarse label), so a model trained on the
result learns what a small lesion looks like after a thick slab averaged it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from SpineKneeSegLib.core.image import Image  # noqa: E402


@dataclass(frozen=True)
class Acquisition:
    axis: int  # array axis (k, j, i order) along which slices are acquired
    thickness_mm: float  # slice thickness = spacing along that axis (contiguous slabs)
    in_plane_mm: float  # pixel size of the two other axes
    phase_mm: float = 0.0  # where the first slab starts (same anatomy, other slab boundaries)

    def label(self) -> str:
        return f"ax{self.axis}-{self.thickness_mm:.1f}mm-{self.in_plane_mm:.2f}ip-{self.phase_mm:.1f}"


def draw_acquisitions(rng: np.random.Generator, n: int, thickness=(3.0, 8.0), in_plane=(0.4, 1.2)) -> list[Acquisition]:
    """``n`` random clinical geometries: slice thickness and in-plane pixel uniform in the ranges,
    acquisition axis any of the three, random slab phase."""
    out = []
    for _ in range(n):
        t = float(rng.uniform(*thickness))
        out.append(Acquisition(int(rng.integers(3)), round(t, 2), round(float(rng.uniform(*in_plane)), 3),
                               round(float(rng.uniform(0, t)), 2)))
    return out


def box_kernel(width_px: float) -> np.ndarray:
    """Normalised 1D box of (fractional) width ``width_px`` centred on a sample: the two end taps
    carry the fractional part, so a 7.5-pixel slab weighs 7 whole pixels and two halves-of-a-half."""
    if width_px <= 1.0:
        return np.ones(1)
    half = width_px / 2
    n = int(np.ceil(half - 0.5))
    taps = np.ones(2 * n + 1)
    edge = half - (n - 0.5)  # share of the outermost pixels inside the box
    taps[0] = taps[-1] = min(edge, 1.0)
    return taps / taps.sum()


def simulate_acquisition(image: Image, labels: np.ndarray, acq: Acquisition) -> tuple[Image, np.ndarray]:
    """The image and labels as ``acq`` would have acquired them: box-averaged over each target
    voxel's extent (partial volume), then sampled at the target voxel centres (linear)."""
    sp_old = np.asarray(image.spacing[::-1], float)  # (k, j, i)
    sp_new = np.full(3, acq.in_plane_mm)
    sp_new[acq.axis] = acq.thickness_mm
    shape_old = np.asarray(image.array.shape)
    phase_px = np.zeros(3)
    phase_px[acq.axis] = acq.phase_mm / sp_old[acq.axis]
    shape_new = np.floor((shape_old * sp_old - phase_px * sp_old) / sp_new).astype(int)
    if (shape_new < 1).any():
        raise ValueError(f"{acq} leaves no voxel of a {tuple(shape_old)} volume")
    scale = sp_new / sp_old
    offset = 0.5 * scale - 0.5 + phase_px  # target voxel 0's centre in source index coordinates

    def carry(arr: np.ndarray) -> np.ndarray:
        arr = arr.astype(np.float32)
        for ax in range(3):
            if scale[ax] > 1:
                arr = ndimage.convolve1d(arr, box_kernel(scale[ax]), axis=ax, mode="nearest")
        return ndimage.affine_transform(arr, scale, offset=offset, output_shape=tuple(shape_new), order=1,
                                        mode="nearest")

    out = carry(image.array)
    lab = (carry(labels > 0) >= 0.5).astype(np.uint8)
    direction = np.asarray(image.direction, float)
    offset_mm_ijk = (offset * sp_old)[::-1]
    origin = np.asarray(image.origin, float) + direction @ offset_mm_ijk
    return Image(out, tuple(float(s) for s in sp_new[::-1]), tuple(origin), image.direction), lab
