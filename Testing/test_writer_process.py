"""engine.writer_process: a one-input command line forks a child after the input checks; it loads
slicer-core (and highdicom for a DICOM input) while the run segments, then writes the MRML outputs
and the DICOM-SEG. The files are the in-process run's; failures on either side leave nothing."""
from __future__ import annotations

import json
import os

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from SpineKneeSegLib import cli
from SpineKneeSegLib.core import beside
from SpineKneeSegLib.engine import pipeline
from SpineKneeSegLib.engine.weights import initialise_weights
from test_beside import _same_dicom_seg
from test_dicomseg import _dicom_phantom

pytestmark = pytest.mark.skipif(not beside.can_fork(), reason="forking is for Linux, from a lone main thread")


@pytest.fixture()
def knee_series(tmp_path):
    _dicom_phantom("knee-bones", tmp_path / "series")
    weights = tmp_path / "tiny.pt"
    initialise_weights("knee-bones", weights, {"channels": (4, 8)}, seed=1)
    return tmp_path / "series", weights


@pytest.fixture()
def forks(monkeypatch):
    made, child_job = [], beside.ChildJob

    class Spy(child_job):
        def __init__(self, fn, *args, **kw):
            made.append(fn.__name__)
            super().__init__(fn, *args, **kw)

    monkeypatch.setattr(beside, "ChildJob", Spy)
    return made


def _run(series, weights, out, *extra):
    return cli.main(["run", "--task", "knee-bones", str(series), "-o", str(out), "--weights", str(weights),
                     "--progress", "none", "--fast", "--scene", *extra])


def _nrrd(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image = reader.Execute()
    return sitk.GetArrayFromImage(image), {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}


def test_the_writer_process_writes_what_the_run_writes_in_process(knee_series, tmp_path, forks):
    series, weights = knee_series
    assert _run(series, weights, tmp_path / "child") == 0
    assert forks[0] == "_serve"  # the writer (its DICOM-SEG then forks once more, beside the MRML writers)
    assert _run(series, weights, tmp_path / "alone", "--no-writer-process") == 0
    assert forks[0] == "_serve" and "_serve" not in forks[1:]
    child, alone = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("child", "alone"))
    assert child["outputs"] == alone["outputs"]
    assert {"segmentation.seg.nrrd", "volumes.tsv", "scene.mrb", "segmentation.dcm", "overlays/"} <= set(child["outputs"])
    assert child["warnings"] == alone["warnings"]
    assert child["summaries"] == alone["summaries"]
    for key in ("write", "mrml_startup", "dicom_seg", "total", "startup"):
        assert child["timings_s"][key] >= 0, key
    t = child["timings_s"]
    assert t["total"] >= t["network"] + t["write"] - 1e-3
    a, b = _nrrd(tmp_path / "child" / "segmentation.seg.nrrd"), _nrrd(tmp_path / "alone" / "segmentation.seg.nrrd")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]  # every segment's name, colour, terminology and extent
    assert (tmp_path / "child" / "volumes.tsv").read_text() == (tmp_path / "alone" / "volumes.tsv").read_text()
    _same_dicom_seg(pydicom.dcmread(tmp_path / "child" / "segmentation.dcm"),
                    pydicom.dcmread(tmp_path / "alone" / "segmentation.dcm"))
    assert (tmp_path / "child" / "scene.mrb").stat().st_size > 0


def _children():
    """This process's live or unreaped children."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_a_failing_writer_fails_the_run_and_leaves_nothing(knee_series, tmp_path, monkeypatch, forks):
    series, weights = knee_series

    def broken(*args, **kw):
        raise OSError(28, "No space left on device", "segmentation.seg.nrrd")

    monkeypatch.setattr(pipeline, "_write_mrml_outputs", broken)  # the child is forked with it
    assert _run(series, weights, tmp_path / "out") == 2
    assert forks[0] == "_serve"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert _children() == []


def test_a_run_that_fails_before_writing_stops_its_writer(knee_series, tmp_path, monkeypatch, forks):
    series, weights = knee_series

    def broken(*args, **kw):
        raise RuntimeError("the network failed")

    monkeypatch.setattr(pipeline, "postprocess", broken)
    assert _run(series, weights, tmp_path / "out") == 1
    assert forks == ["_serve"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert _children() == []


def test_a_refused_input_forks_nothing(tmp_path, forks):
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    assert cli.main(["run", "--task", "knee-bones", str(tmp_path / "broken.nii.gz"), "-o", str(tmp_path / "out"),
                     "--progress", "none"]) != 0
    assert forks == []

