"""Canonical slice orientation: the same physical image stored with permuted or flipped voxel axes
gives the same network input and the same labels."""
import itertools

import numpy as np
import pytest
import torch
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.engine.inference import segment_slices
from SpineKneeSegLib.engine.models import build_network
from SpineKneeSegLib.engine.preprocessing import (
    Orientation,
    canonical_image,
    canonical_orientation,
    reorient,
)
from SpineKneeSegLib.tasks import TASKS, make_phantom

LAYOUTS = [Orientation(axes, flips) for axes, flips in
           [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, True))]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reorient_is_exact_in_physical_space(layout):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    image = Image(rng.normal(size=(5, 6, 7)).astype(np.float32), (0.5, 0.8, 3.0), (3, -4, 5), q)
    moved = reorient(image, layout)
    assert moved.same_geometry(image)
    # every voxel keeps its value at its physical position
    for kji in itertools.product(range(5), range(6), range(7)):
        lps = image.ijk_to_lps_points([kji[::-1]])[0]
        i, j, k = np.round(moved.lps_to_ijk_points([lps])[0]).astype(int)
        assert moved.array[k, j, i] == image.array[kji]
    assert np.array_equal(layout.undo(layout.apply(image.array)), image.array)


def test_spine_data_layout_is_already_canonical():
    """The shared spine volumes (i anterior->posterior, j superior->inferior, k toward patient right)
    are what the level model trains on: their canonical orientation is the identity."""
    direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
    image = Image(np.zeros((20, 224, 224), np.float32), (1, 1, 4), direction=direction)
    assert canonical_orientation(image, "sagittal") == Orientation()


@pytest.mark.parametrize("task", ["lumbar-foramina", "brain-wmh", "knee-bones"])
def test_same_physical_image_same_labels(task):
    card = TASKS[task]
    phantom = make_phantom(task, seed=4)
    torch.manual_seed(0)
    config = {**card.network.config, "in_channels": card.preprocessing.context_slices,
              "out_channels": card.output_channels}
    config.update({"levels": 3, "max_channels": 8} if card.network.factory == "multinet" else {"channels": (4, 8)})
    net = build_network(card.network.factory, config).eval()
    reference = segment_slices(card, phantom.image, net, torch.device("cpu")).labels
    assert reference.shape == phantom.image.array.shape
    for layout in LAYOUTS[1:]:
        moved = reorient(phantom.image, layout)
        labels = segment_slices(card, moved, net, torch.device("cpu")).labels
        assert np.array_equal(layout.undo(labels), reference)
        assert np.array_equal(canonical_image(moved, card.preprocessing.plane)[0].array,
                              canonical_image(phantom.image, card.preprocessing.plane)[0].array)


def test_tiled_inference_matches_whole_slices():
    """Blended overlapping tiles (bounded memory on big slices) agree with whole-slice inference."""
    from SpineKneeSegLib.engine.inference import tiled_forward

    torch.manual_seed(0)
    net = build_network("multinet", {"in_channels": 3, "out_channels": 5, "levels": 3, "max_channels": 8}).eval()
    x = torch.randn(2, 3, 96, 136)
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_forward(net, x, 64)
    assert tiled.shape == whole.shape
    agree = (tiled.max(1).indices == whole.max(1).indices).float().mean()
    assert agree > 0.97, float(agree)
    assert torch.equal(tiled_forward(net, x, None), whole)


def _nearest_level_net(levels: int, step: float) -> torch.nn.Module:
    """A 1x1 convolution whose argmax is the level nearest to the (normalised) intensity: its
    labels depend on each voxel alone, so every view of the same image must give the same labels."""
    net = torch.nn.Conv2d(1, levels, 1)
    c = torch.arange(levels, dtype=torch.float32)
    with torch.no_grad():
        net.weight.copy_((20 * c).view(levels, 1, 1, 1))
        net.bias.copy_(-20 * step * c ** 2 / 2)
    return net.eval()


