"""One image notion for every door: voxel array + physical geometry (ITK/LPS convention).

The array is indexed ``array[k, j, i]`` (slice, row, column) exactly as SimpleITK's
``GetArrayFromImage`` returns it; ``spacing``, ``origin`` and ``direction`` follow ITK, i.e. they
describe the (i, j, k) axes in LPS patient coordinates. Slicer works in RAS; the conversions below
are the only place where that sign flip lives.

A 2D image (radiograph) is a single-slice volume, shape ``(1, rows, cols)``, as Slicer shows it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


@dataclass
class Image:
    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    # free-form provenance (source path, DICOM series UID, echo number, ...)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        arr = np.asarray(self.array)
        if arr.ndim == 2:
            arr = arr[np.newaxis]
        if arr.ndim != 3:
            raise ValueError(f"Image array must be 2D or 3D, got shape {arr.shape}")
        self.array = arr
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("spacing and origin must have 3 components")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    # ---- shape helpers -------------------------------------------------------------
    @property
    def size_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def is_2d(self) -> bool:
        return self.array.shape[0] == 1

    @property
    def is_right_handed(self) -> bool:
        return float(np.linalg.det(self.direction)) > 0

    def with_array(self, array: np.ndarray, **meta) -> "Image":
        """Same geometry, new voxels (e.g. a label map for this image)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match image {self.array.shape}")
        return Image(array, self.spacing, self.origin, self.direction.copy(), {**self.meta, **meta})

    # ---- geometry ------------------------------------------------------------------
    @property
    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_lps

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    def ijk_to_ras_points(self, ijk) -> np.ndarray:
        """(N,3) continuous voxel indices (i, j, k) -> (N,3) RAS millimetres."""
        return _apply(self.ijk_to_ras, ijk)

    def ras_to_ijk_points(self, ras) -> np.ndarray:
        return _apply(self.ras_to_ijk, ras)

    def ijk_to_lps_points(self, ijk) -> np.ndarray:
        return _apply(self.ijk_to_lps, ijk)

    def lps_to_ijk_points(self, lps) -> np.ndarray:
        return _apply(np.linalg.inv(self.ijk_to_lps), lps)

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray, meta: dict | None = None) -> "Image":
        """Build from a Slicer-style IJKToRAS matrix (columns may carry spacing and flips)."""
        lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
        cols = lps[:3, :3]
        spacing = np.linalg.norm(cols, axis=0)
        return cls(array, tuple(spacing), tuple(lps[:3, 3]), cols / spacing, meta or {})

    def same_geometry(self, other: "Image", atol: float = 1e-4) -> bool:
        """True when both sample the same physical points (compared in physical space, so a
        left-handed grid stored with reordered slices still compares equal)."""
        if sorted(self.array.shape) != sorted(other.array.shape):
            return False
        corners = _grid_corners(self)
        return _same_point_set(corners, _grid_corners(other), atol) and np.allclose(
            sorted(self.spacing), sorted(other.spacing), atol=atol)

    # ---- SimpleITK bridge ----------------------------------------------------------
    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, img, meta: dict | None = None) -> "Image":
        import SimpleITK as sitk

        if img.GetDimension() == 2:
            sp = tuple(img.GetSpacing()) + (1.0,)
            org = tuple(img.GetOrigin()) + (0.0,)
            d2 = np.asarray(img.GetDirection()).reshape(2, 2)
            d = np.eye(3)
            d[:2, :2] = d2
            return cls(sitk.GetArrayFromImage(img)[np.newaxis], sp, org, d, meta or {})
        if img.GetDimension() != 3:
            raise ValueError(f"only 2D and 3D images are supported, got {img.GetDimension()}D")
        return cls(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                   np.asarray(img.GetDirection()).reshape(3, 3), meta or {})


def _apply(matrix: np.ndarray, pts) -> np.ndarray:
    pts = np.atleast_2d(np.asarray(pts, dtype=float))
    homog = np.c_[pts, np.ones(len(pts))]
    return (homog @ matrix.T)[:, :3]


def _grid_corners(img: Image) -> np.ndarray:
    i, j, k = (n - 1 for n in img.size_ijk)
    idx = np.array([[a, b, c] for a in (0, i) for b in (0, j) for c in (0, k)], dtype=float)
    return img.ijk_to_lps_points(idx)


def _same_point_set(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    return bool(np.all(d.min(axis=1) <= atol) and np.all(d.min(axis=0) <= atol))
