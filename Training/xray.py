"""Train and evaluate the X-ray models (seeds 001 and 003) on radiograph phantoms (and on image +
mask pairs you bring: see xray_import.py).

    python Training/xray.py train --task xray-femur --out Training/runs/xray-femur [--variant cpu|seed]
                                  [--noise-p 0.5 --noise-sigma 5000] [--n-train 160] [--steps 1500] [--resume]
    python Training/xray.py evaluate --weights Training/runs/xray-femur/best.pt [--n 24] [--json out.json]
    python Training/xray.py experiment --config Training/configs/xray_noise.json   # seed 001's noise experiment
    python Training/xray.py ship --task xray-femur --run Training/runs/xray-femur --version 0.1.0

Data: ``SpineKneeSegLib.core.phantoms.xray_femur_phantom`` (AP pelvis and hip radiographs with exact
masks; 16-bit), varied in view, pixel size, field of view and aspect ratio; training seeds 0..n-1,
validation seeds from 50000, held-out test seeds from 90000 (never trained or selected on).
``--manifest`` adds image + label pairs (CSV id,image,labels, as xray_import.py writes).

Preprocessing is the task card's (SpineKneeSegLib.engine.preprocessing.training_slices: percentile
normalisation, aspect-kept letterbox into network_px x network_px), so a checkpoint runs unchanged
in every door. Noise augmentation (seed 001) adds N(0, sigma) to the raw 16-bit pixel values
before normalisation, with probability ``noise_p`` per image.

Seeds: 003 (xray-femur): U-Net 32-64-128-128, dropout 0.2, sigmoid, Dice loss, Adam 3e-4, betas
(0.8, 0.991) = ``--variant seed``; ``--variant cpu`` (the default) halves every width (16-32-64-64)
for 2 shared CPU cores, same loss and optimiser. 001 (xray-multiclass): U-Net with batch norm and
transposed-convolution upsampling, softmax, Dice + cross-entropy, RMSprop, ReduceLROnPlateau
(patience 5 evaluations), gradient clipping.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from slicetrain import (  # noqa: E402
    dice_ce_loss,
    foreground_dice_loss,
    sigmoid_dice_bce_loss,
)
from SpineKneeSegLib.core.atomic import write_text_atomic  # noqa: E402
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.engine.models import build_network, count_parameters  # noqa: E402
from SpineKneeSegLib.engine.preprocessing import training_slices  # noqa: E402
from SpineKneeSegLib.engine.weights import save_checkpoint  # noqa: E402
from SpineKneeSegLib.tasks import TASKS  # noqa: E402
from SpineKneeSegLib.tasks.xray.phantom import xray_femur_phantom  # noqa: E402
from evalhelpers import dice_or, nanmean
from modelcard import publish, render
from trainloop import Evaluation, LoopConfig, rank_stream, run_loop, seed_everything

TASKS_HERE = ("xray-femur", "xray-multiclass")
VAL_SEED0, TEST_SEED0 = 50_000, 90_000
UINT16_MAX = 65535.0
VARIANT_CHANNELS = {"seed": (32, 64, 128, 128), "cpu": (16, 32, 64, 64)}


@dataclass
class Config:
    task: str = "xray-femur"
    variant: str = "cpu"  # cpu (16-32-64-64) | seed (seed 001/003: 32-64-128-128)
    network_px: int = 256
    n_train: int = 160  # training phantoms (seed 001's training-set-size sweep varies this)
    n_val: int = 12
    steps: int = 1500
    batch_size: int = 8
    eval_every: int = 100
    # seed 003: Adam 3e-4, betas (0.8, 0.991); seed 001: RMSprop (lr below), plateau x0.5 after 5
    # flat evaluations, gradient norm clipped at 1
    lr: float | None = None  # None: 3e-4 (femur, seed 003) / 1e-3 (multi-class RMSprop)
    betas: tuple[float, float] = (0.8, 0.991)
    optimiser: str | None = None  # None: adam (femur) / rmsprop (multi-class)
    loss: str | None = None  # None: dice (femur, seed 003) / dice+ce (multi-class, seed 001)
    plateau_patience: int = 5
    clip_grad: float | None = None  # None: none (femur) / 1.0 (multi-class)
    noise_p: float = 0.5  # share of training images given Gaussian noise (0: seed 001's "without")
    noise_sigma: float = 5000.0  # on 16-bit values (seed 001)
    flip_p: float = 0.5  # left-right flips (a femur is a femur; sides come from geometry, not the network)
    real_background_p: float = 0.0  # share of training phantoms drawn over a real JSRT radiograph (xray_real.py)
    real_negatives: float = 0.0  # real JSRT radiographs (no femur: empty labels) added, as a share of n_train
    seed: int = 0
    manifest: str | None = None  # CSV id,image,labels of real pairs (xray_import.py)
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "Config":
        femur = self.task == "xray-femur"
        out = Config(**{**asdict(self), "betas": tuple(self.betas)})
        out.lr = self.lr if self.lr is not None else (3e-4 if femur else 1e-3)
        out.optimiser = self.optimiser or ("adam" if femur else "rmsprop")
        out.loss = self.loss or ("dice" if femur else "dice+ce")
        out.clip_grad = self.clip_grad if self.clip_grad is not None else (None if femur else 1.0)
        return out


def network_config(cfg: Config, n_labels: int) -> dict:
    card = TASKS[cfg.task]
    out = n_labels if card.label_activation == "sigmoid" else n_labels + 1
    return {**card.network.config, "channels": VARIANT_CHANNELS[cfg.variant], "in_channels": 1, "out_channels": out}


# ---- data ------------------------------------------------------------------------------------------

def phantom_kwargs(seed: int) -> dict:
    """View, pixel size and field of view of phantom ``seed`` (non-square fields: the letterbox)."""
    rng = np.random.default_rng(seed + 7_000_000)
    if rng.random() < 0.7:
        pixel = float(rng.uniform(0.6, 0.9))
        shape = (int(rng.uniform(330, 420) / pixel), int(rng.uniform(330, 430) / pixel))
        return {"view": "pelvis", "pixel_mm": pixel, "shape": shape}
    pixel = float(rng.uniform(0.4, 0.6))
    shape = (int(rng.uniform(170, 230) / pixel), int(rng.uniform(150, 210) / pixel))
    return {"view": "hip", "side": "right" if rng.random() < 0.5 else "left", "pixel_mm": pixel, "shape": shape}


def make_case(task: str, seed: int, background: np.ndarray | None = None):
    """(16-bit image, labels, phantom) of one phantom seed for ``task``; ``background``: a real
    radiograph (display 0..1, bone bright) the drawn bones are projected over."""
    ph = xray_femur_phantom(seed, intensity_range="uint16", classes="femur" if task == "xray-femur" else "pelvis",
                            background=background, **phantom_kwargs(seed))
    return ph.image, ph.labels, ph


def add_noise(image: Image, sigma: float, rng: np.random.Generator) -> Image:
    """Seed 001's Gaussian noise on 16-bit pixel values (clipped to 0..65535, integer-valued)."""
    noisy = np.clip(np.round(image.array + rng.normal(0.0, sigma, image.array.shape)), 0, UINT16_MAX)
    return image.with_array(noisy.astype(np.float32))


