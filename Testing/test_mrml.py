"""The MRML adapter against REAL Slicer MRML (slicer-core): nodes, files and .mrb scenes.

Geometry is compared in physical space: a left-handed IJK->RAS may come back from a file with
its slices reordered (a right-handed grid over the same points), which is the same image.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from SpineKneeSegLib.mrml.harness import require_slicer

try:
    require_slicer()
except ImportError as exc:  # only a missing slicer-core skips; any other import error fails
    pytest.skip(f"real MRML unavailable: {exc}", allow_module_level=True)

import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402
from SpineKneeSegLib.core.errors import InputError  # noqa: E402
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.core.labels import BRAIN_LABELS, KNEE_LABELS, XRAY_FEMUR_LABELS  # noqa: E402
from SpineKneeSegLib.core.tables import ColumnSpec  # noqa: E402
from SpineKneeSegLib.mrml import nodes  # noqa: E402
from SpineKneeSegLib.mrml.harness import context_for_scene, get_app, is_real_slicer  # noqa: E402

pytestmark = pytest.mark.mrml


# ---- geometry fixtures and helpers ---------------------------------------------------------
def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = _rotation(0.3, -0.2, 0.5)
DIRECTIONS = {
    "oblique": OBLIQUE,
    "oblique-left-handed": OBLIQUE @ np.diag([1.0, 1.0, -1.0]),
}


def _image(direction: np.ndarray, shape=(7, 9, 11), dtype=np.int16) -> Image:
    rng = np.random.default_rng(0)
    array = rng.integers(-500, 1500, size=shape).astype(dtype)
    return Image(array, spacing=(0.7, 0.9, 2.5), origin=(-12.5, 30.25, 7.0), direction=direction)


def _labels(image: Image) -> Image:
    """Femur, tibia and patella boxes; fibula (3) deliberately absent."""
    array = np.zeros(image.array.shape, np.uint8)
    array[1:4, 2:6, 1:5] = 1
    array[4:6, 1:4, 6:10] = 2
    array[2:5, 6:8, 7:10] = 4
    return image.with_array(array)


def assert_same_physical_image(expected: Image, actual: Image, atol: float = 1e-3) -> None:
    """Same physical grid and the same value at every physical voxel centre."""
    assert expected.same_geometry(actual, atol=atol)
    k, j, i = np.indices(expected.array.shape).reshape(3, -1)
    ijk = np.c_[i, j, k].astype(float)
    mapped = actual.ras_to_ijk_points(expected.ijk_to_ras_points(ijk))
    index = np.rint(mapped).astype(int)
    assert np.allclose(mapped, index, atol=atol), "voxel centres do not fall on the reloaded grid"
    values = actual.array[index[:, 2], index[:, 1], index[:, 0]]
    np.testing.assert_array_equal(values, expected.array.ravel())


def _only_file(folder, name):
    """Atomic writes leave nothing beside the output (no staging folder, no temp file)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.startswith(name))


# ---- harness -------------------------------------------------------------------------------
def test_harness_mirrors_slicer_modules(slicer_app):
    assert not is_real_slicer()
    assert slicer.mrmlScene is slicer_app.scene
    for name in ("volumes", "segmentations", "markups", "tables", "colors", "subjecthierarchy", "terminologies"):
        assert getattr(slicer.modules, name).logic() is slicer_app.logic(name)
        assert slicer_app.logic(name).GetMRMLScene() is slicer_app.scene
    assert context_for_scene(slicer_app.scene) is slicer_app
    with pytest.raises(ValueError, match="create_headless_slicer"):
        context_for_scene(slicer.vtkMRMLScene())


