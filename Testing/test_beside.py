"""core.beside: a writer run beside the caller in a forked child (Linux, main thread, no other
Python thread alive, not inside 3D Slicer), else in a thread; and a run's DICOM-SEG the same
either way."""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pydicom
import pytest
from SpineKneeSegLib.core import beside
from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
from SpineKneeSegLib.engine.weights import initialise_weights
from SpineKneeSegLib.tasks import TASKS

pytestmark = pytest.mark.skipif(not beside.can_fork(), reason="forking is for Linux, from a lone main thread")


def _fail(message):
    raise ValueError(message)


def _die():
    os._exit(3)


def test_a_child_runs_the_function_and_hands_back_its_value_or_its_error():
    with beside.run_beside(os.getpid) as job:
        assert isinstance(job, beside.ChildJob)
        assert job.result() != os.getpid()  # it ran in another process
    with beside.run_beside(_fail, "no FrameOfReferenceUID") as job:
        with pytest.raises(ValueError, match="no FrameOfReferenceUID"):
            job.result()


def test_a_child_that_dies_without_a_result_is_an_error_not_a_hang():
    with beside.run_beside(_die) as job:
        with pytest.raises(ChildProcessError, match="without a result"):
            job.result()


def test_leaving_early_kills_and_reaps_the_child():
    """The caller failed (its staging folder is about to go): the child does not outlive it."""
    t = time.perf_counter()
    with pytest.raises(RuntimeError):
        with beside.run_beside(time.sleep, 60) as job:
            pid = job.pid
            raise RuntimeError("a writer of the caller failed")
    assert time.perf_counter() - t < 10
    with pytest.raises(ChildProcessError):  # reaped: no zombie left to wait for
        os.waitpid(pid, os.WNOHANG)


def test_a_thread_when_another_python_thread_is_alive_or_inside_slicer(monkeypatch):
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not beside.can_fork()
        with beside.run_beside(os.getpid) as job:
            assert not isinstance(job, beside.ChildJob) and job.result() == os.getpid()
    finally:
        stop.set()
        other.join()
    fake_slicer = type(sys)("slicer")
    fake_slicer.app = object()  # what the Slicer application defines
    monkeypatch.setitem(sys.modules, "slicer", fake_slicer)
    assert not beside.can_fork()


def test_a_runs_dicom_seg_is_the_same_from_a_child_and_from_a_thread(tmp_path, monkeypatch):
    """In-process writing (the panel's, a manifest's): the DICOM-SEG in a forked child, or in a
    thread where forking is not allowed; the same file either way."""
    from test_dicomseg import _dicom_phantom

    _dicom_phantom("knee-bones", tmp_path / "series")
    weights = tmp_path / "tiny.pt"
    initialise_weights("knee-bones", weights, {"channels": (4, 8)}, seed=1)
    forks, child_job = [], beside.ChildJob

    class Spy(child_job):
        def __init__(self, fn, *args, **kw):
            forks.append(fn.__name__)
            super().__init__(fn, *args, **kw)

    monkeypatch.setattr(beside, "ChildJob", Spy)

    def run(out):
        report = run_case(TASKS["knee-bones"], [str(tmp_path / "series")], out,
                          RunOptions(weights=str(weights), fast=True))
        assert "segmentation.dcm" in report["outputs"] and not any("DICOM-SEG" in w for w in report["warnings"])
        return pydicom.dcmread(out / "segmentation.dcm")

    child = run(tmp_path / "child")
    assert forks == ["write_dicom_seg_output"]
    monkeypatch.setattr(beside, "FORK_ALLOWED", False)
    thread = run(tmp_path / "thread")
    assert forks == ["write_dicom_seg_output"]  # no second fork
    _same_dicom_seg(child, thread)
    assert not list(tmp_path.glob(".child.partial.*")) and not list(tmp_path.glob(".thread.partial.*"))


def _same_dicom_seg(a, b):
    assert a.PixelData == b.PixelData and a.NumberOfFrames == b.NumberOfFrames
    for keyword in ("PerFrameFunctionalGroupsSequence", "SegmentSequence", "ReferencedSeriesSequence"):
        assert a.get(keyword) == b.get(keyword), keyword
    assert np.count_nonzero(np.frombuffer(a.PixelData, np.uint8)) > 0
