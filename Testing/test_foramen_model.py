"""The foramen model (seed 004: MultiNet on 7 mm in-slice foramen discs) and its localiser.

``Testing/fixtures/foramen-phantom.pt`` was trained by ``Training/spine_foramina.py`` on phantoms
only (seeds 0-47; selected on seeds 1000-1011). It is a test fixture, never registered or shipped:
no real foramen labels exist yet. These tests score it on held-out phantoms (seeds 2000+, both
handedness of the direction matrix) whose foramina come from pedicle and disc geometry with random
offsets in tasks/spine/phantom.py, which does not import the estimator or the localiser."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from spine_foramina import TEST_SEEDS, phantom_case, predict_foramina, score_foramina  # noqa: E402
from spine_levels import Config, network_config, sample_batch, weighted_dice_loss  # noqa: E402
from SpineKneeSegLib import cli  # noqa: E402
from SpineKneeSegLib.annotation.foramen_labels import (  # noqa: E402
    ForamenPoint,
    rasterise_foramen_targets,
)
from SpineKneeSegLib.core.image_io import write_image  # noqa: E402
from SpineKneeSegLib.engine.inference import load_network  # noqa: E402
from SpineKneeSegLib.engine.models import build_network  # noqa: E402
from SpineKneeSegLib.engine.preprocessing import Orientation, reorient  # noqa: E402
from SpineKneeSegLib.engine.weights import (  # noqa: E402
    find_entry,
    register_model,
    resolve_weights,
    save_checkpoint,
)
from SpineKneeSegLib.tasks import TASKS  # noqa: E402
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom  # noqa: E402

CARD = TASKS["lumbar-foramina"]
FIXTURE = Path(__file__).parent / "fixtures" / "foramen-phantom.pt"
SPACING = 1.4


@pytest.fixture(scope="module")
def net():
    return load_network(resolve_weights(CARD, FIXTURE, "foramina"), torch.device("cpu"))


def _distances(truth: dict, predicted: dict) -> dict:
    return {label: float(np.linalg.norm(np.subtract(predicted[label], t))) for label, t in truth.items()
            if label in predicted}


def test_targets_are_discs_on_the_points_slices():
    phantom = spine_phantom(seed=11, k_toward="left", tilt_deg=12, spacing=(0.9, 0.9, 4.0))
    points = [ForamenPoint(p["level"], p["side"], p["ras"]) for p in phantom.points]
    levels, sides, notes = rasterise_foramen_targets(points, phantom.image, radius_mm=7.0)
    assert notes == []
    for p, raw in zip(points, phantom.points):
        k = int(round(raw["ijk"][2]))
        disc = (levels[k] == p.level) & (sides[k] == (1 if p.side == "left" else 2))
        area_mm2 = disc.sum() * 0.9 * 0.9
        assert abs(area_mm2 - np.pi * 49) < 0.12 * np.pi * 49  # pi r^2 within pixelation
        j, i = np.argwhere(disc).mean(0)
        assert np.hypot(j - raw["ijk"][1], i - raw["ijk"][0]) * 0.9 < 0.6


@pytest.mark.parametrize("seed", TEST_SEEDS[:4])
def test_markers_within_2mm_on_held_out_phantoms(net, seed):
    case = phantom_case(seed)
    predicted = predict_foramina(net, case["image"], SPACING)
    distances = _distances(case["truth"], predicted)
    assert set(predicted) == set(case["truth"]), f"missed {set(case['truth']) - set(predicted)}"
    assert max(distances.values()) <= 2.0, distances


@pytest.mark.parametrize("k_toward", ["left", "right"])
def test_left_and_right_follow_the_direction_matrix(net, k_toward):
    phantom = spine_phantom(seed=2100, k_toward=k_toward, tilt_deg=-9)
    truth = {r["label"]: r["centre_ras"] for r in phantom.extra["foramina"]}
    predicted = predict_foramina(net, phantom.image, SPACING)
    assert set(predicted) == set(truth)
    for label, ras in predicted.items():
        side = label.split()[1]
        assert (ras[0] > phantom.extra["midline_ras_x"]) == (side == "right")  # RAS +x = patient right
    assert max(_distances(truth, predicted).values()) <= 2.0


def test_permuted_or_flipped_axes_give_the_same_markers(net):
    phantom = spine_phantom(seed=2101, k_toward="right")
    reference = predict_foramina(net, phantom.image, SPACING)
    for layout in (Orientation((2, 0, 1), (True, False, True)), Orientation((1, 2, 0), (False, True, True))):
        moved = predict_foramina(net, reorient(phantom.image, layout), SPACING)
        assert set(moved) == set(reference)
        assert max(_distances(reference, moved).values()) < 1e-3


def test_summary_on_all_test_phantoms(net):
    """Seed 004's metrics on the 12 test phantoms."""
    s = score_foramina(net, [phantom_case(seed) for seed in TEST_SEEDS], SPACING)["summary"]
    assert s["missed"] == 0
    assert s["percent_within_5mm"] >= 95.0, s