@dataclass
class Case:
    image: Image
    labels: Image
    x: np.ndarray  # clean network-grid input (1, H, W)
    y: np.ndarray  # network-grid labels (H, W)


def grid_pair(image: Image, labels: np.ndarray, pre: dict) -> tuple[np.ndarray, np.ndarray]:
    """The network-grid input and labels, built by the very functions inference uses."""
    x, y, _ = training_slices(image, labels, pre["plane"], pre["normalisation"], pre["in_plane_spacing_mm"], 1,
                              pre["network_px"], pre["crop_mm"])
    return x, y[0]


def preprocessing(cfg: Config) -> dict:
    return {**TASKS[cfg.task].preprocessing.__dict__, "network_px": cfg.network_px}


def load_cases(cfg: Config, seeds, log=print, real_background_p: float = 0.0) -> list[Case]:
    """Phantoms of ``seeds``; with ``real_background_p`` that share drawn over the real radiographs
    of the JSRT training split (which one and whether: fixed by the phantom's seed)."""
    pre = preprocessing(cfg)
    cases = []
    t = time.time()
    backgrounds = None
    for s in seeds:
        background = None
        pick = np.random.default_rng([int(s), 4242])
        if real_background_p > 0 and pick.random() < real_background_p:
            if backgrounds is None:
                from xray_real import chest_backgrounds

                backgrounds = chest_backgrounds("train")
            background = backgrounds[int(pick.integers(len(backgrounds)))][1]
        image, labels, _ = make_case(cfg.task, int(s), background)
        x, y = grid_pair(image, labels.array, pre)
        cases.append(Case(image, labels, x, y))
    log(f"{len(cases)} phantoms in {time.time() - t:.1f} s"
        + (f" ({real_background_p:.0%} drawn over real radiographs)" if real_background_p else ""))
    return cases


