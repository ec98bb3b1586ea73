"""The shipped lumbar level model on a held-out real case, through the CLI: every level found on
its own body and the foramen markers estimated from those levels (skips without data or model)."""
import json

import numpy as np
import pytest

from SpineKneeSegLib import cli
from SpineKneeSegLib.datasets import data_root
from SpineKneeSegLib.io import read_image
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.weights import find_entry

pytestmark = [pytest.mark.data, pytest.mark.mrml]
HELD_OUT = "spine/myosegmentum/case12"  # in the model's fixed validation split


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
    report = json.loads((out / "report.json").read_text())
    assert report["summaries"]["foramina"]["found"] == 10
    assert report["summaries"]["foramina"]["method"].startswith("estimated from vertebral levels")
    assert report["weights"]["registry_version"] is not None
    markers = json.loads((out / "foramina.mrk.json").read_text())["markups"][0]["controlPoints"]
    assert sorted(p["label"] for p in markers) == sorted(f"L{k} {s}" for k in range(1, 6) for s in ("left", "right"))
