"""Train the lumbar level model (seed 004's MultiNet, 5 sigmoid channels = L1..L5 bodies) on the
shared spine data, with the task card's own preprocessing and the Lib's inference for validation.

    python Training/spine_levels.py --out Training/runs/spine-levels [--epochs 200] [--resume]

Checkpoints every epoch (``last.pt``, resumable across sessions) and keeps ``best.pt`` (weights
format, best validation mean Dice); TensorBoard logs in the run folder. Fixed case-wise split.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from SpineKneeSegLib.core.atomic import write_text_atomic
from SpineKneeSegLib.core.datasets import data_root  # noqa: E402
from SpineKneeSegLib.engine.models import build_network  # noqa: E402
from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
from SpineKneeSegLib.engine.preprocessing import context_channels, training_slices  # noqa: E402
from SpineKneeSegLib.engine.weights import save_checkpoint  # noqa: E402
from SpineKneeSegLib.tasks import TASKS  # noqa: E402
from evalhelpers import dice_or, mean_per_key
from trainloop import Evaluation, LoopConfig, rank_stream, rank_torch_stream, run_loop, seed_everything


def read_image(path):
    """The Lib's reader, imported on first use: training from packed arrays (``--packed``, e.g. on a
    GPU machine without SimpleITK) needs none."""
    from SpineKneeSegLib.core.image_io import read_image as read

    return read(path)


CARD = TASKS["lumbar-foramina"]
N_LEVELS = 5
# Fixed validation cases (every 7th MyoSegmenTUM case and two Zukić T2 cases): never trained on.
VALIDATION = ("myosegmentum/case05", "myosegmentum/case12", "myosegmentum/case19", "myosegmentum/case26",
              "myosegmentum/case33", "myosegmentum/case40", "zukic-t2/case06", "zukic-t2/case12")


def spine_cases(root: Path, log=print) -> list[dict]:
    """Cases whose label map lies on the image's grid. Four Zukić cases (02, 04, 08, 10) have 19
    image slices but 20 label slices in the shared conversion; which slice is extra is unknown, so
    they are skipped (model v0.1.0 was trained before this check and did use them)."""
    cases = []
    for dataset in ("myosegmentum", "zukic-t2"):
        for folder in sorted((root / "spine" / dataset).glob("case*")):
            if not ((folder / "image.nii.gz").exists() and (folder / "vertebrae.nii.gz").exists()):
                continue
            image, labels = read_image(folder / "image.nii.gz"), read_image(folder / "vertebrae.nii.gz")
            if image.array.shape != labels.array.shape or not image.same_geometry(labels):
                log(f"skipping {dataset}/{folder.name}: labels {labels.array.shape} not on the image grid "
                    f"{image.array.shape}")
                continue
            cases.append({"id": f"{dataset}/{folder.name}", "image": folder / "image.nii.gz",
                          "labels": folder / "vertebrae.nii.gz"})
    return cases


def split(cases: list[dict]) -> tuple[list[dict], list[dict]]:
    val = [c for c in cases if c["id"] in VALIDATION]
    return [c for c in cases if c["id"] not in VALIDATION], val


def level_labels(labels: np.ndarray) -> np.ndarray:
    """Keep L1..L5 = 1..5; T12/T11 (6, 7 in the Zukić data) become background: important negatives."""
    return np.where((labels >= 1) & (labels <= N_LEVELS), labels, 0).astype(np.uint8)


@dataclass
class PreparedCase:
    id: str
    stack: np.ndarray  # (slices, H, W) float32, normalised, on the 1.4 mm network grid
    labels: np.ndarray  # (slices, H, W) uint8


def prepare(case: dict, spacing_mm: float) -> PreparedCase:
    """Exactly the inference preprocessing (same Lib functions), labels resampled nearest."""
    image, labels = read_image(case["image"]), read_image(case["labels"])
    pre = CARD.preprocessing
    x, y, _ = training_slices(image, level_labels(labels.array), pre.plane, pre.normalisation, spacing_mm)
    return PreparedCase(case["id"], x, y)


# ---- augmentation (torch, batched, so it runs on a lent GPU as well) -------------------------

def random_geometry(batch: int, size: int, max_rotation_deg: float, warp_px: float, gen: torch.Generator,
                    device) -> torch.Tensor:
    """Sampling grid: rotation about the left-right axis (in-plane for sagittal slices), +-10 %
    scale, and a smooth non-linear warp (coarse random displacements upsampled)."""
    angle = (torch.rand(batch, generator=gen, device=device) * 2 - 1) * math.radians(max_rotation_deg)
    scale = 1 + (torch.rand(batch, generator=gen, device=device) * 2 - 1) * 0.1
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, (batch, 1, size, size), align_corners=False)
    coarse = torch.randn(batch, 2, 5, 5, generator=gen, device=device) * (2 * warp_px / size)
    warp = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return grid + warp


def random_intensity(x: torch.Tensor, gen: torch.Generator, noise_sd: float) -> torch.Tensor:
    """Contrast augmentation so one model serves T1 and T2: a random monotone or inverted
    piecewise-linear remapping of the normalised intensities, gain/offset, then N(0, noise_sd)."""
    b = x.shape[0]
    device = x.device
    knots = torch.linspace(-3, 3, 7, device=device)
    values = torch.cumsum(torch.rand(b, 7, generator=gen, device=device) + 0.2, dim=1)
    values = (values - values.mean(1, keepdim=True)) / values.std(1, keepdim=True)
    invert = torch.rand(b, generator=gen, device=device) < 0.3
    values = torch.where(invert[:, None], -values, values)
    keep = torch.rand(b, generator=gen, device=device) < 0.4  # 40 % keep the original contrast
    idx = torch.clamp(torch.bucketize(x.clamp(-3, 3), knots) - 1, 0, 5)
    lo = knots[idx]
    frac = (x.clamp(-3, 3) - lo) / (knots[1] - knots[0])
    vb = values[:, None, None, None, :].expand(*x.shape, 7)
    remapped = torch.gather(vb, -1, idx[..., None])[..., 0] * (1 - frac) + \
        torch.gather(vb, -1, (idx + 1)[..., None])[..., 0] * frac
    x = torch.where(keep[:, None, None, None], x, remapped)
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen, device=device) * 2 - 1) * 0.2
    offset = (torch.rand(b, 1, 1, 1, generator=gen, device=device) * 2 - 1) * 0.2
    return x * gain + offset + torch.randn(x.shape, generator=gen, device=device) * noise_sd


# ---- losses ----------------------------------------------------------------------------------

def level_weights(cases: list[PreparedCase]) -> torch.Tensor:
    """Seed 004: per-channel weights from inverse label frequency, normalised to a maximum of 1."""
    counts = np.bincount(np.concatenate([c.labels.ravel() for c in cases]), minlength=N_LEVELS + 1)[1:]
    inverse = 1.0 / np.maximum(counts, 1)
    return torch.tensor(inverse / inverse.max(), dtype=torch.float32)


def weighted_dice_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    probs = torch.sigmoid(logits)
    inter = (probs * target).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    w = torch.ones_like(dice) if weights is None else weights.to(dice.device)
    return 1 - (w * dice).sum() / w.sum()


def loss_fn(kind: str, weights: torch.Tensor):
    if kind == "weighted-dice":  # the seed's normalised Dice (default)
        return lambda logits, target: weighted_dice_loss(logits, target, weights)
    if kind == "dice":
        return lambda logits, target: weighted_dice_loss(logits, target, None)
    if kind == "bce":
        return lambda logits, target: F.binary_cross_entropy_with_logits(logits, target)
    raise ValueError(f"unknown loss {kind!r}")


# ---- evaluation (the Lib's own inference path) -------------------------------------------------

def level_identification(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Seed 004's check: each level's (largest) predicted component must overlap its own body most;
    a shift means it overlaps a neighbour's body instead (e.g. L5 predicted on L4)."""
    result = {"correct": 0, "missing": 0, "shifted": 0, "misplaced": 0, "shifts": []}
    for level in range(1, N_LEVELS + 1):
        mask = pred == level
        if not mask.any():
            result["missing"] += 1
            continue
        overlap = np.bincount(truth[mask], minlength=N_LEVELS + 1)
        overlap[0] = 0
        if not overlap.any():  # on no body at all (e.g. on T12 or the sacrum)
            result["misplaced"] += 1
            continue
        best = int(overlap.argmax())
        if best == level:
            result["correct"] += 1
        else:
            result["shifted"] += 1
            result["shifts"].append((level, best))
    result["all_correct"] = result["correct"] == N_LEVELS
    return result


