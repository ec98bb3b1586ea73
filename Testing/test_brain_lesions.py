"""Issue 22: clinical-geometry simulation, the lesion-aware loss, the lesion decoder (threshold and
minimum volume chosen by leave-one-case-out, carried by the checkpoint) and its selection — on
constructed cases with known answers."""

import numpy as np
import pytest
import torch
from brain_wmh import blob_loss, focal_tversky_loss  # noqa: E402
from clinical_geometry import (  # noqa: E402
    Acquisition,
    box_kernel,
    draw_acquisitions,
    simulate_acquisition,
)
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.tasks.brain.lesions import (  # noqa: E402
    DecodingRule,
    decode_lesions,
    decoding_rules,
    label_lesions,
    rule_for,
)
from wmh_metrics import wmh2017_metrics  # noqa: E402


def _volume_with_cube(shape=(60, 70, 80), corner=(20, 30, 40), size=6):
    arr = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.uint8)
    k, j, i = corner
    arr[k:k + size, j:j + size, i:i + size] = 100.0
    lab[k:k + size, j:j + size, i:i + size] = 1
    direction = np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])  # not the identity: positions must still hold
    return Image(arr, (1.0, 1.0, 1.0), (5.0, -7.0, 3.0), direction), lab


def _centroid_lps(image: Image, weights: np.ndarray) -> np.ndarray:
    kji = np.argwhere(weights > 0)
    w = weights[weights > 0].astype(float)
    return image.ijk_to_lps_points((kji[:, ::-1] * w[:, None]).sum(0, keepdims=True) / w.sum())[0]


def test_box_kernel_has_the_slab_width():
    for width in (1.0, 2.0, 3.0, 4.2, 7.5):
        taps = box_kernel(width)
        assert taps.sum() == pytest.approx(1.0)
        assert taps.max() * width == pytest.approx(1.0)  # whole pixels weigh 1/width
        assert np.allclose(taps, taps[::-1])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_simulated_acquisition_keeps_positions_and_partial_volume(axis):
    image, labels = _volume_with_cube()
    acq = Acquisition(axis, 5.0, 0.5, phase_mm=1.5)
    thick, thick_labels = simulate_acquisition(image, labels, acq)
    expected = np.full(3, 0.5)
    expected[axis] = 5.0
    assert thick.spacing == pytest.approx(tuple(expected[::-1]))
    assert thick_labels.shape == thick.array.shape
    # the cube's intensity-weighted centre stays where it was in space (within half a thin voxel)
    assert np.allclose(_centroid_lps(thick, thick.array), _centroid_lps(image, image.array), atol=0.5)
    # partial volume: total signal (intensity x voxel volume) is kept, no thick voxel reaches the cube's value
    kept = thick.array.sum() * np.prod(thick.spacing) / (image.array.sum() * np.prod(image.spacing))
    assert kept == pytest.approx(1.0, abs=0.05)
    assert thick.array.max() < 100.0
    # labels are carried the same way: the >= 50 % rule keeps the cube's volume roughly
    volume = thick_labels.sum() * np.prod(thick.spacing)
    assert 0.4 * 216 <= volume <= 1.6 * 216


def test_random_acquisitions_cover_the_requested_ranges():
    draws = draw_acquisitions(np.random.default_rng(0), 300)
    assert {a.axis for a in draws} == {0, 1, 2}
    assert 3.0 <= min(a.thickness_mm for a in draws) < 3.3 and 7.7 < max(a.thickness_mm for a in draws) <= 8.0
    assert 0.4 <= min(a.in_plane_mm for a in draws) < 0.45 and 1.15 < max(a.in_plane_mm for a in draws) <= 1.2
    assert all(0 <= a.phase_mm <= a.thickness_mm for a in draws)


def _two_lesion_target():
    target = torch.zeros(1, 1, 40, 40)
    target[0, 0, 5:25, 5:25] = 1  # 400 pixels
    target[0, 0, 32:35, 32:35] = 1  # 9 pixels
    return target


