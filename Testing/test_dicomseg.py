"""DICOM-SEG (highdicom) written for DICOM inputs, read back with highdicom/pydicom: segment labels,
SNOMED codes, and every frame on its own source slice. Plus the segment codes against
TotalSegmentator's SNOMED mapping table."""
from __future__ import annotations

import json
import os
import stat
import time

import highdicom as hd
import numpy as np
import pydicom
import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.core.labels import (
    BRAIN_LABELS,
    KNEE_LABELS,
    SPINE_LABELS,
    XRAY_FEMUR_LABELS,
)
from SpineKneeSegLib.engine.dicomseg import write_dicom_seg
from SpineKneeSegLib.engine.weights import initialise_weights
from SpineKneeSegLib.tasks import TASKS, make_phantom
from test_io import (
    write_dicom_series,  # the project's synthetic DICOM writer (shuffled file names)
)

# Rows of lassoan/SlicerTotalSegmentator TotalSegmentator/Resources/totalsegmentator_snomed_mapping.csv
# (read 2026-11-23): structure -> (category code, type code, type meaning). The lesion's type
# (SCT 52988006 "Lesion") is not in that table; its category and region follow the table's
# intracerebral_hemorrhage row (49755003 Morphologically Altered Structure, region 12738006 Brain).
TOTALSEGMENTATOR_SNOMED = {
    "femur": ("123037004", "71341001", "Femur"), "tibia": ("123037004", "12611008", "Tibia"),
    "fibula": ("123037004", "87342007", "Fibula"), "patella": ("123037004", "64234005", "Patella"),
    "vertebrae_L1": ("123037004", "66794005", "L1 vertebra"), "vertebrae_L2": ("123037004", "14293000", "L2 vertebra"),
    "vertebrae_L3": ("123037004", "36470004", "L3 vertebra"), "vertebrae_L4": ("123037004", "11994002", "L4 vertebra"),
    "vertebrae_L5": ("123037004", "49668003", "L5 vertebra"),
}


def test_segment_codes_match_totalsegmentator_mapping():
    ours = {**{s.name: s for s in KNEE_LABELS}, **{f"vertebrae_{s.name}": s for s in SPINE_LABELS}}
    for structure, (category, code, meaning) in TOTALSEGMENTATOR_SNOMED.items():
        spec = ours[structure]
        assert (spec.category.value, spec.type.value, spec.type.meaning) == (category, code, meaning), structure
        assert spec.type.scheme == "SCT"
    assert XRAY_FEMUR_LABELS[0].type == KNEE_LABELS[0].type
    (lesion,) = BRAIN_LABELS
    assert (lesion.category.value, lesion.region.value, lesion.region.meaning) == ("49755003", "12738006", "Brain")


def _dicom_phantom(task, folder, seed=1, frame_of_reference=True, **kw):
    """The task's phantom written as a DICOM series (with or without FrameOfReferenceUID)."""
    phantom = make_phantom(task, seed=seed, **kw)
    image = phantom.image
    volume = np.clip(np.round(image.array), -32768, 32767).astype(np.int16)
    files, _ = write_dicom_series(folder, volume, direction=image.direction, origin=image.origin,
                                  step=image.spacing[2], pixel_spacing=(image.spacing[1], image.spacing[0]))
    for f in files:
        ds = pydicom.dcmread(f)
        if frame_of_reference:
            ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.77"
        ds.save_as(f)
    return phantom


def _frames_by_source(seg_path, image, n_segments):
    """Label array rebuilt from the DICOM-SEG through each frame's referenced source instance."""
    seg = hd.seg.segread(seg_path)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in image.meta["dicom_files"]]
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               segment_numbers=list(range(1, n_segments + 1)),
                                               combine_segments=True, skip_overlap_checks=True)
    return seg, labels


def test_knee_truth_round_trips_frame_by_frame(tmp_path):
    phantom = _dicom_phantom("knee-bones", tmp_path / "series")
    image = read_image(tmp_path / "series")  # the files are shuffled on disk: io sorts them
    assert image.same_geometry(phantom.image)
    path = write_dicom_seg(image, phantom.labels.array, TASKS["knee-bones"], tmp_path / "seg.dcm")
    seg, labels = _frames_by_source(path, image, 4)
    np.testing.assert_array_equal(labels, phantom.labels.array)
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == pydicom.dcmread(image.meta["dicom_files"][0]).StudyInstanceUID
    described = [(s.SegmentNumber, s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                  s.SegmentedPropertyCategoryCodeSequence[0].CodeValue) for s in seg.SegmentSequence]
    assert described == [(1, "femur", "71341001", "123037004"), (2, "tibia", "12611008", "123037004"),
                         (3, "fibula", "87342007", "123037004"), (4, "patella", "64234005", "123037004")]
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert len(seg.SegmentSequence[0].RecommendedDisplayCIELabValue) == 3
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o044, "outputs must be readable by others (umask), not 0600"


def test_dicom_seg_from_the_readers_headers_equals_one_from_the_files(tmp_path):
    """The writer references the headers the reader kept (no second parse of the series): the same
    SEG as from headers read again from the files, and none of the source pixels are held."""
    phantom = _dicom_phantom("knee-bones", tmp_path / "series")
    image = read_image(tmp_path / "series")
    headers = image.meta["dicom_headers"]
    assert len(headers) == len(image.meta["dicom_files"]) and not any("PixelData" in h for h in headers)
    assert [h.SOPInstanceUID for h in headers] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in image.meta["dicom_files"]]
    kept = write_dicom_seg(image, phantom.labels.array, TASKS["knee-bones"], tmp_path / "kept.dcm")
    reread = write_dicom_seg(image.with_array(image.array, dicom_headers=None), phantom.labels.array,
                             TASKS["knee-bones"], tmp_path / "reread.dcm")
    a, b = pydicom.dcmread(kept), pydicom.dcmread(reread)
    assert a.PixelData == b.PixelData and a.NumberOfFrames == b.NumberOfFrames
    for keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "ReferencedSeriesSequence",
                    "PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert a.get(keyword) == b.get(keyword), keyword


