"""A boundary refiner for the lumbar levels, measured by cross-validation (issue 21's Dice target).

Session 28 found where the level model's Dice goes (``level_dice_errors.py``): 92 % of the wrong
voxels on correctly named scans lie in slices where both prediction and truth have the level, and
about 85 % of them within 2 pixels of the true outline. The level network works on a 1.4 mm grid
with nearest-sampled targets; this tries a small second network at the scan's own pixels that
sees the image and the level model's summed body probability and redraws the outline in a thin
band around the decoded bodies. The decoded names are kept: each refined voxel takes the level of
the nearest decoded voxel, so the refiner cannot shift, duplicate or drop a level.

    python Training/level_refine.py probabilities --run Training/runs/levels-ctx-D32 \
        --summary Training/results/levels-ctx-D32/cv_summary.json --out .devdata/levels-oof.npz
    python Training/level_refine.py cv --oof .devdata/levels-oof.npz --out Training/runs/level-refine

``probabilities``: every scan's out-of-fold prediction (its own fold model, that fold's decoder
settings). ``cv``: for each fold, a refiner trained on the other folds' scans (their out-of-fold
predictions as input), scored on the fold's scans; Dice before and after, per scan.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

LEVELS = 5


# ---- data --------------------------------------------------------------------------------------

def slices_first(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0)


def normalise(image: np.ndarray) -> np.ndarray:
    """Per scan: 1st..99th percentile to 0..1 (the refiner's own input scale)."""
    lo, hi = np.percentile(image, (1, 99))
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1.5).astype(np.float32)


def band(labels: np.ndarray, width: int) -> np.ndarray:
    """In-plane band of ``width`` pixels either side of the decoded bodies' outline (slices first)."""
    body = labels > 0
    se = np.zeros((1, 2 * width + 1, 2 * width + 1), bool)
    se[0] = ndimage.generate_binary_structure(2, 1)[...] if width == 1 else _disc(width)
    return ndimage.binary_dilation(body, se) & ~ndimage.binary_erosion(body, se)


def _disc(r: int) -> np.ndarray:
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (y * y + x * x) <= r * r


def refined_labels(labels: np.ndarray, body: np.ndarray, width: int) -> np.ndarray:
    """The decoded ``labels`` with their outline redrawn by ``body`` inside the band: band voxels
    the refiner calls body take the level of the nearest decoded voxel in their slice."""
    b = band(labels, width)
    out = labels.copy()
    out[b] = 0
    for s in np.flatnonzero(b.any(axis=(1, 2))):
        if not labels[s].any():
            continue
        _, (iy, ix) = ndimage.distance_transform_edt(labels[s] == 0, return_indices=True)
        nearest = labels[s][iy, ix]
        take = b[s] & body[s]
        out[s][take] = nearest[take]
    return out


# ---- network -----------------------------------------------------------------------------------

