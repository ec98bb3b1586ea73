"""core.beside: a writer run beside the caller in a forked child (Linux, main thread, no other
Python thread alive, not inside 3D Slicer), else in a thread; and a run's DICOM-SEG the same
either way."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pydicom
import pytest
from SpineKneeSegLib.core import beside
from SpineKneeSegLib.engine.weights import initialise_weights

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forking is for Linux")


def _fail(message):
    raise ValueError(message)


def _die():
    os._exit(3)


def test_a_child_runs_the_function_and_hands_back_its_value_or_its_error():
    job = beside.ChildJob(os.getpid)
    assert job.result() != os.getpid()  # it ran in another process
    with pytest.raises(ValueError, match="no FrameOfReferenceUID"):
        beside.ChildJob(_fail, "no FrameOfReferenceUID").result()


def test_a_child_that_dies_without_a_result_is_an_error_not_a_hang():
    with pytest.raises(ChildProcessError, match="without a result"):
        beside.ChildJob(_die).result()


def test_the_result_is_taken_without_waiting_for_the_childs_exit(monkeypatch):
    """Tearing down a forked copy of a process with VTK or torch loaded takes tens of ms: the
    result is used at once and the child reaped later, never left a zombie."""
    waits = []
    real_waitpid = os.waitpid

    def spy(pid, options):
        waits.append(options)
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", spy)
    job = beside.ChildJob(os.getpid)
    pid = job.pid
    assert job.result() == pid
    assert 0 not in waits  # no blocking wait for the exit
    beside.reap_finished(wait=True)
    assert pid not in beside._EXITING
    with pytest.raises(ChildProcessError):  # reaped
        real_waitpid(pid, os.WNOHANG)


def test_leaving_early_kills_and_reaps_the_child(monkeypatch):
    """The caller failed (its staging folder is about to go): the child does not outlive it."""
    monkeypatch.setattr(beside, "can_fork", lambda: True)  # whatever threads earlier tests left
    t = time.perf_counter()
    with pytest.raises(RuntimeError):
        with beside.run_beside(time.sleep, 60) as job:
            assert isinstance(job, beside.ChildJob)
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


# the head of a script run in a fresh process (the test process may hold threads, e.g. Dask's,
# that rightly stop a fork): ``forks`` collects the name of every function a ChildJob runs
FORK_SPY = textwrap.dedent("""
    from SpineKneeSegLib.core import beside
    forks = []
    class Spy(beside.ChildJob):
        def __init__(self, fn, *args, **kw):
            forks.append(fn.__name__)
            super().__init__(fn, *args, **kw)
    beside.ChildJob = Spy
""")

# in-process writing's DICOM-SEG by a forked child, then with forking off, by a thread
SAME_EITHER_WAY = FORK_SPY + textwrap.dedent("""
    import sys
    from pathlib import Path
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.tasks import TASKS
    series, weights, out = sys.argv[1:]
    for name in ("child", "thread"):
        beside.FORK_ALLOWED = name == "child"
        report = run_case(TASKS["knee-bones"], [series], Path(out) / name, RunOptions(weights=weights, fast=True))
        assert "segmentation.dcm" in report["outputs"] and not any("DICOM-SEG" in w for w in report["warnings"])
    print("FORKS", ",".join(forks))
""")


def knee_dicom_case(folder):
    """A knee phantom as a DICOM series and a tiny untrained knee network: (series, weights)."""
    from test_dicomseg import _dicom_phantom

    _dicom_phantom("knee-bones", folder / "series")
    initialise_weights("knee-bones", folder / "tiny.pt", {"channels": (4, 8)}, seed=1)
    return folder / "series", folder / "tiny.pt"


def test_a_runs_dicom_seg_is_the_same_from_a_child_and_from_a_thread(tmp_path):
    series, weights = knee_dicom_case(tmp_path)
    proc = subprocess.run([sys.executable, "-c", SAME_EITHER_WAY, str(series), str(weights),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "FORKS write_dicom_seg_output\n" in proc.stdout  # the child run forked once, the thread run never
    _same_dicom_seg(pydicom.dcmread(tmp_path / "child" / "segmentation.dcm"),
                    pydicom.dcmread(tmp_path / "thread" / "segmentation.dcm"))
    assert not list(tmp_path.glob(".child.partial.*")) and not list(tmp_path.glob(".thread.partial.*"))


def _same_dicom_seg(a, b):
    assert a.PixelData == b.PixelData and a.NumberOfFrames == b.NumberOfFrames
    for keyword in ("PerFrameFunctionalGroupsSequence", "SegmentSequence", "ReferencedSeriesSequence"):
        assert a.get(keyword) == b.get(keyword), keyword
    assert np.count_nonzero(np.frombuffer(a.PixelData, np.uint8)) > 0
