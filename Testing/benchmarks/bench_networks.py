"""Network-only inference speed per task on the device at hand (CPU, or a lent GPU): the
registered weights loaded through the product's path (batch-norm folded, channels-last), a batch
of slices at the task's network size, median of several timed passes after warm-ups.

    python Testing/benchmarks/bench_networks.py [--device cuda] [--batches 1 8 32] [--runs 20]
    python Testing/benchmarks/bench_networks.py --train [--amp] [--batches 8 32]   # training steps

Prints ms per batch and per slice. This is the network alone: reading, resampling and
post-processing are in bench_overhead.py (which needs the full install and the data). ``--extra``
adds freshly initialised MultiNet configs (JSON) under the lumbar task's input size, to price a
candidate network before it is trained. ``--train``: one optimisation step per timing instead
(the registered architecture unfolded, in training mode, forward + loss + backward + Adam, random
targets), i.e. the network's share of a training step: sampling and augmentation, which each
training script does in its own way, are not in it; ``--amp`` runs it under bfloat16 autocast.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from SpineKneeSegLib.core.memory import keep_freed_memory
from SpineKneeSegLib.engine.inference import load_network
from SpineKneeSegLib.engine.models import build_network, fold_batch_norm
from SpineKneeSegLib.engine.weights import resolve_weights
from SpineKneeSegLib.tasks import TASKS

# slice size each task's network sees: the crop window where the card has one, else a typical
# resampled slice (lumbar 1.4 mm sagittal, brain 1 mm axial)
TYPICAL_PX = {"lumbar-foramina": 192, "brain-wmh": 256}


def time_forward(net: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            net(x)
        sync()
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            net(x)
            sync()
            samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def time_train_step(net: torch.nn.Module, x: torch.Tensor, activation: str, runs: int, amp: bool) -> float:
    """Median seconds of one training step: forward, loss against random targets (cross-entropy
    for a softmax head, binary cross-entropy for a sigmoid one), backward and an Adam update."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)
    with torch.no_grad():
        channels = net(x[:1]).shape[1]
    if activation == "softmax":
        target = torch.randint(0, channels, (x.shape[0], *x.shape[-2:]), device=x.device)
        loss_of = torch.nn.functional.cross_entropy
    else:
        target = torch.randint(0, 2, (x.shape[0], channels, *x.shape[-2:]), device=x.device).float()
        loss_of = torch.nn.functional.binary_cross_entropy_with_logits

    def step():
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        loss_of(out.float(), target).backward()
        optimiser.step()

    for _ in range(3):
        step()
    sync()
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        step()
        sync()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (the command line keeps freed memory: core/memory.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--extra", type=json.loads, action="append", default=[],
                        help="a MultiNet config (JSON) to price at the lumbar input size")
    parser.add_argument("--train", action="store_true", help="time training steps instead of inference")
    parser.add_argument("--amp", action="store_true", help="with --train: bfloat16 autocast")
    args = parser.parse_args(argv)
    if not args.system_malloc:
        keep_freed_memory()  # as the command line does
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    mode = f"training steps{' (bfloat16 autocast)' if args.amp else ''}" if args.train else "inference"
    print(f"device: {name}; torch {torch.__version__}; {mode}")
    print(f"{'network':34s} {'input':>14s} " + " ".join(f"{'batch ' + str(b):>22s}" for b in args.batches))
    rows = []
    for task, card in TASKS.items():
        weights = resolve_weights(card)
        if args.train:  # the architecture as trained: batch norm not folded, training mode
            net = build_network(weights.network["factory"], weights.network["config"]).to(device).train()
            net = net.to(memory_format=torch.channels_last)
        else:
            net = load_network(weights, device)
        rows.append((f"{task} (registered)", net, net_in_channels(net),
                     card.preprocessing.network_px or TYPICAL_PX.get(task, 256), card.label_activation))
    for config in args.extra:
        full = {**config, "in_channels": 3, "out_channels": 5}
        net = build_network("multinet", full)
        net = (net.train() if args.train else fold_batch_norm(net.eval())).to(device).to(memory_format=torch.channels_last)
        rows.append((f"multinet {config.get('base_channels')}->{config.get('max_channels')} x{config.get('levels')}",
                     net, 3, TYPICAL_PX["lumbar-foramina"], "sigmoid"))
    for label, net, channels, px, activation in rows:
        cells = []
        for b in args.batches:
            x = torch.randn(b, channels, px, px, device=device).to(memory_format=torch.channels_last)
            s = time_train_step(net, x, activation, args.runs, args.amp) if args.train else time_forward(net, x, args.runs)
            cells.append(f"{s * 1e3:8.2f} ms {s * 1e3 / b:7.3f}/sl")
        print(f"{label:34s} {f'{channels}x{px}x{px}':>14s} " + " ".join(f"{c:>22s}" for c in cells), flush=True)
    return 0


def net_in_channels(net: torch.nn.Module) -> int:
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    return first.in_channels


if __name__ == "__main__":
    raise SystemExit(main())
