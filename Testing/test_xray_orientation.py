"""A DICOM radiograph stored turned or mirrored, whose PatientOrientation says so, reaches the
X-ray networks upright (head up, patient right on the image's left), and its labels come back onto
the stored pixels (tasks/xray/orientation.py). Before, it went to the network as stored: a mirrored
chest had its lungs' names swapped, a turned one gave labels that looked like nothing. Tested with
a real JSRT radiograph written as DICOM CR in all eight ways a 2D image can lie, through the CLI
and the shipped chest model."""
import json
from pathlib import Path

import numpy as np
import pytest
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.preprocessing import Orientation, canonical_orientation, radiograph_display
from SpineKneeSegLib.tasks.xray.orientation import how_stored, radiograph_orientation
from test_xray import write_radiograph_dicom

JSRT = (data_root() or Path("/nonexistent")) / "xray" / "jsrt-scr"

# PatientOrientation of an upright PA chest stored each way: what np does to the upright pixels
STORED = {
    ("L", "F"): ("as stored", lambda a: a),
    ("H", "L"): ("turned 90 degrees clockwise", lambda a: np.rot90(a, -1)),
    ("F", "R"): ("turned 90 degrees counter-clockwise", lambda a: np.rot90(a, 1)),
    ("R", "H"): ("turned 180 degrees", lambda a: np.rot90(a, 2)),
    ("R", "F"): ("mirrored left-right", lambda a: a[:, ::-1]),
    ("L", "H"): ("flipped upside down", lambda a: a[::-1]),
    ("F", "L"): ("transposed (mirrored across its main diagonal)", lambda a: a.T),
    ("H", "R"): ("mirrored across its other diagonal", lambda a: np.rot90(a, 2).T),
}


@pytest.mark.parametrize("letters", list(STORED))
def test_the_header_turns_every_stored_layout_upright(tmp_path, letters):
    """Each of the eight layouts of a non-square image: the turn read from PatientOrientation shows
    the stored pixels exactly as the upright image, and is named for the report."""
    name, store = STORED[letters]
    upright = (np.arange(30 * 40).reshape(30, 40) * 7).astype(np.uint16)
    path = write_radiograph_dicom(tmp_path / "r.dcm", np.ascontiguousarray(store(upright)), imager_spacing=(0.2, 0.3),
                                  patient_orientation=letters)
    image = read_image(path)
    assert image.meta["patient_axes"] == "PatientOrientation " + "\\".join(letters)
    turn = radiograph_display(image)
    assert how_stored(turn) == name
    np.testing.assert_array_equal(turn.apply(image.array)[0], upright)
    np.testing.assert_array_equal(turn.undo(turn.apply(image.array)), image.array)
    assert canonical_orientation(image, "image") == turn  # what the network's preprocessing uses
    radiograph_orientation(image, path)
    check = image.meta["checks"]["orientation"]
    assert (check.startswith("upright as stored") if name == "as stored" else f"stored {name}, shown" in check), check
    image.meta.pop("checks")
    radiograph_orientation(image, path, {"upright": "no"})  # the seeds' way: as stored
    assert canonical_orientation(image, "image") == Orientation()
    assert image.meta["checks"]["orientation"] == "shown to the network as stored (--upright no)"


def test_no_stated_directions_and_lateral_views_are_shown_as_stored(tmp_path):
    values = (np.arange(20 * 24).reshape(20, 24) * 3).astype(np.uint16)
    plain = read_image(write_radiograph_dicom(tmp_path / "plain.dcm", values, imager_spacing=(0.2, 0.2)))
    assert "patient_axes" not in plain.meta and radiograph_display(plain) is None
    radiograph_orientation(plain, "plain.dcm")
    assert "does not say which way is up" in plain.meta["checks"]["orientation"]
    lateral = read_image(write_radiograph_dicom(tmp_path / "lat.dcm", values, imager_spacing=(0.2, 0.2),
                                                patient_orientation=("A", "F")))
    assert radiograph_display(lateral) is None and canonical_orientation(lateral, "image") == Orientation()
    radiograph_orientation(lateral, "lat.dcm")
    assert "not a frontal view" in lateral.meta["checks"]["orientation"]
    assert any("lateral view" in w for w in lateral.meta["warnings"])
    axial = read_image(write_radiograph_dicom(tmp_path / "ax.dcm", values, imager_spacing=(0.2, 0.2),
                                              patient_orientation=("L", "P")))  # a plane no projection has
    radiograph_orientation(axial, "ax.dcm")
    assert "not a frontal view" in axial.meta["checks"]["orientation"]
    assert not [w for w in axial.meta["warnings"] if "view" in w]
    with pytest.raises(Exception, match="--upright must be one of"):
        radiograph_orientation(plain, "plain.dcm", {"upright": "maybe"})