def manifest_cases(cfg: Config, n_labels: int) -> list[Case]:
    from SpineKneeSegLib.core.image_io import read_image

    pre = preprocessing(cfg)
    cases = []
    with open(cfg.manifest, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            image, labels = read_image(row["image"]), read_image(row["labels"])
            if labels.array.shape != image.array.shape:
                raise SystemExit(f"{row['labels']}: label shape {labels.array.shape} != image {image.array.shape}")
            lab = labels.array.astype(np.uint8)
            if lab.max() > n_labels:
                raise SystemExit(f"{row['labels']}: label {lab.max()} > {n_labels} classes")
            x, y = grid_pair(image, lab, pre)
            cases.append(Case(image, labels.with_array(lab), x, y))
    return cases


def manifest_classes(cfg: Config) -> list[dict] | None:
    """classes.json beside an imported manifest (xray_import.py): [{"value", "name"}]."""
    if not cfg.manifest:
        return None
    path = Path(cfg.manifest).parent / "classes.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def sample_batch(cases: list[Case], cfg: Config, rng: np.random.Generator, pre: dict):
    xs, ys = [], []
    for _ in range(cfg.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        x, y = case.x, case.y
        if cfg.noise_p > 0 and rng.random() < cfg.noise_p:
            x, _ = grid_pair(add_noise(case.image, cfg.noise_sigma, rng), case.labels.array, pre)
        if rng.random() < cfg.flip_p:
            x, y = x[..., ::-1], y[..., ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)).long()


# ---- losses -------------------------------------------------------------------------------------------

def make_loss(cfg: Config, activation: str, n_labels: int):
    """``dice``: seed 003's soft Dice; ``dice+ce``: seed 001's Dice + cross-entropy (BCE on sigmoid heads)."""
    if cfg.loss == "dice":
        return lambda lg, y: foreground_dice_loss(lg, y, n_labels, activation)
    if cfg.loss == "dice+ce":
        if activation == "sigmoid":
            return lambda lg, y: sigmoid_dice_bce_loss(lg, y, n_labels)
        return lambda lg, y: dice_ce_loss(lg, y, n_labels + 1)
    raise ValueError(f"unknown loss {cfg.loss!r} (dice | dice+ce)")


# ---- metrics --------------------------------------------------------------------------------------------

def grid_labels(logits: torch.Tensor, activation: str) -> np.ndarray:
    from SpineKneeSegLib.engine.inference import logits_to_labels

    return logits_to_labels(logits, activation).numpy()


@torch.no_grad()
def validate(net, cases: list[Case], activation: str, n_labels: int) -> dict:
    """Per-class Dice on the network grid (fast; the held-out test goes through the full pipeline)."""
    net.eval()
    x = torch.from_numpy(np.stack([c.x for c in cases]))
    pred = np.concatenate([grid_labels(net(x[i:i + 8]), activation) for i in range(0, len(x), 8)])
    truth = np.stack([c.y for c in cases])
    per = [nanmean(dice_or(p == v, t == v) for p, t in zip(pred, truth)) for v in range(1, n_labels + 1)]
    return {"dice": per, "mean_dice": float(np.mean(per))}


# ---- training ------------------------------------------------------------------------------------------

def train(cfg: Config, out: Path, resume: bool = False, max_minutes: float | None = None, log=print) -> dict:
    cfg = cfg.resolved()
    card = TASKS[cfg.task]
    label_names = [{"value": s.value, "name": s.name} for s in card.labels]
    custom = manifest_classes(cfg)
    if custom and [d["name"] for d in custom] != [d["name"] for d in label_names]:
        if cfg.task != "xray-multiclass" or cfg.n_train:
            raise SystemExit(f"the manifest's classes {[d['name'] for d in custom]} are not the card's: only "
                             "xray-multiclass with --n-train 0 trains other classes (phantoms have the card's)")
        label_names = custom
    out.mkdir(parents=True, exist_ok=True)
    pre = preprocessing(cfg)
    rng = np.random.default_rng(cfg.seed)
    seed_everything(cfg.seed)
    cases = load_cases(cfg, range(cfg.n_train), log, cfg.real_background_p) if cfg.n_train else []
    if cfg.real_negatives > 0:  # real radiographs without the structure: the network learns to leave them empty
        from xray_real import chest_backgrounds, radiograph

        chest = chest_backgrounds("train")
        for _, display in chest[:int(round(cfg.real_negatives * cfg.n_train))]:
            image = radiograph(display)
            empty = np.zeros(image.array.shape, np.uint8)
            x, y = grid_pair(image, empty, pre)
            cases.append(Case(image, image.with_array(empty), x, y))
        log(f"{int(round(cfg.real_negatives * cfg.n_train))} real radiographs without a femur added")
    val = []
    if cfg.manifest:
        real = manifest_cases(cfg, len(label_names))
        log(f"{len(real)} cases from {cfg.manifest}")
        if label_names is custom:  # no phantoms of these classes: every 5th case validates
            val, real = real[::5], [c for n, c in enumerate(real) if n % 5]
        cases += real
    if not cases:
        raise SystemExit("no training cases (n_train 0 and no manifest)")
    val = val or load_cases(cfg, range(VAL_SEED0, VAL_SEED0 + cfg.n_val), log)
    labels = label_names
    net_cfg = network_config(cfg, len(labels))
    net = build_network(card.network.factory, net_cfg).to(memory_format=torch.channels_last)
    if cfg.optimiser == "adam":
        optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    elif cfg.optimiser == "rmsprop":
        optimiser = torch.optim.RMSprop(net.parameters(), lr=cfg.lr)
    else:
        raise SystemExit(f"unknown optimiser {cfg.optimiser!r}")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=0.5,
                                                           patience=cfg.plateau_patience)
    criterion = make_loss(cfg, card.label_activation, len(labels))
    last = out / "last.pt"
    if resume and last.exists() and "numpy_rng" not in torch.load(last, map_location="cpu", weights_only=False):
        step = torch.load(last, map_location="cpu", weights_only=False)["state"]["step"]  # an older run's file
        rng = np.random.default_rng([cfg.seed, step])  # it draws fresh batches, as it did
    log(f"{cfg.task} {cfg.variant}: {count_parameters(net):,} parameters, {len(cases)} training cases, "
        f"{len(val)} validation phantoms, {cfg.optimiser} lr {cfg.lr}, loss {cfg.loss}, noise p {cfg.noise_p}")

    rng = rank_stream(rng, cfg.seed)  # each data-parallel process its own batches

    def batches(_step):
        while True:
            yield sample_batch(cases, cfg, rng, pre)

    def evaluate(net):
        metrics = validate(net, val, card.label_activation, len(labels))
        return Evaluation(metrics["mean_dice"], {"val_dice": [round(v, 4) for v in metrics["dice"]]},
                          {"val/mean_dice": metrics["mean_dice"]}, metrics)

    def save_best(path, net, state, evaluation):
        meta = {"step": state["step"], "val_mean_dice": evaluation.score, "config": asdict(cfg),
                "labels": label_names, "train_seconds": round(state["seconds"], 1),
                "trained_on": "synthetic radiograph phantoms only (SpineKneeSegLib.core.phantoms.xray_femur_phantom, "
                              f"seeds 0..{cfg.n_train - 1})" + (f" + {cfg.manifest}" if cfg.manifest else "")}
        save_checkpoint(path, cfg.task, card.network.factory, net_cfg,
                        {k: v.contiguous() for k, v in net.state_dict().items()},
                        preprocessing={"network_px": cfg.network_px}, metadata=meta)

    plateau = cfg.optimiser == "rmsprop" or cfg.task == "xray-multiclass"  # seed 001's plateau schedule
    loop = LoopConfig(steps=cfg.steps, eval_every=cfg.eval_every, grad_clip=cfg.clip_grad or None, seed=cfg.seed,
                      scheduler_on="evaluation" if plateau else "never", max_minutes=max_minutes or None)
    state = run_loop(net, optimiser, batches,
                     lambda n, b: criterion(n(b[0].contiguous(memory_format=torch.channels_last)), b[1]), loop, out,
                     scheduler=scheduler, evaluate=evaluate, save_best=save_best, rng=rng, resume=resume,
                     extra={"config": asdict(cfg)}, log=log,
                     resume_message=lambda st: f"resumed at step {st['step']} (best {st['best']:.4f} at "
                                               f"{st['best_step']})")
    write_text_atomic(out / "history.json", json.dumps(state["history"], indent=1))
    return state


