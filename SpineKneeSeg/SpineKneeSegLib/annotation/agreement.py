"""Agreement between two readers' foramen markers (as seed 004 compared its annotations with a
radiologist's): per foramen, whether both marked it on a common slice and how far apart their
points are within that slice.

Slices come from the image's geometry when the scan is given, else from the ``slice=`` field the
annotation mode writes in every point's description. In-plane distances are measured in the
slice plane (the component along the slice normal removed; without the image the normal is RAS
x, i.e. the seed's yz distance); per foramen they are averaged over the common slices, each
slice's points averaged first. ``lateral_mm`` is the distance between the two readers' point
centroids along the normal.
"""
from __future__ import annotations

import numpy as np

from SpineKneeSegLib.annotation.foramen_labels import (
    CONFIRMED,
    NOT_VISIBLE,
    ForamenPoint,
    MarkerRecord,
    point_slices,
)
from SpineKneeSegLib.annotation.worklist import FORAMEN_ORDER
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.tasks.spine.foramina import lateral_axis

WITHIN_MM = 5.0  # the seed's "within 5 mm" criterion


def _slice_normal(image: Image | None) -> np.ndarray:
    if image is None:
        return np.array([1.0, 0.0, 0.0])
    column = image.ijk_to_ras[:3, 2 - lateral_axis(image)]
    return column / np.linalg.norm(column)


def _placed(records: list[MarkerRecord], foramen: str, image: Image | None, which: str, path) -> list[tuple[int, np.ndarray]]:
    points = [r for r in records if r.foramen == foramen and r.status == CONFIRMED and r.ras is not None]
    if image is not None:
        slices = point_slices([ForamenPoint(1, "left", r.ras) for r in points], image)
        return [(int(s), np.asarray(r.ras)) for s, r in zip(slices, points)]
    out = []
    for r in points:
        if r.slice_index is None:
            raise InputError(f"reader {which}: point {r.label!r} records no slice; pass the scan (--image) "
                             "so slices can be computed", path)
        out.append((r.slice_index, np.asarray(r.ras)))
    return out


def compare_readers(a: list[MarkerRecord], b: list[MarkerRecord], image: Image | None = None,
                    paths=("A", "B")) -> dict:
    normal = _slice_normal(image)

    def in_plane(d: np.ndarray) -> float:
        return float(np.linalg.norm(d - (d @ normal) * normal))

    rows = []
    for foramen in FORAMEN_ORDER:
        pa, pb = _placed(a, foramen, image, "A", paths[0]), _placed(b, foramen, image, "B", paths[1])
        nva = any(r.foramen == foramen and r.status == NOT_VISIBLE for r in a)
        nvb = any(r.foramen == foramen and r.status == NOT_VISIBLE for r in b)
        row = {"foramen": foramen, "a_points": len(pa), "b_points": len(pb),
               "a_slices": sorted({s for s, _ in pa}), "b_slices": sorted({s for s, _ in pb}),
               "a_not_visible": nva, "b_not_visible": nvb}
        common = sorted(set(row["a_slices"]) & set(row["b_slices"]))
        row["common_slices"] = common
        row["overlap"] = bool(common)
        per_slice = [in_plane(np.mean([p for s, p in pa if s == c], axis=0) - np.mean([p for s, p in pb if s == c], axis=0))
                     for c in common]
        row["in_plane_mm"] = round(float(np.mean(per_slice)), 3) if per_slice else None
        if pa and pb:
            d = np.mean([p for _, p in pa], axis=0) - np.mean([p for _, p in pb], axis=0)
            row["centroid_in_plane_mm"] = round(in_plane(d), 3)
            row["lateral_mm"] = round(abs(float(d @ normal)), 3)
        else:
            row["centroid_in_plane_mm"] = row["lateral_mm"] = None
        row["agreement"] = ("both" if pa and pb else "only A" if pa else "only B" if pb else
                            "both not visible" if nva and nvb else "neither")
        rows.append(row)
    both = [r for r in rows if r["agreement"] == "both"]
    distances = [r["in_plane_mm"] for r in both if r["in_plane_mm"] is not None]
    summary = {
        "foramina_both": len(both),
        "with_common_slice": sum(r["overlap"] for r in both),
        "within_5mm": sum(d <= WITHIN_MM for d in distances),
        # missed or no common slice counts as not within, as the seed counted a miss as wrong
        "percent_within_5mm": round(100.0 * sum(d <= WITHIN_MM for d in distances) / len(both), 1) if both else None,
        "mean_in_plane_mm": round(float(np.mean(distances)), 3) if distances else None,
        "median_in_plane_mm": round(float(np.median(distances)), 3) if distances else None,
        "max_in_plane_mm": round(float(np.max(distances)), 3) if distances else None,
        "only_a": [r["foramen"] for r in rows if r["agreement"] == "only A"],
        "only_b": [r["foramen"] for r in rows if r["agreement"] == "only B"],
        "not_visible_both": [r["foramen"] for r in rows if r["agreement"] == "both not visible"],
    }
    return {"a": str(paths[0]), "b": str(paths[1]), "foramina": rows, "summary": summary}
