"""Whole-column training for the lumbar level model (issue 21): every labelled scan, duplicates
found by content and kept in one fold, Zukić label/image slice mismatches resolved from the image,
whole sagittal slices with field-of-view augmentation, fixed schedule (no checkpoint selection).

Used by ``spine_levels.py cv | final``; the seed's crop-based loop stays in ``spine_levels.py``.
"""
from __future__ import annotations

import hashlib
import lzma
import math
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# the seed loop's pieces, shared: labels L1..L5, inverse-frequency weights, per-dataset sampling,
# contrast remapping (T1 <-> T2), weighted Dice
from spine_levels import (
    case_probabilities,
    level_labels,
    level_weights,
    random_intensity,
    read_image,
    weighted_dice_loss,
)
from SpineKneeSegLib.core.atomic import atomic_path
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.engine.models import build_network
from SpineKneeSegLib.engine.preprocessing import training_slices
from SpineKneeSegLib.engine.weights import save_checkpoint
from SpineKneeSegLib.tasks import TASKS
from trainloop import LoopConfig, rank_stream, rank_torch_stream, run_loop, seed_everything

CARD = TASKS["lumbar-foramina"]
N_LEVELS = 5
DATASETS = ("myosegmentum", "zukic-t2")
T12, T11 = 6, 7  # Zukić label values above L1


# ---- cases -----------------------------------------------------------------------------------

def _body_contrast(image: np.ndarray, labels: np.ndarray) -> float:
    """|mean inside the bodies - mean in a 4 px ring around them| of a z-scored image: highest when
    the label slices sit on the image slices that show those bodies."""
    body = labels > 0
    ring = ndimage.binary_dilation(body, np.ones((1, 9, 9), bool)) & ~body
    return abs(float(image[body].mean() - image[ring].mean()))


def align_extra_label_slice(image: Image, labels: Image) -> tuple[np.ndarray | None, str]:
    """A label map with one slice more than its image (four Zukić cases): drop the first or the
    last label slice, whichever leaves the bodies' outline on stronger image contrast. Refused
    (None) when the two differ by less than 10 %: then the evidence does not decide."""
    a = image.array.astype(np.float32)
    a = (a - a.mean()) / max(float(a.std()), 1e-6)
    axis = int(np.argmax(np.array(labels.array.shape) - np.array(image.array.shape)))
    drop_first = np.delete(labels.array, 0, axis=axis)
    drop_last = np.delete(labels.array, labels.array.shape[axis] - 1, axis=axis)
    first, last = _body_contrast(a, drop_first), _body_contrast(a, drop_last)
    evidence = f"body contrast dropping the first label slice {first:.3f}, the last {last:.3f}"
    if max(first, last) < 1.1 * min(first, last):
        return None, f"excluded: {evidence} (less than 10 % apart, undecided)"
    if last >= first:
        return drop_last, f"last label slice dropped ({evidence})"
    return drop_first, f"first label slice dropped ({evidence})"


def content_hash(path: Path) -> str:
    return hashlib.sha256(np.ascontiguousarray(read_image(path).array).tobytes()).hexdigest()


def spine_cases(root: Path, log=print) -> list[dict]:
    """Every labelled scan of the two level datasets with its content hash (duplicates share it)
    and, where the label map has one slice more than the image, the resolution applied."""
    cases = []
    for dataset in DATASETS:
        for folder in sorted((root / "spine" / dataset).glob("case*")):
            image_path, label_path = folder / "image.nii.gz", folder / "vertebrae.nii.gz"
            if not (image_path.exists() and label_path.exists()):
                continue
            image, labels = read_image(image_path), read_image(label_path)
            case = {"id": f"{dataset}/{folder.name}", "dataset": dataset, "image": image_path, "labels": label_path,
                    "hash": hashlib.sha256(np.ascontiguousarray(image.array).tobytes()).hexdigest(), "note": ""}
            if image.array.shape != labels.array.shape:
                extra = np.array(labels.array.shape) - np.array(image.array.shape)
                if sorted(extra.tolist()) != [0, 0, 1]:
                    log(f"excluded {case['id']}: labels {labels.array.shape} vs image {image.array.shape}")
                    continue
                aligned, note = align_extra_label_slice(image, labels)
                log(f"{case['id']}: labels {labels.array.shape} vs image {image.array.shape}: {note}")
                if aligned is None:
                    continue
                case["aligned_labels"], case["note"] = aligned, note
            cases.append(case)
    return cases


