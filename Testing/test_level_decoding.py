"""Anatomical level decoding (issue 21) on probability phantoms with known truth.

The phantom below draws a sagittal column of vertebral bodies (thoracic, lumbar, sacrum) with
its own geometry code and writes what a level network that has learnt typical anatomy would
output: each lumbar body mostly its own level, some leakage to the neighbours, the last thoracic
body and the sacrum weakly like L1 / L5, noise. It shares no code with the decoder. The cases:
whole column, field of view cut above L2, reaching T10, sacrum cut off, a body the network
missed, two bodies bridged across a disc, a lateral fragment, and six lumbar-type vertebrae.
"""
import numpy as np
import pytest
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.tasks.spine.level_decoding import DecodingParameters, decode_levels

SPACING = (1.0, 1.0, 4.0)  # i (anterior-posterior), j (superior-inferior), k (lateral) mm
# ITK direction columns for i, j, k in LPS: i -> posterior (+P), j -> inferior (-S), k -> left (+L)
DIRECTION = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def column_phantom(names, seed=0, top_mm=20.0, height=300, body_mm=26.0, disc_mm=10.0, lordosis_deg=25.0,
                   noise=0.05, overrides=None):
    """(probabilities (5, k, j, i) float, image, truth: body name per voxel label, name of value).

    ``names``: bodies from superior to inferior, e.g. ["T12", "L1", ..., "L5", "S1"]; ``overrides``:
    {body name: 5 level probabilities} replacing the default network behaviour for that body."""
    rng = np.random.default_rng(seed)
    shape = (20, height, 120)
    prob = np.zeros((5, *shape), np.float32)
    truth = np.zeros(shape, np.uint8)
    k = np.arange(shape[0])[:, None, None] * SPACING[2]
    j = np.arange(shape[1])[None, :, None] * SPACING[1]
    i = np.arange(shape[2])[None, None, :] * SPACING[0]
    y = top_mm
    values = {}
    for n, name in enumerate(names):
        centre_j = y + body_mm / 2
        curve = 50 + 18 * np.sin(np.radians(lordosis_deg) * (centre_j - 150) / 100)  # anterior-posterior drift
        height_mm = body_mm * (1.3 if name == "S1" else 1.0)
        inside = (np.abs(j - centre_j) <= height_mm / 2) & (np.abs(i - curve) <= 17) & (np.abs(k - 38) <= 18)
        values[n + 1] = name
        truth[inside] = n + 1
        probs = default_probabilities(name)
        if overrides and name in overrides:
            probs = np.asarray(overrides[name], np.float32)
        for level in range(5):
            prob[level][inside] = probs[level]
        y += height_mm + disc_mm
    prob += rng.normal(0, noise, prob.shape).astype(np.float32) * (truth > 0)
    image = Image(np.zeros(shape, np.float32), SPACING, (0.0, 0.0, 0.0), DIRECTION)
    return np.clip(prob, 0, 1), image, truth, values


def default_probabilities(name):
    """What a level network trained on typical spines outputs on a body: its own level high, the
    neighbours' a little; T12 and the sacrum look a little like L1 and L5."""
    p = np.zeros(5, np.float32)
    if name.startswith("L") and name[1:].isdigit() and 1 <= int(name[1:]) <= 5:
        level = int(name[1:]) - 1
        p[level] = 0.85
        for nb in (level - 1, level + 1):
            if 0 <= nb < 5:
                p[nb] = 0.12
    elif name == "T12":
        p[0] = 0.3
    elif name == "S1":
        p[4] = 0.3
    return p


def named(decoded, truth, values):
    """{truth body name: decoded level name or None} for every phantom body."""
    out = {}
    for value, name in values.items():
        body = truth == value
        levels = np.bincount(decoded.labels[body], minlength=6)
        levels[0] = 0
        out[name] = f"L{int(levels.argmax())}" if levels.any() and levels.max() > 0.5 * body.sum() else None
    return out


def assert_consistent(decoded):
    """One consecutive run: no name twice, no level skipped between two named bodies."""
    present = [k for k in range(1, 6) if (decoded.labels == k).any()]
    assert present == list(range(present[0], present[-1] + 1)) if present else True
    from scipy import ndimage

    for k in present:  # each name on one body only
        _, n = ndimage.label(decoded.labels == k)
        assert n == 1, f"L{k} on {n} pieces"


LUMBAR = ["L1", "L2", "L3", "L4", "L5"]


@pytest.mark.parametrize("names", [
    ["T12"] + LUMBAR + ["S1"],  # the usual field of view
    ["T10", "T11", "T12"] + LUMBAR + ["S1"],  # reaching T10
    LUMBAR[1:] + ["S1"],  # cut above L2
    ["T12"] + LUMBAR,  # sacrum cut off
    ["T11", "T12", "L1", "L2", "L3"],  # cut in the middle of the column
])
def test_field_of_view_never_shifts(names):
    prob, image, truth, values = column_phantom(names, height=60 + 36 * len(names))
    decoded = decode_levels(prob, image)
    assert_consistent(decoded)
    got = named(decoded, truth, values)
    for name in names:
        expected = name if name in LUMBAR else None
        assert got[name] == expected, (names, got)
    assert not decoded.doubtful, decoded.level_confidence
    assert decoded.level_confidence > 0.4


