"""Radiograph phantoms: AP pelvis / hip with exact femur, hip-bone and sacrum masks; PA chest with
exact lung, heart and (overlapping) clavicle masks.
Shares no code with the methods it tests (conventions: core/phantoms.py)."""
from __future__ import annotations

import math

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.core.phantoms import (
    Phantom,
    origin_for_centre,
    text_mask,
)

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py): a refused input does not wait for it


def xray_femur_phantom(seed=0, *, view="pelvis", shape=None, pixel_mm=None, side="right",
                       intensity_range="unit", noise=None, classes="femur", background=None) -> Phantom:
    """AP radiograph (single-slice Image, shape (1, H, W)); bone bright.

    ``view``: "pelvis" (both hips; default 512x512 at 0.7 mm) or "hip" (one hip, ``side``; default
    384x384 at 0.5 mm). ``intensity_range``: "unit" (0..1) or "uint16" (0..65535, integer-valued
    float32). ``classes``: "femur" (label 1 = femur, every proximal femur in the field) or
    "pelvis" (1 femur, 2 hip bone, 3 sacrum; where they overlap in projection the femur wins over
    the hip bone, the hip bone over the sacrum); the image is the same for both.
    ``extra["femoral_heads"]``: list of {centre_ras, centre_ij, diameter_mm, side}.
    ``background``: a real radiograph's display values (2D, 0..1, bone bright; resized to ``shape``)
    in place of the drawn soft tissue, gas, gamma and noise: the drawn bones' transmission
    multiplies the real one, so the image keeps that radiograph's texture, noise and blur.
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
    origin = origin_for_centre(centre_lps, direction, (pixel_mm, pixel_mm, 1.0), (w_n, h_n, 1))
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
    # drawn bones over a real radiograph: transmissions multiply (the drawn image above is still
    # made: its random draws keep the seed's collimation and text the same with any background)
    if background is not None:
        real = np.clip(np.asarray(background, np.float64), 0.0, 1.0)
        real = ndimage.zoom(real, (h_n / real.shape[0], w_n / real.shape[1]), order=1)[:h_n, :w_n]
        bones = ndimage.gaussian_filter(np.exp(-mu_bone * (pel + femur_path) * exposure), 0.8)
        disp = 1.0 - (1.0 - real) * bones
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
    marker = text_mask("R", px * 2)
    caption = text_mask(f"AP {'PELVIS' if view == 'pelvis' else 'HIP'} {int(rng.integers(60, 90))}KV", px)
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


def xray_chest_phantom(seed=0, *, shape=(512, 512), pixel_mm=0.7) -> Phantom:
    """PA chest radiograph (single-slice Image, shape (1, H, W)) in the usual display (air and lungs
    dark, bone bright; patient right on the image's left). Labels 1 right lung, 2 left lung, 3 heart;
    the clavicles overlap the lungs, so they are ``extra["layers"]["clavicles"]`` (4 right, 5 left)."""
    rng = np.random.default_rng(seed)
    h_n, w_n = shape
    direction = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # columns -> patient left, rows -> feet
    origin = origin_for_centre(np.array([0.0, 150.0, 1300.0]), direction, (pixel_mm, pixel_mm, 1.0), (w_n, h_n, 1))
    img = Image(np.zeros((1, h_n, w_n), np.float32), (pixel_mm, pixel_mm, 1.0), origin, direction)
    jj, ii = np.meshgrid(np.arange(h_n, dtype=np.float64), np.arange(w_n, dtype=np.float64), indexing="ij")
    u = (ii - (w_n - 1) / 2) * pixel_mm + rng.uniform(-8, 8)  # toward patient left
    v = (jj - (h_n - 1) / 2) * pixel_mm + rng.uniform(-8, 8)  # toward the feet
    scale = rng.uniform(0.9, 1.1)
    u, v = u / scale, v / scale

    def ellipse(cu, cv, ru, rv):
        return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0

    body = ellipse(0, 20, 165, 230)
    right_lung = ellipse(-70, -10, 55, 120) & (v < 110 - 0.3 * (u + 70))
    left_lung = ellipse(72, 0, 50, 115) & (v < 115 + 0.3 * (u - 72))
    heart = ellipse(25, 70, 62, 55)
    right_lung &= ~heart
    left_lung &= ~heart
    labels = np.zeros((h_n, w_n), np.uint8)
    labels[right_lung], labels[left_lung], labels[heart] = 1, 2, 3
    clavicles = np.zeros((h_n, w_n), np.uint8)
    for value, sign in ((4, -1.0), (5, 1.0)):  # a bar from the sternum out over the lung apex
        t = np.clip((sign * u - 15) / 95, 0, 1)
        centre_v = -125 + 18 * t + rng.uniform(-4, 4)
        bar = (np.abs(v - centre_v) < 7) & (sign * u > 15) & (sign * u < 110)
        clavicles[bar] = value
    tissue = 0.45 * body + 0.25 * heart - 0.3 * (right_lung | left_lung)
    tissue += 0.35 * (np.abs(u) < 14) * body  # spine and mediastinum
    for k in range(9):  # posterior ribs: thin bright arcs across the lungs
        arc = np.abs(v - (-110 + 25 * k) - 0.0025 * u ** 2) < 3.0
        tissue += 0.12 * (arc & body)
    tissue += 0.3 * (clavicles > 0)
    tissue = ndimage.gaussian_filter(tissue, 1.2 / pixel_mm) + rng.normal(0, 0.02, tissue.shape)
    img.array[0] = np.clip(tissue, 0, None).astype(np.float32)
    layer = Image(clavicles[None], img.spacing, img.origin, img.direction)
    return Phantom("xray-chest", img, Image(labels[None], img.spacing, img.origin, img.direction),
                   extra={"layers": {"clavicles": layer}},
                   description="PA chest radiograph phantom: lungs, heart, overlapping clavicles")


# ------------------------------------------------------------------------------------------------
