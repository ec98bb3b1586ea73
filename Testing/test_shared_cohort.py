"""Several runs over one manifest and one output folder at the same time (issue 25, part 4: the jobs
of a job array on a cluster without Dask, or the same command started twice). The case locks share
the cases out: a case another live run holds is "busy" in this run, that run's to finish, not a failure
(exit 0); it is put off to the end at a glance, so runs that keep meeting each other's cases do not
watch each one. summary.tsv is written in turns and merged: the run that ends last leaves every
case's own outcome, ok rows (with their timings) from whichever run made them."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.atomic import file_system_now, output_lock
from SpineKneeSegLib.core.errors import AlreadyFinished
from SpineKneeSegLib.core.image_io import write_image
from SpineKneeSegLib.core.progress import Progress
from SpineKneeSegLib.engine import batch
from SpineKneeSegLib.engine.pipeline import RunOptions, run_case, warnings_text
from SpineKneeSegLib.engine.weights import initialise_weights
from SpineKneeSegLib.tasks import TASKS, make_phantom


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Tiny knee weights, a phantom scan and a manifest of cases a, b, c on it."""
    folder = tmp_path_factory.mktemp("cohort")
    initialise_weights("knee-bones", folder / "knee.pt", {"channels": (4, 8)}, seed=1)
    write_image(make_phantom("knee-bones", seed=1).image, folder / "knee.nii.gz")
    (folder / "cases.csv").write_text("id,input\na,knee.nii.gz\nb,knee.nii.gz\nc,knee.nii.gz\n")
    return folder


def _rows(out: Path) -> dict:
    return {row[0]: row for row in (line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:])}


def _run(cohort: Path, out: Path, *extra) -> int:
    return cli.main(["run", "--task", "knee-bones", "--manifest", str(cohort / "cases.csv"), "-o", str(out),
                     "--weights", str(cohort / "knee.pt"), *extra])


def test_a_case_another_run_holds_is_busy_and_the_last_run_to_end_settles_the_summary(cohort, tmp_path, capsys):
    """Run B began first and holds b (here: this process, a live run of this machine). Run A, the
    command, runs a and c, finds b busy: exit 0, b's row busy. B then finishes b and writes its
    summary, in which a and c are rows it could not settle (busy when met, or finished meanwhile):
    it keeps A's ok rows for them. Had A ended last instead, its busy b would take B's ok row."""
    out = tmp_path / "out"
    out.mkdir()
    b_began = file_system_now(out)
    with output_lock(out / "b"):
        assert _run(cohort, out, "--dry-run") == 0
        plan = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]}
        assert [plan[c][1] for c in "abc"] == ["run", "busy", "run"]
        assert f"another run (process {os.getpid()} on " in plan["b"][3]

        a_began = file_system_now(out)
        assert _run(cohort, out) == 0
    console = capsys.readouterr().err
    a_rows = _rows(out)
    assert [a_rows[c][1:3] for c in "abc"] == [["ok", "0"], ["busy", "0"], ["ok", "0"]]
    assert f"another run (process {os.getpid()} on " in a_rows["b"][3] and not (out / "b").exists()
    assert "2/3 cases ok, 1 left to the other run that held them" in console
    assert "error" not in console

    # B finishes b, then writes its summary last
    report = run_case(TASKS["knee-bones"], [str(cohort / "knee.nii.gz")], out / "b",
                      RunOptions(weights=str(cohort / "knee.pt")))
    b_row = ("b", "ok", 0, "", str(out / "b"), report["timings_s"]["total"], report["timings_s"]["network"],
             warnings_text(report["warnings"]))
    batch.write_summary(out, [batch.busy_row("a", "run A"), b_row,
                              ("c", "skipped", 0, "finished earlier", str(out / "c"), "", "", "")], b_began)
    merged = _rows(out)
    assert merged["a"] == a_rows["a"] and merged["c"] == a_rows["c"]  # A's own rows, timings included
    assert merged["b"] == [str(v) for v in b_row]

    # had A written last: its busy b is settled by B's row, its own rows stay
    batch.write_summary(out, [tuple(a_rows[c]) for c in "abc"], a_began)
    assert _rows(out) == merged
    # a plain re-run: everything finished before it began, so skipped rows of its own
    assert _run(cohort, out) == 0
    assert {c: r[1] for c, r in _rows(out).items()} == {"a": "skipped", "b": "skipped", "c": "skipped"}


