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

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.engine.postprocessing import label_in_box
from SpineKneeSegLib.engine.steps import StepContext, labelled_box, step, within
from SpineKneeSegLib.tasks.spine.foramen_confidence import (
    ConfidenceModel,
    body_probabilities,
    confidences,
    foramen_evidence,
)

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py)

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
    source: str = "predicted by the foramen model"

    @property
    def label(self) -> str:
        return foramen_label(self.level, self.side)

    @property
    def description(self) -> str:
        where = f"; slices {self.slices[0]}-{self.slices[1]}" if self.slices[0] >= 0 else ""
        return f"foramen {motion_segment(self.level)} {self.side}; {self.source}; confidence={self.probability:.2f}{where}"


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
        # labelled inside the mask's bounding box only: a trained model's maps are mostly empty
        comp, n, box = label_in_box(probabilities[level_index] >= threshold * scale, structure)
        if box is None or n == 0:
            continue
        corner = np.array([b.start for b in box])
        prob = probabilities[level_index][box]
        sizes, lateral = _sizes_and_mean_index(comp, n, lat)
        lateral += corner[lat]
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
                sides.append((best, _describe_component(comp, best + 1, prob, corner)))
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


def _sizes_and_mean_index(comp: np.ndarray, n: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count and mean voxel index along ``axis`` of every component, from one unweighted
    bincount per slice along ``axis`` (noisy maps hold thousands of specks: a per-component loop
    was most of the run time, a weighted bincount over the volume several times this)."""
    counts = np.stack([np.bincount(plane.ravel(), minlength=n + 1) for plane in np.moveaxis(comp, axis, 0)])
    sizes = counts.sum(axis=0)[1:]
    return sizes, (np.arange(len(counts)) @ counts)[1:] / np.maximum(sizes, 1)


def _describe_component(comp: np.ndarray, c: int, prob: np.ndarray, corner: np.ndarray) -> dict:
    """Centre (k, j, i), index span per axis and mean probability of component ``c`` of a crop
    whose first voxel lies at ``corner``; from the component's projections on the three axes."""
    member = comp == c
    centre, span = [], []
    for axis in range(3):
        counts = np.count_nonzero(member, axis=tuple(a for a in range(3) if a != axis))
        index = np.arange(len(counts)) + int(corner[axis])
        hits = index[counts > 0]
        centre.append(float(index @ counts / counts.sum()))  # integer sums: exactly the mean of the indices
        span.append((int(hits[0]), int(hits[-1])))
    if prob.dtype == np.uint8:  # integer sum, as exact as the mean of the gathered values
        mean = int(np.add.reduce(prob, axis=None, where=member, dtype=np.int64)) / int(np.count_nonzero(member))
    else:
        mean = float(prob[member].mean())
    return {"centre": centre, "span": span, "mean": mean}


def foramina_summary(foramina: list[Foramen]) -> dict:
    found = {f.label for f in foramina}
    expected = [foramen_label(level, side) for level in LEVELS for side in SIDES]
    return {"found": len(found), "expected": len(expected), "missing": [e for e in expected if e not in found]}


# ---- anatomical estimate from the level segmentation (no foramen model) ------------------------

@dataclass(frozen=True)
class EstimateParameters:
    posterior_offset_mm: float = 6.0  # foramen centre behind the posterior wall of the bodies
    # the foramen centre lies level with the lower third of the upper body (its roof is the upper
    # pedicle), above the disc's mid-height by this fraction of the upper body's height
    superior_fraction: float = 0.3
    lateral_fraction: float = 0.8  # of the bodies' half-width, either side of their centre (pedicle line)
    default_disc_mm: float = 10.0  # disc height used below L5 when no other disc can be measured


def _body_points(labels: np.ndarray, image: Image, level: int, max_points: int = 20000,
                 box: tuple | None = None) -> np.ndarray | None:
    """RAS points of one level's voxels; ``box``: its bounding box (searched only there)."""
    if box is None:
        kji = np.argwhere(labels == level)
    else:
        kji = np.argwhere(labels[box] == level) + np.array([b.start for b in box])
    if len(kji) == 0:
        return None
    if len(kji) > max_points:  # a deterministic subsample keeps percentiles and centroids, at bounded cost
        kji = kji[np.linspace(0, len(kji) - 1, max_points).astype(int)]
    return image.ijk_to_ras_points(kji[:, ::-1].astype(float))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def estimate_foramina_from_levels(labels: np.ndarray, image: Image,
                                  params: EstimateParameters = EstimateParameters(),
                                  known: tuple[slice, ...] | None = None) -> tuple[list[Foramen], dict]:
    """Foramen positions derived from the L1..L5 bodies: posterior to the disc space between L<k>
    and L<k+1> (below L5: its endplate minus half a measured disc height), one per side at the
    pedicle line. A level whose bodies are missing gets no marker and is reported, never guessed.

    Works in RAS: the local superior axis comes from the body centroids (follows lordosis and
    tilt), posterior is patient-posterior made perpendicular to it, lateral completes the frame."""
    # one pass (over ``known``, a box holding every label, when given), then each body's box only
    boxes = [b and within(known, b) for b in ndimage.find_objects(labels[known] if known else labels,
                                                                  max_label=len(LEVELS))]
    bodies = {level: _body_points(labels, image, level, box=box) if box else None
              for level, box in zip(LEVELS, boxes)}
    centres = {level: pts.mean(axis=0) for level, pts in bodies.items() if pts is not None}
    notes = {"missing_levels": [f"L{k}" for k in LEVELS if k not in centres]}
    if len(centres) < 2:
        notes["reason"] = "fewer than two vertebral bodies segmented"
        return [], notes
    ordered = sorted(centres)
    global_up = _unit(centres[ordered[0]] - centres[ordered[-1]])  # from the lowest to the highest body
    disc_heights = []
    frames = {}
    for level in LEVELS:
        if level not in centres:
            continue
        neighbours = [centres[k] for k in (level - 1, level + 1) if k in centres]
        above = centres.get(level - 1, centres[level])
        below = centres.get(level + 1, centres[level])
        up = _unit(above - below) if np.linalg.norm(above - below) > 0 else global_up  # local: follows lordosis
        posterior = _unit(np.array([0.0, -1.0, 0.0]) - np.dot([0.0, -1.0, 0.0], up) * up)
        right = np.cross(posterior, up)  # RAS: +x is patient right
        right = right if right[0] >= 0 else -right
        frames[level] = (up, posterior, right, neighbours)
    for level in LEVELS[:-1]:
        if level in bodies and level + 1 in bodies and bodies[level] is not None and bodies[level + 1] is not None:
            up = frames[level][0]
            gap = np.percentile(bodies[level] @ up, 3) - np.percentile(bodies[level + 1] @ up, 97)
            if gap > 0:
                disc_heights.append(gap)
    disc = float(np.median(disc_heights)) if disc_heights else params.default_disc_mm
    found = []
    for level in LEVELS:
        upper = bodies.get(level)
        lower = bodies.get(level + 1) if level < 5 else None
        if upper is None or (level < 5 and lower is None):
            continue
        up, posterior, right, _ = frames[level]
        lower_endplate = np.percentile(upper @ up, 3)
        body_height = np.percentile(upper @ up, 97) - lower_endplate
        if level < 5:
            disc_mid = (lower_endplate + np.percentile(lower @ up, 97)) / 2.0
            pair = np.vstack([upper, lower])
        else:
            disc_mid = lower_endplate - disc / 2.0
            pair = upper
        posterior_wall = np.percentile(pair @ posterior, 97)
        lateral = pair @ right
        half_width = (np.percentile(lateral, 97) - np.percentile(lateral, 3)) / 2.0
        centre = pair.mean(axis=0)
        height = disc_mid + params.superior_fraction * body_height
        base = centre + (height - centre @ up) * up + (posterior_wall + params.posterior_offset_mm
                                                       - centre @ posterior) * posterior
        for side, sign in (("left", -1.0), ("right", 1.0)):
            ras = base + sign * params.lateral_fraction * half_width * right
            found.append(Foramen(level, side, tuple(round(float(v), 3) for v in ras), 0.0, 0, (-1, -1),
                                 source="estimated from vertebral levels"))  # confidence: foramen_confidence.py
    notes["disc_height_mm"] = round(disc, 2)
    return found, notes


# ---- steps (registered by name; see steps.py) ----------------------------------------------------

@step("foramina")
def _foramina_step(ctx: StepContext) -> None:
    result = ctx.result
    if "foramina" in ctx.maps:
        foramina, notes = localise_foramina(ctx.maps["foramina"], ctx.maps_grids["foramina"]), {}
        method = "foramen model"
    else:
        foramina, notes = estimate_foramina_from_levels(result.labels.array, ctx.image, known=labelled_box(ctx))
        method = "estimated from vertebral levels (no foramen model)"
    transitional = result.summaries.get("transitional_anatomy", {})
    flag = (f"; TRANSITIONAL ANATOMY SUSPECTED ({transitional['status']}): check the level count"
            if transitional.get("flagged") else "")
    decoding = result.summaries.get("level_decoding", {})
    if decoding.get("doubtful"):
        flag += f"; LEVEL COUNT DOUBTFUL (level confidence {decoding['level_confidence']:.2f})"
    evidence = foramen_evidence(foramina, decoding.get("level_confidence"),
                                body_probabilities(decoding) if decoding else None)
    settings = ctx.settings.get("foramen_confidence", {})
    model = ConfidenceModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    for f, p in zip(foramina, confidences(evidence, model)):
        f.probability = p  # the calibrated confidence replaces the raw detection / placeholder value
    result.points = [{"label": f.label, "ras": f.ras, "description": f.description + flag,
                      "attributes": {"level": str(f.level), "side": f.side,
                                     "confidence": f"{f.probability:.3f}", "source": f.source,
                                     "transitional": transitional.get("status", "not checked"),
                                     "level_confidence": str(decoding.get("level_confidence", "")),
                                     **{f"evidence_{k}": str(v) for k, v in e.items()}}}
                     for f, e in zip(foramina, evidence)]
    result.summaries["foramina"] = {**foramina_summary(foramina), "method": method, **notes,
                                    "confidence": {"meaning": f"probability that the marker is within "
                                                              f"{model.tolerance_mm:g} mm of its foramen "
                                                              "(calibrated on phantoms)",
                                                   "per_foramen": {f.label: f.probability for f in foramina},
                                                   "least_confident_first": [f.label for f in sorted(
                                                       foramina, key=lambda f: f.probability)]}}
    missing = result.summaries["foramina"]["missing"]
    if missing:
        result.warnings.append(f"foramina not found (not guessed): {', '.join(missing)}")
