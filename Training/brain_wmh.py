"""Train and evaluate the WMH / MS-lesion model (seed 002: 2.5D attention U-Net on FLAIR) on
../shared/data/brain/open-ms, leave-one-out, against a FLAIR z-score threshold baseline.

    python Training/brain_wmh.py loo --out Training/runs/brain-wmh [--epochs 40]   # 3 folds + baseline
    python Training/brain_wmh.py final --out Training/runs/brain-wmh               # all 3 cases -> best.pt
    python Training/brain_wmh.py ship --out Training/runs/brain-wmh --version 0.2.0 # only if it beats the baseline

Options: every Config field (e.g. --t1 adds the T1, resampled onto the FLAIR, as 3 more channels;
--slab-mm 3,5,7.5,8 --slab-phases 2 simulates more thick-slice acquisitions).

Preprocessing is the task card's own (axial canonical slices, z-score inside the brain, 1 mm
in-plane). Training slices whose intensity entropy is < 2 bits are dropped (seed 002); each epoch
also sees the training volumes as simulated thick slabs (3-8 mm, averaged 1 mm slices) so the
model serves thick-slice clinical FLAIR. Early stopping uses held-back slice blocks of the
training volumes, never the left-out case. Evaluation runs the Lib's inference on the left-out
case at 1 mm and resliced to 7.5 mm slabs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SpineKneeSeg"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clinical_geometry import draw_acquisitions, simulate_acquisition  # noqa: E402
from wmh_metrics import all_metrics  # noqa: E402

from SpineKneeSegLib.datasets import data_root  # noqa: E402
from SpineKneeSegLib.image import Image  # noqa: E402
from SpineKneeSegLib.inference import segment_slices  # noqa: E402
from SpineKneeSegLib.io import read_image  # noqa: E402
from SpineKneeSegLib.models import build_network  # noqa: E402
from SpineKneeSegLib.preprocessing import context_channels, normalise, slice_axis, training_slices  # noqa: E402
from SpineKneeSegLib.tasks import TASKS  # noqa: E402
from SpineKneeSegLib.weights import save_checkpoint  # noqa: E402

CARD = TASKS["brain-wmh"]
EVAL_SLAB_MM = 7.5


@dataclass
class Config:
    epochs: int = 40
    patience: int = 10
    batch_size: int = 8
    patch: int = 160  # seed 002 trains on 256x256; 160 covers most of a 1 mm brain at a third of the cost
    lr: float = 1e-4  # seed 002
    loss: str = "focal-tversky"  # seed 002; or "blob" (seed's loss + per-lesion terms), "tversky" (gamma 1), "dice", "bce"
    blob_weight: float = 1.0  # "blob": weight of the mean per-lesion term beside the global one
    alpha: float = 0.85
    beta: float = 0.15
    gamma: float = 4 / 3
    smooth: float = 2.0
    min_entropy_bits: float = 2.0
    slab_fraction: float = 0.3  # share of batches drawn from simulated thick slabs
    slab_mm: str = "3,5,8"  # simulated slab thicknesses
    slab_phases: int = 1  # slab stacks per thickness, each starting at a different offset
    geometries: int = 0  # random clinical acquisitions per case (3-8 mm slices, 0.4-1.2 mm pixels, any axis)
    t1: bool = False  # T1 as 3 more input channels (the weights then need a T1 at inference)
    lesion_fraction: float = 0.6  # share of sampled slices that contain lesion
    steps_per_epoch: int = 40
    seed: int = 0


# ---- data --------------------------------------------------------------------------------------

def brain_cases(root: Path) -> list[dict]:
    return [{"id": d.name, "flair": d / "flair.nii.gz", "t1": d / "t1.nii.gz", "labels": d / "lesions.nii.gz"}
            for d in sorted((root / "brain" / "open-ms").glob("patient*")) if (d / "lesions.nii.gz").exists()]


def simulate_slabs(image: Image, labels: np.ndarray, thickness_mm: float,
                   offset_mm: float = 0.0) -> tuple[Image, np.ndarray]:
    """Thick axial slabs made by averaging the 1 mm slices whose centres fall in each slab (a
    thick 2D acquisition's partial volume); a slab voxel is lesion when >= half its slices are.
    ``offset_mm`` shifts where the first slab starts (a different slab phase, same anatomy)."""
    axis = slice_axis(image, "axial")
    step = float(image.spacing[2 - axis])
    per = thickness_mm / step
    start = offset_mm / step
    n_slabs = int((image.array.shape[axis] - start) // per)
    arr, lab = np.moveaxis(image.array, axis, 0), np.moveaxis(labels > 0, axis, 0)
    slabs, slab_labels = [], []
    for k in range(n_slabs):
        lo, hi = int(math.ceil(start + k * per - 1e-6)), int(math.ceil(start + (k + 1) * per - 1e-6))
        slabs.append(arr[lo:hi].mean(0))
        slab_labels.append(lab[lo:hi].mean(0) >= 0.5)
    spacing = list(image.spacing)
    spacing[2 - axis] = thickness_mm
    centre_shift = (start + 0.5 * per - 0.5) * step  # slab 0's nominal centre relative to slice 0's
    origin = np.asarray(image.origin) + image.direction[:, 2 - axis] * centre_shift
    out = Image(np.moveaxis(np.stack(slabs), 0, axis).astype(np.float32), tuple(spacing), tuple(origin),
                image.direction)
    return out, np.moveaxis(np.stack(slab_labels), 0, axis).astype(np.uint8)


def slice_entropy_bits(stack: np.ndarray, bins: int = 64) -> np.ndarray:
    """Shannon entropy of each slice's intensity histogram (seed 002 drops slices < 2 bits)."""
    lo, hi = float(stack.min()), float(stack.max())
    out = np.zeros(len(stack))
    for k, s in enumerate(stack):
        hist = np.histogram(s, bins=bins, range=(lo, hi + 1e-6))[0].astype(float)
        p = hist[hist > 0] / hist.sum()
        out[k] = float(-(p * np.log2(p)).sum())
    return out


@dataclass
class Prepared:
    id: str
    x: np.ndarray  # (slices, H, W) normalised, 1 mm in-plane, cropped to the brain
    y: np.ndarray
    keep: np.ndarray  # slice indices usable for training (entropy >= threshold)
    extras: list[np.ndarray] = field(default_factory=list)  # further input stacks (T1), same layout as x

    def channels(self, index: np.ndarray) -> np.ndarray:
        """(len(index), 3 * stacks, H, W), in the order inference builds them."""
        return np.concatenate([context_channels(s, index, CARD.preprocessing.context_slices)
                               for s in [self.x, *self.extras]], axis=1)


def prepare(case_id: str, image: Image, labels: np.ndarray, cfg: Config, extras: tuple[Image, ...] = ()) -> Prepared:
    pre = CARD.preprocessing
    x, y, _ = training_slices(image, labels, pre.plane, pre.normalisation, pre.in_plane_spacing_mm)
    others = [training_slices(e, labels, pre.plane, pre.normalisation, pre.in_plane_spacing_mm)[0] for e in extras]
    brain = np.abs(x).sum(0) > 0
    rows, cols = np.flatnonzero(brain.any(1)), np.flatnonzero(brain.any(0))
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    x, y, others = x[box], y[box], [o[box] for o in others]
    raw = np.moveaxis(image.array, slice_axis(image, "axial"), 0)
    keep = np.flatnonzero(slice_entropy_bits(raw) >= cfg.min_entropy_bits)
    return Prepared(case_id, x, y, keep, list(others))


# ---- training ----------------------------------------------------------------------------------

def focal_tversky_loss(logits, target, alpha, beta, gamma, smooth):
    """Seed 002 (Abraham & Khan 2019): (1 - Tversky index)^(1/gamma); alpha weights misses."""
    p = torch.sigmoid(logits)
    tp = (p * target).sum()
    fn = ((1 - p) * target).sum()
    fp = (p * (1 - target)).sum()
    ti = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    return (1 - ti) ** (1 / gamma)


def blob_loss(logits, target, alpha, beta, gamma, smooth, weight):
    """Lesion-aware loss (blob loss, Kofler et al. 2023): the seed's global focal Tversky plus the
    mean, over every true lesion (8-connected in the patch), of the same loss computed on that
    lesion and the background only, so a missed 5-pixel lesion costs as much as a missed large one
    and the other lesions cannot pay for it."""
    from scipy import ndimage

    total = focal_tversky_loss(logits, target, alpha, beta, gamma, smooth)
    terms = []
    for b, t in enumerate(target[:, 0].numpy()):
        components, n = ndimage.label(t > 0, structure=np.ones((3, 3)))
        if not n:
            continue
        components = torch.from_numpy(components)
        background = target[b, 0] == 0
        for c in range(1, n + 1):
            region = (components == c) | background
            terms.append(focal_tversky_loss(logits[b, 0][region], target[b, 0][region], alpha, beta, gamma, smooth))
    return total + weight * torch.stack(terms).mean() if terms else total


def make_loss(cfg: Config):
    if cfg.loss == "blob":
        return lambda lg, t: blob_loss(lg, t, cfg.alpha, cfg.beta, cfg.gamma, cfg.smooth, cfg.blob_weight)
    if cfg.loss == "focal-tversky":
        return lambda lg, t: focal_tversky_loss(lg, t, cfg.alpha, cfg.beta, cfg.gamma, cfg.smooth)
    if cfg.loss == "tversky":
        return lambda lg, t: focal_tversky_loss(lg, t, cfg.alpha, cfg.beta, 1.0, cfg.smooth)
    if cfg.loss == "dice":
        return lambda lg, t: focal_tversky_loss(lg, t, 0.5, 0.5, 1.0, 1.0)
    if cfg.loss == "bce":
        return lambda lg, t: F.binary_cross_entropy_with_logits(lg, t)
    raise ValueError(f"unknown loss {cfg.loss!r}")


def sample_batch(pool: list[Prepared], cfg: Config, rng: np.random.Generator, allowed: dict[str, np.ndarray]):
    xs, ys = [], []
    size = cfg.patch
    for _ in range(cfg.batch_size):
        case = pool[rng.integers(len(pool))]
        slices = allowed[case.id]
        lesion = slices[case.y[slices].reshape(len(slices), -1).any(1)]
        k = int(rng.choice(lesion if len(lesion) and rng.random() < cfg.lesion_fraction else slices))
        x = case.channels(np.array([k]))[0]
        y = case.y[k].astype(np.float32)
        h, w = y.shape
        ph, pw = max(0, size - h), max(0, size - w)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        y = np.pad(y, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        h, w = y.shape
        fg = np.argwhere(y > 0)
        if len(fg) and rng.random() < 0.7:
            cy, cx = fg[rng.integers(len(fg))]
            top = int(np.clip(cy - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, h - size))
            left = int(np.clip(cx - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, w - size))
        else:
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        x, y = x[:, top:top + size, left:left + size], y[top:top + size, left:left + size]
        if rng.random() < 0.5:  # left-right flip (seed 002: flips)
            x, y = x[:, :, ::-1], y[:, ::-1]
        if rng.random() < 0.2:
            x, y = x[:, ::-1], y[::-1]
        x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.15, 0.15) + rng.normal(0, 0.05, x.shape)
        xs.append(np.ascontiguousarray(x, dtype=np.float32))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))[:, None]


