"""Beyond one machine (issue 25, part 4): a manifest on a Dask distributed cluster (a LocalCluster
of two worker processes here) runs the same per-case code as the local pool: the same outputs,
the same summary rows, a failing case reported and skipped, finished cases not redone."""
import json
from pathlib import Path

import numpy as np
import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.image_io import read_image, write_image
from SpineKneeSegLib.engine.weights import initialise_weights
from SpineKneeSegLib.tasks import make_phantom

distributed = pytest.importorskip("distributed")
pytestmark = [pytest.mark.mrml, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as local:
        yield local.scheduler_address


def _summary(folder):
    lines = [line.split("\t") for line in (folder / "summary.tsv").read_text().splitlines()]
    return {row[0]: row[1] for row in lines[1:]}


def test_a_manifest_on_a_cluster_matches_the_local_run_and_resumes(cluster, tmp_path, capsys):
    weights = tmp_path / "knee.pt"
    initialise_weights("knee-bones", weights, {"channels": (4, 8)}, seed=1)
    for seed in (1, 2):
        write_image(make_phantom("knee-bones", seed=seed).image, tmp_path / f"knee{seed}.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("id,input\na,knee1.nii.gz\nbroken,bad.nii.gz\nb,knee2.nii.gz\n")
    common = ["run", "--task", "knee-bones", "--manifest", str(manifest), "--weights", str(weights), "--progress", "none"]

    assert cli.main(common + ["-o", str(tmp_path / "local")]) == 2
    assert cli.main(common + ["-o", str(tmp_path / "cluster"), "--scheduler", cluster]) == 2
    assert _summary(tmp_path / "cluster") == _summary(tmp_path / "local") == {"a": "ok", "broken": "failed", "b": "ok"}
    for case in ("a", "b"):  # the same code on another process gives the same result
        local = read_image(tmp_path / "local" / case / "labels.nii.gz")
        remote = read_image(tmp_path / "cluster" / case / "labels.nii.gz")
        assert np.array_equal(local.array, remote.array) and local.same_geometry(remote)
        report = json.loads((tmp_path / "cluster" / case / "report.json").read_text())
        assert report["status"] == "ok"
    assert not (tmp_path / "cluster" / "broken").exists()
    # the cohort's table of every case's volumes, as the local run gathers it
    cohort_volumes = [(tmp_path / run / "cohort_volumes.tsv").read_text() for run in ("local", "cluster")]
    assert cohort_volumes[0] == cohort_volumes[1] and cohort_volumes[0].count("\na\t") == 4

    before = (tmp_path / "cluster" / "a" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    bar = common[:-1] + ["bar"]  # the console: each case named, a failure as an error, as the local run words it
    assert cli.main(bar + ["-o", str(tmp_path / "cluster"), "--scheduler", cluster]) == 2  # broken still fails
    console = capsys.readouterr().err.splitlines()
    for case in ("a", "b"):
        assert any(line.startswith(f"[spinekneeseg] info: {case}: skipped, finished earlier (") for line in console)
    assert any(line.startswith("[spinekneeseg] error: broken: failed: ") and "bad.nii.gz" in line for line in console)
    assert _summary(tmp_path / "cluster") == {"a": "skipped", "broken": "failed", "b": "skipped"}
    assert (tmp_path / "cluster" / "a" / "report.json").stat().st_mtime_ns == before


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path, capsys):
    manifest = tmp_path / "cases.csv"
    manifest.write_text("id,input\na,x.nii.gz\n")
    code = cli.main(["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(tmp_path / "o"),
                     "--scheduler", "tcp://127.0.0.1:9", "--progress", "none"])
    assert code == 2 and "cannot reach the Dask scheduler" in capsys.readouterr().err


def test_a_worker_whose_first_case_is_refused_collects_garbage_again(tmp_path):
    """A Dask worker pauses its collector for its first case's imports; a case refused before them
    (a missing input) must still leave the worker collecting, since the worker lives on."""
    import subprocess
    import sys

    probe = ("import gc, sys; from SpineKneeSegLib.engine.batch import ManifestCase, _run_one_on_worker; "
             "from SpineKneeSegLib.engine.pipeline import RunOptions; "
             f"row = _run_one_on_worker('knee-bones', ManifestCase('a', [{str(tmp_path / 'missing.nii.gz')!r}], {{}}), "
             f"{str(tmp_path / 'out')!r}, RunOptions()); print(row[1], gc.isenabled())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "failed True"


def _kill_the_workers_running_a(tmp_path, monkeypatch, allowed_failures: int, kills: int, pause_s: float,
                                *extra) -> tuple[int, list[int], Path]:
    """Cases a and b on a fresh two-worker LocalCluster (Dask's ``allowed-failures`` set), the
    process running a killed with SIGKILL ``kills`` times (each a new pid, read from a's lock)
    while it pauses ``pause_s`` at loading. Returns the exit code, the pids killed and the output."""
    import os
    import signal
    import threading
    import time

    import dask

    weights = tmp_path / "knee.pt"
    initialise_weights("knee-bones", weights, {"channels": (4, 8)}, seed=1)
    write_image(make_phantom("knee-bones", seed=1).image, tmp_path / "knee.nii.gz")
    (tmp_path / "cases.csv").write_text("id,input\na,knee.nii.gz\nb,knee.nii.gz\n")
    out = tmp_path / "out"
    monkeypatch.setenv("SPINEKNEESEG_PAUSE_AT_STAGE", f"loading:{pause_s}")  # the workers inherit it
    killed = []

    def kill_each_worker_running_a():
        deadline = time.monotonic() + 120
        while len(killed) < kills and time.monotonic() < deadline:
            try:
                pid = json.loads((out / ".a.lock").read_text())["pid"]
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)

    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}), distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=50) as local:
        # (":0": the module's cluster holds the scheduler's default HTTP port)
        killer = threading.Thread(target=kill_each_worker_running_a)
        killer.start()
        code = cli.main(["run", "--task", "knee-bones", "--manifest", str(tmp_path / "cases.csv"), "-o", str(out),
                         "--weights", str(weights), "--scheduler", local.scheduler_address, *extra])
        killer.join()
    return code, killed, out