def _fusion_card(**changes):
    import dataclasses

    card = TASKS["knee-bones"]
    pre = dataclasses.replace(card.preprocessing, bias_correction=None, network_px=None, crop_mm=None,
                              crop_window=None, tile_px=None, reformat_slice_mm=None,  # every slice of a view
                              **changes)
    return dataclasses.replace(card, preprocessing=pre)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_view_fusion_maps_every_view_back_onto_the_input(layout):
    """Sagittal + coronal fusion with a voxel-wise network equals the single view exactly, whatever
    the file's axis order: each view's probabilities land on their own voxels."""
    rng = np.random.default_rng(1)
    direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # sagittal acquisition, 1.5 mm slices
    image = reorient(Image(rng.normal(size=(9, 20, 16)).astype(np.float32), (0.6, 0.7, 1.5), (1, 2, 3), direction),
                     layout)
    net = _nearest_level_net(5, 0.6)
    single = segment_slices(_fusion_card(), image, net, torch.device("cpu"))
    fused = segment_slices(_fusion_card(fusion_planes=("sagittal", "coronal"), fusion_slice_mm=0.1), image, net,
                           torch.device("cpu"))
    assert fused.summaries["view_fusion"]["planes"] == ["sagittal", "coronal"]
    assert fused.summaries["view_fusion"]["slices"] == [9, 16]  # the coronal reformat: every A-P column (i)
    assert len(np.unique(single.labels)) == 5
    assert np.array_equal(fused.labels, single.labels)


def test_view_fusion_skips_thick_slices_and_interpolates_between_run_slices():
    from SpineKneeSegLib.engine.inference import _fill_between

    direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
    image = Image(np.random.default_rng(2).normal(size=(6, 12, 10)).astype(np.float32), (0.6, 0.6, 3.0),
                  direction=direction)
    net = _nearest_level_net(5, 0.6)
    fused = segment_slices(_fusion_card(fusion_planes=("sagittal", "coronal")), image, net, torch.device("cpu"))
    assert "3.00 mm apart" in fused.summaries["view_fusion"]["skipped"]
    assert np.array_equal(fused.labels, segment_slices(_fusion_card(), image, net, torch.device("cpu")).labels)
    probs = np.zeros((2, 7, 1, 1), np.uint8)
    probs[0, 0], probs[0, 3], probs[0, 6] = 0, 240, 60
    _fill_between(probs, np.array([0, 3, 6]))
    assert probs[0, :, 0, 0].tolist() == [0, 80, 160, 240, 180, 120, 60]


def test_fuse_views_option_is_validated_and_fast_mode_turns_fusion_off():
    from SpineKneeSegLib.cli import parse_planes
    from SpineKneeSegLib.core.errors import InputError
    from SpineKneeSegLib.engine.pipeline import fast_mode_plan, fusion_planes

    assert parse_planes(None) is None and parse_planes("none") == ()
    assert parse_planes("Sagittal, coronal") == ("sagittal", "coronal")
    assert fusion_planes(TASKS["knee-bones"], ("sagittal", "coronal")) == ("sagittal", "coronal")
    with pytest.raises(InputError, match="unknown plane"):
        fusion_planes(TASKS["knee-bones"], ("oblique",))
    with pytest.raises(InputError, match="sigmoid"):
        fusion_planes(TASKS["lumbar-foramina"], ("sagittal",))
    plan = fast_mode_plan(_fusion_card(fusion_planes=("sagittal", "coronal")))
    assert plan.overrides["fusion_planes"] == () and any("fusion" in s for s in plan.skipped)
    assert "fusion_planes" not in fast_mode_plan(TASKS["knee-bones"]).overrides


