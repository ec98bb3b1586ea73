"""Guided foramen annotation on a real Slicer point list (vtkMRMLMarkupsFiducialNode).

``AnnotationController`` observes the node's markups events, so it reacts to whatever changes the
points: a click in a slice view (Slicer's own placement), a drag, the Delete key, the Markups
module's table. No Qt here: the panel only forwards buttons and shortcuts to it, and the tests
drive it through real events on a slicer-core node.

* A new point gets the current foramen's label (``L3 right``) already while it is a preview under
  the mouse; once placed, its description records level, side, slice and status (see
  ``foramen_labels.point_description``) and the controller moves to the next foramen without a
  point (``advance``). More points for the same foramen (one per slice it is seen on): jump back
  to it, or switch ``advance`` off.
* "Not visible" is a point with a *missing* position (Slicer's own notion, skipped by placement)
  labelled with the foramen and ``status=not visible``.
* Pre-filled model markers are *unconfirmed* points (shown unselected, i.e. in the other colour);
  accepting or moving one confirms it. Unconfirmed points are never training labels.
* Every change is saved to the markers file at once (atomic write; preview points are left out),
  so closing or crashing Slicer loses nothing; reopening the file restores everything.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from SpineKneeSegLib.annotation.foramen_labels import (
    CONFIRMED,
    NOT_VISIBLE,
    UNCONFIRMED,
    ForamenPoint,
    level_and_side,
    parse_point_description,
    point_description,
    point_slices,
    point_status,
)
from SpineKneeSegLib.annotation.worklist import (
    FORAMEN_ORDER,
    ForamenProgress,
    foramen_progress,
)
from SpineKneeSegLib.core.atomic import write_text_atomic
from SpineKneeSegLib.core.image import Image


def geometry_of(image: Image) -> Image:
    """An Image with ``image``'s geometry and no voxel memory (the controller needs only geometry)."""
    return Image(np.broadcast_to(np.uint8(0), image.array.shape), image.spacing, image.origin,
                 image.direction.copy())


@dataclass(frozen=True)
class PointInfo:
    index: int
    id: str
    label: str
    foramen: str | None
    status: str
    position_status: str
    ras: tuple[float, float, float] | None
    slice_index: int | None


