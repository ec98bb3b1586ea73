"""Enhanced (multi-frame) DICOM inputs: each frame is a slice with its own position, echo and
rescale from the functional groups, so such a file reads as the single-frame series it holds.
GDCM reads it as one stack in file order: a multi-echo file became interleaved slices (the real
8-echo knee MESE: 192 slices, a 768 mm knee), and it applies the first frame's rescale to all.
The files are made with highdicom's legacy converter (what dcm2dcm-style tools and PACS write),
and turned into an Enhanced MR-style file (echo time in MREchoSequence) where a test says so."""
from __future__ import annotations

import copy
import json
import logging

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.uid import RLELossless, generate_uid
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image_io import list_dicom_series, read_image
from SpineKneeSegLib.engine.dicomseg import can_write, write_dicom_seg
from SpineKneeSegLib.tasks import TASKS, make_phantom
from test_io import _assert_same_geometry, _volume, write_dicom_series

FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture(autouse=True)
def _quiet_converter():
    """highdicom logs each attribute a synthetic header lacks (FrameType, WindowWidth ...)."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def enhanced(files, path, order=None):
    """The single-frame files as one legacy-converted enhanced MR file, frames in ``order``."""
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
    if order is not None:
        datasets = [datasets[i] for i in order]
    LegacyConvertedEnhancedMRImage(datasets, series_instance_uid=generate_uid(), series_number=9,
                                   sop_instance_uid=generate_uid(), instance_number=1).save_as(path)
    return path


def _frames(path):
    return pydicom.dcmread(path).PerFrameFunctionalGroupsSequence


def test_multi_echo_file_reads_as_the_series_one_echo_at_a_time(tmp_path):
    volume = _volume((5, 6, 7))
    files, _ = write_dicom_series(tmp_path / "mese", volume, echoes=[(1, 10.0), (2, 25.0), (3, 40.0)])
    path = enhanced(files, tmp_path / "mese.dcm", order=np.random.default_rng(0).permutation(len(files)))
    for echo in (None, 1, 3):
        series, frames = read_image(tmp_path / "mese", echo=echo), read_image(path, echo=echo)
        assert frames.array.shape == (5, 6, 7)  # not 15 interleaved slices
        np.testing.assert_array_equal(frames.array, series.array)
        _assert_same_geometry(frames, series)
        for key in ("echo", "echo_time", "echoes", "warnings", "modality"):
            assert frames.meta[key] == series.meta[key], key
    assert len(read_image(path).meta["dicom_frames"]) == 5
    folder = tmp_path / "alone"
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    (listed,) = list_dicom_series(folder)
    assert listed["files"] == 1 and listed["echoes"] == [1, 2, 3]
    with pytest.raises(InputError, match="echo 4 not available"):
        read_image(path, echo=4)


def test_enhanced_mr_echo_times_and_per_frame_rescale(tmp_path):
    """A scanner's Enhanced MR file: echo times only in MREchoSequence, and a rescale per frame
    (Philips varies it); pydicom decodes it, RLE-compressed too, and each frame keeps its own."""
    volume = _volume((4, 6, 7))
    files, _ = write_dicom_series(tmp_path / "mese", volume, echoes=[(1, 10.0), (2, 25.0)])
    ds = pydicom.dcmread(enhanced(files, tmp_path / "legacy.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "PixelValueTransformationSequence" in shared:
        del shared.PixelValueTransformationSequence
    stored = ds.pixel_array.copy()
    slopes = []
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        unassigned = item.UnassignedPerFrameConvertedAttributesSequence[0]
        echo = pydicom.Dataset()
        echo.EffectiveEchoTime = unassigned.EchoTime
        item.MREchoSequence = [echo]
        del unassigned.EchoTime, unassigned.EchoNumbers
        transform = pydicom.Dataset()
        slopes.append(1.0 + 0.5 * (n % 3))
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = f"{slopes[-1]:g}", "-7", "US"
        item.PixelValueTransformationSequence = [transform]
    ds.save_as(tmp_path / "plain.dcm")
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    positions = [tuple(np.round([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient], 3))
                 for f in _frames(tmp_path / "plain.dcm")]
    times = [float(f.MREchoSequence[0].EffectiveEchoTime) for f in _frames(tmp_path / "plain.dcm")]
    for name in ("plain.dcm", "rle.dcm"):
        for echo, te in ((1, 10.0), (2, 25.0)):
            image = read_image(tmp_path / name, echo=echo)
            series = read_image(tmp_path / "mese", echo=echo)
            _assert_same_geometry(image, series)
            assert image.meta["echo_time"] == te and image.meta["echoes"] == [1, 2]
            # slice k holds the frame of this echo at series slice k's position, rescaled by its own slope
            for k, (_, frame) in enumerate(image.meta["dicom_frames"]):
                assert times[frame - 1] == te
                np.testing.assert_allclose(positions[frame - 1], series.ijk_to_lps_points([(0, 0, k)])[0], atol=2e-3)
                np.testing.assert_allclose(image.array[k], stored[frame - 1] * slopes[frame - 1] - 7)
                np.testing.assert_allclose(image.array[k], series.array[k] * slopes[frame - 1] - 7)
    assert len(set(slopes)) > 1


def test_repeated_positions_of_one_echo_are_refused_naming_the_frames(tmp_path):
    """A dynamic series in one file (two time points, the same echo) is not silently stacked."""
    volume = _volume((3, 6, 7))
    first, uid = write_dicom_series(tmp_path / "t", volume, name="a")
    second, _ = write_dicom_series(tmp_path / "t", volume + 5, name="b", series_uid=uid)
    path = enhanced(first + second, tmp_path / "dynamic.dcm")
    with pytest.raises(InputError, match=r"duplicate slice position .*dynamic.dcm frame \d+ and dynamic.dcm frame \d+"):
        read_image(path)


def test_dicom_seg_of_a_one_stack_file_references_each_source_frame(tmp_path):
    """The knee phantom as one enhanced file, its frames shuffled: the SEG rebuilt
    through each frame's referenced source frame is the truth; one echo of several is refused."""
    phantom = make_phantom("knee-bones", seed=1)
    image = phantom.image
    volume = np.clip(np.round(image.array), -32768, 32767).astype(np.int16)
    files, _ = write_dicom_series(tmp_path / "series", volume, direction=image.direction, origin=image.origin,
                                  step=image.spacing[2], pixel_spacing=(image.spacing[1], image.spacing[0]))
    series = read_image(tmp_path / "series")
    path = enhanced(files, tmp_path / "knee.dcm", order=np.random.default_rng(1).permutation(len(files)))
    read = read_image(path)
    assert read.same_geometry(phantom.image) and read.same_geometry(series)
    np.testing.assert_array_equal(read.array, series.array)
    assert can_write(read) == (True, "")
    seg_path = write_dicom_seg(read, phantom.labels.array, TASKS["knee-bones"], tmp_path / "seg.dcm")
    seg = hd.seg.segread(seg_path)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    frames = [frame for _, frame in read.meta["dicom_frames"]]
    back = seg.get_pixels_by_source_frame(source.SOPInstanceUID, frames, segment_numbers=[1, 2, 3, 4],
                                          combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back, phantom.labels.array)
    for item in seg.PerFrameFunctionalGroupsSequence:  # each SEG frame lies on its source frame
        (ref,) = item.DerivationImageSequence[0].SourceImageSequence
        src = source.PerFrameFunctionalGroupsSequence[int(ref.ReferencedFrameNumber) - 1]
        np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in src.PlanePositionSequence[0].ImagePositionPatient], atol=1e-3)

    echoes, _ = write_dicom_series(tmp_path / "mese", _volume((3, 6, 7)), echoes=[(1, 10.0), (2, 25.0)])
    ok, why = can_write(read_image(enhanced(echoes, tmp_path / "mese.dcm")))
    assert not ok and "3 of the 6 frames" in why and "echo" in why


