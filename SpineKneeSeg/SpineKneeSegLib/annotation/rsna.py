"""Import RSNA-2024 lumbar-challenge style point annotations as our foramen marker files.

``train_label_coordinates.csv`` has one row per point: ``study_id, series_id, instance_number,
condition, level, x, y``. Rows whose condition is ``Left/Right Neural Foraminal Narrowing`` become
foramen points (other conditions are counted and skipped): level ``L4/L5`` -> ``L4``, ``L5/S1`` ->
``L5``; side from the condition. ``x, y`` are the pixel column and row on the DICOM instance whose
InstanceNumber is ``instance_number``; that instance's own ImagePositionPatient,
ImageOrientationPatient and PixelSpacing place the point in patient space, so instance numbers
that are not in slice order (or files stored in any order) land on the right slice.

Series are looked up as ``DIR/<study_id>/<series_id>/`` (the challenge's layout) or
``DIR/<series_id>/``. Output: ``<study_id>_<series_id>.mrk.json`` per series, written together
(nothing is written when any row is bad).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from SpineKneeSegLib.annotation.foramen_labels import CONFIRMED, point_description
from SpineKneeSegLib.core.atomic import atomic_directory
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image import LPS_TO_RAS

REQUIRED_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
_CONDITION = re.compile(r"^\s*(left|right)\s+neural\s+foraminal\s+narrowing\s*$", re.IGNORECASE)
_LEVEL = re.compile(r"^\s*L([1-5])\s*/\s*(L([2-5])|S1)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class RsnaPoint:
    study: str
    series: str
    instance: int
    level: int
    side: str
    x: float
    y: float
    line: int


@dataclass(frozen=True)
class InstanceGeometry:
    path: Path
    rows: int
    columns: int
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    row_cosine: np.ndarray  # direction of increasing column index (x)
    column_cosine: np.ndarray  # direction of increasing row index (y)
    spacing: tuple[float, float]  # (between rows, between columns), as DICOM's PixelSpacing

    def pixel_to_ras(self, x: float, y: float) -> tuple[float, float, float]:
        lps = self.position + x * self.spacing[1] * self.row_cosine + y * self.spacing[0] * self.column_cosine
        return tuple(float(v) for v in (LPS_TO_RAS[:3, :3] @ lps))


def rsna_level(text: str) -> int:
    """``L4/L5`` -> 4, ``L5/S1`` -> 5 (the foramen of the upper vertebra's motion segment)."""
    m = _LEVEL.match(text or "")
    if not m or (m.group(3) is not None and int(m.group(3)) != int(m.group(1)) + 1) or (
            m.group(2).upper() == "S1" and m.group(1) != "5"):
        raise ValueError(f"not a lumbar motion segment: {text!r}")
    return int(m.group(1))


def read_rsna_points(csv_path) -> tuple[list[RsnaPoint], dict[str, int]]:
    """Foramen points of the CSV and a count of skipped rows per other condition."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}",
                                 csv_path)
            rows = list(enumerate(reader, start=2))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the CSV ({exc})", csv_path) from None
    points, skipped = [], {}
    for line, row in rows:
        m = _CONDITION.match(row["condition"] or "")
        if not m:
            skipped[row["condition"]] = skipped.get(row["condition"], 0) + 1
            continue
        try:
            level = rsna_level(row["level"])
            point = RsnaPoint(row["study_id"].strip(), row["series_id"].strip(), int(float(row["instance_number"])),
                              level, m.group(1).lower(), float(row["x"]), float(row["y"]), line)
        except (TypeError, ValueError) as exc:
            raise InputError(f"line {line}: {exc}", csv_path) from None
        if not (point.study and point.series) or not np.isfinite([point.x, point.y]).all():
            raise InputError(f"line {line}: study_id, series_id, x and y must be given", csv_path)
        points.append(point)
    return points, skipped


def find_series_folder(series_dir, study: str, series: str) -> Path:
    root = Path(series_dir)
    for candidate in (root / study / series, root / series):
        if candidate.is_dir():
            return candidate
    raise InputError(f"no folder for study {study}, series {series} (looked for {root / study / series} "
                     f"and {root / series})", root)


def instance_geometry(folder: Path) -> dict[int, InstanceGeometry]:
    """InstanceNumber -> the instance's geometry, from the headers of every DICOM file in ``folder``."""
    found: dict[int, InstanceGeometry] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:  # not DICOM: not an instance
            continue
        if "InstanceNumber" not in ds or "ImagePositionPatient" not in ds:
            continue
        try:
            number = int(ds.InstanceNumber)
            cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
            geometry = InstanceGeometry(path, int(ds.Rows), int(ds.Columns),
                                        np.array([float(v) for v in ds.ImagePositionPatient]),
                                        cosines[:3], cosines[3:], tuple(float(v) for v in ds.PixelSpacing))
        except (AttributeError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"DICOM header lacks the geometry of instance {ds.get('InstanceNumber')} ({exc})",
                             path) from None
        if number in found:
            raise InputError(f"InstanceNumber {number} appears twice ({found[number].path.name}, {path.name})", folder)
        found[number] = geometry
    if not found:
        raise InputError("no DICOM instances with InstanceNumber and ImagePositionPatient here", folder)
    return found


def import_rsna(csv_path, series_dir, output_dir, manifest=None) -> dict:
    """Write one marker file per series; returns a summary (files, points, skipped conditions).
    ``manifest``: also add each series (its DICOM folder + the markers) as a training case."""
    from SpineKneeSegLib.mrml import nodes
    from SpineKneeSegLib.mrml.harness import get_app

    points, skipped = read_rsna_points(csv_path)
    if not points:
        raise InputError("no neural foraminal narrowing rows", csv_path)
    by_series: dict[tuple[str, str], list[RsnaPoint]] = {}
    for p in points:
        by_series.setdefault((p.study, p.series), []).append(p)
    placed = {}
    folders = {}
    for (study, series), group in by_series.items():
        folder = folders[(study, series)] = find_series_folder(series_dir, study, series)
        geometry = instance_geometry(folder)
        placed[(study, series)] = [(p, _place(p, geometry, folder, Path(csv_path))) for p in group]
    app = get_app()
    written = []
    with atomic_directory(output_dir) as stage:
        for (study, series), group in placed.items():
            name = f"{study}_{series}"
            node = nodes.points_to_markups_node(
                app.scene, [ras for _, ras in group], [f"L{p.level} {p.side}" for p, _ in group],
                descriptions=[point_description(p.level, p.side, status=CONFIRMED, origin="rsna",
                                                instance=p.instance, pixel=f"{p.x:g} {p.y:g}")
                              for p, _ in group], name=name)
            try:
                nodes.save_node(node, stage / f"{name}.mrk.json")
            finally:
                app.scene.RemoveNode(node)
            written.append(f"{name}.mrk.json")
    if manifest:
        from SpineKneeSegLib.annotation.training_manifest import (
            TrainingCase,
            add_training_case,
        )

        for (study, series), name in zip(placed, written):
            add_training_case(manifest, TrainingCase(f"{study}_{series}", "lumbar-foramina", folders[(study, series)],
                                                     markers=Path(output_dir) / name))
    return {"files": written, "points": len(points), "series": len(placed), "skipped_conditions": skipped}


def _place(p: RsnaPoint, geometry: dict[int, InstanceGeometry], folder: Path, csv_path: Path):
    g = geometry.get(p.instance)
    if g is None:
        raise InputError(f"line {p.line}: instance {p.instance} is not in series folder {folder} "
                         f"(it has instances {min(geometry)}..{max(geometry)})", csv_path)
    if not (-0.5 <= p.x <= g.columns - 0.5 and -0.5 <= p.y <= g.rows - 0.5):
        raise InputError(f"line {p.line}: pixel ({p.x:g}, {p.y:g}) lies outside instance {p.instance} "
                         f"({g.columns} columns x {g.rows} rows)", csv_path)
    return g.pixel_to_ras(p.x, p.y)
