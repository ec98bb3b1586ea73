"""Canonical slice orientation: the same physical image stored with permuted or flipped voxel axes
gives the same network input and the same labels."""
import itertools

import numpy as np
import pytest
import torch

from SpineKneeSegLib.image import Image
from SpineKneeSegLib.inference import segment_slices
from SpineKneeSegLib.models import build_network
from SpineKneeSegLib.phantoms import make_phantom
from SpineKneeSegLib.preprocessing import Orientation, canonical_image, canonical_orientation, reorient
from SpineKneeSegLib.tasks import TASKS

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
    from SpineKneeSegLib.inference import tiled_forward

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
