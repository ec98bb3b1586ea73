"""Knee-bones specifics (seed 000): the femorotibial joint centre and the plausibility check.

Labels: 1 femur, 2 tibia, 3 fibula, 4 patella. Positions are compared in patient RAS millimetres
taken from the direction matrix, so the checks hold for any axis order, flip or obliquity.
"""
from __future__ import annotations

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.engine.hooks import window_finder
from SpineKneeSegLib.engine.steps import StepContext, step

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py)

FEMUR, TIBIA, FIBULA, PATELLA = 1, 2, 3, 4
BONES = {FEMUR: "femur", TIBIA: "tibia", FIBULA: "fibula", PATELLA: "patella"}
REQUIRED = (FEMUR, TIBIA, FIBULA)  # the output; the patella only when present

# Volumes inside a knee MRI's field of view (ml). A knee scan covers ~12-20 cm, so the femoral and
# tibial shafts and the fibula are cut by the field of view: their in-view volume depends on the
# coverage, and only lower bounds make sense for femur and tibia (the distal femur's condyles
# alone are > 40 ml in adults, the tibial plateau > 30 ml; 5 ml allows a child or a small field
# of view and still catches a bone that is only specks). The fibula's head and neck are 2-10 ml
# and the whole adult fibula ~60-80 ml, of which a knee field of view holds far less than 60 ml.
# The patella is never cut (adult 10-25 ml; 5 ml allows small adults and adolescents).
VOLUME_RANGES_ML = {FEMUR: (5.0, None), TIBIA: (5.0, None), FIBULA: (0.5, 60.0), PATELLA: (5.0, 60.0)}
MIN_COMPONENT_FRACTION = 0.01  # components below 1 % of a bone's volume are specks, not a split
MIN_DICE_RAW_VS_FINAL = 0.8  # issue 6: the network's raw output must already hold each bone
# The fibula's widest cross-section, measured per 5 mm axial band along patient L-R and A-P: 27-29 mm
# (head) in both real label maps here (SPL atlas, pymskt DESS); adult fibular heads are ~25-35 mm.
# Wider means the fibula has taken in neighbouring tissue (e.g. the popliteus behind the tibia).
MAX_FIBULA_CROSS_SECTION_MM = 40.0
CROSS_SECTION_BAND_MM = 5.0
MIN_SIDE_OFFSET_MM = 5.0  # the fibula must lie clearly to one side of the tibia to name the knee's side
JOINT_BAND_MM = 10.0  # "near the joint": bone within this distance of the lowest femur / highest tibia point


def _voxels(labels: np.ndarray, value: int, boxes=None) -> np.ndarray:
    """(N, 3) k, j, i indices of ``labels == value``, looked up inside the label's bounding box
    (``boxes``: ndimage.find_objects(labels), computed once by the caller)."""
    boxes = ndimage.find_objects(labels, max_label=value) if boxes is None else boxes
    box = boxes[value - 1] if value <= len(boxes) else None
    if box is None:
        return np.zeros((0, 3), np.int64)
    mask = labels[box] == value  # flat indices, then unravelled: half argwhere's time on a femur
    return np.stack(np.unravel_index(np.flatnonzero(mask), mask.shape), axis=1) + np.array([b.start for b in box])


def _to_ras(image: Image, kji: np.ndarray, rows=slice(None)) -> np.ndarray:
    """RAS mm (or only the ``rows`` of R, A, S) of (N, 3) k, j, i indices."""
    m = image.ijk_to_ras[:3][rows]
    return kji[:, ::-1].astype(np.float32) @ m[..., :3].T.astype(np.float32) + m[..., 3].astype(np.float32)


