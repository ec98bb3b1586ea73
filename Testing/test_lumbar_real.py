"""The shipped lumbar level model on real scans through the CLI: every level on its own body, the
foramen markers estimated from those levels, and a field of view cut just above L2 named L2..L5,
not shifted (skips without data or model). The shipped model (v0.2.0) was trained on every
labelled scan, so this checks the whole pipeline end to end on real inputs; its accuracy on scans
it never saw is the cross-validation in its model card."""
import json

import numpy as np
import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.weights import find_entry
from SpineKneeSegLib.tasks import TASKS

pytestmark = [pytest.mark.data, pytest.mark.mrml]
HELD_OUT = "spine/myosegmentum/case12"


@pytest.fixture(scope="module")
def case():
    root = data_root()
    if root is None or not (root / HELD_OUT).exists():
        pytest.skip("shared spine data not present (set SPINEKNEESEG_DATA)")
    if find_entry(TASKS["lumbar-foramina"].weights_entry) is None:
        pytest.skip("no lumbar-levels model registered")
    return root / HELD_OUT


def test_levels_and_estimated_foramina_on_a_held_out_case(case, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "lumbar-foramina", str(case / "image.nii.gz"), "-o", str(out),
                     "--progress", "none"]) == 0
    pred = read_image(out / "labels.nii.gz").array
    truth = read_image(case / "vertebrae.nii.gz").array
    dices = []
    for level in range(1, 6):
        body, predicted = truth == level, pred == level
        assert np.bincount(truth[predicted], minlength=6)[1:].argmax() + 1 == level  # on its own body
        dices.append(2 * np.logical_and(predicted, body).sum() / (predicted.sum() + body.sum()))
    assert np.mean(dices) >= 0.8, np.round(dices, 3)
    # the per-level volume table counts the final labels (a cohort stacks these tables)
    spacing = np.prod(read_image(out / "labels.nii.gz").spacing)
    rows = [line.split("\t") for line in (out / "volumes.tsv").read_text().splitlines()]
    assert rows[0] == ["structure", "label", "voxels", "volume_mm3", "volume_ml"]
    assert [(r[0], int(r[2])) for r in rows[1:]] == [(f"L{k}", int((pred == k).sum())) for k in range(1, 6)]
    assert all(abs(float(r[4]) - int(r[2]) * spacing / 1000) < 1e-3 for r in rows[1:])
    report = json.loads((out / "report.json").read_text())
    assert report["summaries"]["foramina"]["found"] == 10
    assert report["summaries"]["foramina"]["method"].startswith("estimated from vertebral levels")
    assert report["weights"]["registry_version"] is not None
    markers = json.loads((out / "foramina.mrk.json").read_text())["markups"][0]["controlPoints"]
    assert sorted(p["label"] for p in markers) == sorted(f"L{k} {s}" for k in range(1, 6) for s in ("left", "right"))
    assert 0.0 <= report["summaries"]["level_confidence"] <= 1.0
    assert [b["name"] for b in report["summaries"]["level_decoding"]["bodies"]
            if b["name"].startswith("L")] == [f"L{k}" for k in range(1, 6)]


def test_a_field_of_view_cut_above_l2_is_not_shifted(case, tmp_path):

    from level_eval import field_of_view_variants
    from SpineKneeSegLib.core.image_io import write_image

    image, truth = read_image(case / "image.nii.gz"), read_image(case / "vertebrae.nii.gz").array
    cut, cut_truth = field_of_view_variants(image, truth)["cut above L2"]
    assert not (cut_truth == 1).any() and (cut_truth == 2).any()
    write_image(cut, tmp_path / "cut.nii.gz")
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "lumbar-foramina", str(tmp_path / "cut.nii.gz"), "-o", str(out),
                     "--progress", "none"]) == 0
    pred = read_image(out / "labels.nii.gz").array
    assert not (pred == 1).any()  # L1 lies outside this field of view: not put on L2
    for level in range(2, 6):
        assert np.bincount(cut_truth[pred == level], minlength=6)[1:].argmax() + 1 == level
    report = json.loads((out / "report.json").read_text())
    decoding = report["summaries"]["level_decoding"]
    assert any(m.startswith("L1 (outside") for m in decoding["levels_not_found"])
    markers = json.loads((out / "foramina.mrk.json").read_text())["markups"][0]["controlPoints"]
    assert markers and all("L1 " not in p["label"] for p in markers)  # no foramen on a level not in view
    assert ["LEVEL COUNT DOUBTFUL" in p["description"] for p in markers] == [decoding["doubtful"]] * len(markers)