def test_the_summary_carries_each_finished_cases_warnings(cohort, tmp_path, capsys):
    """A case can end "ok" and still be flagged (here the knee's plausibility checks fail on untrained
    weights; on real scans, e.g. a doubtful level count): the summary's warnings column carries its
    report's warnings, so a reader of a large cohort finds the cases to look at by filtering one
    column. A re-run's skipped rows keep them, read from each report."""
    import re

    out = tmp_path / "out"
    assert _run(cohort, out) == 0
    rows = _rows(out)
    for case in "abc":
        report = json.loads((out / case / "report.json").read_text())
        assert "knee plausibility check failed" in rows[case][7]
        assert rows[case][7] == warnings_text(report["warnings"]) and "\t" not in rows[case][7]
    console = capsys.readouterr().err
    assert re.search(r"b: ok \(\d/3[^)]*\), with warnings \(summary.tsv's warnings column\)", console), console
    assert "3 finished cases with warnings to review" in console
    assert _run(cohort, out) == 0
    again = _rows(out)
    assert [again[c][1] for c in "abc"] == ["skipped"] * 3 and all(again[c][7] == rows[c][7] for c in "abc")
    assert "3 finished cases with warnings to review" in capsys.readouterr().err
    assert warnings_text(["one\ttab\nand a line", "two"]) == "one tab and a line | two"


def test_a_run_alone_does_not_look_at_its_cases_folders_to_write_its_summary(cohort, tmp_path, monkeypatch):
    """Only a summary.tsv another run wrote since this one began is merged: a re-run of a finished
    cohort alone (thousands of cases, a summary every 30 s, on a network file system) does not
    look at each case's folder for each write."""
    out = tmp_path / "out"
    assert _run(cohort, out) == 0
    looked = []
    real = batch._finished_since
    monkeypatch.setattr(batch, "_finished_since", lambda *a: looked.append(a) or real(*a))
    monkeypatch.setattr(batch, "SUMMARY_EVERY_S", 0.0)  # a summary after every case, as a long cohort's
    assert _run(cohort, out) == 0
    assert looked == [] and {c: r[1] for c, r in _rows(out).items()} == dict.fromkeys("abc", "skipped")


def test_a_busy_case_whose_holder_ended_without_a_result_is_pending_or_its_failure(cohort, tmp_path):
    """The run that held b ended without a result: with no row of its own, b is pending ("run the
    same command again"); where it wrote b's failure, that row."""
    out = tmp_path / "out"
    out.mkdir()
    began = file_system_now(out)
    rows = [("a", "ok", 0, "", str(out / "a"), 1.0, 0.5, ""), batch.busy_row("b", "run B")]
    batch.write_summary(out, rows, began)
    assert _rows(out)["b"][1:4] == ["pending", "2", "not run: the run that held it ended without a result; run "
                                                    "the same command again"]
    assert _rows(out)["a"][1] == "ok"
    batch.write_summary(out, [("a", "busy", "", "", "", "", "", ""),
                              ("b", "failed", 2, "b.nii.gz: empty", "", "", "", "")])
    batch.write_summary(out, rows, began)  # this run's ok a is its own; b: the holder's failure
    assert _rows(out)["b"][1:4] == ["failed", "2", "b.nii.gz: empty"] and _rows(out)["a"][1] == "ok"