def test_slicer_util_helpers_work_headless(slicer_app):
    """slicer.util functions that call slicer.modules.<name>.logic() work on this harness."""
    image = _image(DIRECTIONS["oblique"])
    volume = nodes.image_to_volume_node(slicer_app.scene, image, "ct")
    seg = nodes.labels_to_segmentation_node(slicer_app.scene, _labels(image), KNEE_LABELS, "bones",
                                           reference_volume=volume)
    femur = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "femur", volume)
    np.testing.assert_array_equal(femur.astype(bool), _labels(image).array == 1)
    assert slicer.util.getNode("ct") is volume


def test_get_app_is_created_once():
    require_slicer()
    assert get_app() is get_app()


# ---- volumes -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_volume_node_round_trip_is_exact(mrml_scene, kind):
    image = _image(DIRECTIONS[kind])
    node = nodes.image_to_volume_node(mrml_scene, image, "input")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), image.ijk_to_ras, atol=1e-9)
    back = nodes.volume_node_to_image(node)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.array.dtype == image.array.dtype
    np.testing.assert_allclose(back.spacing, image.spacing, atol=1e-9)
    np.testing.assert_allclose(back.origin, image.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, image.direction, atol=1e-9)


def test_volume_node_accepts_bool_and_int64(mrml_scene):
    image = _image(np.eye(3))
    for array in (image.array > 0, image.array.astype(np.int64)):
        node = nodes.image_to_volume_node(mrml_scene, image.with_array(array), "v")
        np.testing.assert_array_equal(nodes.volume_node_to_image(node).array, array.astype(np.int32))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_volume_file_round_trip_keeps_physical_image(mrml_scene, tmp_path, suffix, kind):
    image = _image(DIRECTIONS[kind])
    node = nodes.image_to_volume_node(mrml_scene, image, "input")
    path = nodes.save_node(node, tmp_path / f"input{suffix}")
    assert _only_file(tmp_path, "input") == [f"input{suffix}"]
    loaded = nodes.load_volume(mrml_scene, path)
    assert loaded.GetName().startswith("input") and loaded is not node  # Slicer makes it "input_1"
    back = nodes.volume_node_to_image(loaded)
    assert back.array.dtype == image.array.dtype
    assert_same_physical_image(image, back)


# ---- segmentations -------------------------------------------------------------------------
def _assert_segments_match_specs(seg_node, labels):
    segmentation = seg_node.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == [
        s.segment_id for s in labels]
    for spec in labels:
        segment = segmentation.GetSegment(spec.segment_id)
        assert segment.GetName() == spec.name
        np.testing.assert_allclose(segment.GetColor(), spec.color, atol=1e-6)
        codes = nodes.terminology_codes(segment.GetTerminology())
        assert codes["context"] == nodes.TERMINOLOGY_CONTEXT
        assert (codes["category"], codes["type"], codes["region"]) == (spec.category, spec.type, spec.region)


@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_segmentation_seg_nrrd_round_trip(mrml_scene, tmp_path, kind):
    image = _image(DIRECTIONS[kind])
    labels = _labels(image)
    volume = nodes.image_to_volume_node(mrml_scene, image, "input")
    seg = nodes.labels_to_segmentation_node(mrml_scene, labels, KNEE_LABELS, "knee", reference_volume=volume)
    _assert_segments_match_specs(seg, KNEE_LABELS)  # fibula present though it has no voxels
    np.testing.assert_array_equal(nodes.segmentation_node_to_labels(seg, image, KNEE_LABELS), labels.array)

    path = nodes.save_node(seg, tmp_path / "knee.seg.nrrd")
    assert _only_file(tmp_path, "knee") == ["knee.seg.nrrd"]
    header = path.read_bytes()[:8192].decode("latin-1")
    assert "TerminologyEntry:" + nodes.terminology_entry(KNEE_LABELS[0]) in header
    loaded = nodes.load_segmentation(mrml_scene, path)
    assert loaded.GetName() == "knee"
    _assert_segments_match_specs(loaded, KNEE_LABELS)
    back = nodes.segmentation_node_to_labels(loaded, image, KNEE_LABELS)
    np.testing.assert_array_equal(back, labels.array)


