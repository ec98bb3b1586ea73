"""Slice growth (issue 21, session 35): the lumbar level network runs outward from the middle
slices and stops beyond the column; the slices it skips would have held no label."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from SpineKneeSegLib.engine.inference import SliceGrowth, segment_slices
from SpineKneeSegLib.engine.preprocessing import canonical_image
from SpineKneeSegLib.tasks import TASKS, make_phantom


def grown(n: int, labelled_px, min_px: int = 20, batch_size: int = 8) -> tuple[list[list[int]], SliceGrowth]:
    """Every batch the planner asks for, given each slice's labelled pixels."""
    growth, batches = SliceGrowth(n, min_px), []
    for index in growth.batches(batch_size):
        batches.append([int(i) for i in index])
        growth.record(index, [labelled_px(i) for i in index])
    return batches, growth


def column(first: int, last: int, px: int = 400):
    return lambda i: px if first <= i <= last else 0


def test_runs_outward_and_stops_one_slice_beyond_the_column_on_each_side():
    batches, growth = grown(20, column(3, 16))
    assert batches[0] == [8, 9, 10, 11]  # the middle first
    assert batches[1] == [6, 7, 12, 13]  # then both sides together
    run = sorted(i for b in batches for i in b)
    assert run == list(range(2, 18))  # 2 and 17 are empty: nothing beyond them is run
    assert len(run) == len(set(run))
    summary = growth.summary()
    assert (summary["slices_run"], summary["of"], summary["first"], summary["last"]) == (16, 20, 2, 17)
    assert not summary["every_slice"]


def test_a_column_off_the_middle_grows_on_one_side_only():
    batches, _ = grown(20, column(0, 9))
    assert sorted(i for b in batches for i in b) == list(range(0, 12))  # 10 and 11 were in the first batch


def test_a_column_filling_the_field_of_view_runs_every_slice():
    _, growth = grown(15, column(0, 14))
    assert growth.summary()["slices_run"] == 15 and growth.summary()["every_slice"] and not growth.fallback


def test_nothing_in_the_middle_runs_every_slice():
    batches, growth = grown(20, column(0, 5))  # the middle four are empty: the column is not assumed away
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert growth.fallback and growth.summary()["every_slice"]
    assert all(len(b) <= 8 for b in batches)


def test_a_speck_below_min_px_ends_the_growth():
    profile = lambda i: 400 if 6 <= i <= 13 else (5 if i in (4, 5, 14, 15) else 0)  # noqa: E731
    batches, _ = grown(20, profile, min_px=20)
    assert sorted(i for b in batches for i in b) == list(range(4, 16))
    batches, _ = grown(20, profile, min_px=1)  # a lower bar follows the specks out
    assert sorted(i for b in batches for i in b) == list(range(2, 18))


def test_fewer_slices_than_the_middle_block():
    batches, growth = grown(3, column(0, 2))
    assert batches == [[0, 1, 2]] and growth.summary()["slices_run"] == 3


class BrightIsLevel(torch.nn.Module):
    """Every level's logit rises with the middle slice's intensity: labels exactly where the image is
    bright, so which slices hold labels is known beforehand."""

    size_multiple = 1

    def forward(self, x):
        return (10 * x[:, 1:2] - 30).expand(-1, 5, -1, -1).contiguous()


@pytest.mark.parametrize("first,last", [(5, 12), (0, 7)])
def test_grown_run_equals_every_slice_run_on_a_sagittal_volume(first, last):
    card = TASKS["lumbar-foramina"]
    assert card.preprocessing.grow_min_px  # the shipped task grows
    canon, _ = canonical_image(make_phantom("lumbar-foramina", seed=0).image, "sagittal")  # slices along axis 0
    rng = np.random.default_rng(0)
    array = rng.normal(0, 1, canon.array.shape).astype(np.float32)
    array[first:last + 1, 20:50, 10:30] += 40
    image = canon.with_array(array)
    every = dataclasses.replace(card, preprocessing=dataclasses.replace(card.preprocessing, grow_min_px=None))
    net = BrightIsLevel()
    full = segment_slices(every, image, net, torch.device("cpu"), keep_probabilities="network")
    grow = segment_slices(card, image, net, torch.device("cpu"), keep_probabilities="network")
    held = np.flatnonzero(canonical_image(image.with_array(full.labels), "sagittal")[0].array.any(axis=(1, 2)))
    assert (held.min(), held.max()) == (first, last)
    assert np.array_equal(grow.labels, full.labels)
    assert np.array_equal(grow.probabilities[:, held], full.probabilities[:, held])
    summary = grow.summaries["slice_growth"]
    assert summary["slices_run"] < canon.array.shape[0]
    assert summary["first"] <= first and summary["last"] >= last
    assert "slice_growth" not in full.summaries
