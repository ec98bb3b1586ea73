"""Synthetic phantoms with exact ground truth for the four tasks.

Each generator draws everything from one seeded ``numpy.random.Generator``, so the same seed gives
bit-identical arrays. Anatomy is described analytically in patient (RAS) millimetres and sampled
at the voxel centres of a realistic, deliberately non-trivial grid (non-unit spacing, non-zero
origin, permuted/flipped direction matrices), so the labels are exact by construction.

This module must share no code with the segmentation methods it is used to test: it imports only
``image.Image`` (the geometry container) and numpy/scipy.

Conventions: ``Image.array`` is ``[k, j, i]``; RAS +x = patient Right, +y = Anterior,
+z = Superior (LPS +x = patient Left). Label values follow ``labels.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .image import Image

PHANTOM_TASKS = ("knee-bones", "lumbar-foramina", "brain-wmh", "xray-femur", "xray-multiclass")

# WMH size brackets in voxels (GUIDE section 4), half-open [lo, hi)
LESION_BRACKETS = ((0, 10), (10, 400), (400, 1000), (1000, math.inf))


@dataclass
class Phantom:
    task: str                 # one of PHANTOM_TASKS
    image: Image              # float32 scan
    labels: Image             # uint8 ground truth, same geometry
    points: list = field(default_factory=list)   # markers (foramina), each a dict with "ras"
    extra: dict = field(default_factory=dict)    # task-specific truth (see each generator)
    description: str = ""


# ------------------------------------------------------------------------------------------------
# shared helpers (geometry, intensity realism) — deliberately private to the phantoms
# ------------------------------------------------------------------------------------------------

def _origin_for_centre(centre_lps, direction, spacing, size_ijk):
    """Origin that puts the grid centre at ``centre_lps``."""
    half = (np.asarray(size_ijk, float) - 1.0) / 2.0 * np.asarray(spacing, float)
    return tuple(np.asarray(centre_lps, float) - np.asarray(direction, float) @ half)


def _ras_grid(img: Image):
    """RAS coordinates of every voxel centre as three float32 arrays shaped like ``img.array``."""
    m = img.ijk_to_ras.astype(np.float32)
    k_n, j_n, i_n = img.array.shape
    i = np.arange(i_n, dtype=np.float32)[None, None, :]
    j = np.arange(j_n, dtype=np.float32)[None, :, None]
    k = np.arange(k_n, dtype=np.float32)[:, None, None]
    shape = img.array.shape
    return tuple(np.broadcast_to(m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3], shape)
                 .astype(np.float32) for r in range(3))


def _bias_field(coords, rng, amplitude, scale_mm):
    """Smooth multiplicative field exp(quadratic polynomial) over physical coordinates."""
    x, y, z = ((c - np.float32(0.5 * (c.min() + c.max()))) / np.float32(scale_mm) for c in coords)
    c = rng.normal(0.0, 1.0, 9) * amplitude
    log_b = (c[0] * x + c[1] * y + c[2] * z + 0.5 * (c[3] * x * x + c[4] * y * y + c[5] * z * z)
             + 0.5 * (c[6] * x * y + c[7] * y * z + c[8] * x * z))
    return np.exp(log_b).astype(np.float32)


def _rician(rng, img, sigma):
    n1 = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2 ** 2)


_ST2D = np.zeros((3, 3, 3), bool)
_ST2D[1] = ndimage.generate_binary_structure(2, 1)     # in-plane (per-slice) 4-neighbourhood


def _rim(mask, px):
    """In-plane (per-slice) outer rim of ``mask`` about ``px`` pixels thick (cortical bone)."""
    return mask & ~ndimage.binary_erosion(mask, _ST2D, iterations=px)


def _dilate2d(mask, px):
    return ndimage.binary_dilation(mask, _ST2D, iterations=px)


def _in_plane_blur(vol, sigma_px):
    return ndimage.gaussian_filter(vol, (0.0, sigma_px, sigma_px)).astype(np.float32)


def _finish(tissue, coords, rng, *, bias=0.2, bias_scale=80.0, noise=0.025, blur=0.6, scale=1000.0):
    img = tissue.astype(np.float32)
    if blur:
        img = _in_plane_blur(img, blur)
    img *= _bias_field(coords, rng, bias, bias_scale)
    img = _rician(rng, img, noise)
    return (img * np.float32(scale)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# knee
# ------------------------------------------------------------------------------------------------

def _sagittal_direction(k_toward_right: bool, oblique_deg: float = 0.0):
    """LPS direction: i anterior->posterior, j superior->inferior, k toward patient right/left;
    optional rotation of the whole grid about the superior axis (oblique sagittal)."""
    col_i = np.array([0.0, 1.0, 0.0])
    col_j = np.array([0.0, 0.0, -1.0])
    col_k = np.array([-1.0, 0.0, 0.0]) if k_toward_right else np.array([1.0, 0.0, 0.0])
    d = np.c_[col_i, col_j, col_k]
    if oblique_deg:
        t = math.radians(oblique_deg)
        rz = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
        d = rz @ d
    return d


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
    direction = _sagittal_direction(True, oblique_deg)
    # the joint centre sits near the grid centre, shifted a little; the slab is centred slightly
    # lateral so that the fibula (lateral) is covered
    lat_sign = 1.0 if knee_side == "right" else -1.0       # RAS x sign of "lateral"
    joint_ras = np.array([lat_sign * 70.0 + rng.uniform(-5, 5), 25.0 + rng.uniform(-5, 5),
                          -420.0 + rng.uniform(-5, 5)])
    slab_shift = lat_sign * (3.0 + rng.uniform(0, 3))       # grid centre more lateral than joint
    centre_ras = joint_ras + np.array([slab_shift, rng.uniform(-6, 6), rng.uniform(-8, 8)])
    centre_lps = centre_ras * np.array([-1, -1, 1])
    origin = _origin_for_centre(centre_lps, direction, spacing, (i_n, j_n, k_n))
    img = Image(np.zeros(shape, np.float32), spacing, origin, direction)

    X, Y, Z = _ras_grid(img)
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
    femur &= ~_dilate2d(tibia, 3)
    # ---- fibula: head posterolateral below the plateau, thin shaft
    fib_x, fib_a = 30.0, -24.0
    fibula = ell(fib_x, fib_a, -22.0, 8.5, 8.5, 9.5)
    shaft = (((lx - f32(fib_x * g)) / f32(5.5 * g)) ** 2 + ((a - f32(fib_a * g)) / f32(5.5 * g)) ** 2 <= 1) \
        & (s < -22.0 * g)
    fibula |= shaft
    fibula &= ~_dilate2d(tibia, 3)
    # ---- patella: anterior to the trochlea
    pat_c = (2.0, 30.0 + rng.uniform(-1.5, 1.5), 23.0 + rng.uniform(-3, 3))
    patella = ell(*pat_c, 20.0, 8.0, 17.0)
    patella &= ~_dilate2d(femur, 4)

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
    near = _dilate2d(bone, 3) & inner & ~hoffa & ~popl & (s > -12) & (s < 45) & ~bone
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
    tissue[_rim(bone, 2)] = 0.05
    tissue *= (1.0 + 0.05 * rng.standard_normal() * np.tanh(s / 60.0)).astype(np.float32)

    arr = _finish(tissue, (X, Y, Z), rng, bias=bias, noise=noise, blur=0.7)
    image = img.with_array(arr)
    label_img = img.with_array(labels)
    lateral_dir = _normalise(np.array([lat_sign, 0.0, 0.0]))
    return Phantom(
        task="knee-bones", image=image, labels=label_img, points=[],
        extra={"joint_centre_ras": tuple(float(v) for v in joint_ras), "knee_side": knee_side,
               "lateral_direction_ras": tuple(lateral_dir),
               "label_names": {1: "femur", 2: "tibia", 3: "fibula", 4: "patella"},
               "oblique_deg": oblique_deg},
        description=f"sagittal PD-like {knee_side} knee, {shape} voxels, spacing {spacing} mm, seed {seed}")


def _normalise(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


# ------------------------------------------------------------------------------------------------
# lumbar spine
# ------------------------------------------------------------------------------------------------

def spine_phantom(seed=0, lumbar_count=5, *, shape=(16, 256, 256), spacing=(1.0, 1.0, 4.0),
                  k_toward="left", tilt_deg=0.0, noise=0.025, bias=0.2) -> Phantom:
    """Sagittal T2-like lumbar MRI: i anterior->posterior, j superior->inferior, k toward patient
    ``k_toward`` ("left": left-handed direction matrix; "right": right-handed). ``tilt_deg`` rotates
    the in-plane axes about the left-right axis.

    Labels 1..5 = L1..L5 vertebral bodies (T12, sacrum and a transitional L6 are present in the
    image but labelled 0). ``points``: foramina, one point per sagittal slice the foramen is seen
    on, label ``L<k> left|right`` = foramen of the L<k>/L<k+1> motion segment (the lowest lumbar
    one pairs with S1). ``extra``: lumbar_count, vertebrae, foramina (centres and slices),
    midline_ras_x, unlabelled_foramina, extra_vertebra / missing_vertebrae.
    """
    if k_toward not in ("left", "right"):
        raise ValueError("k_toward must be 'left' or 'right'")
    if lumbar_count not in (4, 5, 6):
        raise ValueError("lumbar_count must be 4, 5 or 6")
    rng = np.random.default_rng(seed)
    k_n, j_n, i_n = shape
    direction = _sagittal_direction(k_toward == "right")
    if tilt_deg:
        t = math.radians(tilt_deg)        # rotation about the LPS x (left-right) axis
        rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
        direction = rx @ direction
    centre_ras = np.array([rng.uniform(-8, 8), rng.uniform(-10, 10), 980.0 + rng.uniform(-20, 20)])
    origin = _origin_for_centre(centre_ras * np.array([-1, -1, 1]), direction, spacing, (i_n, j_n, k_n))
    img = Image(np.zeros(shape, np.float32), spacing, origin, direction)
    m = img.ijk_to_ras
    assert abs(m[0, 0]) < 1e-9 and abs(m[0, 1]) < 1e-9 and abs(m[1, 2]) < 1e-9 and abs(m[2, 2]) < 1e-9

    # in-plane physical coordinates (independent of k) and lateral coordinate (only k)
    jj, ii = np.meshgrid(np.arange(j_n, dtype=float), np.arange(i_n, dtype=float), indexing="ij")
    A2 = m[1, 0] * ii + m[1, 1] * jj + m[1, 3]
    S2 = m[2, 0] * ii + m[2, 1] * jj + m[2, 3]
    Xk = m[0, 2] * np.arange(k_n) + m[0, 3]              # RAS x of each slice
    midline = float(centre_ras[0] + rng.uniform(-3.0, 3.0))
    xk = (Xk - midline).astype(np.float32)               # + = patient right of the midline

    # ---- vertebral column centreline in the sagittal plane (a, s), arclength t grows inferiorly
    g = 1.0 + rng.uniform(-0.05, 0.04)
    if lumbar_count == 6:
        g *= 0.93
    names = ["T11", "T12"] + [f"L{n}" for n in range(1, lumbar_count + 1)] + ["S1", "S2", "S3"]
    heights = []
    for nm in names:
        h = 22.0 if nm.startswith("T") else (24.0 if nm.startswith("L") else 20.0)
        if nm == "S2":
            h = 17.0
        if nm == "S3":
            h = 14.0
        heights.append(h * g * (1.0 + rng.uniform(-0.05, 0.05)))
    discs = []
    for a_nm in names[:-1]:
        if a_nm.startswith("S"):
            discs.append(1.5 * g)                          # fused sacral segments
        elif a_nm.startswith("T"):
            discs.append(7.0 * g * (1 + rng.uniform(-0.1, 0.1)))
        else:
            discs.append(8.5 * g * (1 + rng.uniform(-0.1, 0.1)))
    t_centre = [0.0]
    for n in range(1, len(names)):
        t_centre.append(t_centre[-1] + heights[n - 1] / 2 + discs[n - 1] + heights[n] / 2)
    t_centre = np.asarray(t_centre)
    i_l1 = names.index("L1")
    i_s1 = names.index("S1")
    # centre the T12-top .. S1-bottom span in the field of view
    span_top = t_centre[i_l1 - 1] - heights[i_l1 - 1] / 2
    span_bot = t_centre[i_s1] + heights[i_s1] / 2
    t_shift = (span_top + span_bot) / 2 + rng.uniform(-6, 6)
    t_centre = t_centre - t_shift
    t_l1_top = t_centre[i_l1] - heights[i_l1] / 2
    t_s1_top = t_centre[i_s1] - heights[i_s1] / 2
    lordosis = rng.uniform(0.65, 0.9)                     # radians from L1 to S1 endplates
    k_l = lordosis / max(t_s1_top - t_l1_top, 1.0)
    phi_top = lordosis * rng.uniform(0.35, 0.5)
    ts = np.arange(-400.0, 400.0, 0.25)
    phi = np.where(ts < t_l1_top, phi_top,
                   np.where(ts < t_s1_top, phi_top - k_l * (ts - t_l1_top),
                            phi_top - lordosis - 0.009 * np.clip(ts - t_s1_top, 0, 70.0)))
    # integrate the tangent (sin phi, -cos phi) from t=0 placed at the body centre anchor
    anchor = np.array([centre_ras[1] + 22.0 + rng.uniform(-5, 5), centre_ras[2]])
    da = np.sin(phi) * 0.25
    ds = -np.cos(phi) * 0.25
    ca = np.cumsum(da)
    cs = np.cumsum(ds)
    i0 = int(np.argmin(np.abs(ts)))
    ca += anchor[0] - ca[i0]
    cs += anchor[1] - cs[i0]
    # nearest centreline sample for every in-plane pixel -> straightened coordinates (t, v)
    from scipy.spatial import cKDTree
    tree = cKDTree(np.c_[ca, cs])
    _, idx = tree.query(np.c_[A2.ravel(), S2.ravel()])
    tan = np.c_[np.sin(phi[idx]), -np.cos(phi[idx])]
    nor = np.c_[np.cos(phi[idx]), np.sin(phi[idx])]
    d = np.c_[A2.ravel() - ca[idx], S2.ravel() - cs[idx]]
    T = (ts[idx] + (d * tan).sum(1)).reshape(j_n, i_n).astype(np.float32)[None]
    V = (d * nor).sum(1).reshape(j_n, i_n).astype(np.float32)[None]
    Xl = xk[:, None, None]
    ax = np.abs(Xl)

    def centre_at(t, v):
        """(a, s) of straightened coordinates (t, v)."""
        q = int(np.clip(np.searchsorted(ts, t), 0, len(ts) - 1))
        ph = phi[q]
        a0 = ca[q] + (t - ts[q]) * math.sin(ph)
        s0 = cs[q] - (t - ts[q]) * math.cos(ph)
        return a0 + v * math.cos(ph), s0 + v * math.sin(ph)

    D = 16.0 * g            # body half-depth (AP)
    W = 24.0 * g            # body half-width (lateral)
    rcv, rcx = 7.0 * g, 11.0 * g          # canal radii (AP, lateral)
    vc = -D - 1.0 - rcv                   # canal centre
    v_back = -D - 2 * rcv - 62.0 * g - rng.uniform(0, 10)   # posterior skin

    shape3 = (k_n, j_n, i_n)
    tissue = np.zeros(shape3, np.float32)
    labels = np.zeros(shape3, np.uint8)
    body_in = np.broadcast_to(V > v_back, shape3)
    # abdomen / soft tissue texture in plain coordinates
    tex = np.zeros((j_n, i_n), np.float32)
    for _ in range(6):
        kv = rng.normal(0, 1, 2)
        kv = kv / np.linalg.norm(kv) * rng.uniform(0.05, 0.15)
        tex += np.cos(kv[0] * A2 + kv[1] * S2 + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    abd = (0.42 + 0.025 * tex)[None]
    tissue[:] = np.where(body_in, np.broadcast_to(abd, shape3), 0.0)
    # posterior: subcutaneous fat then paraspinal muscle
    tissue[np.broadcast_to((V > v_back) & (V < v_back + 13.0), shape3)] = 0.85
    musc = np.broadcast_to((V >= v_back + 13.0) & (V < -D + 2.0), shape3)
    tissue[musc] = 0.3
    # psoas (lateral, beside the bodies, lower lumbar) and great vessels (aorta: patient left)
    ps_r = np.clip((T - np.float32(t_l1_top - 20.0)) / 60.0, 0.15, 1.0)   # thickens downward
    psoas = ((ax - 33.0 * g) / (13.0 * g * ps_r)) ** 2 + ((V - 2.0) / (15.0 * g * ps_r)) ** 2 <= 1.0
    tissue[psoas] = 0.3
    t_bif = t_centre[i_l1 + min(3, lumbar_count - 1)]
    aorta = ((Xl + 14.0 * g) ** 2 + (V - D - 13.0 * g) ** 2 <= (10.0 * g) ** 2) & (T < t_bif)
    ivc = ((Xl - 18.0 * g) ** 2 + (V - D - 12.0 * g) ** 2 <= (10.5 * g) ** 2) & (T < t_bif + 10)
    tissue[aorta | ivc] = 0.06

    bone = np.zeros(shape3, bool)
    # vertebral bodies and discs
    r_ax = np.sqrt((V / np.float32(D)) ** 2 + (Xl / np.float32(W)) ** 2)
    vertebrae = []
    for n, nm in enumerate(names):
        h2 = heights[n] / 2
        dt = (T - np.float32(t_centre[n])) / np.float32(h2)
        sac = nm.startswith("S")
        scale = 1.0 if not sac else (1.0 - 0.22 * (int(nm[1]) - 1))
        if sac:
            rr = np.sqrt((V / np.float32(D * scale)) ** 2 + (Xl / np.float32(W * (0.9 + 0.5 * scale))) ** 2)
        else:
            rr = r_ax
        body = np.abs(dt) ** 6 + rr ** 6 <= 1.0
        bone |= body
        marrow = 0.45 + rng.uniform(-0.05, 0.06)
        tissue[body] = marrow
        lab = 0
        if nm.startswith("L") and int(nm[1:]) <= 5:
            lab = int(nm[1:])
            labels[body] = lab
        a_c, s_c = centre_at(float(t_centre[n]), 0.0)
        vertebrae.append({"name": nm, "label": lab, "centre_ras": (midline, float(a_c), float(s_c))})
        if not sac:
            # pedicles (upper part of the vertebra, posterior to the body)
            for sg in (-1, 1):
                ped = ((T - np.float32(t_centre[n] - 0.2 * heights[n])) / np.float32(0.22 * heights[n])) ** 2 \
                    + ((V - np.float32(-D - 6.5 * g)) / np.float32(8.0 * g)) ** 2 \
                    + ((Xl - np.float32(sg * 15.0 * g)) / np.float32(5.5 * g)) ** 2 <= 1.0
                bone |= ped
                tissue[ped] = marrow
            # lamina + spinous process behind the canal
            lam = (np.abs(T - np.float32(t_centre[n] + 0.15 * heights[n])) < 0.45 * heights[n]) & \
                (V < vc - rcv) & (V > vc - rcv - 6.0 * g) & (ax < 13.0 * g)
            spin = (np.abs(T - np.float32(t_centre[n] + 0.25 * heights[n])) < 0.33 * heights[n]) & \
                (V < vc - rcv) & (V > vc - rcv - 34.0 * g) & (ax < 5.0 * g)
            post = lam | spin
            bone |= post
            tissue[post] = marrow - 0.05
        if n + 1 < len(names) and not nm.startswith("S"):
            t0 = t_centre[n] + h2
            t1 = t_centre[n + 1] - heights[n + 1] / 2
            tm = 0.5 * (t0 + t1)
            disc = (T > np.float32(t0 - 2.0)) & (T < np.float32(t1 + 2.0)) & (r_ax <= 1.04) & ~bone
            tissue[disc] = 0.28
            nucleus = disc & (r_ax < 0.62) & (np.abs(T - np.float32(tm)) < (t1 - t0) / 2 - 1.2)
            degen = rng.uniform() < 0.25
            tissue[nucleus] = 0.45 if degen else 0.8
            # facet joints (articular processes) behind the foramen at the disc level
            for sg in (-1, 1):
                fac = ((T - np.float32(tm - 2.0)) / np.float32(10.0 * g)) ** 2 + \
                    ((V - np.float32(-D - 19.0 * g)) / np.float32(6.5 * g)) ** 2 + \
                    ((Xl - np.float32(sg * 18.0 * g)) / np.float32(7.0 * g)) ** 2 <= 1.0
                fac &= ~bone
                bone |= fac
                tissue[fac] = marrow - 0.03
    # canal: CSF, cord ending in the conus near L1/L2, across the whole field
    canal = ((V - np.float32(vc)) / np.float32(rcv)) ** 2 + (Xl / np.float32(rcx)) ** 2 <= 1.0
    canal &= ~bone
    tissue[canal] = 0.95
    conus_t = t_centre[i_l1] + heights[i_l1] / 2 + rng.uniform(-6, 6)
    cord_r = np.float32(4.0 * g) * np.clip((np.float32(conus_t) - T) / 15.0, 0, 1) ** 0.5
    cord = canal & ((V - np.float32(vc)) ** 2 + Xl ** 2 <= cord_r ** 2)
    tissue[cord] = 0.35
    # foramina: bright fat with a dark nerve root, dark ligament rim, between the pedicles
    lat_lo = 11.0 * g
    lat_hi = lat_lo + min(12.0 * g, 2.95 * spacing[2])   # seen on 2-3 sagittal slices
    foramina = []
    unlabelled = []
    lumbar_idx = [n for n, nm in enumerate(names) if nm.startswith("L")]
    for n in [i_l1 - 1] + lumbar_idx:
        t0 = t_centre[n] + heights[n] / 2
        t1 = t_centre[n + 1] - heights[n + 1] / 2
        tm = 0.5 * (t0 + t1)
        for sg in (-1, 1):
            lat = ax
            drift = np.clip(lat - np.float32(lat_lo), 0, None)
            tf = np.float32(tm - 0.3 * heights[n]) + np.float32(0.25) * drift
            vf = np.float32(-D - 7.5 * g) + np.float32(0.2) * drift
            inside_lat = (np.sign(Xl) == sg) & (lat >= lat_lo) & (lat < lat_hi)
            e = ((T - tf) / np.float32(8.0 * g)) ** 2 + ((V - vf) / np.float32(5.0 * g)) ** 2
            rim = inside_lat & (e <= 1.45) & ~canal
            tissue[rim & ~(e <= 1.0)] = 0.15
            hole = inside_lat & (e <= 1.0)
            tissue[hole] = 0.82
            root = inside_lat & (((T - tf + np.float32(3.5 * g)) ** 2 + (V - vf) ** 2) <= (2.4 * g) ** 2)
            tissue[root] = 0.25
            bone &= ~hole
            # truth: centre on every slice whose centre lies inside the lateral band
            nm = names[n]
            side = "right" if sg > 0 else "left"       # RAS +x = patient right
            ks = [kk for kk in range(k_n) if np.sign(xk[kk]) == sg and lat_lo <= abs(xk[kk]) < lat_hi]
            pts = []
            for kk in ks:
                dr = max(abs(float(xk[kk])) - lat_lo, 0.0)
                a_f, s_f = centre_at(tm - 0.3 * heights[n] + 0.25 * dr, -D - 7.5 * g + 0.2 * dr)
                ijk = img.ras_to_ijk_points([[float(Xk[kk]), a_f, s_f]])[0]
                ijk[2] = kk
                pts.append((kk, ijk, img.ijk_to_ras_points([ijk])[0]))
            lower = names[n + 1]
            rec = {"vertebra": nm, "segment": f"{nm}/{lower}", "side": side,
                   "slices": [p[0] for p in pts],
                   "centre_ras": tuple(float(v) for v in np.mean([p[2] for p in pts], 0)) if pts else None}
            level = int(nm[1:]) if nm.startswith("L") else 0
            if nm.startswith("L") and 1 <= level <= 5:
                rec.update(label=f"L{level} {side}", level=level)
                foramina.append((rec, pts))
            else:
                unlabelled.append(rec)
    tissue[_rim(bone & (tissue > 0.35) & (tissue < 0.6), 2)] = 0.08
    points = []
    for rec, pts in foramina:
        for kk, ijk, ras in pts:
            points.append({"label": rec["label"], "level": rec["level"], "side": rec["side"],
                           "segment": rec["segment"], "ras": tuple(float(v) for v in ras),
                           "ijk": tuple(float(v) for v in ijk)})
    tissue = np.where(body_in, tissue, 0.0).astype(np.float32)
    coords = (np.broadcast_to(Xk[:, None, None], shape3).astype(np.float32),
              np.broadcast_to(A2[None], shape3).astype(np.float32),
              np.broadcast_to(S2[None], shape3).astype(np.float32))
    arr = _finish(tissue, coords, rng, bias=bias, noise=noise, blur=0.5, bias_scale=120.0)
    extra = {"lumbar_count": lumbar_count, "k_toward": k_toward, "midline_ras_x": midline,
             "vertebrae": vertebrae, "foramina": [r for r, _ in foramina],
             "unlabelled_foramina": unlabelled,
             "label_names": {n: f"L{n}" for n in range(1, 6)}}
    if lumbar_count == 6:
        extra["extra_vertebra"] = "L6"
    if lumbar_count == 4:
        extra["missing_vertebrae"] = ["L5"]
    return Phantom(
        task="lumbar-foramina", image=img.with_array(arr), labels=img.with_array(labels),
        points=points, extra=extra,
        description=(f"sagittal T2-like lumbar spine, {lumbar_count} lumbar vertebrae, k toward patient "
                     f"{k_toward}, {shape} voxels, spacing {spacing} mm, seed {seed}"))


# ------------------------------------------------------------------------------------------------
# brain
# ------------------------------------------------------------------------------------------------

def _bracket_name(b):
    lo, hi = LESION_BRACKETS[b]
    return f"[{lo},{'inf' if hi == math.inf else hi})"


def brain_phantom(seed=0, *, slice_thickness_mm=2.0, pixel_mm=2.0, in_plane=104, skull_stripped=True,
                  lesions_per_bracket=(2, 3, 1, 1), noise=0.025, bias=0.15) -> Phantom:
    """Axial FLAIR-like brain (skull-stripped unless ``skull_stripped=False``) with bright
    white-matter lesions, at least one per WMH size bracket, all 26-connected-separate.

    Label 1 = lesion. ``extra``: lesions (id, voxels, bracket, bracket_index, centroid_ras),
    instances (uint16 per-lesion id map), brain_mask, brackets.
    """
    rng = np.random.default_rng(seed)
    thk = float(slice_thickness_mm)
    k_n = int(round(150.0 / thk))
    shape = (k_n, in_plane, in_plane)
    spacing = (pixel_mm, pixel_mm, thk)
    direction = np.eye(3)
    centre_ras = np.array([rng.uniform(-4, 4), rng.uniform(-20, 0), rng.uniform(10, 30)])
    origin = _origin_for_centre(centre_ras * np.array([-1, -1, 1]), direction, spacing,
                                (in_plane, in_plane, k_n))
    img = Image(np.zeros(shape, np.float32), spacing, origin, direction)
    X, Y, Z = _ras_grid(img)
    g = 1.0 + rng.uniform(-0.05, 0.05)
    brain_c = centre_ras + np.array([rng.uniform(-2, 2), rng.uniform(-3, 3), 8.0])
    x = X - np.float32(brain_c[0])
    y = Y - np.float32(brain_c[1])
    z = Z - np.float32(brain_c[2])
    f32 = np.float32
    R = np.array([64.0, 80.0, 56.0]) * g

    def waves(n, k_lo, k_hi):
        out = np.zeros(shape, np.float32)
        for _ in range(n):
            kv = rng.normal(0, 1, 3)
            kv = kv / np.linalg.norm(kv) * rng.uniform(k_lo, k_hi)
            out += np.cos(f32(kv[0]) * x + f32(kv[1]) * y + f32(kv[2]) * z + f32(rng.uniform(0, 2 * np.pi)))
        return out / np.float32(math.sqrt(n / 2.0))

    rho = np.sqrt((x / f32(R[0])) ** 2 + (y / f32(R[1])) ** 2 + (z / f32(R[2])) ** 2)
    rho = rho * (1.0 + 0.03 * waves(4, 0.02, 0.05))       # lobar bumps
    flat_base = z > f32(-0.55 * R[2])                      # flattened skull base
    radial = np.sqrt(x * x + y * y + z * z) / np.maximum(rho, f32(1e-3))
    depth = (1.0 - rho) * radial                           # ~ mm below the brain surface
    cerebrum = (rho <= 1.0) & flat_base
    cb = ((x / f32(46 * g)) ** 2 + ((y + f32(40 * g)) / f32(28 * g)) ** 2 +
          ((z + f32(40 * g)) / f32(18 * g)) ** 2) <= 1.0
    stem = ((x ** 2 + (y + f32(14 * g)) ** 2) <= f32((10 * g) ** 2)) & (z < f32(-10 * g)) & (z > f32(-70 * g))
    brain = cerebrum | cb | stem
    cerebrum &= ~ndimage.binary_dilation(cb | stem, iterations=1)   # tentorium: cerebellum apart
    gyri = waves(10, 0.18, 0.32)
    tissue = np.zeros(shape, np.float32)
    tissue[brain] = 0.42                                  # white matter (FLAIR)
    sulcal_depth = 12.0 * np.clip(1.0 - np.abs(gyri) / 0.7, 0, 1)   # deepest on the folds
    gm = cerebrum & (depth < 4.5 + sulcal_depth)
    tissue[gm] = 0.56
    sulci = cerebrum & (np.abs(gyri) < 0.08) & (depth < sulcal_depth)
    fissure = cerebrum & (np.abs(x) < 1.3) & (z > f32(-5.0)) & (depth < 45)
    tissue[cb] = 0.5 + 0.06 * np.cos(z[cb] * 1.4)         # cerebellar folia
    tissue[stem] = 0.44
    deep = np.zeros(shape, bool)
    for sx in (-1, 1):
        deep |= ((x - f32(sx * 11 * g)) / f32(8 * g)) ** 2 + ((y + f32(8 * g)) / f32(13 * g)) ** 2 + \
            ((z - f32(2 * g)) / f32(9 * g)) ** 2 <= 1.0      # thalamus
        deep |= ((x - f32(sx * 21 * g)) / f32(7 * g)) ** 2 + ((y - f32(9 * g)) / f32(13 * g)) ** 2 + \
            ((z - f32(4 * g)) / f32(9 * g)) ** 2 <= 1.0      # basal ganglia
    tissue[deep] = 0.5
    vent = np.zeros(shape, bool)
    for sx in (-1, 1):
        vy = y / f32(30 * g)
        vent |= ((x - f32(sx * 7.5 * g)) / f32(5.5 * g)) ** 2 + vy ** 2 + \
            ((z - f32(16 * g) + f32(8 * g) * vy ** 2) / f32(8 * g)) ** 2 <= 1.0
    vent |= (np.abs(x) < f32(2.0)) & (np.abs(y + f32(4)) < f32(14 * g)) & (z < f32(8 * g)) & (z > f32(-6 * g))
    csf = (sulci | fissure | vent) & brain
    tissue[csf] = 0.06
    # white matter available for lesions: not cortex/sulci/deep/ventricles, away from them by 1 voxel
    wm = cerebrum & ~gm & ~csf & ~deep & (depth > 6.0)
    wm = ndimage.binary_erosion(wm, iterations=1)
    vent_near = ndimage.binary_dilation(vent, iterations=1)
    wm &= ~vent_near

    # ---- lesions
    instances = np.zeros(shape, np.uint16)
    forbid = np.zeros(shape, bool)                        # dilated (26-nbh) existing lesions
    st26 = np.ones((3, 3, 3), bool)
    targets = []
    bracket_targets = [(1, 9), (20, 300), (480, 900), (1150, 1700)]
    for b in (3, 2, 1, 0):                                # biggest first
        for _ in range(lesions_per_bracket[b]):
            targets.append((b, int(rng.integers(*bracket_targets[b]))))
    sp = np.array([thk, pixel_mm, pixel_mm])              # mm per (k, j, i)
    wm_depth = ndimage.distance_transform_edt(wm, sampling=sp)   # mm to the nearest non-WM voxel
    lesions = []
    lesion_id = 0
    for b, target in targets:
        placed = False
        r_eq = (target * float(np.prod(sp)) * 3 / (4 * math.pi)) ** (1 / 3)
        wm_idx = np.argwhere(wm_depth >= min(0.8 * r_eq, float(wm_depth.max()) * 0.8))
        for _attempt in range(300):
            c = wm_idx[rng.integers(len(wm_idx))]
            if b == 0:
                vox = _grow_blob(rng, c, target, shape)
            else:
                vol_mm3 = target * float(np.prod(sp))
                ax_r = rng.uniform(0.6, 1.6, 3)
                ax_r *= (vol_mm3 / (4.0 / 3.0 * math.pi * np.prod(ax_r))) ** (1 / 3)
                vox = _ellipsoid_voxels(rng, c, ax_r, sp, shape, target)
            if vox is None:
                continue
            kk, jj, ii = vox.T
            if b > 0 and not wm[kk, jj, ii].all():
                # conform a large lesion to the white matter: keep its biggest 26-connected part
                if wm[kk, jj, ii].mean() < 0.8:
                    continue
                vox = _largest_component(vox[wm[kk, jj, ii]], shape)
                kk, jj, ii = vox.T
            if not (LESION_BRACKETS[b][0] <= len(vox) < LESION_BRACKETS[b][1]):
                continue
            if not wm[kk, jj, ii].all() or forbid[kk, jj, ii].any():
                continue
            lesion_id += 1
            instances[kk, jj, ii] = lesion_id
            box = tuple(slice(max(v.min() - 2, 0), v.max() + 3) for v in (kk, jj, ii))
            forbid[box] |= ndimage.binary_dilation(instances[box] == lesion_id, st26, iterations=2)
            cen = img.ijk_to_ras_points([[ii.mean(), jj.mean(), kk.mean()]])[0]
            lesions.append({"id": lesion_id, "voxels": int(len(vox)), "bracket_index": b,
                            "bracket": _bracket_name(b), "centroid_ras": tuple(float(v) for v in cen)})
            placed = True
            break
        if not placed:
            raise RuntimeError(f"could not place a lesion of {target} voxels (seed {seed})")
    lesion_mask = instances > 0
    lesion_int = np.zeros(shape, np.float32)
    for les in lesions:
        lesion_int[instances == les["id"]] = rng.uniform(0.8, 0.98)
    tissue = np.where(lesion_mask, lesion_int, tissue)

    brain_mask = brain.copy()
    if not skull_stripped:
        rho_s = np.sqrt((x / f32(R[0])) ** 2 + (y / f32(R[1])) ** 2 + (z / f32(R[2])) ** 2)
        dist = (rho_s - 1.0) * np.sqrt(x * x + y * y + z * z) / np.maximum(rho_s, f32(1e-3))
        outside = ~brain & (z > f32(-75 * g))
        layers = [(3.0, 0.05), (4.5, 0.03), (7.0, 0.45), (8.5, 0.03), (14.0, 0.78), (16.0, 0.4)]
        lo = -1e9
        for hi, val in layers:
            tissue[outside & (dist > lo) & (dist <= hi)] = val
            lo = hi
    arr = _finish(tissue, (X, Y, Z), rng, bias=bias, noise=noise, blur=0.0, bias_scale=100.0)
    if skull_stripped:  # brain-extraction tools set everything outside the brain to 0
        arr[~brain_mask] = 0.0
    labels = lesion_mask.astype(np.uint8)
    return Phantom(
        task="brain-wmh", image=img.with_array(arr), labels=img.with_array(labels), points=[],
        extra={"lesions": lesions, "instances": instances, "brain_mask": brain_mask,
               "brackets": [_bracket_name(b) for b in range(4)], "skull_stripped": skull_stripped,
               "slice_thickness_mm": thk, "label_names": {1: "lesion"}},
        description=(f"axial FLAIR-like brain{'' if skull_stripped else ' with skull'}, {len(lesions)} "
                     f"lesions, {shape} voxels, spacing {spacing} mm, seed {seed}"))


def _largest_component(vox, shape):
    lo = vox.min(0)
    box = np.zeros(tuple(vox.max(0) - lo + 1), bool)
    box[tuple((vox - lo).T)] = True
    lab, n = ndimage.label(box, np.ones((3, 3, 3), bool))
    if n > 1:
        keep = np.argmax(np.bincount(lab.ravel())[1:]) + 1
        box = lab == keep
    return np.argwhere(box) + lo


def _grow_blob(rng, c, n, shape):
    """n face-connected voxels grown from c (a tiny lesion)."""
    vox = [tuple(int(v) for v in c)]
    seen = set(vox)
    steps = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    while len(vox) < n:
        base = vox[rng.integers(len(vox))]
        st = steps[rng.integers(6)]
        q = (base[0] + st[0], base[1] + st[1], base[2] + st[2])
        if q in seen or not all(0 <= q[d] < shape[d] for d in range(3)):
            continue
        seen.add(q)
        vox.append(q)
    return np.array(vox)


def _ellipsoid_voxels(rng, c, radii_mm, sp, shape, target):
    """Voxels of a randomly rotated, slightly lumpy ellipsoid centred on voxel c; its size is
    rescaled (a few secant steps) so the voxel count lands near ``target``."""
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    bumps = rng.normal(0, 0.08, 3)
    reach = np.ceil(radii_mm.max() * 1.5 / sp).astype(int) + 1
    lo = np.maximum(np.asarray(c) - reach, 0)
    hi = np.minimum(np.asarray(c) + reach + 1, shape)
    kk, jj, ii = np.meshgrid(*(np.arange(lo[d], hi[d]) for d in range(3)), indexing="ij")
    off = np.stack([(kk - c[0]) * sp[0], (jj - c[1]) * sp[1], (ii - c[2]) * sp[2]], -1) @ rot
    q = np.sqrt(((off / radii_mm) ** 2).sum(-1))
    ang = np.arctan2(off[..., 1], off[..., 0])
    q = q * (1.0 + bumps[0] * np.cos(2 * ang) + bumps[1] * np.sin(3 * ang) + bumps[2] * off[..., 2] / radii_mm[2])
    qs = np.sort(q.ravel())
    if target >= len(qs):
        return None
    thr = 0.5 * (qs[target - 1] + qs[target]) if target < len(qs) else qs[-1]
    if thr > 1.4:
        return None  # clipped by the grid edge
    inside = q <= thr
    pts = np.argwhere(inside) + lo
    # keep the component containing the centre (lumps can detach a few voxels)
    lab, _ = ndimage.label(inside, np.ones((3, 3, 3)))
    keep = lab[tuple(np.asarray(c) - lo)]
    if keep == 0:
        return None
    return np.argwhere(lab == keep) + lo if len(pts) else None


# ------------------------------------------------------------------------------------------------
# X-ray (AP pelvis / hip)
# ------------------------------------------------------------------------------------------------

_FONT = {
    "A": ".###.#...##...#######...##...##...#", "P": "####.#...##...#####.#....#....#....",
    "E": "######....#....####.#....#....#####", "L": "#....#....#....#....#....#....#####",
    "V": "#...##...##...##...##...#.#.#...#..", "I": ".###...#....#....#....#....#...###.",
    "S": ".#####....#.....###.....#....#####.", "R": "####.#...##...#####.#.#..#..#.#...#",
    "H": "#...##...##...#######...##...##...#", "K": "#...##..#.#.#..##...#.#..#..#.#...#",
    "M": "#...###.###.#.##.#.##...##...##...#", "T": "#####..#....#....#....#....#....#..",
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####", "3": "#####...#...#.....#.....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#...#..##..",
    " ": "." * 35, ":": ".......#....#.........#....#.......", "-": "................###................",
    ".": "................................#..", "/": "....#....#...#...#...#...#....#....",
}


def _text_mask(text, px):
    """Boolean mask of ``text`` in a 5x7 bitmap font, each font dot ``px`` pixels."""
    cols = []
    for ch in text.upper():
        bits = _FONT.get(ch, _FONT[" "])
        glyph = np.array([c == "#" for c in bits[:35]], bool).reshape(7, 5)
        cols.append(np.pad(glyph, ((0, 0), (0, 1))))
    m = np.concatenate(cols, 1)
    return np.kron(m, np.ones((px, px), bool))


def xray_femur_phantom(seed=0, *, view="pelvis", shape=None, pixel_mm=None, side="right",
                       intensity_range="unit", noise=None, classes="femur") -> Phantom:
    """AP radiograph (single-slice Image, shape (1, H, W)); bone bright.

    ``view``: "pelvis" (both hips; default 512x512 at 0.7 mm) or "hip" (one hip, ``side``; default
    384x384 at 0.5 mm). ``intensity_range``: "unit" (0..1) or "uint16" (0..65535, integer-valued
    float32). ``classes``: "femur" (label 1 = femur, every proximal femur in the field) or
    "pelvis" (1 femur, 2 hip bone, 3 sacrum; where they overlap in projection the femur wins over
    the hip bone, the hip bone over the sacrum); the image is the same for both.
    ``extra["femoral_heads"]``: list of {centre_ras, centre_ij, diameter_mm, side}.
    """
    if view not in ("pelvis", "hip"):
        raise ValueError("view must be 'pelvis' or 'hip'")
    if classes not in ("femur", "pelvis"):
        raise ValueError("classes must be 'femur' or 'pelvis'")
    if intensity_range not in ("unit", "uint16"):
        raise ValueError("intensity_range must be 'unit' or 'uint16'")
    rng = np.random.default_rng(seed)
    if shape is None:
        shape = (512, 512) if view == "pelvis" else (384, 384)
    if pixel_mm is None:
        pixel_mm = 0.7 if view == "pelvis" else 0.5
    h_n, w_n = shape
    # i (columns) -> patient left, j (rows) -> feet, k -> posterior (detector behind the patient)
    direction = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    centre_lps = np.array([rng.uniform(-10, 10), 120.0, 950.0 + rng.uniform(-20, 20)])
    origin = _origin_for_centre(centre_lps, direction, (pixel_mm, pixel_mm, 1.0), (w_n, h_n, 1))
    img = Image(np.zeros((1, h_n, w_n), np.float32), (pixel_mm, pixel_mm, 1.0), origin, direction)

    # image-plane mm coordinates: u toward image right (= patient left), w toward image bottom
    jj, ii = np.meshgrid(np.arange(h_n, dtype=np.float64), np.arange(w_n, dtype=np.float64), indexing="ij")
    u_img = (ii - (w_n - 1) / 2) * pixel_mm
    w_img = (jj - (h_n - 1) / 2) * pixel_mm
    # pose: image = centre + scale * Rot(theta) @ anatomy ; anatomy (lx toward patient left, sz up)
    scale = rng.uniform(0.92, 1.1)
    theta = math.radians(rng.uniform(-6, 6))
    if view == "pelvis":
        centre = np.array([rng.uniform(-12, 12), rng.uniform(-10, 30)])   # head-midpoint position
    else:
        centre = np.array([(1 if side == "right" else -1) * 105.0 + rng.uniform(-10, 10),
                           rng.uniform(-15, 10)])
    du = u_img - centre[0]
    dw = w_img - centre[1]
    ct, st = math.cos(theta), math.sin(theta)
    lx = (ct * du + st * dw) / scale
    sz = -(-st * du + ct * dw) / scale                     # superior up

    def chord_ellipsoid(cx, cz, rx, rz, depth):
        q = 1.0 - ((lx - cx) / rx) ** 2 - ((sz - cz) / rz) ** 2
        return 2.0 * depth * np.sqrt(np.clip(q, 0, None))

    def seg_dist(p0, p1):
        d = np.asarray(p1, float) - np.asarray(p0, float)
        L2 = float(d @ d)
        tt = np.clip(((lx - p0[0]) * d[0] + (sz - p0[1]) * d[1]) / L2, 0, 1)
        return np.hypot(lx - p0[0] - tt * d[0], sz - p0[1] - tt * d[1]), tt

    def tube(p0, p1, r0, r1, cortex):
        dist, tt = seg_dist(p0, p1)
        r = r0 + (r1 - r0) * tt
        outer = 2 * np.sqrt(np.clip(r ** 2 - dist ** 2, 0, None))
        rin = np.maximum(r - cortex, 0.5)
        inner = 2 * np.sqrt(np.clip(rin ** 2 - dist ** 2, 0, None))
        return outer - 0.7 * inner, dist <= r                 # cortical shell projects bright

    half_d = rng.uniform(80, 92)
    femur_path = np.zeros(shape)
    femur_mask = np.zeros(shape, bool)
    heads = []
    sides = ("right", "left") if view == "pelvis" else (side,)
    for sd in sides:
        sg = -1.0 if sd == "right" else 1.0               # lx sign of that side (+ = patient left)
        hc = np.array([sg * half_d, 0.0])
        r_head = rng.uniform(21.5, 25.0)
        nsa = math.radians(rng.uniform(123, 138))          # neck-shaft angle
        foreshort = rng.uniform(0.75, 1.0)                 # femoral rotation shortens the neck
        add = math.radians(rng.uniform(3, 9))              # shaft adduction
        shaft_dir = np.array([-sg * math.sin(add), -math.cos(add)])   # downward, slightly medial
        neck_dir = np.array([sg * math.sin(nsa - add) * 1.0, math.cos(nsa - add) * -1.0])
        neck_dir[1] = -abs(neck_dir[1])
        neck_dir /= np.linalg.norm(neck_dir)
        q = hc + neck_dir * 52.0 * foreshort               # neck-shaft junction
        shaft_end = q + shaft_dir * 400.0
        # cancellous head (less dense) inside a thin cortical shell
        head = 0.45 * chord_ellipsoid(hc[0], hc[1], r_head, r_head, r_head) + 0.55 * (
            chord_ellipsoid(hc[0], hc[1], r_head, r_head, r_head)
            - chord_ellipsoid(hc[0], hc[1], r_head - 2.5, r_head - 2.5, r_head - 2.5))
        head_mask = ((lx - hc[0]) ** 2 + (sz - hc[1]) ** 2) <= r_head ** 2
        neck, neck_m = tube(hc, q, 15.0, 19.0, 4.0)
        shaft, shaft_m = tube(q + shaft_dir * 10.0, shaft_end, 17.0, 14.0, 6.0)
        gt_c = q + np.array([sg * 16.0, 6.0]) + shaft_dir * 4.0
        gt = chord_ellipsoid(gt_c[0], gt_c[1], 17.0, 22.0, 9.0)
        gt_m = gt > 0
        lt_c = q + shaft_dir * 38.0 + np.array([-sg * 15.0 * (0.6 + 0.4 * foreshort), 0.0])
        lt = chord_ellipsoid(lt_c[0], lt_c[1], 8.0, 10.0, 6.0)
        lt_m = lt > 0
        meta_c = q + shaft_dir * 14.0
        meta = chord_ellipsoid(meta_c[0], meta_c[1], 24.0, 26.0, 9.0)
        meta_m = meta > 0
        part = np.maximum.reduce([head, neck, shaft, gt, lt, meta])
        femur_path = np.maximum(femur_path, part)
        femur_mask |= head_mask | neck_m | shaft_m | gt_m | lt_m | meta_m
        heads.append((sd, hc, r_head))

    # pelvis (thin plates: iliac wings, acetabular roofs, obturator rings, sacrum, L5)
    pel = np.zeros(shape)
    hip_mask = np.zeros(shape, bool)
    for sd in ("right", "left"):
        sg = -1.0 if sd == "right" else 1.0
        hx = sg * half_d
        wing = chord_ellipsoid(sg * (half_d + 8), 85.0, 70.0, 78.0, 7.0) * (sz > 18.0)
        wing *= (np.abs(lx) > 38.0)
        pel = np.maximum(pel, wing)
        crest = np.abs(np.hypot((lx - sg * (half_d + 8)) / 70.0, (sz - 85.0) / 78.0) - 0.97) < 0.03
        pel = np.maximum(pel, 12.0 * (crest & (sz > 40)))
        hip_mask |= (wing > 0) | (crest & (sz > 40))
        acet_r = np.hypot(lx - hx, sz)
        roof = (acet_r > 24.5) & (acet_r < 34.0) & (sz > -8.0)
        pel = np.maximum(pel, np.where(roof, 22.0 - np.abs(acet_r - 28.0) * 1.5, 0))
        hip_mask |= roof & (22.0 - np.abs(acet_r - 28.0) * 1.5 > 0)
        # obturator foramen (tilted oval hole) framed by the pubic and ischial rami
        obt_c = (sg * (half_d - 40.0), -50.0)
        ca_, sa_ = math.cos(sg * 0.5), math.sin(sg * 0.5)
        ou = (lx - obt_c[0]) * ca_ + (sz - obt_c[1]) * sa_
        ov = -(lx - obt_c[0]) * sa_ + (sz - obt_c[1]) * ca_
        ring_o = (ou / 36.0) ** 2 + (ov / 30.0) ** 2 <= 1.0
        ring_i = (ou / 26.0) ** 2 + (ov / 19.0) ** 2 <= 1.0
        rami = ring_o & ~ring_i & (np.abs(lx) > 2.5)
        pel = np.maximum(pel, np.where(rami, 9.0, 0.0))
        # bone between acetabulum and rami
        body = chord_ellipsoid(sg * (half_d - 8.0), -12.0, 26.0, 22.0, 6.0)
        pel = np.maximum(pel, body)
        brim = np.abs(np.hypot(lx / 62.0, (sz - 32.0) / 52.0) - 1.0) < 0.05
        pel = np.maximum(pel, 10.0 * (brim & (sz < 70) & (sz > -20)))
        hip_mask |= rami | (body > 0) | (brim & (sz < 70) & (sz > -20))
    sac_w = np.clip((sz - 10.0) / 100.0, 0, 1) * 50.0 + 14.0
    sacrum = (np.abs(lx) < sac_w) & (sz > 10.0) & (sz < 118.0)
    sac = 10.0 * sacrum
    for lvl in range(4):
        for sg in (-1, 1):
            hole = np.hypot(lx - sg * (16.0 - 2.5 * lvl), sz - (100.0 - 22.0 * lvl)) < 5.0
            sac = np.where(hole, 4.0, sac)
    pel = np.maximum(pel, sac)
    l5 = chord_ellipsoid(0.0, 142.0, 28.0, 15.0, 12.0) * (np.abs(sz - 142.0) < 13.0)
    pel = np.maximum(pel, l5)

    # soft tissue thickness (body ~ elliptic in axial section), bowel gas
    soft = 220.0 * np.sqrt(np.clip(1.0 - (lx / 175.0) ** 2, 0, None)) * np.clip(1.0 - (sz - 80) / 400.0, 0.6, 1.2)
    soft *= np.clip((np.abs(lx) < 175.0), 0, 1)
    gap_w = 14.0 + np.clip(-95.0 - sz, 0, None) * 0.35          # perineum between the thighs
    soft *= 1.0 - 0.6 * np.clip((-85.0 - sz) / 30.0, 0, 1) * np.exp(-(lx / gap_w) ** 4)
    gas = np.zeros(shape)
    for _ in range(int(rng.integers(3, 8))):
        gc = (rng.uniform(-90, 90), rng.uniform(40, 160))
        gas += 40.0 * np.exp(-((lx - gc[0]) ** 2 + (sz - gc[1]) ** 2) / (2 * rng.uniform(6, 14) ** 2))
    soft = np.clip(soft - gas, 0, None)

    mu_soft, mu_bone = 0.0028, 0.05                       # per mm (soft tissue, bone)
    att = mu_soft * soft + mu_bone * (pel + femur_path)
    exposure = rng.uniform(0.75, 1.3)
    disp = 1.0 - np.exp(-att * exposure)
    disp = disp ** rng.uniform(0.8, 1.25)
    disp = ndimage.gaussian_filter(disp, 0.8)
    noise_sd = rng.uniform(0.01, 0.03) if noise is None else float(noise)
    disp = disp + rng.normal(0, noise_sd, shape)
    # collimation: shutters on each edge show as flat bright (or dark) bands
    m_top, m_bot = rng.integers(0, int(0.06 * h_n) + 1, 2)
    m_l, m_r = rng.integers(0, int(0.06 * w_n) + 1, 2)
    coll = np.zeros(shape, bool)
    coll[:m_top, :] = True
    coll[h_n - m_bot:, :] = True
    coll[:, :m_l] = True
    coll[:, w_n - m_r:] = True
    coll_val = 0.93 if rng.uniform() < 0.6 else 0.04
    disp = np.where(coll, coll_val + rng.normal(0, 0.005, shape), disp)
    # burn-in text: a side marker and a caption in the upper corners
    px = max(2, int(round(1.6 / pixel_mm)))
    marker = _text_mask("R", px * 2)
    caption = _text_mask(f"AP {'PELVIS' if view == 'pelvis' else 'HIP'} {int(rng.integers(60, 90))}KV", px)
    y0 = m_top + 6
    for mask_t, x0 in ((marker, m_l + 8), (caption, w_n - m_r - 8 - caption.shape[1])):
        hh, ww = mask_t.shape
        if x0 >= 0 and y0 + hh < h_n:
            sub = disp[y0:y0 + hh, x0:x0 + ww]
            disp[y0:y0 + hh, x0:x0 + ww] = np.where(mask_t[:, :sub.shape[1]], 0.98, sub)
    disp = np.clip(disp, 0.0, 1.0)
    if intensity_range == "uint16":
        disp = np.round(disp * 65535.0)
    labels = (femur_mask & ~coll).astype(np.uint8)
    if classes == "pelvis":
        labels[(labels == 0) & hip_mask & ~coll] = 2
        labels[(labels == 0) & sacrum & ~coll] = 3

    head_list = []
    for sd, hc, r_head in heads:
        # anatomy -> image-plane mm -> voxel indices -> RAS
        p = centre + scale * np.array([ct * hc[0] - st * (-hc[1]), st * hc[0] + ct * (-hc[1])])
        i_c = p[0] / pixel_mm + (w_n - 1) / 2
        j_c = p[1] / pixel_mm + (h_n - 1) / 2
        ras = img.ijk_to_ras_points([[i_c, j_c, 0.0]])[0]
        head_list.append({"side": sd, "centre_ras": tuple(float(v) for v in ras),
                          "centre_ij": (float(i_c), float(j_c)), "diameter_mm": float(2 * r_head * scale)})
    arr = disp.astype(np.float32)[None]
    return Phantom(
        task="xray-femur", image=img.with_array(arr), labels=img.with_array(labels[None]), points=[],
        extra={"femoral_heads": head_list, "view": view, "intensity_range": intensity_range,
               "collimation_px": {"top": int(m_top), "bottom": int(m_bot), "left": int(m_l), "right": int(m_r)},
               "label_names": {1: "femur"} if classes == "femur" else {1: "femur", 2: "hip bone", 3: "sacrum"}},
        description=f"AP {view} radiograph, {shape} pixels at {pixel_mm} mm, seed {seed}")


def xray_pelvis_phantom(seed=0, **kw) -> Phantom:
    """The AP pelvis radiograph with multi-class labels (1 femur, 2 hip bone, 3 sacrum)."""
    ph = xray_femur_phantom(seed, classes="pelvis", **kw)
    ph.task = "xray-multiclass"
    return ph


# ------------------------------------------------------------------------------------------------

_GENERATORS = {
    "knee-bones": knee_phantom,
    "lumbar-foramina": spine_phantom,
    "brain-wmh": brain_phantom,
    "xray-femur": xray_femur_phantom,
    "xray-multiclass": xray_pelvis_phantom,
}


def make_phantom(task: str, seed=0, **kw) -> Phantom:
    """Dispatch by task name (one of PHANTOM_TASKS)."""
    try:
        gen = _GENERATORS[task]
    except KeyError:
        raise ValueError(f"unknown phantom task {task!r}; expected one of {PHANTOM_TASKS}") from None
    return gen(seed=seed, **kw)
