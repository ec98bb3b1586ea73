"""Seed 004's metrics on inputs with known answers."""
import json

import numpy as np
import pytest
from evaluate import (  # noqa: E402
    exact_binomial_comparison,
    foramen_errors,
    read_markers,
    summarise_foramina,
)
from spine_levels import level_identification, level_labels, weighted_dice_loss  # noqa: E402


def test_foramen_errors_split_in_plane_and_lateral_and_count_missed():
    truth = {"L1 left": (10.0, 0.0, 0.0), "L1 right": (-10.0, 0.0, 0.0), "L2 left": (10.0, 0.0, -30.0)}
    pred = {"L1 left": (13.0, 3.0, 4.0), "L1 right": (-10.5, 1.0, 0.0)}
    rows = foramen_errors(truth, pred)
    assert rows["L1 left"]["in_plane_mm"] == pytest.approx(5.0) and rows["L1 left"]["lateral_mm"] == pytest.approx(3.0)
    assert not rows["L1 left"]["within"]  # 3D distance sqrt(34) > 5 mm
    assert rows["L1 right"]["within"] and rows["L2 left"]["missed"] and not rows["L2 left"]["within"]
    summary = summarise_foramina(rows)
    assert summary["missed"] == 1 and summary["percent_within_5mm"] == pytest.approx(100 / 3, abs=0.01)


def test_exact_binomial_on_discordant_pairs():
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    result = exact_binomial_comparison(a, b)
    assert (result["a_only"], result["b_only"], result["discordant"]) == (10, 2, 12)
    assert result["p_value"] == pytest.approx(0.0386, abs=1e-3)  # two-sided exact binomial, 10 of 12
    assert exact_binomial_comparison([True], [True])["p_value"] == 1.0


def test_read_markers_converts_lps_and_averages_points(tmp_path):
    path = tmp_path / "a.mrk.json"
    path.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [
        {"label": "L3 right", "position": [-10, 5, 20], "positionStatus": "defined"},
        {"label": "L3 right", "position": [-12, 5, 22], "positionStatus": "defined"},
        {"label": "L3 left", "position": [1, 2, 3], "positionStatus": "undefined"},
        {"label": "something else", "position": [0, 0, 0]}]}]}))
    markers = read_markers(path)
    assert list(markers) == ["L3 right"]
    assert markers["L3 right"] == pytest.approx((11.0, -5.0, 21.0))


def test_level_identification_counts_shifts_and_missing():
    truth = np.zeros((1, 10, 60), np.uint8)
    for level in range(1, 6):
        truth[0, :, level * 10:(level * 10) + 8] = level
    assert level_identification(truth, truth)["all_correct"]
    shifted = np.where(truth > 0, np.clip(truth + 1, 0, 5), 0).astype(np.uint8)  # every label one level down
    shifted[truth == 5] = 0
    result = level_identification(shifted, truth)
    assert result["missing"] == 1 and result["shifted"] == 4 and not result["all_correct"]
    assert (2, 1) in result["shifts"]


def test_level_labels_drop_thoracic_negatives():
    assert list(level_labels(np.array([0, 1, 5, 6, 7]))) == [0, 1, 5, 0, 0]


def test_weighted_dice_is_perfect_for_perfect_logits():
    import torch

    target = torch.zeros(2, 5, 8, 8)
    target[:, 2, 2:5, 2:5] = 1
    logits = (target * 2 - 1) * 50
    assert float(weighted_dice_loss(logits, target, torch.tensor([1.0, 0.9, 0.7, 0.6, 0.5]))) < 1e-3