def test_missed_body_leaves_a_gap_not_a_shift():
    names = ["T12"] + LUMBAR + ["S1"]
    prob, image, truth, values = column_phantom(names, overrides={"L3": [0, 0, 0, 0, 0]})
    decoded = decode_levels(prob, image)
    got = named(decoded, truth, values)
    assert got == {"T12": None, "L1": "L1", "L2": "L2", "L3": None, "L4": "L4", "L5": "L5", "S1": None}
    assert any("L3 (a gap" in m for m in decoded.summary()["levels_not_found"])


def test_bridged_bodies_are_split_by_level():
    names = ["T12"] + LUMBAR + ["S1"]
    prob, image, truth, values = column_phantom(names, noise=0.0)
    l3, l4 = [np.argwhere(truth == v) for v in (4, 5)]  # values: T12 = 1, L1 = 2, ..., L3 = 4, L4 = 5
    gap = slice(l3[:, 1].max() + 1, l4[:, 1].min())
    bridge = (slice(7, 12), gap, slice(60, 70))
    prob[2][bridge] = 0.8  # a strip of "L3" across the L3/L4 disc joins the two bodies
    decoded = decode_levels(prob, image)
    assert_consistent(decoded)
    got = named(decoded, truth, values)
    assert [got[n] for n in LUMBAR] == LUMBAR


def test_lateral_fragment_joins_its_body():
    names = ["T12"] + LUMBAR + ["S1"]
    prob, image, truth, values = column_phantom(names, noise=0.0)
    l2 = np.argwhere(truth == 3)  # L2
    rows = slice(l2[:, 1].min() + 5, l2[:, 1].max() - 5)
    prob[1][0:2, rows, 90:100] = 0.9  # a detached "L2" piece in the outermost slices, posterior
    decoded = decode_levels(prob, image)
    got = named(decoded, truth, values)
    assert [got[n] for n in LUMBAR] == LUMBAR
    assert len([b for b in decoded.bodies if b.found]) == 5  # the fragment joined L2 (T12, S1 below threshold)


def test_six_lumbar_type_vertebrae_are_reported_doubtful():
    """A sixth lumbar-type vertebra: the network (trained on five) sees two bodies that each look
    like two levels; the count cannot be known from this field of view, so it must say so."""
    names = ["T12", "L1", "L2", "L3", "L4", "L5", "L6", "S1"]
    overrides = {"L1": [0.7, 0.2, 0, 0, 0], "L2": [0.35, 0.5, 0.1, 0, 0], "L3": [0, 0.4, 0.45, 0.1, 0],
                 "L4": [0, 0, 0.45, 0.4, 0.05], "L5": [0, 0, 0.05, 0.5, 0.35], "L6": [0, 0, 0, 0.2, 0.7]}
    prob, image, truth, values = column_phantom(names, overrides=overrides, height=360)
    decoded = decode_levels(prob, image)
    assert_consistent(decoded)
    assert decoded.doubtful, decoded.level_confidence
    assert decoded.summary()["doubtful"] is True


def test_typical_spine_is_confident_and_margin_is_bounded():
    prob, image, truth, values = column_phantom(["T12"] + LUMBAR + ["S1"])
    decoded = decode_levels(prob, image)
    assert 0.0 <= decoded.level_confidence <= 1.0
    summary = decoded.summary()
    assert [b["name"] for b in summary["bodies"]] == LUMBAR  # T12 and S1 (0.3) are not bodies
    assert summary["levels_not_found"] == []


def test_nothing_found_is_doubtful_and_empty():
    prob, image, _, _ = column_phantom(["T12"] + LUMBAR)
    decoded = decode_levels(np.zeros_like(prob), image)
    assert decoded.doubtful and not decoded.labels.any()


def test_threshold_is_a_parameter():
    prob, image, truth, values = column_phantom(["T12"] + LUMBAR + ["S1"])
    strict = decode_levels(prob, image, DecodingParameters(doubtful_below=0.99))
    assert strict.doubtful


def test_end_bodies_that_look_lumbar_do_not_pull_the_run():
    """T12 taken for L1 and the sacrum for L5 by the network (0.55 each): the whole run decides."""
    names = ["T11", "T12"] + LUMBAR + ["S1"]
    overrides = {"T12": [0.55, 0.05, 0, 0, 0], "S1": [0, 0, 0, 0.05, 0.55]}
    prob, image, truth, values = column_phantom(names, overrides=overrides, height=360)
    decoded = decode_levels(prob, image)
    assert_consistent(decoded)
    got = named(decoded, truth, values)
    assert got == {"T11": None, "T12": None, **{n: n for n in LUMBAR}, "S1": None}
    assert [b["name"] for b in decoded.summary()["bodies"]] == ["above L1"] + LUMBAR + ["below L5"]
    # ... two bodies claim each end of the run: reported, and doubtful when the rule is turned on
    assert decoded.end_conflict == pytest.approx(0.55, abs=0.03) and not decoded.doubtful
    assert decode_levels(prob, image, DecodingParameters(end_conflict_doubtful=0.5)).doubtful


