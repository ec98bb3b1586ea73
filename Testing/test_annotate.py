"""Annotation mode on REAL Slicer MRML (slicer-core): simulated clicks, drags and key presses in a
slice view go through Slicer's own vtkMRMLSliceViewInteractorStyle and markups widgets; the
controller only sees the markups events they raise (point added / defined / modified / removed),
never direct calls. Files are real .mrk.json / .seg.nrrd written by Slicer's storage nodes.

The Qt panel itself cannot run here: ``AnnotatePanel`` (everything the panel does, without Qt) is
driven instead, and test_module_static.py checks that the widget's buttons exist in the .ui and map
to its commands.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from SpineKneeSegLib.mrml.harness import require_slicer

try:
    require_slicer()
except ImportError as exc:  # only a missing slicer-core skips; any other import error fails
    pytest.skip(f"real MRML unavailable: {exc}", allow_module_level=True)

from SpineKneeSegLib.annotation.foramen_labels import (
    CONFIRMED,
    NOT_VISIBLE,
    UNCONFIRMED,
    ForamenPoint,
    parse_point_description,
    read_foramen_markers,
    read_marker_records,
)
from SpineKneeSegLib.annotation.session import AnnotationController, geometry_of
from SpineKneeSegLib.annotation.worklist import FORAMEN_ORDER
from SpineKneeSegLib.mrml import nodes
from SpineKneeSegLib.mrml.harness import HeadlessSliceView, create_headless_slicer
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom

pytestmark = pytest.mark.mrml
SHAPE, SPACING = (12, 128, 128), (2.0, 2.0, 4.0)


@pytest.fixture(params=[("left", 12.0), ("right", -20.0)], ids=["left-handed-tilted", "right-handed-tilted"])
def phantom(request):
    k_toward, tilt = request.param
    return spine_phantom(seed=1, shape=SHAPE, spacing=SPACING, k_toward=k_toward, tilt_deg=tilt)


@pytest.fixture
def view(slicer_app):
    v = HeadlessSliceView(slicer_app)
    yield v
    v.close()


def _truth(phantom) -> dict[str, list[dict]]:
    """Phantom foramen points by name, each with its slice index k."""
    out: dict[str, list[dict]] = {}
    for p in phantom.points:
        out.setdefault(p["label"], []).append(p)
    return out


def _middle(points: list[dict]) -> dict:
    return points[len(points) // 2]


def _place_mode(app, node) -> None:
    selection, interaction = app.app_logic.GetSelectionNode(), app.app_logic.GetInteractionNode()
    selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
    selection.SetActivePlaceNodeID(node.GetID())
    interaction.SetPlaceModePersistence(1)
    interaction.SetCurrentInteractionMode(interaction.Place)


def _view_mode(app) -> None:
    interaction = app.app_logic.GetInteractionNode()
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)


def _setup(slicer_app, view, phantom, path, **kw):
    volume = nodes.image_to_volume_node(slicer_app.scene, phantom.image, "scan")
    node = slicer_app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "case")
    node.CreateDefaultDisplayNodes()
    controller = AnnotationController(node, geometry_of(phantom.image), path, **kw)
    view.show(volume)
    _place_mode(slicer_app, node)
    return volume, node, controller


def _click_at(view, ras):
    view.jump_to(ras)
    view.click(view.xy(ras))


def _pixel_mm(view) -> float:
    """Distance in mm between neighbouring view pixels (clicks land on whole pixels)."""
    a, b = np.array(view.ras((100, 100))), np.array(view.ras((101, 100)))
    return float(np.linalg.norm(a - b))


def _file_points(path):
    return {(r.label, r.status, r.slice_index) for r in read_marker_records(path)}


# ---- guided placement by clicks ---------------------------------------------------------------

def test_clicks_place_named_points_on_their_slices_and_autosave(slicer_app, view, phantom, tmp_path):
    path = tmp_path / "case.mrk.json"
    _, node, controller = _setup(slicer_app, view, phantom, path)
    truth = _truth(phantom)
    tolerance = _pixel_mm(view) * 0.75  # half a pixel in x and y, rounded up
    assert controller.current == "L1 left"
    for n, name in enumerate(FORAMEN_ORDER):
        target = _middle(truth[name])
        _click_at(view, target["ras"])
        assert node.GetNumberOfControlPoints() == n + 1
        assert node.GetNthControlPointLabel(n) == name
        fields = parse_point_description(node.GetNthControlPointDescription(n))
        assert fields["level"] == name[1] and fields["side"] == name.split()[1]
        assert int(fields["slice"]) == int(target["ijk"][2]) and fields["status"] == CONFIRMED
        ras = np.array(node.GetNthControlPointPositionVector(n))
        assert np.linalg.norm(ras - target["ras"]) <= tolerance
        # autosaved at once: the file holds every point placed so far
        saved = read_foramen_markers(path)
        assert len(saved) == n + 1 and saved[-1].name == name
        np.testing.assert_allclose(saved[-1].ras, ras, atol=1e-4)
        # guided: the next foramen is the next one in reading order
        assert controller.current == FORAMEN_ORDER[(n + 1) % len(FORAMEN_ORDER)]
    rows = controller.progress()
    assert all(rows[name].finished for name in FORAMEN_ORDER)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a staging file was left behind"


def test_more_points_per_foramen_move_and_delete_in_the_view(slicer_app, view, phantom, tmp_path):
    path = tmp_path / "case.mrk.json"
    _, node, controller = _setup(slicer_app, view, phantom, path)
    l3 = _truth(phantom)["L3 left"]
    assert len(l3) >= 2
    controller.jump("L3 left")
    _click_at(view, l3[0]["ras"])
    assert controller.current == "L4 left"  # advanced to the next foramen still without a point
    controller.jump("L3 left")
    _click_at(view, l3[1]["ras"])
    assert [node.GetNthControlPointLabel(i) for i in range(2)] == ["L3 left", "L3 left"]
    assert controller.progress()["L3 left"].slices == sorted(int(p["ijk"][2]) for p in l3[:2])

    # drag the second point 10 pixels along x in the view: Slicer's widget moves it
    _view_mode(slicer_app)
    start = view.xy(l3[1]["ras"])
    view.drag(start, (start[0] + 10, start[1]))
    moved = np.array(node.GetNthControlPointPositionVector(1))
    np.testing.assert_allclose(moved, view.ras((start[0] + 10, start[1])), atol=1e-6)
    saved = read_foramen_markers(path)
    np.testing.assert_allclose(saved[1].ras, moved, atol=1e-4)
    assert int(parse_point_description(node.GetNthControlPointDescription(1))["slice"]) == int(l3[1]["ijk"][2])

    # hover the first point and press Delete: Slicer removes it, the file follows
    view.jump_to(l3[0]["ras"])
    view.key("Delete", view.xy(l3[0]["ras"]))
    assert node.GetNumberOfControlPoints() == 1
    assert len(read_foramen_markers(path)) == 1
    assert controller.progress()["L3 left"].slices == [int(l3[1]["ijk"][2])]


def test_not_visible_prefill_accept_move_and_identical_reload(slicer_app, view, phantom, tmp_path):
    path = tmp_path / "case.mrk.json"
    _, node, controller = _setup(slicer_app, view, phantom, path)
    truth = _truth(phantom)
    controller.mark_not_visible("L1 left")
    assert controller.current == "L2 left"
    # a model's markers: the middle truth point of each foramen, 3 mm off along RAS y
    predicted = [ForamenPoint(int(n[1]), n.split()[1], tuple(np.add(_middle(truth[n])["ras"], (0, 3, 0))))
                 for n in FORAMEN_ORDER]
    assert controller.prefill(predicted) == 9  # not for L1 left: the reader said "not visible"
    rows = controller.progress()
    assert rows["L1 left"].not_visible and rows["L2 left"].unconfirmed == 1 and not rows["L2 left"].finished
    assert read_foramen_markers(path) == []  # unconfirmed points are no labels
    assert len(read_foramen_markers(path, include_unconfirmed=True)) == 9

    assert controller.accept("L2 left") == 1
    # drag the L3 left prediction onto the truth: moving confirms it
    _view_mode(slicer_app)
    l3 = _middle(truth["L3 left"])
    view.jump_to(l3["ras"])
    view.drag(view.xy(np.add(l3["ras"], (0, 3, 0))), view.xy(l3["ras"]))
    rows = controller.progress()
    assert rows["L2 left"].confirmed == 1 and rows["L3 left"].confirmed == 1 and rows["L4 left"].unconfirmed == 1
    l3_saved = [p for p in read_foramen_markers(path) if p.name == "L3 left"]
    assert len(l3_saved) == 1 and np.linalg.norm(np.subtract(l3_saved[0].ras, l3["ras"])) <= _pixel_mm(view)
    assert "model (confirmed)" in l3_saved[0].description

    # "not visible" cannot hide placed points; withdrawing the mark removes it
    with pytest.raises(ValueError, match="delete them"):
        controller.mark_not_visible("L2 left")
    controller.mark_not_visible("L1 left")
    assert not controller.progress()["L1 left"].not_visible
    controller.mark_not_visible("L1 left")
    controller.close()

    # reopen in a fresh application (as after closing or crashing Slicer): everything is back
    before = _snapshot(node)
    with create_headless_slicer(activate=False) as other:
        reloaded = nodes.load_markups(other.scene, path)
        assert _snapshot(reloaded) == before
        again = AnnotationController(reloaded, geometry_of(phantom.image), path)
        assert {n: vars(r) for n, r in again.progress().items()} == {n: vars(r) for n, r in rows_after(before).items()}
        assert again.current == "L4 left"  # the first foramen not finished
        assert again.save() is False  # nothing changed: no rewrite
        again.close()
    statuses = {r.label: r.status for r in read_marker_records(path)}
    assert statuses["L1 left"] == NOT_VISIBLE and statuses["L4 left"] == UNCONFIRMED and statuses["L2 left"] == CONFIRMED


def rows_after(snapshot):
    """Per-foramen progress computed from a snapshot, independently of the controller."""
    from SpineKneeSegLib.annotation.foramen_labels import (
        MarkerRecord,
        level_and_side,
        point_status,
    )
    from SpineKneeSegLib.annotation.worklist import foramen_progress

    records = []
    for label, description, status, _selected, ras in snapshot:
        named = level_and_side(label, description)
        records.append(MarkerRecord(label, description, status, ras if status == "defined" else None,
                                    f"L{named[0]} {named[1]}", NOT_VISIBLE if status == "missing" else point_status(description)))
    return foramen_progress(records)[0]


def _snapshot(node):
    """Label, description, position status, selected flag and RAS (mm, 1e-4) of every point."""
    out = []
    for p in nodes.markups_node_to_points(node):
        index = node.GetNthControlPointIndexByID(p["id"])
        out.append((p["label"], p["description"], p["status"], bool(node.GetNthControlPointSelected(index)),
                    tuple(np.round(p["ras"], 4)) if p["ras"] is not None else None))
    return out


def test_preview_points_are_named_but_never_saved(slicer_app, view, phantom, tmp_path):
    path = tmp_path / "case.mrk.json"
    _, node, controller = _setup(slicer_app, view, phantom, path)
    target = _middle(_truth(phantom)["L1 left"])
    view.move((30, 40))  # hovering only: a preview point comes and goes, no file is written
    assert node.GetNumberOfControlPoints() == 1 and node.GetNthControlPointLabel(0) == "L1 left"
    assert not path.exists()
    _click_at(view, target["ras"])
    view.move((50, 60))  # in placement mode the mouse drags a preview point named after the next foramen
    assert node.GetNumberOfControlPoints() == 2
    assert node.GetNthControlPointPositionStatus(1) == node.PositionPreview
    assert node.GetNthControlPointLabel(1) == "L2 left"
    controller.mark_not_visible("L5 right")  # a change while the preview exists: saved without it
    doc = json.loads(path.read_text())
    statuses = [cp["positionStatus"] for cp in doc["markups"][0]["controlPoints"]]
    assert statuses == ["defined", "missing"]
    assert doc["markups"][0]["coordinateSystem"] in ("LPS", "RAS")


def test_renaming_a_point_in_the_markups_table_moves_it_to_that_foramen(slicer_app, view, phantom, tmp_path):
    path = tmp_path / "case.mrk.json"
    _, node, _controller = _setup(slicer_app, view, phantom, path)
    _click_at(view, _middle(_truth(phantom)["L1 left"])["ras"])
    node.SetNthControlPointLabel(0, "L2 left")  # what editing the label in the Markups module does
    records = read_marker_records(path)
    assert [(r.foramen, r.status) for r in records] == [("L2 left", CONFIRMED)]
    assert parse_point_description(records[0].description)["level"] == "2"