def _knee_labels(folder):
    return np.asarray(read_image(folder / "labels.nii.gz").array)


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")
def test_real_multi_echo_knee_as_one_file_runs_as_its_series(data_root, tmp_path):
    """The real 8-echo knee MESE (192 files) converted to one enhanced file: every echo reads as
    the series' echo, and the knee run gives the series' labels (the SEG is refused, with why)."""
    series = data_root / "knee" / "mese-t2-dicom"
    if not series.is_dir():
        pytest.skip(f"{series} not found")
    files = sorted(series.glob("*.dcm"))
    path = enhanced(files, tmp_path / "mese.dcm")
    for echo in (1, 8):
        a, b = read_image(series, echo=echo), read_image(path, echo=echo)
        assert b.array.shape == a.array.shape == (24, 256, 256)
        np.testing.assert_array_equal(b.array, a.array)
        _assert_same_geometry(b, a)
        assert b.meta["echo_time"] == a.meta["echo_time"] and b.meta["echoes"] == list(range(1, 9))
    for source, out in ((series, tmp_path / "series-out"), (path, tmp_path / "file-out")):
        assert cli.main(["run", "--task", "knee-bones", str(source), "-o", str(out)]) == 0
    np.testing.assert_array_equal(_knee_labels(tmp_path / "file-out"), _knee_labels(tmp_path / "series-out"))
    report = json.loads((tmp_path / "file-out" / "report.json").read_text())
    assert any("no DICOM-SEG written" in w and "24 of the 192 frames" in w for w in report["warnings"])
    assert (tmp_path / "series-out" / "segmentation.dcm").exists()
    assert not (tmp_path / "file-out" / "segmentation.dcm").exists()