def evaluate_cases(net: torch.nn.Module, cases: list[dict], config: dict | None = None) -> dict:
    net.eval()
    per_case = {}
    pre = {"in_plane_spacing_mm": (config or {}).get("spacing_mm", CARD.preprocessing.in_plane_spacing_mm)}
    for case in cases:
        from SpineKneeSegLib.engine.inference import segment_slices

        image = read_image(case["image"])
        truth = level_labels(read_image(case["labels"]).array)
        out = segment_slices(CARD, image, net, torch.device("cpu"), pre, batch_size=8)
        pred = largest_component_per_label(out.labels)
        per_case[case["id"]] = {"dice": {f"L{k}": round(dice_or(pred == k, truth == k, empty=1.0), 4)
                                         for k in range(1, N_LEVELS + 1)},
                                "identification": level_identification(pred, truth)}
    means = mean_per_key([c["dice"] for c in per_case.values()], [f"L{k}" for k in range(1, N_LEVELS + 1)], None)
    return {"mean_dice": float(np.mean(list(means.values()))), "per_level_dice": means,
            "all_levels_identified": sum(c["identification"]["all_correct"] for c in per_case.values()),
            "cases": per_case}


# ---- training ----------------------------------------------------------------------------------

@dataclass
class Config:
    epochs: int = 200
    patience: int = 25
    batch_size: int = 16
    crop: int = 160
    lr: float = 1e-3
    loss: str = "weighted-dice"
    activation: str = "elu"
    spacing_mm: float = 1.4
    max_rotation_deg: float = 45.0
    warp_px: float = 4.0
    noise_sd: float = 0.25
    seed: int = 0
    network: dict = field(default_factory=lambda: dict(CARD.network.config))


