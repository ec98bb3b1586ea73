"""End to end through the real CLI entry point: phantom in, every output out, scene.mrb reloads
in a fresh slicer-core scene with every node intact. Networks are tiny untrained initialisations
(`--weights PATH`): these tests check the plumbing and geometry, not accuracy."""
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.image_io import read_image, write_image
from SpineKneeSegLib.engine import batch
from SpineKneeSegLib.engine.weights import initialise_weights, sha256_of
from SpineKneeSegLib.tasks import TASKS, make_phantom

pytestmark = pytest.mark.mrml
TIMING_KEYS = {"load", "preprocess", "network", "postprocess", "write", "total", "mrml_startup", "startup"}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for task, card in TASKS.items():
        paths[task] = folder / f"{task}.pt"
        tiny = {"channels": (4, 8)} if card.network.factory == "unet2d" else {"levels": 3, "max_channels": 8}
        initialise_weights(task, paths[task], tiny, seed=1)
        for aux in card.auxiliary:
            paths[f"{task}:{aux.name}"] = folder / f"{task}-{aux.name}.pt"
            tiny_aux = ({"channels": (4, 8)} if aux.network.factory == "unet2d" else {"width": 4}
                        if aux.network.factory == "level_refiner" else {"levels": 3, "max_channels": 8})
            initialise_weights(task, paths[f"{task}:{aux.name}"], tiny_aux, seed=2, model=aux.name)
    return paths


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    files = {}
    for task in TASKS:
        phantom = make_phantom(task, seed=3)
        files[task] = folder / f"{task}.nii.gz"
        write_image(phantom.image, files[task])
    return files


def _run(task, inputs, out, weights, *extra, aux=None):
    aux_args = [a for name, path in (aux or {}).items() for a in ("--aux-weights", f"{name}={path}")]
    return cli.main(["run", "--task", task, *map(str, inputs), "-o", str(out), "--weights", str(weights), *aux_args,
                     *extra])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_run_writes_every_output_in_the_input_geometry(task, tmp_path, tiny_weights, phantom_files, capsys):
    out = tmp_path / "out"
    assert _run(task, [phantom_files[task]], out, tiny_weights[task], "--scene", "--progress", "json") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert events[-1]["event"] == "done"
    assert {e["stage"] for e in events if e["event"] == "stage"} >= {"loading", "preprocessing", "postprocessing",
                                                                      "writing"}
    assert any(e["event"] == "progress" and e["step"] == e["total"] for e in events)
    card = TASKS[task]
    for name in card.outputs + ("scene.mrb",):
        # a name ending in "/" is a folder output (overlays/), which must hold files
        assert ((out / name).is_dir() and any((out / name).iterdir())) if name.endswith("/") else (
            out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if ".partial." in p.name]

    source = read_image(phantom_files[task])
    labels = read_image(out / "labels.nii.gz")
    assert labels.array.dtype == np.uint8 and labels.array.shape == source.array.shape
    assert np.allclose(labels.ijk_to_ras, source.ijk_to_ras, atol=1e-4)
    assert set(np.unique(labels.array)) <= {0} | {s.value for s in card.labels}

    report = json.loads((out / "report.json").read_text())
    assert report["task"] == task and report["status"] == "ok"
    assert TIMING_KEYS <= set(report["timings_s"])
    t = report["timings_s"]
    assert t["total"] >= t["network"] > 0
    # issue 25: total is the wait from the end of the imports to the last file: MRML start-up is in it
    assert t["total"] >= t["network"] + t["mrml_startup"] + t["write"] - 1e-3
    assert t["startup"] > 0 and t["startup_measured"] is True
    assert report["weights"]["sha256"] == sha256_of(tiny_weights[task])
    assert {"spinekneeseg", "torch", "SimpleITK", "numpy"} <= set(report["versions"])
    assert set(report["outputs"]) >= set(card.outputs)


def test_aux_weights_errors(tmp_path, tiny_weights, phantom_files, capsys):
    out = tmp_path / "o"
    assert _run("lumbar-foramina", [phantom_files["lumbar-foramina"]], out, tiny_weights["lumbar-foramina"],
                aux={"nonsense": tiny_weights["lumbar-foramina:foramina"]}) == 2
    assert "no auxiliary model nonsense" in capsys.readouterr().err
    # the level model's file offered as the foramen model is refused by its 'model' field
    assert _run("lumbar-foramina", [phantom_files["lumbar-foramina"]], out, tiny_weights["lumbar-foramina"],
                aux={"foramina": tiny_weights["lumbar-foramina"]}) == 2
    assert "model 'labels'" in capsys.readouterr().err and not out.exists()


def test_scene_mrb_reloads_with_every_node(tmp_path, tiny_weights, phantom_files):
    from SpineKneeSegLib.mrml import nodes

    out = tmp_path / "out"
    assert _run("brain-wmh", [phantom_files["brain-wmh"]], out, tiny_weights["brain-wmh"], "--scene",
                "--progress", "none") == 0
    app = nodes.load_scene_mrb(out / "scene.mrb")
    scene = app.scene
    volumes = list(_nodes(scene, "vtkMRMLScalarVolumeNode"))
    segs = list(_nodes(scene, "vtkMRMLSegmentationNode"))
    tables = list(_nodes(scene, "vtkMRMLTableNode"))
    assert len(volumes) == 1 and len(segs) == 1 and len(tables) == 1
    source = read_image(phantom_files["brain-wmh"])
    assert nodes.volume_node_to_image(volumes[0]).same_geometry(source)
    segmentation = segs[0].GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["lesion"]
    labels = nodes.segmentation_node_to_labels(segs[0], source, TASKS["brain-wmh"].labels)
    assert np.array_equal(labels, read_image(out / "labels.nii.gz").array)
    rows = nodes.table_node_to_rows(tables[0])
    lesion_tsv = (out / "lesions.tsv").read_text().splitlines()
    assert len(rows) == len(lesion_tsv) - 1


