"""Image reading/writing: file round trips, synthetic DICOM series, bad inputs and real DICOM data.

All inputs are generated into tmp_path (no imaging files in the repository); the real-data tests
read ../shared/data (or $SPINEKNEESEG_DATA) and skip when it is absent.
"""
from __future__ import annotations

import gzip
import locale
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import (
    image_dimensionality,
    list_dicom_series,
    read_image,
    write_image,
)

# an oblique orientation: rotations about two axes, so no cosine is 0 or 1
_A, _B = np.radians(20.0), np.radians(-35.0)
_RX = np.array([[1, 0, 0], [0, np.cos(_A), -np.sin(_A)], [0, np.sin(_A), np.cos(_A)]])
_RZ = np.array([[np.cos(_B), -np.sin(_B), 0], [np.sin(_B), np.cos(_B), 0], [0, 0, 1]])
OBLIQUE = _RZ @ _RX
LEFT_HANDED = OBLIQUE @ np.diag([1.0, 1.0, -1.0])
# a sagittal acquisition (i posterior, j inferior, k toward patient left): what the knee model runs
# as acquired (an axial one, e.g. the identity direction, runs on sagittal reformats)
SAGITTAL = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]).T


# ==== helpers ========================================================================

def _volume(shape=(4, 6, 5), dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(shape)) * 7 % 1000).reshape(shape).astype(dtype)


def _assert_same_geometry(a: Image, b: Image, atol=1e-5):
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


def _ds(value: float) -> str:
    return f"{value:.10f}"[:16]  # DICOM DS holds at most 16 characters


def write_dicom_slice(path: Path, pixels: np.ndarray, *, series_uid: str, position, orientation,
                      pixel_spacing=(0.5, 0.7), echo: int | None = None, echo_time=None,
                      description="synthetic", instance=1, slope=None, intercept=None, series_number=1,
                      modality="MR", image_type=None):
    """One MR Image Storage file (``modality`` None: no Modality element). ``pixel_spacing`` is
    DICOM's (between rows, between columns)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    if modality is not None:
        ds.Modality = modality
    if image_type is not None:
        ds.ImageType = list(image_type)
    ds.PatientName = "Synthetic^Knee"
    ds.PatientID = "SYN001"
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    ds.SliceThickness = "1.0"
    if echo is not None:
        ds.EchoNumbers = echo
    if echo_time is not None:
        ds.EchoTime = _ds(echo_time)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept or 0)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, *, direction=OBLIQUE, origin=(10, -20, 30),
                       step=2.0, series_uid=None, skip=(), echoes=None, name="s", shear=0.0,
                       **kw):
    """Write ``volume[k]`` as slice k at origin + k * step * normal; file names are shuffled so the
    on-disk order says nothing; ``shear`` (mm per slice along the rows) mimics a gantry tilt.
    ``echoes``: list of (echo number, TE) -> one file per echo/slice,
    pixels offset by 1000 * echo number. Returns (file list, series uid)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    orientation = list(direction[:, 0]) + list(direction[:, 1])
    step_vector = step * direction[:, 2] + shear * direction[:, 0]
    jobs = [(k, e) for k in range(len(volume)) if k not in skip for e in (echoes or [(None, None)])]
    names = random.Random(len(jobs)).sample(range(len(jobs)), len(jobs))
    files = []
    for n, (k, (echo, te)) in zip(names, jobs):
        pixels = volume[k] + (1000 * echo if echo else 0)
        files.append(write_dicom_slice(
            folder / f"{name}{n:03d}.dcm", pixels, series_uid=series_uid,
            position=np.asarray(origin) + k * step_vector, orientation=orientation,
            echo=echo, echo_time=te, instance=n + 1, **kw))
    return files, series_uid