def case_probabilities(cases: list[PreparedCase]) -> np.ndarray:
    """Each dataset (sequence) equally often: 38 T1 cases must not drown the 8 T2 ones."""
    datasets = [c.id.split("/")[0] for c in cases]
    weights = np.array([1.0 / datasets.count(d) for d in datasets])
    return weights / weights.sum()


def sample_batch(cases: list[PreparedCase], cfg: Config, rng: np.random.Generator, gen: torch.Generator):
    """Random slices (with their 3-slice context) cropped to cfg.crop; crops favour the spine."""
    xs, ys = [], []
    probabilities = case_probabilities(cases)
    for _ in range(cfg.batch_size):
        case = cases[rng.choice(len(cases), p=probabilities)]
        k = int(rng.integers(case.stack.shape[0]))
        x = context_channels(case.stack, np.array([k]), CARD.preprocessing.context_slices)[0]
        y = case.labels[k]
        h, w = y.shape
        size = cfg.crop
        pad_h, pad_w = max(0, size - h), max(0, size - w)
        if pad_h or pad_w:
            x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w)))
            y = np.pad(y, ((0, pad_h), (0, pad_w)))
            h, w = y.shape
        fg = np.argwhere(y > 0)
        if len(fg) and rng.random() < 0.8:
            cy, cx = fg[rng.integers(len(fg))]
            top = int(np.clip(cy - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, h - size))
            left = int(np.clip(cx - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, w - size))
        else:
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        xs.append(x[:, top:top + size, left:left + size])
        ys.append(y[top:top + size, left:left + size])
    x = torch.from_numpy(np.stack(xs)).float()
    y = torch.from_numpy(np.stack(ys)).long()
    target = F.one_hot(y, N_LEVELS + 1)[..., 1:].permute(0, 3, 1, 2).float()
    grid = random_geometry(len(x), cfg.crop, cfg.max_rotation_deg, cfg.warp_px, gen, x.device)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    target = (F.grid_sample(target, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    return random_intensity(x, gen, cfg.noise_sd), target


def network_config(cfg: Config) -> dict:
    return {**cfg.network, "activation": cfg.activation, "in_channels": CARD.preprocessing.context_slices,
            "out_channels": N_LEVELS}


def manifest_label_cases(manifest: Path) -> list[dict]:
    """Corrected level segmentations saved from Slicer (``annotate save-correction``): manifest
    rows of this task with a ``labels`` file; they join the training cases."""
    from SpineKneeSegLib.annotation.training_manifest import read_training_manifest

    return [{"id": f"manifest/{c.id}", "image": c.image, "labels": c.labels}
            for c in read_training_manifest(manifest) if c.task == CARD.name and c.labels is not None]


def train(cfg: Config, out: Path, root: Path, resume: bool, log=print, max_minutes: float | None = None,
          manifest: Path | None = None) -> dict:
    train_cases, val_cases = split(spine_cases(root))
    if manifest is not None:
        extra = manifest_label_cases(manifest)
        log(f"manifest: {len(extra)} corrected label maps join training")
        train_cases += extra
    prepared = [prepare(c, cfg.spacing_mm) for c in train_cases]
    log(f"{len(train_cases)} training / {len(val_cases)} validation cases")

    def evaluate(net):
        metrics = evaluate_cases(net, val_cases, asdict(cfg))
        scalars = {"val/mean_dice": metrics["mean_dice"],
                   "val/all_levels_identified": metrics["all_levels_identified"],
                   **{f"val/dice_{level}": v for level, v in metrics["per_level_dice"].items()}}
        return metrics["mean_dice"], scalars, metrics

    return train_loop(cfg, out, prepared, evaluate, resume, log, max_minutes,
                      metadata={"validation_cases": list(VALIDATION)})


def train_loop(cfg: Config, out: Path, prepared: list[PreparedCase], evaluate, resume: bool, log=print,
               max_minutes: float | None = None, metadata: dict | None = None, model: str = "labels") -> dict:
    """The MultiNet loop shared by the level and foramen models. ``evaluate(net)`` returns (score,
    scalars for TensorBoard, metrics); the best score is kept as ``best.pt`` (weights format)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = level_weights(prepared)
    log(f"{len(prepared)} prepared training cases; level weights {[round(float(w), 2) for w in weights]}")
    seed_everything(cfg.seed)
    net = build_network("multinet", network_config(cfg))
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    criterion = loss_fn(cfg.loss, weights)
    rng = rank_stream(np.random.default_rng(cfg.seed), cfg.seed)  # each data-parallel process its own batches
    gen = rank_torch_stream(torch.Generator().manual_seed(cfg.seed), cfg.seed)
    steps = max(1, sum(c.stack.shape[0] for c in prepared) // cfg.batch_size)  # one epoch

    def batches(_step):
        while True:
            yield sample_batch(prepared, cfg, rng, gen)

    def scored(net):
        score, scalars, metrics = evaluate(net)
        return Evaluation(score, {"score": score, **{k.replace("/", "_"): v for k, v in scalars.items()}},
                          scalars, metrics)

    def save_best(path, net, state, evaluation):
        save_checkpoint(path, CARD.name, "multinet", network_config(cfg), net.state_dict(),
                        preprocessing={"in_plane_spacing_mm": cfg.spacing_mm},
                        metadata={"epoch": state["epoch"], "val": evaluation.metrics, "config": asdict(cfg),
                                  **(metadata or {})}, model=model)
        write_text_atomic(out / "best_metrics.json", json.dumps(evaluation.metrics, indent=2))

    loop = LoopConfig(steps=cfg.epochs * steps, eval_every=steps, patience=cfg.patience, seed=cfg.seed,
                      max_minutes=max_minutes, round_loss=None)
    return run_loop(net, optimiser, batches, lambda n, b: criterion(n(b[0]), b[1]), loop, out, evaluate=scored,
                    save_best=save_best, rng=rng, gen=gen, resume=resume, extra={"config": asdict(cfg)}, log=log,
                    resume_message=lambda st: f"resumed at epoch {st['epoch']} (best {st['best']:.4f} at "
                                              f"{st['best_epoch']})")


# how a run is executed, not what it learns: may differ between the folds of one run (another machine)
EXECUTION_KEYS = ("threads", "device", "autocast")


def recipe_of_run(folds_json: Path, cfg, same_recipe: bool):
    """The recipe for more folds of the run whose ``folds.json`` this is: its stored recipe (with
    ``cfg``'s execution settings) if ``same_recipe``, else ``cfg`` itself, refused if it would
    train a fold differently from the folds before (one run, one recipe: its folds are scored as one)."""
    from dataclasses import replace

    import level_column as lc

    stored = json.loads(folds_json.read_text(encoding="utf-8"))["config"]
    if same_recipe:
        return replace(lc.ColumnConfig(**stored), **{k: getattr(cfg, k) for k in EXECUTION_KEYS})
    differ = {k: (v, stored.get(k)) for k, v in asdict(cfg).items() if k not in EXECUTION_KEYS and stored.get(k) != v}
    if differ:
        raise ValueError(f"{folds_json}: this command's recipe differs from the run's "
                         + ", ".join(f"{k}={v!r} (run: {w!r})" for k, (v, w) in differ.items())
                         + "; use --same-recipe to continue the run, or another --out for another recipe")
    return cfg


def column_main(argv) -> int:
    """``cv`` (case-wise k-fold: train each fold's model on the other folds, then score its held-out
    cases), ``final`` (the same recipe on every case) for the whole-column model (issue 21), and
    ``pack`` (the prepared scans in one file, --out FILE, for a machine without the data)."""
    import level_column as lc

    parser = argparse.ArgumentParser(prog="spine_levels.py " + argv[0], description=column_main.__doc__)
    parser.add_argument("--out", default="Training/runs/spine-levels-cv")
    parser.add_argument("--data", help="shared data root (default: SPINEKNEESEG_DATA or ../shared/data)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold", type=int, action="append", help="only these folds (default: all)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--evaluate-only", action="store_true", help="cv: score existing fold models")
    parser.add_argument("--eval-precision", default="float32", choices=("float32", "bfloat16"),
                        help="held-out scoring with the product's --precision")
    for name, value in asdict(lc.ColumnConfig()).items():
        if isinstance(value, bool):  # --context-targets / --no-context-targets
            parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        elif not isinstance(value, dict):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--network", type=json.loads, default=None, help="JSON network config (MultiNet)")
    parser.add_argument("--packed", type=Path, help="train from a file made by 'pack' (no data folder, no SimpleITK "
                        "needed; held-out scoring then waits for --evaluate-only where the data are)")
    parser.add_argument("--same-recipe", action="store_true", help="cv: train with the recipe in --out's folds.json "
                        "(more folds of a run begun earlier; --threads, --device and --autocast still apply)")
    args = parser.parse_args(argv[1:])
    fields = {k: getattr(args, k) for k in asdict(lc.ColumnConfig()) if k != "network"}
    cfg = lc.ColumnConfig(**fields, **({"network": args.network} if args.network else {}))
    out = Path(args.out)
    if argv[0] == "cv" and not args.evaluate_only and (out / "folds.json").exists():
        try:
            cfg = recipe_of_run(out / "folds.json", cfg, args.same_recipe)
        except ValueError as error:
            print(error, file=sys.stderr)
            return 2
    if args.packed:
        cases, packed = lc.unpack_cases(args.packed, cfg.spacing_mm)
        prepared_of = {p.id: p for p in packed}
    else:
        root = Path(args.data) if args.data else data_root()
        if root is None or not (root / "spine").exists():
            print("no spine data: set SPINEKNEESEG_DATA", file=sys.stderr)
            return 2
        cases = lc.spine_cases(root)
        prepared_of = None
    if argv[0] == "pack":
        out.parent.mkdir(parents=True, exist_ok=True)
        info = lc.pack_cases(out, cases, [lc.prepare(c, cfg.spacing_mm, cfg.targets == "soft") for c in cases],
                             cfg.spacing_mm)
        print(json.dumps({"packed": str(out), **info}))
        return 0

    def prepared(selected):
        return [prepared_of[c["id"]] if prepared_of else lc.prepare(c, cfg.spacing_mm, cfg.targets == "soft")
                for c in selected]

    out.mkdir(parents=True, exist_ok=True)
    notes = {c["id"]: c["note"] for c in cases if c["note"]}
    groups = [g for g in lc.duplicate_groups(cases) if len(g) > 1]
    print(f"{len(cases)} labelled scans; identical images: {groups or 'none'}")
    if argv[0] == "final":
        training = prepared(cases)
        lc.train_column(cfg, out, training, args.resume, max_minutes=args.max_minutes,
                        metadata={"trained_on": [c["id"] for c in cases], "duplicates": groups,
                                  "label_notes": notes})
        return 0
    folds_json = out / "folds.json"
    if args.evaluate_only and folds_json.exists():  # score what was trained: its folds and recipe stay as written
        folds = json.loads(folds_json.read_text(encoding="utf-8"))["folds"]
    else:
        folds = lc.make_folds(cases, args.folds, args.split_seed)
        if folds_json.exists() and json.loads(folds_json.read_text(encoding="utf-8"))["folds"] != folds:
            print(f"{folds_json}: its folds differ from this command's (--folds, --split-seed, the data); "
                  "use another --out", file=sys.stderr)
            return 2
        write_text_atomic(folds_json, json.dumps({"folds": folds, "duplicates": groups, "label_notes": notes,
                                                  "config": asdict(cfg)}, indent=2))  # a run outlives sessions
    for f in args.fold if args.fold is not None else range(args.folds):
        fold_dir = out / f"fold{f}"
        held_out = [c for c in cases if c["id"] in folds[f]]
        final = fold_dir / "final.pt"
        if not args.evaluate_only:
            if not final.exists():
                training = prepared([c for c in cases if c["id"] not in folds[f]])
                print(f"fold {f}: training on {len(training)} scans, {len(held_out)} held out")
                if lc.train_column(cfg, fold_dir, training, args.resume, max_minutes=args.max_minutes,
                                   metadata={"fold": f, "held_out": folds[f]}) is None:
                    return 0
        if final.exists() and not args.packed:
            from level_eval import evaluate_fold

            evaluate_fold(final, held_out, fold_dir / "evaluation.json", precision=args.eval_precision)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("cv", "final", "pack"):
        return column_main(argv)
    if argv and argv[0] == "ship":
        from level_ship import ship

        parser = argparse.ArgumentParser(prog="spine_levels.py ship", description="card + registry of the final model")
        parser.add_argument("--cv", required=True, help="the cv run (after cv-report)")
        parser.add_argument("--final", required=True, help="the final run (same recipe, every scan)")
        parser.add_argument("--version", required=True)
        parser.add_argument("--command", action="append", default=[], help="a command of the run, for the card")
        parser.add_argument("--note", action="append", default=[], help="a line for the card's training section")
        parser.add_argument("--external", type=Path, help="level_external.py's external.json (its 'registered' runs)")
        parser.add_argument("--candidate", type=Path, help="only write the checkpoint that would ship (for "
                            "level_external.py --weights PATH --name registered), register nothing")
        args = parser.parse_args(argv[1:])
        print(ship(Path(args.cv), Path(args.final), args.version, args.command, args.note, args.external,
                   args.candidate))
        return 0
    if argv and argv[0] == "attach-context":
        import level_column as lc

        parser = argparse.ArgumentParser(prog="spine_levels.py attach-context", description="re-save a context-"
                                         "targets model saved before session 30 with its context heads, from the "
                                         "run's last checkpoint at the same step (then score it again)")
        parser.add_argument("final", type=Path, help="foldN/final.pt")
        parser.add_argument("--last", type=Path, help="default: last.pt beside it")
        args = parser.parse_args(argv[1:])
        from SpineKneeSegLib.core.errors import InputError

        try:
            print(lc.attach_context(args.final, args.last or args.final.with_name("last.pt")))
        except InputError as error:  # names the file itself
            print(error, file=sys.stderr)
            return 2
        except (ValueError, OSError) as error:
            print(f"{args.final}: {error}", file=sys.stderr)
            return 2
        return 0
    if argv and argv[0] == "keep":
        from level_results import keep

        parser = argparse.ArgumentParser(prog="spine_levels.py keep", description="copy a cv run's scored folds "
                                         "(evaluations, model SHA256s) into a folder that is committed")
        parser.add_argument("--out", required=True, type=Path, help="the cv run")
        parser.add_argument("--to", required=True, type=Path, help="e.g. Training/results/NAME")
        parser.add_argument("--weights", action="store_true", help="also keep each fold's final.pt, registered "
                            "in the fold's registry.json with a fold card (committable; never bundled)")
        args = parser.parse_args(argv[1:])
        keep(args.out, args.to, weights=args.weights)
        return 0
    if argv and argv[0] == "cv-report":
        from level_eval import cv_report

        report = argparse.ArgumentParser(prog="spine_levels.py cv-report",
                                         description="table and totals of a cv run's held-out evaluations")
        report.add_argument("--out", default="Training/runs/spine-levels-cv")
        report.add_argument("--partial", action="store_true", help="report the folds scored so far")
        options = report.parse_args(argv[1:])
        summary = cv_report(Path(options.out), options.partial)
        print(summary.pop("table"))
        print(json.dumps(summary, indent=2))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="Training/runs/spine-levels")
    parser.add_argument("--data", help="shared data root (default: SPINEKNEESEG_DATA or ../shared/data)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--manifest", type=Path, help="training manifest: corrected label maps (labels column)")
    parser.add_argument("--max-minutes", type=float)
    for name, value in asdict(Config()).items():
        if not isinstance(value, dict):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    root = Path(args.data) if args.data else data_root()
    if root is None or not (root / "spine").exists():
        print("no spine data: set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config()) if k != "network"})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train(cfg, Path(args.out), root, args.resume, max_minutes=args.max_minutes, manifest=args.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