@pytest.mark.parametrize("holder", ["finished", "ended without a result", "failed"])
def test_the_last_line_and_exit_code_are_the_summarys_as_written(cohort, tmp_path, holder):
    """This run met b busy. The run that held it, ending before this one's summary, finished it, or
    ended without a result, or wrote its failure: the last console line and the exit code say what
    summary.tsv says (before: "1 left to the other run" and exit 0 in all three); the rate counts only
    the case this run ran itself."""
    out = tmp_path / "out"
    out.mkdir()
    began = file_system_now(out)
    for case in ("ab" if holder == "finished" else "a"):  # a: this run's own; b: the holder's
        run_case(TASKS["knee-bones"], [str(cohort / "knee.nii.gz")], out / case,
                 RunOptions(weights=str(cohort / "knee.pt")))
    if holder == "failed":
        batch.write_summary(out, [("a", "busy", "", "", "", "", "", ""),
                                  ("b", "failed", 2, "b.nii.gz: empty", "", "", "", "")])
    rows = [("a", "ok", 0, "", str(out / "a"), 1.0, 0.5, ""), batch.busy_row("b", "run B")]
    lines = io.StringIO()
    code = batch.finish_manifest(rows, out, 60.0, Progress("bar", lines), began)
    console = lines.getvalue()
    status = _rows(out)["b"][1]
    assert "1/2 cases ok" in console and "(1.0 cases per minute)" in console and "left to the other" not in console
    if holder == "finished":
        assert (status, code) == ("skipped", 0) and "1 finished by the other run that held them" in console
    elif holder == "failed":
        assert (status, code) == ("failed", 2) and "finished by" not in console
    else:
        assert (status, code) == ("pending", 2) and "1 not run" in console


def test_a_summary_another_run_of_an_older_version_wrote_is_merged_with_blank_warnings():
    """A job array may mix versions: a summary.tsv written before the warnings column (session 43)
    is still read for the merge, its rows with blank warnings; a file of other columns is not."""
    older = "id\tstatus\texit_code\tmessage\toutput\ttotal_s\tnetwork_s\nb\tok\t0\t\t/x/b\t1.2\t0.5\n"
    assert batch.summary_rows(older) == {"b": ("b", "ok", "0", "", "/x/b", "1.2", "0.5", "")}
    assert batch.summary_rows("id\tstatus\nb\tok\n") == {} and batch.summary_rows("") == {}


@pytest.mark.parametrize("stale_looks", [1, 2])
def test_a_case_finished_by_another_run_after_this_one_looked_is_skipped(cohort, tmp_path, monkeypatch,
                                                                          stale_looks):
    """Another run may finish a case after this run's first look said not finished: during the
    watch of its lock (a second look then says so), or even after that look, before this run takes
    the lock (which then finds the finished result). Either way the case is skipped, not failed."""
    out = tmp_path / "out"
    case = batch.ManifestCase("a", [str(cohort / "knee.nii.gz")], {})
    options = RunOptions(weights=str(cohort / "knee.pt"))
    run_case(TASKS["knee-bones"], case.inputs, out / "a", options)  # the other run's result
    with pytest.raises(AlreadyFinished):
        run_case(TASKS["knee-bones"], case.inputs, out / "a", options)
    looked = []
    real = batch.preflight

    def looked_before_it_finished(*args):  # the first look came before the other run's commit
        looked.append(args)
        return None if len(looked) <= stale_looks else real(*args)

    monkeypatch.setattr(batch, "preflight", looked_before_it_finished)
    lines = io.StringIO()
    row = batch.run_one(TASKS["knee-bones"], case, out, options, Progress("json", lines))
    assert row[1:3] == ("skipped", 0) and row[3].startswith("finished earlier") and len(looked) == stale_looks + 1
    assert "started" not in lines.getvalue()  # this run never held it


def test_overwrite_does_not_redo_a_case_another_run_finished_since_this_one_began(cohort, tmp_path):
    """--overwrite redoes finished cases, but a result made after this cohort began is another
    run's over the same cohort (or its own case's, retried by Dask after its worker died having
    finished it): skipped, so runs together with --overwrite do not redo each other's work.
    A result older than this run's start is redone."""
    out = tmp_path / "out"
    case = batch.ManifestCase("a", [str(cohort / "knee.nii.gz")], {})
    options = RunOptions(weights=str(cohort / "knee.pt"), overwrite=True)
    run_case(TASKS["knee-bones"], case.inputs, out / "a", options)  # an earlier run's result
    began = file_system_now(out)
    first = (out / "a" / "report.json").stat().st_mtime_ns
    row = batch.run_one(TASKS["knee-bones"], case, out, options, Progress("none"), began=began)
    assert row[1] == "ok" and (out / "a" / "report.json").stat().st_mtime_ns != first  # made before: redone
    again = batch.run_one(TASKS["knee-bones"], case, out, options, Progress("none"), began=began)
    assert again[1:3] == ("skipped", 0) and "finished since this cohort began" in again[3]
    assert batch.preflight(TASKS["knee-bones"], case, out, True) is None  # no start known: --overwrite redoes


