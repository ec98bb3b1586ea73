"""A foramen marker's confidence means something (issue 26, part 2): it is the calibrated
probability that the marker is within tolerance of its foramen, computed from the level decoding,
the bodies' probabilities and the markers' geometry; it differs across scans, and a marker moved
off its place ranks lowest. Phantoms (tasks/spine/phantom.py) carry the true foramina."""
import json

import numpy as np
import pytest
from SpineKneeSegLib.tasks.spine.foramen_confidence import (
    ConfidenceModel,
    confidences,
    foramen_evidence,
)
from SpineKneeSegLib.tasks.spine.foramina import Foramen, estimate_foramina_from_levels
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom


def _estimate(seed):
    phantom = spine_phantom(seed=seed, tilt_deg=6.0 * (seed % 3 - 1), k_toward=("left", "right")[seed % 2])
    foramina, _ = estimate_foramina_from_levels(phantom.labels.array, phantom.image)
    assert len(foramina) == 10
    return phantom, foramina


@pytest.mark.parametrize("seed,moved", [(0, ("L3", "left")), (1, ("L1", "right")), (2, ("L5", "left"))])
def test_a_marker_moved_off_its_foramen_ranks_lowest(seed, moved):
    phantom, foramina = _estimate(seed)
    bodies = {k: 0.9 for k in range(1, 6)}
    before = confidences(foramen_evidence(foramina, 0.95, bodies))
    i = next(n for n, f in enumerate(foramina) if (f"L{f.level}", f.side) == moved)
    f = foramina[i]
    shifted = list(foramina)
    shifted[i] = Foramen(f.level, f.side, tuple(np.asarray(f.ras) + (0.0, 0.0, 12.0)), 0.0, 0, (-1, -1), source=f.source)
    after = confidences(foramen_evidence(shifted, 0.95, bodies))
    assert after[i] == min(after) and all(after[i] < c for n, c in enumerate(after) if n != i)
    assert after[i] < before[i] - 0.2


def test_a_doubtful_level_count_and_weak_bodies_lower_every_marker():
    _, foramina = _estimate(0)
    sure = confidences(foramen_evidence(foramina, 0.95, {k: 0.9 for k in range(1, 6)}))
    doubtful = confidences(foramen_evidence(foramina, 0.15, {k: 0.9 for k in range(1, 6)}))
    weak_l3 = confidences(foramen_evidence(foramina, 0.95, {**{k: 0.9 for k in range(1, 6)}, 3: 0.2}))
    assert all(d < s for d, s in zip(doubtful, sure))
    for f, w, s in zip(foramina, weak_l3, sure):  # L2/L3 and L3/L4 sit on L3; the others do not
        assert (w < s) if f.level in (2, 3) else (w == s), f.label


def test_the_model_is_a_probability_and_extrapolation_costs():
    model = ConfidenceModel()
    base = {"level_confidence": 0.9, "body_probability": 0.9, "asymmetry_mm": 0.0, "spacing_deviation": 0.0,
            "extrapolated": 0}
    assert 0.0 < model.probability(base) < 1.0
    assert model.probability({**base, "extrapolated": 1}) < model.probability(base)


@pytest.mark.mrml
def test_confidences_differ_across_scans_and_reach_the_markers_and_report(tmp_path):
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.tasks import get_task

    card = get_task("lumbar-foramina")
    per_case = []
    for seed, noise in ((0, 0.02), (3, 0.06), (7, 0.1)):
        phantom = spine_phantom(seed=seed, noise=noise, tilt_deg=4.0 * seed)
        write_image(phantom.image, tmp_path / f"p{seed}.nii.gz")
        report = run_case(card, [str(tmp_path / f"p{seed}.nii.gz")], tmp_path / f"out{seed}", RunOptions(device="cpu"))
        confidence = report["summaries"]["foramina"]["confidence"]
        values = confidence["per_foramen"]
        assert values and all(0.0 <= v <= 1.0 for v in values.values())
        assert confidence["least_confident_first"][0] == min(values, key=values.get)
        doc = json.loads((tmp_path / f"out{seed}" / "foramina.mrk.json").read_text())
        described = {cp["label"]: cp["description"] for cp in doc["markups"][0]["controlPoints"]}
        assert all(f"confidence={values[name]:.2f}" in text for name, text in described.items())
        per_case.append(tuple(round(values[k], 3) for k in sorted(values)))
    assert len(set(per_case)) == 3  # not a constant: each scan's evidence gives its own figures
    assert len({v for case in per_case for v in case}) > 3
