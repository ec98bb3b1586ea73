"""xray-chest's layout check: labels that do not lie as on an upright chest radiograph (an image
stored turned or flipped, whose file does not say so, goes to the network as stored) get a warning
instead of passing silently, and the heart's side gives the score the upright search ranks by.
The check on drawn label maps, then the shipped model on a real held-out JSRT radiograph."""
import json
from pathlib import Path

import numpy as np
import pytest
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.tasks.xray.chest import chest_layout, layout_warning


def _upright() -> tuple[np.ndarray, np.ndarray]:
    """Lungs side by side (right on the image's left), heart low between them, clavicles on top."""
    labels = np.zeros((100, 100), np.uint8)
    labels[20:80, 10:40] = 1
    labels[20:80, 60:90] = 2
    labels[55:85, 40:65] = 3
    clavicles = np.zeros_like(labels)
    clavicles[12:18, 15:45] = 1
    clavicles[12:18, 55:85] = 2
    return labels, clavicles


def test_an_upright_layout_passes_and_turned_or_flipped_ones_fail_by_name():
    labels, clavicles = _upright()
    summary = chest_layout(labels, clavicles)
    assert summary["passed"] and layout_warning(summary) is None
    failed = {name: chest_layout(turn(labels), turn(clavicles))["failed"] for name, turn in {
        "turned 90": lambda a: np.rot90(a), "upside down": lambda a: a[::-1], "mirrored": lambda a: a[:, ::-1]}.items()}
    assert failed == {"turned 90": ["lungs side by side", "right lung on the image's left",
                                    "heart below the lungs' centres", "clavicles above the lungs"],
                      "upside down": ["heart below the lungs' centres", "clavicles above the lungs"],
                      "mirrored": ["right lung on the image's left"]}
    right, left, heart = (np.nonzero(labels == v)[1].mean() for v in (1, 2, 3))  # centre columns
    assert summary["upright_score"] == round((heart - (right + left) / 2) / ((left - right) / 2), 3) > 0
    heart_left = np.where(labels == 3, 0, labels)
    heart_left[55:85, 35:60] = 3  # the heart toward the image's left: dextrocardia, or a network naming a mirror
    summary = chest_layout(heart_left, clavicles)
    assert summary["passed"] and summary["upright_score"] < 0
    assert layout_warning(summary).startswith("the heart lies toward the image's left")
    no_heart = np.where(labels == 3, 0, labels)
    summary = chest_layout(no_heart, clavicles)
    assert summary["failed"] == ["all found"] and summary["checks"]["all found"]["missing"] == ["heart"]
    assert "rotated or flipped" in layout_warning(summary)


@pytest.mark.data
@pytest.mark.mrml
def test_the_shipped_model_warns_on_a_turned_real_radiograph_only(tmp_path):
    """A held-out JSRT radiograph (never trained on), in usual display, as stored and turned 90
    degrees, through the CLI with the registered xray-chest model; --upright no, so the turned one
    is not searched for its way up (test_xray_orientation.py tests the search)."""
    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import read_image, write_image

    root = (data_root() or Path("/nonexistent")) / "xray" / "jsrt-scr"
    if not root.is_dir():
        pytest.skip("JSRT/SCR data not available")
    stored = read_image(root / "JPCLN001" / "image.nii.gz")  # in the model's held-out 50
    usual = (255.0 - stored.array[0]).astype(np.float32)
    for name, array in (("upright", usual), ("turned", np.rot90(usual))):
        write_image(stored.with_array(np.ascontiguousarray(array)[None]), tmp_path / f"{name}.nii.gz")
        assert cli.main(["run", "--task", "xray-chest", str(tmp_path / f"{name}.nii.gz"), "-o", str(tmp_path / name),
                         "--progress", "none", "--upright", "no"]) == 0
        report = json.loads((tmp_path / name / "report.json").read_text(encoding="utf-8"))
        warned = [w for w in report["warnings"] if "upright chest radiograph" in w]
        assert report["summaries"]["chest_layout"]["passed"] == (name == "upright"), report["summaries"]
        assert len(warned) == (name == "turned"), report["warnings"]