def test_an_enhanced_file_keeps_its_frames_headers_once(tmp_path):
    files, _ = write_dicom_series(tmp_path / "s", _volume((3, 6, 7)))
    image = read_image(enhanced(files, tmp_path / "e.dcm"))
    assert image.meta["dicom_files"] == [str(tmp_path / "e.dcm")]
    (header,) = image.meta["dicom_headers"]
    assert "PixelData" not in header and int(header.NumberOfFrames) == 3
    frames = _frames(tmp_path / "e.dcm")
    assert sorted(frame for _, frame in image.meta["dicom_frames"]) == [1, 2, 3]
    for k, (where, frame) in enumerate(image.meta["dicom_frames"]):  # slice k is the frame at its position
        assert where == str(tmp_path / "e.dcm")
        position = [float(v) for v in frames[frame - 1].PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, image.ijk_to_lps_points([(0, 0, k)])[0], atol=2e-3)


def test_a_series_of_single_frame_files_and_an_enhanced_file_reads_whole(tmp_path):
    """Half of a series' slices as one enhanced file, the rest as single-frame files (a partial
    conversion): the slices interleave by position into the series; no DICOM-SEG, with the reason."""
    files, uid = write_dicom_series(tmp_path / "series", _volume((6, 6, 7)))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    datasets = [pydicom.dcmread(f) for f in files[::2]]
    for ds in datasets:
        ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
    LegacyConvertedEnhancedMRImage(datasets, series_instance_uid=uid, series_number=1, sop_instance_uid=generate_uid(),
                                   instance_number=1).save_as(mixed / "enhanced.dcm")
    for f in files[1::2]:
        (mixed / f.name).write_bytes(f.read_bytes())
    series, read = read_image(tmp_path / "series"), read_image(mixed)
    np.testing.assert_array_equal(read.array, series.array)
    _assert_same_geometry(read, series)
    assert [frame is None for _, frame in read.meta["dicom_frames"]] == [False, True] * 3
    ok, why = can_write(read)
    assert not ok and "come from 4 DICOM files, some of them multi-frame" in why


