"""Knee MRI phantom (femur, tibia, fibula, patella) with exact labels.
Shares no code with the methods it tests (conventions: core/phantoms.py)."""
from __future__ import annotations

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.phantoms import (
    Phantom,
    cortical_rim,
    dilate2d,
    finish_scan,
    origin_for_centre,
    ras_grid,
    sagittal_direction,
    unit_vector,
)


def knee_phantom(seed=0, shape=(24, 224, 224), *, spacing=(0.6, 0.6, 3.0), knee_side="right",
                 oblique_deg=None, noise=0.025, bias=0.2) -> Phantom:
    """Sagittal PD-like knee MRI. ``shape`` is (slices, rows, cols); slices run left-right.

    Labels: 1 femur, 2 tibia, 3 fibula, 4 patella. ``extra``: joint_centre_ras, knee_side,
    lateral_direction_ras (unit RAS vector pointing lateral), label_names.
    """
    if knee_side not in ("right", "left"):
        raise ValueError("knee_side must be 'right' or 'left'")
    rng = np.random.default_rng(seed)
    k_n, j_n, i_n = shape
    if oblique_deg is None:
        oblique_deg = float(rng.uniform(-6, 6))
    direction = sagittal_direction(True, oblique_deg)
    # the joint centre sits near the grid centre, shifted a little; the slab is centred slightly
    # lateral so that the fibula (lateral) is covered
    lat_sign = 1.0 if knee_side == "right" else -1.0       # RAS x sign of "lateral"
    joint_ras = np.array([lat_sign * 70.0 + rng.uniform(-5, 5), 25.0 + rng.uniform(-5, 5),
                          -420.0 + rng.uniform(-5, 5)])
    slab_shift = lat_sign * (3.0 + rng.uniform(0, 3))       # grid centre more lateral than joint
    centre_ras = joint_ras + np.array([slab_shift, rng.uniform(-6, 6), rng.uniform(-8, 8)])
    centre_lps = centre_ras * np.array([-1, -1, 1])
    origin = origin_for_centre(centre_lps, direction, spacing, (i_n, j_n, k_n))
    img = Image(np.zeros(shape, np.float32), spacing, origin, direction)

    X, Y, Z = ras_grid(img)
    # knee frame: l = lateral (+) / medial (-), a = anterior, s = superior, all from joint centre
    lx = (X - np.float32(joint_ras[0])) * np.float32(lat_sign)
    a = Y - np.float32(joint_ras[1])
    s = Z - np.float32(joint_ras[2])

    g = 1.0 + rng.uniform(-0.06, 0.06)                    # patient size
    f32 = np.float32

    def ell(cx, ca, cs, rx, ra, rs):
        return ((lx - f32(cx)) / f32(rx * g)) ** 2 + ((a - f32(ca)) / f32(ra * g)) ** 2 + \
               ((s - f32(cs)) / f32(rs * g)) ** 2 <= 1.0

    # ---- femur: shaft, flaring metaphysis, two condyles with a posterior notch
    w = np.clip((60.0 - s) / 42.0, 0.0, 1.0) ** 1.6
    rx_m = (14.0 + 19.0 * w) * g
    ra_m = (13.0 + 10.0 * w) * g
    ca_m = -3.5 * w
    femur = ((lx / rx_m) ** 2 + ((a - ca_m) / ra_m) ** 2 <= 1.0) & (s >= 17.0 * g)
    cond_a = -8.0 + rng.uniform(-1, 1)
    for side in (-1, 1):
        femur |= ell(side * 18.5, cond_a, 19.5, 15.0, 25.0, 18.5)
    notch = (np.abs(lx) < 5.5 * g) & (a < -4.0) & (s < 21.0 * g)
    femur &= ~notch
    # ---- tibia: plateau with eminence, tapering metaphysis, shaft, tuberosity
    top = -2.5 * g + 3.0 * g * np.exp(-(lx / (5.0 * g)) ** 2) * (np.abs(a + 6) < 12)
    w_t = np.clip((-14.0 - s) / 38.0, 0.0, 1.0) ** 0.8
    rx_t = (37.0 - 21.0 * w_t) * g
    ra_t = (25.0 - 10.0 * w_t) * g
    ca_t = -6.0 + 4.0 * w_t
    tibia = ((lx / rx_t) ** 2 + ((a - ca_t) / ra_t) ** 2 <= 1.0) & (s <= top)
    tibia |= ell(2.0, 17.0, -32.0, 10.0, 9.0, 12.0) & (s <= top)   # tuberosity
    # keep a joint space between femur and tibia (cartilage + meniscus live there)
    femur &= ~dilate2d(tibia, 3)
    # ---- fibula: head posterolateral below the plateau, thin shaft
    fib_x, fib_a = 30.0, -24.0
    fibula = ell(fib_x, fib_a, -22.0, 8.5, 8.5, 9.5)
    shaft = (((lx - f32(fib_x * g)) / f32(5.5 * g)) ** 2 + ((a - f32(fib_a * g)) / f32(5.5 * g)) ** 2 <= 1) \
        & (s < -22.0 * g)
    fibula |= shaft
    fibula &= ~dilate2d(tibia, 3)
    # ---- patella: anterior to the trochlea
    pat_c = (2.0, 30.0 + rng.uniform(-1.5, 1.5), 23.0 + rng.uniform(-3, 3))
    patella = ell(*pat_c, 20.0, 8.0, 17.0)
    patella &= ~dilate2d(femur, 4)

    labels = np.zeros(shape, np.uint8)
    labels[femur] = 1
    labels[tibia] = 2
    labels[fibula] = 3
    labels[patella] = 4
    bone = labels > 0

    # ---- soft tissue
    leg_r = (56.0 + 4.0 * np.tanh(s / 40.0)) * g
    leg = ((lx - 2.0) / leg_r) ** 2 + ((a + 4.0) / (leg_r * 0.92)) ** 2 <= 1.0
    inner = ((lx - 2.0) / (leg_r - 7)) ** 2 + ((a + 4.0) / (leg_r * 0.92 - 7)) ** 2 <= 1.0
    tissue = np.zeros(shape, np.float32)
    tissue[leg] = 0.85                                    # subcutaneous fat
    tissue[inner] = 0.33                                  # muscle
    # fat pads: Hoffa (anterior, below patella) and posterior popliteal fat
    hoffa = ell(0.0, 25.0, -5.0, 22.0, 8.0, 12.0)
    tissue[hoffa & inner] = 0.82
    popl = ell(0.0, -38.0, 6.0, 18.0, 10.0, 30.0)
    tissue[popl & inner] = 0.8
    vessel = ((lx + 2.0) ** 2 + (a + 38.0) ** 2 <= 16.0) & (s > -40)
    tissue[vessel] = 0.05                                 # flow void
    # joint fluid / cartilage shell around the joint surfaces
    near = dilate2d(bone, 3) & inner & ~hoffa & ~popl & (s > -12) & (s < 45) & ~bone
    tissue[near] = 0.55
    # menisci: dark wedges at the joint line periphery
    menisc = (np.abs(s + 0.5) < 0.16 * (np.abs(a + 7) - 8)) & (np.abs(np.abs(lx) - 19) < 13) & \
        (np.abs(a + 7) < 27) & ~bone
    tissue[menisc] = 0.06
    # patellar tendon (patella -> tuberosity) and quadriceps tendon: dark bands
    t_par = np.clip((f32(pat_c[2] - 14) - s) / f32(pat_c[2] - 14 + 32), 0, 1)
    tend_a = f32(pat_c[1] + 4) + (f32(27.0) - f32(pat_c[1] + 4)) * t_par
    ptend = (np.abs(a - tend_a) < 2.2) & (np.abs(lx - 2) < 12) & (s < pat_c[2] - 10) & (s > -32) & ~bone
    tissue[ptend] = 0.05
    qtend = (np.abs(a - (pat_c[1] - 2)) < 2.5) & (np.abs(lx - 2) < 14) & (s > pat_c[2] + 12) & \
        (s < 66) & inner & ~bone
    tissue[qtend] = 0.07
    # bone: marrow with a dark cortical rim (2 px) and a faint physeal scar
    tissue[bone] = 0.72
    physis = ((np.abs(s - 24.0) < 0.9) & (labels == 1)) | ((np.abs(s + 16.0) < 0.9) & (labels == 2))
    tissue[physis] = 0.35
    tissue[cortical_rim(bone, 2)] = 0.05
    tissue *= (1.0 + 0.05 * rng.standard_normal() * np.tanh(s / 60.0)).astype(np.float32)

    arr = finish_scan(tissue, (X, Y, Z), rng, bias=bias, noise=noise, blur=0.7)
    image = img.with_array(arr)
    label_img = img.with_array(labels)
    lateral_dir = unit_vector(np.array([lat_sign, 0.0, 0.0]))
    return Phantom(
        task="knee-bones", image=image, labels=label_img, points=[],
        extra={"joint_centre_ras": tuple(float(v) for v in joint_ras), "knee_side": knee_side,
               "lateral_direction_ras": tuple(lateral_dir),
               "label_names": {1: "femur", 2: "tibia", 3: "fibula", 4: "patella"},
               "oblique_deg": oblique_deg},
        description=f"sagittal PD-like {knee_side} knee, {shape} voxels, spacing {spacing} mm, seed {seed}")
