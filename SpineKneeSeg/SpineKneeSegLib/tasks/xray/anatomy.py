"""Radiograph measurements on a femur segmentation: the femoral head's centre and diameter.

Hip radiograph readers expect the femoral head as a circle (centre and diameter; the basis of
centre-edge, neck-shaft and offset measurements). It is fitted here to the segment's own boundary:

1. each femur component's distance map (mm, the pixel spacing's own anisotropy) gives candidate
   centres: ridge maxima whose inscribed radius is a plausible head radius;
2. a candidate circle (the inscribed radius up to 1.25x, for heads segmented slightly oval) scores
   the angular coverage of the boundary points lying on it (within a tolerance) minus that of
   boundary points cutting into its disc: the head follows its circle over ~3/4 of a turn with
   bone inside (the neck leaves the rest open), the metaphysis, the shaft or a square blob touch
   theirs at a few places only or are cut by their own edges;
3. the best candidate's arc points are refitted by least squares (Kasa's algebraic fit, twice,
   re-selecting the arc points around each new circle).

No library in the dependencies fits circles to mask boundaries (scikit-image's CircleModel would;
it is not a dependency), so the few lines live here.

The side (patient right/left) comes from the image geometry: the head lies medial to its femur,
so a head toward patient-left of its femur's centroid belongs to a right femur. For files without
orientation (PNG, most CR) the geometry is the radiographic convention (patient right on the image
left), which a flipped or PA image breaks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.core.tables import ColumnSpec, Table
from SpineKneeSegLib.engine.postprocessing import label_components
from SpineKneeSegLib.engine.steps import StepContext, step
from SpineKneeSegLib.tasks.xray.polarity import ASSUMED_FIELD_MM, working_pixel_mm

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py)

ANGLE_BINS = 72  # 5 degree bins for the arc coverage
# the smallest femur a radiograph can show and still be a femur: half the smallest femur in the
# 160 training phantoms (seeds 0-159, pelvis and hip views: 42.6 cm2; Training/xray_real.py
# phantom-femur-areas prints them). Fixed from that anatomy before any chest radiograph was scored.
MIN_FEMUR_MM2 = 2000.0


@dataclass
class FemoralHead:
    side: str  # "right" | "left" (patient side, from the image geometry)
    centre_ij: tuple[float, float]  # continuous pixel index (column i, row j)
    centre_ras: tuple[float, float, float]
    diameter_mm: float
    fit_rms_mm: float  # RMS distance of the arc points from the fitted circle
    arc_coverage: float  # fraction of the circle on which the segment boundary follows it
    femur_area_mm2: float  # area of the femur component the head belongs to

    @property
    def label(self) -> str:
        return f"femoral head {self.side}"

    def description(self) -> str:
        return (f"{self.label}: diameter {self.diameter_mm:.1f} mm; circle fitted to the femur segment boundary "
                f"(RMS {self.fit_rms_mm:.2f} mm, arc {100 * self.arc_coverage:.0f} % of the circle)")

    def as_dict(self) -> dict:
        return {"side": self.side, "centre_ras": [round(v, 2) for v in self.centre_ras],
                "centre_ij": [round(v, 2) for v in self.centre_ij], "diameter_mm": round(self.diameter_mm, 2),
                "fit_rms_mm": round(self.fit_rms_mm, 3), "arc_coverage": round(self.arc_coverage, 3),
                "femur_area_mm2": round(self.femur_area_mm2, 1)}


def _kasa_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle (algebraic: x^2 + y^2 + D x + E y + F = 0) -> (cx, cy, r)."""
    a = np.column_stack([x, y, np.ones_like(x)])
    b = -(x ** 2 + y ** 2)
    (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = -d / 2.0, -e / 2.0
    return float(cx), float(cy), float(np.sqrt(max(cx ** 2 + cy ** 2 - f, 0.0)))


def _coverage(dx: np.ndarray, dy: np.ndarray) -> float:
    if len(dx) == 0:
        return 0.0
    bins = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * ANGLE_BINS).astype(int) % ANGLE_BINS
    return len(np.unique(bins)) / ANGLE_BINS


