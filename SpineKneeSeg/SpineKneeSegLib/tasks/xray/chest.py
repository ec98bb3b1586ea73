"""Is the chest radiograph the network saw upright? A radiograph stored rotated or flipped whose
file does not say so (a PNG export, a DICOM without PatientOrientation: it goes to the network as
stored) gives lungs, heart and clavicles that look like nothing: no warning said so before (a
JPCNN010 copy turned 90 degrees got a 21 cm2 "left lung" and a 7 cm2 heart; upright 224 and 110
cm2). The checks are the layout every upright PA/AP chest radiograph shows, in the image's rows and
columns as the network saw them (upright where the DICOM header says how, tasks/xray/orientation.py;
else as stored), rows toward the feet, patient right on the image's left:

* both lungs, the heart and the clavicles are found;
* the lungs lie side by side (their centres' rows differ by less than half their columns);
* the right lung is on the image's left;
* the heart's centre is below the lungs' centres, and the clavicles' centre above both lungs'.

Geometric margins, not fitted thresholds; measured on the JSRT radiographs as stored and turned
or flipped (``Training/xray_upright.py``).
"""
from __future__ import annotations

import numpy as np

from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.core.tables import ColumnSpec, Table
from SpineKneeSegLib.engine.preprocessing import canonical_orientation
from SpineKneeSegLib.engine.steps import StepContext, step

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py)

RIGHT_LUNG, LEFT_LUNG, HEART = 1, 2, 3
SIDE_BY_SIDE = 0.5  # largest |row difference| / |column difference| of the lungs' centres


def _centre(mask: np.ndarray) -> tuple[float, float] | None:
    rows, cols = np.nonzero(mask)
    return (float(rows.mean()), float(cols.mean())) if rows.size else None


def chest_layout(labels: np.ndarray, clavicles: np.ndarray | None) -> dict:
    """The layout checks on a chest radiograph's labels (rows, columns): each check passed or not,
    with its measure; ``failed`` lists the checks that did not pass."""
    right, left, heart = (_centre(labels == v) for v in (RIGHT_LUNG, LEFT_LUNG, HEART))
    clav = _centre(clavicles > 0) if clavicles is not None else None
    found = {"right lung": right, "left lung": left, "heart": heart}
    if clavicles is not None:
        found["clavicles"] = clav
    checks = {"all found": {"passed": all(c is not None for c in found.values()),
                            "missing": [name for name, c in found.items() if c is None]}}
    if right and left:
        d_row, d_col = left[0] - right[0], left[1] - right[1]
        ratio = abs(d_row) / max(abs(d_col), 1e-9)
        checks["lungs side by side"] = {"passed": ratio < SIDE_BY_SIDE, "row_over_column": round(ratio, 3)}
        checks["right lung on the image's left"] = {"passed": d_col > 0, "columns_apart": round(d_col, 1)}
        lungs_row = (right[0] + left[0]) / 2
        if heart:
            below = heart[0] - lungs_row
            checks["heart below the lungs' centres"] = {"passed": below > 0, "rows_below": round(below, 1)}
        if clav:
            above = min(right[0], left[0]) - clav[0]
            checks["clavicles above the lungs"] = {"passed": above > 0, "rows_above": round(above, 1)}
    failed = [name for name, check in checks.items() if not check["passed"]]
    return {"passed": not failed, "failed": failed, "checks": checks, "upright_score": heart_offset(right, left, heart)}


def heart_offset(right, left, heart) -> float | None:
    """The heart's centre column from the midpoint of the lungs' centres, in units of half their
    spacing: positive toward the left lung, as in all but about 1 in 10,000 people (dextrocardia).
    Not a check: a mirrored image's offset overlaps upright ones (Training/xray_upright.py)."""
    if not (right and left and heart) or left[1] <= right[1]:
        return None
    return round((heart[1] - (right[1] + left[1]) / 2) / ((left[1] - right[1]) / 2), 3)


