"""Generic slice-wise training for any task card: the same preprocessing functions and network
factory as inference (SpineKneeSegLib), so a trained checkpoint runs unchanged in every door.

Task issues add their own losses, augmentation and data importers on top; this is the common loop
(soft Dice + cross-entropy for the label softmax, Adam, seeded, checkpoint via the weights format),
run on trainloop.run_loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.engine.cards import TaskCard  # noqa: E402
from SpineKneeSegLib.engine.models import build_network  # noqa: E402
from SpineKneeSegLib.engine.preprocessing import (  # noqa: E402
    context_channels,
    pad_to,
    training_slices,
)
from SpineKneeSegLib.engine.weights import save_checkpoint  # noqa: E402
from trainloop import LoopConfig, init_distributed, run_loop, seed_everything


def slices_for_training(card: TaskCard, image: Image, labels: Image, multiple: int,
                        preprocessing: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) float inputs and (N, H, W) long targets on the network grid, built exactly as
    inference builds its inputs (labels resampled nearest-neighbour); ``preprocessing`` overrides
    the card's (and is stored in the checkpoint, as inference reads it back)."""
    pre = {**card.preprocessing.__dict__, **(preprocessing or {})}
    stack, target, grid = training_slices(image, labels.array, pre["plane"], pre["normalisation"],
                                          pre["in_plane_spacing_mm"], multiple, pre.get("network_px"),
                                          pre.get("crop_mm"))
    x = torch.from_numpy(context_channels(stack, np.arange(stack.shape[0]), pre["context_slices"]))
    return pad_to(x, grid.padded_hw), pad_to(torch.from_numpy(target).long(), grid.padded_hw)


def foreground_dice_loss(logits: torch.Tensor, target: torch.Tensor, n_labels: int, activation: str) -> torch.Tensor:
    """1 - mean foreground soft Dice over the batch (smoothing 1): sigmoid channels, one per label
    (seed 003), or a softmax whose channel 0 is background (seed 001)."""
    onehot = F.one_hot(target, n_labels + 1).permute(0, 3, 1, 2).float()[:, 1:]
    probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)[:, 1:]
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    dice = (2 * inter + 1.0) / (probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3)) + 1.0)
    return 1 - dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Softmax heads (``n_classes`` with background): foreground soft Dice + cross-entropy."""
    logits = logits[:, :n_classes]
    return foreground_dice_loss(logits, target, n_classes - 1, "softmax") + F.cross_entropy(logits, target)


def sigmoid_dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Sigmoid heads (one channel per label, e.g. xray-femur): soft Dice + BCE per channel."""
    onehot = F.one_hot(target, n_labels + 1).permute(0, 3, 1, 2)[:, 1:].float()
    bce = F.binary_cross_entropy_with_logits(logits, onehot)
    return foreground_dice_loss(logits, target, n_labels, "sigmoid") + bce


@dataclass
class TrainConfig:
    network: dict
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    preprocessing: dict | None = None  # overrides of the card's (e.g. a smaller network_px)


def train(card: TaskCard, pairs: list[tuple[Image, Image]], config: TrainConfig, checkpoint: str | Path,
          metadata: dict | None = None) -> list[float]:
    """Train on (image, labels) pairs; write the checkpoint; return the per-epoch mean losses."""
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    net_config = {**card.network.config, **config.network, "in_channels": card.preprocessing.context_slices,
                  "out_channels": card.output_channels}
    net = build_network(card.network.factory, net_config)
    multiple = getattr(net, "size_multiple", 1)
    data = [slices_for_training(card, im, lab, multiple, config.preprocessing) for im, lab in pairs]
    n_classes = len(card.labels) + 1
    if card.label_activation == "sigmoid":
        criterion = lambda logits, y: sigmoid_dice_bce_loss(logits, y, len(card.labels))  # noqa: E731
    else:
        criterion = lambda logits, y: dice_ce_loss(logits, y, n_classes)  # noqa: E731
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    sizes = [-(-len(x) // config.batch_size) for x, _ in data]  # batches of each pair per epoch

    rank, world = init_distributed()

    def batches(_step):  # under torchrun each process takes every world-th batch of the epochs (rank 0 of 1: all)
        n = 0
        while True:
            for x, y in data:
                for start in range(0, len(x), config.batch_size):
                    pick = rng.permutation(len(x))[start:start + config.batch_size] if len(x) > config.batch_size \
                        else np.arange(len(x))
                    if n % world == rank:
                        yield x[pick], y[pick]
                    n += 1

    per_epoch = -(-sum(sizes) // world)  # each process's share of an epoch's batches: N processes, 1/N the steps
    loop = LoopConfig(steps=config.epochs * per_epoch, checkpoint_every=per_epoch, seed=config.seed,
                      tensorboard=False, round_loss=None)
    state = run_loop(net, optimiser, batches, lambda n, b: criterion(n(b[0]), b[1]), loop, None,
                     log=lambda _: None)
    history = [h["loss"] for h in state["history"]]
    save_checkpoint(checkpoint, card.name, card.network.factory, net_config, net.state_dict(),
                    preprocessing=config.preprocessing,
                    metadata={"trained": True, "epochs": config.epochs, "final_loss": history[-1], **(metadata or {})})
    return history