class Refiner(torch.nn.Module):
    """Two-level 2D network at the scan's own pixels: (image, body probability) -> body logit,
    added to the probability's own logit (it learns the correction)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(i, o, d=1):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=d, dilation=d), torch.nn.BatchNorm2d(o),
                                       torch.nn.ELU())
        self.enc = torch.nn.Sequential(block(2, w), block(w, w))
        self.down = torch.nn.Sequential(block(w, 2 * w), block(2 * w, 2 * w, 2), block(2 * w, 2 * w, 4))
        self.dec = torch.nn.Sequential(block(3 * w, w), torch.nn.Conv2d(w, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        d = self.down(F.avg_pool2d(e, 2))
        d = F.interpolate(d, size=e.shape[-2:], mode="bilinear", align_corners=False)
        p = x[:, 1:2].clamp(1e-3, 1 - 1e-3)
        return self.dec(torch.cat([e, d], 1)) + torch.log(p / (1 - p))


# ---- commands ----------------------------------------------------------------------------------

def cmd_probabilities(args) -> int:
    from level_column import case_labels, spine_cases
    from level_eval import fold_models, run_network, score
    from SpineKneeSegLib.core.datasets import data_root
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
    from SpineKneeSegLib.engine.preprocessing import canonical_orientation
    from SpineKneeSegLib.tasks.spine.level_decoding import decode_levels

    torch.set_num_threads(args.threads)
    root = data_root()
    if root is None:
        print("no shared data: set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    cases = {c["id"]: c for c in spine_cases(root, log=lambda *_: None)}
    store = {}
    for f, held_out, weights, net, params in fold_models(args.run, json.loads(args.summary.read_text())):
        for cid in held_out:
            image, truth = read_image(cases[cid]["image"]), case_labels(cases[cid])
            probs = run_network(net, weights.preprocessing, image).probabilities
            d = decode_levels(probs, image, params)
            pred = largest_component_per_label(d.labels)
            axis = canonical_orientation(image, "sagittal").axes[0]
            key = cid.replace("/", "__")
            store[f"{key}__image"] = slices_first(image.array.astype(np.float32), axis)
            store[f"{key}__prob"] = slices_first(np.minimum(probs.sum(axis=0, dtype=np.uint16), 255).astype(np.uint8), axis)
            store[f"{key}__pred"] = slices_first(pred.astype(np.uint8), axis)
            store[f"{key}__truth"] = slices_first(truth.astype(np.uint8), axis)
            store[f"{key}__meta"] = np.array([f, int(score(pred, truth, image)["identification"]["all_correct"])])
            print(cid, "fold", f, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **store)
    return 0


def load_oof(path: Path) -> dict:
    z = np.load(path)
    cases = {}
    for k in z.files:
        cid, part = k.rsplit("__", 1)
        cases.setdefault(cid.replace("__", "/"), {})[part] = z[k]
    for c in cases.values():
        c["fold"], c["right"] = int(c["meta"][0]), bool(c["meta"][1])
        c["x"] = np.stack([normalise(c["image"]), c["prob"].astype(np.float32) / 255])
    return cases


def level_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    d = []
    for k in range(1, LEVELS + 1):
        p, t = pred == k, truth == k
        d.append(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
    return float(np.mean(d))


def sample(cases: list[dict], n: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(n):
        c = cases[rng.integers(len(cases))]
        slices = np.flatnonzero(c["pred"].any(axis=(1, 2)))
        s = int(rng.choice(slices))
        ys_, xs_ = np.nonzero(c["pred"][s])
        i = rng.integers(len(ys_))
        h, w = c["pred"].shape[1:]
        y0 = int(np.clip(ys_[i] - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, max(h - size, 0)))
        x0 = int(np.clip(xs_[i] - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, max(w - size, 0)))
        x = c["x"][:, s, y0:y0 + size, x0:x0 + size]
        y = (c["truth"][s, y0:y0 + size, x0:x0 + size] > 0).astype(np.float32)
        pad = ((0, size - x.shape[1]), (0, size - x.shape[2]))
        x = np.stack([np.pad(ch, pad) for ch in x])
        y = np.pad(y, pad)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        gain = rng.uniform(0.8, 1.2)
        x = x.copy()
        x[0] = x[0] * gain
        xs.append(x)
        ys.append(y.copy())
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))[:, None]


def train(cases: list[dict], steps: int, batch: int, size: int, seed: int, width: int) -> Refiner:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = Refiner()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for step in range(steps):
        x, y = sample(cases, batch, size, rng)
        logits = net(x)
        # the loss where the refiner may act: the band around the level model's bodies
        w = torch.from_numpy(np.stack([band((xi[1].numpy() >= 0.5)[None].astype(np.uint8), width)[0]
                                       for xi in x]))[:, None].float() + 0.1
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step} loss {loss.item():.4f}", flush=True)
    return net.eval()


@torch.inference_mode()
def refine(net: Refiner, c: dict, width: int, threshold: float = 0.5) -> np.ndarray:
    keep = np.flatnonzero(c["pred"].any(axis=(1, 2)))
    body = np.zeros(c["pred"].shape, bool)
    for i in range(0, len(keep), 8):
        s = keep[i:i + 8]
        x = torch.from_numpy(c["x"][:, s].transpose(1, 0, 2, 3).copy())
        body[s] = (torch.sigmoid(net(x))[:, 0] >= threshold).numpy()
    return refined_labels(c["pred"], body, width)


def cmd_cv(args) -> int:
    from SpineKneeSegLib.engine.postprocessing import largest_component_per_label

    torch.set_num_threads(args.threads)
    cases = load_oof(args.oof)
    folds = sorted({c["fold"] for c in cases.values()})
    rows = {}
    t0 = time.perf_counter()
    for f in folds:
        train_cases = [c for c in cases.values() if c["fold"] != f]
        print(f"fold {f}: refiner trained on {len(train_cases)} scans", flush=True)
        net = train(train_cases, args.steps, args.batch_size, args.size, args.seed, args.band)
        for cid, c in cases.items():
            if c["fold"] != f:
                continue
            t = time.perf_counter()
            new = largest_component_per_label(refine(net, c, args.band))
            secs = time.perf_counter() - t
            before, after = level_dice(c["pred"], c["truth"]), level_dice(new, c["truth"])
            rows[cid] = {"fold": f, "right": c["right"], "before": round(before, 4), "after": round(after, 4),
                         "refine_s": round(secs, 3)}
            print(f"{cid:22s} fold {f} {'ok ' if c['right'] else 'BAD'} Dice {before:.4f} -> {after:.4f}", flush=True)
    right = [r for r in rows.values() if r["right"]]
    summary = {"steps": args.steps, "band": args.band, "seed": args.seed, "minutes": round((time.perf_counter() - t0) / 60, 1),
               "scans": len(rows), "named_right": len(right),
               "dice_before": round(float(np.mean([r["before"] for r in rows.values()])), 4),
               "dice_after": round(float(np.mean([r["after"] for r in rows.values()])), 4),
               "dice_before_right": round(float(np.mean([r["before"] for r in right])), 4),
               "dice_after_right": round(float(np.mean([r["after"] for r in right])), 4),
               "better_on": sum(r["after"] > r["before"] for r in rows.values())}
    print(json.dumps(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "refine_cv.json").write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probabilities", help="every scan's out-of-fold prediction")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_probabilities)
    p = sub.add_parser("cv", help="refiner per fold, scored on the fold's scans")
    p.add_argument("--oof", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=96, help="training crop, pixels")
    p.add_argument("--band", type=int, default=2, help="pixels either side of the outline the refiner may redraw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_cv)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