def test_a_worker_that_dies_running_a_case_fails_that_case_not_the_cohort(tmp_path, monkeypatch, capsys):
    """A worker killed mid-case (out of memory, a crash in native code) must not stop the cohort:
    that case is reported failed, the others run. Dask retries a dead worker's task on another
    (``allowed-failures``, 3 by default); here none, so the first death is final."""
    code, killed, out = _kill_the_workers_running_a(tmp_path, monkeypatch, 0, 1, 4)
    assert code == 1 and len(killed) == 1
    rows = {line.split("\t")[0]: line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:]}
    assert rows["a"][1:3] == ["failed", "1"] and "worker" in rows["a"][3] and "KilledWorker" in rows["a"][3]
    assert rows["b"][1] == "ok" and (out / "b" / "labels.nii.gz").is_file()
    assert "[spinekneeseg] error: a: failed: " in capsys.readouterr().err


def test_dask_runs_a_dead_workers_case_again_until_the_deaths_record_stops_it(tmp_path, monkeypatch):
    """With Dask's own retries (``allowed-failures``, 3 by default) a case whose worker died runs
    again on another worker, which counts the death from the lock the dead one left. A case that
    kills its worker twice is then reported failed, not handed round the cluster until Dask gives
    up with KilledWorker; the other case runs."""
    code, killed, out = _kill_the_workers_running_a(tmp_path, monkeypatch, 3, 2, 3, "--progress", "none")
    assert len(killed) == 2 and code == 1
    rows = {line.split("\t")[0]: line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:]}
    assert rows["a"][1:3] == ["failed", "1"]
    assert "not run again" in rows["a"][3] and "2 times" in rows["a"][3] and "KilledWorker" not in rows["a"][3]
    assert rows["b"][1] == "ok"
    assert (out / ".a.deaths").read_text().split()[0] == "2" and not (out / ".a.lock").exists()


def test_a_cohort_on_a_cluster_halts_on_a_full_disk(cluster, tmp_path, small_disk):
    """The same halt as the local run's (test_cli): once a case fails for want of space in the
    shared output folder, the client cancels the cases not yet begun; the same command resumes."""
    weights = tmp_path / "knee.pt"
    initialise_weights("knee-bones", weights, {"channels": (4, 8)}, seed=1)
    write_image(make_phantom("knee-bones", seed=1).image, tmp_path / "knee.nii.gz")
    (tmp_path / "cases.csv").write_text("id,input\n" + "".join(f"c{i},knee.nii.gz\n" for i in range(8)))
    out = small_disk("1900k") / "out"
    command = ["run", "--task", "knee-bones", "--manifest", str(tmp_path / "cases.csv"), "-o", str(out),
               "--weights", str(weights), "--scheduler", cluster, "--progress", "none"]
    assert cli.main(command) == 2
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:]]
    status = [row[1] for row in rows]
    assert set(status) <= {"ok", "failed", "pending"} and "pending" in status and status.count("ok") <= 3
    assert all("No space left on device" in row[3] for row in rows if row[1] == "failed")
    small_disk("30m")
    assert cli.main(command) == 0
    assert set(_summary(out).values()) <= {"ok", "skipped"} and len(_summary(out)) == 8
