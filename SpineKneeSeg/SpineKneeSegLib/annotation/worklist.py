"""The annotation worklist: which scans to read, where each one's markers are saved, and how far
each case has got (not started / partial / done / reviewed).

A worklist is a folder of scans or a list file (one image path per line, or a CSV with columns
``id,image``; relative paths are relative to the list file). In a folder a case is, by one
definition every command and the panel share (``find_cases``): an image file at the top level
(case id: its name without the suffix), a sub-folder holding one image file (``case01/image.nii.gz``,
the layout of most public datasets; case id: the folder's name), or a sub-folder holding one
DICOM series. Anything else is listed in ``Worklist.skipped`` with the reason it is not a case. A case's markers live in ``<annotations>/<case>.mrk.json``
(default ``annotations/`` beside the scans or the list file); the status is computed from that
file each time, so it is never out of date. The "reviewed" flag is the only stored state
(``worklist-status.json``, written atomically); it records the markers file's SHA-256, so a file
changed after review drops back to "done" until it is reviewed again.

No Slicer here: the CLI, Training/ and the panel share it.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from SpineKneeSegLib.annotation.foramen_labels import (
    CONFIRMED,
    NOT_VISIBLE,
    UNCONFIRMED,
    MarkerRecord,
    read_marker_records,
)
from SpineKneeSegLib.core.atomic import write_text_atomic
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.tasks.spine.foramina import LEVELS, SIDES, foramen_label

NOT_STARTED, PARTIAL, DONE, REVIEWED = "not started", "partial", "done", "reviewed"
CASE_STATUSES = (NOT_STARTED, PARTIAL, DONE, REVIEWED)
# Reading order: one side at a time (all five are usually seen on the same parasagittal slices).
FORAMEN_ORDER = tuple(foramen_label(level, side) for side in SIDES for level in LEVELS)
STATUS_FILE = "worklist-status.json"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")  # volume files (DICOM: series folders)
NOT_IMAGES = (".seg.nrrd", ".mrk.json")  # segmentations and markers beside a scan are not scans
MARKERS_SUFFIX = ".mrk.json"
PREDICTIONS_SUFFIX = ".pred.mrk.json"  # a model's markers for pre-filling (``annotate predict``)


@dataclass(frozen=True)
class WorklistCase:
    id: str
    image: Path  # an image file or a DICOM series folder
    markers: Path
    predictions: Path


@dataclass
class ForamenProgress:
    """What a case's markers say about one foramen."""
    name: str
    confirmed: int = 0
    unconfirmed: int = 0
    not_visible: bool = False
    slices: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return (self.confirmed > 0 or self.not_visible) and self.unconfirmed == 0


def foramen_progress(records: list[MarkerRecord]) -> tuple[dict[str, ForamenProgress], int]:
    """Per-foramen progress (in FORAMEN_ORDER) and the number of points that name no foramen."""
    rows = {name: ForamenProgress(name) for name in FORAMEN_ORDER}
    unnamed = 0
    for r in records:
        if r.position_status in ("preview", "undefined"):
            continue
        row = rows.get(r.foramen) if r.foramen else None
        if row is None:
            unnamed += 1
        elif r.status == NOT_VISIBLE:
            row.not_visible = True
        elif r.status == UNCONFIRMED:
            row.unconfirmed += 1
        elif r.status == CONFIRMED:
            row.confirmed += 1
            if r.slice_index is not None:
                row.slices.append(r.slice_index)
    for row in rows.values():
        row.slices.sort()
    return rows, unnamed


def markers_status(path: Path) -> str:
    """not started (no file, or no points), done (every foramen has a confirmed point or is marked
    not visible, nothing unconfirmed or unnamed) or partial. Unreadable files raise InputError."""
    if not Path(path).is_file():
        return NOT_STARTED
    records = [r for r in read_marker_records(path) if r.position_status not in ("preview", "undefined")]
    if not records:
        return NOT_STARTED
    rows, unnamed = foramen_progress(records)
    return DONE if not unnamed and all(r.finished for r in rows.values()) else PARTIAL


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class NotACase:
    path: Path
    reason: str