def test_segmentation_to_labels_resamples_in_physical_space(mrml_scene):
    """The same physical grid stored with reversed slices receives reversed labels."""
    image = _image(DIRECTIONS["oblique-left-handed"])
    labels = _labels(image)
    seg = nodes.labels_to_segmentation_node(mrml_scene, labels, KNEE_LABELS, "knee")
    flipped_direction = image.direction @ np.diag([1.0, 1.0, -1.0])
    last_slice = image.ijk_to_lps_points([[0, 0, image.array.shape[0] - 1]])[0]
    flipped = Image(image.array[::-1], image.spacing, last_slice, flipped_direction)
    assert flipped.is_right_handed and flipped.same_geometry(image)
    np.testing.assert_array_equal(nodes.segmentation_node_to_labels(seg, flipped, KNEE_LABELS), labels.array[::-1])


def test_overlapping_structures_keep_both_in_a_second_layer_and_their_laterality(mrml_scene, tmp_path):
    """xray-chest: a clavicle over a lung is in both segments (two labelmap layers of one .seg.nrrd)."""
    from SpineKneeSegLib.core.labels import XRAY_CHEST_LABELS
    from SpineKneeSegLib.tasks import make_phantom

    ph = make_phantom("xray-chest", seed=2)
    clavicles = ph.extra["layers"]["clavicles"]
    lungs_heart, bones = XRAY_CHEST_LABELS[:3], XRAY_CHEST_LABELS[3:]
    seg = nodes.labels_to_segmentation_node(mrml_scene, ph.labels, lungs_heart, "chest", layers=[(clavicles, bones)])
    loaded = nodes.load_segmentation(mrml_scene, nodes.save_node(seg, tmp_path / "chest.seg.nrrd"))
    segmentation = loaded.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 2
    _assert_segments_match_specs(loaded, XRAY_CHEST_LABELS)
    np.testing.assert_array_equal(nodes.segmentation_node_to_labels(loaded, ph.image, lungs_heart), ph.labels.array)
    np.testing.assert_array_equal(nodes.segmentation_node_to_labels(loaded, ph.image, bones), clavicles.array)
    left = nodes.terminology_codes(segmentation.GetSegment("left_clavicle").GetTerminology())
    assert (left["type"].meaning, left["modifier"].meaning) == ("Clavicle", "Left")


def test_segmentation_region_code_round_trips(mrml_scene, tmp_path):
    image = _image(np.eye(3))
    lesion = image.with_array((image.array > 1400).astype(np.uint8))
    seg = nodes.labels_to_segmentation_node(mrml_scene, lesion, BRAIN_LABELS, "wmh")
    loaded = nodes.load_segmentation(mrml_scene, nodes.save_node(seg, tmp_path / "wmh.seg.nrrd"))
    _assert_segments_match_specs(loaded, BRAIN_LABELS)
    assert nodes.terminology_codes(loaded.GetSegmentation().GetSegment("lesion").GetTerminology())[
        "region"].meaning == "Brain"
    np.testing.assert_array_equal(nodes.segmentation_node_to_labels(loaded, image, BRAIN_LABELS), lesion.array)


def test_empty_segmentation_keeps_its_segments(mrml_scene, tmp_path):
    """No lesion found is a normal result: the file still names the lesion segment."""
    image = _image(np.eye(3)).with_array(np.zeros((7, 9, 11), np.uint8))
    seg = nodes.labels_to_segmentation_node(mrml_scene, image, BRAIN_LABELS, "wmh")
    loaded = nodes.load_segmentation(mrml_scene, nodes.save_node(seg, tmp_path / "wmh.seg.nrrd"))
    _assert_segments_match_specs(loaded, BRAIN_LABELS)
    assert not nodes.segmentation_node_to_labels(loaded, image, BRAIN_LABELS).any()