def fit_head(mask: np.ndarray, spacing_rc: tuple[float, float], min_diameter_mm: float = 20.0,
             max_diameter_mm: float = 75.0, min_coverage: float = 0.5) -> dict | None:
    """Circle of the femoral head on one femur's 2D mask (rows, cols) with (row, col) pixel
    spacing in mm -> {"centre_rc" (pixel index), "diameter_mm", "fit_rms_mm", "arc_coverage"},
    or None when no candidate circle is followed by the boundary over ``min_coverage`` of a turn."""
    sr, sc = spacing_rc
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    sub = np.pad(mask[r0:r1, c0:c1], 1)  # the image edge counts as boundary (a cut-off shaft)
    dist = ndimage.distance_transform_edt(sub, sampling=(sr, sc))
    edge = sub & ~ndimage.binary_erosion(sub)
    er, ec = np.nonzero(edge)
    by, bx = er * sr, ec * sc  # boundary points in mm
    ridge = (dist == ndimage.maximum_filter(dist, size=3)) & (dist >= min_diameter_mm / 2) & (
        dist <= max_diameter_mm / 2)
    cand = np.argwhere(ridge)
    if len(cand) == 0:
        return None
    if len(cand) > 400:  # keep the deepest: heads are among the widest parts of a femur
        cand = cand[np.argsort(-dist[tuple(cand.T)])[:400]]
    best = None
    for cr, cc in cand:
        inscribed = float(dist[cr, cc])
        dy, dx = by - cr * sr, bx - cc * sc
        d = np.hypot(dx, dy)
        tol = max(1.5 * max(sr, sc), 0.05 * inscribed)
        # the inscribed circle touches the nearest boundary; a segmented head that is slightly
        # oval or off-centre follows a circle a little larger: try radii up to 1.25x
        for radius in np.arange(inscribed, min(1.25 * inscribed, max_diameter_mm / 2) + 1e-9, tol / 2):
            on = np.abs(d - radius) <= tol
            inside = d < radius - tol  # boundary cutting into the disc: the disc is not all bone
            score = _coverage(dx[on], dy[on]) - _coverage(dx[inside], dy[inside])
            if best is None or score > best[0] + 1e-9 or (abs(score - best[0]) <= 1e-9 and radius > best[3]):
                best = (score, cr * sr, cc * sc, float(radius))
    if best is None or best[0] < min_coverage:
        return None
    _, cy, cx, radius = best
    for _ in range(2):  # refit on the arc points around the current circle
        dx, dy = bx - cx, by - cy
        tol = max(1.5 * max(sr, sc), 0.05 * radius)
        on = np.abs(np.hypot(dx, dy) - radius) <= tol
        if on.sum() < 8:
            break
        cx, cy, radius = _kasa_fit(bx[on], by[on])
    dx, dy = bx - cx, by - cy
    tol = max(1.5 * max(sr, sc), 0.05 * radius)
    on = np.abs(np.hypot(dx, dy) - radius) <= tol
    residual = np.hypot(dx[on], dy[on]) - radius
    # boundary pixel centres lie half a pixel inside the true edge: add it back to the radius
    radius_edge = radius + 0.5 * (sr + sc) / 2.0
    return {"centre_rc": (cy / sr - 1 + r0, cx / sc - 1 + c0), "diameter_mm": 2.0 * radius_edge,
            "fit_rms_mm": float(np.sqrt(np.mean(residual ** 2))) if on.any() else float("nan"),
            "arc_coverage": _coverage(dx[on], dy[on])}


