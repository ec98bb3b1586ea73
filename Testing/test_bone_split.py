"""Seed 000's merged variant: an "any bone" mask split back into the four bones."""
import numpy as np
import pytest
from SpineKneeSegLib.tasks import make_phantom
from SpineKneeSegLib.tasks.knee.bone_split import split_any_bone


def _dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("seed,side", [(0, "right"), (1, "left")])
def test_true_bones_come_back_from_their_union(seed, side):
    phantom = make_phantom("knee-bones", seed=seed, knee_side=side)
    truth = phantom.labels.array
    # the phantom's fibular head touches the tibia: one component that must be cut
    out = split_any_bone(truth > 0, phantom.labels)
    for value in (1, 2, 3, 4):
        assert _dice(out == value, truth == value) > 0.95, value


def test_a_bridge_between_femur_and_tibia_and_a_stray_blob():
    phantom = make_phantom("knee-bones", seed=2)
    truth = phantom.labels.array
    mask = truth > 0
    kji_f, kji_t = np.argwhere(truth == 1), np.argwhere(truth == 2)
    k = int(np.median(kji_f[:, 0]))
    j_lo, j_hi = kji_f[kji_f[:, 0] == k][:, 1].max(), kji_t[kji_t[:, 0] == k][:, 1].min()
    col = int(np.median(kji_f[kji_f[:, 0] == k][:, 2]))
    mask[k, min(j_lo, j_hi):max(j_lo, j_hi) + 1, col:col + 2] = True  # a 1-slice bridge across the joint
    mask[0:2, 0:4, 0:4] = True  # a stray speck in a corner
    out = split_any_bone(mask, phantom.labels)
    assert _dice(out == 1, truth == 1) > 0.95 and _dice(out == 2, truth == 2) > 0.95
    assert out[0:2, 0:4, 0:4].max() == 0


def test_femur_and_tibia_fused_across_the_whole_joint_beside_a_separate_patella():
    """A merged network at low resolution can close the joint space over many slices (erosion
    cannot separate it) while patella and fibula stay apart: the fused piece is still cut at its
    narrowest level instead of being taken for one bone."""
    from scipy import ndimage

    phantom = make_phantom("knee-bones", seed=0)
    truth = phantom.labels.array
    femur_tibia = ndimage.binary_closing((truth == 1) | (truth == 2), np.ones((1, 9, 9), bool), iterations=2)
    assert ndimage.label(ndimage.binary_erosion(femur_tibia, np.ones((3, 3, 3)), iterations=3))[1] == 1
    mask = femur_tibia | (truth == 3) | (truth == 4)
    out = split_any_bone(mask, phantom.labels)
    assert _dice(out == 1, truth == 1) > 0.85 and _dice(out == 2, truth == 2) > 0.85
    assert _dice(out == 4, truth == 4) > 0.9