def test_specks_of_a_noisy_network_are_not_bodies():
    """Thousands of specks (an untrained network) beside a real column: the specks are dropped
    before any per-piece work, the column is still named right."""
    names = ["T12"] + LUMBAR + ["S1"]
    prob, image, truth, values = column_phantom(names)
    rng = np.random.default_rng(5)
    specks = (rng.random(prob.shape[1:]) < 0.02) & (truth == 0)
    prob[rng.integers(0, 5), specks] = 0.9
    decoded = decode_levels(prob, image)
    got = named(decoded, truth, values)
    assert [got[n] for n in LUMBAR] == LUMBAR
    assert len(decoded.bodies) == 5


def test_l5_run_weight_counts_from_the_sacrum():
    """A field of view that cuts L1 away above L2: a network that names the top body it sees L1
    (and the next L2) but the body above the sacrum L5 pulls the equal-weight run one level down;
    weighting L5 names the column from the sacrum. Both are doubtful (the evidence conflicts)."""
    names = LUMBAR[1:] + ["S1"]
    overrides = {"L2": [0.94, 0.0, 0, 0, 0], "L3": [0, 0.94, 0.06, 0, 0], "L4": [0, 0, 0.55, 0.47, 0],
                 "L5": [0, 0, 0, 0.01, 0.95]}
    prob, image, truth, values = column_phantom(names, overrides=overrides, noise=0.0)
    seed = decode_levels(prob, image)
    assert named(seed, truth, values) == {"L2": "L1", "L3": "L2", "L4": "L3", "L5": "L4", "S1": None}
    weighted = decode_levels(prob, image, DecodingParameters(run_weights=(1, 1, 1, 1, 3)))
    assert_consistent(weighted)
    assert named(weighted, truth, values) == {"L2": "L2", "L3": "L3", "L4": "L4", "L5": "L5", "S1": None}
    assert seed.doubtful and weighted.doubtful
    assert 0.0 <= weighted.level_confidence <= 1.0


def test_equal_run_weights_are_the_seed_decoding():
    prob, image, truth, values = column_phantom(["T12"] + LUMBAR + ["S1"])
    seed = decode_levels(prob, image)
    same = decode_levels(prob, image, DecodingParameters(run_weights=(2.0,) * 5))  # scale-free
    assert np.array_equal(seed.labels, same.labels) and seed.level_confidence == pytest.approx(same.level_confidence)
    with pytest.raises(ValueError, match="run_weights"):
        decode_levels(prob, image, DecodingParameters(run_weights=(1, 1, 1, 1)))


def test_context_evidence_scores_the_bodies_left_outside_the_run():
    """A context-targets network's "above L1" / "below L5" maps: a body the run leaves above L1
    scores its "above L1" probability (weight context_weight), one below L5 its "below L5". The
    network here calls T12 "L1" and hesitates between neighbours down the column, so the level
    probabilities alone name everything one body too high; its "above L1" map on T12 names the
    column right. Weight 0 (the default) is the seed's decoding exactly, context or not."""
    names = ["T12"] + LUMBAR  # the sacrum cut off
    overrides = {"T12": [0.85, 0, 0, 0, 0], "L1": [0.45, 0.45, 0, 0, 0], "L2": [0, 0.45, 0.45, 0, 0],
                 "L3": [0, 0, 0.45, 0.45, 0], "L4": [0, 0, 0, 0.45, 0.45], "L5": [0, 0, 0, 0, 0.5]}
    prob, image, truth, values = column_phantom(names, overrides=overrides, noise=0.0)
    context = np.zeros((2, *prob.shape[1:]), np.float32)
    context[0][truth == 1] = 0.9  # above L1: on T12 (the phantom's first body)
    seed = decode_levels(prob, image)
    assert named(seed, truth, values) == {"T12": "L1", "L1": "L2", "L2": "L3", "L3": "L4", "L4": "L5", "L5": None}
    same = decode_levels(prob, image, context=context)  # given, weight 0: not used
    assert np.array_equal(same.labels, seed.labels) and same.run_scores == seed.run_scores
    with_context = decode_levels(prob, image, DecodingParameters(context_weight=1.0), context=context)
    assert_consistent(with_context)
    assert named(with_context, truth, values) == {"T12": None, **{n: n for n in LUMBAR}}
    assert with_context.bodies[0].context == pytest.approx([0.9, 0.0], abs=0.01)
    with pytest.raises(ValueError, match="context maps"):
        decode_levels(prob, image, DecodingParameters(context_weight=1.0), context=context[:1])
