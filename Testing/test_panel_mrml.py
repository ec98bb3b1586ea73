"""The panel's results loading and parameter node on REAL MRML (slicer-core): what the Widget calls
after a run, minus Qt. Output folders are written by the pipeline's own writer (write_outputs)
from the phantoms' ground truth, so tables and markers have known content; the network is not
needed for what is tested here (the CLI process tests run it)."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from SpineKneeSegLib.mrml.harness import require_slicer

try:
    require_slicer()
except ImportError as exc:
    pytest.skip(f"real MRML unavailable: {exc}", allow_module_level=True)

import slicer  # noqa: E402
from SpineKneeSegLib.core.errors import InputError  # noqa: E402
from SpineKneeSegLib.engine.pipeline import postprocess, write_outputs  # noqa: E402
from SpineKneeSegLib.mrml import nodes  # noqa: E402
from SpineKneeSegLib.mrml.harness import create_headless_slicer  # noqa: E402
from SpineKneeSegLib.mrml.results import jump_target, load_results  # noqa: E402
from SpineKneeSegLib.panel.controller import PanelController, PanelState  # noqa: E402
from SpineKneeSegLib.panel.parameters import (  # noqa: E402
    load_from_node,
    parameter_node,
    save_to_node,
)
from SpineKneeSegLib.tasks import (
    TASKS,  # noqa: E402
    make_phantom,  # noqa: E402
)

pytestmark = pytest.mark.mrml


def _finished_run(task, folder, seed=1):
    """A run's output folder as the CLI writes it (report.json lists the outputs), from truth."""
    phantom = make_phantom(task, seed=seed)
    card = TASKS[task]
    result = postprocess(card, phantom.image, phantom.labels.array)
    folder.mkdir()
    outputs = write_outputs(card, phantom.image, result, folder, scene=False)
    (folder / "report.json").write_text(json.dumps({"task": task, "outputs": outputs}))
    return phantom, result


def _study_volume(scene, phantom):
    """The input as Slicer's DICOM import leaves it: a volume under patient / study items."""
    volume = nodes.image_to_volume_node(scene, phantom.image, "scan")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    sh.CreateItem(study, volume)  # in Slicer the DICOM plugin does this
    return volume, sh, study


def test_brain_results_lesion_table_jump_and_study_placement(slicer_app, tmp_path):
    scene = slicer_app.scene
    phantom, result = _finished_run("brain-wmh", tmp_path / "out")
    volume, sh, study = _study_volume(scene, phantom)
    loaded = load_results(scene, tmp_path / "out", volume, "brain-wmh")
    seg = loaded.segmentation
    assert seg.GetName() == "scan brain-wmh"
    assert seg.GetSegmentation().GetSegment("lesion").GetName() == "lesion"
    # reference geometry = the input volume (what Slicer's DICOM-SEG export reads)
    role = seg.GetReferenceImageGeometryReferenceRole()
    assert seg.GetNodeReference(role) is volume
    display = seg.GetDisplayNode()
    assert display.GetVisibility2DOutline() and display.GetVisibility3D()
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    table = loaded.main_table
    assert table is loaded.tables["lesions.tsv"] and table.GetTable().GetNumberOfRows() == len(result.tables[0].rows)
    assert len(result.tables[0].rows) >= 2
    for node in (seg, table):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    # a row click jumps to that lesion's centroid, which lies inside the lesion's voxels
    for row, truth in enumerate(result.tables[0].rows[:3]):
        ras = jump_target(table, row)
        assert ras == pytest.approx((truth["centroid_r"], truth["centroid_a"], truth["centroid_s"]), abs=1e-6)
    i, j, k = np.round(phantom.image.ras_to_ijk_points([jump_target(table, 0)])[0]).astype(int)
    assert phantom.labels.array[k, j, i] == 1  # the largest phantom lesion is a blob: its centroid is in it
    assert jump_target(table, 10**6) is None


def test_lumbar_results_markups_labels_and_volume_tables(slicer_app, tmp_path):
    scene = slicer_app.scene
    phantom, result = _finished_run("lumbar-foramina", tmp_path / "out")
    volume = nodes.image_to_volume_node(scene, phantom.image, "spine")
    loaded = load_results(scene, tmp_path / "out", volume)
    assert loaded.segmentation.GetName() == "spine lumbar-foramina"  # task from report.json
    (markups,) = loaded.markups
    labels = [markups.GetNthControlPointLabel(i) for i in range(markups.GetNumberOfControlPoints())]
    assert labels == [p["label"] for p in result.points] and "L5 right" in labels
    assert markups.GetDisplayNode().GetPointLabelsVisibility()
    knee_phantom, _ = _finished_run("knee-bones", tmp_path / "knee")
    knee_volume = nodes.image_to_volume_node(scene, knee_phantom.image, "knee")
    knee = load_results(scene, tmp_path / "knee", knee_volume, "knee-bones")
    rows = nodes.table_node_to_rows(knee.tables["volumes.tsv"])
    assert [r[next(iter(r))] for r in rows][:4] and len(rows) == 4  # femur, tibia, fibula, patella
    assert jump_target(knee.tables["volumes.tsv"], 0) is None  # no centroid columns: no jump


