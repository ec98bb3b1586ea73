"""The bad-input corpus: each case exits 2 with a message naming the file and the problem, and
leaves no output files. Runs the real CLI entry point in-process."""
import gzip

import numpy as np
import pytest

from SpineKneeSegLib import cli
from SpineKneeSegLib.image import Image
from SpineKneeSegLib.io import write_image
from SpineKneeSegLib.weights import initialise_weights
from test_io import write_dicom_series  # the DICOM writer the I/O tests use

pytestmark = pytest.mark.mrml


@pytest.fixture(scope="module")
def knee_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "knee.pt"
    initialise_weights("knee-bones", path, {"channels": (4, 8)})
    return path


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


CORPUS = {"empty": _empty, "nan": _nan, "truncated": _truncated, "truncated-gzip": _truncated_raw_gzip,
          "2d-to-3d-task": _two_d, "two-series": _two_series, "missing-slice": _missing_slice,
          "constant": _constant, "missing-file": _missing}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_input_exits_2_names_file_and_writes_nothing(case, tmp_path, capsys, knee_weights):
    paths, word = CORPUS[case](tmp_path)
    out = tmp_path / "out"
    code = cli.main(["run", "--task", "knee-bones", *map(str, paths), "-o", str(out), "--weights", str(knee_weights),
                     "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert paths[0].name in err and word.lower() in err.lower(), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial." in p.name]


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