def test_overwrite_keeps_the_deaths_this_cohort_counted(cohort, tmp_path):
    """--overwrite starts a case's deaths count afresh, but not a count made since the cohort began:
    in a job array run with --overwrite, each job would otherwise reset it and die on the same case
    in turn. Each case here has a lock a dead machine left (one death more)."""
    out = tmp_path / "out"
    out.mkdir()
    options = RunOptions(weights=str(cohort / "knee.pt"), overwrite=True)

    def left_by_a_dead_run(case_id: str, deaths_counted_since_began: bool) -> batch.ManifestCase:
        lock, record, old = out / f".{case_id}.lock", out / f".{case_id}.deaths", time.time() - 600
        lock.write_text(json.dumps({"pid": 4242, "host": "node-3", "pidns": "pid:[4026531836]",
                                    "started": "2026-12-07 09:00:00"}))
        os.utime(lock, (old, old))
        record.write_text("1\n")
        if not deaths_counted_since_began:
            os.utime(record, (old, old))
        return batch.ManifestCase(case_id, [str(cohort / "knee.nii.gz")], {})

    earlier = left_by_a_dead_run("a", deaths_counted_since_began=False)  # an earlier cohort's count
    began = file_system_now(out)
    row = batch.run_one(TASKS["knee-bones"], earlier, out, options, Progress("none"), began=began)
    assert row[1] == "ok" and not (out / ".a.deaths").exists()  # reset: the dead run's is its first death

    this_cohorts = left_by_a_dead_run("b", deaths_counted_since_began=True)  # another job's count
    row = batch.run_one(TASKS["knee-bones"], this_cohorts, out, options, Progress("none"), began=began)
    assert row[1:3] == ("failed", 1) and "ended without finishing 2 times" in row[3]
    assert (out / ".b.deaths").read_text().split() == ["2"] and not (out / "b").exists()


@pytest.mark.slow
@pytest.mark.parametrize("machines", [1, 2])
def test_two_runs_started_together_share_the_cohort(tmp_path, machines, request):
    """Two real command-line runs of one manifest into one folder, started together, each case
    pausing 1 s while it holds its lock (so the runs meet): every case is run by exactly one of
    them, neither fails, and the summary left at the end has every case ok. On two machines (the
    second one's pid means nothing here) the locks are judged by their heartbeats: a held case is
    put off at a glance, and only watched at the end."""
    from SpineKneeSegLib.core.atomic import LEASE_ENV

    second = request.getfixturevalue("second_machine") if machines == 2 else []
    initialise_weights("knee-bones", tmp_path / "knee.pt", {"channels": (4, 8)}, seed=1)
    write_image(make_phantom("knee-bones", seed=1).image, tmp_path / "knee.nii.gz")
    cases = [f"c{i}" for i in range(8)]
    (tmp_path / "cases.csv").write_text("id,input\n" + "".join(f"{c},knee.nii.gz\n" for c in cases))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", "knee-bones", "--manifest",
               str(tmp_path / "cases.csv"), "-o", str(out), "--weights", str(tmp_path / "knee.pt"), "--workers", "1"]
    env = {**os.environ, "SPINEKNEESEG_PAUSE_AT_STAGE": "loading:1", LEASE_ENV: "3"}
    runs = [subprocess.Popen(prefix + command, env=env, stderr=subprocess.PIPE, text=True) for prefix in ([], second)]
    consoles = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], consoles
    ran = {c: [i for i, console in enumerate(consoles) if f"{c}: ok (" in console] for c in cases}
    assert all(len(by) == 1 for by in ran.values()), (ran, consoles)
    assert {by[0] for by in ran.values()} == {0, 1}  # both did a share
    assert "another run holds it" in "".join(consoles), consoles  # they met (8 s of held locks)
    rows = _rows(out)
    assert {c: r[1] for c, r in rows.items()} == dict.fromkeys(cases, "ok"), rows
    assert all(json.loads((out / c / "report.json").read_text())["task"] == "knee-bones" for c in cases)
    # the run that ended last gathered every case's volumes, those the other run made included
    gathered = [line.split("\t")[0] for line in (out / "cohort_volumes.tsv").read_text().splitlines()[1:]]
    assert gathered == [c for c in cases for _ in range(4)]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".lock") and p.name != batch.SUMMARY_LOCK]
