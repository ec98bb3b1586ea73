"""Output locks beyond one machine (issue 25, part 4: the same resume rule on a cluster). A run
on another machine, a cluster node or a container, cannot be asked whether its pid lives: its lock
is judged by its heartbeat (the file's modification time, refreshed every lease / 6). A lock that
keeps beating is busy; one silent for a whole lease ($SPINEKNEESEG_LOCK_LEASE_S) was left by a dead
run and is taken over, and counts as a death of its case in a cohort. The other machine's lock is
the real file a run there writes (its JSON claim), with the host name it would hold."""
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.atomic import LEASE_ENV, _this_machine, lock_is_stale, output_lock
from SpineKneeSegLib.core.errors import OutputBusy, Terminated
from SpineKneeSegLib.core.image_io import write_image
from SpineKneeSegLib.engine.weights import initialise_weights
from SpineKneeSegLib.tasks import make_phantom


def _claim(lock: Path, host: str = "node-7", pid: int = 4242, **extra) -> None:
    lock.write_text(json.dumps({"pid": pid, "host": host, "pidns": "pid:[4026531836]",
                                "started": "2026-12-07 09:00:00", **extra}))


def _beat(lock: Path, stop: threading.Event, every: float = 0.05) -> threading.Thread:
    """The other machine's run, alive: its heartbeat refreshes the lock."""
    def beat():
        while not stop.wait(every):
            os.utime(lock)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_held_lock_beats_and_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "0.6")  # a heartbeat every 0.1 s
    lock_file = tmp_path / ".out.lock"
    with output_lock(tmp_path / "out") as held:
        claim = json.loads(lock_file.read_text())
        assert claim["pid"] == os.getpid() and claim["host"] == _this_machine()["host"]
        assert claim["pidns"] == _this_machine()["pidns"]
        _age(lock_file, 60)
        time.sleep(0.4)
        assert time.time() - lock_file.stat().st_mtime < 0.3  # refreshed since
        assert not held.lost
        held.check(tmp_path / "out")
    assert not lock_file.exists()


@pytest.mark.parametrize("when", ["taking", "releasing"])
def test_ctrl_c_while_a_lock_is_taken_or_released_leaves_no_lock(tmp_path, monkeypatch, when):
    """Ctrl-C (or SIGTERM) raises between any two bytecodes. One that came as the lock's heartbeat
    started, or as it stopped, left the lock of a gone process (CI caught it once in about ten
    Ctrl-C tests); the next run counted it as a death of the case, and two such stops gave the case
    up. Now it takes effect once the lock is held (and released on the way out) or removed."""
    import signal

    from SpineKneeSegLib.core import atomic

    lock = tmp_path / ".case.lock"
    real = atomic.HeldLock._start if when == "taking" else atomic.HeldLock._pause

    def interrupted(self):
        signal.raise_signal(signal.SIGINT)  # the handler runs in this (main) thread, here
        return real(self)

    monkeypatch.setattr(atomic.HeldLock, "_start" if when == "taking" else "_pause", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with output_lock(tmp_path / "case"):
            assert lock.exists() and when == "releasing"
    assert not lock.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    ran = []
    with pytest.raises(Terminated):  # a SIGTERM handler of the command's (cli.main: unwinds like Ctrl-C)
        previous = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(Terminated()))
        try:
            with atomic.signals_deferred():
                signal.raise_signal(signal.SIGTERM)
                ran.append("the rest of the block")
        finally:
            signal.signal(signal.SIGTERM, previous)
    assert ran == ["the rest of the block"]