# ==== plain file round trips =========================================================

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("direction", [OBLIQUE, LEFT_HANDED], ids=["oblique", "left-handed"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_volume_round_trip(tmp_path, suffix, direction, dtype):
    img = Image(_volume(dtype=dtype), (0.3, 0.45, 1.5), (12.5, -80.25, 33.0), direction)
    path = tmp_path / f"vol{suffix}"
    write_image(img, path)
    back = read_image(path)
    np.testing.assert_array_equal(back.array, img.array)
    assert back.array.dtype == img.array.dtype
    _assert_same_geometry(back, img)
    assert back.is_right_handed == img.is_right_handed
    assert back.meta["source"] == str(path) and back.meta["is_dicom"] is False
    assert back.meta["warnings"] == []
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_nifti_and_nrrd_are_compressed(tmp_path):
    img = Image(np.zeros((20, 30, 40), np.int16))
    for suffix in (".nii.gz", ".nrrd"):
        write_image(img, tmp_path / f"z{suffix}")
        assert (tmp_path / f"z{suffix}").stat().st_size < img.array.nbytes / 10
    with gzip.open(tmp_path / "z.nii.gz") as f:
        assert len(f.read(400)) == 400  # really gzip


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip(tmp_path, dtype):
    array = (np.arange(35).reshape(1, 5, 7) * 7).astype(dtype)
    img = Image(array, (0.2, 0.3, 1.0))
    write_image(img, tmp_path / "x.png")
    back = read_image(tmp_path / "x.png")
    assert back.array.shape == (1, 5, 7) and back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.spacing[:2], (0.2, 0.3))
    assert image_dimensionality(back) == 2


def test_png_refuses_3d_or_float(tmp_path):
    with pytest.raises(InputError, match="x.png"):
        write_image(Image(np.zeros((2, 3, 4), np.uint8)), tmp_path / "x.png")
    with pytest.raises(InputError, match="x.png"):
        write_image(Image(np.zeros((1, 3, 4), np.float32)), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_rgb_png_is_read_as_luminance(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    img = read_image(tmp_path / "rgb.png")
    assert img.array.shape == (1, 4, 5) and img.array.dtype == np.uint8
    assert np.all(img.array == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50))


def test_single_slice_nifti_is_2d(tmp_path):
    write_image(Image(np.ones((1, 8, 9), np.float32), (0.1, 0.1, 1.0)), tmp_path / "xr.nii.gz")
    img = read_image(str(tmp_path / "xr.nii.gz"))
    assert img.array.shape == (1, 8, 9) and image_dimensionality(img) == 2
    assert image_dimensionality(Image(np.ones((3, 8, 9)))) == 3


def test_write_bool_and_unknown_suffix(tmp_path):
    mask = Image(np.eye(4, dtype=bool)[None])
    write_image(mask, tmp_path / "m.nrrd")
    assert read_image(tmp_path / "m.nrrd").array.dtype == np.uint8
    with pytest.raises(InputError, match="out.xyz"):
        write_image(mask, tmp_path / "out.xyz")


# ==== synthetic DICOM ================================================================

def _check_series(img: Image, volume, direction=OBLIQUE, origin=(10, -20, 30), step=2.0):
    np.testing.assert_array_equal(img.array, volume)
    # PixelSpacing (0.5 between rows, 0.7 between columns) -> spacing (i, j) = (0.7, 0.5)
    np.testing.assert_allclose(img.spacing, (0.7, 0.5, step), rtol=1e-6)
    np.testing.assert_allclose(img.origin, origin, atol=1e-6)
    np.testing.assert_allclose(img.direction, direction, atol=1e-6)
    last = img.ijk_to_lps_points([[0, 0, len(volume) - 1]])[0]
    expected_last = np.asarray(origin) + (len(volume) - 1) * step * direction[:, 2]
    np.testing.assert_allclose(last, expected_last, atol=1e-5)


def test_dicom_folder_sorted_by_position(tmp_path):
    volume = _volume((6, 4, 5))
    write_dicom_series(tmp_path / "ser", volume)
    img = read_image(tmp_path / "ser")
    _check_series(img, volume)
    assert img.meta["is_dicom"] and img.meta["modality"] == "MR" and img.meta["echo"] == 1
    assert img.meta["warnings"] == [] and len(img.meta["dicom_files"]) == 6


def test_explicit_shuffled_file_list_is_sorted(tmp_path):
    volume = _volume((5, 4, 5))
    files, _ = write_dicom_series(tmp_path / "ser", volume)
    random.Random(3).shuffle(files)
    _check_series(read_image([str(f) for f in files]), volume)


def test_sheared_series_keeps_exact_geometry(tmp_path):
    volume = _volume((5, 4, 5))
    files, _ = write_dicom_series(tmp_path, volume, shear=0.5)
    img = read_image(tmp_path)
    step_vector = 2.0 * OBLIQUE[:, 2] + 0.5 * OBLIQUE[:, 0]
    np.testing.assert_allclose(img.ijk_to_lps_points([[0, 0, 4]])[0],
                               np.array([10, -20, 30]) + 4 * step_vector, atol=1e-5)
    np.testing.assert_allclose(img.spacing[2], np.linalg.norm(step_vector), rtol=1e-6)
    (warning,) = img.meta["warnings"]
    assert "sheared" in warning


def test_a_slice_with_another_pixel_spacing_is_refused_not_given_the_first_ones(tmp_path):
    """The first slice's PixelSpacing is the volume's: a slice of another (a reformat or another FOV
    in one series) would have been stacked on the wrong pixel size without a word."""
    files, _ = write_dicom_series(tmp_path / "ser", _volume((5, 4, 5)))
    ds = pydicom.dcmread(files[2])
    ds.PixelSpacing = ["0.6", "0.7"]  # the series' own is 0.5 x 0.7
    ds.save_as(files[2])
    with pytest.raises(InputError, match=r"slices with different pixel spacings: .*0\.6 x 0\.7 mm") as caught:
        read_image(tmp_path / "ser")
    assert files[2].name in str(caught.value)
    ds.PixelSpacing = ["0.500000001", "0.7"]  # the same spacing written with more digits
    ds.save_as(files[2])
    np.testing.assert_allclose(read_image(tmp_path / "ser").spacing[:2], (0.7, 0.5), rtol=1e-6)


def test_magnitude_and_phase_in_one_series_read_as_the_magnitude(tmp_path):
    """A gradient-echo export with a phase image at every position (Siemens ImageType M / P, the
    Philips and GE words too): the magnitude images are the image, with a warning; before, the
    repeated positions were refused as "a multi-echo, dynamic or diffusion series?"."""
    volume = _volume((5, 6, 7))
    _, uid = write_dicom_series(tmp_path / "gre", volume, name="m", image_type=("ORIGINAL", "PRIMARY", "M", "ND"))
    write_dicom_series(tmp_path / "gre", -volume, name="p", series_uid=uid,
                       image_type=("ORIGINAL", "PRIMARY", "P", "ND"))
    image = read_image(tmp_path / "gre")
    _check_series(image, volume)
    (warning,) = image.meta["warnings"]
    assert "magnitude and phase images: the 5 magnitude images were used (5 phase left out)" in warning
    assert len(image.meta["dicom_files"]) == 5
    phase_only = tmp_path / "phase"
    write_dicom_series(phase_only, volume, image_type=("ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"))
    with pytest.raises(InputError, match="holds only phase images .*no magnitude image to segment"):
        read_image(phase_only)


def test_a_dixon_export_in_one_series_is_refused_naming_its_image_types(tmp_path):
    volume = _volume((4, 6, 7))
    _, uid = write_dicom_series(tmp_path / "dixon", volume, name="w", image_type=("ORIGINAL", "PRIMARY", "W", "DIXON"))
    write_dicom_series(tmp_path / "dixon", volume, name="f", series_uid=uid,
                       image_type=("ORIGINAL", "PRIMARY", "F", "DIXON"))
    with pytest.raises(InputError, match=r"images of 2 types \(ORIGINAL/PRIMARY/F/DIXON; ORIGINAL/PRIMARY/W/DIXON\) "
                                         r"in one series: a Dixon"):
        read_image(tmp_path / "dixon")


def test_single_dicom_file(tmp_path):
    volume = _volume((3, 4, 5))
    files, _ = write_dicom_series(tmp_path / "ser", volume)
    img = read_image(files[0])
    assert img.array.shape == (1, 4, 5) and image_dimensionality(img) == 2
    np.testing.assert_allclose(img.direction, OBLIQUE, atol=1e-6)


def test_dicom_rescale_is_applied(tmp_path):
    volume = _volume((3, 4, 5))
    write_dicom_series(tmp_path / "ser", volume, slope=2.5, intercept=-10)
    img = read_image(tmp_path / "ser")
    np.testing.assert_allclose(img.array, volume * 2.5 - 10)


def test_a_truncated_file_of_a_rescaled_series_is_named(tmp_path):
    """Rescaled slices are decoded by GDCM on worker threads: a file it cannot decode is still named."""
    files, _ = write_dicom_series(tmp_path / "ser", _volume((5, 40, 50)), slope=2.5, intercept=-10)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 500])
    with pytest.raises(InputError, match=f"{files[3].name}: cannot read DICOM pixel data"):
        read_image(tmp_path / "ser")


