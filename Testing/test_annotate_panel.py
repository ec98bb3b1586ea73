"""The Annotate section without Qt (``AnnotatePanel``) on REAL MRML: worklist, case navigation,
clicks in a headless slice view, pre-fill, review flags and Segment Editor corrections.

The Qt widget cannot run here; it only maps the buttons in ``BUTTONS`` and the key sequences in
``SHORTCUTS`` to ``AnnotatePanel.run`` and draws ``view()`` (checked statically below and in
test_module_static.py)."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from SpineKneeSegLib.annotation.foramen_labels import point_description
from SpineKneeSegLib.annotation.training_manifest import read_training_manifest
from SpineKneeSegLib.annotation.worklist import (
    DONE,
    FORAMEN_ORDER,
    NOT_STARTED,
    PARTIAL,
    REVIEWED,
    Worklist,
)
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image_io import read_image, write_image
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom

ROOT = Path(__file__).resolve().parents[1]
SHAPE, SPACING = (12, 128, 128), (2.0, 2.0, 4.0)


def _phantoms():
    return {"caseA": spine_phantom(seed=1, shape=SHAPE, spacing=SPACING, k_toward="left", tilt_deg=10.0),
            "caseB": spine_phantom(seed=2, shape=SHAPE, spacing=SPACING, k_toward="right")}


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    phantoms = _phantoms()
    for case_id, phantom in phantoms.items():
        write_image(phantom.image, folder / f"{case_id}.nii.gz")
    return folder, phantoms


def _middle_points(phantom) -> dict[str, dict]:
    by_name: dict[str, list] = {}
    for p in phantom.points:
        by_name.setdefault(p["label"], []).append(p)
    return {name: pts[len(pts) // 2] for name, pts in by_name.items()}


# ---- static: the widget's buttons and shortcuts are real --------------------------------------

def test_buttons_exist_in_the_ui_and_every_command_exists():
    from SpineKneeSegLib.annotation.controller import BUTTONS, SHORTCUTS, AnnotatePanel

    names = {w.get("name") for w in ET.parse(ROOT / "SpineKneeSeg/Resources/UI/SpineKneeSeg.ui").iter("widget")}
    assert set(BUTTONS) <= names, sorted(set(BUTTONS) - names)
    for command in [*BUTTONS.values(), *(c for _, c in SHORTCUTS), "open_worklist", "open_case", "jump",
                    "set_advance", "save_correction"]:
        assert callable(getattr(AnnotatePanel, f"cmd_{command}", None)), command
    keys = [k for k, _ in SHORTCUTS]
    assert len(set(keys)) == len(keys)
    source = (ROOT / "SpineKneeSeg/SpineKneeSeg.py").read_text()
    assert "SHORTCUTS" in source and "BUTTONS" in source
    for command in re.findall(r'annotate\("(\w+)"', source):
        assert callable(getattr(AnnotatePanel, f"cmd_{command}", None)), command


# ---- worklist (no Slicer needed) ---------------------------------------------------------------

def test_worklist_from_folder_and_list_file(scans, tmp_path):
    folder, _ = scans
    (folder / "not-dicom").mkdir()
    (folder / "not-dicom" / "IM0001").write_bytes(b"x")  # a folder of junk is listed, with its reason
    (folder / "old.seg.nrrd").write_bytes(b"x")  # a saved correction is not a scan
    worklist = Worklist.from_path(folder)
    assert [c.id for c in worklist.cases] == ["caseA", "caseB"]
    assert [(n.path.name, n.reason) for n in worklist.skipped] == [
        ("not-dicom", "holds no image file and no DICOM series")]
    assert worklist.annotations_dir == folder / "annotations"
    assert worklist.case("caseB").markers == folder / "annotations" / "caseB.mrk.json"
    assert worklist.statuses() == {"caseA": NOT_STARTED, "caseB": NOT_STARTED}
    assert worklist.next_case("caseA").id == "caseB" and worklist.next_case("caseA", -1) is None
    assert worklist.next_case(None, -1).id == "caseB"

    listing = tmp_path / "list.csv"
    listing.write_text("id,image\nfirst,scans/caseB.nii.gz\nsecond,scans/caseA.nii.gz\n")
    listed = Worklist.from_path(listing, tmp_path / "ann")
    assert [(c.id, c.image.name) for c in listed.cases] == [("first", "caseB.nii.gz"), ("second", "caseA.nii.gz")]
    plain = tmp_path / "list.txt"
    plain.write_text("# one path per line\nscans/caseA.nii.gz\n")
    assert [c.id for c in Worklist.from_path(plain).cases] == ["caseA"]
    plain.write_text("scans/missing.nii.gz\n")
    with pytest.raises(InputError, match="missing.nii.gz does not exist"):
        Worklist.from_path(plain)


# ---- the panel on real MRML ----------------------------------------------------------------------

@pytest.fixture
def panel(slicer_app):
    from SpineKneeSegLib.annotation.controller import AnnotatePanel
    from SpineKneeSegLib.mrml.harness import HeadlessSliceView

    view = HeadlessSliceView(slicer_app)
    redraws = []
    p = AnnotatePanel(slicer_app, on_change=lambda: redraws.append(1), reviewer="tester")
    p.view_for_clicks, p.redraws = view, redraws
    yield p
    p.close_case()
    view.close()


def _click(panel, ras):
    view = panel.view_for_clicks
    view.jump_to(ras)
    view.click(view.xy(ras))


def test_worklist_cases_clicks_review_prefill_and_reopen(panel, scans, slicer_app):
    from SpineKneeSegLib.mrml import nodes

    folder, phantoms = scans
    message = panel.run("open_worklist", str(folder))
    assert message == "2 scans: 2 not started" and panel.case.id == "caseA"
    view = panel.view_for_clicks
    # the scan is shown and placement is on for this case's point list
    assert view.logic.GetSliceCompositeNode().GetBackgroundVolumeID() == panel.volume_node.GetID()
    selection, interaction = slicer_app.app_logic.GetSelectionNode(), slicer_app.app_logic.GetInteractionNode()
    assert selection.GetActivePlaceNodeID() == panel.markups_node.GetID()
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert panel.view().current == "Next: L1 left (L1/L2)"

    truth = _middle_points(phantoms["caseA"])
    for name in FORAMEN_ORDER[:4]:
        _click(panel, truth[name]["ras"])
    shown = panel.view()
    assert shown.cases == ["caseA - partial", "caseB - not started"]
    assert shown.foramina[0] == f"L1 left: 1 point (slice {int(truth['L1 left']['ijk'][2])})"
    assert shown.current == "Next: L5 left (L5/S1)" and shown.foramen_row == 4
    panel.run("next_foramen")  # shortcut N: skip L5 left for now
    assert panel.view().current.startswith("Next: L1 right")
    panel.run("previous_foramen")
    panel.run("not_visible")  # L5 left is not visible on this scan
    for name in FORAMEN_ORDER[5:]:
        _click(panel, truth[name]["ras"])
    assert panel.worklist.status("caseA") == DONE
    assert panel.view().enabled["reviewedButton"]
    panel.run("toggle_reviewed")
    assert panel.worklist.status("caseA") == REVIEWED
    assert panel.redraws, "the panel was never asked to redraw"

    # next case: caseA's nodes leave the scene, caseB opens empty
    old_nodes = (panel.volume_node, panel.markups_node)
    panel.run("next_case")
    assert panel.case.id == "caseB" and all(n.GetScene() is None for n in old_nodes)
    assert panel.view().case_text == "Case 2/2: caseB (not started)"
    assert panel.run("prefill").startswith("no model markers for caseB")

    # pre-fill from a model's markers file (as `annotate predict` writes it)
    pred = _middle_points(phantoms["caseB"])
    node = nodes.points_to_markups_node(slicer_app.scene, [np.add(pred[n]["ras"], (0, 2, 0)) for n in FORAMEN_ORDER],
                                       list(FORAMEN_ORDER), name="prediction")
    nodes.save_node(node, panel.case.predictions)
    slicer_app.scene.RemoveNode(node)
    assert panel.run("prefill").startswith("10 unconfirmed point(s) from caseB.pred.mrk.json")
    assert panel.view().foramina[0] == "L1 left: 1 unconfirmed"
    panel.run("accept")
    assert panel.view().foramina[0].startswith("L1 left: 1 point")
    assert panel.worklist.status("caseB") == PARTIAL

    # back to caseA: everything restored from its file, still reviewed
    panel.run("previous_case")
    assert panel.case.id == "caseA" and panel.worklist.status("caseA") == REVIEWED
    assert panel.markups_node.GetNumberOfControlPoints() == 10
    assert panel.view().foramina[4] == "L5 left: not visible"
    # a change after review: the review no longer matches the file
    panel.run("set_advance", False)
    panel.run("jump", "L2 left")
    _click(panel, np.add(truth["L2 left"]["ras"], (0, 4, 0)))  # one more point
    assert panel.controller.current == "L2 left"  # advance off: stays on the foramen
    assert panel.worklist.status("caseA") == DONE


def test_prefill_orders_the_review_least_confident_first(panel, scans, slicer_app):
    """Issue 26: the model's calibrated confidence orders the reader's work."""
    from SpineKneeSegLib.mrml import nodes

    folder, phantoms = scans
    panel.run("open_worklist", str(folder))
    pred = _middle_points(phantoms["caseA"])
    confidence = {name: 0.9 for name in FORAMEN_ORDER}
    confidence.update({"L4 right": 0.12, "L2 left": 0.35, "L5 left": 0.6})
    descriptions = [f"foramen {name}; estimated from vertebral levels; confidence={confidence[name]:.2f}; "
                    "status=unconfirmed; origin=model; model=lumbar-levels 0.2.0" for name in FORAMEN_ORDER]
    node = nodes.points_to_markups_node(slicer_app.scene, [pred[n]["ras"] for n in FORAMEN_ORDER], list(FORAMEN_ORDER),
                                       descriptions, name="prediction")
    nodes.save_node(node, panel.case.predictions)
    slicer_app.scene.RemoveNode(node)
    message = panel.run("prefill")
    assert "least confident first: L4 right (0.12), L2 left (0.35), L5 left (0.60)" in message
    controller = panel.controller
    assert controller.current == "L4 right" and controller.review_order[:3] == ["L4 right", "L2 left", "L5 left"]
    panel.run("accept")  # confirming the current one moves on to the next least confident
    assert controller.current == "L2 left"
    panel.run("accept")
    assert controller.current == "L5 left"
    kept = [p for p in controller.points() if p.foramen == "L5 left"]
    assert "confidence=0.6" in controller.node.GetNthControlPointDescription(kept[0].index)


def test_refused_commands_show_a_message(panel, scans):
    assert panel.run("next_foramen") == "open a case first"
    folder, _ = scans
    panel.run("open_worklist", str(folder))
    panel.run("not_visible")
    panel.run("previous_foramen")
    message = panel.run("toggle_reviewed")
    assert "caseA is partial" in message and panel.worklist.status("caseA") == PARTIAL


def test_segment_editor_correction_becomes_a_training_label(panel, scans, slicer_app):
    import slicer.util
    from SpineKneeSegLib.core.labels import SPINE_LABELS
    from SpineKneeSegLib.mrml import nodes

    folder, phantoms = scans
    panel.run("open_worklist", str(folder))
    phantom = phantoms["caseA"]
    seg = nodes.labels_to_segmentation_node(slicer_app.scene, phantom.labels, SPINE_LABELS, "levels",
                                           reference_volume=panel.volume_node)
    # the reader's correction in the Segment Editor: L3 erased on slice 5, a stray segment added
    segmentation = seg.GetSegmentation()
    l3 = segmentation.GetSegmentIdBySegmentName("L3")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, l3, panel.volume_node)
    mask[5] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, l3, panel.volume_node)
    segmentation.AddEmptySegment("scribble", "scribble")
    expected = phantom.labels.array.copy()
    expected[5][expected[5] == 3] = 0

    message = panel.run("save_correction", seg, panel.volume_node, "lumbar-foramina")
    assert message == "saved caseA.seg.nrrd and its entry in training-manifest.csv; skipped segments: scribble"
    annotations = folder / "annotations"
    written = read_image(annotations / "caseA.seg.nrrd")
    assert written.same_geometry(phantom.image)
    ijk = written.ras_to_ijk_points(phantom.image.ijk_to_ras_points(np.argwhere(np.ones(SHAPE))[:, ::-1]))
    k, j, i = np.rint(ijk[:, ::-1]).astype(int).T
    np.testing.assert_array_equal(written.array[k, j, i].reshape(SHAPE), expected)
    [case] = read_training_manifest(annotations / "training-manifest.csv")
    assert (case.id, case.task, case.image, case.labels) == (
        "caseA", "lumbar-foramina", folder / "caseA.nii.gz", annotations / "caseA.seg.nrrd")


def test_description_format_round_trips():
    from SpineKneeSegLib.annotation.foramen_labels import (
        level_and_side,
        parse_point_description,
        point_status,
    )

    text = point_description(3, "right", slice_index=7, status="unconfirmed", origin="model; v2")
    assert text == "L3 right; level=3; side=right; slice=7; status=unconfirmed; origin=model, v2"
    assert parse_point_description(text) == {"level": "3", "side": "right", "slice": "7", "status": "unconfirmed",
                                             "origin": "model, v2"}
    assert level_and_side("", text) == (3, "right") and point_status(text) == "unconfirmed"
    assert point_status("foramen L3/L4 right; estimated") == "confirmed"  # other tools' points
    with pytest.raises(ValueError):
        point_description(3, "right", status="maybe")


def test_the_panel_opens_the_three_worklist_layouts_like_the_command_line(panel, tmp_path):
    from test_annotate_cli import _three_layouts

    scans, image = _three_layouts(tmp_path)
    message = panel.run("open_worklist", str(scans))
    assert message.startswith("3 scans: 3 not started; 3 not a case: ") and "two (holds 2 image files" in message
    assert [c.id for c in panel.worklist.cases] == ["dcm", "sub", "top"]  # the command line's cases
    for case_id in ("dcm", "sub", "top"):
        panel.run("open_case", case_id)
        assert panel.case.id == case_id and panel.volume_node is not None
        assert panel.volume_node.GetImageData().GetDimensions() == tuple(reversed(image.array.shape))