def test_the_heartbeat_steps_aside_for_a_fork_and_comes_back(tmp_path):
    """The run's writers are forked from a one-thread process (core/beside.can_fork): the heartbeat
    stops for the fork, and the child neither beats nor releases the parent's lock. In a fresh
    process: this one may hold other tests' threads."""
    probe = f"""
import os, threading, time
from pathlib import Path
from SpineKneeSegLib.core.atomic import output_lock
from SpineKneeSegLib.core.beside import ChildJob, can_fork, threads_in_the_way
lock = Path({str(tmp_path)!r}) / ".out.lock"
with output_lock(lock.parent / "out"):
    beating = [t.name for t in threading.enumerate() if t.name == "output-lock-heartbeat"]
    in_child = ChildJob(threading.active_count).result()
    old = time.time() - 60
    os.utime(lock, (old, old))
    time.sleep(0.4)
    print(beating, can_fork(), threads_in_the_way(), in_child, time.time() - lock.stat().st_mtime < 0.3)
print(lock.exists())
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, LEASE_ENV: "0.6"})
    assert out.returncode == 0, out.stderr
    # a heartbeat, a fork allowed beside it, one thread in the child, beating again after the fork
    assert out.stdout.split("\n")[:2] == ["['output-lock-heartbeat'] True [] 1 True", "False"]


def test_a_lock_another_machine_keeps_beating_is_busy(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "5")
    lock_file = tmp_path / ".out.lock"
    _claim(lock_file)
    stop = threading.Event()
    _beat(lock_file, stop)
    started = time.monotonic()
    try:
        with pytest.raises(OutputBusy, match=r"another run \(process 4242 on node-7"):
            with output_lock(tmp_path / "out"):
                pass
    finally:
        stop.set()
    assert time.monotonic() - started < 2.0  # seen alive within a few polls, not after the lease
    assert json.loads(lock_file.read_text())["host"] == "node-7"  # left to its owner


def test_a_silent_lock_of_another_machine_is_taken_over_when_its_lease_ends(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "1.5")
    lock_file = tmp_path / ".out.lock"
    _claim(lock_file)  # just written: its node died a moment ago
    staging = tmp_path / f".out.partial.{os.getppid()}.abc"  # the node's; the pid is a live one here
    staging.mkdir()
    assert not lock_is_stale(tmp_path / "out")  # too young to judge without watching it
    started = time.monotonic()
    with output_lock(tmp_path / "out"):
        waited = time.monotonic() - started
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        assert not staging.exists()
    assert 1.0 <= waited < 4.0  # watched for the rest of its lease, then taken over


def test_an_old_lock_of_another_machine_is_stale_at_once(tmp_path):
    lock_file = tmp_path / ".out.lock"
    _claim(lock_file)
    _age(lock_file, 3600)  # default lease, 30 s
    assert lock_is_stale(tmp_path / "out")
    started = time.monotonic()
    with output_lock(tmp_path / "out"):
        assert time.monotonic() - started < 1.0


def test_the_same_host_name_in_another_pid_namespace_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    """Containers sharing a host name (host networking) do not share pids: a pid that does not
    exist here may be a live run there."""
    monkeypatch.setenv(LEASE_ENV, "5")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    here = _this_machine()
    lock_file = tmp_path / ".out.lock"
    _claim(lock_file, host=here["host"], pid=dead, pidns="pid:[1]")
    assert not lock_is_stale(tmp_path / "out")
    _age(lock_file, 60)
    assert lock_is_stale(tmp_path / "out")
    _claim(lock_file, host=here["host"], pid=dead, pidns=here["pidns"])  # this machine's: the pid decides
    assert lock_is_stale(tmp_path / "out")


def test_a_lock_taken_over_from_a_holder_is_noticed_by_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "0.6")
    lock_file = tmp_path / ".out.lock"
    with output_lock(tmp_path / "out") as held:
        _claim(lock_file)  # another machine took it over while this process was frozen
        time.sleep(0.4)
        assert held.lost
        with pytest.raises(OutputBusy, match="lost its output lock"):
            held.check(tmp_path / "out")
    assert json.loads(lock_file.read_text())["host"] == "node-7"  # the release leaves the new owner's lock


@pytest.mark.slow
def test_a_cohort_resumes_after_a_lost_node_and_leaves_a_live_nodes_case(tmp_path, monkeypatch, capsys):
    """A cohort re-run on another machine: case a's node died mid-case (its lock silent for longer
    than the lease), case b is being run by a live node. a is taken over, counted as a death and
    run; b is busy (the other run's to finish: not a failure of this one), put off to the end at a
    glance and then watched, and c runs."""
    monkeypatch.setenv(LEASE_ENV, "2")
    weights = tmp_path / "knee.pt"
    initialise_weights("knee-bones", weights, {"channels": (4, 8)}, seed=1)
    write_image(make_phantom("knee-bones", seed=1).image, tmp_path / "knee.nii.gz")
    (tmp_path / "cases.csv").write_text("id,input\na,knee.nii.gz\nb,knee.nii.gz\nc,knee.nii.gz\n")
    out = tmp_path / "out"
    out.mkdir()
    _claim(out / ".a.lock", host="node-3")
    _age(out / ".a.lock", 600)
    # the dead node's staging folder; its pid is a live process here, which the node's run was not
    (out / f".a.partial.{os.getppid()}.x1y2").mkdir()
    _claim(out / ".b.lock", host="node-7")
    stop = threading.Event()
    _beat(out / ".b.lock", stop)
    try:
        code = cli.main(["run", "--task", "knee-bones", "--manifest", str(tmp_path / "cases.csv"), "-o", str(out),
                         "--weights", str(weights)])
    finally:
        stop.set()
    assert code == 0
    rows = {row[0]: row for row in (line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:])}
    assert rows["a"][1] == "ok" and (out / "a" / "labels.nii.gz").is_file()
    assert rows["b"][1:3] == ["busy", "0"] and "another run (process 4242 on node-7" in rows["b"][3]
    assert rows["c"][1] == "ok"
    assert not (out / "b").exists() and json.loads((out / ".b.lock").read_text())["host"] == "node-7"
    console = capsys.readouterr().err
    assert "a: started (again: the process running it ended, 1 time)" in console
    put_off, c_done, b_busy = (console.index(f) for f in ("b: another run holds it; tried again once the rest",
                                                           "c: ok (", "b: busy: another run (process 4242"))
    assert put_off < b_busy and c_done < b_busy  # judged in full only once the rest are done
    assert "2/3 cases ok, 1 left to the other run that held them" in console
    assert not (out / ".a.deaths").exists() and not (out / ".a.lock").exists()  # answered: the count is cleared
    assert not [p.name for p in out.iterdir() if ".partial." in p.name]


def test_a_lock_that_cannot_be_written_is_not_left_empty(small_disk):
    """On a full disk the lock file is made but its claim cannot be written: it is removed again,
    so no empty lock puzzles the next run."""
    disk = small_disk("64k")
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):
        while True:
            os.write(fd, b"x" * 4096)
    os.close(fd)
    with pytest.raises(OSError, match="No space left"):
        with output_lock(disk / "out"):
            pass
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


@pytest.mark.slow
def test_a_run_on_another_machine_is_busy_while_it_beats_and_taken_over_once_it_is_gone(tmp_path, second_machine):
    """Two machines for real: a run in its own host name and pid namespace (``unshare``, root only)
    writes into a shared folder. While it lives, a run here is refused (its pid means nothing here,
    its heartbeat says it lives); killed, its lock is taken over once silent for the lease, its
    staging folder removed, and the run here finishes."""
    import signal

    import numpy as np
    from SpineKneeSegLib.core.image import Image

    from test_io import SAGITTAL

    write_image(Image(np.random.default_rng(0).normal(100, 20, (12, 48, 48)).astype(np.float32),
                      spacing=(0.5, 0.5, 3.0), direction=SAGITTAL), tmp_path / "scan.nii.gz")
    initialise_weights("knee-bones", tmp_path / "knee.pt", {"channels": (4, 8)})
    run = [sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", "knee-bones", str(tmp_path / "scan.nii.gz"),
           "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "knee.pt"), "--progress", "none"]
    lease = 3.0
    env = {**os.environ, LEASE_ENV: str(lease)}
    other = subprocess.Popen([*second_machine, *run], env={**env, "SPINEKNEESEG_PAUSE_AT_STAGE": "staged:120"},
                             start_new_session=True)
    try:
        lock = tmp_path / ".out.lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not [p for p in tmp_path.iterdir() if ".partial." in p.name]:
            time.sleep(0.1)
        claim = json.loads(lock.read_text())
        assert claim["host"] == "node-b" and claim["pidns"] != _this_machine()["pidns"]
        busy = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and f"another run (process {claim['pid']} on node-b" in busy.stderr
    finally:
        os.killpg(other.pid, signal.SIGKILL)  # the machine is lost: no clean-up of any kind
        killed = time.monotonic()
        other.wait(timeout=30)
    assert lock.exists() and [p for p in tmp_path.iterdir() if ".partial." in p.name]
    taken = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0, taken.stderr
    # not before the lease ran out: its last heartbeat came at most lease / 6 before the kill
    assert time.monotonic() - killed >= lease * 5 / 6 - 0.1
    assert (tmp_path / "out" / "labels.nii.gz").exists() and not lock.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial." in p.name]


def test_a_lock_judged_stale_but_taken_meanwhile_is_left_to_its_new_owner(tmp_path):
    """Runs that judge one dead lock at the same moment (a cohort re-run as several jobs): the first
    takes it over; the second must not then remove the first's fresh lock, nor its staging folder."""
    from SpineKneeSegLib.core.atomic import _remove_dead_runs_lock

    lock, staging = tmp_path / ".out.lock", tmp_path / ".out.partial.5555.abc"
    _claim(lock, host="node-3")
    judged = lock.read_text()
    _claim(lock, host="node-5", pid=5555)  # node-5 took it over first and is staging its result
    fresh = lock.read_text()
    staging.mkdir()
    assert not _remove_dead_runs_lock(tmp_path / "out", judged)
    assert lock.read_text() == fresh and staging.is_dir()
    _claim(lock, host="node-3")  # the judged claim itself goes, with the dead run's staging folders
    assert _remove_dead_runs_lock(tmp_path / "out", lock.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_runs_meeting_one_dead_lock_together_never_hold_it_together(tmp_path):
    lock = tmp_path / ".out.lock"
    _claim(lock, host="node-3")
    _age(lock, 3600)
    held, lock_of_held, start = [], threading.Lock(), threading.Barrier(8)

    def contend():
        start.wait()
        try:
            with output_lock(tmp_path / "out"):
                with lock_of_held:
                    held.append(("in", time.monotonic()))
                time.sleep(0.2)
                with lock_of_held:
                    held.append(("out", time.monotonic()))
        except OutputBusy:
            pass

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = [kind for kind, _ in sorted(held, key=lambda e: e[1])]
    assert events and events == ["in", "out"] * (len(events) // 2)  # one holder at a time
    assert not lock.exists() and not [p.name for p in tmp_path.iterdir()]


def test_the_mrml_caches_of_another_machine_sharing_tmp_are_not_swept(tmp_path, monkeypatch):
    """Containers that share /tmp but not their pids: a cache folder whose pid does not exist here
    may be a live run's of another machine (found by the two-machine test of test_shared_cohort,
    where one run's sweep removed the other's terminologies mid-run). Only this machine's are swept."""
    import tempfile

    from SpineKneeSegLib.mrml.harness import CACHE_PREFIX, cache_prefix, sweep_dead_caches

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    ours, theirs = tmp_path / f"{cache_prefix()}{dead}-a1", tmp_path / f"{CACHE_PREFIX}0badc0de-{dead}-b2"
    ours.mkdir()
    theirs.mkdir()
    assert sweep_dead_caches() == [ours]
    assert theirs.is_dir() and not ours.exists()


def test_a_lock_whose_pid_another_process_has_taken_since_is_stale(tmp_path):
    """A lock of this machine left by a killed run whose pid a new process reuses: the pid lives,
    but its start time is not the one the lock recorded, so the lock is a dead run's. Without this
    a cohort would report the case busy (another run's) on every re-run."""
    import socket

    from SpineKneeSegLib.core.atomic import lock_holder, process_start

    here = {"host": socket.gethostname(), "pidns": _this_machine()["pidns"], "started": "x"}
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "pid_start": process_start(os.getpid()), **here}))
    assert lock_holder(tmp_path / "out")["pid"] == os.getpid() and not lock_is_stale(tmp_path / "out")
    lock.write_text(json.dumps({"pid": os.getpid(), "pid_start": "1", **here}))  # this pid's earlier owner
    assert lock_holder(tmp_path / "out") is None and lock_is_stale(tmp_path / "out")
    with output_lock(tmp_path / "out"):  # taken over
        assert json.loads(lock.read_text())["pid_start"] == process_start(os.getpid())
    lock.write_text(json.dumps({"pid": os.getpid(), **here}))  # an older lock, without the start: the pid decides
    assert not lock_is_stale(tmp_path / "out")