def case_labels(case: dict) -> np.ndarray:
    """The case's label map on its image grid (with the extra slice removed where there was one)."""
    if "aligned_labels" in case:
        return case["aligned_labels"]
    return read_image(case["labels"]).array


def duplicate_groups(cases: list[dict]) -> list[list[str]]:
    """Case ids grouped by identical image content (e.g. myosegmentum case18 = case19)."""
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(case["hash"], []).append(case["id"])
    return list(groups.values())


def make_folds(cases: list[dict], k: int, seed: int = 0) -> list[list[str]]:
    """Case-wise k folds: duplicate groups stay together; each dataset is spread evenly (groups of
    a dataset dealt round-robin after a seeded shuffle, the next dataset continuing where it left)."""
    rng = np.random.default_rng(seed)
    dataset_of = {c["id"]: c["dataset"] for c in cases}
    folds: list[list[str]] = [[] for _ in range(k)]
    turn = 0
    for dataset in DATASETS:
        groups = [g for g in duplicate_groups(cases) if dataset_of[g[0]] == dataset]
        for i in rng.permutation(len(groups)):
            folds[turn % k].extend(groups[i])
            turn += 1
    return [sorted(f) for f in folds]


@dataclass
class PreparedCase:
    id: str
    dataset: str
    stack: np.ndarray  # (slices, H, W) float32, normalised, 1.4 mm in-plane (canonical sagittal)
    labels: np.ndarray  # (slices, H, W) uint8 L1..L5
    body_slices: np.ndarray  # slice indices holding any level
    # (slices, 6, H, W) uint8 0..255: each class's share of a pixel (background, L1..L5), the labels
    # resampled as the image is; for ``targets="soft"``, else None
    fractions: np.ndarray | None = None


def prepare(case: dict, spacing_mm: float, fractions: bool = False) -> PreparedCase:
    """Exactly the inference preprocessing (same Lib functions); labels resampled nearest, and with
    ``fractions`` also as class shares (one-hot labels through the image's own resampling)."""
    image = read_image(case["image"])
    pre = CARD.preprocessing
    labels = level_labels(case_labels(case))
    x, y, grid = training_slices(image, labels, pre.plane, pre.normalisation, spacing_mm)
    shares = label_fractions(image, labels, grid) if fractions else None
    return PreparedCase(case["id"], case["dataset"], x, y, np.flatnonzero(y.reshape(len(y), -1).any(1)), shares)


