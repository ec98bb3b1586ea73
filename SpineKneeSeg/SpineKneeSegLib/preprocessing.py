"""Slice-wise preprocessing shared by inference and Training/.

The voxel grid is never resampled across slices: slices are taken along the array axis closest to
the task's plane normal, resampled in-plane only, and the network output is resampled back to the
same pixels, so the label map lands on the input's exact grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .image import Image

# Canonical (slice, row, col) directions in LPS per plane: every input is shown to the networks in
# this orientation whatever its file's axis order or flips, so a model sees what it was trained on
# and the same physical image gives the same result. Sagittal matches the shared spine data.
CANONICAL_AXES = {
    "sagittal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),  # slices to patient right; rows down; cols posterior
    "axial": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),  # slices up; rows posterior; cols to patient left
    "coronal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),  # slices posterior; rows down; cols to left
}


@dataclass(frozen=True)
class Orientation:
    """Which numpy axes become (slice, row, col), and which of those are flipped."""

    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.axes)
        return out[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def undo(self, array: np.ndarray) -> np.ndarray:
        out = array[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return np.transpose(out, np.argsort(self.axes))


def canonical_orientation(image: Image, plane: str) -> Orientation:
    if plane == "image" or image.is_2d:
        return Orientation()
    columns = [image.direction[:, 2 - a] for a in range(3)]  # LPS direction of numpy axis a
    remaining, axes, flips = [0, 1, 2], [], []
    for target in CANONICAL_AXES[plane]:  # slice axis first: the most aligned with the normal
        scores = [abs(float(np.dot(columns[a], target))) for a in remaining]
        a = remaining.pop(int(np.argmax(scores)))
        axes.append(a)
        flips.append(bool(np.dot(columns[a], target) < 0))
    return Orientation(tuple(axes), tuple(flips))


def reorient(image: Image, orientation: Orientation) -> Image:
    """The same physical image with its voxels in ``orientation`` (exact: a permutation and flips)."""
    array = orientation.apply(image.array)
    direction = np.zeros((3, 3))
    spacing = [0.0, 0.0, 0.0]
    first_voxel_kji = [0, 0, 0]
    for new_axis, (old_axis, flip) in enumerate(zip(orientation.axes, orientation.flips)):
        old_ijk, new_ijk = 2 - old_axis, 2 - new_axis
        direction[:, new_ijk] = image.direction[:, old_ijk] * (-1 if flip else 1)
        spacing[new_ijk] = image.spacing[old_ijk]
        first_voxel_kji[old_axis] = image.array.shape[old_axis] - 1 if flip else 0
    origin = image.ijk_to_lps_points([first_voxel_kji[::-1]])[0]
    return Image(array, tuple(spacing), tuple(origin), direction, dict(image.meta))


def canonical_image(image: Image, plane: str) -> tuple[Image, Orientation]:
    orientation = canonical_orientation(image, plane)
    return reorient(image, orientation), orientation


def slice_axis(image: Image, plane: str) -> int:
    """Numpy axis of ``image.array`` (0 = k, 1 = j, 2 = i) whose direction is closest to the
    plane normal; for 2D images and plane 'image' it is the single-slice axis 0."""
    return canonical_orientation(image, plane).axes[0]


def to_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """Move the slice axis first: (n_slices, rows, cols)."""
    return np.moveaxis(array, axis, 0)


def from_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(stack, 0, axis)


def in_plane_spacing(image: Image, axis: int) -> tuple[float, float]:
    """(row, col) pixel spacing of slices taken along numpy ``axis``."""
    spacing_by_numpy_axis = tuple(reversed(image.spacing))  # (k, j, i)
    rest = [spacing_by_numpy_axis[a] for a in range(3) if a != axis]
    return rest[0], rest[1]


def foreground_mask(stack: np.ndarray) -> np.ndarray:
    """Voxels above a low percentile: excludes the air/zero background of skull-stripped or
    padded scans from the normalisation statistics."""
    lo = np.percentile(stack, 5)
    mask = stack > lo
    return mask if mask.sum() > 0.05 * mask.size else np.ones_like(mask, dtype=bool)


def foreground_box(stack: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """(slices holding foreground, in-plane box r0, r1, c0, c1) of the voxels brighter than 10 % of
    the range from the 1st to the 99th percentile (the zero or noise-only background around a
    skull-stripped brain); None when nothing is background."""
    lo = float(np.percentile(stack, 1))  # not the minimum: resampling leaves a few negative voxels
    fg = stack > lo + 0.10 * (float(np.percentile(stack, 99)) - lo)
    if fg.all() or not fg.any():
        return None

    def kept(counts):  # stray noise voxels must not stretch the box: need 0.2 % of the peak count
        return np.flatnonzero(counts >= max(1, 0.002 * counts.max()))

    slices = kept(fg.sum(axis=(1, 2)))
    rows, cols = kept(fg.sum(axis=(0, 2))), kept(fg.sum(axis=(0, 1)))
    return slices, (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def crop_in_plane(image: Image, box: tuple[int, int, int, int]) -> Image:
    """A (slices, rows, cols) image cropped in-plane, with the origin of its first kept voxel."""
    r0, r1, c0, c1 = box
    origin = image.ijk_to_lps_points([[c0, r0, 0]])[0]
    return Image(image.array[:, r0:r1, c0:c1], image.spacing, tuple(origin), image.direction)


def normalise(stack: np.ndarray, method: str, stats: dict | None = None) -> np.ndarray:
    stack = stack.astype(np.float32, copy=False)
    stats = stats or {}
    if method == "zscore":
        values = stack[foreground_mask(stack)]
        mean, std = float(values.mean()), float(values.std())
    elif method == "fixed":  # the training population's statistics, stored with the model
        mean, std = float(stats["mean"]), float(stats["std"])
    elif method == "percentile":
        lo, hi = np.percentile(stack, (0.5, 99.5))
        mean, std = float(lo), float(max(hi - lo, 1e-6))
    else:
        raise ValueError(f"unknown normalisation {method!r}")
    return (stack - mean) / max(std, 1e-6)


@dataclass
class SliceGeometry:
    """How network-grid slices map back to the input's pixels."""

    axis: int
    input_hw: tuple[int, int]
    network_hw: tuple[int, int]  # resampled size before padding
    padded_hw: tuple[int, int]