# ---- held-out evaluation through the product's inference ------------------------------------------------

def evaluate(weights_path: Path, n: int = 24, noise_sigma: float = 5000.0, log=print) -> dict:
    """Dice of held-out phantoms (test seeds, never trained or selected on) through the Lib's
    segment_slices, clean and with seed 001's noise; for xray-femur also the femoral-head fit
    against the phantom's true heads."""
    from SpineKneeSegLib.engine.cards import with_checkpoint_labels
    from SpineKneeSegLib.engine.inference import load_network, segment_slices
    from SpineKneeSegLib.engine.weights import load_checkpoint, resolve_weights

    task = load_checkpoint(weights_path)["task"]
    card = TASKS[task]
    weights = resolve_weights(card, weights_path)
    card = with_checkpoint_labels(card, weights.checkpoint.get("metadata", {}))
    device = torch.device("cpu")
    net = load_network(weights, device)
    rng = np.random.default_rng(12345)
    rows, seconds = [], []
    for seed in range(TEST_SEED0, TEST_SEED0 + n):
        image, labels, ph = make_case(task, seed)
        row = {"seed": seed, "view": ph.extra["view"], "shape": list(image.array.shape[1:]),
               "pixel_mm": round(image.spacing[0], 3)}
        for cond, img in (("clean", image), ("noisy", add_noise(image, noise_sigma, rng))):
            t = time.perf_counter()
            pred = segment_slices(card, img, net, device, weights.preprocessing).labels
            seconds.append(time.perf_counter() - t)
            row[cond] = {s.name: dice_or(pred == s.value, labels.array == s.value) for s in card.labels}
            if task == "xray-femur" and cond == "clean":
                from SpineKneeSegLib.engine.postprocessing import (
                    remove_small_components,
                )
                from SpineKneeSegLib.tasks.xray.anatomy import femoral_heads

                heads, _ = femoral_heads(remove_small_components(pred), image)
                row["heads"] = head_errors(heads, ph.extra["femoral_heads"])
        rows.append(row)
    summary = {}
    for cond in ("clean", "noisy"):
        summary[cond] = {s.name: round(float(np.nanmean([r[cond][s.name] for r in rows])), 4) for s in card.labels}
        summary[cond]["mean"] = round(float(np.mean(list(summary[cond].values()))), 4)
        summary[cond]["min_case_mean"] = round(float(min(np.nanmean(list(r[cond].values())) for r in rows)), 4)
    if task == "xray-femur":
        errs = [h for r in rows for h in r["heads"]]
        found = [h for h in errs if h["found"]]
        def stat(fn, key):
            return round(float(fn([abs(h[key]) for h in found])), 2) if found else None

        summary["heads"] = {"true_heads": len(errs), "found": len(found),
                            "centre_error_mm_median": stat(np.median, "centre_error_mm"),
                            "centre_error_mm_max": stat(np.max, "centre_error_mm"),
                            "diameter_error_mm_median": stat(np.median, "diameter_error_mm"),
                            "side_correct": sum(h["side_correct"] for h in found)}
    result = {"weights": str(weights_path), "sha256": weights.sha256, "task": task, "n": n,
              "noise_sigma": noise_sigma, "test_seeds": [TEST_SEED0, TEST_SEED0 + n - 1], "summary": summary,
              "seconds_per_image_median": round(float(np.median(seconds)), 3), "cases": rows}
    log(json.dumps(summary))
    return result


