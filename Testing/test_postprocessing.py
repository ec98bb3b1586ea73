"""Post-processing and measurement tables on label maps with known answers (no network)."""
import numpy as np
import pytest
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.engine.postprocessing import (
    area_table,
    largest_component_per_label,
    remove_small_components,
    volume_table,
)
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.tasks.brain.lesions import (
    bracket_name,
    label_lesions,
    lesion_table,
)
from SpineKneeSegLib.tasks.spine.foramina import (
    foramen_label,
    localise_foramina,
    motion_segment,
)


def test_largest_component_keeps_the_big_blob_per_label():
    labels = np.zeros((10, 20, 20), np.uint8)
    labels[2:8, 2:10, 2:10] = 1
    labels[0, 18, 18] = 1  # stray voxel
    labels[2:5, 12:15, 12:15] = 2
    labels[9, 0:2, 0:2] = 2  # stray blob of label 2
    out = largest_component_per_label(labels)
    assert out.dtype == np.uint8
    assert out[0, 18, 18] == 0 and out[9, 0, 0] == 0
    assert (out == 1).sum() == 6 * 8 * 8 and (out == 2).sum() == 27


def test_remove_small_components_keeps_two_femurs():
    labels = np.zeros((1, 64, 64), np.uint8)
    labels[0, 5:30, 5:20] = 1
    labels[0, 5:28, 40:55] = 1
    labels[0, 60, 60] = 1
    out = remove_small_components(labels)
    assert out[0, 60, 60] == 0 and out[0, 10, 10] == 1 and out[0, 10, 45] == 1


def test_volume_and_area_tables_use_physical_spacing():
    image = Image(np.zeros((4, 5, 6), np.float32), spacing=(0.5, 2.0, 3.0))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, 0, :2] = 1
    table = volume_table(labels, image, TASKS["knee-bones"].labels)
    femur = next(r for r in table.rows if r["structure"] == "femur")
    assert femur["voxels"] == 2 and femur["volume_mm3"] == pytest.approx(2 * 3.0)
    assert next(r for r in table.rows if r["structure"] == "patella")["voxels"] == 0
    xray = Image(np.zeros((1, 5, 6), np.float32), spacing=(0.2, 0.5, 1.0))
    rows = area_table(labels[:1], xray, TASKS["xray-femur"].labels).rows
    assert rows[0]["area_mm2"] == pytest.approx(2 * 0.1)


@pytest.mark.parametrize("voxels,bracket", [(1, "[0,10)"), (9, "[0,10)"), (10, "[10,400)"), (399, "[10,400)"),
                                            (400, "[400,1000)"), (1000, "[1000,inf)")])
def test_seed_size_brackets(voxels, bracket):
    assert bracket_name(voxels) == bracket


