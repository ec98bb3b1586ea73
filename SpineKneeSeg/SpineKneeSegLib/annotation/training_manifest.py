"""Training manifests: the list of labelled cases Training/ reads, fed by the annotation mode
(foramen markers) and by corrections saved from the Segment Editor (label maps).

CSV with a header: ``id``, ``task``, ``image`` and one of ``markers`` (a foramen ``.mrk.json``)
or ``labels`` (a label map on the image's grid, e.g. ``<case>.seg.nrrd``). Relative paths are
relative to the manifest's folder. Appending rewrites the file atomically.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from SpineKneeSegLib.core.atomic import write_text_atomic
from SpineKneeSegLib.core.errors import InputError

COLUMNS = ("id", "task", "image", "markers", "labels")


@dataclass(frozen=True)
class TrainingCase:
    id: str
    task: str
    image: Path
    markers: Path | None = None
    labels: Path | None = None


def read_training_manifest(path: str | Path) -> list[TrainingCase]:
    path = Path(path)
    if not path.is_file():
        raise InputError("training manifest does not exist", path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM: Excel's "CSV UTF-8"
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the training manifest ({exc})", path) from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "task", "image") if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"training manifest lacks column(s) {', '.join(missing)}", path)
        cases, seen = [], set()
        for line, row in enumerate(reader, start=2):
            case_id = (row.get("id") or "").strip()
            if not case_id:
                raise InputError(f"line {line}: empty id", path)
            if (case_id, row["task"]) in seen:
                raise InputError(f"line {line}: duplicate id {case_id!r} for task {row['task']!r}", path)
            seen.add((case_id, row["task"]))
            resolved = {c: _resolve(path, row.get(c)) for c in ("image", "markers", "labels")}
            if resolved["image"] is None:
                raise InputError(f"line {line}: case {case_id!r} has no image", path)
            if (resolved["markers"] is None) == (resolved["labels"] is None):
                raise InputError(f"line {line}: case {case_id!r} needs exactly one of 'markers' or 'labels'", path)
            cases.append(TrainingCase(case_id, row["task"].strip(), **resolved))
    return cases


def _resolve(manifest: Path, value: str | None) -> Path | None:
    value = (value or "").strip()
    if not value:
        return None
    return Path(value) if Path(value).is_absolute() else manifest.parent / value


def add_training_case(manifest: str | Path, case: TrainingCase) -> None:
    """Add or replace (same id and task) one case; paths are stored relative to the manifest when
    they lie under its folder."""
    manifest = Path(manifest)
    cases = read_training_manifest(manifest) if manifest.exists() else []
    cases = [c for c in cases if (c.id, c.task) != (case.id, case.task)] + [case]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for c in cases:
        writer.writerow([c.id, c.task, _relative(manifest, c.image), _relative(manifest, c.markers),
                         _relative(manifest, c.labels)])
    write_text_atomic(manifest, out.getvalue())


def _relative(manifest: Path, path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).resolve().relative_to(manifest.parent.resolve()))
    except ValueError:
        return str(Path(path).resolve())