@pytest.mark.data
@pytest.mark.mrml
def test_a_turned_or_mirrored_dicom_chest_gets_the_upright_labels(tmp_path):
    """A real JSRT radiograph (bone bright) as DICOM CR stored upright, turned 90 degrees, mirrored
    and transposed, each with its true PatientOrientation: the shipped chest model gives exactly the
    upright run's labels on the stored pixels (the right lung is the patient's right every time),
    the layout check passes, and the report says what was done. With --upright no the mirrored
    copy gets the old answer: the lungs' names swapped."""
    from SpineKneeSegLib import cli
    from SpineKneeSegLib.tasks.xray.polarity import inverted

    if not JSRT.is_dir():
        pytest.skip("JSRT/SCR data not available")
    upright = (inverted(read_image(JSRT / "JPCLN001" / "image.nii.gz")).array[0].astype(np.uint16) * 257)

    def run(letters, *extra):
        _, store = STORED[letters]
        name = "".join(letters) + "".join(extra)
        path = write_radiograph_dicom(tmp_path / f"{name}.dcm", np.ascontiguousarray(store(upright)),
                                      imager_spacing=(0.7, 0.7), patient_orientation=letters)
        out = tmp_path / name
        assert cli.main(["run", "--task", "xray-chest", str(path), "-o", str(out), "--progress", "none",
                         "--no-dicom-seg", *extra]) == 0
        return json.loads((out / "report.json").read_text()), read_image(out / "labels.nii.gz").array[0]

    report, reference = run(("L", "F"))
    assert report["summaries"]["chest_layout"]["passed"]
    for letters in (("H", "L"), ("R", "F"), ("F", "L")):
        name, store = STORED[letters]
        report, labels = run(letters)
        np.testing.assert_array_equal(labels, store(reference))
        assert report["summaries"]["chest_layout"]["passed"], (letters, report["summaries"]["chest_layout"])
        assert f"stored {name}" in report["inputs"][0]["checks"]["orientation"]
    report, as_stored = run(("R", "F"), "--upright", "no")
    assert report["inputs"][0]["checks"]["orientation"] == "shown to the network as stored (--upright no)"
    right_lung = {"upright": reference[:, ::-1] == 1, "--upright no": as_stored == 1}  # both on the stored pixels
    left_lung_upright = reference[:, ::-1] == 2
    overlap = (right_lung["--upright no"] & left_lung_upright).sum() / left_lung_upright.sum()
    kept = (right_lung["--upright no"] & right_lung["upright"]).sum()
    assert overlap > 0.8 and kept < 0.05 * right_lung["upright"].sum()


@pytest.mark.data
@pytest.mark.mrml
def test_a_chest_stored_turned_without_orientation_is_run_the_way_up_its_layout_shows(tmp_path):
    """A real JSRT radiograph as NIfTI (no patient directions) stored turned 90 degrees and
    upside down: the layout check fails as stored, the search runs the other layouts and keeps
    the one that passes with the heart toward the left lung, so the labels equal the upright run's
    on the stored pixels, with a warning that says what was done. With --upright no the old answer
    stands: the layout warning, and labels that look like no chest. A mirrored copy passes the
    layout as stored and is not turned: the heart on the image's left is warned instead."""
    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.upright import STORED_AS

    if not JSRT.is_dir():
        pytest.skip("JSRT/SCR data not available")
    stored = read_image(JSRT / "JPCLN001" / "image.nii.gz")  # stored inverted: --invert auto turns it over

    def run(name, *extra):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.nii.gz"
        write_image(stored.with_array(np.ascontiguousarray(STORED_AS[name](stored.array[0]))[None]), path)
        out = tmp_path / f"out-{path.name[:-7]}"
        assert cli.main(["run", "--task", "xray-chest", str(path), "-o", str(out), "--progress", "none", *extra]) == 0
        return json.loads((out / "report.json").read_text()), read_image(out / "labels.nii.gz").array[0]

    report, upright = run("as stored")
    assert "upright_search" not in report["summaries"] and report["summaries"]["chest_layout"]["upright_score"] > 0
    for name in ("turned 90 degrees clockwise", "flipped upside down"):
        report, labels = run(name)
        search = report["summaries"]["upright_search"]
        assert search["chosen"] == name and not search["tried"]["as stored"]["passed"], search
        assert len(search["tried"]) == 8
        np.testing.assert_array_equal(labels, STORED_AS[name](upright))
        assert report["summaries"]["chest_layout"]["passed"]
        assert [w for w in report["warnings"] if f"the image looks {name} and was run upright" in w]
        assert report["timings_s"]["network"] > 0
    report, labels = run("turned 90 degrees clockwise", "--upright", "no")
    assert "upright_search" not in report["summaries"] and not report["summaries"]["chest_layout"]["passed"]
    assert [w for w in report["warnings"] if w.startswith("the labels do not lie as on an upright chest")]
    assert np.mean(labels != STORED_AS["turned 90 degrees clockwise"](upright)) > 0.1
    report, labels = run("mirrored left-right")
    assert "upright_search" not in report["summaries"] and report["summaries"]["chest_layout"]["upright_score"] < 0
    assert [w for w in report["warnings"] if w.startswith("the heart lies toward the image's left")]
