"""Transitional lumbosacral anatomy (4 or 6 lumbar-type vertebrae): flagged, never relabelled
(seed 004: a wrong count must not silently shift every level).

Read from the level network's raw labels (before the largest-component clean-up), which show the
two ways a model trained on 5-lumbar spines reacts to another count:
- ``suspected-4``: L1-L4 are found and L5 is not (a sacralised L5, or a missed L5);
- ``suspected-6``: two separate vertebrae carry the same level, one body height apart along the
  column (the model sees one lumbar-type vertebra too many and names two of them alike).
Sagittal lumbar MRI alone cannot settle the count (that needs a whole-spine localiser), so the
result is a flag for the reader with its evidence. An intensity-profile detector counting discs
below L5 was tried (git history): right on phantoms, but it flagged 20 of 50 normal real spines.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.engine.steps import StepContext, labelled_box, step, within

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py)

LEVELS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class TransitionalParameters:
    duplicate_volume_fraction: float = 0.4  # a second component this large (vs the largest) is a vertebra
    duplicate_separation: float = 0.6  # ... when its centre lies this many body heights from the first


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


def _components(mask: np.ndarray, offset: np.ndarray, voxel_mm3: float) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(volume mm3, centre kji, voxel kji) of the three largest 3D components of ``mask`` (a crop
    whose corner is ``offset``), largest first; one pass over the foreground voxels."""
    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    kji = np.argwhere(comp)
    ids = comp[tuple(kji.T)]
    sizes = np.bincount(ids, minlength=n + 1)[1:]
    centres = np.stack([np.bincount(ids, weights=kji[:, a], minlength=n + 1)[1:] for a in range(3)], 1)
    centres = centres / sizes[:, None] + offset
    return [(float(sizes[i]) * voxel_mm3, centres[i], kji[ids == i + 1] + offset)
            for i in np.argsort(sizes)[::-1][:3]]


def check_transitional(labels: np.ndarray, image: Image, params: TransitionalParameters = TransitionalParameters(),
                       known: tuple[slice, ...] | None = None) -> TransitionalResult:
    """``labels``: the level network's labels (1..5) before any component clean-up; ``known``: a
    box holding all of them, when known."""
    voxel = float(np.prod(image.spacing))
    labels = np.asarray(labels, np.uint8)
    # one pass (over the known box only), then crops
    boxes = [b and within(known, b) for b in ndimage.find_objects(labels[known] if known else labels,
                                                                  max_label=len(LEVELS))]
    comps = {k: _components(labels[box] == k, np.array([b.start for b in box]), voxel) if box else []
             for k, box in zip(LEVELS, boxes)}
    present = [k for k in LEVELS if comps[k]]
    evidence: dict = {"levels_found": [f"L{k}" for k in present]}
    if 5 not in present and {1, 2, 3, 4} <= set(present):
        return TransitionalResult("suspected-4", "L1-L4 found but no L5: 4 lumbar-type vertebrae (sacralised L5) "
                                  "or a missed L5; levels are not renumbered, check the count", evidence)
    duplicates = []
    for k in present:
        first, *others = comps[k]
        if not others:
            continue
        volume, centre, kji = first
        ras = image.ijk_to_ras_points(kji[:, ::-1].astype(float))
        centre_ras = image.ijk_to_ras_points([centre[::-1]])[0]
        height = float(np.ptp(np.percentile(ras[:, 2], [3, 97])))  # superior-inferior extent
        for other_volume, other_centre, _ in others:
            distance = float(np.linalg.norm(image.ijk_to_ras_points([other_centre[::-1]])[0] - centre_ras))
            if other_volume >= params.duplicate_volume_fraction * volume and \
                    distance >= params.duplicate_separation * max(height, 1.0):
                duplicates.append({"level": f"L{k}", "separation_mm": round(distance, 1),
                                   "volumes_ml": [round(volume / 1000, 1), round(other_volume / 1000, 1)]})
    if duplicates:
        evidence["duplicated_levels"] = duplicates
        names = ", ".join(d["level"] for d in duplicates)
        return TransitionalResult("suspected-6", f"two separate vertebrae segmented as {names}: a sixth lumbar-type "
                                  "vertebra (lumbarised S1 / L6) or a level shift; only the larger keeps the label, "
                                  "levels are not renumbered, check the count", evidence)
    if len(present) < 5:
        return TransitionalResult("undetermined", "not all of L1-L5 found; the lumbar count cannot be checked",
                                  evidence)
    return TransitionalResult("typical", "L1-L5 each found once", evidence)


# ---- steps (registered by name; see steps.py) ----------------------------------------------------

@step("transitional")
def _transitional_step(ctx: StepContext) -> None:
    """On the labels as they stand (the raw output when first): duplicates vanish in the clean-up."""
    check = check_transitional(ctx.result.labels.array, ctx.image, known=labelled_box(ctx))
    ctx.result.summaries["transitional_anatomy"] = check.as_dict()
    if check.flagged:
        ctx.result.warnings.append(f"transitional anatomy suspected: {check.message}")