def split_blocks(p: Prepared, block: int = 12, every: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Training / held-back slice indices: every ``every``-th block of ``block`` slices is held back."""
    held = (p.keep // block) % every == every - 1
    return p.keep[~held], p.keep[held]


def network_config(cfg: Config | None = None) -> dict:
    stacks = 2 if cfg is not None and cfg.t1 else 1
    return {**CARD.network.config, "in_channels": CARD.preprocessing.context_slices * stacks,
            "out_channels": CARD.output_channels}


def weights_preprocessing(cfg: Config) -> dict:
    return {"extra_inputs": ["t1"]} if cfg.t1 else {}


def read_case(case: dict, cfg: Config) -> tuple[Image, np.ndarray, tuple[Image, ...]]:
    """FLAIR, lesion labels and (with --t1) the T1 resampled onto the FLAIR, as inference does."""
    from SpineKneeSegLib.preprocessing import resample_onto

    image = read_image(case["flair"])
    extras = (resample_onto(read_image(case["t1"]), image),) if cfg.t1 else ()
    return image, read_image(case["labels"]).array, extras


@torch.no_grad()
def held_back_dice(net, pool: list[Prepared], held: dict[str, np.ndarray]) -> float:
    net.eval()
    tp = total = 0.0
    for case in pool:
        idx = held[case.id]
        for start in range(0, len(idx), 16):
            chunk = idx[start:start + 16]
            x = torch.from_numpy(case.channels(chunk))
            h, w = x.shape[-2:]
            ph, pw = (-h) % 8, (-w) % 8
            pred = net(F.pad(x, (0, pw, 0, ph)))[..., :h, :w][:, 0] > 0
            y = torch.from_numpy(case.y[chunk] > 0)
            tp += float((pred & y).sum())
            total += float(pred.sum() + y.sum())
    return 2 * tp / total if total else 1.0


def train(cfg: Config, cases: list[dict], out: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    thin, slabs = [], []
    for case in cases:
        image, labels, extras = read_case(case, cfg)
        thin.append(prepare(case["id"], image, labels, cfg, extras))
        for thickness in (float(t) for t in cfg.slab_mm.split(",")):
            for phase in range(cfg.slab_phases):
                offset = thickness * phase / cfg.slab_phases
                slab_image, slab_labels = simulate_slabs(image, labels, thickness, offset)
                slab_extras = tuple(simulate_slabs(e, labels, thickness, offset)[0] for e in extras)
                slabs.append(prepare(f"{case['id']}@{thickness:g}mm+{offset:g}", slab_image, slab_labels, cfg,
                                     slab_extras))
        for acq in draw_acquisitions(rng, cfg.geometries):
            sim_image, sim_labels = simulate_acquisition(image, labels, acq)
            sim_extras = tuple(simulate_acquisition(e, labels, acq)[0] for e in extras)
            slabs.append(prepare(f"{case['id']}@{acq.label()}", sim_image, sim_labels, cfg, sim_extras))
    train_idx, held_idx = {}, {}
    for p in thin:
        train_idx[p.id], held_idx[p.id] = split_blocks(p)
    for p in slabs:
        train_idx[p.id] = p.keep
    net = build_network(CARD.network.factory, network_config(cfg))
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=0.2, patience=5)
    criterion = make_loss(cfg)
    best, best_epoch, history = -1.0, 0, []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        net.train()
        losses = []
        for _ in range(cfg.steps_per_epoch):
            pool = slabs if rng.random() < cfg.slab_fraction else thin
            x, y = sample_batch(pool, cfg, rng, train_idx)
            optimiser.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        dice = held_back_dice(net, thin, held_idx)
        scheduler.step(dice)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "held_back_dice": round(dice, 4),
                        "lr": optimiser.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)})
        log(json.dumps(history[-1]))
        if dice > best:
            best, best_epoch = dice, epoch
            save_checkpoint(out / "best.pt", CARD.name, CARD.network.factory, network_config(cfg), net.state_dict(),
                            preprocessing=weights_preprocessing(cfg),
                            metadata={"epoch": epoch, "held_back_dice": dice, "config": asdict(cfg),
                                      "trained_on": [c["id"] for c in cases]})
        if epoch - best_epoch >= cfg.patience:
            break
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return {"best_held_back_dice": best, "best_epoch": best_epoch, "epochs": len(history)}


# ---- evaluation ----------------------------------------------------------------------------------

def baseline_threshold(image: Image, z: float) -> np.ndarray:
    """The baseline: FLAIR z-score inside the brain above ``z``."""
    normalised = normalise(image.array, CARD.preprocessing.normalisation)
    return ((normalised > z) & (image.array > 0)).astype(np.uint8)


def fit_baseline(cases: list[dict]) -> float:
    """The z threshold with the best mean Dice on the given (training) cases."""
    grid = np.arange(0.5, 5.01, 0.25)
    scores = np.zeros(len(grid))
    for case in cases:
        image, truth = read_image(case["flair"]), read_image(case["labels"]).array > 0
        for n, z in enumerate(grid):
            pred = baseline_threshold(image, z) > 0
            scores[n] += 2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)
    return float(grid[int(scores.argmax())])


EVAL_VIEWS = {"1mm": None, "3mm": 3.0, "5mm": 5.0, f"{EVAL_SLAB_MM:g}mm": EVAL_SLAB_MM}  # native + axial slabs


def eval_views(case: dict, cfg: Config):
    """(name, image, truth, extras) of a case at its native geometry and resliced to thick axial
    slabs (averaged 1 mm slices; a slab voxel is lesion when >= half its slices are)."""
    image, labels, extras = read_case(case, cfg)
    for name, mm in EVAL_VIEWS.items():
        if mm is None:
            yield name, image, labels, extras
        else:
            slab, truth = simulate_slabs(image, labels, mm)
            yield name, slab, truth, tuple(simulate_slabs(e, labels, mm)[0] for e in extras)


def evaluate_case(net, case: dict, z_baseline: float, cfg: Config, out: Path | None = None) -> dict:
    """Metrics with the plain 0.5 cut (the decoder is chosen afterwards, by ``wmh_selection``,
    from the probabilities saved to ``out/probabilities.npz``)."""
    result, saved = {}, {}
    for name, img, truth, ext in eval_views(case, cfg):
        spacing_kji = tuple(img.spacing[::-1])
        t0 = time.perf_counter()
        net_out = segment_slices(CARD, img, net, torch.device("cpu"), batch_size=8, extra=ext, keep_probabilities=True)
        saved[name] = net_out.probabilities[0]
        result[name] = {"model": all_metrics(net_out.labels, truth, spacing_kji),
                        "seconds": round(time.perf_counter() - t0, 2),
                        "baseline": all_metrics(baseline_threshold(img, z_baseline), truth, spacing_kji)}
    if out is not None:
        np.savez_compressed(out / "probabilities.npz", **saved)
    return result


def loo(cfg: Config, root: Path, out: Path) -> dict:
    """Leave-one-case-out; a fold whose ``fold.json`` exists is not redone (resumable)."""
    cases = brain_cases(root)
    folds = {}
    for held in cases:
        train_cases = [c for c in cases if c is not held]
        fold_out = out / f"fold-{held['id']}"
        if (fold_out / "fold.json").exists() and (fold_out / "probabilities.npz").exists():
            folds[held["id"]] = json.loads((fold_out / "fold.json").read_text())
            continue
        info = train(cfg, train_cases, fold_out)
        from SpineKneeSegLib.inference import load_network
        from SpineKneeSegLib.weights import resolve_weights

        net = load_network(resolve_weights(CARD, fold_out / "best.pt"), torch.device("cpu"))
        z = fit_baseline(train_cases)
        folds[held["id"]] = {"training": info, "baseline_z": z, **evaluate_case(net, held, z, cfg, fold_out)}
        (fold_out / "fold.json").write_text(json.dumps(folds[held["id"]], indent=2, default=float))
    summary = {}
    for res in EVAL_VIEWS:
        for who in ("model", "baseline"):
            summary[f"{who}@{res}"] = {
                "dice": float(np.mean([f[res][who]["wmh2017"]["dice"] for f in folds.values()])),
                "lesion_f1": float(np.mean([f[res][who]["wmh2017"]["lesion_f1"] for f in folds.values()])),
                "hd95_mm": float(np.median([f[res][who]["wmh2017"]["hd95_mm"] for f in folds.values()])),
                "avd_percent": float(np.mean([f[res][who]["wmh2017"]["avd_percent"] for f in folds.values()])),
                "f3": float(np.mean([f[res][who]["seed002"]["f3"] for f in folds.values()]))}
    result = {"folds": folds, "summary": summary, "config": asdict(cfg)}
    (out / "loo.json").write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(summary, indent=2))
    return result


def previous_table(previous: dict | None) -> str:
    """The same leave-one-out means of an earlier run (e.g. the version this one replaces)."""
    if not previous:
        return ""
    rows = "\n".join(f"| {k} | {v['dice']:.3f} | {v['lesion_f1']:.3f} | {v['hd95_mm']:.1f} | {v['avd_percent']:.0f} | "
                     f"{v['f3']:.3f} |" for k, v in previous["summary"].items() if k.startswith("model"))
    return f"""
{previous['label']}, same protocol:

| model@slices | Dice | lesion F1 | HD95 mm | AVD % | F3 |
|---|---|---|---|---|---|
{rows}
"""


def repeat_table(repeat: dict | None, summary: dict) -> str:
    """The same recipe's leave-one-out with another training seed: how much of a difference is luck."""
    if not repeat:
        return ""
    key = f"model@{EVAL_SLAB_MM:g}mm"
    again = repeat["summary"][key]
    both = {m: (summary[key][m] + again[m]) / 2 for m in ("dice", "lesion_f1")}
    verdict = ("met" if again["dice"] >= 0.5 and again["lesion_f1"] >= 0.5 else "**not met**")
    rows = "\n".join(f"| {case} | {res} | {fold[res]['model']['wmh2017']['dice']:.3f} | "
                     f"{fold[res]['model']['wmh2017']['lesion_f1']:.3f} |"
                     for case, fold in repeat["folds"].items() for res in ("1mm", f"{EVAL_SLAB_MM:g}mm"))
    means = "\n".join(f"| mean | {k.split('@')[1]} | {v['dice']:.3f} | {v['lesion_f1']:.3f} |"
                      for k, v in repeat["summary"].items() if k.startswith("model"))
    return f"""
The same recipe repeated with training seed {repeat['seed']} ({repeat['label']}):

| case | slices | Dice | lesion F1 |
|---|---|---|---|
{rows}
{means}

Target on the {EVAL_SLAB_MM:g} mm slabs with seed {repeat['seed']}: {verdict} (Dice {again['dice']:.3f}, lesion F1
{again['lesion_f1']:.3f}). Mean of the two seeds' leave-one-out means: Dice {both['dice']:.3f}, lesion F1
{both['lesion_f1']:.3f}. The seed-to-seed difference is as large as the margin to the target.
"""


def model_card(version: str, loo_result: dict, final: dict, cfg: dict, previous: dict | None = None,
               repeat: dict | None = None) -> str:
    rows = []
    for case, fold in loo_result["folds"].items():
        for res in ("1mm", f"{EVAL_SLAB_MM:g}mm"):
            m, b = fold[res]["model"], fold[res]["baseline"]
            rows.append(f"| {case} | {res} | {m['wmh2017']['dice']:.3f} | {m['wmh2017']['lesion_f1']:.3f} | "
                        f"{m['wmh2017']['hd95_mm']:.1f} | {m['wmh2017']['avd_percent']:.0f} | {m['seed002']['f3']:.3f} | "
                        f"{b['wmh2017']['dice']:.3f} | {b['wmh2017']['lesion_f1']:.3f} |")
    summary = "\n".join(f"| {k} | {v['dice']:.3f} | {v['lesion_f1']:.3f} | {v['hd95_mm']:.1f} | {v['avd_percent']:.0f} | "
                        f"{v['f3']:.3f} |" for k, v in loo_result["summary"].items())
    thick = loo_result["summary"][f"model@{EVAL_SLAB_MM:g}mm"]
    t1 = bool(cfg.get("t1"))
    inputs = ("3 adjacent axial FLAIR slices and the same 3 of the T1 (resampled onto the FLAIR grid)"
              if t1 else "3 adjacent axial slices")
    t1_limit = ("- Needs a T1 in the FLAIR's space (one study, or co-registered): `run FLAIR T1` picks this model\n"
                "  (registry entry `brain-wmh-t1`); FLAIR alone runs the FLAIR-only `brain-wmh` model."
                if t1 else "- The optional T1 input is not used by this model (a registered `brain-wmh-t1` model is).")
    return f"""# Model card: {entry_name(cfg)} v{version}

**Status: starter model trained on 3 FLAIR volumes.** That is far too little data for clinical
use or for any claim beyond these figures. Not a medical device.

## What it does
Task `brain-wmh`: white-matter / MS lesion mask (label 1) on skull-stripped FLAIR. Network: seed
002's 2.5D U-Net with attention gates ({json.dumps(CARD.network.config)}), {inputs} in,
one sigmoid channel out.

## Data
open-ms (Lesjak et al., Neuroinformatics 16:51, 2018; via muschellij2/open_ms_data): patients 07,
19, 26 — 1 mm isotropic FLAIR (skull-stripped, N4-corrected, MNI space, 182x218x182) with
consensus MS lesion masks (1 300, 49 769 and 8 227 voxels){"; the T1 volumes of the same cases" if t1 else ""}.
Licence CC BY.

## Preprocessing
Axial canonical slices, z-score over the brain, 1 mm in-plane; inference only on slices holding
brain, inside the brain's bounding box; probabilities (not labels) resampled back to the input grid.

## Training
Focal Tversky loss (alpha {cfg['alpha']}, beta {cfg['beta']}, gamma {cfg['gamma']:.3f}, smoothing {cfg['smooth']}), Adam lr
{cfg['lr']} (seed 002 uses 1e-4; 1e-3 was needed to converge within a CPU session),
ReduceLROnPlateau x0.2 / 5 epochs, {cfg['steps_per_epoch']} batches of {cfg['batch_size']} {cfg['patch']}x{cfg['patch']} patches an
epoch, at most {cfg['epochs']} epochs; slices with intensity entropy < {cfg['min_entropy_bits']} bits dropped; flips,
gain/offset/noise; {int(cfg['slab_fraction'] * 100)} % of batches from simulated {cfg.get('slab_mm', '3,5,8')} mm slabs
({cfg.get('slab_phases', 1)} slab phase(s) each). Early stopping on
held-back slice blocks of the training volumes. Final model: all 3 volumes, best epoch
{final.get('best_epoch')} of {final.get('epochs')}.

## Leave-one-out (each case predicted by a model trained on the other two)
Baseline: FLAIR z-score inside the brain above a threshold chosen on the two training cases.
Thick slices: the left-out case resliced to {EVAL_SLAB_MM:g} mm slabs (averaged 1 mm
slices{"; the T1 too" if t1 else ""}).
A slab voxel is lesion when at least half its 1 mm slices are, so the slab truth loses many of the
smallest lesions: figures at the two resolutions measure different tasks and are not comparable.

| case | slices | Dice | lesion F1 | HD95 mm | AVD % | F3 | baseline Dice | baseline lesion F1 |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Means (HD95: median):

| model@slices | Dice | lesion F1 | HD95 mm | AVD % | F3 |
|---|---|---|---|---|---|
{summary}
{previous_table(previous)}
Target on the {EVAL_SLAB_MM:g} mm slabs (Dice >= 0.5 and lesion F1 >= 0.5):
{"met" if thick["dice"] >= 0.5 and thick["lesion_f1"] >= 0.5 else "**not met**"} (Dice {thick["dice"]:.3f}, lesion F1
{thick["lesion_f1"]:.3f}). With three volumes each fold trains on two, and single cases swing:
between brain-wmh v0.1.0 and v0.2.0, which differ only in the simulated slabs, one case's 7.5 mm Dice
rose by 0.20 and another's fell by 0.12. Differences of a few hundredths in the means are not evidence.
{repeat_table(repeat, loo_result["summary"])}

## Known limits
- Three MS patients from one public dataset, registered to MNI: nothing is known about other
  scanners, non-registered FLAIR, small-vessel WMH in older patients, or tumours.
- FLAIR must be skull-stripped. `run` refuses FLAIR that does not look stripped (SpineKneeSegLib/skullstrip.py:
  background share, brain volume, largest axial section); `--skull-stripped yes` overrides.
{t1_limit}

## Licence of the data
open-ms: CC BY (cite Lesjak et al. 2018).

Generated by Training/brain_wmh.py from its own leave-one-out run.
"""


def entry_name(cfg: dict) -> str:
    """Registry entry: weights trained with the T1 are a model of their own, picked when a T1 is given."""
    return "brain-wmh-t1" if cfg.get("t1") else "brain-wmh"


def ship(out: Path, version: str, previous: Path | None = None, repeat: Path | None = None) -> int:
    """Register the final model only when it beats the baseline in leave-one-out (mean Dice at
    both 1 mm and the thick-slab version)."""
    from SpineKneeSegLib.weights import models_dir, register_model

    loo_result = json.loads((out / "loo.json").read_text())
    s = loo_result["summary"]
    beaten = all(s[f"model@{r}"]["dice"] > s[f"baseline@{r}"]["dice"] for r in ("1mm", f"{EVAL_SLAB_MM:g}mm"))
    if not beaten:
        print(f"not shipping: the model does not beat the baseline in leave-one-out: {json.dumps(s)}", file=sys.stderr)
        return 1
    final = json.loads((out / "final" / "final.json").read_text())
    checkpoint_cfg = torch.load(out / "final" / "best.pt", map_location="cpu", weights_only=True)["metadata"]["config"]
    name = entry_name(checkpoint_cfg)
    target = models_dir() / f"{name}-{version}.pt"
    card = models_dir() / f"{name}-{version}.md"
    import shutil

    shutil.copyfile(out / "final" / "best.pt", target)
    before = None
    if previous is not None:
        label = f"{'The FLAIR-only model' if name != 'brain-wmh' else 'Previous version'} (run {previous})"
        before = {**json.loads((previous / "loo.json").read_text()), "label": label}
    again = None
    if repeat is not None:
        again = {**json.loads((repeat / "loo.json").read_text()), "label": f"run {repeat}",
                 "seed": torch.load(next((repeat).glob("fold-*/best.pt")), map_location="cpu",
                                    weights_only=True)["metadata"]["config"]["seed"]}
    card.write_text(model_card(version, loo_result, final, checkpoint_cfg, before, again))
    m = s[f"model@{EVAL_SLAB_MM:g}mm"]
    entry = register_model(target, name, version, card=card.name,
                           description=f"starter {name} (3 volumes): LOO Dice {s['model@1mm']['dice']:.3f} at 1 mm, "
                                       f"{m['dice']:.3f} at {EVAL_SLAB_MM:g} mm")
    print(f"registered {entry.file} sha256 {entry.sha256}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("loo", "final", "ship"))
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--out", default="Training/runs/brain-wmh")
    parser.add_argument("--data")
    parser.add_argument("--previous", type=Path, help="ship: a former run folder whose LOO means the card also shows")
    parser.add_argument("--repeat", type=Path, help="ship: this recipe's LOO run with another --seed (card shows it)")
    for name, value in asdict(Config()).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    root = Path(args.data) if args.data else data_root()
    if root is None or not (root / "brain" / "open-ms").exists():
        print("no brain data: set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config())})
    if args.command == "loo":
        loo(cfg, root, Path(args.out))
    elif args.command == "final":
        info = train(cfg, brain_cases(root), Path(args.out) / "final")
        (Path(args.out) / "final" / "final.json").write_text(json.dumps(info))
        print(json.dumps(info))
    else:
        return ship(Path(args.out), args.version, args.previous, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