def femoral_heads(labels: np.ndarray, image: Image, label: int = 1, max_femurs: int = 2,
                  min_fraction: float = 0.1) -> tuple[list[FemoralHead], list[str]]:
    """Femoral heads of the (at most ``max_femurs``) largest femur components of a single-slice
    label map (shape (1, rows, cols)) -> (heads, warnings)."""
    if labels.shape[0] != 1:
        raise ValueError(f"femoral heads need a single-slice label map, got shape {labels.shape}")
    mask = labels[0] == label
    comp, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return [], ["no femur segmented: no femoral head measured"]
    sizes = np.bincount(comp.ravel())[1:]
    order = [int(k) + 1 for k in np.argsort(-sizes) if sizes[k] >= min_fraction * sizes.max()][:max_femurs]
    spacing_rc = (image.spacing[1], image.spacing[0])
    pixel_mm2 = spacing_rc[0] * spacing_rc[1]
    left_lps = image.direction[:, :2] @ np.diag(image.spacing[:2])  # LPS step per +i, +j
    heads, warnings = [], []
    for k in order:
        femur = comp == k
        fit = fit_head(femur, spacing_rc)
        if fit is None:
            warnings.append(f"femur component of {sizes[k - 1] * pixel_mm2:.0f} mm2: no round femoral head found "
                            "on its boundary (head not in view, or the segmentation is not round there)")
            continue
        hr, hc = fit["centre_rc"]
        rows, cols = np.nonzero(femur)
        # LPS x of (head - femur centroid): > 0 = toward patient left = medial of a right femur
        toward_left = float(left_lps[0] @ np.array([hc - cols.mean(), hr - rows.mean()]))
        side = "right" if toward_left > 0 else "left"
        ras = image.ijk_to_ras_points([[hc, hr, 0.0]])[0]
        heads.append(FemoralHead(side, (float(hc), float(hr)), tuple(float(v) for v in ras), fit["diameter_mm"],
                                 fit["fit_rms_mm"], fit["arc_coverage"], float(sizes[k - 1] * pixel_mm2)))
    sides = [h.side for h in heads]
    if len(sides) == 2 and sides[0] == sides[1]:
        warnings.append(f"both femoral heads come out on the patient's {sides[0]} side: check the image "
                        "orientation (the side follows the head's position medial to its femur)")
        for h, name in zip(sorted(heads, key=lambda h: h.centre_ras[0]), ("left", "right")):
            h.side = name  # the more patient-right head (larger RAS x) is the right one
    return sorted(heads, key=lambda h: h.side, reverse=True), warnings


def head_table(heads: list[FemoralHead]) -> Table:
    rows = [{"structure": h.label, "side": h.side, "centre_r": round(h.centre_ras[0], 2),
             "centre_a": round(h.centre_ras[1], 2), "centre_s": round(h.centre_ras[2], 2),
             "centre_i": round(h.centre_ij[0], 2), "centre_j": round(h.centre_ij[1], 2),
             "diameter_mm": round(h.diameter_mm, 2), "fit_rms_mm": round(h.fit_rms_mm, 3),
             "arc_coverage": round(h.arc_coverage, 3)} for h in heads]
    columns = [ColumnSpec("structure", "string", description="femoral head (patient side)"),
               ColumnSpec("side", "string", description="patient side from the image geometry"),
               ColumnSpec("centre_r", "float", "mm", "centre, RAS R"),
               ColumnSpec("centre_a", "float", "mm", "centre, RAS A"),
               ColumnSpec("centre_s", "float", "mm", "centre, RAS S"),
               ColumnSpec("centre_i", "float", "pixel", "centre, image column (0 = first pixel's centre)"),
               ColumnSpec("centre_j", "float", "pixel", "centre, image row"),
               ColumnSpec("diameter_mm", "float", "mm", "fitted head diameter"),
               ColumnSpec("fit_rms_mm", "float", "mm", "RMS of boundary points from the circle"),
               ColumnSpec("arc_coverage", "float", description="fraction of the circle followed by the boundary")]
    return Table("Femoral heads", columns, rows, "femoral_heads.tsv")