def test_two_series_need_a_choice(tmp_path):
    _, uid_a = write_dicom_series(tmp_path, _volume((3, 4, 5)), description="first", name="a")
    _, uid_b = write_dicom_series(tmp_path, _volume((4, 4, 5)), description="second", name="b")
    with pytest.raises(InputError) as err:
        read_image(tmp_path)
    message = str(err.value)
    assert uid_a in message and uid_b in message and "--series" in message
    assert "3 files" in message and "4 files" in message and str(tmp_path) in message
    assert read_image(tmp_path, series=uid_b).array.shape == (4, 4, 5)
    listed = {s["uid"]: s for s in list_dicom_series(tmp_path)}
    assert listed[uid_a]["files"] == 3 and listed[uid_b]["description"] == "second"
    with pytest.raises(InputError, match="no DICOM series matches"):
        read_image(tmp_path, series="1.2.3.4")


def test_a_series_is_chosen_by_uid_number_or_description(tmp_path):
    """A cohort's PACS exports share series numbers and descriptions, not UIDs."""
    _, localiser = write_dicom_series(tmp_path, _volume((3, 4, 5)), description="3-plane Loc", name="a",
                                      series_number=1)
    _, t2 = write_dicom_series(tmp_path, _volume((5, 4, 5)), description="Sag T2 FSE", name="b", series_number=4)
    _, t1 = write_dicom_series(tmp_path, _volume((4, 4, 5)), description="Sag T1 FSE", name="c", series_number=5)
    for choice, uid in [(t2, t2), ("4", t2), (" 5 ", t1), (" sag t2 fse ", t2), ("*T1*", t1), ("3-plane loc", localiser),
                        ("sag t? fse", None)]:
        if uid is None:
            with pytest.raises(InputError, match=r"2 DICOM series match 'sag t\? fse'") as err:
                read_image(tmp_path, series=choice)
            assert t1 in str(err.value) and t2 in str(err.value) and localiser not in str(err.value)
            assert "by its UID" in str(err.value) and str(tmp_path) in str(err.value)
            continue
        assert read_image(tmp_path, series=choice).meta["series_uid"] == uid, choice
    for missing in ("7", "axial*", "1.2.3.4"):
        with pytest.raises(InputError, match="no DICOM series matches") as err:
            read_image(tmp_path, series=missing)
        assert "number 4, 'Sag T2 FSE'" in str(err.value)