def test_connectivity_changes_lesion_count():
    mask = np.zeros((3, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 1  # corner-touching: one lesion at 26, two at 6/18
    assert label_lesions(mask, 26)[1] == 1
    assert label_lesions(mask, 18)[1] == 2
    assert label_lesions(mask, 6)[1] == 2
    with pytest.raises(ValueError):
        label_lesions(mask, 8)


def test_lesion_table_rows_sorted_with_physical_centroids():
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)  # permuted axes
    flair = Image(np.full((20, 30, 30), 10.0, np.float32), spacing=(1.0, 1.0, 3.0), origin=(5, -7, 11),
                  direction=direction)
    mask = np.zeros(flair.array.shape, np.uint8)
    mask[2:4, 5:10, 5:10] = 1  # 50 voxels
    mask[10:18, 10:25, 10:25] = 1  # 1800 voxels
    flair.array[10:18, 10:25, 10:25] = 99.0
    mask[0, 0, 0] = 1  # 1 voxel
    table, summary = lesion_table(mask, flair, slice_axis=0)
    assert [r["voxels"] for r in table.rows] == [1800, 50, 1]
    assert [r["lesion_id"] for r in table.rows] == [1, 2, 3]
    big = table.rows[0]
    assert big["bracket"] == "[1000,inf)" and big["depth_slices"] == 8
    assert big["volume_mm3"] == pytest.approx(1800 * 3.0)
    assert big["mean_flair"] == pytest.approx(99.0)
    expected_ras = flair.ijk_to_ras_points([[17.0, 17.0, 13.5]])[0]
    assert (big["centroid_r"], big["centroid_a"], big["centroid_s"]) == pytest.approx(tuple(expected_ras), abs=0.01)
    assert big["bbox"] == "10-24 10-24 10-17"
    assert summary["lesion_count"] == 3
    assert summary["brackets"]["[10,400)"]["count"] == 1
    assert summary["total_lesion_load_ml"] == pytest.approx((1800 + 50 + 1) * 3.0 / 1000, abs=1e-4)
    assert [c.name for c in table.columns] == ["lesion_id", "voxels", "volume_mm3", "depth_slices", "centroid_r",
                                               "centroid_a", "centroid_s", "bbox", "bracket", "mean_flair"]


def test_foramen_naming_follows_the_seed():
    assert foramen_label(3, "right") == "L3 right"
    assert motion_segment(5) == "L5/S1" and motion_segment(2) == "L2/L3"
    with pytest.raises(ValueError):
        foramen_label(6, "left")


def _sagittal_image(k_toward_left: bool) -> Image:
    # i: anterior->posterior, j: superior->inferior, k: toward patient left or right (LPS columns)
    k_dir = [1, 0, 0] if k_toward_left else [-1, 0, 0]
    direction = np.array([[0, 0, k_dir[0]], [1, 0, 0], [0, -1, 0]], float)
    return Image(np.zeros((21, 64, 64), np.float32), spacing=(1.0, 1.0, 3.0), origin=(0, 0, 0), direction=direction)


def _discs(shape, centres_kji, radius=3):
    prob = np.zeros(shape, np.float32)
    kk, jj, ii = np.indices(shape)
    for k, j, i in centres_kji:
        prob[(kk == k) & ((jj - j) ** 2 + (ii - i) ** 2 <= radius ** 2)] = 0.9
    return prob


@pytest.mark.parametrize("k_toward_left", [True, False])
def test_localiser_names_sides_from_the_direction_matrix(k_toward_left):
    image = _sagittal_image(k_toward_left)
    probs = np.zeros((5,) + image.array.shape, np.float32)
    truth = {}
    for level in range(1, 6):
        j = 8 + 10 * level
        for k in (4, 5, 15, 16):  # two slices each side of the midline slice 10
            probs[level - 1] = np.maximum(probs[level - 1], _discs(image.array.shape, [(k, j, 40)]))
        # k grows toward patient left when k_toward_left
        truth[(level, "left" if k_toward_left else "right")] = 15.5
        truth[(level, "right" if k_toward_left else "left")] = 4.5
    found = localise_foramina(probs, image)
    assert len(found) == 10
    for f in found:
        expected_k = truth[(f.level, f.side)]
        expected = image.ijk_to_ras_points([[40, 8 + 10 * f.level, expected_k]])[0]
        assert np.allclose(f.ras, expected, atol=0.5), (f.label, f.ras, expected)
        midline_x = image.ijk_to_ras_points([[40, 30, 10]])[0, 0]
        assert (f.ras[0] > midline_x) == (f.side == "right")  # RAS +x is patient right


def test_localiser_with_uint8_maps_and_missing_levels():
    image = _sagittal_image(True)
    probs = np.zeros((5,) + image.array.shape, np.uint8)
    probs[2] = (_discs(image.array.shape, [(3, 30, 40), (17, 30, 40)]) * 255).astype(np.uint8)
    found = localise_foramina(probs, image)
    assert sorted(f.label for f in found) == ["L3 left", "L3 right"]


@pytest.mark.parametrize("k_toward", ["left", "right"])
def test_localiser_recovers_phantom_foramina_by_name(k_toward):
    """Discs of 7 mm around the phantom's own foramen points (seed 004's training targets) go in;
    every one of the ten foramina must come out with the right name, near its points."""
    from SpineKneeSegLib.tasks.spine.phantom import spine_phantom

    phantom = spine_phantom(seed=2, k_toward=k_toward)
    image = phantom.image
    probs = np.zeros((5,) + image.array.shape, np.float32)
    kk, jj, ii = np.indices(image.array.shape)
    for point in phantom.points:
        i, j, k = np.round(image.ras_to_ijk_points([point["ras"]])[0]).astype(int)
        distance_mm = np.hypot((jj - j) * image.spacing[1], (ii - i) * image.spacing[0])
        probs[point["level"] - 1][(kk == k) & (distance_mm <= 7.0)] = 0.9
    found = {f.label: f for f in localise_foramina(probs, image)}
    assert sorted(found) == sorted({p["label"] for p in phantom.points})
    for label, f in found.items():
        truth = np.mean([p["ras"] for p in phantom.points if p["label"] == label], axis=0)
        assert np.linalg.norm(np.asarray(f.ras) - truth) < 3.0, (label, f.ras, truth)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_network_grid_keeps_the_field_of_view(axis):
    """Pixel-area resampling: the resampled grid covers exactly the same physical extent."""
    from SpineKneeSegLib.engine.preprocessing import network_grid, network_grid_image

    rng = np.random.default_rng(axis)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    image = Image(np.zeros((12, 40, 30), np.float32), spacing=(0.5, 0.8, 3.0), origin=(4, -9, 20), direction=q)
    grid = network_grid(image, axis, 1.4, 8)
    small = network_grid_image(image, grid)

    def extent(img):  # physical corners of the voxel areas (centres +- half a voxel)
        i, j, k = img.size_ijk
        return img.ijk_to_lps_points([[-0.5, -0.5, -0.5], [i - 0.5, j - 0.5, k - 0.5]])

    assert small.array.shape[axis] == image.array.shape[axis]
    assert np.allclose(extent(small), extent(image), atol=1e-6)


@pytest.mark.parametrize("k_toward,tilt", [("left", 0.0), ("right", 12.0)])
def test_estimate_from_levels_names_and_places_the_ten_foramina(k_toward, tilt):
    """Without a foramen model the markers come from the L1..L5 bodies (the phantom's ground-truth
    labels here): right names and sides for both handedness, within 6 mm of the phantom's foramina
    (an anatomical estimate, not a detection)."""
    from SpineKneeSegLib.engine.preprocessing import Orientation, reorient
    from SpineKneeSegLib.tasks.spine.foramina import estimate_foramina_from_levels
    from SpineKneeSegLib.tasks.spine.phantom import spine_phantom

    phantom = spine_phantom(seed=1, k_toward=k_toward, tilt_deg=tilt)
    found, notes = estimate_foramina_from_levels(phantom.labels.array, phantom.image)
    assert sorted(f.label for f in found) == sorted({p["label"] for p in phantom.points})
    assert notes["missing_levels"] == []
    for f in found:
        truth = np.mean([p["ras"] for p in phantom.points if p["label"] == f.label], axis=0)
        assert np.linalg.norm(np.asarray(f.ras) - truth) < 6.0, f.label
        assert "estimated from vertebral levels" in f.description
    # the same physical image stored with other voxel axes gives the same markers
    layout = Orientation((2, 0, 1), (True, False, True))
    moved, _ = estimate_foramina_from_levels(layout.apply(phantom.labels.array), reorient(phantom.labels, layout))
    assert len(moved) == len(found)
    assert all(np.allclose(f.ras, g.ras, atol=0.6) and f.label == g.label for f, g in zip(found, moved))


def test_estimate_reports_missing_levels_instead_of_shifting():
    """Seed 004: a missed L5 must not shift every label. Without L3 there is no L2 (L2/L3) or L3
    marker, and the others keep their names."""
    from SpineKneeSegLib.tasks.spine.foramina import estimate_foramina_from_levels
    from SpineKneeSegLib.tasks.spine.phantom import spine_phantom

    phantom = spine_phantom(seed=0)
    labels = phantom.labels.array.copy()
    labels[labels == 3] = 0
    found, notes = estimate_foramina_from_levels(labels, phantom.image)
    assert notes["missing_levels"] == ["L3"]
    assert sorted({f.level for f in found}) == [1, 4, 5]
    full, _ = estimate_foramina_from_levels(phantom.labels.array, phantom.image)
    by_label = {f.label: f.ras for f in full}
    for f in found:
        if f.level in (1, 4):
            assert np.allclose(f.ras, by_label[f.label], atol=3.0)


def test_label_histogram_counts_every_chunk_and_every_view():
    """The chunked histogram equals np.bincount and present_labels np.unique's non-zero values: a
    value only in the last, partial chunk, transposed and flipped views (ravel without a copy),
    other dtypes; the volume table's counts come from it."""
    from SpineKneeSegLib.core import labels as L

    rng = np.random.default_rng(0)
    a = np.zeros((3, 300, 301), np.uint8)  # 270,900 voxels: one full chunk and a partial one
    a[0, 5, 5], a[2, 299, 300], a[1, 100, 7] = 7, 200, 3
    assert a.size % L.HISTOGRAM_CHUNK and a.size > L.HISTOGRAM_CHUNK
    for view in (a, a.transpose(2, 0, 1), a[::-1, :, ::-1], a[:, ::2]):
        assert L.present_labels(view) == [int(v) for v in np.unique(view) if v]
        assert np.array_equal(L.label_histogram(view), np.bincount(view.ravel(), minlength=256))
    assert np.array_equal(L.label_histogram(a, 8), np.bincount(a.ravel(), minlength=256)[:8])
    assert len(L.label_histogram(a, 300)) == 300 and L.label_histogram(a, 300)[200] == 1
    table = volume_table(a, Image(a), (L.LabelSpec(3, "x", (1.0, 0.0, 0.0)), L.LabelSpec(7, "y", (0.0, 1.0, 0.0))))
    assert [r["voxels"] for r in table.rows] == [1, 1]
    b = rng.integers(0, 6, (20, 40, 40)).astype(np.uint8)  # few values: counted by comparisons
    assert np.array_equal(L.label_histogram(b.transpose(1, 0, 2), 7), np.bincount(b.ravel(), minlength=7))
    assert L.present_labels(b) == [1, 2, 3, 4, 5]
    assert L.present_labels(b.astype(np.int16)) == [1, 2, 3, 4, 5]
    assert L.present_labels(np.zeros((4, 4), np.uint8)) == [] and L.present_labels((b > 2).astype(np.uint8)) == [1]


@pytest.mark.parametrize("shape", [(12, 40, 36), (1, 64, 64)])  # a volume, and a radiograph's single slice
def test_components_are_scipys_26_connected_components(shape):
    """label_components (connected-components-3d) against scipy.ndimage.label with the full 3x3x3
    structure: per label the same component sizes and the same voxels in each component, touching
    labels kept apart, diagonal neighbours joined; the clean-ups built on them agree with scipy's."""
    from scipy import ndimage
    from SpineKneeSegLib.engine.postprocessing import label_components, largest_component_per_label

    rng = np.random.default_rng(sum(shape))
    labels = ndimage.zoom(rng.integers(0, 4, (max(1, shape[0] // 4), shape[1] // 4, shape[2] // 4)),
                          (shape[0] / max(1, shape[0] // 4), 4, 4), order=0).astype(np.uint8)
    labels.ravel()[rng.integers(0, labels.size, 60)] = rng.integers(1, 4, 60)  # specks
    components = label_components(labels)
    assert set(components) == set(np.unique(labels)) - {0}
    expected = labels.copy()
    for value, (box, comp, sizes) in components.items():
        want, n = ndimage.label(labels == value, structure=np.ones((3, 3, 3), bool))
        want_sizes = np.bincount(want.ravel())[1:]
        assert sorted(sizes[1:][sizes[1:] > 0]) == sorted(want_sizes) and len(sizes) - 1 == n
        assert (want_sizes == want_sizes.max()).sum() == 1  # a unique largest: numbering cannot matter below
        full = np.zeros(labels.shape, np.int64)
        full[box] = comp
        pairs = {(a, b) for a, b in zip(full[labels == value], want[labels == value])}
        assert len(pairs) == n  # one scipy component for each of ours, and the other way round
        expected[(want != 0) & (want != int(np.argmax(np.bincount(want.ravel())[1:]) + 1))] = 0
    # the largest component is unique in size here, so the clean-up is the same whoever numbers them
    np.testing.assert_array_equal(largest_component_per_label(labels, components), expected)


@pytest.mark.parametrize("pieces", [3, 300])
def test_component_sizes_equal_numpy_bincount(pieces):
    """Component sizes counted as uint8 by torch (below 256 ids) or by numpy (from 256): the same
    counts as np.bincount, id 0 included."""
    import cc3d
    from SpineKneeSegLib.engine.postprocessing import component_sizes

    rng = np.random.default_rng(pieces)
    mask = np.zeros((20, 60, 60), np.uint8)
    for _ in range(pieces):  # separate specks and blobs (every other voxel: no two touch)
        k, j, i = 2 * rng.integers(0, 10), 2 * rng.integers(0, 30), 2 * rng.integers(0, 30)
        mask[k, j, i] = 1
    mask[2:6, 4:20, 4:10] = 1
    comp, n = cc3d.connected_components(mask, connectivity=6, return_N=True)
    assert (n >= 256) == (pieces == 300)
    np.testing.assert_array_equal(component_sizes(comp, n), np.bincount(comp.ravel(), minlength=n + 1))