def network_grid(image: Image, axis: int, target_spacing: float | None, multiple: int) -> SliceGeometry:
    h, w = (s for i, s in enumerate(image.array.shape) if i != axis)
    if target_spacing:
        sr, sc = in_plane_spacing(image, axis)
        nh, nw = max(1, round(h * sr / target_spacing)), max(1, round(w * sc / target_spacing))
    else:
        nh, nw = h, w
    ph, pw = (-(-nh // multiple) * multiple, -(-nw // multiple) * multiple)
    return SliceGeometry(axis, (h, w), (nh, nw), (ph, pw))


def network_grid_image(image: Image, grid: SliceGeometry) -> Image:
    """Geometry of the resampled (unpadded) network grid as an Image over a zero-cost array:
    same slices, in-plane pixels scaled so that the field of view is unchanged (pixel-area
    convention: the first pixel centre moves by half the size difference)."""
    shape = [0, 0, 0]
    shape[grid.axis] = image.array.shape[grid.axis]
    in_plane_axes = [a for a in range(3) if a != grid.axis]
    for a, n in zip(in_plane_axes, grid.network_hw):
        shape[a] = n
    spacing = list(image.spacing)  # (i, j, k)
    origin = np.asarray(image.origin, dtype=float)
    for a in in_plane_axes:
        ijk = 2 - a
        new = image.spacing[ijk] * image.array.shape[a] / shape[a]
        origin = origin + image.direction[:, ijk] * (new - image.spacing[ijk]) / 2.0
        spacing[ijk] = new
    return Image(np.broadcast_to(np.zeros((), np.uint8), tuple(shape)), tuple(spacing), tuple(origin),
                 image.direction.copy())


def context_channels(stack: np.ndarray, index: np.ndarray, context: int) -> np.ndarray:
    """(len(index), context, H, W): each slice with its neighbours as channels (edge slices see
    zero padding, as in seed 004's 'pad two empty slices')."""
    half = context // 2
    padded = np.pad(stack, ((half, half), (0, 0), (0, 0)))
    return np.stack([padded[index + offset] for offset in range(context)], axis=1)


def resize_batch(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear in-plane resampling that keeps the field of view (pixel-area convention,
    align_corners=False), so it maps exactly back with the inverse call."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False)


def pad_to(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    dh, dw = size[0] - batch.shape[-2], size[1] - batch.shape[-1]
    return F.pad(batch, (0, dw, 0, dh)) if dh or dw else batch


def training_slices(image: Image, labels: np.ndarray, plane: str, normalisation: str,
                    spacing_mm: float | None, multiple: int = 1) -> tuple[np.ndarray, np.ndarray, SliceGeometry]:
    """What Training/ feeds a network, built by the functions inference uses: canonical slices,
    normalised, resampled in-plane to the network grid (unpadded), float32; labels (same array
    layout as ``image``) resampled nearest-neighbour to the same grid, uint8."""
    canon, orientation = canonical_image(image, plane)
    stack = normalise(canon.array, normalisation)
    grid = network_grid(canon, 0, spacing_mm, multiple)
    x = resize_batch(torch.from_numpy(np.ascontiguousarray(stack))[:, None], grid.network_hw)[:, 0]
    y = torch.from_numpy(np.ascontiguousarray(orientation.apply(labels)).astype(np.float32))[:, None]
    y = F.interpolate(y, size=grid.network_hw, mode="nearest")[:, 0]
    return x.numpy().astype(np.float32), y.numpy().astype(np.uint8), grid
