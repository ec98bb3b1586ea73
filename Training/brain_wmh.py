"""Train and evaluate the WMH / MS-lesion model (seed 002: 2.5D attention U-Net on FLAIR) on
../shared/data/brain/open-ms, leave-one-out, against a FLAIR z-score threshold baseline.

    python Training/brain_wmh.py loo --out Training/runs/brain-wmh [--epochs 40]   # 3 folds + baseline (resumable)
    python Training/brain_wmh.py final --out Training/runs/brain-wmh               # all 3 cases -> best.pt
    python Training/brain_wmh.py ship --out Training/runs/brain-wmh --version 0.3.0 [--compare OTHER_RUN]
        # decoding rules chosen by Training/wmh_selection.py go into the checkpoint; only if it beats the baseline

Options: every Config field (e.g. --t1 adds the T1, resampled onto the FLAIR, as 3 more channels;
--slab-mm 3,5,7.5,8 --slab-phases 2 simulates more thick-slice acquisitions; --geometries 8 adds
random clinical acquisitions; --loss blob the lesion-aware loss; --synthetic-copies 2 adds copies of
each training volume with 40 small synthetic lesions painted in, synthetic_lesions.py).

Preprocessing is the task card's own (axial canonical slices, z-score inside the brain, 1 mm
in-plane). Training slices whose intensity entropy is < 2 bits are dropped (seed 002); each epoch
also sees the training volumes as simulated thick slabs (3-8 mm, averaged 1 mm slices) so the
model serves thick-slice clinical FLAIR. Early stopping uses held-back slice blocks of the
training volumes, never the left-out case. Evaluation runs the Lib's inference on the left-out
case at 1 mm and resliced to 3, 5 and 7.5 mm slabs, and saves its probabilities for the decoder
selection (Training/wmh_selection.py).
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
from clinical_geometry import draw_acquisitions, simulate_acquisition  # noqa: E402
from synthetic_lesions import insert_lesions
from SpineKneeSegLib.core.datasets import data_root  # noqa: E402
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.core.image_io import read_image  # noqa: E402
from SpineKneeSegLib.engine.inference import segment_slices  # noqa: E402
from SpineKneeSegLib.engine.models import build_network  # noqa: E402
from SpineKneeSegLib.engine.preprocessing import (  # noqa: E402
    context_channels,
    normalise,
    slice_axis,
    training_slices,
)
from SpineKneeSegLib.engine.weights import save_checkpoint  # noqa: E402
from SpineKneeSegLib.tasks import TASKS  # noqa: E402
from SpineKneeSegLib.core.atomic import write_text_atomic  # noqa: E402
from evalhelpers import dice_or
from modelcard import publish, render
from trainloop import Evaluation, LoopConfig, rank_stream, run_loop, seed_everything
from wmh_metrics import all_metrics  # noqa: E402

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
    synthetic_copies: int = 0  # copies of each training volume with small synthetic lesions (synthetic_lesions.py)
    synthetic_lesions: int = 40  # lesions painted into each copy
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
    from SpineKneeSegLib.engine.preprocessing import resample_onto

    image = read_image(case["flair"])
    extras = (resample_onto(read_image(case["t1"]), image),) if cfg.t1 else ()
    return image, read_image(case["labels"]).array, extras


@torch.no_grad()
def held_back_dice(net, pool: list[Prepared], held: dict[str, np.ndarray]) -> float:
    net.eval()
    preds, truths = [], []
    for case in pool:
        idx = held[case.id]
        for start in range(0, len(idx), 16):
            chunk = idx[start:start + 16]
            x = torch.from_numpy(case.channels(chunk))
            h, w = x.shape[-2:]
            ph, pw = (-h) % 8, (-w) % 8
            pred = net(F.pad(x, (0, pw, 0, ph)))[..., :h, :w][:, 0] > 0
            y = torch.from_numpy(case.y[chunk] > 0)
            preds.append(pred.flatten())
            truths.append(y.flatten())
    return dice_or(torch.cat(preds), torch.cat(truths), empty=1.0) if preds else 1.0


def train(cfg: Config, cases: list[dict], out: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    seed_everything(cfg.seed)
    thin, slabs, painted = [], [], []
    for case in cases:
        image, labels, extras = read_case(case, cfg)
        thin.append(prepare(case["id"], image, labels, cfg, extras))
        volumes = [(case["id"], image, labels)]
        for copy in range(cfg.synthetic_copies):
            array, copy_labels, _ = insert_lesions(image.array, labels, image.spacing[::-1], rng, cfg.synthetic_lesions)
            volumes.append((f"{case['id']}+synthetic{copy}", image.with_array(array), copy_labels))
            painted.append(prepare(volumes[-1][0], volumes[-1][1], copy_labels, cfg, extras))
        for name, vol, vol_labels in volumes:
            for thickness in (float(t) for t in cfg.slab_mm.split(",")):
                for phase in range(cfg.slab_phases):
                    offset = thickness * phase / cfg.slab_phases
                    slab_image, slab_labels = simulate_slabs(vol, vol_labels, thickness, offset)
                    slab_extras = tuple(simulate_slabs(e, vol_labels, thickness, offset)[0] for e in extras)
                    slabs.append(prepare(f"{name}@{thickness:g}mm+{offset:g}", slab_image, slab_labels, cfg,
                                         slab_extras))
        for acq in draw_acquisitions(rng, cfg.geometries):
            sim_image, sim_labels = simulate_acquisition(image, labels, acq)
            sim_extras = tuple(simulate_acquisition(e, labels, acq)[0] for e in extras)
            slabs.append(prepare(f"{case['id']}@{acq.label()}", sim_image, sim_labels, cfg, sim_extras))
    train_idx, held_idx = {}, {}
    for p in thin:
        train_idx[p.id], held_idx[p.id] = split_blocks(p)
    for p in painted:  # same anatomy as its volume: never trained on that volume's held-back blocks
        train_idx[p.id] = split_blocks(p)[0]
    for p in slabs:
        train_idx[p.id] = p.keep
    net = build_network(CARD.network.factory, network_config(cfg))
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=0.2, patience=5)
    criterion = make_loss(cfg)

    rng = rank_stream(rng, cfg.seed)  # the data above is every rank's; the batches each rank's own

    def batches(_step):
        while True:
            pool = slabs if rng.random() < cfg.slab_fraction else thin + painted
            yield sample_batch(pool, cfg, rng, train_idx)

    def evaluate(net):
        dice = held_back_dice(net, thin, held_idx)
        return Evaluation(dice, {"held_back_dice": round(dice, 4)}, {"val/held_back_dice": dice})

    def save_best(path, net, state, evaluation):
        save_checkpoint(path, CARD.name, CARD.network.factory, network_config(cfg), net.state_dict(),
                        preprocessing=weights_preprocessing(cfg),
                        metadata={"epoch": state["epoch"], "held_back_dice": evaluation.score, "config": asdict(cfg),
                                  "trained_on": [c["id"] for c in cases]})

    loop = LoopConfig(steps=cfg.epochs * cfg.steps_per_epoch, eval_every=cfg.steps_per_epoch, patience=cfg.patience,
                      scheduler_on="evaluation", seed=cfg.seed, round_loss=None)
    state = run_loop(net, optimiser, batches, lambda n, b: criterion(n(b[0]), b[1]), loop, out, scheduler=scheduler,
                     evaluate=evaluate, save_best=save_best, rng=rng, extra={"config": asdict(cfg)}, log=log)
    history = [{k: h[k] for k in ("epoch", "loss", "held_back_dice", "lr", "seconds")} for h in state["history"]]
    write_text_atomic(out / "history.json", json.dumps(history, indent=2))
    return {"best_held_back_dice": state["best"], "best_epoch": state["best_epoch"], "epochs": state["epoch"]}


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


def loo(cfg: Config, root: Path, out: Path, only: list[str] | None = None) -> dict:
    """Leave-one-case-out; a fold whose ``fold.json`` exists is not redone (resumable). ``only``:
    run just these folds (e.g. side by side in two processes); the summary waits for all."""
    cases = brain_cases(root)
    folds = {}
    for held in cases:
        if only and held["id"] not in only:
            continue
        train_cases = [c for c in cases if c is not held]
        fold_out = out / f"fold-{held['id']}"
        if (fold_out / "fold.json").exists() and (fold_out / "probabilities.npz").exists():
            folds[held["id"]] = json.loads((fold_out / "fold.json").read_text(encoding="utf-8"))
            continue
        info = train(cfg, train_cases, fold_out)
        from SpineKneeSegLib.engine.inference import load_network
        from SpineKneeSegLib.engine.weights import resolve_weights

        net = load_network(resolve_weights(CARD, fold_out / "best.pt"), torch.device("cpu"))
        z = fit_baseline(train_cases)
        folds[held["id"]] = {"training": info, "baseline_z": z, **evaluate_case(net, held, z, cfg, fold_out)}
        write_text_atomic(fold_out / "fold.json", json.dumps(folds[held["id"]], indent=2, default=float))
    if len(folds) < len(cases):
        print(f"folds done: {sorted(folds)}; the summary needs all {len(cases)}")
        return {"folds": folds}
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
    write_text_atomic(out / "loo.json", json.dumps(result, indent=2, default=float))
    print(json.dumps(summary, indent=2))
    return result


def variant_table(runs: dict[str, dict]) -> str:
    """Means per slice thickness of each variant's leave-one-out, with both decoders."""
    rows = []
    for label, sel in runs.items():
        for view, m in sel["summary"]["nested"].items():
            plain = sel["summary"]["plain_0.5"][view]
            rows.append(f"| {label} | {view} | {m['dice']:.3f} | {m['lesion_recall']:.3f} | {m['lesion_f1']:.3f} | "
                        f"{plain['dice']:.3f} | {plain['lesion_f1']:.3f} |")
    return ("| variant | slices | Dice, chosen rules | lesion recall, chosen rules | lesion F1, chosen rules | "
            "Dice, 0.5 cut | lesion F1, 0.5 cut |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def verdict(summary: dict) -> str:
    thick, native = summary[f"{EVAL_SLAB_MM:g}mm"], summary["1mm"]
    parts = [f"{EVAL_SLAB_MM:g} mm lesion F1 {thick['lesion_f1']:.3f} (>= 0.5: {'met' if thick['lesion_f1'] >= 0.5 else 'NOT met'})",
             f"{EVAL_SLAB_MM:g} mm Dice {thick['dice']:.3f} (>= 0.6: {'met' if thick['dice'] >= 0.6 else 'NOT met'})",
             f"native lesion F1 {native['lesion_f1']:.3f} (>= 0.6: {'met' if native['lesion_f1'] >= 0.6 else 'NOT met'})"]
    return "; ".join(parts)


def model_card(version: str, cfg: dict, final: dict, selection: dict, selection_md: str, variants: dict,
               minutes: dict, notes: str = "") -> str:
    from wmh_selection import MIN_VOLUMES_MM3, THRESHOLDS

    t1 = bool(cfg.get("t1"))
    inputs = ("3 adjacent axial FLAIR slices and the same 3 of the T1 (resampled onto the FLAIR grid)"
              if t1 else "3 adjacent axial slices")
    t1_limit = ("- Needs a T1 in the FLAIR's space (one study, or co-registered): `run FLAIR T1` picks this model\n"
                "  (registry entry `brain-wmh-t1`); FLAIR alone runs the FLAIR-only `brain-wmh` model."
                if t1 else "- The optional T1 input is not used by this model (a registered `brain-wmh-t1` model is).")
    from wmh_selection import DECODER_MARGIN, shipped_decoder

    decoder = shipped_decoder(selection)
    chosen = selection["rules_all_cases"]
    rule_text = "; ".join(f"{'slices up to ' + format(r['max_slice_mm'], 'g') + ' mm' if r['max_slice_mm'] else 'thicker slices'}: "
                          f"probability >= {r['threshold']:.2f}, lesions >= {r['min_volume_mm3']:g} mm3" for r in chosen)
    f1 = {who: sum(v["lesion_f1"] for v in selection["summary"][who].values()) / len(selection["summary"][who])
          for who in ("nested", "plain_0.5")}
    decoding = (f"""The mask is decoded from the probability by rules chosen for lesion F1 on all three
leave-one-out cases ({rule_text}; the thickest voxel side of the input picks the rule), stored in
the checkpoint and reported in `report.json` under `summaries.lesion_decoding`. Chosen on the other
cases, such rules beat the plain 0.5 cut in leave-one-out (mean lesion F1 over 1, 3, 5 and 7.5 mm:
{f1['nested']:.4f} against {f1['plain_0.5']:.4f}).""" if decoder == "nested" else
                f"""The mask is the seed's plain 0.5 cut of the probability (stored in the checkpoint as the
decoding rule, reported in `report.json` under `summaries.lesion_decoding`). A decoder chosen for
lesion F1 — a probability threshold ({THRESHOLDS[0]}-{THRESHOLDS[-1]}) and a minimum lesion volume
({", ".join(f"{v:g}" for v in MIN_VOLUMES_MM3)} mm3), one rule for slices up to 2 mm and one for
thicker — was tried by leave-one-case-out, each case decoded by the rules chosen on the other two,
and did not beat the plain cut by the required {DECODER_MARGIN} (mean lesion F1 over 1, 3, 5 and 7.5 mm:
{f1['nested']:.4f} against {f1['plain_0.5']:.4f}): with two cases to choose on, a rule does not
transfer to the third. The rules all three cases would pick ({rule_text}) are therefore not shipped.""")
    geometries = (f" and {cfg['geometries']} random acquisitions per volume (Training/clinical_geometry.py: slice "
                  "thickness 3-8 mm with partial-volume averaging along a random acquisition axis, in-plane pixels "
                  "0.4-1.2 mm, labels carried the same way and kept where >= 50 %)" if cfg.get("geometries") else
                  " (averaged 1 mm slices, labels kept where >= 50 %; no random acquisition axes: they cost Dice, "
                  "see the variants)")
    loss = ("blob loss (Kofler et al. 2023): the seed's focal Tversky over the patch plus, weighted "
            f"{cfg['blob_weight']}, the mean of the same loss over each true lesion and the background"
            if cfg["loss"] == "blob" else "the seed's focal Tversky loss")
    return render(f"{entry_name(cfg)} v{version}", [
        ("What it does", f"""Task `brain-wmh`: white-matter / MS lesion mask (label 1) on skull-stripped FLAIR, and a table of
its 26-connected lesions. Network: seed 002's 2.5D U-Net with attention gates
({json.dumps(CARD.network.config)}), {inputs} in, one sigmoid channel out.

{decoding} The decoder only removes whole lesions, so two lesions apart in the thresholded mask
are never merged; inputs with voxels thicker than 3 mm get a note that thin lesions may be
averaged away."""),
        ("Data", f"""open-ms (Lesjak et al., Neuroinformatics 16:51, 2018; via muschellij2/open_ms_data): patients 07,
19, 26 — 1 mm isotropic FLAIR (skull-stripped, N4-corrected, MNI space, 182x218x182) with
consensus MS lesion masks (1 300, 49 769 and 8 227 voxels){"; the T1 volumes of the same cases" if t1 else ""}.
Licence CC BY."""),
        ("Preprocessing", """Axial canonical slices, z-score over the brain, 1 mm in-plane; inference only on slices holding
brain, inside the brain's bounding box; probabilities resampled back to the input grid, then decoded."""),
        ("Training", f"""{loss} (alpha {cfg['alpha']}, beta {cfg['beta']}, gamma {cfg['gamma']:.3f}, smoothing {cfg['smooth']}); Adam lr
{cfg['lr']} (seed 002: 1e-4; 1e-3 converges within a CPU session), ReduceLROnPlateau x0.2 / 5 epochs,
{cfg['steps_per_epoch']} batches of {cfg['batch_size']} {cfg['patch']}x{cfg['patch']} patches an epoch, at most
{cfg['epochs']} epochs, early stopping on held-back slice blocks of the training volumes; slices with intensity
entropy < {cfg['min_entropy_bits']} bits dropped; flips, gain/offset/noise. {int(cfg['slab_fraction'] * 100)} % of
batches come from simulated thick-slice acquisitions of the training volumes: axial slabs of {cfg['slab_mm']} mm
({cfg['slab_phases']} phases each){geometries}. Final model: all 3 volumes, best epoch
{final.get('best_epoch')} of {final.get('epochs')}."""),
        ("Leave-one-case-out (each case predicted by a model trained on the other two)", f"""Each case is scored at its native 1 mm geometry and resliced to 3, 5 and 7.5 mm axial slabs
(averaged 1 mm slices; a slab voxel is lesion when at least half its slices are, so the slab truth
has fewer, larger lesions: the figures at different thicknesses measure different tasks). Any
decoding rule that scores a case was chosen on the other two cases' left-out probabilities only.
Metrics: WMH-2017 (Dice, HD95, AVD, lesion recall and F1 on 26-connected lesions, any overlap).

{selection_md}

Targets of issue 22: {verdict(selection["summary"][decoder])}."""),
        ("Variants compared (same data, folds and schedule; rules chosen on the other cases, and the seed's plain 0.5 cut)", f"""{variant_table(variants)}

{notes}"""),
        ("Known limits", f"""- Three MS patients from one public dataset, registered to MNI: nothing is known about other
  scanners, non-registered FLAIR, small-vessel WMH in older patients, or tumours.
- Lesions of fewer than 10 voxels are the ones missed (see the bracket table); on thick slabs
  they are mostly gone from the truth as well.
- FLAIR must be skull-stripped. `run` refuses FLAIR that does not look stripped (SpineKneeSegLib/tasks/brain/skullstrip.py:
  background share, brain volume, largest axial section); `--skull-stripped yes` overrides.
{t1_limit}"""),
        ("How it was made", f"""Training/brain_wmh.py (loo, final, ship) and Training/wmh_selection.py; commands in Training/README.md.
On 2 CPU cores: leave-one-out {minutes.get('loo', '?')} min per variant (two variants side by side,
one thread each), final model {minutes.get('final', '?')} min."""),
        ("Licence of the data", """open-ms: CC BY (cite Lesjak et al. 2018)."""),
    ], """**Status: starter model trained on 3 FLAIR volumes.** That is far too little data for clinical
use or for any claim beyond these figures. Not a medical device.""")


def entry_name(cfg: dict) -> str:
    """Registry entry: weights trained with the T1 are a model of their own, picked when a T1 is given."""
    return "brain-wmh-t1" if cfg.get("t1") else "brain-wmh"


def ship(out: Path, version: str, compare: list[Path], minutes: dict, notes: str = "") -> int:
    """Register the final model with the decoding rules chosen on every left-out case, only when
    it beats the baseline in leave-one-out (mean Dice at 1 mm and on the thick slabs)."""
    from SpineKneeSegLib.engine.weights import (
        load_checkpoint,
    )
    from wmh_selection import markdown, report, shipped_decoder, shipped_rules

    loo_result = json.loads((out / "loo.json").read_text(encoding="utf-8"))
    s = loo_result["summary"]
    beaten = all(s[f"model@{r}"]["dice"] > s[f"baseline@{r}"]["dice"] for r in ("1mm", f"{EVAL_SLAB_MM:g}mm"))
    if not beaten:
        print(f"not shipping: the model does not beat the baseline in leave-one-out: {json.dumps(s)}", file=sys.stderr)
        return 1
    selection = report(out)
    variants = {f"{out.name}: {loo_result['config']['loss']} (shipped)": selection}
    for other in compare:
        loss = json.loads((other / "loo.json").read_text(encoding="utf-8"))["config"]["loss"]
        variants[f"{other.name}: {loss}"] = report(other)
    final = json.loads((out / "final" / "final.json").read_text(encoding="utf-8"))
    checkpoint = load_checkpoint(out / "final" / "best.pt")
    cfg = checkpoint["metadata"]["config"]
    name = entry_name(cfg)
    decoder = shipped_decoder(selection)
    metadata = {**checkpoint["metadata"], "postprocessing": {"lesion_decoding": {"rules": shipped_rules(selection)}},
                "leave_one_out": selection["summary"][decoder], "leave_one_out_decoder": decoder}
    text = model_card(version, cfg, final, selection, markdown(selection), variants, minutes, notes)
    thick = selection["summary"][decoder][f"{EVAL_SLAB_MM:g}mm"]
    entry = publish(name, version, text,
                    f"starter {name} (3 volumes): LOO lesion F1 "
                    f"{selection['summary'][decoder]['1mm']['lesion_f1']:.3f} at 1 mm, "
                    f"{thick['lesion_f1']:.3f} at {EVAL_SLAB_MM:g} mm (Dice {thick['dice']:.3f})",
                    checkpoint=checkpoint, metadata=json.loads(json.dumps(metadata, default=float)))
    print(f"registered {entry.file} sha256 {entry.sha256}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("loo", "final", "ship"))
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--out", default="Training/runs/brain-wmh")
    parser.add_argument("--data")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="ship: other variants' LOO run folders, compared in the card")
    parser.add_argument("--only", nargs="*", help="loo: run only these folds (case ids)")
    parser.add_argument("--notes", type=Path, help="ship: a Markdown file of findings the card shows under the comparison")
    parser.add_argument("--minutes", default="", help="ship: wall-clock minutes for the card, e.g. loo=48,final=15")
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
        loo(cfg, root, Path(args.out), args.only)
    elif args.command == "final":
        info = train(cfg, brain_cases(root), Path(args.out) / "final")
        write_text_atomic(Path(args.out) / "final" / "final.json", json.dumps(info))
        print(json.dumps(info))
    else:
        minutes = dict(item.split("=") for item in args.minutes.split(",") if item)
        notes = args.notes.read_text(encoding="utf-8") if args.notes else ""
        return ship(Path(args.out), args.version, args.compare, minutes, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