def test_single_slice_radiograph_round_trip(mrml_scene, tmp_path):
    rng = np.random.default_rng(1)
    xray = Image(rng.integers(0, 4000, (1, 50, 40)).astype(np.uint16), (0.2, 0.2, 1.0), (5.0, 6.0, 0.0))
    volume = nodes.image_to_volume_node(mrml_scene, xray, "xray")
    assert_same_physical_image(xray, nodes.volume_node_to_image(
        nodes.load_volume(mrml_scene, nodes.save_node(volume, tmp_path / "xray.nii.gz"))))
    femur = xray.with_array((xray.array > 2000).astype(np.uint8))
    seg = nodes.labels_to_segmentation_node(mrml_scene, femur, XRAY_FEMUR_LABELS, "femur", reference_volume=volume)
    loaded = nodes.load_segmentation(mrml_scene, nodes.save_node(seg, tmp_path / "femur.seg.nrrd"))
    np.testing.assert_array_equal(nodes.segmentation_node_to_labels(loaded, xray, XRAY_FEMUR_LABELS), femur.array)


def test_segmentation_converts_to_closed_surface(mrml_scene):
    image = _image(DIRECTIONS["oblique"])
    labels = _labels(image)
    seg = nodes.labels_to_segmentation_node(mrml_scene, labels, KNEE_LABELS, "knee")
    assert seg.CreateClosedSurfaceRepresentation()
    femur = vtk.vtkPolyData()
    seg.GetClosedSurfaceRepresentation("femur", femur)
    assert femur.GetNumberOfPoints() > 0
    # the surface lies around the femur voxels, in RAS
    k, j, i = np.nonzero(labels.array == 1)
    ras = image.ijk_to_ras_points(np.c_[i, j, k])
    lo, hi = ras.min(axis=0) - 2.5, ras.max(axis=0) + 2.5
    bounds = np.reshape(femur.GetBounds(), (3, 2))
    assert np.all(bounds[:, 0] >= lo) and np.all(bounds[:, 1] <= hi)
    fibula = vtk.vtkPolyData()
    seg.GetClosedSurfaceRepresentation("fibula", fibula)
    assert fibula.GetNumberOfPoints() == 0


def test_unknown_label_value_is_refused(mrml_scene):
    image = _image(np.eye(3))
    with pytest.raises(ValueError, match=r"\[9\] have no LabelSpec"):
        nodes.labels_to_segmentation_node(mrml_scene, image.with_array(np.full(image.array.shape, 9, np.uint8)),
                                         KNEE_LABELS, "bad")
    # below the largest known value but not known (1, 3, 4 without 2): not taken for known by its maximum
    with pytest.raises(ValueError, match=r"\[2\] have no LabelSpec"):
        nodes.labels_to_segmentation_node(mrml_scene, image.with_array(np.full(image.array.shape, 2, np.uint8)),
                                         [s for s in KNEE_LABELS if s.value != 2], "gap")


def test_terminology_is_registered_with_slicer(slicer_app):
    image = _image(np.eye(3))
    nodes.labels_to_segmentation_node(slicer_app.scene, _labels(image), KNEE_LABELS, "knee")
    names = vtk.vtkStringArray()
    slicer_app.terminologies.GetLoadedTerminologyNames(names)
    assert nodes.TERMINOLOGY_CONTEXT in [names.GetValue(i) for i in range(names.GetNumberOfValues())]
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
        nodes.terminology_entry(KNEE_LABELS[3]), entry)
    info = slicer_app.terminologies.GetInfoStringFromTerminologyEntry(entry)
    assert "Patella" in info and "Anatomical Structure" in info
    regions = vtk.vtkStringArray()
    slicer_app.terminologies.GetLoadedRegionContextNames(regions)
    assert nodes.REGION_CONTEXT in [regions.GetValue(i) for i in range(regions.GetNumberOfValues())]


# ---- markups -------------------------------------------------------------------------------
POINTS = [(12.5, -40.25, 101.0), (-18.0, -39.5, 99.75), None]
POINT_LABELS = ["L3 right", "L3 left", "L4 right"]
POINT_DESCRIPTIONS = ["p=0.91", "p=0.87", "not found"]