class AnnotationController:
    """Foramen annotation on ``node`` (a fiducial node in a scene) over an image of ``geometry``,
    autosaved to ``markers_path``. ``on_change()`` is called after every change (the panel
    redraws). Call ``close()`` to stop observing the node."""

    def __init__(self, node, geometry: Image, markers_path, *, advance: bool = True,
                 on_change: Callable[[], None] | None = None, origin: str = "reader"):
        from SpineKneeSegLib.mrml.harness import require_slicer

        slicer = require_slicer()
        import vtk

        self.node = node
        self.geometry = geometry
        self.markers_path = Path(markers_path)
        self.advance = advance
        self.origin = origin
        self.on_change = on_change
        self.last_error = ""
        self._busy = 0
        self._interacting = False
        self._dirty: set[str] = set()
        self._previews: set[str] = set()
        self._positions: dict[str, tuple] = {}
        self._saved_signature = None
        M = slicer.vtkMRMLMarkupsNode
        handlers = {M.PointAddedEvent: self._on_added, M.PointPositionDefinedEvent: self._on_defined,
                    M.PointModifiedEvent: self._on_modified, M.PointRemovedEvent: self._on_removed,
                    M.PointStartInteractionEvent: self._on_start_interaction,
                    M.PointEndInteractionEvent: self._on_end_interaction}
        self._tags = []
        for event, handler in handlers.items():
            self._tags.append(node.AddObserver(event, _with_index(vtk, handler)))
        self._remember_positions()
        # an existing file holds what the node was loaded from; with none, nothing is written until
        # there is something to write (hovering in placement mode adds and removes preview points)
        self._saved_signature = self._signature() if self.markers_path.is_file() else ()
        self.current = self._first_unfinished() or FORAMEN_ORDER[0]
        self.review_order: list[str] = []  # pre-filled foramina, least confident first (prefill)
        self.review_confidence: dict[str, float] = {}  # their model confidence, where the file gives one

    def close(self) -> None:
        for tag in self._tags:
            self.node.RemoveObserver(tag)
        self._tags = []

    # ---- what the panel shows ----------------------------------------------------------
    def points(self) -> list[PointInfo]:
        from SpineKneeSegLib.mrml.nodes import markups_node_to_points

        out = []
        for i, p in enumerate(markups_node_to_points(self.node)):
            named = level_and_side(p["label"], p["description"])
            status = NOT_VISIBLE if p["status"] == "missing" else point_status(p["description"])
            slice_value = parse_point_description(p["description"]).get("slice")
            out.append(PointInfo(i, p["id"], p["label"], f"L{named[0]} {named[1]}" if named else None, status,
                                 p["status"], p["ras"] if p["status"] == "defined" else None,
                                 int(slice_value) if slice_value and slice_value.lstrip("-").isdigit() else None))
        return out

    def progress(self) -> dict[str, ForamenProgress]:
        return foramen_progress(self._records())[0]

    def _records(self):
        from SpineKneeSegLib.annotation.foramen_labels import MarkerRecord

        return [MarkerRecord(p.label, self.node.GetNthControlPointDescription(p.index), p.position_status,
                             p.ras, p.foramen, p.status) for p in self.points()]

    # ---- commands ----------------------------------------------------------------------
    def jump(self, foramen: str) -> None:
        if foramen not in FORAMEN_ORDER:
            raise ValueError(f"no foramen {foramen!r}; expected one of {', '.join(FORAMEN_ORDER)}")
        self.current = foramen
        self._changed()

    def next_foramen(self, step: int = 1) -> str:
        self.current = FORAMEN_ORDER[(FORAMEN_ORDER.index(self.current) + step) % len(FORAMEN_ORDER)]
        self._changed()
        return self.current

    def mark_not_visible(self, foramen: str | None = None) -> None:
        """Mark a foramen "not visible" (again: withdraw the mark). Refused while it has placed points:
        delete them first, so no reader's point is thrown away silently."""
        foramen = foramen or self.current
        level, side = level_and_side(foramen)
        existing = [p for p in self.points() if p.foramen == foramen]
        marks = [p for p in existing if p.status == NOT_VISIBLE]
        with self._editing():
            if marks:
                for p in sorted(marks, key=lambda p: -p.index):
                    self.node.RemoveNthControlPoint(p.index)
            else:
                placed = [p for p in existing if p.ras is not None]
                if placed:
                    raise ValueError(f"{foramen} has {len(placed)} point(s); delete them before marking it not visible")
                import vtk

                index = self.node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), foramen)
                self.node.SetNthControlPointPositionMissing(index)
                self.node.SetNthControlPointDescription(
                    index, point_description(level, side, status=NOT_VISIBLE, origin=self.origin))
        if not marks and self.advance and foramen == self.current:
            self.current = self._next_unfinished(foramen)
        self._after_edit()

    def prefill(self, predicted: list[ForamenPoint], source: str = "model") -> int:
        """Add a model's points as unconfirmed points for every foramen that has no confirmed point
        and no "not visible" mark (earlier unconfirmed points of those foramina are replaced), and
        order the reader's review least confident first (the model's calibrated ``confidence``;
        points without one come first, as the least known): the current foramen becomes the least
        confident one, and confirming one moves on to the next. Returns the number of points added."""
        rows = self.progress()
        wanted = [p for p in predicted if p.name in rows and not rows[p.name].confirmed and not rows[p.name].not_visible]
        names = {p.name for p in wanted}
        with self._editing():
            for p in sorted(self.points(), key=lambda p: -p.index):
                if p.foramen in names and p.status == UNCONFIRMED:
                    self.node.RemoveNthControlPoint(p.index)
            import vtk

            for p in wanted:
                index = self.node.AddControlPoint(vtk.vtkVector3d(*p.ras), p.name)
                self.node.SetNthControlPointDescription(index, point_description(
                    p.level, p.side, slice_index=self._slice_of(p.ras), status=UNCONFIRMED, origin=source,
                    confidence=model_confidence(p)))
                self.node.SetNthControlPointSelected(index, False)  # drawn in the "unselected" colour
        least_known = {}
        for p in wanted:  # a foramen seen on several slices: its least confident point
            c = model_confidence(p)
            least_known[p.name] = min(least_known.get(p.name, 2.0), -1.0 if c is None else c)
        self.review_order = sorted(least_known, key=lambda name: (least_known[name], FORAMEN_ORDER.index(name)))
        self.review_confidence = {name: c for name, c in least_known.items() if c >= 0}
        if self.review_order:
            self.current = self.review_order[0]
        self._remember_positions()
        self._after_edit()
        return len(wanted)

    def accept(self, foramen: str | None = None) -> int:
        """Confirm the unconfirmed points of one foramen (None: of all); returns how many."""
        count = 0
        with self._editing():
            for p in self.points():
                if p.status == UNCONFIRMED and (foramen is None or p.foramen == foramen):
                    self._describe(p.index, p.foramen, CONFIRMED)
                    count += 1
        if count and self.advance and foramen == self.current and self.review_order:
            self.current = self._next_to_review(foramen)
        self._after_edit()
        return count

    def _next_to_review(self, after: str) -> str:
        """The next pre-filled foramen, in the review order, that still has unconfirmed points."""
        rows = self.progress()
        waiting = [name for name in self.review_order if rows[name].unconfirmed and name != after]
        return waiting[0] if waiting else self._next_unfinished(after)

    def delete_points(self, foramen: str | None = None) -> int:
        """Delete every point (and mark) of a foramen; in Slicer a reader usually deletes one point
        in the view instead (hover + Delete key), which the controller sees as an event."""
        foramen = foramen or self.current
        doomed = sorted((p.index for p in self.points() if p.foramen == foramen), reverse=True)
        with self._editing():
            for index in doomed:
                self.node.RemoveNthControlPoint(index)
        self._after_edit()
        return len(doomed)

    def save(self, force: bool = False) -> bool:
        """Write the markers file (atomic) if anything changed since the last save; preview points
        (the one under the mouse while placing) are left out. Returns True when it wrote."""
        signature = self._signature()
        if not force and signature == self._saved_signature:
            return False
        from SpineKneeSegLib.mrml.nodes import save_node

        self.markers_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".annotation-", dir=self.markers_path.parent) as tmp:
            staged = save_node(self.node, Path(tmp) / self.markers_path.name)
            doc = json.loads(staged.read_text(encoding="utf-8"))
        for markup in doc.get("markups", []):
            markup["controlPoints"] = [cp for cp in markup.get("controlPoints") or []
                                       if cp.get("positionStatus") != "preview"]
        write_text_atomic(self.markers_path, json.dumps(doc, indent=4) + "\n")
        self._saved_signature = signature
        return True

    # ---- markups events ----------------------------------------------------------------
    def _on_added(self, index):
        if self._busy or index is None or index >= self.node.GetNumberOfControlPoints():
            return
        status = self.node.GetNthControlPointPositionStatus(index)
        if status == self.node.PositionPreview:  # show the name under the mouse already
            with self._editing():
                self.node.SetNthControlPointLabel(index, self.current)
            self._previews.add(self.node.GetNthControlPointID(index))
        elif status == self.node.PositionDefined:  # added with a position (script, paste, table)
            self._place(index)

    def _on_defined(self, index):
        if not self._busy and index is not None and index < self.node.GetNumberOfControlPoints():
            self._place(index)

    def _on_modified(self, index):
        if self._busy or index is None or index >= self.node.GetNumberOfControlPoints():
            return
        if self.node.GetNthControlPointPositionStatus(index) != self.node.PositionDefined:
            return  # a preview following the mouse, or a point not placed yet
        point_id = self.node.GetNthControlPointID(index)
        if self._interacting:
            self._dirty.add(point_id)
            return
        self._refresh(index)
        self._after_edit()

    def _on_start_interaction(self, _index=None):
        self._interacting = True

    def _on_end_interaction(self, _index=None):
        self._interacting = False
        dirty, self._dirty = self._dirty, set()
        for point_id in dirty:
            index = self.node.GetNthControlPointIndexByID(point_id)
            if index >= 0:
                self._refresh(index)
        self._after_edit()

    def _on_removed(self, _index=None):
        if self._busy:
            return
        alive = {self.node.GetNthControlPointID(i) for i in range(self.node.GetNumberOfControlPoints())}
        self._previews &= alive
        self._after_edit()

    # ---- helpers -----------------------------------------------------------------------
    def _place(self, index: int) -> None:
        """A point has just been placed: name it, describe it, clear a "not visible" mark, advance."""
        point_id = self.node.GetNthControlPointID(index)
        named = level_and_side(self.node.GetNthControlPointLabel(index))
        if point_id in self._previews or named is None:
            foramen = self.current
        else:  # a point that already names its foramen (a template point, a pasted point)
            foramen = f"L{named[0]} {named[1]}"
        self._previews.discard(point_id)
        with self._editing():
            self._describe(index, foramen, CONFIRMED)
            self.node.SetNthControlPointSelected(index, True)
            for p in sorted(self.points(), key=lambda p: -p.index):
                if p.foramen == foramen and p.status == NOT_VISIBLE:
                    self.node.RemoveNthControlPoint(p.index)
        if self.advance and foramen == self.current:
            self.current = self._next_unfinished(foramen)
        self._remember_positions()
        self._after_edit()

    def _refresh(self, index: int) -> None:
        """A placed point changed (moved, renamed): re-derive its description; a moved
        unconfirmed point is thereby confirmed."""
        point_id = self.node.GetNthControlPointID(index)
        label = self.node.GetNthControlPointLabel(index)
        description = self.node.GetNthControlPointDescription(index)
        named = level_and_side(label) or level_and_side("", description)
        ras = tuple(self.node.GetNthControlPointPositionVector(index))
        moved = point_id not in self._positions or not np.allclose(ras, self._positions[point_id], atol=1e-6)
        status = point_status(description)
        if moved and status == UNCONFIRMED:
            status = CONFIRMED
        with self._editing():
            if named is None:  # renamed to something that names no foramen: keep it, flag it
                self.node.SetNthControlPointDescription(index, f"{label}; status={status}; no foramen name")
            else:
                self._describe(index, f"L{named[0]} {named[1]}", status)
                if status == CONFIRMED:
                    self.node.SetNthControlPointSelected(index, True)
        self._positions[point_id] = ras

    def _describe(self, index: int, foramen: str, status: str) -> None:
        level, side = level_and_side(foramen)
        old = parse_point_description(self.node.GetNthControlPointDescription(index))
        ras = tuple(self.node.GetNthControlPointPositionVector(index))
        origin = old.get("origin", self.origin)
        if status == CONFIRMED and old.get("status") == UNCONFIRMED:
            origin = f"{origin} (confirmed)"
        self.node.SetNthControlPointLabel(index, foramen)
        self.node.SetNthControlPointDescription(index, point_description(
            level, side, slice_index=self._slice_of(ras), status=status, origin=origin))

    def _slice_of(self, ras) -> int:
        return int(point_slices([ForamenPoint(1, "left", tuple(ras))], self.geometry)[0])

    def _first_unfinished(self) -> str | None:
        rows = self.progress()
        return next((name for name in FORAMEN_ORDER if not rows[name].finished), None)

    def _next_unfinished(self, after: str) -> str:
        """The next foramen in reading order with no point and no mark; the plain next one when all have."""
        rows = self.progress()
        start = FORAMEN_ORDER.index(after)
        for step in range(1, len(FORAMEN_ORDER) + 1):
            name = FORAMEN_ORDER[(start + step) % len(FORAMEN_ORDER)]
            if not rows[name].confirmed and not rows[name].unconfirmed and not rows[name].not_visible:
                return name
        return FORAMEN_ORDER[(start + 1) % len(FORAMEN_ORDER)]

    def _remember_positions(self) -> None:
        n = self.node.GetNumberOfControlPoints()
        self._positions = {self.node.GetNthControlPointID(i): tuple(self.node.GetNthControlPointPositionVector(i))
                           for i in range(n) if self.node.GetNthControlPointPositionStatus(i) == self.node.PositionDefined}

    def _signature(self):
        n = self.node.GetNumberOfControlPoints()
        return tuple((self.node.GetNthControlPointLabel(i), self.node.GetNthControlPointDescription(i),
                      self.node.GetNthControlPointPositionStatus(i), bool(self.node.GetNthControlPointSelected(i)),
                      tuple(np.round(self.node.GetNthControlPointPositionVector(i), 6)))
                     for i in range(n) if self.node.GetNthControlPointPositionStatus(i) != self.node.PositionPreview)

    @contextlib.contextmanager
    def _editing(self):
        """Our own edits raise the same events as the reader's: ignore them while we make them."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def _after_edit(self) -> None:
        try:
            self.save()
            self.last_error = ""
        except Exception as exc:  # noqa: BLE001 - a failed autosave must be shown, not crash an event handler
            self.last_error = f"autosave to {self.markers_path} failed: {exc}"
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _with_index(vtk, handler):
    """A VTK observer that receives the event's point index (an int call-data) when it has one."""
    @vtk.calldata_type(vtk.VTK_INT)
    def observer(_caller, _event, index=None):
        handler(index)

    return observer


def model_confidence(point: ForamenPoint) -> float | None:
    """The model's calibrated confidence of a predicted point (its ``confidence`` field), or None."""
    value = parse_point_description(point.description).get("confidence")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
