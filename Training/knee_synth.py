"""Label-map-driven knee MRI synthesis (the SynthSeg idea: Billot et al., MedIA 86:102789, 2023).

Pure torch (a lent GPU's image has no SimpleITK or MONAI): every random choice is drawn from a
torch.Generator, every operation runs on the label volumes' device. Written by hand because no
library synthesises 2D slices through a 3D label map with per-slice partial volume.

A prepared label volume (``KneeVolume``) is an LPS-aligned uint8 array (z=S, y=P, x=L order)
at isotropic spacing whose values are: 0 unlabelled, 1 femur, 2 tibia, 3 fibula, 4 patella, 5.. other
structures (muscle, cartilage, vessels... each its own random intensity).

One synthetic sample = a 2D slice (network_px x network_px) through a randomly deformed copy of
the volume, in the canonical orientation inference shows the network (preprocessing.CANONICAL_AXES):
sagittal (rows down, cols posterior) or coronal (rows down, cols to patient left), with
- a random square window (side ``fov_mm``) near the joint centre, random rotation, anisotropic
  scale, smooth elastic displacement, left/right mirroring (right <-> left knee);
- a slab of ``thickness_mm`` sampled at several sub-planes and averaged (partial volume);
- the unlabelled region split into random smooth pseudo-tissues (fat, muscle, air...);
- a dark cortical rim of random width on every bone (cortex has no MR signal in any contrast);
- optionally (``distractor_p``) bone-like distractors: smooth-edged blobs over non-bone pixels, most
  with a bone's own marrow intensity and a dark rim, labelled background (real muscle bellies look like
  that; only shape and position make a bone);
- optionally (``fascia_p``, ``streak_p``) lines in the soft tissues: 1-px fascia between them and
  thin fibre-like streaks, mostly dark (real muscle has both; without them a dark rim means bone);
- random per-tissue intensity and texture, blur, resolution loss, multiplicative bias field,
  gamma, Rician noise, zero padding where the window leaves the field of view;
- per-slice z-score over the same foreground rule inference uses, then intensity jitter (the
  network sees per-volume z-scores at inference); padding takes the minimum, as in inference.
Target: the bone labels (0..4) at the slab's central plane.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BONES = 4  # label values 1..4 = femur, tibia, fibula, patella (project-wide knee labels)

# canonical (slice normal, row, col) in LPS, as SpineKneeSegLib.engine.preprocessing.CANONICAL_AXES
PLANES = {
    "sagittal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "coronal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),
    "axial": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),  # evaluation series only: never trained on
}


@dataclass
class KneeVolume:
    name: str
    labels: torch.Tensor  # (Z, Y, X) uint8, LPS-aligned: x to patient left, y posterior, z superior
    spacing_mm: float
    origin_lps: tuple[float, float, float]  # LPS of voxel (0, 0, 0)
    joint_centre_lps: tuple[float, float, float]
    bone_extent_lps: tuple[tuple[float, float], ...]  # (min, max) per LPS axis of femur/tibia/fibula
    n_labels: int  # largest label value + 1
    # a real image on the same grid (float16, scaled to its 99.5th percentile = 1) when the label map
    # comes with one: such samples are the real image, augmented, instead of a synthetic one
    image: torch.Tensor | None = None
    labelled: tuple[int, ...] = (1, 2, 3, 4)  # bones this map labels (e.g. OAI-ZIB: femur, tibia only)
    # tissue class of every label id (length n_labels; the four bones share one): structures of one
    # tissue (all muscles, all bone marrow) have one MR signal, as SynthSeg's generation classes.
    # None: every label its own class.
    tissue: tuple[int, ...] | None = None

    def to(self, device) -> "KneeVolume":
        return KneeVolume(self.name, self.labels.to(device), self.spacing_mm, self.origin_lps,
                          self.joint_centre_lps, self.bone_extent_lps, self.n_labels,
                          None if self.image is None else self.image.to(device), tuple(self.labelled),
                          None if self.tissue is None else tuple(self.tissue))


@dataclass
class SynthConfig:
    network_px: int = 224
    fov_mm: tuple[float, float] = (110.0, 200.0)  # square window side; inference uses 160 mm
    centre_jitter_mm: float = 25.0
    coronal_fraction: float = 0.3
    rotation_deg: tuple[float, float, float] = (15.0, 10.0, 10.0)  # in-plane, two out-of-plane tilts
    scale: tuple[float, float] = (0.85, 1.15)
    elastic_mm: float = 3.0
    through_plane_margin_mm: float = 10.0  # slab positions reach this far beyond the bones (outer slices)
    # beyond the label map's first/last labelled axial slice: "empty" (unlabelled pseudo-tissue: the
    # bones stop there) or "extend" (those slices continue along S-I: shafts and calf/thigh muscles go
    # on to the window's edge, as in a real knee series; the SPL atlas ends 32 mm below the fibula's top)
    beyond_volume: str = "empty"
    thickness_mm: tuple[float, float] = (0.5, 4.0)
    sub_planes: int = 5
    background_tissues: tuple[int, int] = (1, 5)
    cortex_px: tuple[int, int] = (0, 3)
    texture_sd: float = 0.08
    # share of samples in which structures of one tissue class (KneeVolume.tissue) share a mean
    # intensity, each within +-tissue_jitter of it; the rest draw every structure independently
    # (0 = the session 1-5 synthesis: every structure, every bone its own random intensity)
    shared_tissue_p: float = 0.0
    tissue_jitter: float = 0.05
    # share of samples with bone-like distractors (0 = none, and the session 1-6 random stream);
    # their count, semi-axes (mm) and the share of them that copy a bone's marrow and get a dark rim
    distractor_p: float = 0.0
    distractors: tuple[int, int] = (1, 4)
    distractor_mm: tuple[float, float] = (5.0, 25.0)
    distractor_mimic_p: float = 0.7
    # each of these bones moves on its own by a random offset (uniform in +-bone_shift_mm per LPS
    # axis) before the image is drawn, so its place relative to the other bones varies as between
    # people; one training anatomy otherwise teaches "fibula = whatever lies at that spot behind the
    # tibia". Its old place becomes unlabelled tissue; it never overwrites another bone. 0 = off
    # (and the old random stream)
    bone_shift_mm: float = 0.0
    shift_bones: tuple[int, ...] = (3,)
    # lines in the soft tissues, which flat synthetic tissues lack and real muscle has (DESS overlays:
    # thin dark fascia between muscle compartments, fat septa along the fibres). Without them "a region
    # inside a thin dark rim" only ever means bone with its cortex. fascia_p: share of samples whose
    # boundaries between two soft tissues get a 1-px line of its own intensity; streak_p: share whose
    # soft tissues carry thin lines along a random direction within streak_tilt_deg of S-I (fibres),
    # each tissue its own amplitude up to streak_amp; lines are dark with probability line_dark_p.
    # 0 = off (and the old random stream)
    fascia_p: float = 0.0
    streak_p: float = 0.0
    streak_amp: float = 0.3
    streak_mm: tuple[float, float] = (2.0, 8.0)  # cell of the random field across the fibres
    streak_length_mm: tuple[float, float] = (40.0, 120.0)  # ... and along them
    streak_tilt_deg: float = 30.0
    line_dark_p: float = 0.7
    blur_px: tuple[float, float] = (0.0, 1.2)
    downsample: tuple[float, float] = (1.0, 2.5)
    bias_sd: float = 0.35
    gamma_sd: float = 0.3
    noise_sd: tuple[float, float] = (0.0, 0.06)
    pad_fraction: float = 0.3  # share of samples whose window runs off the field of view
    jitter: tuple[float, float] = (0.2, 0.2)  # scale and shift after z-score
    extra: dict = field(default_factory=dict)


def _u(gen, lo, hi, n=(), device="cpu"):
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _rotation(ax: float, ay: float, az: float, device) -> torch.Tensor:
    """Rotation matrix from angles (radians) about the slice normal, row and col axes of the frame."""
    def about(axis, a):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        m = torch.eye(3, device=device)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m
    return about(0, ax) @ about(1, ay) @ about(2, az)


def _smooth_field(gen, shape_lo, size, device, channels=1):
    """Smooth random field: coarse Gaussian noise upsampled bicubically to ``size``."""
    coarse = torch.randn((1, channels, *shape_lo), generator=gen, device=device)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0]


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, 1, H, W) separable Gaussian blur."""
    if sigma < 0.2:
        return img
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, device=img.device, dtype=img.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def sample_geometry(vol: KneeVolume, cfg: SynthConfig, gen: torch.Generator, device, plane: str | None = None):
    """LPS sample points (sub_planes, H, W, 3) of one random slab, its thickness and plane."""
    n = cfg.network_px
    if plane is None:
        plane = "coronal" if float(_u(gen, 0, 1, device=device)) < cfg.coronal_fraction else "sagittal"
    normal, row, col = (torch.tensor(v, device=device) for v in PLANES[plane])
    angles = [math.radians(float(_u(gen, -a, a, device=device))) for a in cfg.rotation_deg]
    frame = torch.stack([normal, row, col], dim=1) @ _rotation(*angles, device)  # columns: n', r', c'
    normal, row, col = frame[:, 0], frame[:, 1], frame[:, 2]
    fov = float(_u(gen, *cfg.fov_mm, device=device))
    scale_r, scale_c = (float(_u(gen, *cfg.scale, device=device)) for _ in range(2))
    centre = torch.tensor(vol.joint_centre_lps, device=device)
    centre = centre + row * float(_u(gen, -1, 1, device=device)) * cfg.centre_jitter_mm
    centre = centre + col * float(_u(gen, -1, 1, device=device)) * cfg.centre_jitter_mm
    # through-plane: anywhere across the bones and a margin beyond: every slice of a knee series is seen
    lo_hi = torch.tensor(vol.bone_extent_lps, device=device)  # (3, 2)
    corners = torch.cartesian_prod(lo_hi[0], lo_hi[1], lo_hi[2])  # (8, 3)
    along = corners @ normal
    margin = cfg.through_plane_margin_mm
    s = float(_u(gen, float(along.min()) - margin, float(along.max()) + margin, device=device))
    centre = centre + normal * (s - float(centre @ normal))
    thickness = float(_u(gen, *cfg.thickness_mm, device=device))
    t = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n - 0.5
    rr, cc = torch.meshgrid(t * fov * scale_r, t * fov * scale_c, indexing="ij")
    if cfg.elastic_mm > 0:
        amp = float(_u(gen, 0, cfg.elastic_mm, device=device))
        disp = _smooth_field(gen, (5, 5), (n, n), device, channels=2) * amp
        rr, cc = rr + disp[0], cc + disp[1]
    offsets = (torch.linspace(-0.5, 0.5, cfg.sub_planes, device=device) * thickness
               if cfg.sub_planes > 1 else torch.zeros(1, device=device))
    pts = (centre + rr[..., None] * row + cc[..., None] * col)[None] + offsets[:, None, None, None] * normal
    return pts, thickness, plane, fov