def test_missing_slice_is_refused(tmp_path):
    write_dicom_series(tmp_path / "ser", _volume((6, 4, 5)), skip=(3,))
    with pytest.raises(InputError, match=r"missing or uneven slices: gap of 4 mm .* median "
                                         r"spacing 2 mm") as err:
        read_image(tmp_path / "ser")
    assert "ser" in str(err.value)


def test_duplicate_positions_are_refused(tmp_path):
    volume = _volume((3, 4, 5))
    write_dicom_series(tmp_path / "ser", volume, name="a", series_uid="1.2.3.9")
    write_dicom_series(tmp_path / "ser", volume, name="b", series_uid="1.2.3.9")
    with pytest.raises(InputError, match="duplicate slice position"):
        read_image(tmp_path / "ser")


def test_multi_echo_series_is_split(tmp_path):
    volume = _volume((4, 4, 5))
    echoes = [(1, 10.0), (2, 20.0), (3, 30.0)]
    write_dicom_series(tmp_path / "mese", volume, echoes=echoes)
    img = read_image(tmp_path / "mese")
    _check_series(img, volume + 1000)
    assert img.meta["echo"] == 1 and img.meta["echoes"] == [1, 2, 3]
    (warning,) = img.meta["warnings"]
    assert "multi-echo series with 3 echoes" in warning and "--echo" in warning
    second = read_image(tmp_path / "mese", echo=2)
    _check_series(second, volume + 2000)
    assert second.meta["echo_time"] == 20.0 and second.meta["warnings"] == []
    with pytest.raises(InputError, match="echo 4 not available"):
        read_image(tmp_path / "mese", echo=4)
    assert list_dicom_series(tmp_path / "mese")[0]["echoes"] == [1, 2, 3]