class Worklist:
    def __init__(self, cases: list[WorklistCase], annotations_dir: Path, source: Path,
                 skipped: list[NotACase] | None = None):
        ids = [c.id for c in cases]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise InputError(f"several scans share the case id(s) {', '.join(duplicates)}", source)
        if not cases:
            why = "; ".join(f"{n.path.name}: {n.reason}" for n in (skipped or [])[:5])
            raise InputError("the worklist holds no scans" + (f" ({why})" if why else ""), source)
        self.cases = list(cases)
        self.skipped = list(skipped or [])  # folder entries that are not cases, each with its reason
        self.annotations_dir = Path(annotations_dir)
        self.source = Path(source)
        self._by_id = {c.id: c for c in self.cases}

    # ---- building ----------------------------------------------------------------------
    @classmethod
    def from_path(cls, path, annotations_dir=None) -> Worklist:
        path = Path(path)
        if not path.exists():
            raise InputError("worklist folder or list file does not exist", path)
        base = path if path.is_dir() else path.parent
        annotations = Path(annotations_dir) if annotations_dir else base / "annotations"
        images, skipped = find_cases(path, annotations) if path.is_dir() else (_read_list(path), [])
        cases = [WorklistCase(case_id, image, annotations / f"{case_id}{MARKERS_SUFFIX}",
                              annotations / f"{case_id}{PREDICTIONS_SUFFIX}") for case_id, image in images]
        return cls(cases, annotations, path, skipped)

    # ---- lookup and navigation ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self.cases)

    def case(self, case_id: str) -> WorklistCase:
        try:
            return self._by_id[case_id]
        except KeyError:
            raise InputError(f"no case {case_id!r} in this worklist", self.source) from None

    def index(self, case_id: str) -> int:
        return self.cases.index(self.case(case_id))

    def next_case(self, case_id: str | None, step: int = 1, unfinished_only: bool = False) -> WorklistCase | None:
        """The case ``step`` places after ``case_id`` (None: the first), or None past either end.
        ``unfinished_only`` skips cases that are done or reviewed."""
        i = -1 if case_id is None and step > 0 else len(self.cases) if case_id is None else self.index(case_id)
        i += step
        while 0 <= i < len(self.cases):
            if not unfinished_only or self.status(self.cases[i].id) in (NOT_STARTED, PARTIAL):
                return self.cases[i]
            i += 1 if step > 0 else -1
        return None

    # ---- status ------------------------------------------------------------------------
    def status(self, case_id: str) -> str:
        case = self.case(case_id)
        status = markers_status(case.markers)
        if status == DONE:
            review = self._reviews().get(case_id)
            if review and review.get("sha256") == _sha256(case.markers):
                return REVIEWED
        return status

    def statuses(self) -> dict[str, str]:
        return {c.id: self.status(c.id) for c in self.cases}

    def counts(self) -> dict[str, int]:
        values = list(self.statuses().values())
        return {s: values.count(s) for s in CASE_STATUSES}

    def mark_reviewed(self, case_id: str, reviewer: str = "", reviewed: bool = True) -> None:
        """Record (or withdraw) a review of the case's current markers; only a done case can be
        reviewed (InputError naming what is missing otherwise)."""
        case = self.case(case_id)
        reviews = self._reviews()
        if reviewed:
            status = markers_status(case.markers)
            if status != DONE:
                raise InputError(f"case {case_id} is {status}: every foramen needs a confirmed point or a "
                                 "'not visible' mark before it can be reviewed", case.markers)
            reviews[case_id] = {"sha256": _sha256(case.markers), "reviewer": reviewer,
                                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        else:
            reviews.pop(case_id, None)
        self.annotations_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.annotations_dir / STATUS_FILE, json.dumps({"reviewed": reviews}, indent=2) + "\n")

    def _reviews(self) -> dict:
        path = self.annotations_dir / STATUS_FILE
        if not path.is_file():
            return {}
        try:
            reviews = json.loads(path.read_text(encoding="utf-8")).get("reviewed", {})
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise InputError(f"unreadable worklist status file ({exc})", path) from None
        return reviews if isinstance(reviews, dict) else {}


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES) and not name.endswith(NOT_IMAGES)


def find_cases(folder: Path, annotations: Path) -> tuple[list[tuple[str, Path]], list[NotACase]]:
    """The worklist folder's cases (id, image file or DICOM series folder) and what is not a case,
    with the reason: the one definition of a case (module docstring)."""
    found, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.resolve() == annotations.resolve():
            continue
        if p.is_file():
            if _volume_file(p):
                found.append((_case_id(p), p))
            elif not p.name.lower().endswith(NOT_IMAGES):
                skipped.append(NotACase(p, "not a volume file (NIfTI, NRRD or MetaImage); a DICOM series "
                                           "goes in a sub-folder of its own"))
        elif p.is_dir():
            image, reason = _case_in_folder(p)
            if image is None:
                skipped.append(NotACase(p, reason))
            else:
                found.append((p.name, image))
    return found, skipped