def layout_warning(summary: dict) -> str | None:
    offset = summary.get("upright_score")
    if summary["passed"] and offset is not None and offset <= 0:
        return (f"the heart lies toward the image's left ({offset:+.2f} of the lungs' half-spacing from their "
                "midline): a mirrored image (patient right on the image's right), or dextrocardia? The lungs are "
                "named by their side of the image: check which is which")
    if summary["passed"]:
        return None
    return (f"the labels do not lie as on an upright chest radiograph ({', '.join(summary['failed'])} failed): "
            "is the image stored rotated or flipped, or not a PA/AP chest? The network sees it as stored; turn "
            "it upright (head up, patient right on the image's left) and run again")


@step("chest_layout")
def _chest_layout_step(ctx: StepContext) -> None:
    clavicles = ctx.result.layers.get("clavicles")
    upright = canonical_orientation(ctx.image, "image")  # as the network saw it (orientation.py)
    summary = chest_layout(upright.apply(ctx.result.labels.array)[0],
                           upright.apply(clavicles.array)[0] if clavicles is not None else None)
    ctx.result.summaries["chest_layout"] = summary
    warning = layout_warning(summary)
    if warning:
        ctx.result.warnings.append(warning)


# ---- cardiothoracic ratio --------------------------------------------------------------------------

CTR_LIMIT = 0.5  # the usual upper limit on a PA radiograph (an AP or supine view magnifies the heart)
# the heart is opened by a disk of this radius before its width is taken: a thin tail the network
# runs along the diaphragm (JPCLN012: +29 mm) is not the heart's border. Chosen on the chest model's
# 148 trained-on JSRT radiographs among 0 / 8 / 12 / 16 / 20 mm (largest error 0.094 / 0.064 /
# 0.062 / 0.062 / 0.065, mean 0.0152 / 0.0135 / 0.0122 / 0.0117 / 0.0116: the lowest mean of the
# smallest largest errors), then measured on the 50 held-out (Training/xray_ctr.py)
HEART_OPENING_MM = 16.0


def cardiothoracic_ratio(labels: np.ndarray, pixel_mm: tuple[float, float],
                         opening_mm: float = HEART_OPENING_MM) -> dict:
    """The cardiothoracic ratio from upright labels (rows toward the feet): the heart's greatest
    width (its leftmost to its rightmost pixel, the sum of the right and left extents from the
    midline that readers measure; after an opening by a disk of ``opening_mm``) over the thorax's
    greatest inner width (the widest row from the right lung's outer edge to the left lung's, rows
    holding both lungs). ``pixel_mm``: (row, column) pixel size; widths in mm."""
    heart = labels == HEART
    if opening_mm > 0 and heart.any():
        heart = _opened(heart, pixel_mm, opening_mm)
    col_mm = pixel_mm[1]
    heart_cols = np.nonzero(heart.any(axis=0))[0]
    right, left = labels == RIGHT_LUNG, labels == LEFT_LUNG
    rows = np.nonzero(right.any(axis=1) & left.any(axis=1))[0]
    if heart_cols.size == 0 or rows.size == 0:
        missing = [name for name, found in (("heart", heart_cols.size), ("both lungs in one row", rows.size))
                   if not found]
        return {"ratio": None, "note": f"not measured: no {' and no '.join(missing)}"}
    lungs = right[rows] | left[rows]
    first = lungs.argmax(axis=1)
    last = lungs.shape[1] - 1 - lungs[:, ::-1].argmax(axis=1)
    widest = int(np.argmax(last - first))
    heart_mm = float(heart_cols[-1] - heart_cols[0] + 1) * col_mm
    thorax_mm = float(last[widest] - first[widest] + 1) * col_mm
    ratio = heart_mm / thorax_mm
    heart_row = float(np.nonzero(heart.any(axis=1))[0].mean())  # where the picture draws the heart's width
    return {"ratio": round(ratio, 3), "heart_width_mm": round(heart_mm, 1), "thorax_width_mm": round(thorax_mm, 1),
            "above_limit": bool(ratio > CTR_LIMIT), "limit": CTR_LIMIT,
            "_ends": {"heart": ((heart_row, float(heart_cols[0])), (heart_row, float(heart_cols[-1]))),
                      "thorax": ((float(rows[widest]), float(first[widest])),
                                 (float(rows[widest]), float(last[widest])))}}