def test_a_cohorts_first_pass_does_not_watch_a_lock_another_machine_made_after_its_glance(tmp_path, monkeypatch):
    """Runs over one cohort that start together race for the same cases: the loser finds the
    winner's fresh lock after its own glance said free. In the first pass that lock counts as held
    at once (put off); watched, each such meeting would cost up to a heartbeat, one after another.
    The second pass watches it: here the other machine died at once, so it is taken over after
    its lease and the case runs."""
    from SpineKneeSegLib.core.progress import Progress
    from SpineKneeSegLib.engine import batch
    from SpineKneeSegLib.engine.pipeline import RunOptions
    from SpineKneeSegLib.tasks import TASKS

    lease = 3.0
    monkeypatch.setenv(LEASE_ENV, str(lease))
    initialise_weights("knee-bones", tmp_path / "knee.pt", {"channels": (4, 8)}, seed=1)
    write_image(make_phantom("knee-bones", seed=1).image, tmp_path / "knee.nii.gz")
    case = batch.ManifestCase("a", [str(tmp_path / "knee.nii.gz")], {})
    out = tmp_path / "out"
    out.mkdir()
    options = RunOptions(weights=str(tmp_path / "knee.pt"))
    glance = batch.lock_holder
    monkeypatch.setattr(batch, "lock_holder", lambda target: None)  # the glance came just before the lock
    _claim(out / ".a.lock", host="node-9")  # made now, never refreshed: that machine is gone
    started, lines = time.monotonic(), io.StringIO()
    row = batch.run_one(TASKS["knee-bones"], case, out, options, Progress("json", lines), put_off_held=True)
    assert row[1] == "busy" and "node-9" in row[3]
    assert time.monotonic() - started < lease / 2  # no watch (a watch of this silent lock lasts its lease)
    assert '"started' not in lines.getvalue()  # a case it never held is not said to have started
    monkeypatch.setattr(batch, "lock_holder", glance)
    row = batch.run_one(TASKS["knee-bones"], case, out, options, Progress("json", lines))
    assert row[1] == "ok" and time.monotonic() - started >= lease - 0.2  # watched for its lease, then taken
    assert '"started (again: the process running it ended, 1 time)"' in lines.getvalue()
    assert (out / ".a.deaths").exists() is False and (out / "a" / "labels.nii.gz").is_file()