def _case_in_folder(folder: Path) -> tuple[Path | None, str]:
    """(the case's image, "") for a sub-folder holding one volume file or one DICOM series, else
    (None, why not)."""
    from SpineKneeSegLib.core.image_io import list_dicom_series

    volumes = sorted(p for p in folder.iterdir() if _volume_file(p) and not p.name.startswith("."))
    if len(volumes) == 1:
        return volumes[0], ""
    if len(volumes) > 1:
        return None, (f"holds {len(volumes)} image files ({', '.join(p.name for p in volumes[:3])}"
                      f"{', ...' if len(volumes) > 3 else ''}); a case folder holds one")
    try:
        series = list_dicom_series(folder)
    except InputError as exc:
        return None, f"unreadable DICOM: {exc}"
    if len(series) == 1:
        return folder, ""
    if len(series) > 1:
        return None, (f"holds {len(series)} DICOM series "
                      f"({', '.join(str(s['description'] or s['uid']) for s in series[:3])}); put one series per folder")
    return None, "holds no image file and no DICOM series"


def _read_list(path: Path) -> list[tuple[str, Path]]:
    """One image path per line (``#`` comments), or a CSV with columns ``id`` and ``image``."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a list saved by Excel or Notepad may begin with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the worklist file ({exc})", path) from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if lines and [c.strip() for c in lines[0].split(",")][:2] == ["id", "image"]:
        rows = [(r.get("id", "").strip(), r.get("image", "").strip()) for r in csv.DictReader(lines)]
    else:
        rows = [("", line) for line in lines]
    found = []
    for n, (case_id, image) in enumerate(rows, start=1):
        if not image:
            raise InputError(f"entry {n} has no image path", path)
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        if not image_path.exists():
            raise InputError(f"entry {n}: scan {image_path} does not exist", path)
        found.append((case_id or _case_id(image_path), image_path))
    return found


# ---- closing the loop: model predictions in, training manifest out ---------------------------
FORAMEN_TASK = "lumbar-foramina"


def add_to_training_manifest(worklist: Worklist, manifest, reviewed_only: bool = False) -> list[str]:
    """Add every done (or, with ``reviewed_only``, reviewed) case to a training manifest as image +
    markers (Training/ rasterises the markers itself); returns the case ids added."""
    from SpineKneeSegLib.annotation.training_manifest import (
        TrainingCase,
        add_training_case,
    )

    wanted = (REVIEWED,) if reviewed_only else (DONE, REVIEWED)
    added = []
    for case in worklist.cases:
        if worklist.status(case.id) in wanted:
            add_training_case(manifest, TrainingCase(case.id, FORAMEN_TASK, case.image, markers=case.markers))
            added.append(case.id)
    return added


def model_name(report: dict) -> str:
    """``<file> <version>`` of the weights a run used, for the points it made."""
    weights = report.get("weights", {})
    stem, version = Path(weights.get("path", "unknown")).stem, weights.get("registry_version")
    if version and stem.endswith(f"-{version}"):
        stem = stem[: -len(version) - 1]
    return f"{stem} {version or '(unregistered weights)'}"


def mark_model_points(path: Path, model: str) -> None:
    """Every point of a model's markups file says in the file itself that a model made it and no
    reader has confirmed it (``status=unconfirmed; origin=model; model=...``), so no tool that
    reads it takes the guesses for labels."""
    import json

    doc = json.loads(path.read_text(encoding="utf-8"))
    tag = f"status=unconfirmed; origin=model; model={model.replace(';', ',')}"
    for markup in doc.get("markups", []):
        for cp in markup.get("controlPoints") or []:
            cp["description"] = "; ".join(filter(None, [str(cp.get("description", "")).strip(), tag]))
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def predict_worklist(worklist: Worklist, options=None, overwrite: bool = False, progress=None) -> list[str]:
    """Run the lumbar-foramina task on every case and keep its markers as ``<case>.pred.mrk.json``
    beside the annotations (the panel's "Pre-fill" loads them as unconfirmed points). Runs the
    same ``run_case`` as ``spinekneeseg run``; cases that already have predictions are skipped
    unless ``overwrite``. Returns the case ids predicted."""
    import os
    import shutil
    import tempfile

    from SpineKneeSegLib.core.progress import Progress
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.tasks import get_task

    card = get_task(FORAMEN_TASK)
    done = []
    worklist.annotations_dir.mkdir(parents=True, exist_ok=True)
    for case in worklist.cases:
        if case.predictions.exists() and not overwrite:
            continue
        with tempfile.TemporaryDirectory(prefix=".predict-", dir=worklist.annotations_dir) as tmp:
            report = run_case(card, [str(case.image)], Path(tmp) / "out", options or RunOptions(),
                              progress or Progress("none"))
            staged = Path(tmp) / f"{case.id}{PREDICTIONS_SUFFIX}"
            shutil.copyfile(Path(tmp) / "out" / "foramina.mrk.json", staged)
            mark_model_points(staged, model_name(report))
            os.replace(staged, case.predictions)
        done.append(case.id)
    return done