def test_multi_echo_without_echo_numbers_splits_by_echo_time(tmp_path):
    volume = _volume((3, 4, 5))
    files, _ = write_dicom_series(tmp_path / "mese", volume, echoes=[(1, 10.0), (2, 25.0)])
    for f in files:  # keep EchoTime only
        ds = pydicom.dcmread(f)
        del ds.EchoNumbers
        ds.save_as(f)
    img = read_image(tmp_path / "mese", echo=2)
    _check_series(img, volume + 2000)
    assert img.meta["echo_time"] == 25.0


# ==== bad inputs =====================================================================

def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="nothere.nii.gz"):
        read_image(tmp_path / "nothere.nii.gz")


def test_empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="empty.nii.gz.*empty"):
        read_image(tmp_path / "empty.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    write_image(Image(np.random.default_rng(0).random((10, 20, 30), dtype=np.float32)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"cut{suffix}"):
        read_image(path)


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_non_finite_voxels(tmp_path, bad, word):
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3] = bad
    write_image(Image(array), tmp_path / "bad.nii.gz")
    with pytest.raises(InputError, match=f"bad.nii.gz.*contains {word}"):
        read_image(tmp_path / "bad.nii.gz")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no DICOM") as err:
        read_image(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_unknown_format(tmp_path):
    (tmp_path / "scan.xyz").write_text("hello")
    with pytest.raises(InputError, match="scan.xyz.*unknown image format"):
        read_image(tmp_path / "scan.xyz")


def test_non_dicom_in_file_list(tmp_path):
    files, _ = write_dicom_series(tmp_path, _volume((3, 4, 5)))
    (tmp_path / "junk.dcm").write_text("junk")
    with pytest.raises(InputError, match="junk.dcm"):
        read_image(files + [tmp_path / "junk.dcm"])


def test_truncated_dicom_in_folder(tmp_path):
    files, _ = write_dicom_series(tmp_path, _volume((3, 40, 50)))
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 500])
    with pytest.raises(InputError, match=files[1].name):
        read_image(tmp_path)


# ==== real data ======================================================================

def _knee(name: str) -> Path:
    root = data_root()
    folder = root / "knee" / name if root else None
    if folder is None or not folder.is_dir():
        pytest.skip(f"real data folder knee/{name} not found (set SPINEKNEESEG_DATA or provide "
                    "../shared/data)")
    return folder


@pytest.fixture(scope="module")
def dess():
    folder = _knee("dess-dicom")
    return folder, read_image(folder)


@pytest.mark.data
def test_real_dess_geometry_matches_headers(dess):
    folder, img = dess
    assert img.array.shape == (80, 512, 512)
    np.testing.assert_allclose(img.spacing, (0.3125, 0.3125, 1.5), atol=1e-3)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    positions = sorted((np.array(h.ImagePositionPatient, dtype=float) for h in headers),
                       key=lambda p: p @ normal)
    np.testing.assert_allclose(img.origin, positions[0], atol=1e-4)
    np.testing.assert_allclose(img.ijk_to_lps_points([[0, 0, 79]])[0], positions[-1], atol=1e-4)
    np.testing.assert_allclose(img.direction[:, 0], iop[:3], atol=1e-6)
    np.testing.assert_allclose(img.direction[:, 1], iop[3:], atol=1e-6)
    assert img.meta["warnings"] == [] and img.meta["modality"] == "MR"
    assert img.is_right_handed


