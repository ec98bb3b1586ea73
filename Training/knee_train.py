"""Knee-bones training on the shared loop (trainloop.py): the variants' targets and network, seed
000's soft F1 loss (+ optional cross-entropy), widening a trained network, the learning-rate
schedule, and ``train`` (snapshots every evaluation, best.pt, last.pt for --resume)."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from knee_data import ALL_ANATOMIES, TASK, Config, batch_stream, load_volumes, validation_set
from knee_synth import BONES, SynthConfig
from SpineKneeSegLib.engine.models import build_network
from trainloop import Evaluation, LoopConfig, run_loop, seed_everything

def out_channels(variant: str) -> int:
    return {"multiclass": BONES + 1, "merged": 2, "fibula": 2}[variant]


def variant_target(target: torch.Tensor, variant: str) -> torch.Tensor:
    """Bone labels 0..4 -> the variant's classes: merged = any bone; fibula = the fibula alone."""
    if variant == "merged":
        return (target > 0).long()
    if variant == "fibula":
        return (target == 3).long()
    return target


def network_config(cfg: Config) -> dict:
    return {"channels": (cfg.channels,) * cfg.levels, "activation": "elu", "norm": "batch",
            "dropout": cfg.dropout, "in_channels": 1, "out_channels": out_channels(cfg.variant)}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Seed 000's soft F1: 1 - mean over foreground classes of the batch soft Dice (softmax).
    ``labelled`` (B, C) bool marks the classes each sample's label map has: a class it lacks
    (OAI-ZIB has no fibula or patella) counts as background for that sample (marginal loss, Shi
    et al. 2021) and is left out of that class's Dice. Written here: the GPU image has no MONAI."""
    probs = torch.softmax(logits, dim=1)
    channels = probs.shape[1]
    onehot = F.one_hot(target, channels).permute(0, 3, 1, 2).float()
    weight = torch.ones(probs.shape[:2], device=probs.device)
    if labelled is not None and not bool(labelled.all()):
        known = labelled.float()[:, :, None, None]
        background = probs[:, :1] + (probs * (1 - known)).sum(1, keepdim=True)
        probs = torch.cat([background, probs[:, 1:] * known[:, 1:]], dim=1)
        weight = labelled.float()
    inter = (probs * onehot).sum((2, 3))
    denom = (probs + onehot).sum((2, 3))
    inter, denom = (weight * inter).sum(0), (weight * denom).sum(0)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    present = weight.sum(0)[1:] > 0
    return 1 - dice[1:][present].mean()


def marginal_cross_entropy(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None = None):
    """Pixel-wise cross-entropy; a class a sample's map lacks is merged into that sample's background
    (the marginal loss, as in soft_dice_loss). Unlike the batch Dice it charges every false-positive
    pixel, so stray pieces far from any bone cost as much as a wrong border."""
    logp = torch.log_softmax(logits, dim=1)
    if labelled is not None and not bool(labelled.all()):
        merge = ~labelled.clone()
        merge[:, 0] = True  # background plus the classes this sample's map does not label
        background = torch.logsumexp(logp.masked_fill(~merge[:, :, None, None], -math.inf), dim=1, keepdim=True)
        logp = torch.cat([background, logp[:, 1:]], dim=1)
    return F.nll_loss(logp, target)


def training_loss(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None, ce_weight: float):
    """Seed 000's soft F1 (ce_weight 0), or soft F1 + ce_weight x cross-entropy (nnU-Net's pairing)."""
    loss = soft_dice_loss(logits, target, labelled)
    return loss if ce_weight <= 0 else loss + ce_weight * marginal_cross_entropy(logits, target, labelled)


def widen_state(old: dict, new: dict, old_width: int, new_width: int) -> dict:
    """Function-preserving widening of a constant-width U-Net (Net2Net's idea, Chen et al. 2016,
    with zero-weight links instead of copied units): ``new`` is a freshly initialised wider
    network's state. Old units keep their weights and BatchNorm statistics and read no new unit;
    new units read everything (their own random weights); the head and every old unit get zero
    weights from the new units, so the widened network's eval output equals the old one's. A
    tensor dimension of old_width (one level's features) or 2 x old_width (decoder input: the
    upsampled features concatenated with the skip) is mapped block by block."""
    def index(old_size: int, new_size: int) -> torch.Tensor:
        if old_size == new_size:
            return torch.arange(old_size)
        blocks = old_size // old_width
        if old_size % old_width or new_size != blocks * new_width:
            raise ValueError(f"cannot map a dimension of {old_size} onto {new_size} when widening "
                             f"{old_width} -> {new_width} channels")
        return torch.cat([torch.arange(old_width) + b * new_width for b in range(blocks)])

    out = {}
    for name, w_new in new.items():
        w_old = old[name]
        if w_new.dim() == 0:  # num_batches_tracked
            out[name] = w_old.clone()
            continue
        w = w_new.clone()
        if name.endswith("running_var"):
            w.fill_(1.0)
        elif name.endswith("running_mean") or name.endswith("bias"):
            w.zero_()
        elif w.dim() == 1:  # BatchNorm scale
            w.fill_(1.0)
        idx = [index(a, b) for a, b in zip(w_old.shape, w_new.shape)]
        if w.dim() == 4:  # conv: old units (and the head) read no new unit
            out_dim = 1 if name.startswith("up.") and name.count(".") == 2 else 0  # ConvTranspose2d is (in, out, k, k)
            rows = [slice(None)] * 4
            rows[out_dim] = idx[out_dim]
            w[tuple(rows)] = 0.0
        w[torch.meshgrid(*idx, indexing="ij")] = w_old
        out[name] = w
    return out


