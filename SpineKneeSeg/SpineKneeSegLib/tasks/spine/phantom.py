"""Sagittal lumbar MRI phantom (L1-L5 bodies, foramina, optional transitional anatomy) with exact labels.
Shares no code with the methods it tests (conventions: core/phantoms.py)."""
from __future__ import annotations

import math

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.phantoms import (
    Phantom,
    cortical_rim,
    finish_scan,
    origin_for_centre,
    sagittal_direction,
)


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
    direction = sagittal_direction(k_toward == "right")
    if tilt_deg:
        t = math.radians(tilt_deg)        # rotation about the LPS x (left-right) axis
        rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
        direction = rx @ direction
    centre_ras = np.array([rng.uniform(-8, 8), rng.uniform(-10, 10), 980.0 + rng.uniform(-20, 20)])
    origin = origin_for_centre(centre_ras * np.array([-1, -1, 1]), direction, spacing, (i_n, j_n, k_n))
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
    tissue[cortical_rim(bone & (tissue > 0.35) & (tissue < 0.6), 2)] = 0.08
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
    arr = finish_scan(tissue, coords, rng, bias=bias, noise=noise, blur=0.5, bias_scale=120.0)
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