@pytest.mark.data
def test_real_dess_missing_middle_file(tmp_path):
    folder = _knee("dess-dicom")
    files = sorted(folder.iterdir())
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    middle = sorted(files, key=lambda f: float(headers[f].SliceLocation))[40]
    for f in files:
        if f != middle:
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(InputError, match="missing or uneven slices") as err:
        read_image(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.data
@pytest.mark.data
def test_real_series_chosen_by_number_or_description_from_a_mixed_folder(tmp_path):
    """The DESS (series 5) and MESE (series 8, 8 echoes) exports in one folder, as a PACS export
    of the study would give them."""
    for name in ("dess-dicom", "mese-t2-dicom"):
        for f in _knee(name).iterdir():
            (tmp_path / f"{name}-{f.name}").symlink_to(f)
    with pytest.raises(InputError, match="2 DICOM series found") as err:
        read_image(tmp_path)
    assert "number 5, 'Sag DESS" in str(err.value) and "number 8, 'T2MAP'" in str(err.value)
    assert read_image(tmp_path, series="5").array.shape == (80, 512, 512)
    assert read_image(tmp_path, series="*dess*").array.shape == (80, 512, 512)
    mese = read_image(tmp_path, series="t2map", echo=3)
    assert mese.array.shape == (24, 256, 256) and mese.meta["echo"] == 3


def test_real_mese_multi_echo():
    folder = _knee("mese-t2-dicom")
    first = read_image(folder)
    assert first.array.shape == (24, 256, 256)
    np.testing.assert_allclose(first.spacing, (0.625, 0.625, 4.0), atol=1e-3)
    (warning,) = first.meta["warnings"]
    assert "8 echoes" in warning and "using echo 1" in warning and "--echo" in warning
    last = read_image(folder, echo=8)
    assert last.array.shape == (24, 256, 256) and last.meta["echo"] == 8
    assert last.meta["echo_time"] > first.meta["echo_time"]
    assert last.same_geometry(first)
    assert last.array.mean() < first.array.mean()  # T2 decay: later echoes are darker
    with pytest.raises(InputError, match="echo 9 not available"):
        read_image(folder, echo=9)


@pytest.mark.data
@pytest.mark.parametrize("compression", ["jpeg-lossless", "rle"])
def test_real_dess_compressed_as_a_pacs_exports_it_reads_the_same(dess, tmp_path, compression):
    """The DESS transcoded slice by slice (JPEG lossless by GDCM, the usual PACS export; RLE by
    pydicom), headers kept: the same voxels and geometry as the uncompressed series."""
    from pydicom.uid import JPEGLosslessSV1, RLELossless

    folder, plain = dess
    saved = locale.setlocale(locale.LC_ALL)
    try:
        for f in sorted(folder.iterdir()):
            if compression == "rle":
                ds = pydicom.dcmread(f)
                ds.compress(RLELossless)
                ds.save_as(tmp_path / f.name)
            else:
                writer = sitk.ImageFileWriter()
                writer.SetImageIO("GDCMImageIO")
                writer.KeepOriginalImageUIDOn()
                writer.SetUseCompression(True)
                writer.SetCompressor("JPEG")
                writer.SetFileName(str(tmp_path / f.name))
                writer.Execute(sitk.ReadImage(str(f)))
    finally:  # ITK's GDCM writer leaves the C locale set: open() would then default to ASCII
        locale.setlocale(locale.LC_ALL, saved)
    syntax = pydicom.dcmread(next(tmp_path.iterdir()), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax == (RLELossless if compression == "rle" else JPEGLosslessSV1)
    image = read_image(tmp_path)
    np.testing.assert_array_equal(image.array, plain.array)
    assert image.array.dtype == plain.array.dtype and image.same_geometry(plain)
    assert image.meta["warnings"] == []


def _scan(folder: Path):
    from SpineKneeSegLib.core import image_io

    return image_io._scan_folder(folder)


def _both_pixel_paths(folder: Path):
    """(slices, the file-offset read, GDCM's read); the offset read is also checked against
    pydicom's pixel_array (the plain path before it), value for value and type."""
    from SpineKneeSegLib.core import image_io

    slices = _scan(folder)
    assert all(s.stored is not None for s in slices)  # the offset read is the one compared
    fast = image_io._read_dicom_pixels(slices)
    for s in slices:
        s.stored = None
    by_pydicom = image_io._read_dicom_pixels(slices)
    assert fast.dtype == by_pydicom.dtype and np.array_equal(fast, by_pydicom)
    for s in slices:
        s.plain_pixels = False
    return slices, fast, image_io._read_dicom_pixels(slices)


def test_plain_dicom_pixels_read_by_numpy_equal_gdcm(tmp_path):
    """The file-offset path for plain stored integers gives pydicom's and GDCM's values and type,
    voxel for voxel; a rescaled series is never plain."""
    volume = _volume((3, 4, 5)) - 50  # negative values: signed pixels
    write_dicom_series(tmp_path / "plain", volume)
    slices, fast, gdcm = _both_pixel_paths(tmp_path / "plain")
    assert all(s.plain_pixels for s in _scan(tmp_path / "plain"))
    assert fast.dtype == gdcm.dtype and np.array_equal(fast, gdcm)
    write_dicom_series(tmp_path / "rescaled", volume, slope=2.5, intercept=-10)
    assert not any(s.plain_pixels for s in _scan(tmp_path / "rescaled"))


@pytest.mark.parametrize("layout", ["8-bit odd", "16-bit unsigned implicit VR", "large", "16-bit signed big endian"])
def test_plain_dicom_layouts_read_from_the_file_offset(tmp_path, layout):
    """8-bit pixels with an odd count (PixelData padded to even length), implicit VR, a slice
    whose PixelData is over the header pass's deferral size (skipped, read from its offset), and
    explicit VR big endian (retired, yet the real knee MESE is stored so): values, not swapped bytes."""
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    shape = {"8-bit odd": (2, 3, 5), "16-bit unsigned implicit VR": (2, 4, 5), "large": (2, 64, 48),
             "16-bit signed big endian": (2, 40, 30)}[layout]
    values = _volume(shape) % 200 - (100 if layout.endswith("big endian") else 0)  # negatives: the sign bit
    files, _ = write_dicom_series(tmp_path / "s", values)
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        if layout == "8-bit odd":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = pixels.astype(np.uint8).tobytes() + b"\0"
        elif layout.startswith("16-bit unsigned"):
            ds.PixelRepresentation = 0
            ds.PixelData = (pixels.astype(np.int32) + 40000).astype("<u2").tobytes()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif layout.endswith("big endian"):
            ds.PixelData = pixels.astype(">i2").tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            pydicom.dcmwrite(path, ds, little_endian=False, implicit_vr=False, enforce_file_format=True)
            continue
        ds.save_as(path, enforce_file_format=True)
    slices, fast, gdcm = _both_pixel_paths(tmp_path / "s")
    assert fast.dtype == gdcm.dtype and np.array_equal(fast, gdcm) and fast.shape == shape
    assert fast.dtype.isnative
    if layout.startswith("16-bit unsigned"):
        assert fast.min() >= 40000
    if layout.endswith("big endian"):
        assert fast.min() == -100 and np.array_equal(np.sort(fast, axis=None), np.sort(values, axis=None))


def test_plain_dicom_pixels_on_the_real_knee_series():
    from SpineKneeSegLib.core.datasets import data_root

    root = data_root()
    if root is None or not (root / "knee" / "dess-dicom").exists():
        pytest.skip("shared knee DICOM series not available (../shared/data)")
    slices, fast, gdcm = _both_pixel_paths(root / "knee" / "dess-dicom")
    assert len(slices) == 80 and fast.dtype == gdcm.dtype and np.array_equal(fast, gdcm)
    # the MESE, explicit VR big endian: 192 files, every echo's slices
    slices, fast, gdcm = _both_pixel_paths(root / "knee" / "mese-t2-dicom")
    assert len(slices) == 192 and fast.dtype == gdcm.dtype == np.int16 and np.array_equal(fast, gdcm)


def test_plain_dicom_with_truncated_pixels_names_the_file(tmp_path):
    files, _ = write_dicom_series(tmp_path / "ser", _volume((3, 4, 5)))
    data = files[1].read_bytes()
    files[1].write_bytes(data[:-15])
    with pytest.raises(InputError, match=files[1].name):
        read_image(tmp_path / "ser")


@pytest.mark.parametrize("signed", [0, 1])
def test_plain_dicom_12_bit_stored_values_equal_gdcm(tmp_path, signed):
    """12 bits stored in 16: the offset read (as pydicom) sign-extends and masks the unused high
    bits as GDCM does."""
    files, _ = write_dicom_series(tmp_path / "s", _volume((2, 4, 5)))
    raw = np.array([[0x0FFF, 0x0800, 0x07FF, 0xF001, 0x0001]] * 4, np.uint16)  # -1, -2048, 2047, garbage, 1
    for path in files:
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
        ds.PixelData = raw.astype("<u2").tobytes()
        ds.save_as(path)
    assert all(s.plain_pixels for s in _scan(tmp_path / "s"))  # the numpy path is the one compared
    slices, fast, gdcm = _both_pixel_paths(tmp_path / "s")
    assert fast.dtype == gdcm.dtype and np.array_equal(fast, gdcm)
    assert fast[0, 0, 3] == 1 and (fast[0, 0, 0] == -1 if signed else fast[0, 0, 0] == 4095)
