"""X-ray training (Training/xray.py) and importers (Training/xray_import.py): tiny overfit runs that
must halve their loss, resume, load through the weights registry; importers checked against
masks and polygons whose pixels are known exactly."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import xray as X  # noqa: E402
import xray_import as XI  # noqa: E402
from PIL import Image as PILImage
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import read_image, write_image
from SpineKneeSegLib.engine.weights import resolve_weights
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.tasks.xray.phantom import xray_femur_phantom


def _tiny(task, **kw):
    base = dict(task=task, variant="cpu", network_px=64, n_train=2, n_val=2, steps=60, batch_size=2, eval_every=30,
                noise_p=0.0, flip_p=0.0)  # the seeds' optimisers and learning rates
    return X.Config(**{**base, **kw})


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task", ["xray-femur", "xray-multiclass"])
def test_overfit_resume_and_registry_load(task, tmp_path):
    cfg = _tiny(task)
    state = X.train(cfg, tmp_path / "run", log=lambda *_: None)
    losses = [h["loss"] for h in state["history"]]
    assert losses[-1] <= 0.5 * losses[0], losses
    weights = resolve_weights(TASKS[task], tmp_path / "run" / "best.pt")  # the product's loader
    assert weights.checkpoint["metadata"]["trained_on"].startswith("synthetic radiograph phantoms only")
    assert weights.preprocessing == {"network_px": 64}
    if task == "xray-multiclass":
        resolved = cfg.resolved()
        assert (resolved.optimiser, resolved.loss, resolved.clip_grad) == ("rmsprop", "dice+ce", 1.0)
        assert weights.network["config"]["norm"] == "batch" and weights.network["config"]["out_channels"] == 4
    else:
        assert weights.network["config"]["dropout"] == 0.2 and weights.network["config"]["out_channels"] == 1
    # resume: continues from the saved step, does not start over
    state2 = X.train(X.Config(**{**cfg.__dict__, "steps": 90}), tmp_path / "run", resume=True, log=lambda *_: None)
    assert state2["step"] == 90 and [h["step"] for h in state2["history"]] == [30, 60, 90]


def test_noise_is_added_to_the_16_bit_values():
    image, _, _ = X.make_case("xray-femur", 3)
    noisy = X.add_noise(image, 5000.0, np.random.default_rng(0))
    diff = (noisy.array - image.array)[(image.array > 6000) & (image.array < 59000)]
    assert abs(diff.std() - 5000) < 100 and noisy.array.min() >= 0 and noisy.array.max() <= 65535
    assert np.array_equal(noisy.array, np.round(noisy.array))


def test_folder_import_pairs_by_stem_and_keeps_the_grid(tmp_path):
    ph = xray_femur_phantom(4, intensity_range="uint16", shape=(200, 240), pixel_mm=1.6)
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    write_image(Image(ph.image.array.astype(np.uint16), ph.image.spacing), tmp_path / "img" / "case1.png")
    PILImage.fromarray(ph.labels.array[0] * 255).save(tmp_path / "msk" / "case1_mask.png")
    PILImage.fromarray(ph.labels.array[0] * 255).save(tmp_path / "img" / "orphan.png")  # no mask: skipped
    manifest = XI.import_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "out", ["femur"])
    rows = list(csv.DictReader(open(manifest)))
    assert [r["id"] for r in rows] == ["case1"]
    labels, image = read_image(rows[0]["labels"]), read_image(rows[0]["image"])
    np.testing.assert_array_equal(labels.array, ph.labels.array)
    assert labels.same_geometry(image)
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == [{"value": 1, "name": "femur"}]


def test_coco_polygons_and_rle_rasterise_on_pixel_centres(tmp_path):
    grey = np.full((80, 100), 100, np.uint8)
    PILImage.fromarray(grey).save(tmp_path / "a.png")
    theta = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    circle = np.c_[60 + 15 * np.cos(theta), 40 + 15 * np.sin(theta)]  # centre (60, 40), radius 15
    rle = np.zeros((80, 100), bool)
    rle[70:75, 5:9] = True
    runs, flat, value, n = [], rle.T.ravel(), False, 0  # column-major runs starting with background
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 80, "width": 100}],
            "categories": [{"id": 0, "name": "bones"}, {"id": 1, "name": "femur"}, {"id": 2, "name": "hip bone"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[10, 20, 50, 20, 50, 60, 10, 60]]},
                {"id": 2, "image_id": 7, "category_id": 2, "segmentation": [circle.ravel().tolist()]},
                {"id": 3, "image_id": 7, "category_id": 1, "segmentation": {"counts": runs, "size": [80, 100]},
                 "iscrowd": 1}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    manifest = XI.import_coco(tmp_path / "c.json", tmp_path, tmp_path / "out", None)
    labels = read_image(next(csv.DictReader(open(manifest)))["labels"]).array[0]
    expected = np.zeros((80, 100), np.uint8)
    expected[20:60, 10:50] = 1  # pixel centres c + 0.5 in (10, 50), r + 0.5 in (20, 60)
    rr, cc = np.mgrid[:80, :100] + 0.5
    expected[(cc - 60) ** 2 + (rr - 40) ** 2 < 15 ** 2 - 1.0] = 2  # inside the 200-gon for sure
    ring = np.abs(np.hypot(cc - 60, rr - 40) - 15) < 0.5  # the polygon's chords: either side
    expected[rle] = 1
    assert np.array_equal(labels[~ring], expected[~ring])
    assert json.loads((tmp_path / "out" / "classes.json").read_text())[1]["name"] == "hip bone"
    bad = dict(coco, annotations=[{"id": 9, "image_id": 7, "category_id": 1,
                                   "segmentation": {"counts": "abc", "size": [80, 100]}}])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert XI.main(["coco", "--json", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o2")]) == 2


def test_jsrt_raw_images_and_half_size_scr_masks(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4096, (2048, 2048)).astype(">u2")
    (tmp_path / "img").mkdir()
    raw.tofile(tmp_path / "img" / "JPCLN001.IMG")
    classes = ["right lung", "left lung", "heart"]
    boxes = {"right lung": (100, 900, 100, 450), "left lung": (100, 900, 560, 900), "heart": (500, 800, 400, 650)}
    for c, (r0, r1, c0, c1) in boxes.items():
        (tmp_path / "masks" / c).mkdir(parents=True)
        m = np.zeros((1024, 1024), np.uint8)
        m[r0:r1, c0:c1] = 255
        PILImage.fromarray(m).save(tmp_path / "masks" / c / "JPCLN001.gif")
    manifest = XI.import_jsrt(tmp_path / "img", tmp_path / "masks", tmp_path / "out", classes)
    row = next(csv.DictReader(open(manifest)))
    image, labels = read_image(row["image"]), read_image(row["labels"])
    assert image.array.shape == (1, 2048, 2048) and np.allclose(image.spacing[:2], 0.175)
    np.testing.assert_array_equal(image.array[0], 4095 - raw.astype(np.int64))  # stored dark-is-high: inverted
    lab = labels.array[0]
    assert lab[2 * 500, 2 * 400] == 3 and lab[2 * 500 - 1, 2 * 400 - 1] == 1  # heart over the right lung
    assert lab[2 * 100, 2 * 100] == 1 and lab[2 * 100 - 1, 2 * 100] == 0  # replicated pixels: exact edges
    assert lab[2 * 900 - 1, 2 * 600] == 2 and lab[2 * 900, 2 * 600] == 0


def test_manifest_with_other_classes_trains_xray_multiclass(tmp_path):
    """Imported N-class data (here 2 classes) trains xray-multiclass; the checkpoint's label names
    replace the card's in the product (tasks.with_checkpoint_labels)."""
    from SpineKneeSegLib.engine.cards import with_checkpoint_labels
    from SpineKneeSegLib.engine.inference import load_network, segment_slices

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for k in range(5):
        ph = xray_femur_phantom(k, intensity_range="uint16", classes="pelvis", shape=(160, 160), pixel_mm=2.2)
        write_image(Image(ph.image.array.astype(np.uint16), ph.image.spacing), tmp_path / "img" / f"c{k}.png")
        PILImage.fromarray(np.where(ph.labels.array[0] == 3, 2, ph.labels.array[0] == 2).astype(np.uint8)).save(
            tmp_path / "msk" / f"c{k}.png")  # 1 = "iliac", 2 = "sacral" (names the card does not have)
    manifest = XI.import_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "imp", ["iliac", "sacral"])
    cfg = _tiny("xray-multiclass", n_train=0, manifest=str(manifest), steps=30, eval_every=30)
    X.train(cfg, tmp_path / "run", log=lambda *_: None)
    weights = resolve_weights(TASKS["xray-multiclass"], tmp_path / "run" / "best.pt")
    card = with_checkpoint_labels(TASKS["xray-multiclass"], weights.checkpoint["metadata"])
    assert [s.name for s in card.labels] == ["iliac", "sacral"] and weights.network["config"]["out_channels"] == 3
    image = read_image(tmp_path / "img" / "c0.png")
    out = segment_slices(card, image, load_network(weights, torch.device("cpu")), torch.device("cpu"),
                         weights.preprocessing)
    assert out.labels.shape == image.array.shape and out.labels.max() <= 2