def _assert_points(points, expect_attributes=True):
    assert [p["label"] for p in points] == POINT_LABELS
    assert [p["description"] for p in points] == POINT_DESCRIPTIONS
    assert [p["status"] for p in points] == ["defined", "defined", "missing"]
    np.testing.assert_allclose([p["ras"] for p in points[:2]], POINTS[:2], atol=1e-6)
    assert points[2]["ras"] is None
    if expect_attributes:
        assert [p["attributes"] for p in points] == [{"level": "3", "side": "right"},
                                                      {"level": "3", "side": "left"},
                                                      {"level": "4", "side": "right"}]


def _markups(scene):
    attributes = [{"level": label[1], "side": label.split()[1]} for label in POINT_LABELS]
    return nodes.points_to_markups_node(scene, POINTS, POINT_LABELS, POINT_DESCRIPTIONS, name="foramina",
                                       attributes=attributes)


def test_markups_mrk_json_round_trip_lps_file_ras_nodes(mrml_scene, tmp_path):
    node = _markups(mrml_scene)
    _assert_points(nodes.markups_node_to_points(node))
    path = nodes.save_node(node, tmp_path / "foramina.mrk.json")
    assert _only_file(tmp_path, "foramina") == ["foramina.mrk.json"]

    saved = json.loads(path.read_text())["markups"][0]
    assert saved["coordinateSystem"] == "LPS"
    x, y, z = POINTS[0]
    np.testing.assert_allclose(saved["controlPoints"][0]["position"], [-x, -y, z])
    assert saved["controlPoints"][2]["positionStatus"] == "missing"

    loaded = nodes.load_markups(mrml_scene, path)
    assert loaded.GetName() == "foramina" and loaded is not node
    # per-point attributes live in node attributes, which .mrk.json does not keep (.mrb does)
    _assert_points(nodes.markups_node_to_points(loaded), expect_attributes=False)


def test_markups_node_attributes_and_length_check(mrml_scene):
    node = nodes.points_to_markups_node(mrml_scene, [(1, 2, 3)], ["a"], attributes={"task": "spine"})
    assert node.GetAttribute("task") == "spine"
    with pytest.raises(ValueError, match="same length"):
        nodes.points_to_markups_node(mrml_scene, [(1, 2, 3)], ["a", "b"])


# ---- tables --------------------------------------------------------------------------------
COLUMNS = [
    ColumnSpec("lesion", "int", description="Lesion number"),
    ColumnSpec("volume_mm3", "float", unit="mm3", description="Lesion volume"),
    ColumnSpec("bracket", "string", description="Size bracket in voxels"),
    ColumnSpec("max_prob", "float", unit="", description="Peak probability"),
]
ROWS = [
    {"lesion": 1, "volume_mm3": 12.5, "bracket": "[10, 400)", "max_prob": 0.93},
    {"lesion": 2, "volume_mm3": 0.125, "bracket": "[0, 10)", "max_prob": None},
    {"lesion": 3, "volume_mm3": 1024.0, "bracket": "[1000, inf)", "max_prob": 0.5},
]


def _assert_rows(rows):
    assert len(rows) == len(ROWS)
    for got, want in zip(rows, ROWS):
        assert set(got) == set(want)
        for key, value in want.items():
            if value is None:
                assert math.isnan(got[key])
            else:
                assert got[key] == value and type(got[key]) is type(value)


