"""brain-wmh refuses FLAIR that is not skull-stripped (scalp fat is bright on FLAIR and would
become false lesions), with the measurements that decided it, unless the user vouches for it."""
import json

import numpy as np
import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image, write_image
from SpineKneeSegLib.engine.weights import initialise_weights
from SpineKneeSegLib.tasks.brain.phantom import brain_phantom
from SpineKneeSegLib.tasks.brain.skullstrip import STRIP_LIMITS, assess_skull_stripping

pytestmark = pytest.mark.mrml


def test_stripped_phantom_passes_and_tolerates_resampling_noise():
    phantom = brain_phantom(7, slice_thickness_mm=5.0)
    evidence = assess_skull_stripping(phantom.image)
    assert evidence.stripped, evidence.reason
    brain_ml = phantom.extra["brain_mask"].sum() * np.prod(phantom.image.spacing) / 1000
    assert evidence.foreground_ml == pytest.approx(brain_ml, rel=0.01)
    # a stripped image resampled afterwards: the background is 0 up to float round-off
    arr = phantom.image.array.copy()
    outside = ~phantom.extra["brain_mask"]
    arr[outside] = np.random.default_rng(0).normal(0, 1e-3, outside.sum())
    assert assess_skull_stripping(phantom.image.with_array(arr)).stripped


def test_head_with_noisy_air_is_not_stripped():
    evidence = assess_skull_stripping(brain_phantom(7, slice_thickness_mm=5.0, skull_stripped=False).image)
    assert not evidence.stripped
    assert evidence.background_fraction < STRIP_LIMITS["min_background_fraction"]
    assert "background value" in evidence.reason


def test_head_with_zeroed_air_is_caught_by_its_size():
    """Integer DICOM with background suppression: a large exact-zero background, but a head in it."""
    phantom = brain_phantom(7, slice_thickness_mm=5.0, skull_stripped=False)
    arr = np.round(phantom.image.array)
    arr[arr < 0.02 * arr.max()] = 0
    evidence = assess_skull_stripping(phantom.image.with_array(arr))
    assert evidence.background_fraction > STRIP_LIMITS["min_background_fraction"]
    assert not evidence.stripped
    assert evidence.max_axial_cm2 > STRIP_LIMITS["max_axial_cm2"] and "axial section" in evidence.reason


@pytest.mark.skipif(data_root() is None, reason="no ../shared/data (set SPINEKNEESEG_DATA)")
def test_real_open_ms_flair_is_stripped():
    for case in ("patient07", "patient19", "patient26"):
        evidence = assess_skull_stripping(read_image(data_root() / "brain" / "open-ms" / case / "flair.nii.gz"))
        assert evidence.stripped, (case, evidence.reason)
        assert 900 < evidence.foreground_ml < 1500 and evidence.background_fraction > 0.8


def test_cli_refuses_an_unstripped_head_and_runs_when_the_user_vouches(tmp_path, capsys):
    phantom = brain_phantom(7, slice_thickness_mm=5.0, skull_stripped=False)
    path = tmp_path / "head-flair.nii.gz"
    write_image(phantom.image, path)
    weights = tmp_path / "w.pt"
    initialise_weights("brain-wmh", weights, {"channels": (4, 8)}, seed=1)
    out = tmp_path / "out"
    args = ["run", "--task", "brain-wmh", str(path), "-o", str(out), "--weights", str(weights), "--progress", "none"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "head-flair.nii.gz" in err and "does not look skull-stripped" in err and "--skull-stripped yes" in err
    assert not out.exists()
    assert cli.main(args + ["--skull-stripped", "yes"]) == 0
    assert "skull_stripping" not in json.loads((out / "report.json").read_text())["summaries"]


def test_report_carries_the_evidence(tmp_path):
    phantom = brain_phantom(7, slice_thickness_mm=5.0)
    write_image(phantom.image, tmp_path / "flair.nii.gz")
    initialise_weights("brain-wmh", tmp_path / "w.pt", {"channels": (4, 8)}, seed=1)
    assert cli.main(["run", "--task", "brain-wmh", str(tmp_path / "flair.nii.gz"), "-o", str(tmp_path / "out"),
                     "--weights", str(tmp_path / "w.pt"), "--progress", "none"]) == 0
    summary = json.loads((tmp_path / "out" / "report.json").read_text())["summaries"]["skull_stripping"]
    assert summary["stripped"] is True and summary["background_value"] == 0.0
