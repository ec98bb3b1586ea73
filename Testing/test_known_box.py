"""A box known to hold every label, left by the level decoding for the steps after it (session 35):
the steps scan only that box and give exactly what they give scanning the whole volume."""
from __future__ import annotations

import numpy as np
from SpineKneeSegLib.engine.pipeline import RunResult
from SpineKneeSegLib.engine.steps import STEPS, StepContext, labelled_box, set_labels
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.tasks.spine.foramina import estimate_foramina_from_levels
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom


def _context(image, labels) -> StepContext:
    """Labels that are not the network's raw output (as after the level decoding)."""
    return StepContext(TASKS["lumbar-foramina"], image, RunResult(image.with_array(labels)), labels.copy())


def _box_of(labels: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    idx = np.nonzero(labels)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + 1 + margin, n))
                 for i, n in zip(idx, labels.shape))


def test_a_known_box_belongs_to_its_labels_array_only():
    phantom = spine_phantom(seed=0)
    ctx = _context(phantom.image, phantom.labels.array)
    assert labelled_box(ctx) is None
    box = _box_of(phantom.labels.array)
    set_labels(ctx, phantom.labels.array.copy(), box)
    assert labelled_box(ctx) == box
    ctx.result.labels = phantom.image.with_array(phantom.labels.array.copy())  # a step that knew no box
    assert labelled_box(ctx) is None


def test_largest_component_step_in_the_known_box_equals_the_whole_volume():
    phantom = spine_phantom(seed=0)
    labels = phantom.labels.array.copy()
    rng = np.random.default_rng(0)
    box = _box_of(labels)
    inside = tuple(rng.integers(b.start, b.stop, 40) for b in box)  # specks to be removed, inside the box
    labels[inside] = rng.integers(1, 6, 40).astype(labels.dtype)
    whole = _context(phantom.image, labels)
    STEPS["largest_component_per_label"].run(whole)
    boxed = _context(phantom.image, labels)
    set_labels(boxed, labels, box)
    STEPS["largest_component_per_label"].run(boxed)
    assert np.array_equal(boxed.result.labels.array, whole.result.labels.array)
    assert not np.array_equal(whole.result.labels.array, labels)  # the specks went
    assert labelled_box(boxed) == box  # still holds everything: the clean-up only removes


def test_foramen_estimate_in_the_known_box_equals_the_whole_volume():
    phantom = spine_phantom(seed=1)
    labels = phantom.labels.array
    whole, notes = estimate_foramina_from_levels(labels, phantom.image)
    boxed, boxed_notes = estimate_foramina_from_levels(labels, phantom.image, known=_box_of(labels))
    assert [f.label for f in boxed] == [f.label for f in whole] and len(whole) == 10
    assert all(np.array_equal(f.ras, g.ras) for f, g in zip(boxed, whole))
    assert boxed_notes == notes


def test_transitional_check_in_the_known_box_equals_the_whole_volume():
    from SpineKneeSegLib.tasks.spine.transitional import check_transitional

    phantom = spine_phantom(seed=0)
    labels = phantom.labels.array.copy()
    labels[labels == 2] = 3  # L2 named L3 too: two separate "L3" vertebrae, the 6-lumbar pattern
    whole = check_transitional(labels, phantom.image)
    boxed = check_transitional(labels, phantom.image, known=_box_of(labels))
    assert whole.status == "suspected-6" and boxed.as_dict() == whole.as_dict()


def test_the_pipeline_hands_the_raw_labels_box_to_the_steps(tmp_path):
    """segment_slices reports a box holding every raw label, in the input's axes, for any layout."""
    import torch
    from SpineKneeSegLib.engine.inference import segment_slices
    from SpineKneeSegLib.engine.preprocessing import Orientation, reorient
    from test_slice_growth import BrightIsLevel

    image = spine_phantom(seed=0).image
    for layout in (Orientation(), Orientation((2, 0, 1), (True, False, True))):
        moved = reorient(image, layout)
        rng = np.random.default_rng(0)
        array = rng.normal(0, 1, moved.array.shape).astype(np.float32)
        array[tuple(slice(n // 3, n // 2) for n in array.shape)] += 40
        out = segment_slices(TASKS["lumbar-foramina"], moved.with_array(array), BrightIsLevel(), torch.device("cpu"),
                             keep_probabilities="network")
        assert out.labels.any() and out.labels_box is not None
        inside = np.zeros(out.labels.shape, bool)
        inside[out.labels_box] = True
        assert not out.labels[~inside].any()
        assert inside.sum() < 0.25 * inside.size  # near the labels, not the whole volume
