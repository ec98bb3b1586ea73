"""What a DICOM folder holds besides the image series, and what the series is.

A study exported from PACS after our DICOM-SEG was sent there holds the SEG beside the series it
segments: it is left out (and named in the report), never read as a second series or as an
image. A series of another modality than the task's model knows (a CT to an MR task, one MR slice
to an X-ray task) is refused; an unstated modality (none, or OT) runs with a warning."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image_io import list_dicom_series, read_image
from SpineKneeSegLib.engine.dicomseg import write_dicom_seg
from SpineKneeSegLib.tasks import TASKS, make_phantom
from test_io import write_dicom_series  # the project's synthetic DICOM writer (shuffled file names)
from test_xray import write_radiograph_dicom

pytestmark = pytest.mark.mrml


def _knee_series(folder, **kw):
    """The knee phantom as an MR DICOM series with a frame of reference (a DICOM-SEG needs one)."""
    phantom = make_phantom("knee-bones", seed=3)
    image = phantom.image
    volume = np.clip(np.round(image.array), -32768, 32767).astype(np.int16)
    files, _ = write_dicom_series(folder, volume, direction=image.direction, origin=image.origin,
                                  step=image.spacing[2], pixel_spacing=(image.spacing[1], image.spacing[0]), **kw)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.78"
        ds.save_as(f)
    return phantom


def test_a_dicom_seg_beside_its_series_is_left_out_and_named(tmp_path):
    phantom = _knee_series(tmp_path / "study")
    alone = read_image(tmp_path / "study")
    write_dicom_seg(alone, phantom.labels.array, TASKS["knee-bones"], tmp_path / "study" / "seg.dcm")

    image = read_image(tmp_path / "study")  # before: "2 DICOM series found", the SEG one of them
    np.testing.assert_array_equal(image.array, alone.array)
    assert image.same_geometry(alone)
    assert image.meta["ignored_dicom"] == ["seg.dcm (a DICOM Segmentation)"]
    assert "seg.dcm" not in {p.rsplit("/", 1)[-1] for p in image.meta["dicom_files"]}
    assert [s["files"] for s in list_dicom_series(tmp_path / "study")] == [len(alone.meta["dicom_files"])]


def test_a_segmentation_alone_is_refused_saying_what_it_is(tmp_path):
    phantom = _knee_series(tmp_path / "series")
    image = read_image(tmp_path / "series")
    (tmp_path / "segs").mkdir()
    seg = write_dicom_seg(image, phantom.labels.array, TASKS["knee-bones"], tmp_path / "segs" / "bones.dcm")
    with pytest.raises(InputError, match=r"only bones\.dcm \(a DICOM Segmentation\): nothing to segment"):
        read_image(tmp_path / "segs")  # before: read as an enhanced image, refused for repeated positions
    with pytest.raises(InputError, match="is a DICOM Segmentation, not an image") as caught:
        read_image(seg)
    assert caught.value.path == str(seg)
    ds = pydicom.dcmread(seg)
    ds.Modality = "MR"  # a converter that rewrote the modality: the SOP class still says what it is
    ds.save_as(seg)
    with pytest.raises(InputError, match="is a DICOM Segmentation, not an image"):
        read_image(seg)


def test_the_run_on_a_study_that_holds_its_own_seg_gives_the_same_labels(tmp_path, knee_weights):
    """Run, send the SEG back beside the series (as PACS gives it in the next export), run again."""
    _knee_series(tmp_path / "study")
    args = ["run", "--task", "knee-bones", str(tmp_path / "study"), "--weights", str(knee_weights),
            "--progress", "none", "--fast"]
    assert cli.main([*args, "-o", str(tmp_path / "first")]) == 0
    shutil.copy(tmp_path / "first" / "segmentation.dcm", tmp_path / "study" / "from-pacs.dcm")
    assert cli.main([*args, "-o", str(tmp_path / "again")]) == 0
    first, again = (read_image(tmp_path / d / "labels.nii.gz") for d in ("first", "again"))
    np.testing.assert_array_equal(again.array, first.array)
    report = json.loads((tmp_path / "again" / "report.json").read_text(encoding="utf-8"))
    series = report["inputs"][0]["dicom_series"]
    assert series["modality"] == "MR" and series["not_images_left_out"] == ["from-pacs.dcm (a DICOM Segmentation)"]
    assert report["inputs"][0]["checks"]["modality"] == "DICOM Modality MR"
    assert not [w for w in report["warnings"] if "Modality" in w or "Segmentation" in w], report["warnings"]


@pytest.mark.parametrize("modality", ["CT", "PT"])
def test_a_series_of_another_modality_is_refused_and_nothing_written(tmp_path, capsys, knee_weights, modality):
    _knee_series(tmp_path / "series", modality=modality)
    out = tmp_path / "out"
    code = cli.main(["run", "--task", "knee-bones", str(tmp_path / "series"), "-o", str(out), "--weights",
                     str(knee_weights), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"is a {modality} series (DICOM Modality {modality}); task knee-bones reads MR images" in err, err
    assert not out.exists()


@pytest.mark.parametrize("modality", ["OT", None])
def test_an_unstated_modality_runs_with_a_warning(tmp_path, knee_weights, modality):
    _knee_series(tmp_path / "series", modality=modality)
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "knee-bones", str(tmp_path / "series"), "-o", str(out), "--weights",
                     str(knee_weights), "--progress", "none", "--fast"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    stated = f"DICOM Modality {modality}" if modality else "no DICOM Modality"
    warned = [w for w in report["warnings"] if w.startswith(f"{stated}: the file does not say it is MR")]
    assert warned, report["warnings"]
    assert report["inputs"][0]["checks"]["modality"] == f"{stated}: not stated as MR (warned)"


def test_one_mr_slice_to_an_xray_task_is_refused(tmp_path, capsys, xray_weights):
    """A one-slice MR series is a 2D image: only its modality tells it is no radiograph."""
    slab = (np.add.outer(np.arange(96), np.arange(96)) % 300).astype(np.int16)[None]
    files, _ = write_dicom_series(tmp_path / "mr", slab, pixel_spacing=(0.5, 0.5))
    out = tmp_path / "out"
    code = cli.main(["run", "--task", "xray-femur", str(files[0]), "-o", str(out), "--weights", str(xray_weights),
                     "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "is a MR series (DICOM Modality MR); task xray-femur reads CR/DX/RG/RF/XA" in err, err
    assert not out.exists()


@pytest.mark.parametrize("modality,accepted", [("DX", True), ("RF", True), ("MG", False)])
def test_xray_tasks_take_projection_radiography_modalities(tmp_path, capsys, xray_weights, modality, accepted):
    stored = (np.add.outer(np.arange(128), np.arange(96)) * 97 % 4000).astype(np.uint16)
    path = write_radiograph_dicom(tmp_path / "xr.dcm", stored, modality=modality, imager_spacing=(0.5, 0.5))
    out = tmp_path / "out"
    code = cli.main(["run", "--task", "xray-femur", str(path), "-o", str(out), "--weights", str(xray_weights),
                     "--progress", "none"])
    err = capsys.readouterr().err
    if accepted:
        assert code == 0, err
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        assert report["inputs"][0]["checks"]["modality"] == f"DICOM Modality {modality}"
    else:
        assert code == 2 and f"is a {modality} series" in err and not out.exists(), err