def test_where_pydicom_cannot_decode_gdcm_does_with_one_rescale_or_refuses(tmp_path, monkeypatch):
    """A transfer syntax pydicom has no decoder for (JPEG without its plugins: made so here) is
    decoded by GDCM, which applies one rescale to every frame: right when the frames share it,
    refused with the reason when they do not (GDCM would scale the others wrongly)."""
    import pydicom.pixels

    volume = _volume((4, 6, 7))
    files, _ = write_dicom_series(tmp_path / "s", volume, slope=2.0, intercept=-5.0)
    ds = pydicom.dcmread(enhanced(files, tmp_path / "e.dcm"))
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "shared.dcm")
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PixelValueTransformationSequence = copy.deepcopy(transform)
        item.PixelValueTransformationSequence[0].RescaleSlope = "2" if n else "3"
    ds.save_as(tmp_path / "varied.dcm")

    class NoDecoder:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoDecoder())
    image = read_image(tmp_path / "shared.dcm")
    np.testing.assert_allclose(image.array, read_image(tmp_path / "s").array)
    np.testing.assert_allclose(image.array, volume * 2.0 - 5.0)
    with pytest.raises(InputError, match="different rescale slopes/intercepts.*only GDCM decodes"):
        read_image(tmp_path / "varied.dcm")


def test_a_frame_with_its_own_pixel_spacing_is_refused(tmp_path):
    """Pixel measures per frame: a frame whose spacing is not the others' is named, not stacked on
    the first frame's spacing."""
    files, _ = write_dicom_series(tmp_path / "ser", _volume((4, 6, 7)))
    ds = pydicom.dcmread(enhanced(files, tmp_path / "one.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    del shared.PixelMeasuresSequence
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        own = pydicom.Dataset()
        own.PixelSpacing = ["0.9", "0.7"] if n == 2 else list(measures.PixelSpacing)
        own.SliceThickness = measures.SliceThickness
        item.PixelMeasuresSequence = [own]
    ds.save_as(tmp_path / "varied.dcm")
    with pytest.raises(InputError, match=r"different pixel spacings: .*varied\.dcm frame \d+ 0\.9 x 0\.7 mm"):
        read_image(tmp_path / "varied.dcm")


def test_magnitude_frames_are_the_image_whether_frame_type_or_complex_component_says_it(tmp_path):
    """One file holding magnitude and phase frames: the legacy converter carries ImageType into each
    frame's FrameType; a scanner's Enhanced MR says ComplexImageComponent. Either way the magnitude
    frames are the image, with a warning."""
    volume = _volume((4, 6, 7))
    magnitude, uid = write_dicom_series(tmp_path / "gre", volume, name="m",
                                        image_type=("ORIGINAL", "PRIMARY", "M", "ND"))
    phase, _ = write_dicom_series(tmp_path / "gre", -volume, name="p", series_uid=uid,
                                  image_type=("ORIGINAL", "PRIMARY", "P", "ND"))
    path = enhanced(magnitude + phase, tmp_path / "legacy.dcm", order=np.random.default_rng(1).permutation(8))
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:  # FrameType says nothing; ComplexImageComponent does
        kind = item.MRImageFrameTypeSequence[0]
        kind.ComplexImageComponent = "PHASE" if "P" in kind.FrameType else "MAGNITUDE"
        kind.FrameType = ["ORIGINAL", "PRIMARY", "OTHER", "NONE"]
    ds.save_as(tmp_path / "scanner.dcm")
    for name in ("legacy.dcm", "scanner.dcm"):
        image = read_image(tmp_path / name)
        np.testing.assert_array_equal(image.array, read_image(magnitude).array)
        assert image.meta["warnings"] == ["the series holds magnitude and phase images: the 4 magnitude images were "
                                          "used (4 phase left out)"], name
