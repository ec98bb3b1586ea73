"""Output label definitions: value, name, colour and DICOM/SNOMED terminology.

Codes come from SlicerTotalSegmentator's ``totalsegmentator_snomed_mapping.csv`` (SCT scheme).
Label values are fixed project-wide (see engine/cards.py); never renumber them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str


ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED = Code("SCT", "49755003", "Morphologically Altered Structure")


@dataclass(frozen=True)
class LabelSpec:
    value: int
    name: str
    color: tuple[float, float, float]  # RGB in 0..1, as Slicer segments store it
    category: Code | None = None
    type: Code | None = None
    region: Code | None = None  # anatomic region (e.g. brain for a lesion)
    modifier: Code | None = None  # the type's modifier (laterality: right / left)

    @property
    def segment_id(self) -> str:
        return self.name.replace(" ", "_").lower()


def _rgb(r: int, g: int, b: int) -> tuple[float, float, float]:
    return (r / 255.0, g / 255.0, b / 255.0)


def _bone(value, name, code, meaning, color):
    return LabelSpec(value, name, _rgb(*color), ANATOMICAL_STRUCTURE, Code("SCT", code, meaning))


KNEE_LABELS = (
    _bone(1, "femur", "71341001", "Femur", (241, 214, 145)),
    _bone(2, "tibia", "12611008", "Tibia", (180, 120, 80)),
    _bone(3, "fibula", "87342007", "Fibula", (128, 174, 128)),
    _bone(4, "patella", "64234005", "Patella", (111, 184, 210)),
)

SPINE_LABELS = (
    _bone(1, "L1", "66794005", "L1 vertebra", (216, 101, 79)),
    _bone(2, "L2", "14293000", "L2 vertebra", (221, 130, 101)),
    _bone(3, "L3", "36470004", "L3 vertebra", (144, 238, 144)),
    _bone(4, "L4", "11994002", "L4 vertebra", (111, 184, 210)),
    _bone(5, "L5", "49668003", "L5 vertebra", (183, 156, 220)),
)

BRAIN_LABELS = (
    LabelSpec(1, "lesion", _rgb(255, 64, 64), MORPHOLOGICALLY_ALTERED,
              Code("SCT", "52988006", "Lesion"), Code("SCT", "12738006", "Brain")),
)

XRAY_FEMUR_LABELS = (_bone(1, "femur", "71341001", "Femur", (241, 214, 145)),)


# xray-multiclass (seed 001: 3 classes by default) on AP pelvis radiographs; "hip bone" uses
# TotalSegmentator's code for its hip (os coxae) segment
XRAY_PELVIS_LABELS = (
    _bone(1, "femur", "71341001", "Femur", (241, 214, 145)),
    _bone(2, "hip bone", "29836001", "Hip", (216, 101, 79)),
    _bone(3, "sacrum", "54735007", "Sacrum", (111, 184, 210)),
)


# xray-chest (JSRT/SCR): lungs and heart in one map, the clavicles (which overlap the lungs) in a
# second layer; laterality as SNOMED's type modifier, as TotalSegmentator's left/right structures
RIGHT, LEFT = Code("SCT", "24028007", "Right"), Code("SCT", "7771000", "Left")
XRAY_CHEST_LABELS = (
    LabelSpec(1, "right lung", _rgb(197, 165, 145), ANATOMICAL_STRUCTURE, Code("SCT", "3341006", "Right lung")),
    LabelSpec(2, "left lung", _rgb(197, 165, 145), ANATOMICAL_STRUCTURE, Code("SCT", "44029006", "Left lung")),
    LabelSpec(3, "heart", _rgb(206, 110, 84), ANATOMICAL_STRUCTURE, Code("SCT", "80891009", "Heart")),
    LabelSpec(4, "right clavicle", _rgb(241, 214, 145), ANATOMICAL_STRUCTURE, Code("SCT", "51299004", "Clavicle"),
              modifier=RIGHT),
    LabelSpec(5, "left clavicle", _rgb(230, 200, 130), ANATOMICAL_STRUCTURE, Code("SCT", "51299004", "Clavicle"),
              modifier=LEFT),
)


HISTOGRAM_CHUNK = 1 << 18  # voxels a histogram counts at once


MAX_COMPARED_VALUES = 16  # up to this many values a uint8 map is counted one comparison per value


def label_histogram(array: np.ndarray, size: int = 256) -> np.ndarray:
    """Voxels per value 0..size-1 of a label map (int64); values >= size are not counted.
    np.bincount widens its input to int64, and on the knee's 21 M voxels that 168 MB copy took
    0.1-0.27 s in the pipeline; a uint8 map is counted instead one comparison per value when it
    holds few (the knee's 4 bones: 8 ms) or else in chunks (23 ms)."""
    if array.dtype != np.uint8:
        return np.bincount(np.asarray(array).ravel(), minlength=size)[:size]
    counts = np.zeros(256, np.int64)
    top = int(array.max()) if array.size else 0
    if top <= MAX_COMPARED_VALUES:
        for value in range(1, top + 1):
            counts[value] = np.count_nonzero(array == value)
        counts[0] = array.size - counts.sum()
    else:
        flat = array.ravel(order="K")  # no copy for a transposed or flipped view
        for start in range(0, flat.size, HISTOGRAM_CHUNK):
            counts += np.bincount(flat[start:start + HISTOGRAM_CHUNK], minlength=256)
    return counts[:size] if size <= 256 else np.pad(counts, (0, size - 256))


def present_labels(array: np.ndarray) -> list[int]:
    """Non-zero values present in a label map; a histogram for uint8 maps (np.unique sorts all
    7 M voxels of a brain: 0.06 s)."""
    if array.dtype == np.uint8:
        top = int(array.max())
        if top <= 1:  # binary masks (lesions, femur): the maximum says it all, 10x faster
            return [1] if top else []
        return [int(v) for v in np.flatnonzero(label_histogram(array)) if v]
    return [int(v) for v in np.unique(array) if v]