def test_blob_loss_charges_a_missed_small_lesion_more_than_the_same_missed_area_of_a_big_one():
    target = _two_lesion_target()
    logit = lambda p: torch.logit(p.clamp(1e-4, 1 - 1e-4))  # noqa: E731
    miss_small = target.clone()
    miss_small[0, 0, 32:35, 32:35] = 0
    miss_edge = target.clone()
    miss_edge[0, 0, 5:14, 5] = 0  # the same 9 pixels, off the big lesion's edge
    args = (0.85, 0.15, 4 / 3, 2.0)
    seed_small = focal_tversky_loss(logit(miss_small), target, *args)
    seed_edge = focal_tversky_loss(logit(miss_edge), target, *args)
    assert seed_small == pytest.approx(float(seed_edge), rel=0.02)  # the seed's loss cannot tell them apart
    blob_small = blob_loss(logit(miss_small), target, *args, weight=1.0)
    blob_edge = blob_loss(logit(miss_edge), target, *args, weight=1.0)
    assert blob_small > blob_edge + 0.2
    # no lesion in the patch: the blob loss is the seed's loss
    empty = torch.zeros(1, 1, 40, 40)
    assert blob_loss(logit(miss_small), empty, *args, weight=1.0) == focal_tversky_loss(logit(miss_small), empty, *args)


def test_blob_loss_gradient_reaches_the_missed_small_lesion():
    target = _two_lesion_target()
    logits = torch.full((1, 1, 40, 40), -3.0, requires_grad=True)
    blob_loss(logits, target, 0.85, 0.15, 4 / 3, 2.0, weight=1.0).backward()
    small = -logits.grad[0, 0, 32:35, 32:35].mean()
    big = -logits.grad[0, 0, 5:25, 5:25].mean()
    assert small > 2 * big > 0  # per pixel, the small lesion pulls harder


def test_decoder_drops_small_lesions_and_never_merges():
    probs = np.zeros((20, 30, 30), np.uint8)
    probs[2:6, 2:6, 2:6] = 200  # 64 voxels
    probs[2:6, 2:6, 7:11] = 200  # 64 voxels, one voxel gap: a separate lesion
    probs[12, 12, 12] = 240  # 1 voxel
    probs[15:17, 20:22, 20:22] = 100  # 8 voxels, faint
    spacing = (1.0, 1.0, 2.0)  # voxel = 2 mm3
    assert label_lesions(decode_lesions(probs, spacing, DecodingRule(0.5, 0.0)), 26)[1] == 3
    assert label_lesions(decode_lesions(probs, spacing, DecodingRule(0.3, 0.0)), 26)[1] == 4
    kept = decode_lesions(probs, spacing, DecodingRule(0.3, 10.0))  # drops the 2 mm3 voxel only
    assert label_lesions(kept, 26)[1] == 3 and kept[12, 12, 12] == 0 and kept[15, 20, 20] == 1
    assert decode_lesions(probs, spacing, DecodingRule(0.3, 200.0)).sum() == 0
    # removing lesions never joins the rest: components of the output are subsets of the cut's
    base, _ = label_lesions(probs >= 77, 26)
    out, n = label_lesions(kept, 26)
    for c in range(1, n + 1):
        assert len(np.unique(base[out == c])) == 1


def test_decoding_rules_pick_by_the_thickest_voxel_side():
    assert decoding_rules(None) == [DecodingRule()]
    rules = decoding_rules({"rules": [{"threshold": 0.3, "min_volume_mm3": 4.0, "max_slice_mm": None},
                                      {"threshold": 0.6, "min_volume_mm3": 10.0, "max_slice_mm": 2.0}]})
    assert rule_for(rules, 1.0).threshold == 0.6 and rule_for(rules, 2.0).threshold == 0.6
    assert rule_for(rules, 7.5).threshold == 0.3