def labelled_z_range(vol: KneeVolume) -> tuple[int, int]:
    """First and last axial (z) slice index holding any label (computed once per volume)."""
    if "_z_range" not in vol.__dict__:
        rows = torch.nonzero(vol.labels.amax(dim=(1, 2)) > 0).flatten()
        vol.__dict__["_z_range"] = (int(rows[0]), int(rows[-1])) if rows.numel() else (0, vol.labels.shape[0] - 1)
    return vol.__dict__["_z_range"]


def _volume_grid(vol: KneeVolume, pts: torch.Tensor, mirror: bool, extend: bool = False) -> torch.Tensor:
    origin = torch.tensor(vol.origin_lps, device=pts.device)
    idx = (pts - origin) / vol.spacing_mm  # (x, y, z) voxel coordinates
    size = torch.tensor(vol.labels.shape[::-1], device=pts.device, dtype=torch.float32)  # (X, Y, Z)
    if mirror:  # left/right mirror about the volume's centre: a right knee becomes a left one
        idx[..., 0] = size[0] - 1 - idx[..., 0]
    if extend:  # the first/last labelled axial slice continues along S-I
        idx[..., 2] = idx[..., 2].clamp(*labelled_z_range(vol))
    return (idx / (size - 1) * 2 - 1).reshape(1, 1, -1, 1, 3)


