"""The bad-input corpus: each case exits 2 with a message naming the file and the problem, and
leaves no output files. Runs the real CLI entry point in-process."""
import gzip
from pathlib import Path

import numpy as np
import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.errors import printable
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import write_image
from test_io import write_dicom_series  # the DICOM writer the I/O tests use

pytestmark = pytest.mark.mrml


def _volume(tmp_path, name="scan.nii.gz", shape=(24, 32, 32)):
    rng = np.random.default_rng(0)
    path = tmp_path / name
    write_image(Image(rng.normal(100, 20, shape).astype(np.float32), spacing=(0.5, 0.5, 3.0)), path)
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    return [path], "empty"


def _nan(tmp_path):
    arr = np.ones((8, 32, 32), np.float32)
    arr[3, 4, 5] = np.nan
    path = tmp_path / "nan.nii.gz"
    write_image(Image(arr), path)
    return [path], "NaN"


def _truncated(tmp_path):
    full = _volume(tmp_path, "full.nii.gz", (16, 64, 64)).read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(full[: len(full) // 2])
    return [path], "truncat"


def _truncated_raw_gzip(tmp_path):
    raw = gzip.decompress(_volume(tmp_path, "full2.nii.gz").read_bytes())
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw[: len(raw) - 1000]))
    return [path], "truncat"


def _two_d(tmp_path):
    path = tmp_path / "radiograph.png"
    write_image(Image((np.arange(64 * 64).reshape(1, 64, 64) % 255).astype(np.uint8)), path)
    return [path], "2D"


def _two_series(tmp_path):
    folder = tmp_path / "dicom"
    vol = (np.arange(6 * 32 * 32).reshape(6, 32, 32) % 300).astype(np.int16)
    write_dicom_series(folder, vol, name="a")
    write_dicom_series(folder, vol, name="b")
    return [folder], "series"


def _missing_slice(tmp_path):
    folder = tmp_path / "gap"
    vol = (np.arange(8 * 32 * 32).reshape(8, 32, 32) % 300).astype(np.int16)
    write_dicom_series(folder, vol, skip=(4,))
    return [folder], "slice"


def _constant(tmp_path):
    path = tmp_path / "constant.nii.gz"
    write_image(Image(np.full((8, 32, 32), 7.0, np.float32)), path)
    return [path], "constant"


def _missing(tmp_path):
    return [tmp_path / "does-not-exist.nii.gz"], "no such file"


def _zero_pixdim(tmp_path):
    """A NIfTI without spacing (pixdim 0): ITK would read it as 1 mm (issue 27)."""
    import struct

    raw = bytearray(gzip.decompress(_volume(tmp_path, "spaced.nii.gz").read_bytes()))
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    path = tmp_path / "nospacing.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    return [path], "pixdim"


def _sheared_nrrd(tmp_path):
    """A sheared grid (non-orthogonal axes): outputs on an orthogonal grid would miss its voxels."""
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    img = sitk.GetImageFromArray(rng.normal(100, 20, (24, 32, 32)).astype(np.float32))
    img.SetSpacing((0.5, 0.5, 3.0))
    shear = np.radians(5.0)
    img.SetDirection((1.0, 0.0, float(np.sin(shear)), 0.0, 1.0, 0.0, 0.0, 0.0, float(np.cos(shear))))
    path = tmp_path / "sheared.nrrd"
    sitk.WriteImage(img, str(path))
    return [path], "not orthogonal"


def _dicom_without_pixel_spacing(tmp_path):
    import pydicom

    folder = tmp_path / "nospacing"
    vol = (np.arange(8 * 32 * 32).reshape(8, 32, 32) % 300).astype(np.int16)
    files, _ = write_dicom_series(folder, vol)
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.PixelSpacing
        ds.save_as(f)
    return [folder], "PixelSpacing"


