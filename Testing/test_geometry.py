"""Property-based tests of Image geometry: IJK <-> LPS <-> RAS and the SimpleITK bridge.

Directions are random rotations, optionally with one axis flipped (left-handed), so oblique and
left-handed grids are exercised on every run.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from SpineKneeSegLib.core.image import LPS_TO_RAS, Image

SETTINGS = settings(max_examples=60, deadline=None)


def _rotation(q) -> np.ndarray:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


quaternions = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(
    lambda q: np.linalg.norm(q) > 0.2)


@st.composite
def directions(draw) -> np.ndarray:
    d = _rotation(draw(quaternions))
    flip = draw(st.sampled_from([None, 0, 1, 2]))  # flip one axis -> left-handed
    if flip is not None:
        d[:, flip] *= -1
    return d


spacings = st.tuples(*[st.floats(0.05, 10.0)] * 3)
origins = st.tuples(*[st.floats(-500.0, 500.0)] * 3)
index_points = st.lists(st.tuples(*[st.floats(-5.0, 120.0)] * 3), min_size=1, max_size=8)


def _image(spacing, origin, direction, shape=(2, 3, 4)) -> Image:
    array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    return Image(array, spacing, origin, direction)


@SETTINGS
@given(spacings, origins, directions(), index_points)
def test_ijk_ras_round_trip(spacing, origin, direction, ijk):
    img = _image(spacing, origin, direction)
    back = img.ras_to_ijk_points(img.ijk_to_ras_points(ijk))
    np.testing.assert_allclose(back, np.asarray(ijk), atol=1e-6)
    back_lps = img.lps_to_ijk_points(img.ijk_to_lps_points(ijk))
    np.testing.assert_allclose(back_lps, np.asarray(ijk), atol=1e-6)


@SETTINGS
@given(spacings, origins, directions(), index_points)
def test_ras_is_lps_with_x_y_negated(spacing, origin, direction, ijk):
    img = _image(spacing, origin, direction)
    lps = img.ijk_to_lps_points(ijk)
    np.testing.assert_allclose(img.ijk_to_ras_points(ijk), lps * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(img.ijk_to_ras, LPS_TO_RAS @ img.ijk_to_lps, atol=1e-12)


@SETTINGS
@given(spacings, origins, directions())
def test_from_ijk_to_ras_recovers_geometry(spacing, origin, direction):
    img = _image(spacing, origin, direction)
    rebuilt = Image.from_ijk_to_ras(img.array, img.ijk_to_ras)
    np.testing.assert_allclose(rebuilt.spacing, spacing, rtol=1e-9)
    np.testing.assert_allclose(rebuilt.origin, origin, atol=1e-9)
    np.testing.assert_allclose(rebuilt.direction, direction, atol=1e-9)
    assert rebuilt.is_right_handed == (np.linalg.det(direction) > 0)


@SETTINGS
@given(spacings, origins, directions())
def test_sitk_round_trip(spacing, origin, direction):
    img = _image(spacing, origin, direction)
    back = Image.from_sitk(img.to_sitk())
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.spacing, spacing, rtol=1e-12)
    np.testing.assert_allclose(back.origin, origin, atol=1e-12)
    np.testing.assert_allclose(back.direction, direction, atol=1e-12)


@SETTINGS
@given(spacings, origins, directions(), index_points)
def test_sitk_index_to_point_agrees(spacing, origin, direction, ijk):
    img = _image(spacing, origin, direction)
    sitk_img = img.to_sitk()
    expected = np.array([sitk_img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    np.testing.assert_allclose(img.ijk_to_lps_points(ijk), expected, atol=1e-6)


@SETTINGS
@given(spacings, origins, directions())
def test_reversed_slices_are_the_same_geometry(spacing, origin, direction):
    """A left-handed grid may come back with its slices reordered (right-handed): the physical
    samples, and the voxel found at each physical point, must be the same."""
    img = _image(spacing, origin, direction)
    last = img.ijk_to_lps_points([[0, 0, img.array.shape[0] - 1]])[0]
    flipped_dir = direction.copy()
    flipped_dir[:, 2] *= -1
    flipped = Image(img.array[::-1].copy(), spacing, last, flipped_dir)
    assert img.same_geometry(flipped)
    assert flipped.is_right_handed != img.is_right_handed
    k, j, i = 0, 1, 2
    lps = img.ijk_to_lps_points([[i, j, k]])
    fi, fj, fk = np.rint(flipped.lps_to_ijk_points(lps)[0]).astype(int)
    assert flipped.array[fk, fj, fi] == img.array[k, j, i]


def test_2d_from_sitk_is_single_slice():
    img2d = sitk.GetImageFromArray(np.zeros((5, 7), np.uint8))
    img2d.SetSpacing((0.2, 0.3))
    img = Image.from_sitk(img2d)
    assert img.array.shape == (1, 5, 7) and img.is_2d
    assert img.spacing[:2] == (0.2, 0.3)


# ---- network input: normalised after the grid, as if before ---------------------------------------

def _normalised_first(stacks, method, index, context, grid, pad_value):
    """The former order: whole volumes normalised, then slices gathered and put on the grid."""
    import torch
    from SpineKneeSegLib.engine.preprocessing import context_channels, normalise, to_network_grid

    x = np.concatenate([context_channels(normalise(s, method), index, context) for s in stacks], axis=1)
    return to_network_grid(torch.from_numpy(x), grid, pad_value)


def test_network_input_normalised_on_the_grid_equals_normalising_the_volumes_first():
    """A z-scored MRI stack (int16, as DICOM gives it) with a second input in a square window that
    shrinks 2.3x (box filter + bilinear, padded outside the slice), context 3 at both ends, and a
    whole-slice resize: the network input is the same to float rounding, edge channels and padding
    included."""
    from SpineKneeSegLib.engine.preprocessing import NetworkInput, SliceGeometry

    rng = np.random.default_rng(4)
    raw = (rng.gamma(2.0, 300.0, (6, 96, 80)) * (rng.random((6, 96, 80)) > 0.3)).astype(np.int16)
    second = rng.normal(800.0, 90.0, (6, 96, 80)).astype(np.float32)
    source = NetworkInput.of([raw, second], "zscore", None, 3)
    windowed = SliceGeometry(0, (96, 80), (40, 40), (48, 48), window=(-10.0, -20.0, 92.0, 92.0))
    resized = SliceGeometry(0, (96, 80), (60, 50), (64, 64))
    for grid, pad_value in ((windowed, source.normalised_min()), (resized, 0.0)):
        for index in (np.arange(0, 3), np.array([2, 5])):
            got = source.batch(index, grid, pad_value).numpy()
            want = _normalised_first([raw, second], "zscore", index, 3, grid, pad_value).numpy()
            assert got.shape == want.shape == (len(index), 6, *grid.network_hw)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    from SpineKneeSegLib.engine.preprocessing import normalise

    assert np.isclose(source.normalised_min(), float(normalise(raw, "zscore").min()), rtol=1e-6)  # the window's air


def test_radiograph_field_normalisation_still_normalises_each_image_first():
    from SpineKneeSegLib.engine.preprocessing import NetworkInput, SliceGeometry, normalise

    rng = np.random.default_rng(5)
    image = rng.integers(0, 4096, (1, 64, 64)).astype(np.float32)
    source = NetworkInput.of([image], "percentile-field", None, 1)
    grid = SliceGeometry(0, (64, 64), (32, 32), (32, 32))
    want = _normalised_first([image], "percentile-field", np.array([0]), 1, grid, 0.0).numpy()
    np.testing.assert_allclose(source.batch(np.array([0]), grid).numpy(), want, atol=1e-6)
    assert source.affines == ((0.0, 1.0),) and np.allclose(source.stacks[0], normalise(image, "percentile-field"))


# ---- labels back on the input grid: only where the network found something ------------------------

def _labels_back(logits, grid, activation, within):
    from SpineKneeSegLib.engine.inference import logits_to_labels
    from SpineKneeSegLib.engine.preprocessing import from_network_grid

    out = np.zeros((logits.shape[0], *grid.input_hw), np.uint8)
    if within is False:
        return out
    back, (r0, r1, c0, c1) = from_network_grid(logits, grid, within)
    out[:, r0:r1, c0:c1] = logits_to_labels(back, activation).numpy()
    return out


def test_labels_resampled_only_near_the_networks_labels_equal_resampling_everything():
    """Smooth random logits with a few small objects (softmax and sigmoid heads) in a window that
    grows 2.3x and one that shrinks and reaches outside the slice: labels from the restricted
    resampling equal those from resampling every pixel, voxel for voxel; a batch without labels
    resamples nothing. Without a window the restriction is not used."""
    import torch
    import torch.nn.functional as F
    from SpineKneeSegLib.engine.inference import logits_to_labels
    from SpineKneeSegLib.engine.preprocessing import SliceGeometry, network_label_box

    rng = np.random.default_rng(7)
    grids = [SliceGeometry(0, (120, 110), (48, 48), (48, 48), window=(10.3, -4.7, 110.0, 110.0)),
             SliceGeometry(0, (120, 110), (48, 48), (48, 48), window=(-30.0, 20.0, 60.0, 60.0))]
    found = 0
    for grid in grids:
        for activation, channels in (("softmax", 4), ("sigmoid", 3)):
            for trial in range(4):
                coarse = torch.from_numpy(rng.normal(0, 1, (3, channels, 6, 6)).astype(np.float32))
                logits = F.interpolate(coarse, size=grid.network_hw, mode="bicubic", align_corners=False)
                logits[:, 0 if activation == "softmax" else slice(None)] += 1.5 + trial  # mostly background
                box = network_label_box(logits_to_labels(logits, activation))
                want = _labels_back(logits, grid, activation, None)
                got = _labels_back(logits, grid, activation, box if box is not None else False)
                np.testing.assert_array_equal(got, want)
                found += box is not None and 0 < (want > 0).mean() < 0.5
                if box is None:
                    assert not want.any()
    assert found >= 6  # the restriction was exercised on partly labelled batches
    resized = SliceGeometry(0, (120, 110), (48, 40), (48, 48))
    from SpineKneeSegLib.engine.preprocessing import from_network_grid

    assert from_network_grid(logits[..., :48, :40], resized, (0, 1, 0, 1))[1] == (0, 120, 0, 110)