def test_table_tsv_round_trip_keeps_types_units_values(mrml_scene, tmp_path):
    node = nodes.rows_to_table_node(mrml_scene, ROWS, COLUMNS, "lesions")
    assert nodes.table_node_columns(node) == COLUMNS
    _assert_rows(nodes.table_node_to_rows(node))

    path = nodes.save_node(node, tmp_path / "lesions.tsv")
    assert _only_file(tmp_path, "lesions") == ["lesions.schema.tsv", "lesions.tsv"]
    assert path.read_text().splitlines()[0].split("\t") == [c.name for c in COLUMNS]

    loaded = nodes.load_table(mrml_scene, path)
    assert loaded.GetName() == "lesions"
    assert sorted(nodes.table_node_columns(loaded), key=lambda c: c.name) == sorted(COLUMNS, key=lambda c: c.name)
    _assert_rows(nodes.table_node_to_rows(loaded))
    assert list(nodes.table_node_to_rows(loaded, ["bracket", "lesion"])[0]) == ["bracket", "lesion"]


def test_table_int_column_refuses_missing_value(mrml_scene):
    with pytest.raises(ValueError, match="'lesion', row 0"):
        nodes.rows_to_table_node(mrml_scene, [{"lesion": None}], COLUMNS[:1], "t")


# ---- files: errors -------------------------------------------------------------------------
def test_save_node_refuses_wrong_suffix_and_writes_nothing(mrml_scene, tmp_path):
    node = _markups(mrml_scene)
    with pytest.raises(InputError, match=r"\.mrk\.json"):
        nodes.save_node(node, tmp_path / "foramina.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_load_missing_file_names_it(mrml_scene, tmp_path):
    with pytest.raises(InputError, match="nope.nrrd: file not found"):
        nodes.load_volume(mrml_scene, tmp_path / "nope.nrrd")
    bad = tmp_path / "bad.seg.nrrd"
    bad.write_text("not a nrrd")
    with pytest.raises(InputError, match="bad.seg.nrrd: cannot be read as a segmentation"):
        nodes.load_segmentation(mrml_scene, bad)
    with pytest.raises(InputError, match="bad.seg.nrrd: cannot be read as markups"):
        nodes.load_markups(mrml_scene, bad)
    with pytest.raises(InputError, match="a table must be"):
        nodes.load_table(mrml_scene, bad)


# ---- whole scene ---------------------------------------------------------------------------
def test_mrb_scene_round_trip_into_fresh_scene(slicer_app, tmp_path):
    scene = slicer_app.scene
    image = _image(DIRECTIONS["oblique-left-handed"])
    labels = _labels(image)
    volume = nodes.image_to_volume_node(scene, image, "input")
    nodes.labels_to_segmentation_node(scene, labels, KNEE_LABELS, "knee", reference_volume=volume)
    _markups(scene).SetAttribute("task", "spine")
    nodes.rows_to_table_node(scene, ROWS, COLUMNS, "lesions")

    path = nodes.save_scene_mrb(scene, tmp_path / "scene.mrb")
    assert _only_file(tmp_path, "scene") == ["scene.mrb"]

    fresh = nodes.load_scene_mrb(path)
    try:
        assert fresh.scene is not scene and slicer.mrmlScene is fresh.scene
        s = fresh.scene
        back = nodes.volume_node_to_image(s.GetFirstNodeByName("input"))
        assert_same_physical_image(image, back)

        seg = s.GetFirstNodeByName("knee")
        _assert_segments_match_specs(seg, KNEE_LABELS)
        np.testing.assert_array_equal(nodes.segmentation_node_to_labels(seg, image, KNEE_LABELS), labels.array)
        assert seg.GetNodeReference("referenceImageGeometryRef") is s.GetFirstNodeByName("input")
        assert seg.CreateClosedSurfaceRepresentation()

        points = s.GetFirstNodeByName("foramina")
        _assert_points(nodes.markups_node_to_points(points))
        assert points.GetAttribute("task") == "spine"

        table = s.GetFirstNodeByName("lesions")
        assert sorted(nodes.table_node_columns(table), key=lambda c: c.name) == sorted(COLUMNS, key=lambda c: c.name)
        _assert_rows(nodes.table_node_to_rows(table))
    finally:
        fresh.close()
        slicer_app.activate()