def drop_implausible_femurs(labels: np.ndarray, pixel_mm2: float, min_area_mm2: float = MIN_FEMUR_MM2,
                            label: int = 1) -> tuple[np.ndarray, list[float], list[float]]:
    """Remove femur components smaller than any proximal femur a hip or pelvis radiograph shows
    (a blob on a chest or knee radiograph is not a femur) -> (labels, kept areas mm2, dropped
    areas mm2), largest first. Components as every clean-up counts them (label_components: on a
    single slice, 8-connected)."""
    found = label_components(labels).get(label)
    if found is None:
        return labels, [], []
    box, comp, sizes = found
    areas = sizes * pixel_mm2  # areas[0] = 0: background
    small = np.flatnonzero((areas < min_area_mm2) & (sizes > 0))
    out = labels
    if len(small):
        out = labels.copy()
        out[box][np.isin(comp, small)] = 0
    kept = sorted((float(a) for a in areas if a >= min_area_mm2 and a > 0), reverse=True)
    dropped = sorted((float(areas[k]) for k in small), reverse=True)
    return out, kept, dropped


# ---- steps (registered by name; see steps.py) ----------------------------------------------------

@step("femur_presence")
def _femur_presence_step(ctx: StepContext) -> None:
    """Radiograph-level "is there a femur at all": without one, an empty map and a plain warning
    rather than a blob named femur (the checkpoint may carry its own "femur_presence"
    {"min_area_mm2"})."""
    min_mm2 = float(ctx.settings.get("femur_presence", {}).get("min_area_mm2", MIN_FEMUR_MM2))
    pixel_mm, assumed = working_pixel_mm(ctx.image)
    pixel_mm2 = pixel_mm ** 2 if assumed else float(ctx.image.spacing[0] * ctx.image.spacing[1])
    labels, kept, dropped = drop_implausible_femurs(ctx.result.labels.array, pixel_mm2, min_mm2)
    ctx.result.labels = ctx.image.with_array(labels)
    ctx.result.summaries["femur_presence"] = {
        "femur_found": bool(kept), "min_area_mm2": min_mm2, "kept_mm2": [round(a, 1) for a in kept],
        "dropped_mm2": [round(a, 1) for a in dropped], "pixel_mm_assumed": round(pixel_mm, 4) if assumed else None}
    if dropped:
        regions = ", ".join(f"{a / 100:.1f}" for a in dropped)
        what = ("no femur found in this radiograph" if not kept
                else f"{len(kept)} femur segment(s) kept")
        ctx.result.warnings.append(
            f"{what}: removed {len(dropped)} region(s) the network marked as femur ({regions} cm2), each "
            f"smaller than the smallest plausible proximal femur in view ({min_mm2 / 100:.0f} cm2)"
            + (f"; sizes with an assumed {pixel_mm:.3g} mm pixel (no pixel size in the file: the longer side "
               f"taken as a {ASSUMED_FIELD_MM / 10:.0f} cm field)" if assumed else ""))


@step("femoral_heads")
def _femoral_heads_step(ctx: StepContext) -> None:
    heads, notes = femoral_heads(ctx.result.labels.array, ctx.image)
    ctx.result.tables.append(head_table(heads))
    ctx.result.points = [{"label": h.label, "ras": h.centre_ras, "description": h.description(),
                          "attributes": {"side": h.side, "diameter_mm": f"{h.diameter_mm:.2f}",
                                         "fit_rms_mm": f"{h.fit_rms_mm:.3f}",
                                         "arc_coverage": f"{h.arc_coverage:.3f}"}} for h in heads]
    ctx.result.summaries["femoral_heads"] = [h.as_dict() for h in heads]
    if ctx.image.meta.get("spacing_note"):
        notes.append(f"femoral head diameters and areas in mm rest on: {ctx.image.meta['spacing_note']}")
    ctx.result.warnings.extend(notes)