def test_foramina_markups_and_scene(tmp_path, tiny_weights, phantom_files):
    from SpineKneeSegLib.mrml import nodes

    out = tmp_path / "out"
    assert _run("lumbar-foramina", [phantom_files["lumbar-foramina"]], out, tiny_weights["lumbar-foramina"],
                "--scene", "--progress", "none",
                aux={"foramina": tiny_weights["lumbar-foramina:foramina"]}) == 0
    data = json.loads((out / "foramina.mrk.json").read_text())
    assert data["markups"][0]["type"] == "Fiducial"
    report = json.loads((out / "report.json").read_text())
    labels = [p["label"] for p in data["markups"][0]["controlPoints"]]
    assert len(labels) == report["summaries"]["foramina"]["found"]
    assert all(label.split()[0] in {f"L{k}" for k in range(1, 6)} for label in labels)
    app = nodes.load_scene_mrb(out / "scene.mrb")
    assert len(list(_nodes(app.scene, "vtkMRMLMarkupsFiducialNode"))) == 1


def _summary_rows(out: Path) -> dict:
    """A cohort's summary.tsv: case id -> its row's cells."""
    return {row[0]: row for row in (line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:])}


def test_no_weights_exits_3(tmp_path, phantom_files, capsys, monkeypatch):
    monkeypatch.setenv("SPINEKNEESEG_MODELS", str(tmp_path / "empty-registry"))
    code = cli.main(["run", "--task", "knee-bones", str(phantom_files["knee-bones"]), "-o", str(tmp_path / "o")])
    assert code == 3
    assert "no weights for knee-bones" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_manifest_runs_every_case_and_reports_failures(tmp_path, tiny_weights, phantom_files):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,input\ngood1,{phantom_files['knee-bones']}\nbroken,bad.nii.gz\n"
                        f"good2,{phantom_files['knee-bones']}\n")
    out = tmp_path / "batch"
    code = cli.main(["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out),
                     "--weights", str(tiny_weights["knee-bones"]), "--progress", "none"])
    assert code == 2
    lines = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    status = {row[0]: (row[1], row[2]) for row in lines[1:]}
    assert status == {"good1": ("ok", "0"), "broken": ("failed", "2"), "good2": ("ok", "0")}
    assert (out / "good1" / "labels.nii.gz").is_file() and (out / "good2" / "segmentation.seg.nrrd").is_file()
    assert not (out / "broken").exists()

    # a re-run resumes: finished cases are skipped (not redone, not refused), the failed one is retried
    finished = (out / "good1" / "report.json").stat().st_mtime_ns
    bad.write_bytes(Path(phantom_files["knee-bones"]).read_bytes())
    # good1's run was killed after its last file, before releasing its lock; good2's lock is held by
    # a live process (this one): only the dead one's is cleared when the finished case is skipped
    import os
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (out / ".good1.lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "started": "x"}))
    (out / ".good2.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "x"}))
    assert cli.main(["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out),
                     "--weights", str(tiny_weights["knee-bones"]), "--progress", "none"]) == 0
    lines = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert {row[0]: row[1] for row in lines[1:]} == {"good1": "skipped", "broken": "ok", "good2": "skipped"}
    assert (out / "good1" / "report.json").stat().st_mtime_ns == finished
    assert not (out / ".good1.lock").exists() and (out / ".good2.lock").exists()
    (out / ".good2.lock").unlink()
    assert cli.main(["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out), "--overwrite",
                     "--weights", str(tiny_weights["knee-bones"]), "--progress", "none"]) == 0
    assert (out / "good1" / "report.json").stat().st_mtime_ns != finished


@pytest.mark.parametrize("saved", ["excel-utf8-bom-crlf", "semicolons", "tabs", "capitalised"])
def test_a_manifest_as_spreadsheets_save_it(saved, tmp_path):
    from SpineKneeSegLib.engine.batch import read_manifest

    rows = [["ID", "Input", "Input2", "Input_note", "Notes"], ["p01", "scans/flair.nii.gz", "/abs/t1.nii.gz", "y", "x"],
            ["p02", "/abs/p02.nii.gz", "", "", ""], ["", "", "", "", ""]]  # a trailing row of empty cells
    delimiter = {"semicolons": ";", "tabs": "\t"}.get(saved, ",")
    if saved != "capitalised":
        rows[0] = [c.lower() for c in rows[0]]
    text = "\n".join(delimiter.join(r) for r in rows) + "\n"
    path = tmp_path / "cases.csv"
    if saved == "excel-utf8-bom-crlf":
        path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    else:
        path.write_text(text)
    assert read_manifest(path) == [("p01", [str(tmp_path / "scans" / "flair.nii.gz"), "/abs/t1.nii.gz"], {}, ""),
                                   ("p02", ["/abs/p02.nii.gz"], {}, "")]


@pytest.mark.parametrize("content, problem", [
    (b"case,scan\na,x.nii.gz\n", "needs columns 'id' and 'input' (found: case, scan)"),
    (b"id,input\na,x.nii.gz\na,y.nii.gz\n", "line 3: duplicate case id 'a'"),
    (b"id,input\n../up,x.nii.gz\n", "line 2: invalid case id '../up'"),
    (b"id,input\n.hidden,x.nii.gz\n", "line 2: invalid case id '.hidden'"),
    (b"id,input\nsummary.tsv,x.nii.gz\n", "line 2: invalid case id 'summary.tsv'"),  # the cohort's own file
    (b"id,input\nCohort_volumes.tsv,x.nii.gz\n", "line 2: invalid case id 'Cohort_volumes.tsv'"),  # a cohort table
    (b"id,input,echo\na,x.nii.gz,first\n", "line 2: echo 'first' is not an echo number"),
    (b"id,input\n", "lists no cases"),
    (b"id,input\nm\xfcller,x.nii.gz\n", "not UTF-8 text"),  # Latin-1, as an old Windows export
])
def test_a_bad_manifest_is_refused_naming_the_file_and_the_line(content, problem, tmp_path, capsys):
    path = tmp_path / "cases.csv"
    path.write_bytes(content)
    assert cli.main(["run", "--task", "knee-bones", "--manifest", str(path), "-o", str(tmp_path / "out"),
                     "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and problem in err, err
    assert not (tmp_path / "out").exists()


def test_a_manifest_chooses_the_series_and_the_echo_case_by_case(tmp_path, tiny_weights):
    """A PACS export's folder holds several series; a multi-echo series several echoes: the
    ``series`` and ``echo`` columns choose them per case, as --series and --echo do for one."""
    from test_io import SAGITTAL, write_dicom_series  # a sagittal knee runs as acquired

    vol = (np.arange(8 * 32 * 32).reshape(8, 32, 32) % 300).astype(np.int16)
    _, wanted = write_dicom_series(tmp_path / "study", vol, name="t2", description="Sag T2", series_number=3,
                                   direction=SAGITTAL)
    write_dicom_series(tmp_path / "study", vol[:6], name="localiser", description="Loc", series_number=1,
                       direction=SAGITTAL)
    write_dicom_series(tmp_path / "echoes", vol, echoes=[(1, 10.0), (2, 40.0)], direction=SAGITTAL)
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,input,series,echo\nchosen,study,{wanted},\nunchosen,study,,\n"
                        f"second-echo,echoes,,2\nfirst-echo,echoes,,\nby-number,study,3,\nby-name,study,*t2,\n")
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out),
                     "--weights", str(tiny_weights["knee-bones"]), "--progress", "none"]) == 2
    rows = _summary_rows(out)
    assert rows["chosen"][1] == "ok"
    assert rows["unchosen"][1:3] == ["failed", "2"] and "2 DICOM series" in rows["unchosen"][3]
    reports = {case: json.loads((out / case / "report.json").read_text()) for case in
               ("chosen", "second-echo", "first-echo")}
    assert reports["chosen"]["inputs"][0]["shape_kji"][0] == 8  # the 8-slice series, not the 6-slice localiser
    for case in ("by-number", "by-name"):  # what a whole cohort's exports share
        assert rows[case][1] == "ok"
        assert json.loads((out / case / "report.json").read_text())["inputs"][0]["shape_kji"][0] == 8
    assert read_image(out / "chosen" / "labels.nii.gz").same_geometry(read_image(tmp_path / "study", series=wanted))
    centre = {case: float(r["inputs"][0]["checks"]["intensity"].split("centre ")[1].split(",")[0])
              for case, r in reports.items()}
    assert centre["second-echo"] - centre["first-echo"] == pytest.approx(1000, abs=1)  # echo n's pixels + 1000 n
    assert any("using echo 1" in w for w in reports["first-echo"]["warnings"])  # the default, said so
    assert not any("using echo" in w for w in reports["second-echo"]["warnings"])  # chosen: no warning