def _ras_of_upright(image, upright, shape_upright, at) -> list[float]:
    """An upright-picture pixel (row, column) as RAS: back through the turn to the stored pixel."""
    kji = [0.0, 0.0, 0.0]
    for n, value in ((1, at[0]), (2, at[1])):
        kji[upright.axes[n]] = shape_upright[n] - 1 - value if upright.flips[n] else value
    return [round(float(v), 2) for v in image.ijk_to_ras_points([kji[::-1]])[0]]


def _opened(mask: np.ndarray, pixel_mm: tuple[float, float], radius_mm: float) -> np.ndarray:
    """``mask`` opened by a disk of ``radius_mm`` (in mm, the pixels' own anisotropy), by two
    distance transforms on its bounding box (binary_opening with a 16 mm disk took 0.3 s a chest);
    a mask smaller than the disk is kept whole."""
    rows, cols = np.nonzero(mask)
    pad = [int(np.ceil(radius_mm / mm)) + 2 for mm in pixel_mm]
    box = (slice(max(rows.min() - pad[0], 0), rows.max() + pad[0] + 1),
           slice(max(cols.min() - pad[1], 0), cols.max() + pad[1] + 1))
    part = np.pad(mask[box], [(p, p) for p in pad])  # background all round: the box edge is not the mask's
    core = ndimage.distance_transform_edt(part, sampling=pixel_mm) > radius_mm
    if not core.any():
        return mask
    opened = ndimage.distance_transform_edt(~core, sampling=pixel_mm) <= radius_mm
    out = np.zeros_like(mask)
    out[box] = opened[pad[0]:-pad[0], pad[1]:-pad[1]] & mask[box]
    return out


def ctr_table(summary: dict) -> Table:
    columns = [ColumnSpec("measure", "string", description="what was measured on the upright labels"),
               ColumnSpec("value", "float", description="nan when not measured (report.json says why)"),
               ColumnSpec("unit", "string")]
    rows = [{"measure": "heart width", "value": summary.get("heart_width_mm"), "unit": "mm"},
            {"measure": "thorax inner width", "value": summary.get("thorax_width_mm"), "unit": "mm"},
            {"measure": "cardiothoracic ratio", "value": summary.get("ratio"), "unit": ""}]
    return Table("Chest measurements", columns, rows, "chest_measurements.tsv")


@step("cardiothoracic_ratio")
def _cardiothoracic_ratio_step(ctx: StepContext) -> None:
    """After chest_layout: measured where the labels lie as on an upright chest only."""
    upright = canonical_orientation(ctx.image, "image")
    layout = ctx.result.summaries.get("chest_layout", {})
    if layout and not layout.get("passed"):
        summary = {"ratio": None, "note": "not measured: the labels do not lie as on an upright chest"}
    else:
        i_mm, j_mm = float(ctx.image.spacing[0]), float(ctx.image.spacing[1])  # columns, rows as stored
        pixel_mm = (j_mm, i_mm) if upright.axes[2] == 2 else (i_mm, j_mm)  # (rows, columns) upright
        shown = upright.apply(ctx.result.labels.array)
        summary = cardiothoracic_ratio(shown[0], pixel_mm, float(ctx.settings.get("cardiothoracic_ratio", {}).get(
            "heart_opening_mm", HEART_OPENING_MM)))
        for name, (a, b) in summary.pop("_ends", {}).items():  # drawn on the overlay, in the report as RAS
            width = summary[f"{name}_width_mm"]
            ctx.result.segments.append({"label": f"{name} {width:.0f} mm" + (
                f" (CTR {summary['ratio']:.2f})" if name == "thorax" else ""),
                "from_ras": _ras_of_upright(ctx.image, upright, shown.shape, a),
                "to_ras": _ras_of_upright(ctx.image, upright, shown.shape, b)})
            summary[f"{name}_line_ras"] = [ctx.result.segments[-1]["from_ras"], ctx.result.segments[-1]["to_ras"]]
    if summary["ratio"] is not None:
        summary["view"] = "measured as on a PA radiograph: an AP or supine view magnifies the heart"
        if "no pixel size in the file" in str(ctx.image.meta.get("spacing_note", "")):
            summary["note"] = "widths in mm from an assumed pixel size (the ratio does not depend on it)"
    ctx.result.summaries["cardiothoracic_ratio"] = summary
    ctx.result.tables.append(ctr_table(summary))