def label_fractions(image: Image, labels: np.ndarray, grid) -> np.ndarray:
    """(slices, 6, H, W) uint8: one-hot L0..L5 on ``grid`` by the resampling the image gets
    (to_network_grid, bilinear), x 255: soft boundaries instead of nearest-sampled ones
    (Training/level_ceiling.py: at 1.4 mm nearest targets alone lose ~5 Dice points)."""
    from SpineKneeSegLib.engine.preprocessing import canonical_image, to_network_grid

    _, orientation = canonical_image(image, CARD.preprocessing.plane)
    canonical = np.ascontiguousarray(orientation.apply(labels))
    out = []
    for start in range(0, len(canonical), 8):  # a few slices at a time: six float maps per slice
        onehot = torch.from_numpy(np.eye(N_LEVELS + 1, dtype=np.float32)[canonical[start:start + 8]])
        onehot = onehot.permute(0, 3, 1, 2)
        out.append((to_network_grid(onehot, grid, mode="bilinear").clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(out)


# ---- whole-slice sampling with field-of-view augmentation -------------------------------------

@dataclass
class ColumnConfig:
    steps: int = 1500
    batch_size: int = 8
    canvas: int = 192  # network input (px at 1.4 mm = 269 mm): the whole MyoSegmenTUM slice and most of Zukić's
    lr: float = 1e-3
    lr_final: float = 1e-5  # cosine decay over the steps
    loss: str = "weighted-dice+bce"  # the seed's weighted Dice, plus BCE for calibrated probabilities
    bce_weight: float = 0.5
    spacing_mm: float = 1.4
    max_rotation_deg: float = 30.0
    scale: float = 0.15  # +-
    shift_px: int = 24  # +- around the spine's centre
    warp_px: float = 3.0
    fov_cut_p: float = 0.8  # probability of a random cranio-caudal field-of-view cut (each end half of it)
    # where a cut falls: "anatomical" (half beyond L1 / L5, a quarter through them, a quarter past
    # them into L2 / L4: a field of view without L1 or the sacrum is common) or "uniform" (session
    # 12's first recipe: anywhere from T12 to mid-L2 and from mid-L4 to well below L5)
    fov_cut_mode: str = "anatomical"
    off_body_p: float = 0.1  # slices without any body (lateral): negatives
    # "nearest": the seed's targets (labels sampled nearest onto the grid, hard again after the warp);
    # "soft": each level's share of a pixel (PreparedCase.fractions), kept soft through the warp
    targets: str = "nearest"
    noise_sd: float = 0.25
    # two more output channels during training only: "above L1" and "below L5", the half-planes
    # beyond the column's ends (per canvas column, past L1's top / L5's bottom row): a dense signal
    # about where the lumbar run ends (issue 21: "teach the model what lies just above L1 and just
    # below L5"; the sacrum is not labelled). Stripped from the saved model, which stays 5 levels.
    # Off: the seed's targets.
    context_targets: bool = False
    context_weight: float = 0.5  # BCE weight of the two context channels
    # "bf16": the forward pass under CPU/CUDA bfloat16 autocast (loss in float32): recipe D's
    # step ~6 -> 2.1 s on two CPU cores with native bf16 (avx512_bf16); "none": float32 (the seed's)
    autocast: str = "none"
    seed: int = 0
    threads: int = 1
    device: str = "cpu"  # "cuda" on a GPU machine: sampling, warping and the network all run there
    network: dict = field(default_factory=lambda: {"levels": 6, "base_channels": 8, "max_channels": 32,
                                                   "activation": "elu", "norm": "batch"})


N_CONTEXT = 2  # context_targets: "above L1", "below L5"


def network_config(cfg: ColumnConfig, training: bool = False) -> dict:
    """The network as saved (5 levels); ``training``: with the context channels when the recipe has them."""
    extra = N_CONTEXT if training and cfg.context_targets else 0
    return {**cfg.network, "in_channels": CARD.preprocessing.context_slices, "out_channels": N_LEVELS + extra}


def strip_context_channels(state_dict: dict, n_out: int = N_LEVELS) -> dict:
    """A MultiNet trained with context channels as the 5-level network: every output head (1x1
    convolution; the heads' outputs are summed across scales) keeps its first ``n_out`` channels,
    so the levels' logits are exactly those of the training network."""
    return {k: (v[:n_out] if k.startswith("heads.") else v) for k, v in state_dict.items()}


def context_heads(state_dict: dict, n_out: int = N_LEVELS) -> dict:
    """What strip_context_channels drops: each output head's rows past the levels (about 800
    numbers). Kept in the saved model's metadata, so that the training network's "above L1" /
    "below L5" outputs can be rebuilt (with_context_heads) without a second weights file."""
    return {k: v[n_out:].clone() for k, v in state_dict.items() if k.startswith("heads.") and v.shape[0] > n_out}


def with_context_heads(checkpoint: dict) -> tuple[dict, dict]:
    """(network config, state_dict) of the training network, levels then context channels, from a
    saved model that kept its context heads; refuses one that did not."""
    heads = checkpoint.get("metadata", {}).get("context_heads")
    if not heads:
        raise ValueError("this model kept no context heads (trained without --context-targets, or saved "
                         "before session 30: spine_levels.py attach-context adds them from the run's last.pt)")
    state = {k: (torch.cat([v, heads[k]]) if k in heads else v) for k, v in checkpoint["state_dict"].items()}
    return {**checkpoint["network"]["config"], "out_channels": N_LEVELS + N_CONTEXT}, state


def attach_context(final: Path, last: Path) -> str:
    """Re-save ``final`` (a model saved without its context heads) with the heads of the training
    network in ``last`` (the run's last checkpoint at the same step), after checking that ``last``
    stripped is exactly ``final``. Returns the new SHA256."""
    from SpineKneeSegLib.engine.weights import load_checkpoint

    saved = load_checkpoint(final)
    training = torch.load(last, map_location="cpu", weights_only=False)
    if training["state"]["step"] != saved["metadata"].get("steps"):
        raise ValueError(f"{last} is at step {training['state']['step']}, {final} at {saved['metadata'].get('steps')}")
    stripped = strip_context_channels(training["model"])
    if stripped.keys() != saved["state_dict"].keys() or any(
            not torch.equal(stripped[k], v) for k, v in saved["state_dict"].items()):
        raise ValueError(f"{last} is not the training network of {final}")
    heads = context_heads(training["model"])
    if not heads:
        raise ValueError(f"{last} has no context channels")
    return save_checkpoint(final, saved["task"], saved["network"]["factory"], saved["network"]["config"],
                           saved["state_dict"], saved["preprocessing"], {**saved["metadata"], "context_heads": heads},
                           saved.get("model", "labels"))


def beyond_ends(y: torch.Tensor, keep: torch.Tensor, had: torch.Tensor) -> torch.Tensor:
    """(b, 2, H, W) targets of the context channels from the cut labels ``y`` (b, H, W; rows run
    inferior): "above L1" = rows above L1's top row in each canvas column, "below L5" = rows below
    L5's bottom row (columns without the body take the nearest column's row), only inside the
    field of view ``keep`` (b, H). Where the level is outside the cut field of view the target is 0
    (its beyond-region is cut away too); where the slice never held it (``had`` (b, 5): lateral
    slices), -1: ignored by the loss."""
    b, h, w = y.shape
    rows = torch.arange(h, device=y.device)[None, :, None]
    out = torch.zeros((b, N_CONTEXT, h, w), device=y.device)
    cols = np.arange(w)
    for ch, (level, first) in enumerate(((1, True), (N_LEVELS, False))):
        mask = y == level
        edge = (torch.where(mask, rows, h).amin(1) if first else torch.where(mask, rows, -1).amax(1)).cpu().numpy()
        present = mask.any(1).cpu().numpy()  # (b, W): columns holding the level
        for j in range(b):
            if present[j].any():
                line = np.interp(cols, cols[present[j]], edge[j][present[j]])  # constant beyond the ends
                line_t = torch.from_numpy(line).to(y.device, torch.float32)[None, :]
                region = rows[0] < line_t if first else rows[0] > line_t
                out[j, ch] = (region & keep[j][:, None]).float()
            elif not bool(had[j, level - 1]):
                out[j, ch] = -1.0
    return out


def context_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over the context channels where the target is defined (>= 0)."""
    weight = (target >= 0).float()
    if weight.sum() == 0:
        return logits.sum() * 0.0
    bce = F.binary_cross_entropy_with_logits(logits, target.clamp_min(0), weight=weight, reduction="sum")
    return bce / weight.sum()


def autocast_context(cfg: ColumnConfig):
    import contextlib

    if cfg.autocast == "bf16":
        return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
    if cfg.autocast != "none":
        raise ValueError(f"unknown autocast {cfg.autocast!r} (none | bf16)")
    return contextlib.nullcontext()


def check_autocast(cfg: ColumnConfig, device: torch.device) -> None:
    """Refuses bfloat16 autocast where the device only emulates it: on a CPU without avx512_bf16 /
    AMX, recipe D's step took 92-104 s against 5 s in float32 (session 22, an AMD EPYC without
    AVX-512). The product's --precision falls back to float32 there with a warning; a recipe is
    refused instead, since switching its precision silently would change the recipe."""
    from SpineKneeSegLib.engine.inference import native_bfloat16

    if cfg.autocast == "bf16" and not native_bfloat16(device):
        raise ValueError(f"--autocast bf16: this {device.type} has no native bfloat16 (on a CPU: avx512_bf16 or "
                         "AMX), so each step would take about 20 times float32's; train with --autocast none here")


def _affine(angle: float, scale: float, centre_src: tuple[float, float], src_hw: tuple[int, int],
            canvas: int) -> torch.Tensor:
    """theta for affine_grid: canvas pixel offsets from its centre, rotated and scaled, land at
    ``centre_src`` (row, col) of the source slice; both in normalised coordinates."""
    h, w = src_hw
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    # x (columns) and y (rows) in source-normalised units per canvas-normalised unit
    return torch.tensor([[c * canvas / w, -s * canvas / w, (2 * centre_src[1] + 1) / w - 1],
                         [s * canvas / h, c * canvas / h, (2 * centre_src[0] + 1) / h - 1]], dtype=torch.float32)


def fov_cut_rows(present: np.ndarray, n_rows: int, rng: np.random.Generator, p: float,
                 mode: str = "anatomical") -> tuple[int | None, int | None]:
    """A random cranio-caudal field of view for one warped slice: (first kept row or None, first
    cut row below or None). ``present``: (5, rows) whether each level occupies each row; rows run
    inferior in the canonical sagittal slice. ``mode``: see ColumnConfig.fov_cut_mode."""
    rows = [np.flatnonzero(present[k]) for k in range(N_LEVELS)]
    last = n_rows - 1

    def pick(ranges):
        if mode == "uniform":
            lo, hi = ranges[0][0], ranges[-1][1]
        else:
            lo, hi = ranges[rng.choice(len(ranges), p=(0.5, 0.25, 0.25))]
        lo, hi = int(np.clip(lo, 0, last)), int(np.clip(hi, 0, last))
        return int(rng.integers(min(lo, hi), max(lo, hi) + 1))

    top = bottom = None
    if rng.random() < p / 2 and len(rows[0]) and len(rows[1]):
        l1, l2 = rows[0], rows[1]
        top = pick([(l1.min() - 30, l1.min()), (l1.min(), l1.max()), (l1.max(), int(l2.mean()))])
    if rng.random() < p / 2 and len(rows[3]) and len(rows[4]):
        l4, l5 = rows[3], rows[4]
        bottom = pick([(l5.max(), l5.max() + 45), (l5.min(), l5.max()), (int(l4.mean()), l5.min())][::-1]
                      if mode == "uniform" else
                      [(l5.max(), l5.max() + 45), (l5.min(), l5.max()), (int(l4.mean()), l5.min())])
    return top, bottom


class ColumnSampler:
    """Batches of whole slices, warped and cut on one device (the GPU when there is one): every
    scan's stack lives there, zero-padded at the bottom / right to one size, which is what
    grid_sample's zero padding would have read there anyway."""

    def __init__(self, cases: list[PreparedCase], cfg: ColumnConfig, device: torch.device | str = "cpu"):
        self.cases, self.cfg, self.device = cases, cfg, torch.device(device)
        self.probabilities = case_probabilities(cases)
        h = max(c.stack.shape[1] for c in cases)
        w = max(c.stack.shape[2] for c in cases)
        n = sum(len(c.stack) for c in cases)
        stack, labels = np.zeros((n, h, w), np.float32), np.zeros((n, h, w), np.uint8)
        self.start, self.centre = [], np.zeros((n, 2))
        at = 0
        for c in cases:
            s, ch, cw = c.stack.shape
            stack[at:at + s, :ch, :cw], labels[at:at + s, :ch, :cw] = c.stack, c.labels
            for k in range(s):  # the spine's centre on the slice (the slice's centre without bodies)
                fg = np.argwhere(c.labels[k] > 0)
                self.centre[at + k] = fg.mean(0) if len(fg) else np.array((ch, cw)) / 2.0
            self.start.append(at)
            at += s
        self.hw = (h, w)
        self.stack = torch.from_numpy(stack).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.fractions = None
        if cfg.targets == "soft":
            missing = [c.id for c in cases if c.fractions is None]
            if missing:
                raise ValueError(f"targets 'soft' need label fractions (prepare(..., fractions=True) or a pack made "
                                 f"with --targets soft); missing for {', '.join(missing[:3])}")
            fractions = np.zeros((n, N_LEVELS + 1, h, w), np.uint8)
            at = 0
            for c in cases:
                s, _, ch, cw = c.fractions.shape
                fractions[at:at + s, :, :ch, :cw] = c.fractions
                at += s
            self.fractions = torch.from_numpy(fractions).to(self.device)
        elif cfg.targets != "nearest":
            raise ValueError(f"unknown targets {cfg.targets!r} (nearest | soft)")

    def __call__(self, rng: np.random.Generator, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, b = self.cfg, self.cfg.batch_size
        context = CARD.preprocessing.context_slices
        index, inside, thetas = [], [], []
        for i in rng.choice(len(self.cases), size=b, p=self.probabilities):
            case = self.cases[i]
            if len(case.body_slices) and rng.random() >= cfg.off_body_p:
                k = int(rng.choice(case.body_slices))
            else:
                k = int(rng.integers(case.stack.shape[0]))
            source = k + np.arange(context) - context // 2  # the slice and its neighbours; zeros beyond the stack
            inside.append((source >= 0) & (source < len(case.stack)))
            index.append(self.start[i] + np.clip(source, 0, len(case.stack) - 1))
            centre = self.centre[self.start[i] + k] + rng.uniform(-cfg.shift_px, cfg.shift_px, 2)
            angle = math.radians(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
            thetas.append(_affine(angle, 1 + rng.uniform(-cfg.scale, cfg.scale), tuple(centre), self.hw, cfg.canvas))
        dev = self.device
        size = (cfg.canvas, cfg.canvas)
        grid = F.affine_grid(torch.stack(thetas).to(dev), (b, 1, *size), align_corners=False)
        coarse = torch.randn(b, 2, 5, 5, generator=gen, device=dev) * (2 * cfg.warp_px / cfg.canvas)
        grid = grid + F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        index_t = torch.from_numpy(np.stack(index)).to(dev)
        x = self.stack[index_t] * torch.from_numpy(np.stack(inside)).to(dev, torch.float32)[..., None, None]
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        centre_slice = index_t[:, context // 2]
        if self.fractions is not None:
            onehot = self.fractions[centre_slice].float() / 255.0
        else:
            onehot = F.one_hot(self.labels[centre_slice].long(), N_LEVELS + 1).permute(0, 3, 1, 2).float()
        yw = F.grid_sample(onehot, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = torch.where(yw[:, 1:].max(1).values > 0.5, yw[:, 1:].argmax(1) + 1, 0)
        levels = torch.arange(1, N_LEVELS + 1, device=dev)
        present = (y[:, None] == levels[None, :, None, None]).any(3).cpu().numpy()  # (b, 5, rows)
        keep = np.ones((b, cfg.canvas), bool)
        for j in range(b):
            top, bottom = fov_cut_rows(present[j], cfg.canvas, rng, cfg.fov_cut_p, cfg.fov_cut_mode)
            keep[j, :top or 0] = False
            if bottom is not None:
                keep[j, bottom:] = False
        keep_t = torch.from_numpy(keep).to(dev)
        x = x * keep_t[:, None, :, None]  # the padding value beyond the field of view
        y = y * keep_t[:, :, None]
        if self.fractions is not None:  # the warped shares themselves, cut like the image
            target = yw[:, 1:] * keep_t[:, None, :, None]
        else:
            target = F.one_hot(y, N_LEVELS + 1)[..., 1:].permute(0, 3, 1, 2).float()
        if cfg.context_targets:
            had = torch.from_numpy(present.any(2)).to(dev)  # (b, 5): each level on the slice before the cut
            target = torch.cat([target, beyond_ends(y, keep_t, had)], 1)
        return random_intensity(x, gen, cfg.noise_sd), target


def sample_batch(cases: list[PreparedCase], cfg: ColumnConfig, rng: np.random.Generator,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch on the CPU (a fresh sampler: for tests and inspection; training keeps one)."""
    return ColumnSampler(cases, cfg)(rng, gen)


def make_loss(cfg: ColumnConfig, weights: torch.Tensor):
    """The levels' loss on channels 0..4; with context_targets, plus the context channels' masked BCE."""
    if cfg.loss == "weighted-dice":
        def levels(logits, target):
            return weighted_dice_loss(logits, target, weights)
    elif cfg.loss == "weighted-dice+bce":
        def levels(logits, target):
            return weighted_dice_loss(logits, target, weights) + \
                cfg.bce_weight * F.binary_cross_entropy_with_logits(logits, target)
    else:
        raise ValueError(f"unknown loss {cfg.loss!r} (weighted-dice | weighted-dice+bce)")
    if not cfg.context_targets:
        return levels
    return lambda logits, target: levels(logits[:, :N_LEVELS], target[:, :N_LEVELS]) + \
        cfg.context_weight * context_bce(logits[:, N_LEVELS:], target[:, N_LEVELS:])


def train_column(cfg: ColumnConfig, out: Path, cases: list[PreparedCase], resume: bool, log=print,
                 metadata: dict | None = None, max_minutes: float | None = None) -> Path | None:
    """Fixed schedule, no validation-based selection: the last weights are the model
    (``final.pt``, weights format). ``last.pt`` every 50 steps; ``--resume`` continues."""
    device = torch.device(cfg.device)
    check_autocast(cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    net = build_network("multinet", network_config(cfg, training=True)).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, cfg.steps, eta_min=cfg.lr_final)
    criterion = make_loss(cfg, level_weights(cases))
    rng = rank_stream(np.random.default_rng(cfg.seed), cfg.seed)  # each data-parallel process its own batches
    gen = rank_torch_stream(torch.Generator(device=device).manual_seed(cfg.seed), cfg.seed)
    sampler = ColumnSampler(cases, cfg, device)
    stamps: list[float] = []  # when each batch was asked for: the step time, sampling included

    def batches(_step):
        while True:
            stamps.append(time.perf_counter())
            yield sampler(rng, gen)

    # no float16: the Dice sums over a batch overflow it; bfloat16 autocast (cfg.autocast) keeps
    # float32's range and the loss is computed in float32
    loop = LoopConfig(steps=cfg.steps, checkpoint_every=50, seed=cfg.seed, max_minutes=max_minutes,
                      tensorboard=False, device=cfg.device, amp=False)

    def loss_of(n, b):
        with autocast_context(cfg):
            logits = n(b[0])
        return criterion(logits.float(), b[1])

    state = run_loop(net, optimiser, batches, loss_of, loop, out, scheduler=schedule,
                     rng=rng, gen=gen, resume=resume, extra={"config": asdict(cfg)}, log=log,
                     resume_message=lambda st: f"resumed at step {st['step']}")
    if state["stopped"] == "time":
        return None
    net.eval()
    step_s = float(np.median(np.diff(stamps[10:]))) if len(stamps) > 12 else None
    final = out / "final.pt"
    trained = {k: v.cpu() for k, v in net.state_dict().items()}
    save_checkpoint(final, CARD.name, "multinet", network_config(cfg), strip_context_channels(trained),
                    preprocessing={"in_plane_spacing_mm": cfg.spacing_mm},
                    metadata={"config": asdict(cfg), "steps": state["step"], "train_seconds": round(state["seconds"]),
                              "median_step_s": step_s, "device": torch.cuda.get_device_name(device)
                              if device.type == "cuda" else "cpu",
                              "loss_history": state["losses"], "recipe": "whole-column",
                              **({"context_heads": context_heads(trained)} if cfg.context_targets else {}),
                              **(metadata or {})},
                    model="labels")
    return final


# ---- packed arrays: the prepared scans in one file, for a machine without the data or SimpleITK --

def pack_cases(path: Path, cases: list[dict], prepared: list[PreparedCase], spacing_mm: float) -> dict:
    """The prepared stacks quantised to 8 bits per scan (error <= half a step, printed; the training
    noise alone is 0.25 SD) with the labels and the case records that fold making needs."""
    records, worst = [], 0.0
    for case, p in zip(cases, prepared):
        lo, hi = float(p.stack.min()), float(p.stack.max())
        step = max(hi - lo, 1e-6) / 255
        records.append({"id": case["id"], "dataset": case["dataset"], "hash": case["hash"], "note": case["note"],
                        "stack": np.round((p.stack - lo) / step).astype(np.uint8), "lo": lo, "step": step,
                        "labels": p.labels.astype(np.uint8),
                        **({"fractions": p.fractions} if p.fractions is not None else {})})
        worst = max(worst, step / 2)
    with atomic_path(path) as tmp, lzma.open(tmp, "wb", preset=6) as f:
        pickle.dump({"spacing_mm": spacing_mm, "cases": records}, f)
    return {"scans": len(records), "max_quantisation_error_sd": round(worst, 4), "bytes": path.stat().st_size}


def unpack_cases(path: Path, spacing_mm: float) -> tuple[list[dict], list[PreparedCase]]:
    with lzma.open(path, "rb") as f:
        packed = pickle.load(f)  # noqa: S301  (our own file, made by pack_cases)
    if abs(packed["spacing_mm"] - spacing_mm) > 1e-6:
        raise ValueError(f"{path}: packed at {packed['spacing_mm']} mm, the recipe asks for {spacing_mm} mm")
    records = packed["cases"]
    cases = [{k: r[k] for k in ("id", "dataset", "hash", "note")} for r in records]
    prepared = [PreparedCase(r["id"], r["dataset"], (r["lo"] + r["stack"].astype(np.float32) * r["step"]),
                             r["labels"], np.flatnonzero(r["labels"].reshape(len(r["labels"]), -1).any(1)),
                             r.get("fractions"))
                for r in records]
    return cases, prepared