def test_a_manifest_row_without_an_input_fails_that_case_only(tmp_path, tiny_weights, phantom_files):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,input\nempty,\ngood,{phantom_files['knee-bones']}\n")
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out),
                     "--weights", str(tiny_weights["knee-bones"]), "--progress", "none"]) == 2
    rows = _summary_rows(out)
    assert rows["empty"][1:4] == ["failed", "2", "the manifest gives no input for this case"]
    assert rows["good"][1] == "ok"


@pytest.mark.parametrize("mode", ["bar", "json"])
def test_a_manifest_with_two_workers_names_the_case_in_every_message(mode, tmp_path, tiny_weights, phantom_files,
                                                                     capsys):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,input\ngood,{phantom_files['knee-bones']}\nbroken,{tmp_path / 'absent.nii.gz'}\n")
    capsys.readouterr()
    assert cli.main(["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(tmp_path / "out"),
                     "--workers", "2", "--weights", str(tiny_weights["knee-bones"]), "--progress", mode]) == 2
    captured = capsys.readouterr()
    if mode == "json":
        events = [json.loads(line) for line in captured.out.splitlines()]
        per_case = [e for e in events if "case" in e]
        assert "case" not in events[-1] and "cases per minute" in events[-1]["message"]  # the cohort's summary
        assert {e["case"] for e in per_case} == {"good", "broken"}
        assert [(e["step"], e["total"]) for e in events if e.get("stage") == "cohort"] == [(1, 2), (2, 2)]
        assert len(per_case) + 3 == len(events)  # nothing else unnamed
        good = [e.get("stage") for e in per_case if e["case"] == "good" and e["event"] == "stage"]
        assert good == ["loading", "preprocessing", "postprocessing", "writing"]
        assert any(e["case"] == "good" and e["event"] == "progress" for e in per_case)
        good_events = [e for e in per_case if e["case"] == "good"]
        assert good_events[-2]["event"] == "done" and good_events[-1]["message"].startswith("ok (")
    else:  # two cases side by side share one console: no step bars, every line names its case
        lines = captured.err.splitlines()
        assert "\r" not in captured.err and "it/s" not in captured.err
        import re

        named = re.compile(r"\[spinekneeseg\] ((info|warning|error): )?(good|broken): ")
        assert all(named.match(line) for line in lines[:-1]), lines
        assert any(line.startswith("[spinekneeseg] error: broken: failed: ") for line in lines)
        assert "[spinekneeseg] good: writing" in lines and "cases per minute" in lines[-1]
        ends = [line for line in lines if line.startswith(("[spinekneeseg] info: good: ok (",
                                                           "[spinekneeseg] error: broken: failed: "))]
        assert len(ends) == 2 and " (2/2)" in ends[-1]  # each case's end counts the cohort