def test_selection_grid_equals_the_lib_decoder_and_never_looks_at_the_scored_case():
    import wmh_selection as sel

    rng = np.random.default_rng(3)
    views = {}
    for case in ("a", "b", "c"):
        truth = np.zeros((16, 24, 24), bool)
        for _ in range(6):
            k, j, i = rng.integers(2, 14), rng.integers(2, 20), rng.integers(2, 20)
            truth[k - 1:k + rng.integers(1, 3), j - 1:j + 2, i - 1:i + 2] = True
        probs = np.clip(truth * rng.uniform(80, 255) + rng.normal(40, 40, truth.shape), 0, 255).astype(np.uint8)
        views[case] = {"1mm": (probs, truth, (1.0, 1.0, 1.0)), "7.5mm": (probs, truth, (1.0, 1.0, 7.5))}
    grid = sel.f1_grid(views)
    for (case, view), scores in grid.items():
        probs, truth, spacing = views[case][view]
        for a in (0, 5, 12):
            for b in (0, 3, 6):
                rule = DecodingRule(sel.THRESHOLDS[a], sel.MIN_VOLUMES_MM3[b])
                pred = decode_lesions(probs, spacing, rule)
                assert scores[a, b] == pytest.approx(wmh2017_metrics(pred, truth, spacing[::-1])["lesion_f1"])
    # make case "a" prefer a threshold nobody else does: its own rule must not follow it
    grid[("a", "1mm")][:] = 0
    grid[("a", "1mm")][-1, -1] = 10.0
    rules_a = sel.choose_rules(grid, views, ["b", "c"], 2.0)
    assert rules_a[0].max_slice_mm == 2.0 and rules_a[1].max_slice_mm is None
    assert (rules_a[0].threshold, rules_a[0].min_volume_mm3) != (sel.THRESHOLDS[-1], sel.MIN_VOLUMES_MM3[-1])
    rules_all = sel.choose_rules(grid, views, ["a", "b", "c"], 2.0)
    assert (rules_all[0].threshold, rules_all[0].min_volume_mm3) == (sel.THRESHOLDS[-1], sel.MIN_VOLUMES_MM3[-1])


@pytest.mark.mrml
def test_run_uses_the_checkpoints_decoding_rule_for_the_inputs_slice_thickness(tmp_path):
    """A checkpoint carrying two rules: the 7 mm FLAIR gets the thick-slice one, the report says
    which, and the lesion table counts the decoder's own 26-connected lesions."""
    import json

    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import read_image, write_image
    from SpineKneeSegLib.engine.weights import initialise_weights
    from SpineKneeSegLib.tasks.brain.phantom import brain_phantom

    phantom = brain_phantom(3, slice_thickness_mm=7.0, pixel_mm=1.0, in_plane=208)
    write_image(phantom.image, tmp_path / "flair.nii.gz")
    rules = {"rules": [{"threshold": 0.9, "min_volume_mm3": 0.0, "max_slice_mm": 2.0},
                       {"threshold": 0.2, "min_volume_mm3": 30.0, "max_slice_mm": None}]}
    initialise_weights("brain-wmh", tmp_path / "w.pt", {"channels": (4, 8)}, seed=1,
                       metadata={"postprocessing": {"lesion_decoding": rules}})
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "brain-wmh", str(tmp_path / "flair.nii.gz"), "-o", str(out),
                     "--weights", str(tmp_path / "w.pt"), "--progress", "none"]) == 0
    report = json.loads((out / "report.json").read_text())
    decoding = report["summaries"]["lesion_decoding"]
    assert (decoding["threshold"], decoding["min_volume_mm3"], decoding["rule_max_slice_mm"]) == (0.2, 30.0, None)
    assert "7 mm thick" in decoding["note"]
    labels = read_image(out / "labels.nii.gz").array
    components, n = label_lesions(labels, 26)
    assert report["summaries"]["lesions"]["lesion_count"] == n
    assert n >= 1  # an untrained network's ~0.5 outputs pass the 0.2 cut
    assert np.bincount(components.ravel())[1:].min() * 7.0 >= 30.0  # each kept lesion has the minimum volume