def lr_at(cfg: Config, iteration: int) -> float:
    """Exponential decay from lr to lr_final over the iteration budget (seed: 1e-3 toward 1e-4)."""
    return cfg.lr * (cfg.lr_final / cfg.lr) ** min(1.0, iteration / max(1, cfg.iterations))



def train(cfg: Config, out: Path, resume: bool, device: str = "cpu", max_minutes: float | None = None,
          log=print, volumes_path: Path | None = None) -> dict:
    """Train on the synthetic stream (trainloop.run_loop): evaluation every cfg.eval_every iterations
    on fixed validation slices, each evaluation's weights in OUT/snapshots, the best in best.pt,
    last.pt for --resume (the stream restarts seeded by the iteration it resumes at)."""
    from knee_eval import evaluate_slices
    from SpineKneeSegLib.engine.weights import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    volumes = load_volumes(volumes_path or out / "volumes.pt", dev)
    if cfg.held_out == ALL_ANATOMIES:  # the final model: every anatomy trains; validation has no unseen anatomy
        train_vols, held = volumes, volumes
    else:
        train_vols = [v for v in volumes if v.name != cfg.held_out]
        held = [v for v in volumes if v.name == cfg.held_out]
    if not held or not train_vols:
        raise SystemExit(f"need the held-out label map {cfg.held_out} and at least one other in {volumes_path}")
    if cfg.variant != "multiclass" and any(len(v.labelled) < BONES for v in train_vols):
        raise SystemExit(f"variant {cfg.variant} needs all four bones labelled in every training volume")
    synth = SynthConfig(**cfg.synth)
    val_x, val_y = validation_set(held, cfg, synth)
    log(f"training on {[v.name for v in train_vols]}, validating on {len(val_x)} synthetic slices of "
        f"{[v.name for v in held]}")
    seed_everything(cfg.seed)
    net = build_network("unet2d", network_config(cfg)).to(dev)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    if cfg.init:  # fine-tuning: a shipped model on data users bring, or a lower-lr continuation
        initialise(net, cfg, log)
    model = "fibula" if cfg.variant == "fibula" else "labels"  # the per-bone model runs as --aux-weights fibula=

    def loss_fn(net, batch):
        x, y, labelled = (t.to(dev) for t in batch)
        mask = labelled if cfg.variant == "multiclass" else None
        return training_loss(net(x), variant_target(y, cfg.variant), mask, cfg.ce_weight)

    def evaluate(net):
        metrics = evaluate_slices(net, val_x, val_y, cfg.variant)
        return Evaluation(metrics["mean_dice"], metrics, {"val/mean_dice": metrics["mean_dice"],
                                                         **{f"val/dice_{k}": v for k, v in metrics["dice"].items()}},
                          metrics)

    def save(path, state, evaluation):
        meta = {"iteration": state["step"], "val": evaluation.metrics, "config": asdict(cfg), "variant": cfg.variant,
                "held_out": cfg.held_out, "trained_on": [v.name for v in train_vols]}
        save_checkpoint(path, TASK, "unet2d", network_config(cfg), {k: v.cpu() for k, v in net.state_dict().items()},
                        metadata=meta, model=model)

    def snapshot(net, state, evaluation):  # every evaluation's weights (~0.2 MB): variants compared at equal iterations
        state["history"][-1]["iteration"] = state["step"]
        (out / "snapshots").mkdir(exist_ok=True)
        save(out / "snapshots" / f"iter-{state['step']:06d}.pt", state, evaluation)

    loop = LoopConfig(steps=cfg.iterations, stop_after=cfg.stop_after, eval_every=cfg.eval_every,
                      patience=cfg.patience, device=device, seed=cfg.seed, max_minutes=max_minutes or None)
    state = run_loop(net, optimiser, lambda step: batch_stream(train_vols, synth, cfg, step), loss_fn, loop, out,
                     evaluate=evaluate, save_best=lambda path, _net, st, ev: save(path, st, ev),
                     on_evaluation=snapshot, lr_at=lambda step: lr_at(cfg, step), resume=resume,
                     extra={"config": asdict(cfg)}, log=log,
                     resume_message=lambda st: f"resumed at iteration {st['step']} (best {st['best']:.4f} at epoch "
                                               f"{st['best_epoch']})")
    state["iteration"] = state["step"]
    return state


def initialise(net, cfg: Config, log=print) -> None:
    """Load cfg.init's weights into ``net``, widening a narrower constant-width network."""
    from SpineKneeSegLib.engine.weights import load_checkpoint

    init = load_checkpoint(Path(cfg.init))
    widths = tuple(init["network"]["config"]["channels"])
    width = widths[0]
    if width != cfg.channels:  # e.g. the seed's 32 channels started from a trained 16-channel model
        if width > cfg.channels or widths != (width,) * cfg.levels:
            raise SystemExit(f"{cfg.init}: a {widths}-channel network cannot "
                             f"start a {cfg.channels}-channel one (only widening a constant width)")
        net.load_state_dict(widen_state(init["state_dict"], net.state_dict(), width, cfg.channels))
        log(f"initialised from {cfg.init}, widened {width} -> {cfg.channels} channels")
    else:
        net.load_state_dict(init["state_dict"])
        log(f"initialised from {cfg.init}")