def test_a_case_another_machine_runs_is_watched_once_before_it_is_called_busy(tmp_path, monkeypatch):
    """A cohort judging a case that another machine's live run holds watches its lock for one
    heartbeat, once: not again inside run_case (a second watch would double the wait at the end of
    every job of an array, once for each case the other jobs still run)."""
    from SpineKneeSegLib.core import atomic
    from SpineKneeSegLib.core.progress import Progress
    from SpineKneeSegLib.engine import batch
    from SpineKneeSegLib.engine.pipeline import RunOptions
    from SpineKneeSegLib.tasks import TASKS

    monkeypatch.setenv(LEASE_ENV, "3")
    out = tmp_path / "out"
    out.mkdir()
    _claim(out / ".a.lock", host="node-7")
    watches = []
    real = atomic._silent_for_lease
    monkeypatch.setattr(atomic, "_silent_for_lease", lambda lock, wait: watches.append(wait) or real(lock, wait))
    stop = threading.Event()
    _beat(out / ".a.lock", stop, every=0.5)  # the other machine's heartbeat, every lease / 6
    try:
        case = batch.ManifestCase("a", [str(tmp_path / "knee.nii.gz")], {})
        row = batch.run_one(TASKS["knee-bones"], case, out, RunOptions(weights=str(tmp_path / "none.pt")),
                            Progress("none"))
    finally:
        stop.set()
    assert row[1] == "busy" and "node-7" in row[3]
    assert watches.count(True) == 1 and not (out / "a").exists()