def sample_labels(vol: KneeVolume, pts: torch.Tensor, mirror: bool, extend: bool = False) -> torch.Tensor:
    """Nearest-neighbour labels at LPS points (..., 3); outside the volume = 0 (along S-I with
    ``extend``: the nearest labelled axial slice)."""
    grid = _volume_grid(vol, pts, mirror, extend)
    out = F.grid_sample(_float_labels(vol), grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out.reshape(pts.shape[:-1]).round().to(torch.long)


def _float_labels(vol: KneeVolume) -> torch.Tensor:
    """(1, 1, Z, Y, X) float copy of the label map for grid_sample, made once per volume: converting
    it on every call cost more than the sampling (0.055 of 0.097 s for the SPL atlas on one core)."""
    if "_labels_f" not in vol.__dict__:
        vol.__dict__["_labels_f"] = vol.labels[None, None].float()
    return vol.__dict__["_labels_f"]


def shift_bone(vol: KneeVolume, labels: torch.Tensor, pts: torch.Tensor, mirror: bool, extend: bool, bone: int,
               offset_lps: torch.Tensor) -> torch.Tensor:
    """``labels`` (sampled at ``pts``) with ``bone`` moved by ``offset_lps`` mm: where the bone was
    and no longer is becomes unlabelled (0); where it arrives it replaces anything but another bone."""
    moved = sample_labels(vol, pts - offset_lps, mirror, extend) == bone
    other_bone = (labels >= 1) & (labels <= BONES) & (labels != bone)
    labels = torch.where((labels == bone) & ~moved, 0, labels)
    return torch.where(moved & ~other_bone, bone, labels)


def sample_image(vol: KneeVolume, pts: torch.Tensor, mirror: bool, extend: bool = False) -> torch.Tensor:
    """Trilinear real-image values at LPS points (..., 3); outside the volume = 0 (``extend``: as
    sample_labels)."""
    src = vol.image[None, None].float()
    grid = _volume_grid(vol, pts, mirror, extend)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(pts.shape[:-1])


def _split_background(labels: torch.Tensor, n_labels: int, cfg: SynthConfig, gen) -> torch.Tensor:
    """Unlabelled voxels -> 1..K random smooth pseudo-tissues (ids n_labels .. n_labels+K-1)."""
    k = int(torch.randint(cfg.background_tissues[0], cfg.background_tissues[1] + 1, (1,), generator=gen,
                          device=labels.device))
    if k <= 1:
        return torch.where(labels == 0, n_labels, labels)
    res = int(torch.randint(3, 9, (1,), generator=gen, device=labels.device))
    fld = _smooth_field(gen, (res, res), labels.shape[-2:], labels.device)[0]
    edges = torch.quantile(fld.flatten()[::7], torch.linspace(0, 1, k + 1, device=labels.device)[1:-1])
    pseudo = n_labels + torch.bucketize(fld, edges)
    return torch.where(labels == 0, pseudo[None].expand_as(labels), labels)


def tissue_means(vol: KneeVolume, cfg: SynthConfig, gen, n_ids: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """(n_ids,) random mean intensity in [lo, hi] per label id: independent per id, or (with probability
    ``shared_tissue_p``, when the volume has tissue classes) one draw per tissue class plus a small
    per-structure jitter. Pseudo-tissues (ids >= n_labels) are always independent."""
    device = vol.labels.device
    means = _u(gen, lo, hi, (n_ids,), device)
    if vol.tissue is not None and cfg.shared_tissue_p > 0 and float(_u(gen, 0, 1, device=device)) < cfg.shared_tissue_p:
        tissue = torch.tensor(vol.tissue, device=device)
        shared = _u(gen, lo, hi, (int(tissue.max()) + 1,), device)[tissue]
        jitter = _u(gen, -cfg.tissue_jitter, cfg.tissue_jitter, (len(vol.tissue),), device)
        means[:len(vol.tissue)] = (shared + jitter).clamp(lo, hi)
    return means


def _rim(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(S, H, W) bool: pixels of ``mask`` within ``width`` pixels of its edge."""
    m = mask.float()[:, None]
    eroded = -F.max_pool2d(-m, 2 * width + 1, stride=1, padding=width)
    return (m - eroded)[:, 0] > 0.5


def _cortex(labels: torch.Tensor, width: int, rim_id: int, also: torch.Tensor | None = None) -> torch.Tensor:
    """Bone voxels within ``width`` pixels of the bone's edge -> ``rim_id`` (dark cortex); ``also``
    (label ids) get a rim of their own (bone-like distractors)."""
    if width <= 0:
        return labels
    rim = _rim((labels >= 1) & (labels <= BONES), width)
    if also is not None and also.numel():
        rim |= _rim(torch.isin(labels, also), width)
    return torch.where(rim, rim_id, labels)


def _distractors(labels: torch.Tensor, first_id: int, fov_mm: float, cfg: SynthConfig, gen) -> tuple[torch.Tensor, int]:
    """Paint 1..K smooth-edged random ellipses (ids first_id..) over the non-bone pixels of the slab
    (S, H, W); the target never sees them. Returns the labels and K."""
    device = labels.device
    n = labels.shape[-1]
    k = int(torch.randint(cfg.distractors[0], cfg.distractors[1] + 1, (1,), generator=gen, device=device))
    rr, cc = torch.meshgrid(torch.arange(n, device=device, dtype=torch.float32),
                            torch.arange(n, device=device, dtype=torch.float32), indexing="ij")
    bone = (labels >= 1) & (labels <= BONES)
    for i in range(k):
        a, b = (_u(gen, *cfg.distractor_mm, (2,), device) * n / fov_mm).unbind()
        theta = float(_u(gen, 0, math.pi, device=device))
        r0, c0 = _u(gen, 0, n, (2,), device).unbind()
        u = ((rr - r0) * math.cos(theta) + (cc - c0) * math.sin(theta)) / a
        v = (-(rr - r0) * math.sin(theta) + (cc - c0) * math.cos(theta)) / b
        wobble = _smooth_field(gen, (4, 4), (n, n), device)[0] * 0.2
        blob = torch.sqrt(u * u + v * v) + wobble < 1.0
        labels = torch.where(blob[None] & ~bone, first_id + i, labels)
    return labels, k


def soft_boundary(labels: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """(S, H, W) bool: ``soft`` pixels with a different soft label among their 8 neighbours, on one
    side of each boundary only (the lower id), so lines are 1 px wide; bones and cortex take no part."""
    lab = labels.float()[:, None]
    s = soft[:, None]
    higher = F.max_pool2d(torch.where(s, lab, -1.0), 3, stride=1, padding=1)
    return soft & (higher[:, 0] > labels)


def streak_lines(pts: torch.Tensor, centre: torch.Tensor, cfg: SynthConfig, gen) -> torch.Tensor:
    """(...) in [0, 1] at LPS points (..., 3): thin lines where a random 3D field, smooth over
    ``streak_length_mm`` along a direction within ``streak_tilt_deg`` of S-I and over ``streak_mm``
    across it, crosses zero (fibre-like fat septa, continuous across a slab's sub-planes)."""
    device = pts.device
    tilt = [math.radians(float(_u(gen, -cfg.streak_tilt_deg, cfg.streak_tilt_deg, device=device))) for _ in range(2)]
    q = (pts - centre) @ _rotation(*tilt, 0.0, device)  # third column: the fibre direction
    across = float(_u(gen, *cfg.streak_mm, device=device))
    cell = torch.tensor([across, across, float(_u(gen, *cfg.streak_length_mm, device=device))], device=device)
    flat = q.reshape(-1, 3)
    lo = flat.amin(dim=0)
    size = ((flat.amax(dim=0) - lo) / cell).ceil().long() + 2  # cells per axis, x y z
    noise = torch.randn((1, 1, int(size[2]), int(size[1]), int(size[0])), generator=gen, device=device)
    grid = (flat - lo) / cell / (size - 1) * 2 - 1
    g = F.grid_sample(noise, grid.reshape(1, 1, -1, 1, 3), mode="bilinear", align_corners=True)
    width = float(_u(gen, 0.05, 0.15, device=device))  # line width, in units of the field (~1 mm)
    return torch.exp(-(g.reshape(q.shape[:-1]) / width) ** 2)


def add_fascia(labels: torch.Tensor, soft: torch.Tensor, fascia_id: int, cfg: SynthConfig, gen):
    """With probability ``fascia_p``: soft-tissue boundaries -> ``fascia_id``. Returns (labels, drawn)."""
    if not (cfg.fascia_p > 0 and float(_u(gen, 0, 1, device=labels.device)) < cfg.fascia_p):
        return labels, False
    return torch.where(soft_boundary(labels, soft), fascia_id, labels), True


def fascia_intensity(means: torch.Tensor, sds: torch.Tensor, cfg: SynthConfig, gen) -> None:
    """The fascia (last id) in place: dark like cortex with probability ``line_dark_p``, else any; flat."""
    dark = float(_u(gen, 0, 1, device=means.device)) < cfg.line_dark_p
    means[-1] = _u(gen, 0.0, 0.15, device=means.device) if dark else _u(gen, 0.0, 1.0, device=means.device)
    sds[-1] = 0.0


def add_streaks(img: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor, pts: torch.Tensor, vol: KneeVolume,
                n_ids: int, cfg: SynthConfig, gen) -> torch.Tensor:
    """With probability ``streak_p``: fibre-like lines over the soft tissues, each id its own amplitude."""
    device = img.device
    if not (cfg.streak_p > 0 and float(_u(gen, 0, 1, device=device)) < cfg.streak_p):
        return img
    sign = -1.0 if float(_u(gen, 0, 1, device=device)) < cfg.line_dark_p else 1.0
    amp = _u(gen, 0.0, cfg.streak_amp, (n_ids,), device) * sign
    lines = streak_lines(pts, torch.tensor(vol.joint_centre_lps, device=device), cfg, gen)
    return img + torch.where(soft, amp[labels], 0.0) * lines.reshape(labels.shape)


def _foreground_zscore(img: torch.Tensor) -> torch.Tensor:
    """SpineKneeSegLib.engine.preprocessing.normalise('zscore') on one slice: statistics of the pixels
    above the 5th percentile (all pixels when that keeps <= 5 %)."""
    flat = img.flatten()
    lo = torch.quantile(flat[:: max(1, flat.numel() // 20000)], 0.05)
    mask = flat > lo
    values = flat[mask] if mask.sum() > 0.05 * flat.numel() else flat
    return (img - values.mean()) / values.std().clamp_min(1e-6)


def synthesise(vol: KneeVolume, cfg: SynthConfig, gen: torch.Generator, plane: str | None = None,
               mirror: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One sample: image (1, H, W) float32 z-scored, target (H, W) long 0..4, and its parameters."""
    device = vol.labels.device
    n = cfg.network_px
    pts, thickness, plane, fov = sample_geometry(vol, cfg, gen, device, plane)
    if mirror is None:
        mirror = bool(float(_u(gen, 0, 1, device=device)) < 0.5)
    if cfg.beyond_volume not in ("empty", "extend"):
        raise ValueError(f"beyond_volume must be 'empty' or 'extend', not {cfg.beyond_volume!r}")
    extend = cfg.beyond_volume == "extend"
    labels = sample_labels(vol, pts, mirror, extend)  # (S, H, W)
    if cfg.bone_shift_mm > 0 and vol.image is None:  # a real image's bones stay where its labels are
        for bone in cfg.shift_bones:
            offset = _u(gen, -cfg.bone_shift_mm, cfg.bone_shift_mm, (3,), device)
            labels = shift_bone(vol, labels, pts, mirror, extend, bone, offset)
    target = labels[labels.shape[0] // 2].clamp(max=BONES + 1)
    target = torch.where(target > BONES, 0, target)

    if vol.image is not None:  # a real labelled image: its own contrast, augmented below
        img = sample_image(vol, pts, mirror, extend).mean(dim=0, keepdim=True)[None]
    else:
        labels = _split_background(labels, vol.n_labels, cfg, gen)
        rim_id = vol.n_labels + cfg.background_tissues[1]
        n_distractors = 0
        if cfg.distractor_p > 0 and float(_u(gen, 0, 1, device=device)) < cfg.distractor_p:
            labels, n_distractors = _distractors(labels, rim_id + 1, fov, cfg, gen)
        distractor_ids = torch.arange(rim_id + 1, rim_id + 1 + n_distractors, device=device)
        mimic = _u(gen, 0, 1, (n_distractors,), device) < cfg.distractor_mimic_p
        width = int(torch.randint(cfg.cortex_px[0], cfg.cortex_px[1] + 1, (1,), generator=gen, device=device))
        labels = _cortex(labels, width, rim_id, also=distractor_ids[mimic])
        n_ids = rim_id + 1 + n_distractors
        soft = (labels > BONES) & (labels != rim_id)
        labels, fascia = add_fascia(labels, soft, n_ids, cfg, gen)
        n_ids += fascia
        means = tissue_means(vol, cfg, gen, n_ids)
        means[rim_id] = _u(gen, 0.0, 0.12, device=device)  # cortical bone: no signal
        sds = _u(gen, 0.0, cfg.texture_sd, (n_ids,), device)
        for j in torch.nonzero(mimic).flatten().tolist():  # a bone's marrow, as a muscle belly can look
            bone = int(torch.randint(1, BONES + 1, (1,), generator=gen, device=device))
            jitter = _u(gen, -cfg.tissue_jitter, cfg.tissue_jitter, device=device)
            means[rim_id + 1 + j] = (means[bone] + jitter).clamp(0, 1)
            sds[rim_id + 1 + j] = sds[bone]
        if fascia:
            fascia_intensity(means, sds, cfg, gen)
        img = means[labels] + sds[labels] * torch.randn(labels.shape, generator=gen, device=device)
        img = add_streaks(img, labels, soft, pts, vol, n_ids, cfg, gen)
        img = img.mean(dim=0, keepdim=True)[None]  # (1, 1, H, W): partial volume across the slab

    img = _gaussian_blur(img, float(_u(gen, *cfg.blur_px, device=device)))
    factor = float(_u(gen, *cfg.downsample, device=device))
    if factor > 1.05:  # resolution loss along rows, cols or both
        which = int(torch.randint(0, 3, (1,), generator=gen, device=device))
        lo_size = (round(n / factor) if which != 1 else n, round(n / factor) if which != 0 else n)
        img = F.interpolate(F.interpolate(img, size=lo_size, mode="area"), size=(n, n), mode="bilinear",
                            align_corners=False)
    bias = _smooth_field(gen, (4, 4), (n, n), device)[None] * float(_u(gen, 0, cfg.bias_sd, device=device))
    img = img.clamp_min(0) * torch.exp(bias)
    img = img / img.amax().clamp_min(1e-6)
    img = img ** math.exp(float(torch.randn((), generator=gen, device=device)) * cfg.gamma_sd)
    sd = float(_u(gen, *cfg.noise_sd, device=device))
    if sd > 0:  # Rician magnitude noise
        n1 = torch.randn(img.shape, generator=gen, device=device) * sd
        n2 = torch.randn(img.shape, generator=gen, device=device) * sd
        img = torch.sqrt((img + n1) ** 2 + n2 ** 2)
    img = img[0]
    padded = None
    if float(_u(gen, 0, 1, device=device)) < cfg.pad_fraction:  # window leaves the field of view
        padded = torch.zeros((n, n), dtype=torch.bool, device=device)
        side = int(torch.randint(0, 4, (1,), generator=gen, device=device))
        cut = int(_u(gen, 0.05, 0.3, device=device) * n)
        sl = [(slice(0, cut), slice(None)), (slice(n - cut, n), slice(None)),
              (slice(None), slice(0, cut)), (slice(None), slice(n - cut, n))][side]
        padded[sl] = True
        img[0][padded] = 0.0
    img = _foreground_zscore(img)
    if padded is not None:  # inference pads with the normalised image's minimum (like air)
        img[0][padded] = img[0][~padded].min()
    img = img * float(_u(gen, 1 - cfg.jitter[0], 1 + cfg.jitter[0], device=device)) \
        + float(_u(gen, -cfg.jitter[1], cfg.jitter[1], device=device))
    return img.float(), target, {"plane": plane, "thickness_mm": thickness, "fov_mm": fov, "mirror": mirror}


def labelled_mask(vol: KneeVolume) -> torch.Tensor:
    """(BONES + 1,) bool: background and the bones this volume labels."""
    mask = torch.zeros(BONES + 1, dtype=torch.bool)
    mask[0] = True
    mask[list(vol.labelled)] = True
    return mask


def synthesise_batch(volumes: list[KneeVolume], cfg: SynthConfig, gen: torch.Generator, batch: int,
                     with_mask: bool = False):
    """(x (B, 1, H, W), y (B, H, W)) and, with ``with_mask``, which classes each sample labels."""
    device = volumes[0].labels.device
    xs, ys, masks = [], [], []
    for _ in range(batch):
        vol = volumes[int(torch.randint(0, len(volumes), (1,), generator=gen, device=device))]
        x, y, _ = synthesise(vol, cfg, gen)
        xs.append(x)
        ys.append(y)
        masks.append(labelled_mask(vol))
    if with_mask:
        return torch.stack(xs), torch.stack(ys), torch.stack(masks).to(device)
    return torch.stack(xs), torch.stack(ys)


def synthesise_volume(vol: KneeVolume, cfg: SynthConfig, gen: torch.Generator, *, plane: str = "sagittal",
                      n_slices: int = 60, slice_mm: float = 1.5, thickness_mm: float | None = None,
                      size_px: int = 256, pixel_mm: float = 0.6, mirror: bool = False) -> dict:
    """A whole synthetic series of the (held-out) anatomy with one contrast for every slice, for
    evaluating the real inference pipeline in 3D. Returns unnormalised positive intensities
    (slices, rows, cols) float32, bone labels uint8, and the LPS geometry (direction columns for
    i = col, j = row, k = slice; origin of the first voxel; spacing (col, row, slice))."""
    device = vol.labels.device
    normal, row, col = (torch.tensor(v, device=device) for v in PLANES[plane])
    angles = [math.radians(float(_u(gen, -a / 2, a / 2, device=device))) for a in cfg.rotation_deg]
    frame = torch.stack([normal, row, col], dim=1) @ _rotation(*angles, device)
    normal, row, col = frame[:, 0], frame[:, 1], frame[:, 2]
    centre = torch.tensor(vol.joint_centre_lps, device=device)
    centre = centre + row * float(_u(gen, -10, 10, device=device)) + col * float(_u(gen, -10, 10, device=device))
    thickness = thickness_mm if thickness_mm is not None else slice_mm
    t = (torch.arange(size_px, device=device, dtype=torch.float32) - (size_px - 1) / 2) * pixel_mm
    rr, cc = torch.meshgrid(t, t, indexing="ij")
    if cfg.elastic_mm > 0:
        disp = _smooth_field(gen, (5, 5), (size_px, size_px), device, channels=2) * cfg.elastic_mm / 2
        rr, cc = rr + disp[0], cc + disp[1]
    offsets = (torch.linspace(-0.5, 0.5, cfg.sub_planes, device=device) * thickness
               if cfg.sub_planes > 1 else torch.zeros(1, device=device))
    slice_pos = (torch.arange(n_slices, device=device, dtype=torch.float32) - (n_slices - 1) / 2) * slice_mm
    plane_pts = centre + rr[..., None] * row + cc[..., None] * col  # (H, W, 3)
    pts = plane_pts[None, None] + (slice_pos[:, None] + offsets[None, :])[..., None, None, None] * normal
    labels = sample_labels(vol, pts.reshape(-1, size_px, size_px, 3), mirror)  # (N*S, H, W)
    bones = labels.reshape(n_slices, -1, size_px, size_px)[:, offsets.numel() // 2]
    bones = torch.where(bones > BONES, 0, bones).to(torch.uint8)

    labels = _split_background(labels, vol.n_labels, cfg, gen)
    rim_id = vol.n_labels + cfg.background_tissues[1]
    labels = _cortex(labels, int(torch.randint(1, cfg.cortex_px[1] + 1, (1,), generator=gen, device=device)), rim_id)
    soft = (labels > BONES) & (labels != rim_id)
    labels, fascia = add_fascia(labels, soft, rim_id + 1, cfg, gen)
    n_ids = rim_id + 1 + fascia
    means = tissue_means(vol, cfg, gen, n_ids, lo=0.05)
    means[rim_id] = _u(gen, 0.0, 0.1, device=device)
    sds = _u(gen, 0.0, cfg.texture_sd / 2, (n_ids,), device)
    if fascia:
        fascia_intensity(means, sds, cfg, gen)
    img = means[labels] + sds[labels] * torch.randn(labels.shape, generator=gen, device=device)
    img = add_streaks(img, labels, soft, pts.reshape(labels.shape + (3,)), vol, n_ids, cfg, gen)
    img = img.reshape(n_slices, -1, size_px, size_px).mean(dim=1)[:, None]  # partial volume
    img = _gaussian_blur(img, 0.5)
    bias = _smooth_field(gen, (4, 4), (size_px, size_px), device)[None] * cfg.bias_sd / 2
    img = img.clamp_min(0) * torch.exp(bias)
    sd = 0.02
    img = torch.sqrt((img + torch.randn(img.shape, generator=gen, device=device) * sd) ** 2
                     + (torch.randn(img.shape, generator=gen, device=device) * sd) ** 2)
    first = centre + t[0] * row + t[0] * col + slice_pos[0] * normal  # nominal: the displacement deforms anatomy
    return {"image": (img[:, 0] * 1000).cpu().numpy().astype("float32"), "labels": bones.cpu().numpy(),
            "direction": torch.stack([col, row, normal], dim=1).cpu().double().numpy(),
            "origin": first.cpu().double().numpy(), "spacing": (pixel_mm, pixel_mm, slice_mm),
            "plane": plane, "thickness_mm": thickness, "mirror": mirror}
