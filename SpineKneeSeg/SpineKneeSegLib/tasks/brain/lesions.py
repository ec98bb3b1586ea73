"""Per-lesion table (seed 002): lesions are 3D connected components of the final mask."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.core.tables import ColumnSpec, Table
from SpineKneeSegLib.engine.postprocessing import label_in_box
from SpineKneeSegLib.engine.steps import StepContext, step

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py)

# seed 002's size brackets, in voxels
BRACKETS = ((0, 10), (10, 400), (400, 1000), (1000, None))
CONNECTIVITY = {6: 1, 18: 2, 26: 3}  # -> ndimage.generate_binary_structure rank-3 connectivity

LESION_COLUMNS = [
    ColumnSpec("lesion_id", "int", description="1 = largest lesion"),
    ColumnSpec("voxels", "int", "voxels"),
    ColumnSpec("volume_mm3", "float", "mm3"),
    ColumnSpec("depth_slices", "int", "slices", "number of slices (along the slice axis) the lesion spans"),
    ColumnSpec("centroid_r", "float", "mm", "centroid, RAS right"),
    ColumnSpec("centroid_a", "float", "mm", "centroid, RAS anterior"),
    ColumnSpec("centroid_s", "float", "mm", "centroid, RAS superior"),
    ColumnSpec("bbox", "string", "voxels", "bounding box as i0-i1 j0-j1 k0-k1 (inclusive voxel indices)"),
    ColumnSpec("bracket", "string", "voxels", "size bracket [lo,hi) in voxels (seed 002)"),
    ColumnSpec("mean_flair", "float", description="mean FLAIR intensity inside the lesion (input units)"),
]


def bracket_name(voxels: int) -> str:
    for lo, hi in BRACKETS:
        if voxels >= lo and (hi is None or voxels < hi):
            return f"[{lo},{'inf' if hi is None else hi})"
    raise ValueError(voxels)


def label_lesions(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Lesion ids (1..n) on the mask's grid."""
    cropped, n, box = _label_in_box(mask, connectivity)
    components = np.zeros(mask.shape, np.int32)
    if box is not None:
        components[box] = cropped
    return components, n


def _label_in_box(mask: np.ndarray, connectivity: int):
    """Components labelled only inside the mask's bounding box (lesions fill a small part of a
    7 M-voxel brain): (ids in the box, n, the box as slices; None when the mask is empty)."""
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return label_in_box(mask, ndimage.generate_binary_structure(3, CONNECTIVITY[connectivity]))


THICK_SLICE_NOTE_MM = 3.0  # thicker voxels: the report says small lesions may be averaged away


@dataclass(frozen=True)
class DecodingRule:
    """Lesion mask from the sigmoid probability: voxels >= ``threshold``, then 26-connected lesions
    smaller than ``min_volume_mm3`` dropped. Applies to inputs whose thickest voxel side is at most
    ``max_slice_mm`` (None: any) — thick slabs average small lesions into faint ones."""
    threshold: float = 0.5
    min_volume_mm3: float = 0.0
    max_slice_mm: float | None = None


def decoding_rules(settings: dict | None) -> list[DecodingRule]:
    """A checkpoint's ``postprocessing.lesion_decoding`` (``{"rules": [...]}``, chosen by
    leave-one-case-out for lesion F1); without one, the seed's plain 0.5 cut."""
    rules = [DecodingRule(**r) for r in (settings or {}).get("rules", [])]
    return sorted(rules, key=lambda r: float("inf") if r.max_slice_mm is None else r.max_slice_mm) or [DecodingRule()]


def rule_for(rules: list[DecodingRule], slice_mm: float) -> DecodingRule:
    for rule in rules:
        if rule.max_slice_mm is None or slice_mm <= rule.max_slice_mm + 1e-6:
            return rule
    return rules[-1]


def decode_lesions(probabilities: np.ndarray, spacing, rule: DecodingRule, connectivity: int = 26) -> np.ndarray:
    """uint8 lesion mask from uint8 probabilities (0..255). Only removes whole lesions, so two
    lesions apart in the thresholded mask stay apart (never merged)."""
    mask = probabilities >= int(np.ceil(rule.threshold * 255 - 1e-9))
    if rule.min_volume_mm3 > 0:
        comp, n, box = _label_in_box(mask, connectivity)
        if n:
            sizes = np.bincount(comp.ravel(), minlength=n + 1) * float(np.prod(spacing))
            keep = sizes >= rule.min_volume_mm3
            keep[0] = False
            mask = np.zeros(mask.shape, bool)
            mask[box] = keep[comp]
    return mask.astype(np.uint8)


