"""Foramen point files (Slicer ``.mrk.json``) and the seed's training targets made from them.

Shared by the annotation mode's export, the RSNA importer and Training/: a foramen point is
(level 1..5, side, RAS position); its target is an in-slice disc (default radius 7 mm, seed 004)
on the sagittal slice the point lies on, in the image's exact geometry (oblique and left-handed
direction matrices included). Reads the JSON directly so Training/ needs no Slicer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.tasks.spine.foramina import LEVELS, SIDES, lateral_axis

LABEL_PATTERN = re.compile(r"^\s*L([1-5])\s+(left|right)\b", re.IGNORECASE)
SIDE_VALUES = {"left": 1, "right": 2}  # the side map written beside the level map

# Point status, kept in the point description (a .mrk.json keeps no per-point attributes):
CONFIRMED = "confirmed"      # placed or accepted by a reader
UNCONFIRMED = "unconfirmed"  # pre-filled from a model, not yet accepted or moved
NOT_VISIBLE = "not visible"  # a reader's "foramen not visible" mark (a point with a missing position)
POINT_STATUSES = (CONFIRMED, UNCONFIRMED, NOT_VISIBLE)
_FIELD = re.compile(r"^\s*([a-z_]+)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class ForamenPoint:
    level: int
    side: str
    ras: tuple[float, float, float]
    label: str = ""
    description: str = ""
    defined: bool = True
    status: str = CONFIRMED

    @property
    def name(self) -> str:
        return f"L{self.level} {self.side}"


def point_description(level: int, side: str, *, slice_index: int | None = None, status: str = CONFIRMED,
                      **fields) -> str:
    """The parseable description the annotation mode writes for every point, e.g.
    ``L3 right; level=3; side=right; slice=7; status=confirmed; origin=reader`` (it starts with the
    foramen's name so that tools that read only the text still find it)."""
    if status not in POINT_STATUSES:
        raise ValueError(f"unknown point status {status!r}")
    parts = [f"L{level} {side}", f"level={level}", f"side={side}"]
    if slice_index is not None:
        parts.append(f"slice={int(slice_index)}")
    parts.append(f"status={status}")
    parts += [f"{k}={str(v).replace(';', ',')}" for k, v in fields.items() if v is not None and v != ""]
    return "; ".join(parts)


def parse_point_description(description: str) -> dict[str, str]:
    """``key=value`` fields of a description written by ``point_description`` (other text is ignored)."""
    fields = {}
    for part in (description or "").split(";"):
        m = _FIELD.match(part)
        if m:
            fields[m.group(1)] = m.group(2)
    return fields


def point_status(description: str) -> str:
    """A point's status from its description; points written by other tools count as confirmed."""
    status = parse_point_description(description).get("status", CONFIRMED)
    return status if status in POINT_STATUSES else CONFIRMED


def level_and_side(label: str, description: str = "", attributes: dict | None = None) -> tuple[int, str] | None:
    """Level and side from point attributes (``level``, ``side``), else the label ``L3 right``,
    else a description that starts with it; None when neither says."""
    attributes = attributes or {}
    level, side = attributes.get("level"), attributes.get("side")
    if level is not None and side is not None:
        level = int(str(level).lstrip("Ll"))
        side = str(side).lower()
        if level in LEVELS and side in SIDES:
            return level, side
    for text in (label, description.replace("foramen ", "", 1)):
        m = LABEL_PATTERN.match(text or "")
        if m:
            return int(m.group(1)), m.group(2).lower()
    return None


def _markups(path: Path, allow_empty: bool) -> list[tuple[dict, np.ndarray]]:
    """Each markup of a Slicer .mrk.json with the sign flip that takes its positions to RAS."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("markers file does not exist", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a readable markups JSON file ({exc})", path) from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list) or not (markups or allow_empty):
        raise InputError("no 'markups' list: not a Slicer .mrk.json file", path)
    out = []
    for markup in markups:
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise InputError(f"unknown coordinateSystem {system!r}", path)
        out.append((markup, np.array([-1.0, -1.0, 1.0]) if system == "LPS" else np.ones(3)))
    return out


def read_foramen_markers(path: str | Path, *, include_undefined: bool = False,
                         include_unconfirmed: bool = False) -> list[ForamenPoint]:
    """Points of a Slicer markups file, in RAS whatever its ``coordinateSystem``. A point whose
    level/side cannot be read is an error naming it (a silent skip would lose a label).
    Points a model pre-filled that no reader has confirmed (description ``status=unconfirmed``)
    are not labels and are skipped unless ``include_unconfirmed``; in a model's own file
    (``*.pred.mrk.json``) a point without a status is unconfirmed too (files written before
    predictions were marked)."""
    path = Path(path)
    model_file = path.name.endswith(".pred.mrk.json")
    points = []
    for markup, flip in _markups(path, allow_empty=False):
        for n, cp in enumerate(markup.get("controlPoints") or []):
            defined = cp.get("positionStatus", "defined") == "defined"
            if not defined and not include_undefined:
                continue
            label, description = str(cp.get("label", "")), str(cp.get("description", ""))
            status = point_status(description)
            if model_file and "status" not in parse_point_description(description):
                status = UNCONFIRMED
            if status == UNCONFIRMED and not include_unconfirmed:
                continue
            named = level_and_side(label, description, cp.get("attributes"))
            if named is None:
                raise InputError(f"control point {n + 1} ({label!r}) names no foramen: "
                                 "expected a label like 'L3 right'", path)
            try:
                position = np.asarray(cp["position"], dtype=float) * flip
            except (KeyError, TypeError, ValueError):
                raise InputError(f"control point {n + 1} ({label!r}) has no valid position", path) from None
            if position.shape != (3,) or not np.all(np.isfinite(position)):
                raise InputError(f"control point {n + 1} ({label!r}) has no valid position", path)
            points.append(ForamenPoint(named[0], named[1], tuple(float(v) for v in position), label,
                                       description, defined, status))
    return points


def point_slices(points: list[ForamenPoint], image: Image) -> np.ndarray:
    """Index along the image's sagittal (left-right) axis of the slice each point lies on."""
    if not points:
        return np.zeros(0, dtype=int)
    ijk = image.ras_to_ijk_points(np.array([p.ras for p in points]))
    return np.rint(ijk[:, 2 - lateral_axis(image)]).astype(int)


def rasterise_foramen_targets(points: list[ForamenPoint], image: Image, radius_mm: float = 7.0
                              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(levels, sides, notes): uint8 maps on ``image``'s grid, levels 1..5 = L1..L5 and sides 1 left /
    2 right, an in-slice disc of ``radius_mm`` around each point on the slice it lies on. Distances
    are physical and measured within the slice plane, so oblique and anisotropic grids are exact.
    Points outside the volume are skipped and reported in ``notes``."""
    if radius_mm <= 0:
        raise ValueError("radius_mm must be positive")
    shape = image.array.shape
    levels = np.zeros(shape, np.uint8)
    sides = np.zeros(shape, np.uint8)
    notes = []
    lat = lateral_axis(image)
    m = image.ijk_to_ras[:3, :3]
    normal = m[:, 2 - lat] / np.linalg.norm(m[:, 2 - lat])
    slices = point_slices(points, image)
    plane_axes = [a for a in range(3) if a != lat]
    grids = np.meshgrid(*[np.arange(shape[a], dtype=float) for a in plane_axes], indexing="ij")
    for point, s in zip(points, slices):
        if not 0 <= s < shape[lat]:
            notes.append(f"{point.name} at RAS {tuple(round(v, 1) for v in point.ras)} lies outside the image; skipped")
            continue
        kji = [None, None, None]
        kji[lat] = np.full(grids[0].shape, float(s))
        kji[plane_axes[0]], kji[plane_axes[1]] = grids
        ras = np.einsum("rc,c...->r...", m, np.stack(kji[::-1])) + image.ijk_to_ras[:3, 3, None, None]
        d = ras - np.asarray(point.ras)[:, None, None]
        along = np.einsum("r,r...->...", normal, d)
        disc = (d ** 2).sum(0) - along ** 2 <= radius_mm ** 2
        if not disc.any():
            notes.append(f"{point.name}: its disc holds no voxel of the image; skipped")
            continue
        index = [slice(None)] * 3
        index[lat] = int(s)
        levels[tuple(index)][disc] = point.level
        sides[tuple(index)][disc] = SIDE_VALUES[point.side]
    return levels, sides, notes


@dataclass(frozen=True)
class MarkerRecord:
    """One control point of a markers file as the annotation tools see it: every point, named or
    not, placed or not (``ras`` is None unless its position is defined)."""
    label: str
    description: str
    position_status: str  # Slicer's: defined, preview, undefined, missing
    ras: tuple[float, float, float] | None
    foramen: str | None  # "L3 right", or None when neither label nor description names one
    status: str  # CONFIRMED, UNCONFIRMED or NOT_VISIBLE

    @property
    def slice_index(self) -> int | None:
        value = parse_point_description(self.description).get("slice")
        return int(value) if value not in (None, "") and value.lstrip("-").isdigit() else None


def read_marker_records(path: str | Path) -> list[MarkerRecord]:
    """Every control point of a Slicer markups file (RAS), leniently: unnamed points come back with
    ``foramen=None`` instead of failing, so a half-finished annotation can still be shown."""
    path = Path(path)
    records = []
    for markup, flip in _markups(path, allow_empty=True):
        for cp in markup.get("controlPoints") or []:
            label, description = str(cp.get("label", "")), str(cp.get("description", ""))
            position_status = str(cp.get("positionStatus", "defined"))
            ras = None
            if position_status == "defined":
                try:
                    xyz = np.asarray(cp["position"], dtype=float) * flip
                except (KeyError, TypeError, ValueError):
                    raise InputError(f"control point {label!r} has no valid position", path) from None
                ras = tuple(float(v) for v in xyz)
            named = level_and_side(label, description, cp.get("attributes"))
            status = NOT_VISIBLE if position_status == "missing" else point_status(description)
            records.append(MarkerRecord(label, description, position_status, ras,
                                        f"L{named[0]} {named[1]}" if named else None, status))
    return records
