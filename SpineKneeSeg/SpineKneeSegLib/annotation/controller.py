"""The Annotate section of the panel, without Qt: worklist navigation, opening a case (scan +
saved markers), guided placement through ``AnnotationController``, pre-fill, review flag and
Segment Editor corrections. The widget maps buttons and shortcuts to ``run(command)`` and draws
``view()``; everything here runs on real MRML (headless slicer-core in the tests, Slicer's own
scene in Slicer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from SpineKneeSegLib.annotation.worklist import (
    DONE,
    FORAMEN_ORDER,
    REVIEWED,
    Worklist,
    WorklistCase,
)
from SpineKneeSegLib.core.errors import SpineKneeSegError
from SpineKneeSegLib.tasks.spine.foramina import motion_segment

# .ui button name -> command (the widget connects each button's clicked() to run(command))
BUTTONS = {
    "previousCaseButton": "previous_case", "nextCaseButton": "next_case",
    "previousForamenButton": "previous_foramen", "nextForamenButton": "next_foramen",
    "placeButton": "place", "notVisibleButton": "not_visible", "acceptButton": "accept",
    "acceptAllButton": "accept_all", "prefillButton": "prefill", "deleteForamenButton": "delete_foramen",
    "reviewedButton": "toggle_reviewed",
}
# (key sequence, command): application shortcuts the widget installs while the module is shown
SHORTCUTS = (
    ("N", "next_foramen"), ("Shift+N", "previous_foramen"), ("A", "accept"), ("Shift+V", "not_visible"),
    ("Ctrl+Shift+N", "next_case"), ("Ctrl+Shift+P", "previous_case"),
)


@dataclass
class AnnotateView:
    """What the widget shows; ``enabled`` is keyed by .ui widget name."""
    cases: list[str] = field(default_factory=list)
    case_row: int = -1
    case_text: str = "Open a worklist: a folder of scans or a list file."
    foramina: list[str] = field(default_factory=list)
    foramen_row: int = -1
    current: str = ""
    message: str = ""
    advance: bool = True
    enabled: dict[str, bool] = field(default_factory=dict)


class AnnotatePanel:
    def __init__(self, context, on_change: Callable[[], None] | None = None, reviewer: str = ""):
        self.context = context  # mrml_harness.SlicerContext: scene + application logic
        self.on_change = on_change
        self.reviewer = reviewer
        self.worklist: Worklist | None = None
        self.case: WorklistCase | None = None
        self.volume_node = None
        self.markups_node = None
        self.controller = None
        self.advance = True
        self.message = ""
        self._statuses: dict[str, str] = {}  # read once per worklist; the open case is re-read on each redraw

    # ---- the one entry point for buttons and shortcuts -----------------------------------
    def run(self, command: str, *args) -> str:
        """Run a command; a refused command sets ``message`` (shown in the panel) instead of raising."""
        handler = getattr(self, f"cmd_{command}", None)
        if handler is None:
            raise ValueError(f"unknown annotate command {command!r}")
        try:
            self.message = handler(*args) or ""
        except (SpineKneeSegError, ValueError, OSError) as exc:
            self.message = str(exc)
        self._changed()
        return self.message

    # ---- worklist ------------------------------------------------------------------------
    def cmd_open_worklist(self, path, annotations_dir=None) -> str:
        if not path:
            raise ValueError("choose a folder of scans or a worklist file first")
        self.close_case()
        self.worklist = Worklist.from_path(path, annotations_dir)
        self._statuses = self.worklist.statuses()
        first = self.worklist.next_case(None, unfinished_only=True) or self.worklist.cases[0]
        self.cmd_open_case(first.id)
        counts = self.worklist.counts()
        message = f"{len(self.worklist)} scans: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        if self.worklist.skipped:  # the same definition of a case as the command line
            message += (f"; {len(self.worklist.skipped)} not a case: "
                        + "; ".join(f"{n.path.name} ({n.reason})" for n in self.worklist.skipped[:3]))
        return message

    def cmd_open_case(self, which) -> str:
        """Open a case by id or row: load its scan and its saved markers, enter placement."""
        from SpineKneeSegLib.annotation.session import AnnotationController, geometry_of
        from SpineKneeSegLib.core.image_io import read_image
        from SpineKneeSegLib.mrml import nodes

        worklist = self._need_worklist()
        case = worklist.cases[which] if isinstance(which, int) else worklist.case(which)
        image = read_image(case.image)  # the project's reader: DICOM folders, any orientation
        self.close_case()
        scene = self.context.scene
        self.volume_node = nodes.image_to_volume_node(scene, image, case.id)
        if case.markers.is_file():
            self.markups_node = nodes.load_markups(scene, case.markers, case.id)
        else:
            self.markups_node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{case.id} foramina")
            self.markups_node.CreateDefaultDisplayNodes()
        self.case = case
        self.controller = AnnotationController(self.markups_node, geometry_of(image), case.markers,
                                               advance=self.advance, on_change=self._changed)
        self._show_volume()
        self.cmd_place()
        return f"opened {case.id}" + (" (pre-fill available)" if case.predictions.is_file() else "")

    def cmd_next_case(self, step: int = 1) -> str:
        worklist = self._need_worklist()
        target = worklist.next_case(self.case.id if self.case else None, step)
        if target is None:
            return "no further case" if step > 0 else "no earlier case"
        return self.cmd_open_case(target.id)

    def cmd_previous_case(self) -> str:
        return self.cmd_next_case(-1)

    def cmd_toggle_reviewed(self) -> str:
        worklist, case = self._need_worklist(), self._need_case()
        reviewed = worklist.status(case.id) != REVIEWED
        worklist.mark_reviewed(case.id, self.reviewer, reviewed)
        return f"{case.id} {'marked reviewed' if reviewed else 'review withdrawn'}"

    def close_case(self) -> None:
        """Stop observing and remove the case's nodes (its markers are already saved)."""
        if self.controller is not None:
            self.controller.close()
        if self.case is not None and self.worklist is not None:
            try:
                self._statuses[self.case.id] = self.worklist.status(self.case.id)
            except SpineKneeSegError as exc:
                self._statuses[self.case.id] = f"unreadable ({exc})"
        scene = self.context.scene
        for node in (self.markups_node, self.volume_node):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
        self.controller = self.markups_node = self.volume_node = self.case = None

    # ---- foramina ------------------------------------------------------------------------
    def cmd_place(self) -> str:
        """Slicer's placement mode for this case's point list (persistent: click after click)."""
        controller = self._need_controller()
        logic = self.context.app_logic
        selection, interaction = logic.GetSelectionNode(), logic.GetInteractionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selection.SetActivePlaceNodeID(controller.node.GetID())
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(interaction.Place)
        return ""

    def cmd_next_foramen(self) -> str:
        self._need_controller().next_foramen(1)
        return self.cmd_place()

    def cmd_previous_foramen(self) -> str:
        self._need_controller().next_foramen(-1)
        return self.cmd_place()

    def cmd_jump(self, which) -> str:
        self._need_controller().jump(FORAMEN_ORDER[which] if isinstance(which, int) else which)
        return self.cmd_place()  # choosing a foramen means placing its points next

    def cmd_set_advance(self, advance: bool) -> str:
        self.advance = bool(advance)
        if self.controller is not None:
            self.controller.advance = self.advance
        return ""

    def cmd_not_visible(self) -> str:
        controller = self._need_controller()
        name = controller.current
        controller.mark_not_visible(name)
        return f"{name}: {'not visible' if controller.progress()[name].not_visible else 'mark withdrawn'}"

    def cmd_accept(self) -> str:
        controller = self._need_controller()
        return f"{controller.accept(controller.current)} point(s) of {controller.current} accepted"

    def cmd_accept_all(self) -> str:
        return f"{self._need_controller().accept(None)} point(s) accepted"

    def cmd_delete_foramen(self) -> str:
        controller = self._need_controller()
        return f"{controller.delete_points(controller.current)} point(s) of {controller.current} deleted"

    def cmd_prefill(self) -> str:
        """Load the model's markers as unconfirmed points: the case's ``.pred.mrk.json``, else the
        newest other point list in the scene that names foramina (e.g. imported after Apply)."""
        from SpineKneeSegLib.annotation.foramen_labels import read_foramen_markers

        controller, case = self._need_controller(), self._need_case()
        if case.predictions.is_file():
            points, source = read_foramen_markers(case.predictions, include_unconfirmed=True), case.predictions.name
        else:
            points, source = self._scene_predictions()
        if not points:
            raise ValueError(f"no model markers for {case.id}: run `spinekneeseg annotate predict` on the "
                             "worklist, or Apply the lumbar-foramina task to this scan")
        added = controller.prefill(points, source="model")
        known = controller.review_confidence
        order = ", ".join(f"{name} ({known[name]:.2f})" if name in known else name for name in controller.review_order[:3])
        return (f"{added} unconfirmed point(s) from {source}: accept (A) or move them"
                + (f"; least confident first: {order}" if order else ""))

    # ---- corrections ---------------------------------------------------------------------
    def cmd_save_correction(self, segmentation_node, volume_node, task: str) -> str:
        from SpineKneeSegLib.annotation.corrections import save_correction

        worklist = self._need_worklist()
        if segmentation_node is None or volume_node is None:
            raise ValueError("select the corrected segmentation and its scan")
        is_case = self.case is not None and volume_node is self.volume_node
        case_id = self.case.id if is_case else volume_node.GetName()
        saved = save_correction(segmentation_node, volume_node, case_id, task, worklist.annotations_dir,
                                image_path=self.case.image if is_case else None)
        note = f"; skipped segments: {', '.join(saved.skipped)}" if saved.skipped else ""
        return f"saved {saved.labels.name} and its entry in {saved.manifest.name}{note}"

    # ---- what to draw --------------------------------------------------------------------
    def view(self) -> AnnotateView:
        view = AnnotateView(message=self.message, advance=self.advance)
        if self.worklist is not None:
            statuses = self._statuses
            if self.case is not None:
                statuses[self.case.id] = self.worklist.status(self.case.id)
            view.cases = [f"{c.id} - {statuses[c.id]}" for c in self.worklist.cases]
            if self.case is not None:
                view.case_row = self.worklist.index(self.case.id)
                view.case_text = (f"Case {view.case_row + 1}/{len(self.worklist)}: {self.case.id} "
                                  f"({statuses[self.case.id]})")
        controller = self.controller
        if controller is not None:
            rows = controller.progress()
            view.foramina = [_foramen_text(rows[name]) for name in FORAMEN_ORDER]
            view.foramen_row = FORAMEN_ORDER.index(controller.current)
            level = int(controller.current[1])
            view.current = f"Next: {controller.current} ({motion_segment(level)})"
            if controller.last_error:
                view.message = controller.last_error
        has_case, has_list = controller is not None, self.worklist is not None
        view.enabled = {name: has_case for name in BUTTONS}
        view.enabled.update(previousCaseButton=has_list, nextCaseButton=has_list, saveCorrectionButton=has_list)
        if has_case:
            view.enabled["reviewedButton"] = statuses[self.case.id] in (DONE, REVIEWED)
        return view

    # ---- helpers -------------------------------------------------------------------------
    def _show_volume(self) -> None:
        """Show the scan in every slice view, each turned to the scan's own planes; a one-up
        sagittal (yellow) layout where Slicer's layout node exists."""
        scene, logic = self.context.scene, self.context.app_logic
        selection = logic.GetSelectionNode()
        selection.SetActiveVolumeID(self.volume_node.GetID())
        if logic.GetSliceLogics() is not None:
            logic.PropagateVolumeSelection(1)  # background of every view, fitted
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").RotateToVolumePlane(self.volume_node)
        layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layout is not None:
            layout.SetViewArrangement(layout.SlicerLayoutOneUpYellowSliceView)

    def _scene_predictions(self):
        from SpineKneeSegLib.annotation.foramen_labels import (
            ForamenPoint,
            level_and_side,
        )
        from SpineKneeSegLib.mrml import nodes

        scene = self.context.scene
        markups = [scene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode")
                   for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode"))]
        for node in reversed([n for n in markups if n is not self.markups_node]):
            points = []
            for p in nodes.markups_node_to_points(node):
                named = level_and_side(p["label"])
                if named and p["status"] == "defined":
                    points.append(ForamenPoint(named[0], named[1], tuple(p["ras"]), p["label"], p["description"]))
            if points:
                return points, f"point list {node.GetName()!r}"
        return [], ""

    def _need_worklist(self) -> Worklist:
        if self.worklist is None:
            raise ValueError("open a worklist first")
        return self.worklist

    def _need_case(self) -> WorklistCase:
        if self.case is None:
            raise ValueError("open a case first")
        return self.case

    def _need_controller(self):
        if self.controller is None:
            raise ValueError("open a case first")
        return self.controller

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _foramen_text(row) -> str:
    if row.not_visible:
        return f"{row.name}: not visible"
    parts = []
    if row.confirmed:
        slices = ", ".join(str(s) for s in row.slices)
        parts.append(f"{row.confirmed} point{'s' if row.confirmed > 1 else ''}" + (f" (slice {slices})" if slices else ""))
    if row.unconfirmed:
        parts.append(f"{row.unconfirmed} unconfirmed")
    return f"{row.name}: {', '.join(parts) if parts else '-'}"
