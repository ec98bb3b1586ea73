"""Clean stops (issue 27, part 4): SIGTERM during the write stage removes the staging folder and
the MRML temporary folder (exit 143); after SIGKILL the next run into the same place sweeps the
dead run's leftovers and takes over its lock. No result is silently overwritten (issue 26, part 4):
a second run into a folder another live run is writing is refused, a finished result is replaced
only with --overwrite. Real subprocesses of the CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import write_image
from SpineKneeSegLib.engine.weights import initialise_weights
from test_io import SAGITTAL  # a sagittal knee runs as acquired

pytestmark = [pytest.mark.mrml, pytest.mark.slow]


@pytest.fixture
def case(tmp_path):
    rng = np.random.default_rng(0)
    write_image(Image(rng.normal(100, 20, (12, 48, 48)).astype(np.float32), spacing=(0.5, 0.5, 3.0),
                      direction=SAGITTAL), tmp_path / "scan.nii.gz")
    initialise_weights("knee-bones", tmp_path / "knee.pt", {"channels": (4, 8)})
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "SPINEKNEESEG_PAUSE_AT_STAGE": "staged:60"}
    command = [sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", "knee-bones", str(tmp_path / "scan.nii.gz"),
               "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "knee.pt"), "--progress", "json", "--scene"]
    return tmp_path, temp, env, command


def _start_and_wait_for_staging(tmp_path, env, command):
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line and json.loads(line).get("stage") == "writing":
            break
        assert proc.poll() is None, proc.stderr.read()
    while time.time() < deadline and not [p for p in tmp_path.iterdir() if ".partial." in p.name]:
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


def _leftovers(tmp_path, temp):
    return ([p.name for p in tmp_path.iterdir() if ".partial." in p.name]
            + [p.name for p in temp.iterdir() if p.name.startswith("spinekneeseg-mrml-")])


def test_sigterm_during_writing_leaves_no_staging_or_temporary_folder(case):
    tmp_path, temp, env, command = case
    proc = _start_and_wait_for_staging(tmp_path, env, command)
    assert [p for p in tmp_path.iterdir() if ".partial." in p.name]  # the signal lands while staging exists
    assert [p for p in temp.iterdir() if p.name.startswith("spinekneeseg-mrml-")]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert _leftovers(tmp_path, temp) == []
    assert not (tmp_path / "out").exists()


def test_after_sigkill_the_next_run_sweeps_the_dead_runs_leftovers(case):
    tmp_path, temp, env, command = case
    proc = _start_and_wait_for_staging(tmp_path, env, command)
    proc.kill()
    proc.wait(timeout=30)
    assert _leftovers(tmp_path, temp)  # SIGKILL cannot clean up
    rerun = subprocess.run(command, env={**env, "SPINEKNEESEG_PAUSE_AT_STAGE": ""}, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _leftovers(tmp_path, temp) == []
    assert (tmp_path / "out" / "labels.nii.gz").exists()
    assert not (tmp_path / ".out.lock").exists()  # the dead run's lock was taken over, then released


def test_a_second_run_into_a_folder_another_live_run_is_writing_is_refused(case):
    tmp_path, temp, env, command = case
    first = _start_and_wait_for_staging(tmp_path, env, command)
    lock = json.loads((tmp_path / ".out.lock").read_text())
    assert lock["pid"] == first.pid
    second = subprocess.run(command, env={**env, "SPINEKNEESEG_PAUSE_AT_STAGE": ""}, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2, second.stderr
    assert f"another run (process {first.pid}" in second.stderr and "out" in second.stderr
    first.send_signal(signal.SIGTERM)  # the first run is unharmed by the refusal: it still owns its lock
    first.communicate(timeout=60)
    assert not (tmp_path / ".out.lock").exists()


def test_a_finished_result_is_replaced_only_with_overwrite(case):
    tmp_path, temp, env, command = case
    quick = {**env, "SPINEKNEESEG_PAUSE_AT_STAGE": ""}
    assert subprocess.run(command, env=quick, capture_output=True, text=True, timeout=300).returncode == 0
    out = tmp_path / "out"
    assert (out / "scene.mrb").exists()
    before = (out / "report.json").read_bytes()
    again = subprocess.run(command, env=quick, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a finished result (knee-bones" in again.stderr, again.stderr
    assert "--overwrite" in again.stderr and (out / "report.json").read_bytes() == before
    (out / "my-notes.txt").write_text("a reader's own file")
    without_scene = [c for c in command if c != "--scene"] + ["--overwrite"]
    replaced = subprocess.run(without_scene, env=quick, capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "report.json").read_bytes() != before
    assert not (out / "scene.mrb").exists()  # the earlier result's file the new one does not write: gone
    assert (out / "my-notes.txt").exists()  # what no run wrote is left alone
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_sweep_removes_only_folders_of_dead_processes(tmp_path):
    from SpineKneeSegLib.core.atomic import sweep_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for pid in (dead.pid, live.pid, os.getpid()):
            (tmp_path / f".out.partial.{pid}.abc").mkdir()
        (tmp_path / ".out.partial.legacy").mkdir()  # no pid: cannot tell, left alone
        removed = sweep_stale(tmp_path, ".out.partial.")
    finally:
        live.kill()
    assert [p.name for p in removed] == [f".out.partial.{dead.pid}.abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".out.partial.{live.pid}.abc", f".out.partial.{os.getpid()}.abc", ".out.partial.legacy"])


def test_a_run_that_lost_its_lock_to_another_does_not_commit(case):
    """Frozen past its lease (or cut off from a shared file system), a run finds on waking that a
    run elsewhere took its folder over: it must not commit its result over that run's."""
    tmp_path, temp, env, command = case
    env = {**env, "SPINEKNEESEG_PAUSE_AT_STAGE": "staged:3", "SPINEKNEESEG_LOCK_LEASE_S": "1.2"}
    proc = _start_and_wait_for_staging(tmp_path, env, command)
    taken = json.dumps({"pid": 4242, "host": "node-7", "pidns": None, "started": "2026-12-07 09:00:00"})
    (tmp_path / ".out.lock").write_text(taken)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "lost its output lock" in err and "its result was not written" in err
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path, temp) == []
    assert (tmp_path / ".out.lock").read_text() == taken  # the new owner's lock is left to it