def joint_centre_from_labels(labels: np.ndarray, image: Image, boxes=None, voxels=None) -> tuple[list[float] | None, str]:
    """Femorotibial joint centre in RAS mm from a label map on ``image``'s grid: superior-inferior
    midway between the lowest femur point and the highest tibia point (1st / 99th percentile of
    S, so stray voxels do not move it), right-left and anterior-posterior the mean of femur and
    tibia voxels within JOINT_BAND_MM of those points. (None, reason) without both bones.
    ``voxels``: value -> _voxels(labels, value), when the caller has them."""
    boxes = ndimage.find_objects(labels, max_label=TIBIA) if boxes is None and voxels is None else boxes
    voxels = voxels or (lambda value: _voxels(labels, value, boxes))
    femur, tibia = voxels(FEMUR), voxels(TIBIA)
    missing = [name for name, pts in (("femur", femur), ("tibia", tibia)) if len(pts) == 0]
    if missing:
        return None, f"no {' and no '.join(missing)} voxels"
    femur_s, tibia_s = _to_ras(image, femur, 2), _to_ras(image, tibia, 2)  # S only: the big arrays
    femur_low = float(np.percentile(femur_s, 1))
    tibia_high = float(np.percentile(tibia_s, 99))
    near = np.concatenate([femur[femur_s <= femur_low + JOINT_BAND_MM], tibia[tibia_s >= tibia_high - JOINT_BAND_MM]])
    r, a = _to_ras(image, near, slice(0, 2)).mean(axis=0)
    note = "femur above tibia" if femur_low > tibia_high else "femur and tibia overlap in S (tibia not below femur)"
    return [float(r), float(a), (femur_low + tibia_high) / 2.0], note


def joint_centre_from_bone(mask: np.ndarray, image: Image) -> tuple[list[float] | None, str]:
    """The joint centre from a merged "any bone" mask (seed 000's merged variant), which has no
    femur/tibia to tell apart: S at the bone's narrowest level in its middle 60 % (the joint space;
    bone_split's rule), R and A the mean of bone within JOINT_BAND_MM of that level."""
    from SpineKneeSegLib.tasks.knee.bone_split import _joint_level

    kji = np.argwhere(mask)
    if len(kji) == 0:
        return None, "no bone voxels"
    s = _to_ras(image, kji, 2)
    level = _joint_level(s)
    r, a = _to_ras(image, kji[np.abs(s - level) <= JOINT_BAND_MM], slice(0, 2)).mean(axis=0)
    return [float(r), float(a), level], "narrowest level of the bone mask"


@window_finder("joint")
def find_joint(coarse: np.ndarray, canon: Image, variant: str) -> tuple[list[float] | None, str, str]:
    """Seed 000's window: the femorotibial joint centre from a coarse pass (merged "any bone"
    networks have no femur / tibia yet: from the bone mask)."""
    if variant == "merged":
        return (*joint_centre_from_bone(coarse > 0, canon), "bone mask")
    return (*joint_centre_from_labels(coarse, canon), "femur and tibia")


def component_counts(labels: np.ndarray, min_fraction: float = MIN_COMPONENT_FRACTION,
                     components: dict | None = None) -> dict[int, int]:
    """26-connected components of each bone holding >= ``min_fraction`` of that bone's voxels
    (``components``: postprocessing.label_components(labels), when already computed)."""
    from SpineKneeSegLib.engine.postprocessing import label_components

    components = label_components(labels) if components is None else components
    counts = {}
    for value in BONES:
        if value not in components:
            counts[value] = 0
            continue
        sizes = components[value][2][1:]
        counts[value] = int((sizes >= min_fraction * int(sizes.sum())).sum())
    return counts


def dicom_laterality(image: Image) -> str | None:
    """'right' | 'left' from DICOM (Image)Laterality (0020,0062 / 0020,0060) when the reader saw it."""
    value = str(image.meta.get("laterality") or "").strip().upper()
    return {"R": "right", "L": "left"}.get(value)


