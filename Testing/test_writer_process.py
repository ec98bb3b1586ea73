"""engine.writer_process: a one-input command line forks a child after the input checks; it loads
slicer-core (and highdicom for a DICOM input) while the run segments, then writes the MRML outputs
and the DICOM-SEG. The files are the in-process run's; failures on either side leave nothing, not
even the child's MRML temporary folder.

Each run is a fresh process, as on the command line: the test process itself has slicer-core
loaded and, after the Dask tests, threads that rightly stop a fork."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from test_beside import FORK_SPY, _same_dicom_seg, knee_dicom_case

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the writer process forks (Linux)")

# runs the command line in this fresh process with a spy on the forks and an optional fault
DRIVER = FORK_SPY + textwrap.dedent("""
    import json, os, sys
    from SpineKneeSegLib.engine import pipeline
    def fault(*args, **kw):
        raise {fault}
    if "{where}":
        setattr(pipeline, "{where}", fault)
    from SpineKneeSegLib import cli
    code = cli.main(sys.argv[1:])
    me, children = str(os.getpid()), []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{{entry}}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    children.append(int(entry))
        except OSError:
            pass
    print("RESULT", json.dumps({{"code": code, "forks": forks, "children": children,
                                 "slicer_loaded": "slicer_core" in sys.modules}}))
""")


@pytest.fixture()
def knee_series(tmp_path):
    series, weights = knee_dicom_case(tmp_path)
    temp = tmp_path / "temp"  # this run's temporary folder: MRML's cache lands here
    temp.mkdir()
    return series, weights, temp


def _drive(args, temp, fault="None", where=""):
    """``spinekneeseg run ARGS`` in a fresh process through DRIVER: its exit code, the functions it
    forked, its children left, whether it loaded slicer-core, and its stderr."""
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(fault=fault, where=where), "run", "--task",
                           "knee-bones", "--progress", "none", "--fast", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stderr
    return {**json.loads(line[-1][len("RESULT "):]), "stderr": proc.stderr}


def _run(knee_series, out, *extra, fault="None", where=""):
    series, weights, temp = knee_series
    return _drive([series, "-o", out, "--weights", weights, "--scene", *extra], temp, fault, where)


def _nrrd(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image = reader.Execute()
    return sitk.GetArrayFromImage(image), {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}


def _leftovers(tmp_path, temp):
    return [p.name for p in tmp_path.iterdir() if ".partial." in p.name] + sorted(os.listdir(temp))


def test_the_writer_process_writes_what_the_run_writes_in_process(knee_series, tmp_path):
    child_run = _run(knee_series, tmp_path / "child")
    assert child_run["code"] == 0, child_run["stderr"]
    # the writer, and no slicer-core in the run's own process
    assert child_run["forks"] == ["_serve"] and not child_run["slicer_loaded"] and child_run["children"] == []
    alone_run = _run(knee_series, tmp_path / "alone", "--no-writer-process")
    assert alone_run["code"] == 0 and alone_run["slicer_loaded"]
    assert alone_run["forks"] == ["write_dicom_seg_output"]  # in-process writing forks only the DICOM-SEG
    child, alone = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("child", "alone"))
    assert child["outputs"] == alone["outputs"]
    assert {"segmentation.seg.nrrd", "volumes.tsv", "scene.mrb", "segmentation.dcm", "overlays/"} <= set(child["outputs"])
    assert child["warnings"] == alone["warnings"] and child["summaries"] == alone["summaries"]
    t = child["timings_s"]
    assert min(t["write"], t["mrml_startup"], t["dicom_seg"], t["startup"]) >= 0
    assert t["total"] >= t["network"] + t["write"] - 1e-3
    a, b = _nrrd(tmp_path / "child" / "segmentation.seg.nrrd"), _nrrd(tmp_path / "alone" / "segmentation.seg.nrrd")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]  # every segment's name, colour, terminology and extent
    assert (tmp_path / "child" / "volumes.tsv").read_text() == (tmp_path / "alone" / "volumes.tsv").read_text()
    _same_dicom_seg(pydicom.dcmread(tmp_path / "child" / "segmentation.dcm"),
                    pydicom.dcmread(tmp_path / "alone" / "segmentation.dcm"))
    assert (tmp_path / "child" / "scene.mrb").stat().st_size > 0
    assert _leftovers(tmp_path, knee_series[2]) == []  # the child removed its MRML folder


def test_a_failing_writer_fails_the_run_and_leaves_nothing(knee_series, tmp_path):
    run = _run(knee_series, tmp_path / "out", fault='OSError(28, "No space left on device", "segmentation.seg.nrrd")',
               where="_write_mrml_outputs")  # the child is forked with the fault
    assert run["code"] == 2 and "No space left on device" in run["stderr"]
    assert run["forks"] == ["_serve"] and run["children"] == []
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, knee_series[2]) == []


def test_a_run_that_fails_before_writing_stops_its_writer(knee_series, tmp_path):
    run = _run(knee_series, tmp_path / "out", fault='RuntimeError("the network failed")', where="postprocess")
    assert run["code"] == 1 and "the network failed" in run["stderr"]
    assert run["forks"] == ["_serve"] and run["children"] == []
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, knee_series[2]) == []


def test_a_refused_input_forks_nothing(knee_series, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    series, weights, temp = knee_series
    run = _run((broken, weights, temp), tmp_path / "out")
    assert run["code"] == 2 and run["forks"] == []


def test_a_manifest_writes_in_process(knee_series, tmp_path):
    """A cohort pays its start-up once and overlaps cases in threads: no writer process, and its
    cases' DICOM-SEGs are written in a thread (forking beside live worker threads is unsafe)."""
    series, weights, temp = knee_series
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,input\nknee1,{series}\n")
    run = _drive(["--manifest", manifest, "-o", tmp_path / "cohort", "--weights", weights], temp)
    assert run["code"] == 0, run["stderr"]
    assert run["forks"] == [] and run["slicer_loaded"]
    assert (tmp_path / "cohort" / "knee1" / "segmentation.dcm").exists()