def _gantry_tilt(tmp_path):
    folder = tmp_path / "tilted"
    vol = (np.arange(8 * 32 * 32).reshape(8, 32, 32) % 300).astype(np.int16)
    write_dicom_series(folder, vol, shear=0.5)
    return [folder], "not orthogonal"


def _latin1_name(tmp_path):
    """A valid scan whose file name is Latin-1 bytes (an older system's share) on a UTF-8 system:
    Python holds it with surrogates, and ITK aborted the process (SIGABRT) on such a name."""
    import os

    path = _volume(tmp_path, "valid.nii.gz")
    named = Path(os.fsdecode(os.fsencode(tmp_path) + b"/gen\xe8ve.nii.gz"))
    path.rename(named)
    return [named], "not UTF-8"


CORPUS = {"empty": _empty, "nan": _nan, "truncated": _truncated, "truncated-gzip": _truncated_raw_gzip,
          "2d-to-3d-task": _two_d, "two-series": _two_series, "missing-slice": _missing_slice,
          "constant": _constant, "missing-file": _missing, "zero-pixdim": _zero_pixdim,
          "sheared-nrrd": _sheared_nrrd, "gantry-tilt": _gantry_tilt,
          "dicom-without-pixel-spacing": _dicom_without_pixel_spacing, "latin-1-file-name": _latin1_name}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_input_exits_2_names_file_and_writes_nothing(case, tmp_path, capsys, knee_weights):
    paths, word = CORPUS[case](tmp_path)
    out = tmp_path / "out"
    code = cli.main(["run", "--task", "knee-bones", *map(str, paths), "-o", str(out), "--weights", str(knee_weights),
                     "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert printable(paths[0].name) in err and word.lower() in err.lower(), err  # an undecodable name as \xNN
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial." in p.name]


def test_huge_intensities_give_the_same_labels_as_the_unscaled_image(tmp_path, knee_weights):
    """A valid float image scaled by 1e30: float32 statistics would overflow and zero the image."""
    from SpineKneeSegLib.core.image_io import read_image

    base = _volume(tmp_path, "base.nii.gz")
    image = read_image(base)
    write_image(image.with_array(image.array * np.float32(1e30)), tmp_path / "huge.nii.gz")
    labels = []
    for name in ("base.nii.gz", "huge.nii.gz"):
        out = tmp_path / f"out-{name}"
        assert cli.main(["run", "--task", "knee-bones", str(tmp_path / name), "-o", str(out), "--weights",
                         str(knee_weights), "--progress", "none"]) == 0
        labels.append(read_image(out / "labels.nii.gz").array)
    assert labels[0].any()
    assert np.mean(labels[0] == labels[1]) > 0.999


def test_bad_input_is_reported_before_missing_weights(tmp_path, capsys):
    """Inputs are validated before weights are looked up: bad input still exits 2."""
    paths, _ = _nan(tmp_path)
    assert cli.main(["run", "--task", "brain-wmh", str(paths[0]), "-o", str(tmp_path / "o")]) == 2


def test_three_d_volume_to_the_xray_task(tmp_path, capsys):
    path = _volume(tmp_path)
    assert cli.main(["run", "--task", "xray-femur", str(path), "-o", str(tmp_path / "o")]) == 2
    assert "needs a single 2D image" in capsys.readouterr().err


def test_unwritable_output(tmp_path, capsys, knee_weights):
    path = _volume(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = cli.main(["run", "--task", "knee-bones", str(path), "-o", str(blocker / "out"),
                     "--weights", str(knee_weights)])
    err = capsys.readouterr().err
    assert code == 2 and "a-file" in err and "not a folder" in err
    assert blocker.read_text() == "not a folder"


def test_bad_weights_file(tmp_path, capsys):
    path = _volume(tmp_path)
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"garbage")
    assert cli.main(["run", "--task", "knee-bones", str(path), "-o", str(tmp_path / "o"),
                     "--weights", str(weights)]) == 2
    assert "model.pt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_weights_of_another_task(tmp_path, capsys, knee_weights):
    path = _volume(tmp_path)
    assert cli.main(["run", "--task", "brain-wmh", str(path), "-o", str(tmp_path / "o"),
                     "--weights", str(knee_weights), "--skull-stripped", "yes"]) == 2
    assert "knee-bones" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--task", "no-such-task", "x", "-o", "y"])
    assert exc.value.code == 2
    assert cli.main(["run", "--task", "knee-bones", "-o", "y"]) == 2


# ---- 2D (X-ray) inputs -----------------------------------------------------------------------

def _xray_3d(tmp_path):
    return [_volume(tmp_path, "ct.nii.gz", (12, 64, 64))], "3D volume with 12 slices"


def _xray_tiny(tmp_path):
    path = tmp_path / "tiny.png"
    write_image(Image((np.arange(64).reshape(1, 8, 8) * 3).astype(np.uint8)), path)
    return [path], "8x8 pixels"


def _xray_constant_16bit(tmp_path):
    path = tmp_path / "flat16.png"
    write_image(Image(np.full((1, 64, 64), 40000, np.uint16)), path)
    return [path], "constant"


def _xray_corrupt_png(tmp_path):
    good = tmp_path / "good.png"
    write_image(Image((np.arange(64 * 64).reshape(1, 64, 64) % 251).astype(np.uint8)), good)
    path = tmp_path / "broken.png"
    path.write_bytes(good.read_bytes()[:60])
    return [path], "cannot read png"


def _xray_multiframe(tmp_path):
    folder = tmp_path / "series"
    write_dicom_series(folder, (np.arange(5 * 32 * 32).reshape(5, 32, 32) % 300).astype(np.int16))
    return [folder], "3D volume with 5 slices"


XRAY_CORPUS = {"3d-volume": _xray_3d, "too-small": _xray_tiny, "constant-16bit": _xray_constant_16bit,
               "corrupt-png": _xray_corrupt_png, "dicom-series": _xray_multiframe}


@pytest.mark.parametrize("case", sorted(XRAY_CORPUS))
def test_bad_xray_input_exits_2_names_file_and_writes_nothing(case, tmp_path, capsys, xray_weights):
    paths, words = XRAY_CORPUS[case](tmp_path)
    out = tmp_path / "out"
    code = cli.main(["run", "--task", "xray-femur", *map(str, paths), "-o", str(out), "--weights", str(xray_weights),
                     "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert paths[0].name in err and words.lower() in err.lower(), err
    assert not out.exists()


def test_pixel_mm_on_a_volume_or_non_positive(tmp_path, capsys, xray_weights):
    path = _volume(tmp_path)
    assert cli.main(["run", "--task", "xray-femur", str(path), "-o", str(tmp_path / "o"), "--pixel-mm", "0.2"]) == 2
    assert "2D images" in capsys.readouterr().err
    png, _ = _xray_tiny(tmp_path)
    assert cli.main(["run", "--task", "xray-femur", str(png[0]), "-o", str(tmp_path / "o"), "--pixel-mm", "-1"]) == 2
    assert "must be positive" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_rgb_png_runs_as_grey_with_a_warning(tmp_path, xray_weights):
    from PIL import Image as PILImage

    grey = (np.add.outer(np.arange(96), np.arange(128)) % 256).astype(np.uint8)
    PILImage.fromarray(np.stack([grey, grey, grey], -1)).save(tmp_path / "rgb.png")
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "xray-femur", str(tmp_path / "rgb.png"), "-o", str(out), "--weights",
                     str(xray_weights), "--progress", "none"]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["inputs"][0]["shape_kji"] == [1, 96, 128]
    assert any("converted to grey" in w for w in report["warnings"])


def test_full_disk_is_exit_2_with_the_reason_and_the_folder(tmp_path, capsys, knee_weights, monkeypatch):
    """A full disk cannot be made here: the writer's failure (as VTK reports it) and the free space
    are simulated. The run must exit 2 with the operating system's reason and the output folder,
    not exit 1 with the writer's message, and leave nothing behind."""
    import collections
    import shutil

    from SpineKneeSegLib.core.errors import SpineKneeSegError
    from SpineKneeSegLib.engine import pipeline

    def failing_writer(*_args, **_kw):
        raise SpineKneeSegError("out/.x.partial/foramina.mrk.json: writing vtkMRMLMarkupsFiducialNode 'F' failed")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline, "write_outputs", failing_writer)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10 << 30, 10 << 30, 0))
    out = tmp_path / "out"
    code = cli.main(["run", "--task", "knee-bones", str(_volume(tmp_path)), "-o", str(out), "--weights",
                     str(knee_weights), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "No space left on device" in err and str(out) in err and "vtkMRML" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial." in p.name]


def test_a_genuine_bug_is_exit_1_and_asks_for_a_report(tmp_path, capsys, knee_weights, monkeypatch):
    from SpineKneeSegLib.engine import pipeline

    def broken(*_args, **_kw):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "write_outputs", broken)
    code = cli.main(["run", "--task", "knee-bones", str(_volume(tmp_path)), "-o", str(tmp_path / "out"), "--weights",
                     str(knee_weights), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "internal error" in err and "please report" in err and "ZeroDivisionError" in err


def _latin1(folder: Path, name: bytes) -> Path:
    import os

    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


def test_an_output_folder_name_that_is_not_utf8_is_refused(tmp_path, capsys, knee_weights):
    scan = _volume(tmp_path)
    out = _latin1(tmp_path, b"r\xe9sultats")
    code = cli.main(["run", "--task", "knee-bones", str(scan), "-o", str(out), "--weights", str(knee_weights),
                     "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "r\\xe9sultats: this file or folder name cannot be opened" in err and "not UTF-8" in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [scan.name]


def test_a_cohort_goes_on_past_a_scan_whose_name_is_not_utf8(tmp_path, capsys, knee_weights):
    """A folder of scans, one named in Latin-1: that case fails with the reason, the other is
    done, the tables are written (the name as \\xNN), and a second run adds no second row."""
    scans = tmp_path / "scans"
    scans.mkdir()
    _volume(scans, "good.nii.gz")
    _volume(scans, "other.nii.gz").rename(_latin1(scans, b"gen\xe8ve.nii.gz"))
    out = tmp_path / "out"
    for _ in range(2):
        code = cli.main(["run", "--task", "knee-bones", "--manifest", str(scans), "-o", str(out),
                         "--weights", str(knee_weights), "--progress", "none"])
        assert code != 0  # a case failed
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    assert sorted((r[0], r[1]) for r in rows) == [("gen\\xe8ve", "failed"), ("good", "skipped")]
    assert "cannot be opened" in dict((r[0], r[3]) for r in rows)["gen\\xe8ve"]
    assert (out / "good" / "labels.nii.gz").is_file()
    assert "gen\\xe8ve" in (out / "review.html").read_text(encoding="utf-8")


def test_a_non_ascii_name_under_an_ascii_locale_is_refused_not_a_crash(tmp_path, knee_weights):
    """The C locale with Python's UTF-8 coercion off: argv's non-ASCII bytes arrive as surrogates,
    and ITK aborted the process on them (SIGABRT); now exit 2 with the way out."""
    import os
    import subprocess
    import sys

    scan = _volume(tmp_path, "Zoë.nii.gz")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", "knee-bones", str(scan),
                           "-o", str(tmp_path / "out"), "--weights", str(knee_weights), "--progress", "none"],
                          capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert "cannot be opened" in err and "PYTHONUTF8=1" in err and "Zo\\xeb.nii.gz" in err
    assert not (tmp_path / "out").exists()