def test_existing_segmentation_gets_its_segments_replaced(slicer_app, tmp_path):
    scene = slicer_app.scene
    phantom, _ = _finished_run("knee-bones", tmp_path / "out")
    volume = nodes.image_to_volume_node(scene, phantom.image, "knee")
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my edits")
    before = scene.GetNumberOfNodes()
    existing.GetSegmentation().AddEmptySegment("femur", "femur")  # an old femur: replaced
    existing.GetSegmentation().AddEmptySegment("menisci", "menisci")  # the user's own: kept
    loaded = load_results(scene, tmp_path / "out", volume, "knee-bones", segmentation_node=existing)
    assert loaded.segmentation is existing
    # no second segmentation (nor its display/storage nodes) left over; the table is the one new node
    assert scene.GetNumberOfNodes() - before == 1 + (existing.GetDisplayNode() is not None) + \
        loaded.tables["volumes.tsv"].GetNumberOfStorageNodes()
    names = sorted(existing.GetSegmentation().GetNthSegment(i).GetName()
                   for i in range(existing.GetSegmentation().GetNumberOfSegments()))
    assert names == ["femur", "fibula", "menisci", "patella", "tibia"]
    femur = slicer.util.arrayFromSegmentBinaryLabelmap(existing, existing.GetSegmentation()
                                                       .GetSegmentIdBySegmentName("femur"), volume)
    assert femur.sum() == (phantom.labels.array == 1).sum()


def test_a_broken_output_leaves_the_scene_unchanged(slicer_app, tmp_path):
    scene = slicer_app.scene
    phantom, _ = _finished_run("lumbar-foramina", tmp_path / "out")
    volume = nodes.image_to_volume_node(scene, phantom.image, "spine")
    (tmp_path / "out" / "foramina.mrk.json").write_text("{ truncated")
    before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="foramina.mrk.json"):
        load_results(scene, tmp_path / "out", volume)
    assert scene.GetNumberOfNodes() == before
    with pytest.raises(InputError, match="no report.json"):
        load_results(scene, tmp_path / "missing", volume)


def test_parameter_node_round_trips_through_a_saved_scene(slicer_app):
    scene = slicer_app.scene
    flair = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flair")
    t1 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "t1")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    c = PanelController(PanelState(task="brain-wmh", device="cpu", fast=True, weights_dir="/data/w",
                                   input_volume_ids=[flair.GetID(), t1.GetID()],
                                   output_segmentation_id=seg.GetID()))
    node = parameter_node(scene)
    assert parameter_node(scene) is node  # a singleton
    save_to_node(c, node)
    c.state.input_volume_ids = [flair.GetID()]  # fewer inputs later: the stale reference goes
    save_to_node(c, node)
    c.state.input_volume_ids = [flair.GetID(), t1.GetID()]
    save_to_node(c, node)
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    other = create_headless_slicer(activate=False)  # a fresh application opens the saved scene
    try:
        other.scene.SetLoadFromXMLString(1)
        other.scene.SetSceneXMLString(xml)
        other.scene.Import()
        restored = PanelController()
        load_from_node(restored, parameter_node(other.scene))
        s = restored.state
        assert (s.task, s.device, s.fast, s.weights_dir) == ("brain-wmh", "cpu", True, "/data/w")
        names = [other.scene.GetNodeByID(i).GetName() for i in s.input_volume_ids]
        assert names == ["flair", "t1"] and other.scene.GetNodeByID(s.output_segmentation_id).GetName() == "out"
    finally:
        other.close()
    c.state.input_volume_ids = [flair.GetID()]
    save_to_node(c, node)
    again = PanelController()
    load_from_node(again, node)
    assert again.state.input_volume_ids == [flair.GetID()]


def test_dicom_volume_is_passed_as_its_own_series_else_as_nrrd(slicer_app, tmp_path):
    """A volume from Slicer's DICOM database goes to the CLI as its own files (so the CLI writes a
    DICOM-SEG); the database look-up (slicer.dicomDatabase.fileForInstance) is a dict here."""
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.mrml.results import input_paths
    from test_dicomseg import _dicom_phantom

    phantom = _dicom_phantom("knee-bones", tmp_path / "db")
    files = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: str(f) for f in (tmp_path / "db").iterdir()}
    scene = slicer_app.scene
    from_dicom = nodes.image_to_volume_node(scene, phantom.image, "dicom")
    from_dicom.SetAttribute("DICOM.instanceUIDs", " ".join(files))
    plain = nodes.image_to_volume_node(scene, phantom.image, "plain")
    paths = input_paths([from_dicom, plain], tmp_path / "work", files.get)
    assert paths == [str(tmp_path / "work" / "input0"), str(tmp_path / "work" / "input1.nrrd")]
    staged = read_image(paths[0])
    assert staged.meta["is_dicom"] and staged.same_geometry(phantom.image)
    assert read_image(paths[1]).same_geometry(phantom.image)
    files.popitem()  # a file missing from the database: fall back to exporting the volume
    assert input_paths([from_dicom], tmp_path / "work2", files.get)[0].endswith("input0.nrrd")