def test_the_cohort_count_gives_done_of_total_and_the_time_left_at_the_rate_of_cases_run(monkeypatch):
    import io
    from types import SimpleNamespace

    from SpineKneeSegLib.core.progress import Progress

    clock = [100.0]  # the count's own clock, so that a stall of the machine cannot move the figures
    monkeypatch.setattr(batch, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    log = io.StringIO()
    count = batch.CohortCount(Progress("bar", stream=log), ["a", "b", "c", "d", "e"])
    count.finished(("a", "skipped", 0, "finished earlier", "", "", "", ""))
    count.finished(("b", "failed", 2, "b.nii.gz: empty", "", "", "", ""))
    clock[0] += 6.0  # one case ok in 6 s: 10 cases/min, 2 cases left: 12 s
    count.finished(("c", "ok", 0, "", "", "", "", ""))
    count.finished(("d", "ok", 0, "", "", "", "", ""))
    count.finished(("e", "ok", 0, "", "", "", "", ""))
    lines = log.getvalue().splitlines()
    assert lines[:2] == ["[spinekneeseg] info: a: skipped, finished earlier (1/5)",  # no rate from a skip
                         "[spinekneeseg] error: b: failed: b.nii.gz: empty (2/5)"]  # nor from a refusal
    assert lines[2] == "[spinekneeseg] info: c: ok (3/5, 10.0 cases/min, about 12 s left)"
    assert lines[4] == "[spinekneeseg] info: e: ok (5/5)"


def test_a_long_cohort_keeps_its_summary_up_to_date_with_pending_cases(tmp_path, monkeypatch):
    from SpineKneeSegLib.core.progress import Progress

    count = batch.CohortCount(Progress("none"), ["a", "b", "c"], tmp_path)
    count.finished(("b", "ok", 0, "", str(tmp_path / "b"), 1.5, 0.5, ""))
    assert not (tmp_path / "summary.tsv").exists()  # not before SUMMARY_EVERY_S has passed
    monkeypatch.setattr(batch, "SUMMARY_EVERY_S", 0.0)
    count.finished(("a", "failed", 2, "a.nii.gz: empty", "", "", "", ""))
    rows = [line.split("\t") for line in (tmp_path / "summary.tsv").read_text().splitlines()]
    assert rows[0] == list(batch.SUMMARY_COLUMNS)
    assert [r[:3] for r in rows[1:]] == [["a", "failed", "2"], ["b", "ok", "0"], ["c", "pending", ""]]
    assert all(len(r) == len(batch.SUMMARY_COLUMNS) for r in rows)


def test_progress_bars_only_on_a_terminal():
    import io

    from SpineKneeSegLib.core.progress import Progress

    log = io.StringIO()  # a log file or a pipe: a bar's redraws would stay in it
    progress = Progress("bar", stream=log)
    for step in range(1, 11):
        progress.step("inference", step, 10)
    progress.stage("writing")
    assert log.getvalue() == "[spinekneeseg] writing\n"


def test_console_lines_of_cases_side_by_side_do_not_run_into_each_other():
    """A cohort's workers log from their threads to one stderr: each line is one write. With print()
    the newline was a write of its own, and two cases' lines could share one line of the console
    (seen in a two-worker cohort: "a: started[spinekneeseg] info: b: started")."""
    import re

    script = """
import sys, threading
from SpineKneeSegLib.core.progress import Progress
sys.setswitchinterval(1e-6)  # threads take turns as often as they do beside native work

def case(case_id):
    progress = Progress("bar").for_case(case_id, bars=False)
    for i in range(3000):
        progress.log(f"step {i}")

threads = [threading.Thread(target=case, args=(c,)) for c in "abc"]
[t.start() for t in threads]
[t.join() for t in threads]
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = run.stderr.splitlines()
    assert run.returncode == 0 and len(lines) == 9000, run.stderr[-2000:]
    assert not [line for line in lines if not re.fullmatch(r"\[spinekneeseg\] info: [abc]: step \d+", line)]


@pytest.mark.slow
def test_a_case_the_process_dies_on_twice_is_reported_and_not_run_again(tmp_path, tiny_weights, phantom_files):
    """kill -9 while case a runs (as an out-of-memory kill or a crash in native code would end it):
    the re-run tries a again, alone; a second death and the next run reports a as failed instead
    of dying on it once more, and runs the rest. Deleting the count lets a run again."""
    import os
    import signal
    import time

    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,input\na,{phantom_files['knee-bones']}\nb,{phantom_files['knee-bones']}\n")
    out = tmp_path / "out"
    args = ["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out), "--workers", "2",
            "--weights", str(tiny_weights["knee-bones"]), "--progress", "none"]

    def kill_while_a_runs():
        env = {**os.environ, "SPINEKNEESEG_PAUSE_AT_STAGE": "loading:60"}
        run = subprocess.Popen([sys.executable, "-m", "SpineKneeSegLib.cli", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if json.loads((out / ".a.lock").read_text())["pid"] == run.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert run.poll() is None, run.stderr.read()
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        run.stderr.close()

    kill_while_a_runs()
    assert not (out / ".a.deaths").exists()  # counted by the next run, which finds a's lock left behind
    kill_while_a_runs()  # a ran first and alone: this death is a's own
    assert (out / ".a.deaths").read_text().split() == ["1"]

    assert cli.main(args) == 1
    rows = _summary_rows(out)
    assert rows["a"][1:3] == ["failed", "1"] and "ended without finishing 2 times" in rows["a"][3]
    assert str(out / ".a.deaths") in rows["a"][3] and not (out / "a").exists()
    assert rows["b"][1] == "ok" and not (out / ".b.deaths").exists()

    (out / ".a.deaths").unlink()  # as the message says: a runs again
    assert cli.main(args) == 0
    assert {case: row[1] for case, row in _summary_rows(out).items()} == {"a": "ok", "b": "skipped"}
    assert not (out / ".a.deaths").exists()


def test_oblique_left_handed_input_keeps_exact_geometry(tmp_path, tiny_weights):
    from SpineKneeSegLib.core.image import Image

    rng = np.random.default_rng(0)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    left_handed = rot @ np.diag([1, 1, -1])
    image = Image(rng.normal(100, 30, (30, 40, 36)).astype(np.float32), spacing=(0.7, 0.9, 3.3),
                  origin=(12.5, -40.0, 7.25), direction=left_handed)
    path = tmp_path / "oblique.nii.gz"
    write_image(image, path)
    out = tmp_path / "out"
    assert _run("knee-bones", [path], out, tiny_weights["knee-bones"], "--progress", "none") == 0
    labels = read_image(out / "labels.nii.gz")
    assert labels.same_geometry(read_image(path))


def test_console_script_and_module_entry_points(tmp_path):
    result = subprocess.run(["spinekneeseg", "tasks", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [t["task"] for t in listing] == list(TASKS)
    for t in listing:  # every auxiliary model is listed with its registry status
        assert set(t["auxiliary"]) == {a.name for a in TASKS[t["task"]].auxiliary}
    result = subprocess.run([sys.executable, "-m", "SpineKneeSegLib.cli", "--version"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "spinekneeseg" in result.stdout


def test_the_command_skips_the_last_garbage_collection_and_main_does_not():
    """console_main (the `spinekneeseg` script, `python -m`) freezes the heap before exiting: the
    interpreter's last collection then skips it (0.3-0.4 s a command). main(), which callers run
    in a process that goes on, freezes nothing."""
    import gc
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["spinekneeseg"] == "SpineKneeSegLib.cli:console_main"
    # main() itself freezes what its imports made; the objects made after that (here 1000 lists, as
    # main() returns) are frozen only by console_main's own last step
    probe = ("import gc, sys; from SpineKneeSegLib import cli; sys.argv = ['spinekneeseg', 'tasks']\n"
             "real, seen = cli.main, []\n"
             "def main():\n"
             "    code = real(); global made; made = [[] for _ in range(1000)]; seen.append(gc.get_freeze_count())\n"
             "    return code\n"
             "cli.main = main\n"
             "code = cli.console_main(); print(code, gc.get_freeze_count() - seen[0] >= 1000)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 True"
    before = gc.get_freeze_count()
    assert cli.main(["tasks"]) == 0
    assert gc.get_freeze_count() == before


GC_PROBE = """
import gc, sys
from SpineKneeSegLib import cli
from SpineKneeSegLib.core import memory
from SpineKneeSegLib.engine import pipeline
seen = []
def spy():  # the collector's state when the run's imports end
    seen.append(gc.isenabled())
    memory.imports_done()
pipeline.imports_done = spy
sys.argv = ["spinekneeseg"] + sys.argv[1:]
code = cli.console_main()
print(code, seen, gc.isenabled())
"""


def test_the_command_pauses_the_collector_for_the_imports_only(tmp_path, tiny_weights, phantom_files):
    """console_main pauses the cyclic collector; one run, or a manifest's first case, resumes it
    when its imports end (freezing what they made), any other command at once (core/memory.py)."""
    def probe(*args):
        out = subprocess.run([sys.executable, "-c", GC_PROBE, *map(str, args)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()[-1]

    task = "xray-chest"
    run = ["run", "--task", task, phantom_files[task], "--weights", tiny_weights[task], "--progress", "none"]
    assert probe(*run, "-o", tmp_path / "one") == "0 [False] True"  # paused until the run's imports ended
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,input\na,{phantom_files[task]}\n")
    assert probe(*run[:3], "--manifest", manifest, "--weights", tiny_weights[task], "-o", tmp_path / "cohort",
                 "--progress", "none") == "0 [False] True"  # paused until the first case's imports ended
    assert probe("tasks") == "0 [] True"


def _nodes(scene, class_name):
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(i, class_name)
        if node.GetClassName() == class_name:
            yield node


IMPORTS_PROBE = """
import sys
from SpineKneeSegLib import cli
code = cli.main(sys.argv[1:])
print("PROBE", code, *(name in sys.modules for name in ("scipy.ndimage", "pydicom", "torch")))
"""


def test_a_refused_input_waits_for_no_heavy_import_and_a_nifti_run_never_loads_pydicom(
        tmp_path, tiny_weights, phantom_files):
    """A refusal comes before scipy.ndimage (0.14 s, once imported by the knee's bone split at
    package load) and pydicom (0.09 s with requests); a NIfTI input never needs pydicom."""
    import subprocess
    import sys

    def probe(*args):
        proc = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, "run", "--progress", "none", *map(str, args)],
                              capture_output=True, text=True, timeout=300)
        line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
        assert line, proc.stderr
        return line[-1].split()[1:]

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    assert probe("--task", "lumbar-foramina", broken, "-o", tmp_path / "refused") == ["2", "False", "False", "False"]
    ran = probe("--task", "lumbar-foramina", phantom_files["lumbar-foramina"], "-o", tmp_path / "ran",
                "--weights", tiny_weights["lumbar-foramina"], "--no-writer-process")
    assert ran == ["0", "True", "False", "True"]


def test_lazy_import_during_loading_is_reported_as_start_up(tmp_path, tiny_weights, phantom_files, monkeypatch):
    """Issue 25 / 24: a module first imported by an input check (X-ray polarity: scipy.ndimage) is
    start-up, not loading: the pipeline takes the lazy-import seconds counted during load_inputs out
    of `load` and `total` and adds them to `startup`. Here loading waits 0.6 s that the counter
    calls an import; a run that ignored the counter would report load and total >= 0.6 s."""
    import time

    from SpineKneeSegLib.engine import pipeline

    clock = {"s": 0.0}
    real_load = pipeline.load_inputs

    def load_with_a_slow_import(*args, **kwargs):
        time.sleep(0.6)
        clock["s"] += 0.6
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipeline, "lazy_import_seconds", lambda: clock["s"])
    monkeypatch.setattr(pipeline, "load_inputs", load_with_a_slow_import)
    out = tmp_path / "out"
    assert _run("xray-chest", [phantom_files["xray-chest"]], out, tiny_weights["xray-chest"], "--progress", "none") == 0
    t = json.loads((out / "report.json").read_text())["timings_s"]
    assert t["startup"] >= 0.6
    assert t["load"] < 0.6 and 0 <= t["network"] <= t["total"]


def _knee_cohort(tmp_path, n):
    write_image(make_phantom("knee-bones", seed=1).image, tmp_path / "knee.nii.gz")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("id,input\n" + "".join(f"c{i},knee.nii.gz\n" for i in range(n)))
    return manifest


def test_a_cohort_halts_on_a_full_disk_and_resumes_once_there_is_room(tmp_path, tiny_weights, capsys, small_disk):
    """A real full disk: a 1.9 MB tmpfs holds two of these cases (about 0.75 MB each). The third
    fails for lack of space; the rest are not started (each would compute its result and then fail
    to write it) but listed as pending; no empty lock is left. With room, the same command runs them."""
    out = small_disk("1900k") / "out"
    manifest = _knee_cohort(tmp_path, 5)
    command = ["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out),
               "--weights", str(tiny_weights["knee-bones"]), "--workers", "1"]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    rows = _summary_rows(out)
    assert [rows[f"c{i}"][1] for i in range(5)] == ["ok", "ok", "failed", "pending", "pending"]
    assert "No space left on device" in rows["c2"][3]
    assert rows["c3"][3].startswith("not run: the output folder's file system says 'No space left on device'")
    assert "no further case is started" in err and "2/5 cases ok, 2 not run" in err
    assert err.count(": started") == 3  # c3 and c4 never began
    # no case lock, staging or deaths file (the summary's lock file stays: batch.SUMMARY_LOCK)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != batch.SUMMARY_LOCK]
    small_disk("20m")
    assert cli.main(command) == 0
    assert [r[1] for r in _summary_rows(out).values()] == ["skipped", "skipped", "ok", "ok", "ok"]


def test_a_failing_case_halts_the_cohort_only_for_the_output_disk(tmp_path, tiny_weights, monkeypatch):
    """Where no tmpfs can be mounted: the writer's failure and the free space are simulated, as in
    test_bad_inputs. A bad input with the disk full is a bad input: the cohort goes on."""
    import collections
    import shutil

    from SpineKneeSegLib.engine import pipeline

    real_write, real_usage = pipeline.write_outputs, shutil.disk_usage
    usage = collections.namedtuple("usage", "total used free")
    full = {"now": False}

    def write_then_fill(card, image, result, folder, *args, **kw):
        if full["now"]:
            raise OSError(28, "No space left on device")
        if folder.name.startswith(".c1."):
            full["now"] = True
        return real_write(card, image, result, folder, *args, **kw)

    monkeypatch.setattr(pipeline, "write_outputs", write_then_fill)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0) if full["now"] else real_usage(p))
    manifest = _knee_cohort(tmp_path, 5)
    manifest.write_text(manifest.read_text().replace("c2,knee.nii.gz", "c2,missing.nii.gz"))
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out), "--weights",
                     str(tiny_weights["knee-bones"]), "--workers", "1", "--progress", "none"]) == 2
    rows = _summary_rows(out)
    assert [r[1] for r in rows.values()] == ["ok", "ok", "failed", "failed", "pending"]
    assert "no such file" in rows["c2"][3] and "No space left on device" in rows["c3"][3]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_cohort_stopped_with_ctrl_c_leaves_its_summary_and_resumes(tmp_path, tiny_weights, workers):
    """Ctrl-C (SIGINT) after the first case: exit 130, summary.tsv lists what was done and the rest
    as pending, nothing partial or locked is left, and the same command goes on from there."""
    import os
    import signal
    import time

    manifest, out = _knee_cohort(tmp_path, 6), tmp_path / "out"  # each case >= 1 s: some still queued at the signal
    command = [sys.executable, "-m", "SpineKneeSegLib.cli", "run", "--task", "knee-bones", "--manifest", str(manifest),
               "-o", str(out), "--weights", str(tiny_weights["knee-bones"]), "--workers", workers]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "SPINEKNEESEG_PAUSE_AT_STAGE": "loading:1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and ": ok (" not in (line := run.stderr.readline()):
        assert line or run.poll() is None
    run.send_signal(signal.SIGINT)
    err = line + run.stderr.read()
    assert run.wait(timeout=60) == 130, err
    rows = _summary_rows(out)
    assert list(rows) == [f"c{i}" for i in range(6)] and "ok" in [r[1] for r in rows.values()]
    pending = [r for r in rows.values() if r[1] == "pending"]
    assert pending and all(r[3].startswith("not run: the run was stopped (Ctrl-C or SIGTERM)") for r in pending)
    assert {r[1] for r in rows.values()} == {"ok", "pending"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != batch.SUMMARY_LOCK]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert {r[1] for r in _summary_rows(out).values()} == {"ok", "skipped"}


def test_a_folder_of_scans_is_a_cohort(tmp_path, tiny_weights, capsys):
    """--manifest FOLDER, as nnU-Net's folder in, folder out: each image file and each sub-folder
    (one image file, or one DICOM series) is a case named by it; other files are left out and
    said so; a sub-folder of two scans is a failed case; the output folder inside is no case."""
    from test_io import SAGITTAL, write_dicom_series

    scans = tmp_path / "scans"
    scans.mkdir()
    phantom = make_phantom("knee-bones", seed=1)
    write_image(phantom.image, scans / "a.nii.gz")
    (scans / "b").mkdir()
    write_image(phantom.image, scans / "b" / "scan.nrrd")
    write_dicom_series(scans / "c", (np.arange(8 * 32 * 32).reshape(8, 32, 32) % 300).astype(np.int16),
                       direction=SAGITTAL)
    (scans / "d").mkdir()
    for name in ("t1.nii.gz", "t2.nii.gz"):
        write_image(phantom.image, scans / "d" / name)
    (scans / "notes.txt").write_text("reader's notes")
    (scans / "a.seg.nrrd").write_bytes(b"")  # a segmentation beside a scan is not a scan
    out = scans / "out"
    command = ["run", "--task", "knee-bones", "--manifest", str(scans), "-o", str(out),
               "--weights", str(tiny_weights["knee-bones"])]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    rows = _summary_rows(out)
    assert list(rows) == ["a", "b", "c", "d"]
    assert [rows[c][1] for c in "abc"] == ["ok", "ok", "ok"] and rows["d"][1:3] == ["failed", "2"]
    assert "holds 2 image files (t1.nii.gz, t2.nii.gz)" in rows["d"][3]
    assert "left out of" in err and "a.seg.nrrd, notes.txt" in err
    assert read_image(out / "c" / "labels.nii.gz").same_geometry(read_image(scans / "c"))
    assert cli.main(command) == 2  # a re-run skips the finished ones and tries d again
    assert [r[1] for r in _summary_rows(out).values()] == ["skipped", "skipped", "skipped", "failed"]


@pytest.mark.parametrize("layout, message", [
    ("dicom-at-top", "holds DICOM files at its top level (x000.dcm)"),
    ("same-name", "two entries make the case 'a' (a.nii.gz, a.nrrd)"),
    ("empty", "holds no scans"),
])
def test_a_folder_that_is_no_cohort_is_refused(tmp_path, tiny_weights, capsys, layout, message):
    from test_io import write_dicom_series

    scans = tmp_path / "scans"
    scans.mkdir()
    if layout == "dicom-at-top":  # a series folder given as a cohort: each file would be a "case"
        write_dicom_series(scans, np.zeros((3, 8, 8), np.int16), name="x")
    elif layout == "same-name":
        for name in ("a.nii.gz", "a.nrrd"):
            write_image(make_phantom("knee-bones", seed=1).image, scans / name)
    (scans / "readme.txt").write_text("x")
    assert cli.main(["run", "--task", "knee-bones", "--manifest", str(scans), "-o", str(tmp_path / "out"),
                     "--weights", str(tiny_weights["knee-bones"])]) == 2
    err = capsys.readouterr().err
    assert message in err and str(scans) in err and not (tmp_path / "out").exists()


def test_a_rerun_does_not_keep_a_result_of_inputs_the_manifest_changed(tmp_path, tiny_weights, phantom_files):
    """A case whose input (or task) changed since its result was written is not 'finished': the old
    result is kept and the case fails, naming what it was made from, until --overwrite. The report
    records each input's absolute path, and for DICOM the series and echo read."""
    from test_io import SAGITTAL, write_dicom_series

    second = tmp_path / "second.nii.gz"
    second.write_bytes(Path(phantom_files["knee-bones"]).read_bytes())
    write_dicom_series(tmp_path / "study", (np.arange(8 * 32 * 32).reshape(8, 32, 32) % 300).astype(np.int16),
                       description="Sag T2", direction=SAGITTAL)
    manifest, out = tmp_path / "cases.csv", tmp_path / "out"
    manifest.write_text(f"id,input\na,{phantom_files['knee-bones']}\nb,{phantom_files['knee-bones']}\nd,study\n")
    command = ["run", "--task", "knee-bones", "--manifest", str(manifest), "-o", str(out),
               "--weights", str(tiny_weights["knee-bones"]), "--progress", "none"]
    assert cli.main(command) == 0
    described = json.loads((out / "d" / "report.json").read_text())["inputs"][0]
    assert described["path"] == str(tmp_path / "study") and described["dicom_series"]["description"] == "Sag T2"
    assert described["dicom_series"]["echo"] == 1 and described["dicom_series"]["uid"]
    before = (out / "b" / "report.json").read_bytes()
    manifest.write_text(f"id,input\na,{phantom_files['knee-bones']}\nb,second.nii.gz\nd,study\n")
    assert cli.main(command) == 2
    rows = _summary_rows(out)
    assert rows["a"][1] == "skipped" and rows["d"][1] == "skipped"
    assert rows["b"][1:3] == ["failed", "2"] and "holds a finished result of other inputs" in rows["b"][3]
    assert str(phantom_files["knee-bones"]) in rows["b"][3] and "--overwrite" in rows["b"][3]
    assert (out / "b" / "report.json").read_bytes() == before
    lumbar = [c if c != "knee-bones" else "lumbar-foramina" for c in command]
    lumbar[lumbar.index("--weights") + 1] = str(tiny_weights["lumbar-foramina"])
    assert cli.main(lumbar) == 2
    assert "it is a knee-bones result" in _summary_rows(out)["a"][3]
    assert cli.main(command + ["--overwrite"]) == 0
    assert json.loads((out / "b" / "report.json").read_text())["inputs"][0]["path"] == str(second)


@pytest.mark.data
def test_a_dataset_folder_with_label_maps_beside_the_scans_runs_with_scan_name(tmp_path, data_root, capsys):
    """The shared lumbar data's own layout, caseNN/image.nii.gz beside caseNN/vertebrae.nii.gz: as
    a folder of scans every case holds two image files and fails; --scan-name 'image*' picks the
    scan, and the registered model runs them."""
    cohort = tmp_path / "zukic"
    cohort.mkdir()
    for case in ("case04", "case06"):
        (cohort / case).symlink_to(data_root / "spine" / "zukic-t2" / case)
    command = ["run", "--task", "lumbar-foramina", "--manifest", str(cohort), "-o", str(tmp_path / "out"),
               "--progress", "none", "--workers", "1"]
    assert cli.main(command) == 2
    rows = _summary_rows(tmp_path / "out")
    assert all(r[1] == "failed" and "holds 2 image files (image.nii.gz, vertebrae.nii.gz)" in r[3]
               and "--scan-name" in r[3] for r in rows.values())
    assert cli.main(command + ["--scan-name", "IMAGE*"]) == 0
    rows = _summary_rows(tmp_path / "out")
    assert [r[1] for r in rows.values()] == ["ok", "ok"]
    report = json.loads((tmp_path / "out" / "case06" / "report.json").read_text())
    assert report["inputs"][0]["path"].endswith("case06/image.nii.gz") and report["weights"]["registered"]
    assert cli.main(command + ["--scan-name", "*.nrrd"]) == 2  # a name that picks nothing: said so per case
    assert "holds 0 image files named '*.nrrd'" in _summary_rows(tmp_path / "out")["case04"][3]
    capsys.readouterr()
    assert cli.main(["run", "--task", "lumbar-foramina", str(cohort / "case04" / "image.nii.gz"), "-o",
                     str(tmp_path / "one"), "--scan-name", "image*"]) == 2
    assert "--scan-name picks the scan in each sub-folder" in capsys.readouterr().err


def test_a_dry_run_says_what_each_case_would_do_and_writes_nothing(tmp_path, tiny_weights, phantom_files, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        write_image(make_phantom("knee-bones", seed=1).image, scans / f"{name}.nii.gz")
    (scans / "c").mkdir()
    for name in ("image.nii.gz", "labels.nii.gz"):
        write_image(make_phantom("knee-bones", seed=1).image, scans / "c" / name)
    out = tmp_path / "out"
    command = ["run", "--task", "knee-bones", "--manifest", str(scans), "-o", str(out),
               "--weights", str(tiny_weights["knee-bones"])]
    assert cli.main(command + ["--dry-run"]) == 0
    captured = capsys.readouterr()
    table = [line.split("\t") for line in captured.out.splitlines()]
    assert [row[:2] for row in table] == [["id", "would"], ["a", "run"], ["b", "run"], ["c", "fail"]]
    assert "holds 2 image files" in table[3][3] and "1 would fail; nothing was written" in captured.err
    assert not out.exists()
    assert cli.main(command + ["--progress", "none"]) == 2  # a and b run, c fails
    (scans / "b.nii.gz").unlink()
    write_image(make_phantom("knee-bones", seed=2).image, scans / "b.nrrd")  # b is now another file
    assert cli.main(command + ["--dry-run", "--progress", "json", "--scan-name", "[bi]*"]) == 0
    plan = {e["case"]: e for e in map(json.loads, capsys.readouterr().out.splitlines()) if e.get("event") == "plan"}
    assert [plan[c]["would"] for c in "bc"] == ["fail", "run"] and "a" not in plan  # a.nii.gz is no "[bi]*"
    assert "other inputs" in plan["b"]["why"] and plan["c"]["inputs"] == [str(scans / "c" / "image.nii.gz")]
    assert cli.main(command + ["--dry-run", "--progress", "none"]) == 0
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["skip", "fail", "fail"]