# the command line with a spy on what the run sends its writer child
HANDOFF_SPY = textwrap.dedent("""
    import pickle, sys
    from multiprocessing import connection
    sent = []
    real_send = connection.Connection.send
    def spy(self, obj):
        sent.append(len(pickle.dumps(obj)))
        return real_send(self, obj)
    connection.Connection.send = spy
    from SpineKneeSegLib import cli
    code = cli.main(sys.argv[1:])
    print("SENT", code, *sent)
""")


def test_the_writer_gets_the_labels_through_shared_memory_and_no_dicom_headers(knee_series, tmp_path):
    """The request holds neither the label map (shared memory since the fork) nor the input's
    DICOM headers (the child has its own): on the knee DESS pickling them cost 0.16 s before the
    child could start writing. The files are checked against in-process writing above."""
    series, weights, temp = knee_series
    proc = subprocess.run([sys.executable, "-c", HANDOFF_SPY, "run", "--task", "knee-bones", "--progress", "none",
                           "--fast", str(series), "-o", str(tmp_path / "out"), "--weights", str(weights)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)})
    line = [x for x in proc.stdout.splitlines() if x.startswith("SENT ")]
    assert line, proc.stderr
    code, *sent = map(int, line[-1].split()[1:])
    labels = sitk.ReadImage(str(tmp_path / "out" / "labels.nii.gz"))
    voxels = int(np.prod(labels.GetSize()))
    headers = sum(len(pydicom.dcmread(f, stop_before_pixels=True).to_json()) for f in series.iterdir())
    assert code == 0 and len(sent) == 1
    assert voxels > 100_000 and headers > 20_000  # what the request would carry, were they in it
    assert sent[0] < 20_000
    # the child's segmentation is the run's map, voxel for voxel, and not an empty one
    written, _ = _nrrd(tmp_path / "out" / "segmentation.seg.nrrd")
    np.testing.assert_array_equal(written, sitk.GetArrayFromImage(labels))
    assert (written > 0).any()


SLOW_CHILD = textwrap.dedent("""
    import sys, time
    from SpineKneeSegLib.engine import pipeline
    pipeline.warm_dicom_seg_writer = lambda: time.sleep(3)  # only the writer child warms highdicom here
    from SpineKneeSegLib import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_late_writer_is_counted_once(knee_series, tmp_path):
    """When the run reaches its writing before the child is ready, the wait is mrml_startup's and
    not also write's: the itemised timings add up within total."""
    series, weights, temp = knee_series
    proc = subprocess.run([sys.executable, "-c", SLOW_CHILD, "run", "--task", "knee-bones", "--progress", "none",
                           "--fast", str(series), "-o", str(tmp_path / "out"), "--weights", str(weights)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stderr
    t = json.loads((tmp_path / "out" / "report.json").read_text())["timings_s"]
    assert t["mrml_startup"] > 0.5  # the run did wait for the child
    assert t["total"] >= t["network"] + t["mrml_startup"] + t["write"] - 1e-3