def test_the_cardiothoracic_ratio_of_drawn_labels_and_a_thin_tail():
    """Heart 30 columns wide, lungs' outer edges 80 columns apart (the widest row) at 0.5 mm
    columns: 15 / 40 mm, ratio 0.375. A one-row tail the network may run along the diaphragm
    widens the heart's extent; the opening takes it off."""
    from SpineKneeSegLib.tasks.xray.chest import cardiothoracic_ratio

    labels, _ = _upright()  # lungs 10:40 and 60:90 (their widest row 10..89), heart 40:65 over rows 55:85
    labels[labels == 3] = 0
    labels[60:80, 45:75] = 3
    measured = cardiothoracic_ratio(labels, (0.5, 0.5), opening_mm=0)
    assert (measured["heart_width_mm"], measured["thorax_width_mm"], measured["ratio"]) == (15.0, 40.0, 0.375)
    assert not measured["above_limit"]
    tailed = labels.copy()
    tailed[80, 75:95] = 3  # one row, 20 columns beyond the heart
    assert cardiothoracic_ratio(tailed, (0.5, 0.5), opening_mm=0)["heart_width_mm"] == 25.0
    assert cardiothoracic_ratio(tailed, (0.5, 0.5), opening_mm=2.0)["heart_width_mm"] == 15.0
    no_heart = np.where(labels == 3, 0, labels)
    assert cardiothoracic_ratio(no_heart, (0.5, 0.5))["ratio"] is None


@pytest.mark.data
@pytest.mark.mrml
def test_the_cardiothoracic_ratio_of_a_real_radiograph_stored_either_way(tmp_path):
    """A held-out JSRT radiograph as stored (inverted, NIfTI) and turned 90 degrees: the same ratio
    both ways (measured upright), near the one the SCR expert masks give, in the report, the
    table and the headline; --upright no on the turned copy: not measured, and said why."""
    import csv

    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import read_image, write_image
    from SpineKneeSegLib.tasks.xray.chest import cardiothoracic_ratio

    root = (data_root() or Path("/nonexistent")) / "xray" / "jsrt-scr"
    if not root.is_dir():
        pytest.skip("JSRT/SCR data not available")
    stored = read_image(root / "JPCLN001" / "image.nii.gz")
    truth = cardiothoracic_ratio(read_image(root / "JPCLN001" / "labels.nii.gz").array[0], (0.7, 0.7))["ratio"]
    write_image(stored.with_array(np.ascontiguousarray(np.rot90(stored.array[0]))[None]), tmp_path / "turned.nii.gz")
    ratios = {}
    for name, path, extra in (("stored", root / "JPCLN001" / "image.nii.gz", []),
                              ("turned", tmp_path / "turned.nii.gz", []),
                              ("as stored", tmp_path / "turned.nii.gz", ["--upright", "no"])):
        out = tmp_path / name.replace(" ", "-")
        assert cli.main(["run", "--task", "xray-chest", str(path), "-o", str(out), "--progress", "none", *extra]) == 0
        ratios[name] = json.loads((out / "report.json").read_text())["summaries"]["cardiothoracic_ratio"]
        with open(out / "chest_measurements.tsv", newline="") as f:
            rows = {r["measure"]: r["value"] for r in csv.DictReader(f, delimiter="\t")}
        value = float(rows["cardiothoracic ratio"])  # nan when not measured
        assert np.isnan(value) if ratios[name]["ratio"] is None else value == ratios[name]["ratio"]
        if ratios[name]["ratio"] is None:
            continue
        labels = read_image(out / "labels.nii.gz")  # the drawn widths span the structures as stored
        for line, values in (("heart_line_ras", {3}), ("thorax_line_ras", {1, 2})):
            ends = ratios[name][line]
            ijk = np.rint(labels.ras_to_ijk_points(ends)).astype(int)
            along = int(np.argmax(np.abs(ijk[1] - ijk[0])[:2]))  # 0: the line runs along i (columns)
            for i, j, _ in ijk:  # each end: the structure reaches that column (row, for a turned image)
                across = labels.array[0, :, i] if along == 0 else labels.array[0, j, :]
                assert set(np.unique(across).tolist()) & values, (name, line, ijk)
            if line == "thorax_line_ras":  # the widest row ends on the lungs' outer edges
                assert {int(labels.array[0, j, i]) for i, j, _ in ijk} <= values, (name, line, ijk)
            width = ratios[name][line.replace("line_ras", "width_mm")]
            assert abs(float(np.linalg.norm(np.subtract(*ends))) - (width - 0.7)) < 0.1  # centre to centre
        assert (out / "overlays" / "image.png").is_file()
    assert ratios["stored"]["ratio"] == ratios["turned"]["ratio"]
    assert abs(ratios["stored"]["ratio"] - truth) < 0.03, (ratios["stored"], truth)
    assert ratios["as stored"]["ratio"] is None and "do not lie as on an upright chest" in ratios["as stored"]["note"]
