"""Slice-wise network inference with memory proportional to one batch of slices."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .image import Image
from .models import build_network
from .preprocessing import (context_channels, from_slices, network_grid, network_grid_image, normalise, pad_to,
                            resize_batch, slice_axis, to_slices)
from .progress import Progress
from .tasks import TaskCard
from .weights import LoadedWeights


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import InputError

        raise InputError("--device cuda requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


@dataclass
class NetworkOutput:
    labels: np.ndarray  # uint8, input array shape
    # extra heads as uint8 0..255 probabilities (C, *grid shape) on the network grid (the seed
    # localises foramina there; resampling them to the input grid would only cost time)
    heads: dict[str, np.ndarray] = field(default_factory=dict)
    heads_grid: Image | None = None
    network_s: float = 0.0
    preprocess_s: float = 0.0
    postprocess_s: float = 0.0


def load_network(weights: LoadedWeights, device: torch.device) -> torch.nn.Module:
    net = build_network(weights.network["factory"], weights.network["config"])
    net.load_state_dict(weights.checkpoint["state_dict"])
    return net.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def segment_slices(card: TaskCard, image: Image, net: torch.nn.Module, device: torch.device,
                   preprocessing: dict | None = None, batch_size: int = 8,
                   progress: Progress | None = None) -> NetworkOutput:
    """Run ``net`` over every slice; return labels (and extra heads) on the input's grid.

    Output layout of the network: softmax over (background + card.labels), then the card's
    ``extra_heads`` as sigmoid channels.
    """
    t0 = time.perf_counter()
    pre = {**card.preprocessing.__dict__, **(preprocessing or {})}
    axis = slice_axis(image, pre["plane"])
    stack = normalise(to_slices(image.array, axis), pre["normalisation"], pre.get("stats"))
    grid = network_grid(image, axis, pre["in_plane_spacing_mm"], getattr(net, "size_multiple", 1))
    n = stack.shape[0]
    n_classes = len(card.labels) + 1
    labels = np.zeros(stack.shape, dtype=np.uint8)
    heads = {h["name"]: np.zeros((h["channels"], n) + grid.network_hw, dtype=np.uint8) for h in card.extra_heads}
    timings = {"pre": time.perf_counter() - t0, "net": 0.0, "post": 0.0}
    for start in range(0, n, batch_size):
        t = time.perf_counter()
        index = np.arange(start, min(start + batch_size, n))
        x = torch.from_numpy(context_channels(stack, index, pre["context_slices"])).to(device)
        x = pad_to(resize_batch(x, grid.network_hw), grid.padded_hw)
        _sync(device)
        t_net = time.perf_counter()
        timings["pre"] += t_net - t
        logits = net(x)
        _sync(device)
        t_post = time.perf_counter()
        timings["net"] += t_post - t_net
        logits = logits[..., : grid.network_hw[0], : grid.network_hw[1]]
        class_logits = resize_batch(logits[:, :n_classes], grid.input_hw)
        # max().indices: torch's CPU argmax over a non-last dim is ~10x slower
        labels[index] = class_logits.max(dim=1).indices.to(torch.uint8).cpu().numpy()
        offset = n_classes
        for h in card.extra_heads:
            probs = torch.sigmoid(logits[:, offset: offset + h["channels"]])
            heads[h["name"]][:, index] = (probs * 255).round().to(torch.uint8).cpu().numpy().swapaxes(0, 1)
            offset += h["channels"]
        timings["post"] += time.perf_counter() - t_post
        if progress:
            progress.step("inference", min(start + batch_size, n), n)
    t = time.perf_counter()
    out = NetworkOutput(from_slices(labels, axis),
                        {k: np.moveaxis(v, 1, axis + 1) for k, v in heads.items()},
                        network_grid_image(image, grid) if heads else None,
                        network_s=timings["net"], preprocess_s=timings["pre"])
    out.postprocess_s = timings["post"] + time.perf_counter() - t
    return out
