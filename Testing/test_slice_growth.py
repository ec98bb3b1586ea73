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


def test_column_window_is_centred_on_the_labelled_columns_and_on_the_pooling_grid():
    growth = SliceGrowth(20, 20)
    labelled = torch.zeros(4, 50, 288, dtype=torch.bool)
    labelled[1, 10:20, 100:141] = True
    growth.column_window(labelled, 192, 288, 32)
    assert growth.columns == (32, 224, 288)  # centre 120.5 -> 24.5 -> 32 (a multiple of 32)
    near_edge = torch.zeros(4, 50, 288, dtype=torch.bool)
    near_edge[0, :, 270:280] = True
    growth.column_window(near_edge, 192, 288, 32)
    assert growth.columns == (96, 288, 288)  # clipped inside the slice
    narrow = SliceGrowth(20, 20)
    narrow.column_window(labelled[..., :192], 192, 192, 32)
    assert narrow.columns is None  # not wider than the window: whole slices
    empty = SliceGrowth(20, 20)
    empty.column_window(torch.zeros_like(labelled), 192, 288, 32)
    assert empty.columns is None
    with pytest.raises(ValueError, match="multiple"):
        SliceGrowth(20, 20).column_window(labelled, 200, 288, 32)


def test_wide_slices_run_on_the_column_window_after_the_middle():
    """Slices wider than column_px: after the middle four, only the window around the column is run;
    a network that sees one pixel at a time gives the same labels either way."""
    from SpineKneeSegLib.core.image import Image

    card = TASKS["lumbar-foramina"]
    assert card.preprocessing.column_px == 192
    canon, _ = canonical_image(make_phantom("lumbar-foramina", seed=0).image, "sagittal")
    rng = np.random.default_rng(1)
    array = rng.normal(0, 1, (14, 400, 400)).astype(np.float32)  # 400 mm at 1 mm: 286 -> 288 network columns
    array[3:11, 100:300, 150:200] += 40
    image = Image(array, canon.spacing, canon.origin, canon.direction)
    every = dataclasses.replace(card, preprocessing=dataclasses.replace(card.preprocessing, grow_min_px=None,
                                                                        column_px=None))
    calls = []

    class Recording(BrightIsLevel):
        size_multiple = 32  # padded like the level network

        def forward(self, x):
            calls.append(tuple(x.shape))
            return super().forward(x)

    full = segment_slices(every, image, Recording(), torch.device("cpu"), keep_probabilities="network")
    widths_full = {c[-1] for c in calls}
    calls.clear()
    grow = segment_slices(card, image, Recording(), torch.device("cpu"), keep_probabilities="network")
    assert widths_full == {288}
    assert calls[0][0] == 4 and calls[0][-1] == 288  # the middle slices whole
    assert {c[-1] for c in calls[1:]} == {192}  # the rest on the window
    assert np.array_equal(grow.labels, full.labels)
    run = sorted(range(grow.summaries["slice_growth"]["first"], grow.summaries["slice_growth"]["last"] + 1))
    assert np.array_equal(grow.probabilities[:, run], full.probabilities[:, run])  # 0 beyond the window, as there
    assert grow.summaries["slice_growth"]["network_columns"][1] - grow.summaries["slice_growth"]["network_columns"][0] == 192


def test_cli_every_slice_runs_the_seeds_way(tmp_path):
    """The shipped level model on the spine phantom: by default the report says which slices ran;
    --every-slice runs them all, whole, and the labels agree."""
    import json

    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import read_image, write_image

    path = tmp_path / "spine.nii.gz"
    write_image(make_phantom("lumbar-foramina", seed=0).image, path)
    assert cli.main(["run", "--task", "lumbar-foramina", str(path), "-o", str(tmp_path / "grow"),
                     "--progress", "none"]) == 0
    assert cli.main(["run", "--task", "lumbar-foramina", str(path), "-o", str(tmp_path / "every"),
                     "--progress", "none", "--every-slice"]) == 0
    grow = json.loads((tmp_path / "grow" / "report.json").read_text())["summaries"]
    every = json.loads((tmp_path / "every" / "report.json").read_text())["summaries"]
    n = canonical_image(read_image(path), "sagittal")[0].array.shape[0]
    assert grow["slice_growth"]["of"] == n and 4 <= grow["slice_growth"]["slices_run"] <= n
    assert "slice_growth" not in every
    a = read_image(tmp_path / "grow" / "labels.nii.gz").array
    b = read_image(tmp_path / "every" / "labels.nii.gz").array
    assert (a > 0).sum() > 0 and np.array_equal(a, b)


def test_input_statistics_are_computed_once_for_the_validated_array(monkeypatch):
    """Input validation's normalisation statistics (canonical slices) are the network's, reused for
    that very array and recomputed for any other (a copy, a bias-corrected image)."""
    from SpineKneeSegLib.engine import preprocessing

    image = make_phantom("lumbar-foramina", seed=0).image
    stats = preprocessing.input_normalisation_stats(image, "sagittal", "zscore")
    assert stats == preprocessing.normalisation_stats(canonical_image(image, "sagittal")[0].array, "zscore")

    def fail(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(preprocessing, "normalisation_stats", fail)
    assert preprocessing.input_normalisation_stats(image, "sagittal", "zscore") == stats
    with pytest.raises(AssertionError, match="again"):
        preprocessing.input_normalisation_stats(image.with_array(image.array.copy()), "sagittal", "zscore")
    with pytest.raises(AssertionError, match="again"):
        preprocessing.input_normalisation_stats(image, "axial", "zscore")