def head_errors(heads, truth: list[dict]) -> list[dict]:
    """Each true head matched to the nearest fitted one (within 25 mm, else missed)."""
    out = []
    for t in truth:
        best = min(heads, key=lambda h: np.linalg.norm(np.subtract(h.centre_ras, t["centre_ras"])), default=None)
        err = float(np.linalg.norm(np.subtract(best.centre_ras, t["centre_ras"]))) if best else math.inf
        if best is None or err > 25.0:
            out.append({"side": t["side"], "found": False})
            continue
        out.append({"side": t["side"], "found": True, "centre_error_mm": round(err, 2),
                    "diameter_error_mm": round(best.diameter_mm - t["diameter_mm"], 2),
                    "side_correct": best.side == t["side"]})
    return out


# ---- experiments (configs in Training/configs) -------------------------------------------------------------

def experiment(config_path: Path, log=print) -> dict:
    """Train every arm of a config (same data, seeds and budget; only the named fields differ),
    evaluate each on the same held-out phantoms clean and noisy, write results.json + results.md."""
    spec = json.loads(config_path.read_text(encoding="utf-8"))
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in spec["arms"]:
        cfg = Config(**{**spec.get("base", {}), **arm.get("config", {})})
        run = out / arm["name"]
        done = run / "evaluation.json"
        if not done.exists():
            state = train(cfg, run, resume=True, log=log)
            evaluation = evaluate(run / "best.pt", spec.get("test_n", 24), spec.get("noise_sigma", 5000.0), log)
            evaluation["train_seconds"] = round(state["seconds"], 1)
            evaluation["best_step"] = state["best_step"]
            write_text_atomic(done, json.dumps(evaluation, indent=1))  # its presence marks the arm done
        results[arm["name"]] = {"description": arm.get("description", ""),
                                **json.loads(done.read_text(encoding="utf-8"))}
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    table = results_table(spec, results)
    write_text_atomic(out / "results.md", table)
    print(table)
    return results