def _clean_up_confusion(raw: np.ndarray, raw_components: dict, components: dict | None) -> np.ndarray | None:
    """The 6 x 6 raw x final counts without reading a voxel, when ``components`` are
    postprocessing.kept_components(raw_components) (final = raw's largest piece of each label:
    each label keeps its largest component and loses the rest to background); else None."""
    if components is None or set(components) != set(raw_components) or any(
            c[1] is not None or int(c[2].sum()) != int(raw_components[v][2].max()) for v, c in components.items()):
        return None
    confusion = np.zeros((6, 6), np.int64)
    for v, (_, _, sizes) in raw_components.items():
        kept, total = int(sizes.max()), int(sizes.sum())
        confusion[min(v, 5), min(v, 5)] += kept
        confusion[min(v, 5), 0] += total - kept
    confusion[0, 0] = raw.size - int(confusion.sum())
    return confusion


def _confusion(raw: np.ndarray, labels: np.ndarray, boxes, raw_components: dict | None) -> np.ndarray:
    """6 x 6 raw x final label counts (values above 5 counted as 5), counted inside the box that
    holds every label of both maps (``boxes``: find_objects of ``labels``; ``raw_components``:
    label_components of ``raw``) and background outside it: a knee's bones fill a fraction of a
    512 x 512 x 80 volume."""
    raw_boxes = ([c[0] for c in raw_components.values()] if raw_components is not None
                 else ndimage.find_objects(raw))
    found = [b for b in (*boxes, *raw_boxes) if b is not None]
    confusion = np.zeros(36, np.int64)
    if found:
        box = tuple(slice(min(b[d].start for b in found), max(b[d].stop for b in found)) for d in range(raw.ndim))
        import torch  # its uint8 clamp/bincount take half numpy's time (no int64 copy of the volume)

        pair = torch.from_numpy(np.ascontiguousarray(raw[box], np.uint8)).clamp(max=5).mul_(6)
        pair.add_(torch.from_numpy(np.ascontiguousarray(labels[box], np.uint8)).clamp(max=5))
        confusion += torch.bincount(pair.view(-1), minlength=36).numpy()
    confusion[0] += raw.size - int(confusion.sum())
    return confusion.reshape(6, 6)