def test_a_one_component_patient_name_is_copied_without_a_console_warning(tmp_path):
    """An anonymised series' PatientName often has one component ("T2004_07APR2015" in the pymskt
    MESE series): highdicom warns, but the SEG must copy the source's name as it is."""
    import warnings

    phantom = _dicom_phantom("knee-bones", tmp_path / "series")
    for f in (tmp_path / "series").iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientName = "T2004_07APR2015"
        ds.save_as(f)
    image = read_image(tmp_path / "series")
    with warnings.catch_warnings(record=True) as caught:
        path = write_dicom_seg(image, phantom.labels.array, TASKS["knee-bones"], tmp_path / "seg.dcm")
    assert not [w for w in caught if "person name" in str(w.message)], [str(w.message) for w in caught]
    assert str(pydicom.dcmread(path, stop_before_pixels=True).PatientName) == "T2004_07APR2015"


def test_cli_writes_dicom_seg_for_a_dicom_input_and_explains_when_it_cannot(tmp_path):
    small = {"slice_thickness_mm": 6.0, "in_plane": 64}  # a small brain: the network's time is not tested here
    _dicom_phantom("brain-wmh", tmp_path / "series", **small)
    weights = tmp_path / "tiny.pt"
    initialise_weights("brain-wmh", weights, {"channels": (4, 8)}, seed=1)
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "brain-wmh", str(tmp_path / "series"), "-o", str(out), "--weights",
                     str(weights), "--progress", "none"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "segmentation.dcm" in report["outputs"] and "dicom_seg" in report["timings_s"]
    t = report["timings_s"]  # issue 25: the DICOM-SEG is part of the wait, itemised
    assert 0 <= t["dicom_seg"] and t["total"] >= max(t["dicom_seg"], t["write"]) + t["network"] - 1e-3  # built beside the other writes
    seg = hd.seg.segread(out / "segmentation.dcm")
    (lesion,) = seg.SegmentSequence
    assert lesion.SegmentLabel == "lesion" and lesion.AnatomicRegionSequence[0].CodeValue == "12738006"
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    if any(True for _ in seg.PerFrameFunctionalGroupsSequence):  # frames (if any lesion voxels) match labels.nii.gz
        image = read_image(tmp_path / "series")
        _, labels = _frames_by_source(out / "segmentation.dcm", image, 1)
        np.testing.assert_array_equal(labels, read_image(out / "labels.nii.gz").array)
    # no FrameOfReferenceUID: the run still succeeds, without DICOM-SEG, and says why
    _dicom_phantom("brain-wmh", tmp_path / "no-for", frame_of_reference=False, **small)
    out2 = tmp_path / "out2"
    assert cli.main(["run", "--task", "brain-wmh", str(tmp_path / "no-for"), "-o", str(out2), "--weights",
                     str(weights), "--progress", "none"]) == 0
    report2 = json.loads((out2 / "report.json").read_text())
    assert "segmentation.dcm" not in report2["outputs"] and not (out2 / "segmentation.dcm").exists()
    assert any("no DICOM-SEG written" in w and "FrameOfReferenceUID" in w for w in report2["warnings"])
    assert cli.build_parser().parse_args(["run", "--task", "brain-wmh", "x", "-o", "y", "--no-dicom-seg"]).no_dicom_seg


@pytest.mark.data
@pytest.mark.slow
def test_dess_dicom_seg_maps_frames_to_their_source_slices(data_root, tmp_path):
    """The real knee DESS series (80 slices of 512 x 512): a synthetic two-label map (the image's
    bright voxels in two slabs) written and read back frame by frame; prints the write time."""
    series = data_root / "knee" / "dess-dicom"
    if not series.is_dir():
        pytest.skip(f"{series} not found")
    image = read_image(series)
    labels = np.zeros(image.array.shape, np.uint8)
    bright = image.array > np.percentile(image.array, 90)
    labels[10:30][bright[10:30]] = 1
    labels[50:52][bright[50:52]] = 4
    t = time.perf_counter()
    path = write_dicom_seg(image, labels, TASKS["knee-bones"], tmp_path / "seg.dcm")
    print(f"DICOM-SEG write on the DESS: {time.perf_counter() - t:.2f} s, {path.stat().st_size / 1e6:.1f} MB")
    seg, back = _frames_by_source(path, image, 4)
    np.testing.assert_array_equal(back, labels)
    assert seg.number_of_frames == 22  # only slices holding a segment: 20 femur + 2 patella


def test_dicom_seg_writer_warmed_at_start_up():
    """The run loads highdicom's standard tables with its imports (start-up), so the first
    DICOM-SEG of a process does not parse them inside timings_s.total."""
    from highdicom import _standard_utils
    from SpineKneeSegLib.engine.pipeline import warm_dicom_seg_writer

    loaders = [_standard_utils.get_iod_module_map, _standard_utils.get_module_attribute_map]
    for loader in loaders:
        loader.cache_clear()
    warm_dicom_seg_writer()
    assert all(loader.cache_info().currsize == 1 for loader in loaders)
