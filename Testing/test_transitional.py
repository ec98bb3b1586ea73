"""Transitional anatomy (4 or 6 lumbar-type vertebrae) is flagged in the report and in every
foramen marker's description, and never relabelled."""
import numpy as np
import pytest
from SpineKneeSegLib.engine.pipeline import postprocess
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom
from SpineKneeSegLib.tasks.spine.transitional import check_transitional

CARD = TASKS["lumbar-foramina"]


def _with_l6_named_l5(phantom):
    """What a 5-lumbar-trained network does with a sixth lumbar vertebra: names it L5 as well.
    The phantom's L5 body is copied one segment down (to where L6 lies) with the same label."""
    labels = phantom.labels.array.copy()
    centres = {v["name"]: np.array(v["centre_ras"]) for v in phantom.extra["vertebrae"]}
    shift = phantom.image.ras_to_ijk_points([centres["L6"]])[0] - phantom.image.ras_to_ijk_points([centres["L5"]])[0]
    dk, dj, di = np.rint(shift[::-1]).astype(int)
    l5 = labels == 5
    moved = np.roll(np.roll(np.roll(l5, dk, 0), dj, 1), di, 2)
    labels[moved & (labels == 0)] = 5
    return labels


@pytest.mark.parametrize("k_toward", ["left", "right"])
def test_five_lumbar_is_typical(k_toward):
    phantom = spine_phantom(seed=3, lumbar_count=5, k_toward=k_toward, tilt_deg=8)
    result = check_transitional(phantom.labels.array, phantom.image)
    assert result.status == "typical" and not result.flagged


def test_four_lumbar_is_flagged():
    phantom = spine_phantom(seed=4, lumbar_count=4)
    assert phantom.extra["missing_vertebrae"] == ["L5"]
    result = check_transitional(phantom.labels.array, phantom.image)
    assert result.status == "suspected-4" and result.flagged
    assert "L5" in result.message


def test_six_lumbar_named_twice_is_flagged():
    phantom = spine_phantom(seed=5, lumbar_count=6, k_toward="right", tilt_deg=-6)
    result = check_transitional(_with_l6_named_l5(phantom), phantom.image)
    assert result.status == "suspected-6", result.as_dict()
    (dup,) = result.evidence["duplicated_levels"]
    assert dup["level"] == "L5"
    assert 15 < dup["separation_mm"] < 45  # one vertebral segment apart


def test_small_specks_of_a_level_are_not_a_vertebra():
    phantom = spine_phantom(seed=6)
    labels = phantom.labels.array.copy()
    k, j, i = np.argwhere(labels == 3)[0]
    labels[k, max(j - 60, 0), i] = 3  # one stray voxel far away
    assert check_transitional(labels, phantom.image).status == "typical"


def test_flag_reaches_report_and_marker_descriptions_without_relabelling():
    phantom = spine_phantom(seed=5, lumbar_count=6)
    raw = _with_l6_named_l5(phantom)
    result = postprocess(CARD, phantom.image, raw)
    assert result.summaries["transitional_anatomy"]["status"] == "suspected-6"
    assert any("transitional anatomy suspected" in w for w in result.warnings)
    # never relabelled: the levels are the network's (largest component per level), L1-L5 kept
    assert sorted(np.unique(result.labels.array))[1:] == [1, 2, 3, 4, 5]
    assert np.array_equal(result.labels.array == 4, phantom.labels.array == 4)
    assert result.points, "the estimate gives markers from the levels"
    for point in result.points:
        assert "TRANSITIONAL ANATOMY SUSPECTED (suspected-6)" in point["description"]
        assert point["attributes"]["transitional"] == "suspected-6"
    typical = postprocess(CARD, phantom.image, phantom.labels.array)
    assert typical.summaries["transitional_anatomy"]["status"] == "typical"
    assert not any("TRANSITIONAL" in p["description"] for p in typical.points)
