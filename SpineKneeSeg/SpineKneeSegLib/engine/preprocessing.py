"""Slice-wise preprocessing shared by inference and Training/.

The voxel grid is never resampled across slices: slices are taken along the array axis closest to
the task's plane normal, resampled in-plane only, and the network output is resampled back to the
same pixels, so the label map lands on the input's exact grid.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from SpineKneeSegLib.core.image import Image

if TYPE_CHECKING:  # torch loads only when slices go to a network: input checks stay fast
    import torch

# Canonical (slice, row, col) directions in LPS per plane: every input is shown to the networks in
# this orientation whatever its file's axis order or flips, so a model sees what it was trained on
# and the same physical image gives the same result. Sagittal matches the shared spine data.
CANONICAL_AXES = {
    # sagittal: slices to patient right; rows down; cols posterior
    "sagittal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
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


PLANES = ("sagittal", "coronal", "axial")  # order breaks ties: sagittal first


def acquisition_axis(image: Image) -> int | None:
    """Numpy axis with the largest spacing (the acquisition's slice axis: 2D MRI sequences have
    thick slices); None when the largest spacing is tied within 1 % (isotropic 3D acquisitions)."""
    if image.is_2d:
        return 0
    spacing = np.array(tuple(reversed(image.spacing)))  # by numpy axis (k, j, i)
    order = np.argsort(-spacing, kind="stable")
    if spacing[order[0]] <= 1.01 * spacing[order[1]]:
        return None
    return int(order[0])


def acquisition_plane(image: Image) -> str:
    """The plane ('sagittal' | 'coronal' | 'axial') whose normal is closest to the acquisition
    axis; 'sagittal' when the grid is isotropic (no acquisition axis); 'image' for 2D images."""
    if image.is_2d:
        return "image"
    axis = acquisition_axis(image)
    if axis is None:
        return "sagittal"
    column = image.direction[:, 2 - axis]  # LPS direction of the numpy axis
    scores = [abs(float(np.dot(column, CANONICAL_AXES[p][0]))) for p in PLANES]
    return PLANES[int(np.argmax(scores))]  # argmax takes the first of ties: sagittal


def acquisition_planes(plane: str) -> tuple[str, ...] | None:
    """The planes an 'acquisition' plane may take: 'acquisition' any; 'acquisition:sagittal,coronal'
    those (a model trained on sagittal and coronal slices has never seen axial ones); None for a
    fixed plane."""
    if plane == "acquisition":
        return PLANES
    if plane.startswith("acquisition:"):
        planes = tuple(p.strip() for p in plane.split(":", 1)[1].split(","))
        if not planes or any(p not in PLANES for p in planes):
            raise ValueError(f"plane {plane!r}: 'acquisition:' takes a comma list of {', '.join(PLANES)}")
        return planes
    return None


def resolve_plane(image: Image, plane: str) -> str:
    """A task's plane for this image: 'acquisition' becomes the concrete plane it is shown in; an
    acquisition in a plane the task does not take runs on reformats in the first one it takes."""
    allowed = acquisition_planes(plane)
    if allowed is None:
        return plane
    acquired = acquisition_plane(image)
    return acquired if acquired in allowed or acquired == "image" else allowed[0]


REFORMAT_NOTE_RATIO = 2.0  # a fixed-plane task's reformats are said when slices are this many pixels apart


def reformatted_from(image: Image, plane: str) -> str | None:
    """The acquisition plane a task runs reformats of, else None: one an 'acquisition:...' task
    does not take; for a fixed-plane task (lumbar sagittal, brain axial), a 2D acquisition in
    another plane whose slices are at least REFORMAT_NOTE_RATIO pixels apart (its reformats are
    blurred across the slices; a near-isotropic 3D acquisition's are not)."""
    if image.is_2d or plane == "image":
        return None
    allowed = acquisition_planes(plane)
    if allowed is None:
        axis = acquisition_axis(image)
        if axis is None:
            return None
        spacing = tuple(reversed(image.spacing))  # by numpy axis
        if spacing[axis] < REFORMAT_NOTE_RATIO * min(spacing):
            return None
        acquired = acquisition_plane(image)
        return None if acquired == plane else acquired
    acquired = acquisition_plane(image)
    return None if acquired in allowed else acquired


# A radiograph's display convention (PatientOrientation L\\F): columns toward patient left, rows
# toward the feet; every X-ray model was trained on radiographs so shown
RADIOGRAPH_COLUMNS_LPS, RADIOGRAPH_ROWS_LPS = (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)


def radiograph_display(image: Image) -> Orientation | None:
    """The turn and/or flip that shows a 2D image upright in the radiographic convention, when its
    file states its patient directions (``meta['patient_axes']``: a DICOM radiograph's
    PatientOrientation, or ImageOrientationPatient) and they span a frontal view; None when the
    file does not say (PNG, JPEG, NIfTI: shown as stored) or the view is not frontal (one image
    axis runs anterior-posterior: a lateral) or an input check asked for it as stored
    (``meta['display']``). ``meta['display_turn']``: a turn being tried (engine/upright.py)."""
    if not image.is_2d or image.meta.get("display") == "as stored":
        return None
    if image.meta.get("display_turn") is not None:  # a turn tried by engine/upright.py
        return image.meta["display_turn"]
    if not image.meta.get("patient_axes"):
        return None
    by_axis = {2: image.direction[:, 0], 1: image.direction[:, 1]}  # numpy axis -> its LPS direction
    main = {axis: int(np.argmax(np.abs(d))) for axis, d in by_axis.items()}  # 0 L-R, 1 A-P, 2 S-I
    if sorted(main.values()) != [0, 2]:
        return None
    row_axis = next(axis for axis, m in main.items() if m == 2)
    col_axis = 3 - row_axis
    return Orientation((0, row_axis, col_axis),
                       (False, bool(np.dot(by_axis[row_axis], RADIOGRAPH_ROWS_LPS) < 0),
                        bool(np.dot(by_axis[col_axis], RADIOGRAPH_COLUMNS_LPS) < 0)))


def canonical_orientation(image: Image, plane: str) -> Orientation:
    """``plane`` 'acquisition': slices along the acquisition axis (largest spacing) whatever its
    obliquity, shown in the canonical orientation of the closest of sagittal/coronal/axial; an
    acquisition the task does not take (see ``acquisition_planes``): slices along the axis closest
    to its first plane's normal. A 2D image: upright in the radiographic convention where its
    file says how (``radiograph_display``), else as stored."""
    if plane == "image" or image.is_2d:
        return radiograph_display(image) or Orientation()
    forced = acquisition_axis(image) if acquisition_planes(plane) and reformatted_from(image, plane) is None else None
    plane = resolve_plane(image, plane)
    columns = [image.direction[:, 2 - a] for a in range(3)]  # LPS direction of numpy axis a
    remaining, axes, flips = [0, 1, 2], [], []
    for n, target in enumerate(CANONICAL_AXES[plane]):  # slice axis first: the most aligned with the normal
        if n == 0 and forced is not None:
            a = forced
            remaining.remove(a)
        else:
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


def sampled_percentile(stack: np.ndarray, q):
    """np.percentile over at most ~1 M evenly strided voxels: a full sort of a 7 M-voxel brain
    costs ~0.1 s, which the speed rule cannot afford, and percentiles of intensity need no more.
    8- and 16-bit integers: the same value, read from the voxels' histogram."""
    flat = stack.ravel()
    sample = flat[::max(1, flat.size // 1_000_000)]
    hist = integer_histogram(sample)
    return np.percentile(sample, q) if hist is None else histogram_percentile(*hist, q)


def integer_histogram(values: np.ndarray, stride: int = 1) -> tuple[np.ndarray, int] | None:
    """(count of each value, the value of bin 0) of ``values[::stride]`` (1-D) when they are 8- or
    16-bit integers and not empty, else None. O(n), against np.percentile's partition (8 ms for a
    381 x 381 x 20 lumbar scan's sample, the histogram 3 ms)."""
    if values.dtype.kind not in "ui" or values.dtype.itemsize > 2 or values[::stride].size == 0:
        return None
    bins = 1 << (8 * values.dtype.itemsize)
    bits = values.view(np.uint8 if values.dtype.itemsize == 1 else np.uint16)  # signed: two's complement
    counts = np.bincount(bits[::stride], minlength=bins)
    if values.dtype.kind == "u":
        return counts, 0
    return np.concatenate([counts[bins // 2:], counts[:bins // 2]]), -(bins // 2)


def histogram_percentile(counts: np.ndarray, first: int, q):
    """np.percentile (its default, linear method) of the values a histogram counts, to the bit:
    the same virtual index, order statistics and interpolation (numpy's _lerp)."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for quantile in np.atleast_1d(np.true_divide(q, 100)):
        virtual = (n - 1) * quantile
        below = int(np.floor(virtual))
        if virtual >= n - 1:
            below = above = n - 1
        elif virtual < 0:
            below = above = 0
        else:
            above = below + 1
        a, b = (first + int(np.searchsorted(cumulative, k + 1)) for k in (below, above))
        t = float(virtual - below)
        diff = float(b - a)
        out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
    return np.array(out) if np.ndim(q) else np.float64(out[0])


FOREGROUND_PERCENTILE = 5  # foreground: voxels above this percentile ...
MIN_FOREGROUND_SHARE = 0.05  # ... when they are more than this share of the volume (else all voxels)


def foreground_mask(stack: np.ndarray) -> np.ndarray:
    """Voxels above a low percentile: excludes the air/zero background of skull-stripped or
    padded scans from the normalisation statistics (_integer_zscore_stats applies the same rule
    to a histogram)."""
    lo = sampled_percentile(stack, FOREGROUND_PERCENTILE)
    mask = stack > lo
    return mask if mask.sum() > MIN_FOREGROUND_SHARE * mask.size else np.ones_like(mask, dtype=bool)


def foreground_box(stack: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """(slices holding foreground, in-plane box r0, r1, c0, c1) of the voxels brighter than 10 % of
    the range from the 1st to the 99th percentile (the zero or noise-only background around a
    skull-stripped brain); None when nothing is background."""
    lo, hi = (float(v) for v in sampled_percentile(stack, (1, 99)))  # not the min: resampling leaves negatives
    fg = stack > lo + 0.10 * (hi - lo)
    if fg.all() or not fg.any():
        return None

    def kept(counts):  # stray noise voxels must not stretch the box: need 0.2 % of the peak count
        return np.flatnonzero(counts >= max(1, 0.002 * counts.max()))

    slices = kept(fg.sum(axis=(1, 2)))
    rows, cols = kept(fg.sum(axis=(0, 2))), kept(fg.sum(axis=(0, 1)))
    # a 4-pixel margin keeps the brain's thin edges that the noise rule cuts off
    h, w = stack.shape[1:]
    return slices, (max(0, int(rows[0]) - 4), min(h, int(rows[-1]) + 5), max(0, int(cols[0]) - 4),
                    min(w, int(cols[-1]) + 5))


def crop_in_plane(image: Image, box: tuple[int, int, int, int]) -> Image:
    """A (slices, rows, cols) image cropped in-plane, with the origin of its first kept voxel."""
    r0, r1, c0, c1 = box
    origin = image.ijk_to_lps_points([[c0, r0, 0]])[0]
    return Image(image.array[:, r0:r1, c0:c1], image.spacing, tuple(origin), image.direction)


def edge_bands(a: np.ndarray, tolerance: float = 0.01) -> tuple[int, int, int, int]:
    """(first, last + 1) row and column of a 2D image without the constant bands along its edges
    (rows or columns whose spread is under ``tolerance`` of the image's range: collimation
    shutters, padding): the exposed field's rectangle."""
    span = float(a.max() - a.min()) or 1.0
    bounds = []
    for axis in (0, 1):
        flat = (a.max(axis=1 - axis) - a.min(axis=1 - axis)) < tolerance * span
        inside = np.flatnonzero(~flat)
        bounds += [int(inside[0]), int(inside[-1]) + 1] if len(inside) else [0, 0]
    return tuple(bounds)


def field_mask(a: np.ndarray, tolerance: float = 0.01) -> np.ndarray:
    """The exposed field of a radiograph: without constant bands along the edges (collimation,
    padding) and without the image's extreme grey values (burned-in text and markers are drawn
    at one of them)."""
    r0, r1, c0, c1 = edge_bands(a, tolerance)
    mask = np.zeros(a.shape, bool)
    mask[r0:r1, c0:c1] = True
    mask &= (a > a.min()) & (a < a.max())
    return mask


FIELD_CLIP = (-0.1, 1.1)  # normalised: the 0.5 / 99.5 % field percentiles map to 0 / 1


def normalise_radiograph(a: np.ndarray) -> np.ndarray:
    """Percentile normalisation of one radiograph that collimation and burned-in text cannot
    drive: the 0.5 / 99.5 % percentiles of the exposed field only; the bands along the edges
    show the field's nearest edge (what a shutter hides is not invented, nor drawn as a bright
    frame the network never saw); text and other outliers are clipped just beyond the field's
    range."""
    r0, r1, c0, c1 = edge_bands(a)
    if r1 - r0 < 2 or c1 - c0 < 2:  # nothing but bands: plain percentiles
        lo, hi = (float(v) for v in sampled_percentile(a, (0.5, 99.5)))
        return ((a - lo) / max(hi - lo, 1e-6)).astype(np.float32)
    field = a[r0:r1, c0:c1]
    inside = field[(field > a.min()) & (field < a.max())]
    lo, hi = (float(v) for v in sampled_percentile(inside if inside.size else field, (0.5, 99.5)))
    out = np.clip((field.astype(np.float32) - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-6)), *FIELD_CLIP)
    return np.pad(out, ((r0, a.shape[0] - r1), (c0, a.shape[1] - c1)), mode="edge")


def normalisation_stats(stack: np.ndarray, method: str, stats: dict | None = None) -> tuple[float, float]:
    """(centre, scale) of the normalisation, in float64: a float32 variance of intensities scaled
    by 1e17 or more overflows to inf and would zero the whole image. Refuses (InputError, no path:
    the caller names the file) a spread that is not finite or not positive."""
    from SpineKneeSegLib.core.errors import InputError

    stack = np.asarray(stack)
    if method == "zscore":
        # over a large volume (a 512 x 512 x 80 knee: 21 M voxels) every k-th voxel, <= 4 M of them:
        # on the DESS knee the mean and SD moved by 0.002 % and 0.005 %, and the full float64 std had
        # taken 0.9 s a call in a profile under load; smaller volumes (a 1 mm brain, 7 M) keep every
        # voxel, exactly as before
        flat = stack.reshape(-1)
        flat = flat[::max(1, flat.size // 4_000_000)]
        stats = _integer_zscore_stats(flat)
        if stats is None:
            values = flat[foreground_mask(flat)]
            stats = float(np.mean(values, dtype=np.float64)), float(np.std(values, dtype=np.float64))
        mean, std = stats
    elif method == "fixed":  # the training population's statistics, stored with the model
        mean, std = float((stats or {})["mean"]), float((stats or {})["std"])
    elif method in ("percentile", "percentile-field"):  # the latter's own field: normalise_radiograph
        lo, hi = sampled_percentile(stack, (0.5, 99.5))
        mean, std = float(lo), float(max(hi - lo, 1e-6 * max(abs(float(lo)), abs(float(hi)), 1.0)))
    else:
        raise ValueError(f"unknown normalisation {method!r}")
    if not (np.isfinite(mean) and np.isfinite(std)) or std <= 0:
        raise InputError(f"intensities cannot be normalised ({method}: centre {mean:g}, spread {std:g})")
    return mean, std


def _integer_zscore_stats(flat: np.ndarray) -> tuple[float, float] | None:
    """Mean and SD of the foreground voxels (foreground_mask) of 8- or 16-bit integers, from their
    histogram (a 381 mm lumbar scan: 20 -> 9 ms); None for other types. The mean is np.mean's to the
    bit (integer sums are exact in float64), the SD np.std's to rounding (1 ulp seen)."""
    step = max(1, flat.size // 1_000_000)  # foreground_mask's sample
    sampled = integer_histogram(flat, step)
    if sampled is None:
        return None
    counts, first = sampled
    for offset in range(1, step):  # the whole histogram: the sample's plus the voxels between
        counts = counts + integer_histogram(flat[offset:], step)[0]
    values = np.arange(first, first + len(counts), dtype=np.float64)
    keep = values > histogram_percentile(*sampled, FOREGROUND_PERCENTILE)  # foreground_mask's rule
    if counts[keep].sum() <= MIN_FOREGROUND_SHARE * flat.size:
        keep[:] = True
    counts, values = counts[keep], values[keep]
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    deviation = values - mean
    return mean, float(np.sqrt((counts * (deviation * deviation)).sum() / n))


_KNOWN_STATS: dict[int, tuple] = {}  # id(input array) -> (weak reference to it, key, (centre, spread))
_KNOWN_STATS_LOCK = threading.Lock()  # a manifest's workers validate and run cases side by side
ONE_AFFINE_NORMALISATIONS = ("zscore", "percentile")  # statistics of the volume alone


def input_normalisation_stats(image: Image, plane: str, method: str) -> tuple[float, float]:
    """normalisation_stats of ``image``'s canonical slices, remembered for this very array (not a
    copy or a bias-corrected version): input validation computes them, the network's input reuses
    them (they were computed twice, 0.01-0.03 s a lumbar scan)."""
    import weakref

    orientation = canonical_orientation(image, plane)
    key = (orientation.axes, orientation.flips, method)
    with _KNOWN_STATS_LOCK:
        entry = _KNOWN_STATS.get(id(image.array))
    if entry is not None and entry[0]() is image.array and entry[1] == key:
        return entry[2]
    stats = normalisation_stats(orientation.apply(image.array), method)
    with _KNOWN_STATS_LOCK:
        for gone in [k for k, e in _KNOWN_STATS.items() if e[0]() is None]:
            del _KNOWN_STATS[gone]
        _KNOWN_STATS[id(image.array)] = (weakref.ref(image.array), key, stats)
    return stats


def normalise(stack: np.ndarray, method: str, stats: dict | None = None) -> np.ndarray:
    if method == "percentile-field":  # radiographs (one slice each): see normalise_radiograph
        return np.stack([normalise_radiograph(np.asarray(a)) for a in stack])
    mean, std = normalisation_stats(stack, method, stats)
    out = np.subtract(stack.astype(np.float32, copy=False), np.float32(mean), dtype=np.float32)  # one full-size array
    out *= np.float32(1.0 / std)
    return out


@dataclass
class SliceGeometry:
    """How network-grid slices map back to the input's pixels.

    ``window`` (top, left, height, width) is the part of the input slice that the network grid
    covers, in input pixel-edge units (pixel-area convention: pixel r spans [r, r + 1)); None =
    the whole slice (resampled with F.interpolate, as every task without ``network_px`` does). A
    window may reach outside the slice: that part is padding on the way in and background on the
    way back."""

    axis: int
    input_hw: tuple[int, int]
    network_hw: tuple[int, int]  # resampled size before padding
    padded_hw: tuple[int, int]
    window: tuple[float, float, float, float] | None = None


def square_window(image: Image, axis: int, crop_mm: float | None = None,
                  centre_rc: tuple[float, float] | None = None) -> tuple[float, float, float, float]:
    """A square physical window of side ``crop_mm`` (None: the longer in-plane field of view)
    centred on ``centre_rc`` (row, col in pixel-edge units; None: the field-of-view centre)."""
    h, w = (s for i, s in enumerate(image.array.shape) if i != axis)
    sr, sc = in_plane_spacing(image, axis)
    side = float(crop_mm) if crop_mm else max(h * sr, w * sc)
    cr, cc = centre_rc if centre_rc is not None else (h / 2.0, w / 2.0)
    wh, ww = side / sr, side / sc
    return (cr - wh / 2.0, cc - ww / 2.0, wh, ww)


def window_centre_rc(canon: Image, point_lps) -> tuple[float, float]:
    """(row, col) pixel-edge coordinates of a physical point projected into the slices of a
    canonical (slice, row, col) image."""
    i, j, _ = canon.lps_to_ijk_points([point_lps])[0]
    return float(j) + 0.5, float(i) + 0.5


def network_grid(image: Image, axis: int, target_spacing: float | None, multiple: int,
                 network_px: int | None = None, crop_mm: float | None = None,
                 centre_rc: tuple[float, float] | None = None) -> SliceGeometry:
    """Network grid of slices along ``axis``: the whole slice at ``target_spacing`` (None: the
    input's pixels), or with ``network_px`` a square ``crop_mm`` window (see square_window)
    resampled to network_px x network_px."""
    h, w = (s for i, s in enumerate(image.array.shape) if i != axis)
    window = None
    if network_px:
        window = square_window(image, axis, crop_mm, centre_rc)
        nh = nw = int(network_px)
    elif target_spacing:
        sr, sc = in_plane_spacing(image, axis)
        nh, nw = max(1, round(h * sr / target_spacing)), max(1, round(w * sc / target_spacing))
    else:
        nh, nw = h, w
    ph, pw = (-(-nh // multiple) * multiple, -(-nw // multiple) * multiple)
    return SliceGeometry(axis, (h, w), (nh, nw), (ph, pw), window)


def network_grid_image(image: Image, grid: SliceGeometry) -> Image:
    """Geometry of the resampled (unpadded) network grid as an Image over a zero-cost array:
    same slices, in-plane pixels scaled so that the window (default: the field of view) is
    covered exactly (pixel-area convention: network pixel p's centre lies at pixel-edge
    coordinate top + (p + 0.5) * height / n)."""
    shape = [0, 0, 0]
    shape[grid.axis] = image.array.shape[grid.axis]
    in_plane_axes = [a for a in range(3) if a != grid.axis]
    window = grid.window or (0.0, 0.0, *grid.input_hw)
    for a, n in zip(in_plane_axes, grid.network_hw):
        shape[a] = n
    spacing = list(image.spacing)  # (i, j, k)
    origin = np.asarray(image.origin, dtype=float)
    for a, start, extent in zip(in_plane_axes, window[:2], window[2:]):
        ijk = 2 - a
        step = extent / shape[a]  # input pixels per network pixel
        origin = origin + image.direction[:, ijk] * image.spacing[ijk] * (start + step / 2.0 - 0.5)
        spacing[ijk] = image.spacing[ijk] * step
    return Image(np.broadcast_to(np.zeros((), np.uint8), tuple(shape)), tuple(spacing), tuple(origin),
                 image.direction.copy())


def resample_onto(moving: Image, reference: Image) -> Image:
    """``moving`` (e.g. a T1) on ``reference``'s grid (e.g. the FLAIR), linear, by physical position
    (identity transform: the two must already be in one space, as DICOM series of one study or
    co-registered files are); voxels outside ``moving`` become 0."""
    import SimpleITK as sitk

    if moving.same_geometry(reference):
        return moving
    out = sitk.Resample(moving.to_sitk(), reference.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return reference.with_array(sitk.GetArrayFromImage(out))


def coverage(reference: Image, other: Image, samples: int = 20000, seed: int = 0) -> float:
    """Share of ``reference``'s foreground (above its 5th percentile) at whose physical position
    ``other`` has foreground too (nearest voxel): whether a second input (a T1) overlaps the
    first (the FLAIR) at all. A random sample of the foreground voxels keeps it cheap."""
    fg = np.flatnonzero(foreground_mask(reference.array))
    if not len(fg):
        return 0.0
    pick = np.random.default_rng(seed).choice(fg, min(samples, len(fg)), replace=False)
    kji = np.stack(np.unravel_index(pick, reference.array.shape), 1)
    ijk = np.rint(other.lps_to_ijk_points(reference.ijk_to_lps_points(kji[:, ::-1].astype(float)))).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(other.array.shape[::-1])), axis=1)
    if not inside.any():
        return 0.0
    k, j, i = ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]
    other_fg = other.array[k, j, i] > sampled_percentile(other.array, 5)
    return float(other_fg.sum()) / len(pick)


def context_channels(stack: np.ndarray, index: np.ndarray, context: int, fill: float = 0.0,
                     repeat_edges: bool = False) -> np.ndarray:
    """(len(index), context, H, W): each slice with its neighbours as channels (edge slices see
    ``fill``: zero after normalisation, as in seed 004's 'pad two empty slices'; or, with
    ``repeat_edges``, the end slice again, as the level refiner does). Gathers only the slices asked
    for: a padded copy of the whole stack per batch cost a 7 M-voxel brain 0.1 s a run."""
    index = np.asarray(index)
    half = context // 2
    out = np.full((len(index), context, *stack.shape[1:]), fill, np.float32 if fill else stack.dtype)
    for channel in range(context):
        source = index + channel - half
        if repeat_edges:
            source = np.clip(source, 0, stack.shape[0] - 1)
        inside = (source >= 0) & (source < stack.shape[0])
        out[inside, channel] = stack[source[inside]]
    return out


def resize_batch(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear in-plane resampling that keeps the field of view (pixel-area convention,
    align_corners=False), so it maps exactly back with the inverse call."""
    import torch.nn.functional as F

    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False)


def pad_to(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    import torch.nn.functional as F

    dh, dw = size[0] - batch.shape[-2], size[1] - batch.shape[-1]
    return F.pad(batch, (0, dw, 0, dh)) if dh or dw else batch


def to_network_grid(batch: torch.Tensor, grid: SliceGeometry, pad_value: float = 0.0,
                    mode: str = "bilinear") -> torch.Tensor:
    """(N, C, h, w) input slices -> (N, C, *grid.network_hw). Without a window: resize_batch. With
    one: bilinear sampling of the window (after an integer box-filter when it shrinks by 2x or
    more, against aliasing), ``pad_value`` outside the slice; ``mode='nearest'`` for label maps."""
    import torch.nn.functional as F

    if grid.window is None:
        if mode == "nearest":
            return F.interpolate(batch, size=grid.network_hw, mode="nearest")
        return resize_batch(batch, grid.network_hw)
    top, left, wh, ww = grid.window
    nh, nw = grid.network_hw
    x = batch.float() - pad_value if pad_value else batch.float()
    fr, fc = (max(1, int(wh / nh)), max(1, int(ww / nw))) if mode == "bilinear" else (1, 1)
    if fr > 1 or fc > 1:  # box-filter by whole pixels: pixel-edge coordinates simply divide
        h, w = x.shape[-2:]
        x = F.avg_pool2d(F.pad(x, (0, (-w) % fc, 0, (-h) % fr)), (fr, fc))
        top, left, wh, ww = top / fr, left / fc, wh / fr, ww / fc
    h, w = x.shape[-2:]
    sampling = _window_sampling(h, w, top, left, wh, ww, nh, nw).to(x.device, x.dtype)
    out = F.grid_sample(x, sampling.expand(x.shape[0], -1, -1, -1), mode=mode, padding_mode="zeros",
                        align_corners=False)
    return out + pad_value if pad_value else out


@functools.lru_cache(maxsize=8)
def _window_sampling(h: int, w: int, top: float, left: float, wh: float, ww: float, nh: int, nw: int):
    """grid_sample's (1, nh, nw, 2) sampling grid of a window: the same for every batch of a run
    (affine_grid cost 2 ms a batch of 8 at 224 x 224); callers must not modify it."""
    import torch
    import torch.nn.functional as F

    theta = torch.tensor([[ww / w, 0.0, (2 * left + ww) / w - 1.0],
                          [0.0, wh / h, (2 * top + wh) / h - 1.0]], dtype=torch.float32)
    return F.affine_grid(theta[None], [1, 1, nh, nw], align_corners=False)


@dataclass(frozen=True)
class NetworkInput:
    """Raw (not yet normalised) canonical stacks, each with its normalisation (centre, spread):
    ``batch`` samples slices onto the network grid first and normalises after. The normalisation
    is affine, so it commutes with the box filter and the bilinear weights: the same input as
    normalising whole volumes first, on the network grid's voxels only (a knee's 512 px slices ->
    a 224 px window: a fifth of them; the whole-volume pass took 0.24 s in a profile)."""
    stacks: tuple  # (slices, rows, cols) each, on one grid
    affines: tuple  # (centre, spread) each: normalised = (value - centre) / spread
    context: int

    @classmethod
    def of(cls, stacks, method: str, stats: dict | None, context: int,
           first_affine: tuple[float, float] | None = None) -> "NetworkInput":
        """``first_affine``: the first stack's (centre, spread), when already known."""
        if method == "percentile-field":  # per-radiograph statistics of the exposed field: not a single affine map
            return cls(tuple(normalise(s, method, stats) for s in stacks), ((0.0, 1.0),) * len(stacks), context)
        affines = [first_affine or normalisation_stats(stacks[0], method, stats)]
        return cls(tuple(stacks), tuple(affines + [normalisation_stats(s, method, stats) for s in stacks[1:]]), context)

    def crop(self, box) -> "NetworkInput":
        return NetworkInput(tuple(s[:, box[0]:box[1], box[2]:box[3]] for s in self.stacks), self.affines, self.context)

    def normalised_min(self) -> float:
        """The first stack's normalised minimum: what a window shows outside the image (air)."""
        centre, spread = self.affines[0]
        return (float(self.stacks[0].min()) - centre) / spread

    def batch(self, index, grid: "SliceGeometry", pad_value: float = 0.0):
        """(len(index), context x stacks, *grid.network_hw) normalised network input; ``pad_value``
        (normalised) outside the slices, for every stack."""
        import torch

        parts = []
        for stack, (centre, spread) in zip(self.stacks, self.affines):
            x = torch.from_numpy(context_channels(stack, index, self.context, fill=centre))
            x = to_network_grid(x.float(), grid, pad_value * spread + centre)
            parts.append((x - centre) * (1.0 / spread))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def from_network_grid(logits: torch.Tensor, grid: SliceGeometry,
                      within: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(N, C, *network_hw) network output -> (output on the input pixels whose centres lie inside
    the window, that box (r0, r1, c0, c1)); bilinear (logits, not labels, are resampled). Pixels
    outside the box are background for the caller. ``within`` (rows y0, y1, columns x0, x1 of the
    network grid, half-open), with a window: only input pixels whose bilinear neighbours touch it
    are resampled (labels; see ``network_label_box``). Without a window every pixel is (F.interpolate:
    grid_sample's floats differ in the last bit, enough to flip a near tie)."""
    import torch
    import torch.nn.functional as F

    h, w = grid.input_hw
    if grid.window is None:
        return resize_batch(logits, grid.input_hw), (0, h, 0, w)
    top, left, wh, ww = grid.window
    nh, nw = grid.network_hw
    r0, r1 = max(0, int(np.ceil(top - 0.5))), min(h, int(np.floor(top + wh - 0.5)) + 1)
    c0, c1 = max(0, int(np.ceil(left - 0.5))), min(w, int(np.floor(left + ww - 0.5)) + 1)
    if within is not None:
        r0, r1 = _touching(r0, r1, top, wh, nh, within[0], within[1])
        c0, c1 = _touching(c0, c1, left, ww, nw, within[2], within[3])
    if r1 <= r0 or c1 <= c0:
        return logits[..., :0, :0], (0, 0, 0, 0)
    ys = (2.0 * (torch.arange(r0, r1, dtype=torch.float32) + 0.5 - top) / wh - 1.0).to(logits.device)
    xs = (2.0 * (torch.arange(c0, c1, dtype=torch.float32) + 0.5 - left) / ww - 1.0).to(logits.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    sampling = torch.stack((gx, gy), dim=-1).to(logits.dtype)[None].expand(logits.shape[0], -1, -1, -1)
    out = F.grid_sample(logits, sampling, mode="bilinear", padding_mode="border", align_corners=False)
    return out, (r0, r1, c0, c1)


def _touching(p0: int, p1: int, start: float, extent: float, n: int, q0: int, q1: int) -> tuple[int, int]:
    """The input pixels in [p0, p1) whose two bilinear neighbours on an n-pixel network axis
    (border-clamped, as grid_sample's) include one in [q0, q1): a contiguous run."""
    p = np.arange(p0, p1)
    q = np.floor(np.clip((p + 0.5 - start) * n / extent - 0.5, 0, n - 1))
    hit = np.flatnonzero((q <= q1 - 1) & (q + 1 >= q0))
    return (int(p[hit[0]]), int(p[hit[-1]]) + 1) if len(hit) else (p0, p0)


def network_label_box(labels: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Rows and columns (half-open) of a batch's labels on the network grid that are not
    background; None when all are. Bilinear weights are a convex combination, so where a pixel's
    four network neighbours all favour background (or no sigmoid channel is above 0), so does the
    resampled logit vector: nothing outside this box need be resampled for labels."""
    import torch

    rows = torch.nonzero(labels.amax(dim=(0, 2)))
    if not len(rows):
        return None
    cols = torch.nonzero(labels.amax(dim=(0, 1)))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def training_slices(image: Image, labels: np.ndarray, plane: str, normalisation: str,
                    spacing_mm: float | None, multiple: int = 1, network_px: int | None = None,
                    crop_mm: float | None = None,
                    window_centre_lps=None) -> tuple[np.ndarray, np.ndarray, SliceGeometry]:
    """What Training/ feeds a network, built by the functions inference uses: canonical slices,
    normalised, resampled in-plane to the network grid (unpadded), float32; labels (same array
    layout as ``image``) resampled nearest-neighbour to the same grid, uint8. ``network_px``,
    ``crop_mm`` and ``window_centre_lps`` (LPS mm; None: the field-of-view centre) give the
    square-window grid of tasks such as knee-bones."""
    import torch

    canon, orientation = canonical_image(image, plane)
    source = NetworkInput.of([canon.array], normalisation, None, 1)
    centre = window_centre_rc(canon, window_centre_lps) if window_centre_lps is not None else None
    grid = network_grid(canon, 0, spacing_mm, multiple, network_px, crop_mm, centre)
    pad_value = source.normalised_min() if grid.window is not None else 0.0
    x = source.batch(np.arange(canon.array.shape[0]), grid, pad_value)[:, 0]
    y = torch.from_numpy(np.ascontiguousarray(orientation.apply(labels)).astype(np.float32))[:, None]
    y = to_network_grid(y, grid, mode="nearest")[:, 0]
    return x.numpy().astype(np.float32), y.numpy().astype(np.uint8), grid


# ---- bias-field correction (seed 000: N4) ------------------------------------------------

N4_DEFAULTS = {
    # N4's cost grows with the voxels it fits; the field is smooth (cubic B-spline, 4-7 control
    # points per axis), so coarse voxels estimate it: on the DESS series (160 mm, 80 x 1.5 mm
    # slices) 16 x 16 x 16 voxels (10 x 10 x 7.5 mm) take 0.12 s instead of 0.30 s for 32 x 32 x 16
    # (session 19, 2 cores) with a log field 0.015 RMS (max 0.04) from it inside the knee (field SD
    # 0.059), and the knee network's bones agree with Dice >= 0.995 per bone on the DESS and MESE
    # series (the network was trained on synthetic images with random bias fields, not on N4 output)
    "n4_shrink_px": 16,  # in-plane: block-average until the longer in-plane side is about this many voxels
    "n4_slice_mm": 8.0,  # along the acquisition axis: block-average until slices are about this far apart
    "n4_iterations": (20, 20, 10),  # one entry per fitting level
    "n4_convergence": 0.001,
    "n4_control_points": 4,
    # the field is evaluated on a grid of at most this many pixels in-plane (all slices) and
    # upsampled in-plane: on the DESS (512 x 512 x 80) the whole correction takes 0.29 s instead of
    # 1.07 s evaluated at every voxel, max |log difference| 0.0019 (0.2 %) inside the knee (session
    # 19); 0 = evaluate at full resolution
    "n4_field_px": 128,
}


def n4_shrink_factors(image: Image, shrink_px: int, slice_mm: float) -> list[int]:
    """Per-axis (i, j, k) integer shrink factors: in-plane so that the longer in-plane field of
    view spans ~``shrink_px`` voxels, along the acquisition (largest-spacing) axis to
    ``slice_mm``; an isotropic grid is shrunk alike on every axis."""
    spacing, size = np.asarray(image.spacing), np.asarray(image.size_ijk)
    axis = acquisition_axis(image)
    slice_ijk = None if axis is None else 2 - axis
    in_plane = [a for a in range(3) if a != slice_ijk]
    target = max(spacing[a] * size[a] for a in in_plane) / max(shrink_px, 1)
    factors = [max(1, int(round(target / spacing[a]))) for a in range(3)]
    if slice_ijk is not None:
        factors[slice_ijk] = max(1, int(round(slice_mm / spacing[slice_ijk])))
    return [min(f, int(n)) for f, n in zip(factors, size)]


def _grid_image(array: np.ndarray | None, size_kji, full_shape, spacing_ijk):
    """A voxel-space SimpleITK image (identity direction) of ``size_kji`` cells covering exactly the
    field of view of a ``full_shape`` grid with ``spacing_ijk`` (pixel-area convention, the
    first full-resolution voxel centre at the origin 0)."""
    import SimpleITK as sitk

    size_ijk = [int(n) for n in size_kji[::-1]]
    cell = np.asarray(spacing_ijk, float) * np.asarray(full_shape[::-1], float) / np.asarray(size_ijk, float)
    img = sitk.GetImageFromArray(array) if array is not None else sitk.Image(size_ijk, sitk.sitkFloat32)
    img.SetSpacing(tuple(float(v) for v in cell))
    img.SetOrigin(tuple(float(v) for v in (cell - np.asarray(spacing_ijk, float)) / 2.0))
    return img


def bias_correct(image: Image, method: str | None, params: dict | None = None) -> tuple[Image, dict]:
    """Multiplicative bias-field correction; returns (float32 image, what was done).

    ``n4``: SimpleITK N4 fitted on a block-averaged (shrunk) copy with a foreground mask from Otsu
    on that copy and few iterations; its log field is evaluated on a grid of at most
    ``n4_field_px`` pixels in-plane over the same field of view, upsampled and divided out: ~1 s
    instead of the seed's 60-120 s. ``n4-full``: the seed's variant (N4 on the full-resolution
    image, SimpleITK's default 4 x 50 iterations, field from ``GetLogBiasFieldAsImage(full)``),
    selectable for comparison, never the default. Parameters (``params``, e.g. a checkpoint's
    preprocessing dict): see N4_DEFAULTS.

    N4 runs in voxel space (spacing kept; origin and direction dropped): the field then depends
    on the voxels only, so one physical image gives one field (a last-bit change of the origin
    moved B-spline knot spans and the field by up to 8 % on a phantom)."""
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    if not method:
        return image, {}
    if method not in ("n4", "n4-full") or image.is_2d:
        raise ValueError(f"unknown bias correction {method!r} (n4 | n4-full, 3D images only)")
    p = {**N4_DEFAULTS, **{k: v for k, v in (params or {}).items() if k in N4_DEFAULTS}}
    array = torch.from_numpy(np.array(image.array, dtype=np.float32))  # the output, corrected in place
    shape = tuple(array.shape)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    if method == "n4-full":
        factors = [1, 1, 1]
        corrector.SetMaximumNumberOfIterations([50, 50, 50, 50])
        small = _grid_image(array.numpy(), shape, shape, image.spacing)
    else:
        factors = n4_shrink_factors(image, int(p["n4_shrink_px"]), float(p["n4_slice_mm"]))
        corrector.SetMaximumNumberOfIterations([int(n) for n in p["n4_iterations"]])
        corrector.SetConvergenceThreshold(float(p["n4_convergence"]))
        corrector.SetNumberOfControlPoints([int(p["n4_control_points"])] * 3)
        small_kji = tuple(-(-n // f) for n, f in zip(shape, factors[::-1]))
        pooled = F.adaptive_avg_pool3d(array[None, None], small_kji)[0, 0].numpy()  # block averages
        small = _grid_image(pooled, small_kji, shape, image.spacing)
    mask = sitk.OtsuThreshold(small, 0, 1, 200) * sitk.Cast(small > 0, sitk.sitkUInt8)  # N4 takes logs
    corrector.Execute(small, mask)
    if method == "n4-full":
        field = torch.from_numpy(sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(small)))
        field = torch.exp(field.neg_())
        low, high = float(field.min()), float(field.max())
    else:  # 1 / field on a coarse grid (all slices of the acquisition axis), upsampled
        axis = acquisition_axis(image)
        px = int(p["n4_field_px"]) or max(shape)
        coarse = tuple(n if a == axis else min(n, px) for a, n in enumerate(shape))
        log_field = corrector.GetLogBiasFieldAsImage(_grid_image(None, coarse, shape, image.spacing))
        field = torch.exp(torch.from_numpy(sitk.GetArrayFromImage(log_field)).neg_())
        low, high = float(field.min()), float(field.max())  # interpolation stays within the samples' range
        if coarse != shape and axis is not None:  # every slice kept: bilinear per slice (trilinear's
            # weights along it are 1 and 0), 0.05 instead of 0.11 s at 512 x 512 x 80, a few slices at
            # a time into the output: no full-size field (84 MB of fresh memory at 512 x 512 x 80)
            out, coarse_slices = array.movedim(axis, 0), field.movedim(axis, 0)
            in_plane = [n for a, n in enumerate(shape) if a != axis]
            for start in range(0, out.shape[0], 8):
                out[start:start + 8].mul_(F.interpolate(coarse_slices[start:start + 8, None], size=in_plane,
                                                        mode="bilinear", align_corners=False)[:, 0])
            field = None
        elif coarse != shape:
            field = F.interpolate(field[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    if field is not None:
        array.mul_(field)
    info = {"method": method, "shrink_factors_ijk": factors, "shrunk_size_ijk": list(small.GetSize()),
            "iterations": list(corrector.GetMaximumNumberOfIterations()),
            "field_range": [round(1.0 / high, 4), round(1.0 / low, 4)]}
    return image.with_array(array.numpy()), info
