"""The xray-chest training script on real JSRT/SCR radiographs (issue 24): the split keeps cases
apart, targets keep the clavicles over the lungs, a few steps train and resume on the shared loop,
and the held-out evaluation runs the Lib's inference and the task's own decoding."""
from pathlib import Path

import numpy as np
import pytest
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.tasks import TASKS

xc = pytest.importorskip("xray_chest")
pytestmark = [pytest.mark.data, pytest.mark.slow]
ROOT = (data_root() or Path("/nonexistent")) / "xray" / "jsrt-scr"


@pytest.fixture(scope="module")
def root():
    if not ROOT.is_dir():
        pytest.skip("JSRT/SCR data not available")
    return ROOT


def test_split_is_case_wise_and_targets_keep_overlaps(root):
    ids = xc.case_ids(root)
    train, test, info = xc.split(ids, root, 0.25, 0)
    assert len(ids) == 198 and not set(train) & set(test) and len(test) == 50 and info["groups"] == 198
    assert xc.split(ids, root, 0.25, 0)[1] == test  # fixed by its seed
    case = xc.load_case(root, test[0], dict(TASKS["xray-chest"].preprocessing.__dict__))
    assert case.x.shape == (1, 256, 256) and case.y.shape == (5, 256, 256)
    lungs, clavicles = case.y[:2].max(0) > 0, case.y[3:].max(0) > 0
    assert clavicles.any() and (lungs & clavicles).any()  # a clavicle over a lung keeps both
    assert case.image.array.max() > 255  # 16-bit, so that seed 001's sigma 5000 means what it meant


def test_a_few_steps_train_resume_and_evaluate_through_the_lib(root, tmp_path):
    cfg = xc.Config(out=str(tmp_path / "run"), steps=2, batch_size=2, n_train=3, threads=2)
    state = xc.train(cfg, log=lambda m: None)
    assert state["step"] == 2 and (tmp_path / "run" / "last.pt").exists()
    again = xc.train(xc.Config(**{**cfg.__dict__, "steps": 3}), resume=True, log=lambda m: None)
    assert again["step"] == 3
    pre = dict(TASKS["xray-chest"].preprocessing.__dict__)
    cases = [xc.load_case(root, c, pre) for c in xc.case_ids(root)[:2]]
    result = xc.evaluate(tmp_path / "run", 0.0, log=lambda m: None, cases=cases)
    assert result["cases"] == 2 and 0.0 <= result["summary"]["mean dice"] <= 1.0
    assert set(result["per_case"][0]) >= {"case", "right lung dice", "left clavicle hd95"}
    assert np.isfinite(result["summary"]["right lung dice"])


def test_real_backgrounds_follow_the_chest_split_and_keep_the_phantom_labels(root):
    """Issue 24 part 4: the femur model's real backgrounds are the chest task's training split
    only (its 50 held-out radiographs stay unseen), bone bright in 0..1; a phantom drawn over one
    keeps the drawn phantom's labels."""
    from xray import make_case
    from xray_real import chest_backgrounds

    train, held = chest_backgrounds("train"), chest_backgrounds("test")
    assert len(train) == 148 and len(held) == 50 and not {c for c, _ in train} & {c for c, _ in held}
    display = train[0][1]
    assert display.dtype == np.float32 and 0.0 <= display.min() and display.max() <= 1.0
    from SpineKneeSegLib.core.image_io import read_image

    labels = read_image(root / train[0][0] / "labels.nii.gz").array[0]
    assert display[labels == 1].mean() < display[labels == 3].mean() - 0.1  # usual display: lung darker than heart
    drawn, over = make_case("xray-femur", 90000), make_case("xray-femur", 90000, display)
    assert np.array_equal(drawn[1].array, over[1].array) and not np.array_equal(drawn[0].array, over[0].array)


def test_real_radiograph_evaluation_of_both_hip_models(root):
    """xray_real.evaluate on the 50 held-out chest radiographs, two test phantoms clean and drawn
    over a held-out radiograph: the phantom-only xray-multiclass v0.1.0 marks bone on every chest
    radiograph (its card's limit, measured), while xray-femur v0.2.0 with the product's size rule
    reports a femur on at most one (its card: JPCLN037's humerus) and keeps both clean phantoms'
    femurs."""
    from SpineKneeSegLib.engine.weights import find_entry, read_registry
    from xray_real import evaluate_real, mean_class_dice

    v010 = next(e for e in read_registry() if e.model == "xray-multiclass" and e.version == "0.1.0")
    multi = evaluate_real(v010.path(), n=2, log=lambda m: None, task="xray-multiclass")
    assert multi["summary"]["chest_radiographs"] == 50 and multi["summary"]["chest_fp_radiographs"] == 50
    assert {c["kind"] for c in multi["composites"]} == {"clean", "composite"} and len(multi["composites"]) == 4
    assert "phantoms_without_femur_after_rule" not in multi["summary"]
    femur = find_entry("xray-femur")
    assert femur.version != "0.1.0"
    result = evaluate_real(femur.path(), n=2, log=lambda m: None)
    assert result["summary"]["chest_radiographs_with_bone_reported"] <= 1
    assert all(c["femur_found"] and c["dice_after_rule"] > 0.9 for c in result["composites"] if c["kind"] == "clean")
    truth = np.array([0, 1, 1, 2, 2, 3])
    assert mean_class_dice(np.array([0, 1, 1, 2, 0, 0]), truth, (1, 2, 3)) == pytest.approx((1 + 2 / 3 + 0) / 3)
