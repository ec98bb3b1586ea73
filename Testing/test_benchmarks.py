"""The overhead benchmark's mechanics (not its figures: those depend on the machine and are
printed by the script, never asserted): tasks take turns after one warm-up each, and the medians
and the rule's verdict come from the counted runs only."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parent / "benchmarks" / "bench_overhead.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_benchmark_interleaves_tasks_and_counts_only_the_rounds(tmp_path, monkeypatch):
    bench = _bench_module()
    plans = [bench.prepare(task, False, tmp_path) for task in ("xray-chest", "xray-femur")]
    calls = []
    real = bench.run_once

    def recorded(plan, workdir, i):
        calls.append((plan["task"], i))
        return real(plan, workdir, i)

    monkeypatch.setattr(bench, "run_once", recorded)
    results = bench.bench_all(plans, 2, tmp_path)
    assert calls == [("xray-chest", 0), ("xray-femur", 0), ("xray-chest", 1), ("xray-femur", 1),
                     ("xray-chest", 2), ("xray-femur", 2)]
    for r in results:
        assert r["source"] == "phantom" and r["overhead"] == r["total"] - r["network"]
        assert r["limit"] == max(0.3 * r["network"], 0.3) and r["ok"] == (r["overhead"] <= r["limit"])


def test_network_benchmark_times_training_steps_that_update_the_weights(capsys):
    """bench_networks.py --train: every task's registered architecture takes real optimisation
    steps (the weights move) and gets a row of figures."""
    import torch

    spec = importlib.util.spec_from_file_location("bench_networks", BENCH.parent / "bench_networks.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 3, 1))
    before = [p.detach().clone() for p in net.parameters()]
    seconds = bench.time_train_step(net.train(), torch.randn(2, 1, 32, 32), "softmax", 2, amp=False)
    assert seconds > 0 and all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert bench.main(["--device", "cpu", "--train", "--batches", "1", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "training steps" in out and all(f"{task} (registered)" in out for task in bench.TASKS)


def test_knee_floor_times_the_steps_no_run_can_skip_and_writes_them(tmp_path):
    """bench_knee.py --floor: reading the input and writing each required output, timed alone
    from a label map; the outputs it times are real files (labels back equal; a .seg.nrrd)."""
    import numpy as np
    import pytest
    from SpineKneeSegLib.core.image_io import read_image, write_image
    from SpineKneeSegLib.tasks import TASKS
    from SpineKneeSegLib.tasks.knee.phantom import knee_phantom

    pytest.importorskip("slicer_core")
    spec = importlib.util.spec_from_file_location("bench_knee", BENCH.parent / "bench_knee.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    phantom = knee_phantom(0)
    write_image(phantom.image, tmp_path / "knee.nii.gz")
    write_image(phantom.labels, tmp_path / "labels.nii.gz")
    floor = bench.floor_steps(TASKS["knee-bones"], tmp_path / "knee.nii.gz", read_image(tmp_path / "knee.nii.gz"),
                              tmp_path / "labels.nii.gz", tmp_path, runs=1)
    assert set(floor) == {"read input", "labels.nii.gz", ".seg.nrrd (MRML)"}  # no DICOM-SEG for a NIfTI input
    assert all(v > 0 for v in floor.values())
    assert np.array_equal(read_image(tmp_path / "floor.nii.gz").array, phantom.labels.array)
    assert (tmp_path / "floor.seg.nrrd").stat().st_size > 0
    # the 2-core bound: read and N4 in turn, then the writers over two cores (the longest, or half the sum)
    assert bench.two_core_bound({"read input": 0.1, "a": 0.02, "b": 0.1, "c": 0.13}, 0.16) == pytest.approx(0.39)
    assert bench.two_core_bound({"read input": 0.1, "a": 0.1, "b": 0.1, "c": 0.1}, 0.2) == pytest.approx(0.45)


def test_overhead_benchmark_writes_its_rows_as_json(tmp_path):
    """--json: what bench_lumbar_round.py reads back, one object per task with the rule's verdict."""
    import json

    out = tmp_path / "rows.json"
    # --plain-gc: this test process's collector is left alone (the benchmark would freeze its heap)
    _bench_module().main(["--tasks", "xray-chest", "--runs", "1", "--json", str(out), "--plain-gc"])
    rows = json.loads(out.read_text())
    assert [r["task"] for r in rows] == ["xray-chest"]
    r = rows[0]
    assert r["limit"] == max(0.3 * r["network"], 0.3) and r["ok"] == (r["total"] - r["network"] <= r["limit"])