def lesion_table(mask: np.ndarray, flair: Image, connectivity: int = 26,
                 slice_axis: int = 0) -> tuple[Table, dict]:
    """Rows sorted by volume (largest first) and a summary for report.json."""
    comp, n, box = _label_in_box(mask, connectivity)
    voxel_mm3 = float(np.prod(flair.spacing))
    rows = []
    if n:
        index = np.arange(1, n + 1)
        offset = np.array([s.start for s in box])
        # statistics over the lesion voxels only (bincount), not n passes over the whole volume
        flat = np.flatnonzero(comp)
        ids = comp.ravel()[flat]
        counts = np.bincount(ids, minlength=n + 1)[1:]
        kji = np.unravel_index(flat, comp.shape)
        centroids_kji = np.stack([np.bincount(ids, weights=a, minlength=n + 1)[1:] for a in kji], axis=1) \
            / counts[:, None] + offset
        means = np.bincount(ids, weights=flair.array[box].ravel()[flat].astype(np.float64), minlength=n + 1)[1:] \
            / counts
        boxes = ndimage.find_objects(comp)
        centroids_ras = flair.ijk_to_ras_points(centroids_kji[:, ::-1])
        for c, count, lesion_box, ras, mean in zip(index, counts, boxes, centroids_ras, means):
            (k0, k1), (j0, j1), (i0, i1) = ((s.start + o, s.stop - 1 + o) for s, o in zip(lesion_box, offset))
            depth = lesion_box[slice_axis].stop - lesion_box[slice_axis].start
            rows.append({"voxels": int(count), "volume_mm3": round(float(count) * voxel_mm3, 3),
                         "depth_slices": int(depth), "centroid_r": round(float(ras[0]), 2),
                         "centroid_a": round(float(ras[1]), 2), "centroid_s": round(float(ras[2]), 2),
                         "bbox": f"{i0}-{i1} {j0}-{j1} {k0}-{k1}", "bracket": bracket_name(int(count)),
                         "mean_flair": round(float(mean), 3)})
    rows.sort(key=lambda r: -r["voxels"])
    for i, row in enumerate(rows, 1):
        row["lesion_id"] = i
    rows = [{col.name: row[col.name] for col in LESION_COLUMNS} for row in rows]
    return Table("Lesions", LESION_COLUMNS, rows, "lesions.tsv"), lesion_summary(rows, connectivity)


def lesion_summary(rows: list[dict], connectivity: int) -> dict:
    per_bracket = {}
    for lo, hi in BRACKETS:
        name = f"[{lo},{'inf' if hi is None else hi})"
        in_bracket = [r for r in rows if r["bracket"] == name]
        per_bracket[name] = {"count": len(in_bracket),
                             "volume_mm3": round(sum(r["volume_mm3"] for r in in_bracket), 3)}
    total = sum(r["volume_mm3"] for r in rows)
    return {"lesion_count": len(rows), "connectivity": connectivity, "brackets": per_bracket,
            "total_lesion_load_ml": round(total / 1000.0, 4)}


# ---- steps (registered by name; see steps.py) ----------------------------------------------------

@step("lesion_decoding", needs_probabilities=True)
def _lesion_decoding_step(ctx: StepContext) -> None:
    """Threshold and minimum lesion volume chosen by leave-one-case-out (issue 22), by the input's
    thickest voxel side; without probabilities the network's own 0.5 cut stands."""
    probs = ctx.maps.get("probabilities")
    if probs is None:
        return
    rule = rule_for(decoding_rules(ctx.settings.get("lesion_decoding")), max(ctx.image.spacing))
    ctx.result.labels = ctx.image.with_array(decode_lesions(probs[0], ctx.image.spacing, rule))
    summary = {"threshold": rule.threshold, "min_volume_mm3": rule.min_volume_mm3, "rule_max_slice_mm": rule.max_slice_mm}
    thickest = max(ctx.image.spacing)
    if thickest > THICK_SLICE_NOTE_MM:
        summary["note"] = (f"voxels up to {thickest:g} mm thick: a lesion much thinner than that is averaged with its "
                           "surroundings and may be missed; the model card gives lesion recall per size at 3, 5 and 7.5 mm")
    ctx.result.summaries["lesion_decoding"] = summary


@step("lesion_table")
def _lesion_table_step(ctx: StepContext) -> None:
    from SpineKneeSegLib.engine.preprocessing import slice_axis

    table, summary = lesion_table(ctx.result.labels.array, ctx.image, slice_axis=slice_axis(ctx.image, "axial"))
    ctx.result.tables.append(table)
    ctx.result.summaries["lesions"] = summary