def knee_plausibility(labels: np.ndarray, image: Image, raw_labels: np.ndarray | None = None,
                      raw_components: dict | None = None, components: dict | None = None) -> dict:
    """Anatomical plausibility of a knee-bones label map (the final, post-processed one); the
    raw-vs-final Dice and the reported raw piece counts use ``raw_labels`` (the network's own
    output; the final labels when None); ``raw_components`` / ``components``: label_components of
    the raw / final labels when already known. Returns {"passed", "checks": {name: {"passed", ...}}, "knee_side",
    "dicom_laterality", "side_agrees", "joint_centre_ras", "volumes_ml", "failed"}; a check is
    None-passed (skipped) only for an absent patella."""
    raw = labels if raw_labels is None else raw_labels
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    # a box per value present (the confusion box misses none): the final labels' own, or from their
    # components (for the largest-component clean-up's output, its input's boxes, which hold them)
    boxes = (ndimage.find_objects(labels) if components is None else
             [components[v][0] if v in components else None for v in range(1, max(components, default=0) + 1)])
    found: dict[int, np.ndarray] = {}

    def voxels(value: int) -> np.ndarray:  # each bone's indices looked up once (centroid, fibula, joint)
        if value not in found:
            found[value] = _voxels(labels, value, boxes)
        return found[value]

    confusion = (_clean_up_confusion(raw, raw_components, components) if raw_components is not None else None)
    confusion = _confusion(raw, labels, boxes, raw_components) if confusion is None else confusion
    counts = confusion.sum(axis=0)
    volumes = {v: float(counts[v]) * voxel_ml for v in BONES}
    present = {v for v in BONES if counts[v] > 0}
    # the voxel-to-RAS map is affine: the centroid of the mapped voxels is the mapped mean index
    centroid = {v: _to_ras(image, voxels(v).mean(axis=0, keepdims=True))[0] for v in present}
    checks: dict[str, dict] = {}

    # every required bone present, the patella optional
    missing = [BONES[v] for v in REQUIRED if v not in present]
    checks["bones_present"] = {"passed": not missing, "missing": missing,
                               "patella_present": PATELLA in present}

    # one connected component per bone in what the user gets (issue 6); the raw output is held to
    # raw-vs-final Dice below (the rule), and its pieces are reported, not failed on: stray
    # pieces are what the clean-up is for
    n_final = component_counts(labels, components=components)
    n_raw = n_final if raw_labels is None else component_counts(raw, components=raw_components)
    split = [f"{BONES[v]} ({n_final[v]})" for v in BONES if n_final[v] > 1]
    checks["one_component_per_bone"] = {
        "passed": not split, "components": {BONES[v]: n_final[v] for v in BONES}, "on": "final labels",
        "raw_components": {BONES[v]: n_raw[v] for v in BONES}, "min_fraction": MIN_COMPONENT_FRACTION,
        **({"split": split} if split else {})}

    # volumes in anatomical ranges (see VOLUME_RANGES_ML)
    out_of_range = []
    for v, (lo, hi) in VOLUME_RANGES_ML.items():
        if v == PATELLA and v not in present:
            continue
        if volumes[v] < lo or (hi is not None and volumes[v] > hi):
            out_of_range.append(f"{BONES[v]} {volumes[v]:.1f} ml not in [{lo}, {hi if hi is not None else 'inf'}]")
    checks["volumes_in_range"] = {"passed": not out_of_range,
                                  "ranges_ml": {BONES[v]: list(r) for v, r in VOLUME_RANGES_ML.items()},
                                  **({"out_of_range": out_of_range} if out_of_range else {})}

    def relation(name, a, b, axis, sign, words):
        """centroid of a is on the ``sign`` side of b's along RAS ``axis``."""
        if a not in present or b not in present:
            if a == PATELLA and PATELLA not in present:
                checks[name] = {"passed": None, "note": "patella not present"}
            else:
                checks[name] = {"passed": False, "note": f"{BONES[a] if a not in present else BONES[b]} missing"}
            return
        d = float(centroid[a][axis] - centroid[b][axis]) * sign
        checks[name] = {"passed": d > 0, f"{words}_mm": round(d, 2)}

    relation("femur_superior_to_tibia", FEMUR, TIBIA, 2, 1.0, "femur_above_tibia")
    relation("patella_anterior_to_femur", PATELLA, FEMUR, 1, 1.0, "patella_anterior_of_femur")
    relation("fibula_posterior_to_tibia", FIBULA, TIBIA, 1, -1.0, "fibula_posterior_of_tibia")

    # the fibula is a slender bone: no axial cross-section wider than a fibular head
    if FIBULA in present:
        widest = fibula_cross_section_mm(_to_ras(image, voxels(FIBULA)))
        checks["fibula_cross_section"] = {
            "passed": max(widest) <= MAX_FIBULA_CROSS_SECTION_MM, "max_mm": MAX_FIBULA_CROSS_SECTION_MM,
            "widest_left_right_mm": round(widest[0], 1), "widest_anterior_posterior_mm": round(widest[1], 1)}
    else:
        checks["fibula_cross_section"] = {"passed": False, "note": "fibula missing"}

    # lateral: the fibula lies lateral to the tibia, so its side names the knee; compared with
    # DICOM laterality when the file has one
    side, offset = None, None
    if FIBULA in present and TIBIA in present:
        offset = float(centroid[FIBULA][0] - centroid[TIBIA][0])  # RAS +x = patient right
        if abs(offset) >= MIN_SIDE_OFFSET_MM:
            side = "right" if offset > 0 else "left"
    declared = dicom_laterality(image)
    agrees = None if side is None or declared is None else side == declared
    checks["fibula_lateral"] = {
        "passed": side is not None and agrees is not False,
        "fibula_right_of_tibia_mm": None if offset is None else round(offset, 2),
        "knee_side": side, "dicom_laterality": declared, "side_agrees": agrees,
        "note": ("fibula missing or not clearly to one side of the tibia" if side is None else
                 "no DICOM laterality to compare with" if declared is None else
                 "agrees with DICOM laterality" if agrees else "CONTRADICTS DICOM laterality")}

    # the network's raw output already holds each bone (issue 6: raw vs final Dice >= 0.8)
    dices = {}
    for v in BONES:
        total = int(confusion[v, :].sum() + confusion[:, v].sum())
        dices[BONES[v]] = None if total == 0 else 2.0 * float(confusion[v, v]) / total
    low = [f"{k} {d:.3f}" for k, d in dices.items() if d is not None and d < MIN_DICE_RAW_VS_FINAL]
    checks["raw_vs_final_dice"] = {"passed": not low, "dice": {k: None if d is None else round(d, 4)
                                                              for k, d in dices.items()},
                                   "min": MIN_DICE_RAW_VS_FINAL, **({"low": low} if low else {})}

    centre, note = joint_centre_from_labels(labels, image, voxels=voxels)
    failed = [name for name, c in checks.items() if c["passed"] is False]
    return {"passed": not failed, "failed": failed, "checks": checks,
            "knee_side": side, "dicom_laterality": declared, "side_agrees": agrees,
            "joint_centre_ras": None if centre is None else [round(v, 2) for v in centre],
            "joint_centre_note": note,
            "volumes_ml": {BONES[v]: round(volumes[v], 3) for v in BONES}}