def test_view_fusion_averages_both_views():
    """With a network that sees neighbourhoods (a 5x5 convolution), the sagittal and the coronal pass
    disagree; the fused labels take each voxel from one of them and differ from the sagittal pass alone."""
    rng = np.random.default_rng(3)
    direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
    image = Image(rng.normal(size=(10, 18, 14)).astype(np.float32), (0.6, 0.7, 1.5), (0, 0, 0), direction)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 5, 5, padding=2).eval()
    with torch.no_grad():
        net.weight.mul_(10)
    run = lambda **changes: segment_slices(_fusion_card(**changes), image, net, torch.device("cpu")).labels  # noqa: E731
    sagittal, coronal = run(plane="sagittal"), run(plane="coronal")
    fused = run(fusion_planes=("sagittal", "coronal"), fusion_slice_mm=0.1)
    assert (sagittal != coronal).mean() > 0.3
    assert (fused != sagittal).mean() > 0.1
    assert ((fused == sagittal) | (fused == coronal)).mean() > 0.95


def test_a_fixed_plane_task_says_when_it_runs_on_blurred_reformats():
    """Lumbar (sagittal) and brain (axial) slice along their own plane whatever the series: a 2D
    series in another plane, its slices at least two pixels apart, runs on reformats blurred across
    its slices, and the report says so (before session 47 only the knee's did); near-isotropic 3D
    series and series in the task's plane are not flagged."""
    from SpineKneeSegLib.engine.preprocessing import reformatted_from

    def image(spacing, direction=np.eye(3)):
        return Image(np.zeros((8, 10, 12), np.float32), spacing, (0, 0, 0), direction)

    axial_4mm = image((1.0, 1.0, 4.0))  # k (4 mm) toward patient superior
    assert reformatted_from(axial_4mm, "sagittal") == "axial" and reformatted_from(axial_4mm, "axial") is None
    sagittal = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # the shared spine data's layout
    assert reformatted_from(image((1.0, 1.0, 4.0), sagittal), "sagittal") is None
    assert reformatted_from(image((1.0, 1.0, 4.0), sagittal), "axial") == "sagittal"
    assert reformatted_from(image((1.0, 1.0, 1.5)), "sagittal") is None  # a 3D acquisition's reformats
    assert reformatted_from(image((1.0, 1.0, 1.0)), "sagittal") is None  # isotropic: no acquisition plane
    assert reformatted_from(image((0.5, 0.5, 1.0)), "sagittal") == "axial"  # two pixels apart


@pytest.mark.data
@pytest.mark.mrml
def test_a_real_lumbar_scan_reformatted_to_axial_runs_with_the_note(tmp_path):
    """A real Zukic sagittal T2 resampled to 4 mm axial slices (an axial lumbar series given by
    mistake, or a reader's only series): the levels still come out, with a warning and
    summaries.reformatted; the sagittal original gets neither."""
    import json

    import SimpleITK as sitk
    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.datasets import data_root

    root = data_root()
    case = root / "spine" / "zukic-t2" / "case06" if root else None
    if case is None or not case.is_dir():
        pytest.skip("Zukic data not available")
    source = sitk.ReadImage(str(case / "image.nii.gz"))
    corners = np.array([source.TransformIndexToPhysicalPoint([int(a * (n - 1)) for a, n in zip(c, source.GetSize())])
                        for c in itertools.product((0, 1), repeat=3)])  # the box holding the scan
    lo, hi = corners.min(0), corners.max(0)
    size = [int((hi[i] - lo[i]) / s) + 1 for i, s in enumerate((1.0, 1.0, 4.0))]
    axial = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, lo.tolist(), (1.0, 1.0, 4.0),
                          (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0, source.GetPixelID())
    sitk.WriteImage(axial, str(tmp_path / "axial.nii.gz"))
    for name, path in (("axial", tmp_path / "axial.nii.gz"), ("sagittal", case / "image.nii.gz")):
        assert cli.main(["run", "--task", "lumbar-foramina", str(path), "-o", str(tmp_path / name), "--progress",
                         "none"]) == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        notes = [w for w in report["warnings"] if w.startswith("the series is axial; the model was trained on "
                                                               "sagittal slices only, so it ran on sagittal reformats")]
        assert len(notes) == (name == "axial"), report["warnings"]
        assert ("reformatted" in report["summaries"]) == (name == "axial")
        assert report["summaries"]["level_decoding"]["levels_not_found"] == [], name