@pytest.mark.mrml
def test_cli_writes_model_markers(tmp_path):
    phantom = spine_phantom(seed=2102, k_toward="left")
    write_image(phantom.image, tmp_path / "spine.nii.gz")
    out = tmp_path / "out"
    code = cli.main(["run", "--task", "lumbar-foramina", str(tmp_path / "spine.nii.gz"), "-o", str(out),
                     "--aux-weights", f"foramina={FIXTURE}", "--progress", "none"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summaries"]["foramina"]["method"] == "foramen model"
    doc = json.loads((out / "foramina.mrk.json").read_text())
    points = doc["markups"][0]["controlPoints"]
    assert doc["markups"][0]["coordinateSystem"] == "LPS"
    truth = {r["label"]: r["centre_ras"] for r in phantom.extra["foramina"]}
    assert sorted(p["label"] for p in points) == sorted(truth)
    for p in points:
        ras = np.array(p["position"]) * [-1, -1, 1]
        assert np.linalg.norm(ras - truth[p["label"]]) <= 2.0
        assert "predicted by the foramen model" in p["description"]


def test_foramen_trainer_overfits_a_fixed_batch_and_reloads_through_the_registry(tmp_path, monkeypatch):
    from spine_foramina import prepare

    cfg = Config(batch_size=4, crop=96, seed=0)
    prepared = [prepare(phantom_case(7), SPACING)]
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    x, target = sample_batch(prepared, cfg, rng, gen)
    assert target.sum() > 0
    torch.manual_seed(0)
    config = {**network_config(cfg), "levels": 3}
    model = build_network("multinet", config)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        optimiser.zero_grad()
        loss = weighted_dice_loss(model(x), target, None)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] <= 0.5 * losses[0], losses[::25]

    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("SPINEKNEESEG_MODELS", str(models))
    save_checkpoint(models / "foramen-test.pt", CARD.name, "multinet", config, model.state_dict(),
                    preprocessing={"in_plane_spacing_mm": SPACING}, model="foramina")
    register_model(models / "foramen-test.pt", "lumbar-foramen-points", "0.0.1", card="none (test)")
    assert find_entry("lumbar-foramen-points").version == "0.0.1"
    reloaded = load_network(resolve_weights(CARD, None, "foramina"), torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        # the product folds batch norm into the convolutions: float rounding, ~2e-5 on logits up to ~66
        assert torch.allclose(reloaded(x), model(x), rtol=1e-5, atol=1e-4)


@pytest.mark.mrml
def test_trainer_reads_markers_from_a_manifest(mrml_scene, tmp_path):
    """Markers saved by Slicer Markups (LPS on disk) + a training manifest -> the same targets and
    truth as the phantom's own points: the annotation mode feeds the foramen trainer directly."""
    from spine_foramina import manifest_cases, prepare
    from SpineKneeSegLib.annotation.training_manifest import (
        TrainingCase,
        add_training_case,
    )
    from SpineKneeSegLib.mrml import nodes

    phantom = spine_phantom(seed=12, k_toward="left", tilt_deg=7)
    write_image(phantom.image, tmp_path / "case12.nii.gz")
    node = nodes.points_to_markups_node(mrml_scene, [p["ras"] for p in phantom.points],
                                       [p["label"] for p in phantom.points], name="case12")
    nodes.save_node(node, tmp_path / "case12.mrk.json")
    manifest = tmp_path / "manifest.csv"
    add_training_case(manifest, TrainingCase("case12", CARD.name, tmp_path / "case12.nii.gz",
                                             markers=tmp_path / "case12.mrk.json"))
    add_training_case(manifest, TrainingCase("other", "knee-bones", tmp_path / "case12.nii.gz",
                                             labels=tmp_path / "case12.nii.gz"))
    (case,) = manifest_cases(manifest)
    truth = {r["label"]: r["centre_ras"] for r in phantom.extra["foramina"]}
    assert set(case["truth"]) == set(truth)
    assert max(np.linalg.norm(np.subtract(case["truth"][k], truth[k])) for k in truth) < 1e-3
    from_file = prepare(case, SPACING)
    direct = prepare({"id": "direct", "image": phantom.image,
                      "points": [ForamenPoint(p["level"], p["side"], p["ras"]) for p in phantom.points]}, SPACING)
    assert np.array_equal(from_file.labels, direct.labels) and from_file.labels.max() == 5