def fibula_cross_section_mm(ras: np.ndarray, band_mm: float = CROSS_SECTION_BAND_MM) -> tuple[float, float]:
    """Widest extent along R-L and along A-P of a bone's voxels (N, 3 RAS mm) within any axial band
    of ``band_mm`` (bands with fewer than 1 % of the voxels are skipped: partial tips)."""
    bands = np.floor((ras[:, 2] - ras[:, 2].min()) / band_mm).astype(np.int64)
    widest = [0.0, 0.0]
    counts = np.bincount(bands)
    for b in np.flatnonzero(counts >= max(1, 0.01 * len(ras))):
        sel = ras[bands == b]
        widest = [max(widest[0], float(np.ptp(sel[:, 0]))), max(widest[1], float(np.ptp(sel[:, 1])))]
    return widest[0], widest[1]


def plausibility_warnings(summary: dict) -> list[str]:
    """One warning per failed check, in words."""
    out = []
    for name in summary["failed"]:
        check = {k: v for k, v in summary["checks"][name].items() if k != "passed"}
        detail = "; ".join(f"{k}={v}" for k, v in check.items() if k not in ("ranges_ml", "on", "min_fraction",
                                                                               "raw_components"))
        out.append(f"knee plausibility check failed: {name.replace('_', ' ')} ({detail})")
    return out


# ---- steps (registered by name; see steps.py) ----------------------------------------------------

@step("fibula_model")
def _fibula_model_step(ctx: StepContext) -> None:
    """Seed 000's per-bone model: its fibula replaces the main one's (the specialist wins where the
    two disagree)."""
    if "fibula" not in ctx.maps:
        return
    raw = np.where(ctx.raw == FIBULA, 0, ctx.raw).astype(np.uint8)
    raw[ctx.maps["fibula"] > 0] = FIBULA
    ctx.raw = raw
    ctx.result.labels = ctx.image.with_array(raw)
    ctx.result.summaries["fibula_model"] = "per-bone fibula model (--aux-weights fibula)"


@step("knee_plausibility")
def _knee_plausibility_step(ctx: StepContext) -> None:
    labels = ctx.result.labels.array
    made = ctx.made_components
    summary = knee_plausibility(labels, ctx.image, raw_labels=ctx.raw, raw_components=ctx.raw_components,
                                components=made[1] if made is not None and made[0] is labels else None)
    ctx.result.summaries["knee_plausibility"] = summary
    ctx.result.warnings.extend(plausibility_warnings(summary))