def results_table(spec: dict, results: dict) -> str:
    lines = [f"{spec.get('title', '')}\n",
             "| arm | training | train s | clean Dice (mean / worst) | noisy Dice (mean / worst) |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        c, n = r["summary"]["clean"], r["summary"]["noisy"]
        lines.append(f"| {name} | {r['description']} | {r.get('train_seconds', '')} | {c['mean']:.3f} / "
                     f"{c['min_case_mean']:.3f} | {n['mean']:.3f} / {n['min_case_mean']:.3f} |")
    lines.append(f"\nHeld-out phantoms: test seeds {TEST_SEED0}..{TEST_SEED0 + spec.get('test_n', 24) - 1}; noisy = "
                 f"N(0, {spec.get('noise_sigma', 5000.0):g}) added to the 16-bit pixel values; Dice through "
                 "SpineKneeSegLib.engine.inference.segment_slices on the input's own pixels.")
    return "\n".join(lines) + "\n"


# ---- ship ------------------------------------------------------------------------------------------------

def rule_text(real: dict) -> str:
    """The card's sentence on the radiograph-level femur rule, where the evaluation measured it."""
    s = real["summary"]
    if "phantoms_without_femur_after_rule" not in s:  # a task without the femur rule
        return ""
    return (f"\nAfter the product's post-processing, whose radiograph-level rule removes any femur smaller than half "
            f"the smallest training phantom's (tasks/xray/anatomy.py MIN_FEMUR_MM2, fixed before scoring): "
            f"{s['chest_radiographs_with_bone_reported']} of {s['chest_radiographs']} chest radiographs report a "
            f"femur; held-out phantoms clean {s['clean_dice_after_rule']:.3f} (network alone {s['clean_dice_mean']:.3f}), "
            f"composites {s['composite_dice_after_rule']:.3f}; left without a femur: "
            + ", ".join(f"{sum(not c['femur_found'] for c in real['composites'] if c['kind'] == kind)} of "
                        f"{sum(c['kind'] == kind for c in real['composites'])} {kind} phantoms"
                        for kind in ("clean", "composite")) + ".")


def model_card(task: str, version: str, checkpoint: dict, evaluation: dict, experiments: dict, note: str = "",
               real_evaluation: dict | None = None) -> str:
    meta = checkpoint["metadata"]
    cfg = meta["config"]
    net = build_network(checkpoint["network"]["factory"], checkpoint["network"]["config"])
    s = evaluation["summary"]
    names = [d["name"] for d in meta["labels"]]
    dice_rows = "\n".join(f"| {cond} | " + " | ".join(f"{s[cond][n]:.3f}" for n in names) +
                          f" | {s[cond]['min_case_mean']:.3f} |" for cond in ("clean", "noisy"))
    heads = ""
    if "heads" in s:
        h = s["heads"]
        heads = (f"\nFemoral head (circle fitted to the predicted femur boundary, clean images): {h['found']} of "
                 f"{h['true_heads']} true heads found; centre error median {h['centre_error_mm_median']} mm (max "
                 f"{h['centre_error_mm_max']} mm); diameter error median {h['diameter_error_mm_median']} mm; side "
                 f"right/left correct for {h['side_correct']} of {h['found']}.\n")
    exp = "\n\n".join(t for t in experiments.values()) or "None run for this model (see Training/README.md)."
    seed = "003" if task == "xray-femur" else "001"
    note_block = f"\n\n{note}\n" if note else ""
    real_p, negatives = cfg.get("real_background_p", 0.0), cfg.get("real_negatives", 0.0)
    real_training = (f" A share {real_p} of the phantoms drawn over real chest radiographs of the JSRT/SCR chest "
                     "task's training split (the drawn bones' transmission multiplying the real image's: real "
                     "exposure, noise, blur, ribs and clavicles behind the bones)" if real_p else "") + (
        f"; {int(round(negatives * cfg['n_train']))} real chest radiographs of that split added with empty labels "
        "(a radiograph may hold no femur)" if negatives else "") + ("." if real_p or negatives else "")
    real = real_evaluation or {}
    real_section = [] if not real else [("Real radiographs (no real femur: what can be measured)", f"""The
test phantoms drawn over the chest task's 50 held-out radiographs (never trained on): {'femur Dice' if task == 'xray-femur' else 'Dice (mean over the bones)'}
{real['summary']['composite_dice_mean']:.3f} (worst {real['summary']['composite_dice_min']:.3f}). The 50 held-out
chest radiographs as they are, where any bone is a false positive: on average
{100 * real['summary']['chest_fp_share_mean']:.1f} % of each image marked; {real['summary']['chest_fp_radiographs']}
of {real['summary']['chest_radiographs']} get {'a femur' if task == 'xray-femur' else 'any of its bones'} of at least 1 cm2 (`Training/xray_real.py evaluate`).{rule_text(real)}""")]
    uses = " and ".join(u for u, on in (("as backgrounds behind drawn bones", real_p),
                                        ("as radiographs without a femur", negatives)) if on)
    banner = (f"""**Trained on synthetic radiograph phantoms and on real chest radiographs (JSRT/SCR: {uses});
it has never seen a real femur and has not been validated on a real hip or pelvis radiograph.** No openly licensed hip X-ray with femur masks
could be obtained for this project. Expect errors on real hip radiographs until it is retrained on
real image + mask pairs (`Training/xray_import.py`). JSRT: research and education use; cite
Shiraishi et al., AJR 174:71 (2000) and van Ginneken et al., Med Image Anal 10:19 (2006). Not a
medical device.""" if real_p or negatives else """**Trained only on synthetic radiograph phantoms. It has never seen a real radiograph and has not
been validated on one.** No openly licensed X-ray image + mask data could be obtained for this
project; the phantoms (`SpineKneeSegLib.core.phantoms.xray_femur_phantom`) are analytic drawings of a
pelvis and proximal femurs (head, neck, shaft, trochanters) with simulated exposure, noise,
collimation and burn-in text. Expect it to fail on real images until it is retrained on real
image + mask pairs (`Training/xray_import.py` reads image/mask folders, COCO polygon JSON and
JSRT/SCR-style mask folders). Not a medical device.""")
    return render(f"{task} v{version}", [
        ("What it does", f"""Task `{task}`: {', '.join(f'{d["value"]} {d["name"]}' for d in meta['labels'])} on a single 2D AP
pelvis/hip radiograph. Network: seed {seed}'s U-Net (`{checkpoint['network']['factory']}`,
{json.dumps(checkpoint['network']['config'])}), {count_parameters(net):,} parameters
(variant `{cfg['variant']}`{'' if cfg['variant'] == 'seed' else '; the seed width is `--variant seed`'})."""),
        ("Preprocessing (the task card's, the same in every door)", f"""Pixels as stored (DICOM MONOCHROME1 inverted, rescale slope/intercept applied), percentile
normalisation (0.5-99.5 %), the image cut to a square of its longer side around its centre
(aspect ratio kept, padding = normalised minimum) and resampled to {cfg['network_px']} x
{cfg['network_px']}; logits resampled back onto the input's exact pixels."""),
        ("Training", f"""{cfg['n_train']} phantoms (training seeds 0..{cfg['n_train'] - 1}: 70 % AP pelvis, 30 % single hip, pixel
0.4-0.9 mm, non-square fields, 16-bit), {cfg['steps']} steps of batch {cfg['batch_size']}; loss `{cfg['loss']}`,
optimiser {cfg['optimiser']} lr {cfg['lr']}{' betas ' + str(tuple(cfg['betas'])) if cfg['optimiser'] == 'adam' else ''},
{'gradient norm clipped at ' + str(cfg['clip_grad']) + ', ' if cfg['clip_grad'] else ''}left-right flips
p {cfg['flip_p']}, Gaussian noise (seed 001) sigma {cfg['noise_sigma']:g} on 16-bit values for a share
{cfg['noise_p']} of the images.{real_training}{note_block} Best of the evaluations on {cfg['n_val']} validation phantoms (seeds
{VAL_SEED0}+) at step {meta['step']}; {meta['train_seconds']} s of training on 2 shared CPU cores
(1 thread)."""),
        (f"Held-out phantoms (seeds {evaluation['test_seeds'][0]}..{evaluation['test_seeds'][1]}, never trained or selected on)", f"""Dice through the product's inference on each image's own pixels; noisy = N(0, {evaluation['noise_sigma']:g})
on the 16-bit values.

| images | {' | '.join(names)} | worst case (mean over classes) |
|---|{'---|' * len(names)}---|
{dice_rows}
{heads}"""),
        *real_section,
        ("Experiments on phantoms (seed 001's noise experiment; seed 003's width)", f"""{exp}"""),
        ("Known limits", """- No real femur: real hip radiographs have trabecular texture, overlapping soft tissue, implants,
  fractures, osteophytes, children's growth plates and positioning this model has never seen.
  The Dice figures above say the pipeline and the network work, not that the model is accurate.
- Femoral-head centre and diameter come from a circle fitted to the predicted femur boundary;
  millimetres are only as good as the pixel size (PNG/JPEG have none: `--pixel-mm`; DICOM
  ImagerPixelSpacing is at the detector, magnified).
- Sides (right/left) come from the image geometry; without DICOM orientation the radiographic
  convention (patient right on the image left) is assumed.
- Seed 003's plain soft-Dice loss can collapse to all-background: it did for the seed widths in a
  100-step run at 128 px (Training/README.md, seed width table; Dice + BCE trained) and with 144
  real radiographs without a femur among 304 training images; a collapsed run shows as validation
  Dice 0 in its log and is never shipped by `ship` unnoticed (the card prints its held-out Dice).

Generated by `Training/xray.py ship` from the run's own evaluation files."""),
    ], banner)


def ship(task: str, run: Path, version: str, experiments: list[Path], note: str = "") -> int:
    from SpineKneeSegLib.engine.weights import load_checkpoint

    checkpoint = load_checkpoint(run / "best.pt")
    if checkpoint["task"] != task:
        print(f"{run / 'best.pt'} is a {checkpoint['task']} checkpoint, not {task}", file=sys.stderr)
        return 2
    evaluation = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    tables = {str(p): p.read_text(encoding="utf-8") for p in experiments if p.exists()}
    real_path = run / "evaluation-real-best.json"  # Training/xray_real.py evaluate
    real = json.loads(real_path.read_text(encoding="utf-8")) if real_path.exists() else None
    text = model_card(task, version, checkpoint, evaluation, tables, note, real)
    clean = evaluation["summary"]["clean"]["mean"]
    noisy = evaluation["summary"]["noisy"]["mean"]
    cfg = checkpoint["metadata"]["config"]
    trained = ("phantoms and real chest radiographs (no real femur)" if cfg.get("real_background_p")
               or cfg.get("real_negatives") else "ONLY synthetic radiograph phantoms")
    entry = publish(task, version, text, f"starter {task} trained on {trained}: held-out phantom Dice {clean:.3f} "
                                         f"clean / {noisy:.3f} noisy; never validated on a real hip radiograph",
                    run / "best.pt")
    print(f"registered {entry.file} sha256 {entry.sha256}; card {entry.card}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--max-minutes", type=float)
    t.add_argument("--threads", type=int, default=1)
    for name, value in asdict(Config()).items():
        if name in ("extra", "betas"):
            continue
        kind = float if name in ("lr", "clip_grad") else (str if value is None else type(value))
        t.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    e = sub.add_parser("evaluate")
    e.add_argument("--weights", type=Path, required=True)
    e.add_argument("--n", type=int, default=24)
    e.add_argument("--noise-sigma", type=float, default=5000.0)
    e.add_argument("--json", type=Path)
    e.add_argument("--threads", type=int, default=1)
    x = sub.add_parser("experiment")
    x.add_argument("--config", type=Path, required=True)
    x.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("ship")
    s.add_argument("--task", choices=TASKS_HERE, required=True)
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--experiments", type=Path, nargs="*", default=[], help="results.md tables for the card")
    s.add_argument("--note", default="", help="a paragraph for the card (e.g. why this run was chosen)")
    s.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        cfg = Config(**{k: getattr(args, k) for k in asdict(Config()) if k not in ("extra", "betas")})
        if cfg.task not in TASKS_HERE:
            parser.error(f"--task must be one of {TASKS_HERE}")
        train(cfg, args.out, args.resume, args.max_minutes)
        if cfg.n_train:  # held-out phantoms only mean something for the phantoms' classes
            evaluation = evaluate(args.out / "best.pt")
            write_text_atomic(args.out / "evaluation.json", json.dumps(evaluation, indent=1))
    elif args.command == "evaluate":
        result = evaluate(args.weights, args.n, args.noise_sigma)
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=1))
    elif args.command == "experiment":
        experiment(args.config)
    else:
        return ship(args.task, args.run, args.version, args.experiments, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