RECALL_FLOOR_7_5MM = 0.07  # brain-wmh v0.3.0 finds 2 of 27 (v0.2.0: 5): a regression guard, far below the aim


def _small_lesion_flair(seed: int, n_lesions: int = 60, shape=(150, 180, 150)):
    """A 1 mm FLAIR-like brain (axes S, A, R) drawn here with numpy alone — it shares no code with
    the model or the Lib's phantoms: grey matter, white matter, dark ventricles, and ``n_lesions``
    bright lesions of 3-30 voxels (1-8 slices deep), each 26-disconnected from the others."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(s, dtype=np.float32) - s / 2 for s in shape], indexing="ij")
    radius = (k / 60) ** 2 + (j / 78) ** 2 + (i / 62) ** 2
    brain, white = radius <= 1, radius <= 0.55
    ventricles = ((k / 14) ** 2 + (j / 28) ** 2 + ((np.abs(i) - 9) / 6) ** 2) <= 1
    image = np.where(brain, 0.78, 0.0).astype(np.float32)
    image[white] = 0.62
    image[ventricles] = 0.18
    labels = np.zeros(shape, np.uint8)
    taken = np.zeros(shape, bool)
    sites = np.argwhere(white & ~ndimage.binary_dilation(ventricles, iterations=2))
    kk, jj, ii = np.meshgrid(np.arange(-4, 5), np.arange(-2, 3), np.arange(-2, 3), indexing="ij")
    placed = 0
    while placed < n_lesions:
        c = sites[rng.integers(len(sites))]
        depth, r = int(rng.integers(1, 9)), rng.uniform(0.5, 1.6)
        blob = (np.abs(kk + 0.5 * (depth % 2 == 0)) < depth / 2) & (jj ** 2 + ii ** 2 <= r ** 2)
        box = (slice(c[0] - 4, c[0] + 5), slice(c[1] - 2, c[1] + 3), slice(c[2] - 2, c[2] + 3))
        if not 3 <= blob.sum() <= 30 or taken[box].any():
            continue
        labels[box][blob] = 1
        taken[tuple(slice(max(x - 6, 0), x + 7) for x in c)] = True  # >= 2 voxels of gap to the next
        placed += 1
    image = np.where(labels > 0, 1.3, image)  # FLAIR: lesions about twice white matter, grey matter 1.25x
    image = ndimage.gaussian_filter(image, 0.6) + rng.normal(0, 0.025, shape).astype(np.float32)
    image[~brain] = 0
    return image.astype(np.float32), labels


def _reslice_axial(image: np.ndarray, labels: np.ndarray, thickness: float):
    """Average the 1 mm slices whose centres fall in each slab; a slab voxel is lesion where >= half are."""
    edges = np.ceil(np.arange(0, image.shape[0] + 1e-9, thickness) - 1e-6).astype(int)
    slabs = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b <= image.shape[0]]
    return (np.stack([image[a:b].mean(0) for a, b in slabs]),
            np.stack([labels[a:b].mean(0) >= 0.5 for a, b in slabs]).astype(np.uint8))


@pytest.mark.mrml
@pytest.mark.slow
def test_shipped_model_finds_small_lesions_that_survive_7_5_mm_slabs(tmp_path):
    """Many 3-30 voxel lesions at 1 mm, resliced to 7.5 mm slabs: the shipped brain-wmh model's
    recall of the lesions still present in the slab truth is measured (printed) and held above a
    floor, and the lesion table counts exactly the 26-connected lesions of the written mask."""
    import json

    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import read_image, write_image

    image, labels = _small_lesion_flair(seed=11)
    slab, slab_truth = _reslice_axial(image, labels, 7.5)
    # identity direction: array axis 0 (k) runs inferior -> superior, so the slabs are axial
    write_image(Image(slab, (1.0, 1.0, 7.5), (-75.0, -90.0, -70.0), np.eye(3)), tmp_path / "flair.nii.gz")
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "brain-wmh", str(tmp_path / "flair.nii.gz"), "-o", str(out),
                     "--progress", "none"]) == 0
    pred = read_image(out / "labels.nii.gz").array
    truth_components, surviving = label_lesions(slab_truth, 26)
    assert 15 <= surviving < 60  # reslicing removed the shallow lesions and kept the deep ones
    found = len(np.unique(truth_components[(pred > 0) & (truth_components > 0)]))
    recall = found / surviving
    print(f"recall of lesions surviving 7.5 mm slabs: {found}/{surviving} = {recall:.2f}")
    assert recall >= RECALL_FLOOR_7_5MM
    report = json.loads((out / "report.json").read_text())
    n_pred = label_lesions(pred, 26)[1]
    assert report["summaries"]["lesions"]["lesion_count"] == n_pred
    assert len((out / "lesions.tsv").read_text().strip().splitlines()) == n_pred + 1


@pytest.mark.mrml
def test_a_t1_that_does_not_overlap_the_flair_is_left_out_with_a_warning(tmp_path, monkeypatch):
    """Issue 27: the same T1 moved 1 m away fed the FLAIR+T1 model an empty channel. Now the
    FLAIR-only model runs and the report says why; with explicit --weights the run is refused."""
    import json

    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.weights import initialise_weights, register_model
    from SpineKneeSegLib.tasks.brain.phantom import brain_phantom

    flair = brain_phantom(3, slice_thickness_mm=5.0).image
    t1 = flair.with_array(flair.array.max() - flair.array)
    write_image(flair, tmp_path / "flair.nii.gz")
    write_image(t1, tmp_path / "t1.nii.gz")
    write_image(Image(t1.array, t1.spacing, tuple(np.asarray(t1.origin) + [1000.0, 0, 0]), t1.direction),
                tmp_path / "t1-moved.nii.gz")
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("SPINEKNEESEG_MODELS", str(models))
    initialise_weights("brain-wmh", models / "flair-only.pt", {"channels": (4, 8)}, seed=1)
    register_model(models / "flair-only.pt", "brain-wmh", "0.0.1", card="none (test)")
    initialise_weights("brain-wmh", models / "with-t1.pt", {"channels": (4, 8)}, seed=2,
                       preprocessing={"extra_inputs": ["t1"]})
    register_model(models / "with-t1.pt", "brain-wmh-t1", "0.0.1", card="none (test)")

    def run(t1_name, *extra):
        out = tmp_path / f"out-{t1_name}-{len(extra)}"
        code = cli.main(["run", "--task", "brain-wmh", str(tmp_path / "flair.nii.gz"), str(tmp_path / t1_name),
                         "-o", str(out), "--progress", "none", *extra])
        return code, (json.loads((out / "report.json").read_text()) if code == 0 else None)

    code, report = run("t1.nii.gz")
    assert code == 0 and report["weights"]["path"].endswith("with-t1.pt")
    assert int(report["inputs"][1]["checks"]["overlap"].split()[1]) >= 50  # "covers NN % of the flair's ..."
    assert {"voxel_type", "spacing_mm", "axes", "intensity"} <= set(report["inputs"][0]["checks"])
    code, report = run("t1-moved.nii.gz")
    assert code == 0 and report["weights"]["path"].endswith("flair-only.pt")
    assert any("t1-moved.nii.gz not used" in w and "covers only 0 %" in w for w in report["warnings"])
    code, _ = run("t1-moved.nii.gz", "--weights", str(models / "with-t1.pt"))
    assert code == 2 and not (tmp_path / "out-t1-moved.nii.gz-2").exists()


def _drawn_brain(shape=(60, 80, 80)):
    """A textured ellipsoidal 'brain' with one real lesion, generated here (no model code)."""
    k, j, i = np.indices(shape)
    inside = ((k - 30) / 26) ** 2 + ((j - 40) / 36) ** 2 + ((i - 40) / 36) ** 2 <= 1
    arr = np.where(inside, np.random.default_rng(1).normal(100, 10, shape), 0).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[28:33, 38:43, 38:43] = 1
    arr[lab > 0] += 40
    return arr, lab


def test_synthetic_lesions_are_separate_labelled_and_in_deep_tissue():
    from scipy import ndimage
    from synthetic_lesions import deep_tissue, insert_lesions

    arr, lab = _drawn_brain()
    spacing = (1.0, 1.0, 1.0)
    out, out_lab, placed = insert_lesions(arr, lab, spacing, np.random.default_rng(0), 25)
    assert placed == 25 and out.shape == arr.shape and out_lab.dtype == lab.dtype
    assert np.array_equal(out_lab[lab > 0], lab[lab > 0]) and np.array_equal(arr, _drawn_brain()[0])  # inputs untouched
    new = (out_lab > 0) & (lab == 0)
    components, n = ndimage.label(out_lab > 0, np.ones((3, 3, 3)))
    assert n == 1 + placed  # every painted lesion its own 26-connected lesion, none joined to the real one
    sizes = np.bincount(ndimage.label(new, np.ones((3, 3, 3)))[0].ravel())[1:]
    assert len(sizes) == placed and sizes.max() <= 4 / 3 * np.pi * 2.5 ** 3 + 1  # radii <= 2.5 mm
    # brighter where labelled, by 0.4-1.6 brain SD at the centre; nothing outside the brain changed
    sd = arr[arr > 0].std()
    gain = out - arr
    assert np.all(gain >= 0) and np.all(gain[arr == 0] == 0)
    assert 0.2 * sd < gain[new].mean() < 1.6 * sd
    # every centre lies in the allowed deep tissue (away from the brain's edge and the real lesion)
    allowed = deep_tissue(arr, lab, spacing, keep_off_mm=3.0 + 2.5)
    for c in range(1, n + 1):
        voxels = np.argwhere(components == c)
        if lab[tuple(voxels[0])]:
            continue
        peak = voxels[np.argmax(gain[tuple(voxels.T)])]
        assert allowed[tuple(peak)] or allowed[tuple(np.round(voxels.mean(0)).astype(int))]
    # nothing asked, nothing painted
    same, same_lab, none = insert_lesions(arr, lab, spacing, np.random.default_rng(0), 0)
    assert none == 0 and np.array_equal(same, arr) and np.array_equal(same_lab, lab)


def test_lesion_contrast_rows_measure_the_drawn_contrast_and_what_was_found():
    from wmh_contrast import lesion_rows, table

    flair = np.full((30, 40, 40), 100.0)
    flair[0] = 0.0  # a background slice: outside the brain
    flair[5:25, 5:35, 5:35] += np.random.default_rng(0).normal(0, 2.0, (20, 30, 30))
    truth = np.zeros(flair.shape, np.uint8)
    truth[10:12, 10:12, 10:12] = 1  # 8 voxels, drawn 6 units brighter than around it
    truth[20:24, 20:25, 20:25] = 1  # 100 voxels, not brighter
    flair[10:12, 10:12, 10:12] += 6.0
    found = np.zeros_like(truth)
    found[21, 21, 21] = 1  # touches the large one only
    rows = sorted(lesion_rows(flair, truth, found), key=lambda r: r["voxels"])
    sd = flair[flair > 0].std()
    assert [r["voxels"] for r in rows] == [8, 100] and [r["found"] for r in rows] == [False, True]
    assert rows[0]["contrast_sd"] == pytest.approx(6.0 / sd, abs=1.5 / sd)  # shell noise: a few voxels' worth
    assert abs(rows[1]["contrast_sd"]) < 1.0 / sd
    text = table(rows)
    assert "| [0, 10) |" in text and "0/1" in text and "1/1" in text
