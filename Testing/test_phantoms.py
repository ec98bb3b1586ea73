"""Phantom generators: determinism, geometry, and anatomical truth that method tests rely on."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.phantoms import Phantom
from SpineKneeSegLib.tasks import make_phantom, phantom_tasks
from SpineKneeSegLib.tasks.brain.phantom import brain_phantom
from SpineKneeSegLib.tasks.knee.phantom import knee_phantom
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom
from SpineKneeSegLib.tasks.xray.phantom import xray_femur_phantom


@pytest.fixture(scope="module")
def knee():
    return knee_phantom(0)


@pytest.fixture(scope="module")
def spine():
    return spine_phantom(0)


@pytest.fixture(scope="module")
def brain():
    return brain_phantom(0)


@pytest.fixture(scope="module")
def xray():
    return xray_femur_phantom(0)


def _centroid_ras(img: Image, mask: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    return img.ijk_to_ras_points([[i.mean(), j.mean(), k.mean()]])[0]


def _common_checks(ph: Phantom, task: str, values):
    assert ph.task == task
    assert ph.image.array.dtype == np.float32
    assert ph.labels.array.dtype == np.uint8
    assert ph.image.array.shape == ph.labels.array.shape
    assert ph.labels.same_geometry(ph.image)
    assert np.allclose(ph.labels.ijk_to_ras, ph.image.ijk_to_ras)
    assert np.isfinite(ph.image.array).all()
    assert set(np.unique(ph.labels.array)) == {0, *values}
    assert ph.description


# ---- dispatch and determinism ----------------------------------------------------------------

def test_tasks_and_dispatch():
    assert phantom_tasks() == ("knee-bones", "lumbar-foramina", "brain-wmh", "xray-femur", "xray-multiclass",
                               "xray-chest")
    with pytest.raises(ValueError):
        make_phantom("liver")


@pytest.mark.parametrize("task", phantom_tasks())
def test_deterministic_per_seed(task):
    a = make_phantom(task, seed=3)
    b = make_phantom(task, seed=3)
    c = make_phantom(task, seed=4)
    assert a.task == task
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert a.image.origin == b.image.origin
    assert not np.array_equal(a.image.array, c.image.array)
    assert not np.array_equal(a.labels.array, c.labels.array) or a.image.origin != c.image.origin


# ---- knee -----------------------------------------------------------------------------------

def test_knee_geometry_and_labels(knee):
    _common_checks(knee, "knee-bones", {1, 2, 3, 4})
    img = knee.image
    assert img.array.shape == (24, 224, 224)
    assert not np.allclose(img.spacing, 1.0) and not np.allclose(img.origin, 0.0)
    counts = np.bincount(knee.labels.array.ravel(), minlength=5)
    voxel_mm3 = float(np.prod(img.spacing))
    vol = counts * voxel_mm3 / 1000.0  # cm^3
    assert 40 < vol[1] < 400 and 40 < vol[2] < 400      # femur, tibia (distal/proximal parts)
    assert 0.5 < vol[3] < 30                             # fibula
    assert 5 < vol[4] < 40                               # patella
    # disjoint bones: no bone touches another within the slice plane
    for a in (1, 2, 3, 4):
        grown = ndimage.binary_dilation(knee.labels.array == a, np.ones((1, 3, 3), bool))
        others = (knee.labels.array > 0) & (knee.labels.array != a)
        assert not (grown & others).any(), a


def test_knee_anatomy(knee):
    img, lab = knee.image, knee.labels.array
    c = {v: _centroid_ras(img, lab == v) for v in (1, 2, 3, 4)}
    assert c[1][2] > c[2][2] + 20                        # femur superior to tibia
    lateral = np.asarray(knee.extra["lateral_direction_ras"])
    assert (c[3] - c[2]) @ lateral > 15                  # fibula lateral to tibia
    assert c[3][1] < c[2][1] - 5                         # ... and posterior (RAS y = anterior)
    assert c[4][1] > c[1][1] + 15                        # patella anterior to the femur
    joint = np.asarray(knee.extra["joint_centre_ras"])
    assert c[2][2] < joint[2] < c[1][2]
    # fibula only on lateral slices
    k_with_fibula = np.nonzero((lab == 3).any(axis=(1, 2)))[0]
    slice_x = img.ijk_to_ras_points([[112, 112, k] for k in k_with_fibula]) @ lateral
    assert (slice_x > joint @ lateral + 10).all()
    # bone marrow brighter than the cortical rim, soft tissue present around
    marrow = ndimage.binary_erosion(lab == 1, np.ones((1, 9, 9), bool))
    rim = (lab == 1) & ~ndimage.binary_erosion(lab == 1, np.ones((1, 3, 3), bool))
    assert img.array[marrow].mean() > 3 * img.array[rim].mean()


def test_knee_left_side_mirrors():
    left = knee_phantom(1, knee_side="left")
    img, lab = left.image, left.labels.array
    c_tib = _centroid_ras(img, lab == 2)
    c_fib = _centroid_ras(img, lab == 3)
    assert c_fib[0] > c_tib[0] + 15 or c_fib[0] < c_tib[0] - 15
    assert left.extra["lateral_direction_ras"][0] < 0    # left knee: lateral = patient left = -R
    assert c_fib[0] < c_tib[0]


# ---- spine ----------------------------------------------------------------------------------

def _lps_x(ras):
    return -np.asarray(ras)[..., 0]


def test_spine_geometry(spine):
    _common_checks(spine, "lumbar-foramina", {1, 2, 3, 4, 5})
    img = spine.image
    assert img.array.shape == (16, 256, 256)
    assert img.spacing == (1.0, 1.0, 4.0)
    assert not np.allclose(img.direction, np.eye(3))
    # i anterior->posterior, j superior->inferior, k toward patient left (LPS +x)
    assert np.allclose(img.direction[:, 0], [0, 1, 0])
    assert np.allclose(img.direction[:, 1], [0, 0, -1])
    assert np.allclose(img.direction[:, 2], [1, 0, 0])
    assert not img.is_right_handed
    right = spine_phantom(0, k_toward="right")
    assert np.allclose(right.image.direction[:, 2], [-1, 0, 0]) and right.image.is_right_handed


def test_spine_levels_order_and_size(spine):
    img, lab = spine.image, spine.labels.array
    cents = [_centroid_ras(img, lab == v) for v in range(1, 6)]
    s = [c[2] for c in cents]
    assert all(a > b + 20 for a, b in zip(s[:-1], s[1:]))   # L1 superior ... L5 inferior
    counts = np.bincount(lab.ravel(), minlength=6)[1:]
    vol_cm3 = counts * float(np.prod(img.spacing)) / 1000.0
    assert (vol_cm3 > 10).all() and (vol_cm3 < 60).all()
    names = [v["name"] for v in spine.extra["vertebrae"]]
    assert "T12" in names and "S1" in names
    t12 = next(v for v in spine.extra["vertebrae"] if v["name"] == "T12")
    assert t12["label"] == 0 and t12["centre_ras"][2] > s[0]


def _check_foramina(ph, expected_levels):
    img = ph.image
    labels_seen = {p["label"] for p in ph.points}
    expected = {f"L{k} {sd}" for k in expected_levels for sd in ("left", "right")}
    assert labels_seen == expected
    mid_lps_x = -ph.extra["midline_ras_x"]
    # an independent midline: the labelled vertebral bodies' centroid
    body_mid_lps_x = _lps_x(_centroid_ras(img, ph.labels.array > 0))
    assert abs(body_mid_lps_x - mid_lps_x) < 2.0
    for lbl in expected:
        pts = [p for p in ph.points if p["label"] == lbl]
        assert 2 <= len(pts) <= 3, (lbl, len(pts))
        level, side = int(lbl[1]), lbl.split()[1]
        assert all(p["level"] == level and p["side"] == side for p in pts)
        ks = {int(round(p["ijk"][2])) for p in pts}
        assert len(ks) == len(pts)                        # one point per slice
        for p in pts:
            ras = np.asarray(p["ras"])
            assert np.allclose(img.ijk_to_ras_points([p["ijk"]])[0], ras, atol=1e-6)
            assert abs(p["ijk"][2] - round(p["ijk"][2])) < 1e-9
            lat = _lps_x(ras) - mid_lps_x
            # LPS +x = patient left
            if side == "left":
                assert 8 < lat < 30, (lbl, lat)
            else:
                assert -30 < lat < -8, (lbl, lat)
        # the foramen sits between L<k> and the vertebra below, posterior to the bodies
        c = np.mean([p["ras"] for p in pts], axis=0)
        upper = _centroid_ras(img, ph.labels.array == level)
        assert c[2] < upper[2] + 5
        assert c[1] < upper[1] - 10                       # posterior (RAS y = anterior)
        lower = [v for v in ph.extra["vertebrae"] if v["centre_ras"][2] < upper[2] - 15]
        assert c[2] > max(v["centre_ras"][2] for v in lower) - 5


def test_spine_ten_foramina(spine):
    _check_foramina(spine, range(1, 6))
    assert len(spine.extra["foramina"]) == 10
    # the point falls on the distinct foramen pattern: bright fat in a noise-free render
    clean = spine_phantom(0, noise=0.0, bias=0.0)
    arr = clean.image.array
    body = arr[clean.labels.array > 0]
    for p in clean.points:
        i, j, k = (int(round(v)) for v in p["ijk"])
        assert arr[k, j, i] > np.percentile(body, 90), p["label"]


@pytest.mark.parametrize("k_toward", ["left", "right"])
def test_spine_laterality_follows_direction(k_toward):
    ph = spine_phantom(5, k_toward=k_toward, tilt_deg=8.0)
    _check_foramina(ph, range(1, 6))
    k_left = np.mean([p["ijk"][2] for p in ph.points if p["side"] == "left"])
    k_right = np.mean([p["ijk"][2] for p in ph.points if p["side"] == "right"])
    assert (k_left > k_right) == (k_toward == "left")


def test_spine_transitional_counts():
    six = spine_phantom(2, lumbar_count=6)
    _common_checks(six, "lumbar-foramina", {1, 2, 3, 4, 5})
    assert six.extra["extra_vertebra"] == "L6"
    l6 = next(v for v in six.extra["vertebrae"] if v["name"] == "L6")
    assert l6["label"] == 0
    ijk = six.image.ras_to_ijk_points([l6["centre_ras"]])[0]
    assert 0 <= ijk[1] < six.image.array.shape[1]         # L6 is in the field of view
    _check_foramina(six, range(1, 6))
    assert any(f["segment"] == "L6/S1" for f in six.extra["unlabelled_foramina"])
    assert next(p for p in six.points if p["level"] == 5)["segment"] == "L5/L6"

    four = spine_phantom(2, lumbar_count=4)
    _common_checks(four, "lumbar-foramina", {1, 2, 3, 4})
    assert four.extra["missing_vertebrae"] == ["L5"]
    _check_foramina(four, range(1, 5))
    assert next(p for p in four.points if p["level"] == 4)["segment"] == "L4/S1"


# ---- brain ----------------------------------------------------------------------------------

def _check_brain(ph):
    _common_checks(ph, "brain-wmh", {1})
    lab = ph.labels.array
    cc, n = ndimage.label(lab, np.ones((3, 3, 3), bool))
    lesions = ph.extra["lesions"]
    assert n == len(lesions)
    sizes = np.bincount(cc.ravel())[1:]
    assert sorted(sizes.tolist()) == sorted(les["voxels"] for les in lesions)
    brackets = [(0, 10), (10, 400), (400, 1000), (1000, np.inf)]
    for lo, hi in brackets:
        assert ((sizes >= lo) & (sizes < hi)).any(), (lo, hi)
    inst = ph.extra["instances"]
    for les in lesions:
        m = inst == les["id"]
        assert m.sum() == les["voxels"]
        lo, hi = brackets[les["bracket_index"]]
        assert lo <= les["voxels"] < hi
        assert np.allclose(_centroid_ras(ph.image, m), les["centroid_ras"], atol=1e-6)
        # each instance is exactly one 26-connected component
        assert len(np.unique(cc[m])) == 1 and (cc == cc[m][0]).sum() == les["voxels"]
    # lesions are bright relative to the brain
    brain = ph.extra["brain_mask"] & (lab == 0)
    assert np.median(ph.image.array[lab > 0]) > 1.5 * np.median(ph.image.array[brain])


def test_brain_lesions(brain):
    _check_brain(brain)
    assert np.allclose(brain.image.direction, np.eye(3))
    assert not np.allclose(brain.image.origin, 0)


def test_brain_thick_slices_with_skull():
    ph = brain_phantom(7, slice_thickness_mm=5.0, skull_stripped=False)
    _check_brain(ph)
    assert ph.image.spacing[2] == 5.0
    outside = ~ph.extra["brain_mask"]
    # a skull/scalp ring: bright voxels outside the brain
    assert (ph.image.array[outside] > 500).sum() > 2000
    stripped = brain_phantom(7, slice_thickness_mm=5.0)
    assert (stripped.image.array[~stripped.extra["brain_mask"]] > 500).sum() < 50


# ---- X-ray ----------------------------------------------------------------------------------

def _check_xray(ph, n_heads):
    _common_checks(ph, "xray-femur", {1})
    assert ph.image.is_2d and ph.image.array.ndim == 3 and ph.image.array.shape[0] == 1
    heads = ph.extra["femoral_heads"]
    assert len(heads) == n_heads
    for h in heads:
        i, j, _k = ph.image.ras_to_ijk_points([h["centre_ras"]])[0]
        assert np.allclose((i, j), h["centre_ij"], atol=1e-6)
        assert ph.labels.array[0, int(round(j)), int(round(i))] == 1
        r_px = h["diameter_mm"] / 2 / ph.image.spacing[0]
        # the whole head disc (minus a rim) is labelled
        jj, ii = np.mgrid[: ph.labels.array.shape[1], : ph.labels.array.shape[2]]
        disc = (ii - i) ** 2 + (jj - j) ** 2 <= (0.9 * r_px) ** 2
        assert ph.labels.array[0][disc].mean() > 0.99
        assert 30 < h["diameter_mm"] < 60
    # patient right is on the image left (i runs toward patient left)
    if n_heads == 2:
        r = next(h for h in heads if h["side"] == "right")
        left = next(h for h in heads if h["side"] == "left")
        assert r["centre_ij"][0] < left["centre_ij"][0]
        assert r["centre_ras"][0] > left["centre_ras"][0]
        cc, n = ndimage.label(ph.labels.array[0])
        assert n == 2
    frac = ph.labels.array.mean()
    assert 0.02 < frac < 0.4


def test_xray_pelvis(xray):
    _check_xray(xray, 2)
    arr = xray.image.array
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    lab = xray.labels.array
    assert arr[lab > 0].mean() > arr[lab == 0].mean()      # bone is bright


def test_xray_hip_uint16():
    ph = xray_femur_phantom(1, view="hip", side="left", intensity_range="uint16")
    _check_xray(ph, 1)
    arr = ph.image.array
    assert arr.dtype == np.float32 and arr.max() > 1000 and arr.max() <= 65535
    assert np.array_equal(arr, np.round(arr))
    assert ph.extra["femoral_heads"][0]["side"] == "left"


def test_xray_multiclass_labels_share_the_image_and_the_femur():
    femur, pelvis = xray_femur_phantom(2), make_phantom("xray-multiclass", seed=2)
    assert pelvis.task == "xray-multiclass"
    assert np.array_equal(femur.image.array, pelvis.image.array)
    assert np.array_equal(femur.labels.array == 1, pelvis.labels.array == 1)
    counts = np.bincount(pelvis.labels.array.ravel(), minlength=4)
    assert counts[2] > counts[3] > 0.01 * pelvis.labels.array.size  # hip bones larger than the sacrum
    # the sacrum lies between the hip bones (image columns), above the femoral heads (rows)
    rows, cols = np.nonzero(pelvis.labels.array[0] == 3)
    heads = pelvis.extra["femoral_heads"]
    assert min(h["centre_ij"][0] for h in heads) < cols.mean() < max(h["centre_ij"][0] for h in heads)
    assert rows.mean() < min(h["centre_ij"][1] for h in heads)


def test_chest_phantom_keeps_the_overlapping_clavicles_apart():
    ph = make_phantom("xray-chest", seed=1)
    clavicles = ph.extra["layers"]["clavicles"].array
    assert set(np.unique(ph.labels.array)) == {0, 1, 2, 3} and set(np.unique(clavicles)) == {0, 4, 5}
    assert ((clavicles > 0) & np.isin(ph.labels.array, (1, 2))).any()  # over the lung apices
    centre_u = lambda mask: np.nonzero(mask)[2].mean()  # noqa: E731  (columns run toward patient left)
    assert centre_u(ph.labels.array == 1) < centre_u(ph.labels.array == 2)
    assert centre_u(clavicles == 4) < centre_u(clavicles == 5)


def test_femur_phantom_over_a_real_background_keeps_labels_and_multiplies_transmission():
    """Issue 24 part 4: the drawn bones projected over a radiograph's display values (here
    stand-ins of another size): same labels and collimation as the drawn phantom, and inside the
    field the bones' transmission, (1 - image) / (1 - background), is the same over any background,
    at most 1 everywhere and lowest on the femur."""
    from scipy import ndimage
    from SpineKneeSegLib.tasks.xray.phantom import xray_femur_phantom

    drawn = xray_femur_phantom(7, shape=(300, 280), pixel_mm=0.8)
    backgrounds = [np.tile(np.linspace(0.1, 0.6, 256), (256, 1)), np.full((200, 220), 0.3)]
    transmissions = []
    for background in backgrounds:
        over = xray_femur_phantom(7, shape=(300, 280), pixel_mm=0.8, background=background)
        assert over.image.array.shape == drawn.image.array.shape
        assert np.array_equal(over.labels.array, drawn.labels.array)
        assert over.extra["collimation_px"] == drawn.extra["collimation_px"]
        c = over.extra["collimation_px"]
        field = (slice(c["top"] + 40, 300 - c["bottom"]), slice(c["left"], 280 - c["right"]))  # below the text
        resized = ndimage.zoom(background, (300 / background.shape[0], 280 / background.shape[1]), order=1)
        transmissions.append((1.0 - over.image.array[0][field]) / (1.0 - resized[field]))
    femur = drawn.labels.array[0][field] > 0
    assert np.allclose(transmissions[0], transmissions[1], atol=1e-5)
    assert transmissions[0].max() <= 1.0 + 1e-6
    assert np.median(transmissions[0][femur]) < 0.7 * np.median(transmissions[0][~femur])  # ~femur holds the pelvis