def test_lumbar_round_takes_the_first_scans_of_each_source(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_lumbar_round", BENCH.parent / "bench_lumbar_round.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for source, n in (("zukic-t2", 3), ("ivd-t2", 1), ("myosegmentum", 4)):
        for i in range(n):
            (tmp_path / "spine" / source / f"case{i:02d}").mkdir(parents=True)
            (tmp_path / "spine" / source / f"case{i:02d}" / "image.nii.gz").touch()
    picked = module.scans(tmp_path, module.SOURCES, 2)
    assert [f"{p.parent.parent.name}/{p.parent.name}" for p in picked] == [
        "zukic-t2/case00", "zukic-t2/case01", "ivd-t2/case00", "myosegmentum/case00", "myosegmentum/case01"]
    assert len(module.scans(tmp_path, module.SOURCES, None)) == 8


def test_spine_outputs_compare_finds_a_changed_voxel_and_ignores_timings(tmp_path, capsys):
    import json

    import numpy as np
    from SpineKneeSegLib.core.image import Image
    from SpineKneeSegLib.core.image_io import write_image

    spec = importlib.util.spec_from_file_location("spine_outputs", BENCH.parent / "spine_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 2:5, 2:5] = 3
    for run, seconds in (("a", 0.31), ("b", 0.29)):
        case = tmp_path / run / "zukic-t2-case01"
        case.mkdir(parents=True)
        write_image(Image(labels), case / "labels.nii.gz")
        (case / "report.json").write_text(json.dumps({"summaries": {"level_confidence": 0.9,
                                                                    "level_refinement": {"network_s": seconds}}}))
        (case / "foramina.mrk.json").write_text(json.dumps({"markups": [{"controlPoints": [{"position": [1, 2, 3]}]}]}))
    assert module.compare(tmp_path / "a", tmp_path / "b") == 0
    changed = labels.copy()
    changed[1, 2, 2] = 4
    write_image(Image(changed), tmp_path / "b" / "zukic-t2-case01" / "labels.nii.gz")
    assert module.compare(tmp_path / "a", tmp_path / "b") == 1
    assert "1 label voxels differ" in capsys.readouterr().out


def test_cohort_memory_reads_the_cli_process_memory_as_each_case_ends(data_root, capsys):
    """bench_cohort_memory.py: a real manifest process over the lumbar scans, listed per pass under
    new ids; one memory reading per case, grouped by pass, and the peaks' trend from pass 2 on."""
    import bench_cohort_memory

    assert bench_cohort_memory.main(["--passes", "3", "--limit", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 passes of 2 lumbar scans, 1 worker(s)" in out
    peaks = [float(line.split("peak ")[1].split(" MB")[0]) for line in out.splitlines() if "  pass " in line]
    assert len(peaks) == 3 and all(200 < p < 20000 for p in peaks)  # a torch + slicer-core process: hundreds of MB
    assert "trend of the peaks from pass 2 on:" in out


def test_dicom_read_benchmark_reads_every_layout_as_the_plain_series(tmp_path, capsys):
    """bench_dicom_read.py on a synthetic multi-echo series: each layout (JPEG lossless, RLE, one
    enhanced file) is written, read, timed and compared with the plain series: all the same."""
    from test_io import _volume, write_dicom_series

    spec = importlib.util.spec_from_file_location("bench_dicom_read", BENCH.parent / "bench_dicom_read.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_dicom_series(tmp_path / "series", _volume((4, 24, 20)), echoes=[(1, 10.0), (2, 25.0)])
    assert bench.main(["--series", str(tmp_path / "series"), "--runs", "1", "--echo", "2"]) == 0
    out = capsys.readouterr().out
    for layout in bench.LAYOUTS:
        assert f"{layout} " in out
    assert out.count("same voxels and geometry as plain: yes") == len(bench.LAYOUTS)
