"""The lumbar level outline refiner (issue 21's Dice target, session 28): its inputs made by the
product's own steps, a refiner per fold trained on the other folds' scans and scored on the
fold's, and the shipped refiner trained on every scan.

Session 28 found where the level model's Dice goes (``level_dice_errors.py``): 92 % of the wrong
voxels on correctly named scans lie in slices where both prediction and truth have the level,
about 85 % of them within 2 pixels of the true outline. The refiner
(``SpineKneeSegLib/tasks/spine/level_refinement.py``) redraws that outline at the scan's own
pixels; the levels' names are never changed.

    python Training/level_refine.py inputs --run Training/runs/levels-ctx-D32 \\
        --summary Training/results/levels-ctx-D32/cv_summary.json --out .devdata/levels-refiner-inputs.npz
    python Training/level_refine.py cv --inputs .devdata/levels-refiner-inputs.npz --out Training/runs/level-refiner
    python Training/level_refine.py choose --inputs .devdata/levels-refiner-inputs.npz --out Training/runs/level-refiner
    python Training/level_refine.py final --inputs .devdata/levels-refiner-inputs.npz --out Training/runs/level-refiner

``inputs``: every scan's out-of-fold prediction (its own fold model, run and decoded by the
product's steps with that fold's decoder settings) and the refiner's inputs made from it by the
Lib. ``cv``: per fold, a refiner trained on the other folds' scans, scored on the fold's scans
(whole-scan per-level Dice before and after, through the product's clean-up). ``choose``: the
step's threshold and band per fold, chosen on the scans that fold's refiner was trained on. ``final``: one
refiner on all scans (the shipped one), with the cross-validation's figures in its metadata.
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
from SpineKneeSegLib.core.atomic import write_text_atomic
from SpineKneeSegLib.core.memory import keep_freed_memory
from SpineKneeSegLib.engine.models import LevelRefiner
from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
from SpineKneeSegLib.tasks.spine.level_refinement import (BAND_PX, band, refined_labels, refiner_body,
                                                           refiner_probability, slice_channels)

LEVELS = 5
NETWORK = {"in_channels": 2, "width": 16}  # the seed's refiner (session 28)
SEED_LEVELS_RUN = "Training/runs/levels-ctx-D32"  # the level run v0.1.0's inputs came from


def recipe_of(args) -> dict:
    """The training recipe ``cv`` keeps with each fold and ``final`` must repeat; the seed's network
    keeps the seed's stored form (no width or neighbours)."""
    recipe = {"steps": args.steps, "band_px": args.band, "seed": args.seed, "batch_size": args.batch_size,
              "crop": args.size}
    if (args.width, args.neighbours) != (NETWORK["width"], 0):
        recipe.update(width=args.width, neighbours=args.neighbours)
    return recipe


def network_config(recipe: dict) -> dict:
    """The refiner's network settings for a recipe (width, image slices either side); a recipe
    without them is the seed's."""
    return {"in_channels": 2 + 2 * recipe.get("neighbours", 0), "width": recipe.get("width", NETWORK["width"])}


# ---- inputs: the product's steps on each scan's out-of-fold prediction ---------------------------

def cmd_inputs(args) -> int:
    from level_eval import CARD, held_out_scans, score
    from SpineKneeSegLib.engine.inference import segment_slices
    from SpineKneeSegLib.engine.pipeline import RunResult
    from SpineKneeSegLib.engine.steps import STEPS, StepContext
    from SpineKneeSegLib.tasks.spine.level_refinement import refiner_inputs

    torch.set_num_threads(args.threads)
    store = {}
    summary = json.loads(args.summary.read_text(encoding="utf-8"))
    for f, cid, image, truth, weights, net, params in held_out_scans(args.run, summary):
        settings = {"level_decoding": {"threshold": params.threshold, "run_weights": params.run_weights}}
        with torch.inference_mode():
            out = segment_slices(CARD, image, net, torch.device("cpu"), weights.preprocessing, batch_size=8,
                                 keep_probabilities="network")
        ctx = StepContext(CARD, image, RunResult(image.with_array(out.labels)), out.labels,
                          {"probabilities": out.probabilities}, {"probabilities": out.probabilities_grid},
                          settings)
        for name in CARD.postprocessors[:CARD.postprocessors.index("level_refinement")]:
            STEPS[name].run(ctx)
        labels = ctx.result.labels.array
        x, box, axis, first = refiner_inputs(image, labels, out.probabilities, out.probabilities_grid)
        key = cid.replace("/", "__")
        store[f"{key}__x"] = x.astype(np.float16)
        store[f"{key}__labels"] = np.moveaxis(labels, axis, 0)  # decoded, before the clean-up
        store[f"{key}__truth"] = np.moveaxis(truth.astype(np.uint8), axis, 0)
        store[f"{key}__box"] = np.array([[s.start, s.stop] for s in (box[axis],) +
                                         tuple(box[a] for a in range(3) if a != axis)])
        store[f"{key}__fold"] = np.array(f)
        store[f"{key}__right"] = np.array(score(largest_component_per_label(labels), truth, image)
                                          ["identification"]["all_correct"])
        print(cid, "fold", f, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **store)
    return 0


def load_inputs(path: Path) -> dict:
    z = np.load(path)
    cases = {}
    for k in z.files:
        cid, part = k.rsplit("__", 1)
        cases.setdefault(cid.replace("__", "/"), {})[part] = z[k]
    for c in cases.values():
        c["fold"], c["right"] = int(c["fold"]), bool(c["right"])
        c["box"] = tuple(slice(int(a), int(b)) for a, b in c["box"])
        c["x"] = c["x"].astype(np.float32)
        c["target"] = (c["truth"][c["box"]] > 0).astype(np.float32)  # any vertebra (Zukić: T12, T11 too)
    return cases


# ---- scoring -------------------------------------------------------------------------------------

def level_dice(pred: np.ndarray, truth: np.ndarray) -> dict:
    return {f"L{k}": float(2 * ((pred == k) & (truth == k)).sum() / max((pred == k).sum() + (truth == k).sum(), 1))
            for k in range(1, LEVELS + 1)}


def refined_case(c: dict, body: np.ndarray, band_px: int) -> np.ndarray:
    """The case's decoded labels with the outline redrawn by the refiner's ``body`` mask (its box,
    slices first), as the product's step makes them."""
    out = c["labels"].copy()
    out[c["box"]] = refined_labels(c["labels"][c["box"]], body, band_px)
    return out


def mean_dice(per_case: dict, which) -> float:
    """Mean over the cases ``which`` picks of each case's mean per-level Dice."""
    return float(np.mean([np.mean(list(d.values())) for cid, d in per_case.items() if which(cid)]))


# ---- training ------------------------------------------------------------------------------------

def sample(cases: list[dict], n: int, size: int, rng: np.random.Generator,
           neighbours: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``size`` crops of labelled slices near the decoded bodies (with the image slices
    ``neighbours`` either side, as the Lib stacks them); mirrored, image gain."""
    xs, ys = [], []
    for _ in range(n):
        c = cases[rng.integers(len(cases))]
        first = c["labels"][c["box"]]
        s = int(rng.choice(np.flatnonzero(first.any(axis=(1, 2)))))
        yy, xx = np.nonzero(first[s])
        i = rng.integers(len(yy))
        h, w = first.shape[1:]
        y0 = int(np.clip(yy[i] - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, max(h - size, 0)))
        x0 = int(np.clip(xx[i] - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, max(w - size, 0)))
        x = slice_channels(c["x"][:, :, y0:y0 + size, x0:x0 + size], np.array([s]), neighbours)[0]
        y = c["target"][s, y0:y0 + size, x0:x0 + size]
        pad = ((0, size - y.shape[0]), (0, size - y.shape[1]))
        x, y = np.stack([np.pad(ch, pad) for ch in x]), np.pad(y, pad)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        x = x.copy()
        x[:-1] *= rng.uniform(0.8, 1.2)  # every image slice alike
        xs.append(x)
        ys.append(y.copy())
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))[:, None]


def train(cases: list[dict], steps: int, batch: int, size: int, seed: int, band_px: int, log=print,
          network: dict = NETWORK) -> LevelRefiner:
    """AdamW, one-cycle schedule; the loss weighted to the band the refiner may redraw (1.1) over
    the rest of the crop (0.1)."""
    keep_freed_memory()  # as trainloop.run_loop: steps reuse freed memory
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = LevelRefiner(**network)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for step in range(steps):
        x, y = sample(cases, batch, size, rng, net.neighbours)
        w = torch.from_numpy(band((x[:, -1].numpy() >= 0.5).astype(np.uint8), band_px))[:, None].float() + 0.1
        loss = (F.binary_cross_entropy_with_logits(net(x), y, reduction="none") * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step} loss {loss.item():.4f}")
    return net.eval()


def cmd_cv(args) -> int:
    torch.set_num_threads(args.threads)
    cases = load_inputs(args.inputs)
    rows = {}
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = recipe_of(args)
    for f in sorted({c["fold"] for c in cases.values()}):
        done = args.out / f"refine_fold{f}.json"  # a fold scored by an earlier run of this recipe is kept
        if done.exists() and json.loads(done.read_text(encoding="utf-8"))["recipe"] == recipe:
            rows.update({c: {k: v for k, v in r.items() if k not in ("right", "right_after")}  # named below
                         for c, r in json.loads(done.read_text(encoding="utf-8"))["cases"].items()})
            print(f"fold {f}: kept from {done}", flush=True)
            continue
        train_cases = [c for c in cases.values() if c["fold"] != f]
        print(f"fold {f}: refiner trained on {len(train_cases)} scans", flush=True)
        net = train(train_cases, args.steps, args.batch_size, args.size, args.seed, args.band,
                    log=lambda m: print(m, flush=True), network=network_config(recipe))
        torch.save(net.state_dict(), args.out / f"refine_fold{f}.pt")  # for later looks at this fold's refiner
        for cid, c in cases.items():
            if c["fold"] != f:
                continue
            t = time.perf_counter()
            new = largest_component_per_label(refined_case(c, refiner_body(net, c["x"]), args.band))
            secs = time.perf_counter() - t
            old = largest_component_per_label(c["labels"])
            before, after = level_dice(old, c["truth"]), level_dice(new, c["truth"])
            rows[cid] = {"fold": f, "before": before, "after": after, "refine_s": round(secs, 3)}
            mb, ma = np.mean(list(before.values())), np.mean(list(after.values()))
            print(f"{cid:22s} fold {f} {'ok ' if c['right'] else 'BAD'} Dice {mb:.4f} -> {ma:.4f}", flush=True)
        write_text_atomic(done, json.dumps({"recipe": recipe, "cases": {c: r for c, r in rows.items() if r["fold"] == f}}))
    for cid, r in rows.items():  # named right as level_eval scored the level model's labels (the refiner keeps names)
        r["right"] = cases[cid]["right"]
    summary = summarise(rows)
    summary.update(recipe)
    print(json.dumps(summary))
    write_text_atomic(args.out / "refine_cv.json", json.dumps({"summary": summary, "cases": rows}, indent=1))
    return 0


def summarise(rows: dict) -> dict:
    def mean(rs, key):
        return round(float(np.mean([np.mean(list(r[key].values())) for r in rs])), 4)

    right = [r for r in rows.values() if r["right"]]
    return {"scans": len(rows), "named_right": len(right),
            "dice_before": mean(rows.values(), "before"), "dice_after": mean(rows.values(), "after"),
            "dice_before_named_right": mean(right, "before"), "dice_after_named_right": mean(right, "after"),
            "per_level_after": {f"L{k}": round(float(np.mean([r["after"][f"L{k}"] for r in rows.values()])), 4)
                                for k in range(1, LEVELS + 1)},
            "better_on": int(sum(np.mean(list(r["after"].values())) > np.mean(list(r["before"].values()))
                                 for r in rows.values()))}


# ---- choose: the refiner's threshold and band per fold, on that fold's refiner's training scans --

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
BANDS = (1, 2, 3)


def cmd_choose(args) -> int:
    """Nested choice of the step's threshold and band: for each fold, the grid is scored on the
    scans its refiner was trained on (the other folds'), the best setting is applied to the fold's
    scans. The held-out grid is stored for reading only; nothing is chosen on it."""
    torch.set_num_threads(args.threads)
    cases = load_inputs(args.inputs)
    folds = sorted({c["fold"] for c in cases.values()})
    missing = [str(args.out / f"refine_fold{f}.{ext}") for f in folds for ext in ("pt", "json")
               if not (args.out / f"refine_fold{f}.{ext}").exists()]
    if missing:
        print(f"no fold refiner {', '.join(missing)}: run `cv` into {args.out} first", file=sys.stderr)
        return 2
    grid = [(t, b) for t in THRESHOLDS for b in BANDS]
    rows, chosen, held_grid = {}, {}, {}
    for f in folds:
        recipe = json.loads((args.out / f"refine_fold{f}.json").read_text(encoding="utf-8"))["recipe"]
        net = LevelRefiner(**network_config(recipe))
        net.load_state_dict(torch.load(args.out / f"refine_fold{f}.pt", weights_only=True))
        net.eval()
        scores = {}  # (threshold, band) -> {case: mean per-level Dice}
        for cid, c in cases.items():
            prob = refiner_probability(net, c["x"])
            for t, b in grid:
                scores.setdefault((t, b), {})[cid] = level_dice(
                    largest_component_per_label(refined_case(c, prob >= t, b)), c["truth"])
        train_mean = {k: mean_dice(v, lambda cid: cases[cid]["fold"] != f) for k, v in scores.items()}
        best = max(grid, key=lambda k: (round(train_mean[k], 5), k == (0.5, BAND_PX)))  # ties: the seed's setting
        chosen[f] = {"threshold": best[0], "band_px": best[1], "train_mean_dice": round(train_mean[best], 4),
                     "train_mean_dice_at_0.5_band_2": round(train_mean[(0.5, BAND_PX)], 4)}
        held_grid[f] = {f"{t}/{b}": round(mean_dice(v, lambda cid: cases[cid]["fold"] == f), 4)
                        for (t, b), v in scores.items()}
        for cid, c in cases.items():
            if c["fold"] == f:
                old = largest_component_per_label(c["labels"])
                rows[cid] = {"fold": f, "right": c["right"], "before": level_dice(old, c["truth"]),
                             "after": scores[best][cid], "after_seed_setting": scores[(0.5, BAND_PX)][cid]}
        print(f"fold {f}: chose threshold {best[0]}, band {best[1]} (training scans {train_mean[best]:.4f}; "
              f"0.5/2: {train_mean[(0.5, BAND_PX)]:.4f})", flush=True)
    summary = summarise(rows)
    seed = {c: {**r, "after": r["after_seed_setting"]} for c, r in rows.items()}
    summary["dice_after_seed_setting"] = summarise(seed)["dice_after"]
    print(json.dumps({"chosen": chosen, "summary": summary}))
    write_text_atomic(args.out / "refine_choose.json", json.dumps(
        {"summary": summary, "chosen": chosen, "held_out_grid_not_used_for_choosing": held_grid, "cases": rows},
        indent=1))
    return 0


def cmd_final(args) -> int:
    from SpineKneeSegLib.engine.weights import save_checkpoint

    torch.set_num_threads(args.threads)
    cases = load_inputs(args.inputs)
    cv = json.loads((args.out / "refine_cv.json").read_text(encoding="utf-8"))["summary"]
    want = {k: v for k, v in recipe_of(args).items() if k != "seed"}  # the final model may use another seed
    if {k: cv.get(k) for k in want} != want or network_config(cv) != network_config(want):
        print(f"the cross-validation in {args.out} used another recipe: {cv}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    network = network_config({"width": args.width, "neighbours": args.neighbours})
    net = train(list(cases.values()), args.steps, args.batch_size, args.size, args.seed, args.band,
                log=lambda m: print(m, flush=True), network=network)
    metadata = {"trained": True, "recipe": {"steps": args.steps, "batch_size": args.batch_size, "crop": args.size,
                                            "seed": args.seed, "threads": args.threads, "band_px": args.band,
                                            "width": args.width, "neighbours": args.neighbours},
                "train_seconds": round(time.perf_counter() - t0, 1), "trained_on": sorted(cases),
                "inputs_from": str(args.inputs), "inputs_run": str(args.levels_run), "cross_validation": cv,
                "postprocessing": {"level_refinement": {"band_px": args.step_band or args.band,
                                                        "threshold": args.threshold}}}
    sha = save_checkpoint(args.out / "final.pt", "lumbar-foramina", "level_refiner", network, net.state_dict(),
                          metadata=metadata, model="refiner")
    print(f"{args.out / 'final.pt'} SHA256 {sha} ({metadata['train_seconds']} s)")
    return 0


def model_card(version: str, checkpoint: dict, cv: dict, timing: str, levels_version: str,
               choice: dict | None = None, out: str = "Training/runs/level-refiner", notes: str = "") -> str:
    """``cv``: refine_cv.json (the step at 0.5 / the training band); ``choice``: refine_choose.json
    when the step's threshold and band were chosen per fold (nested), whose figures are then shown."""
    from level_ship import DATA
    from modelcard import render, table
    from SpineKneeSegLib.engine.models import build_network, count_parameters

    meta, recipe = checkpoint["metadata"], checkpoint["metadata"]["recipe"]
    step = meta["postprocessing"]["level_refinement"]
    shown = choice or cv
    s = shown["summary"]
    net = build_network("level_refiner", checkpoint["network"]["config"])
    neighbours = recipe.get("neighbours", 0)
    sees = "each sagittal slice's image" + ("" if not neighbours else " and the image slice either side"
                                             if neighbours == 1 else f" and {neighbours} image slices either side")
    network_flags = (f" --width {recipe['width']} --neighbours {neighbours}"
                     if (recipe.get("width", NETWORK["width"]), neighbours) != (NETWORK["width"], 0) else "")
    levels_run = meta.get("inputs_run", SEED_LEVELS_RUN)
    inputs = meta.get("inputs_from", ".devdata/levels-refiner-inputs.npz")
    final_flags = ((f" --threshold {step['threshold']} --step-band {step['band_px']}"
                    if (step["threshold"], step["band_px"]) != (0.5, recipe.get("band_px", BAND_PX)) else "")
                   + (f" --levels-run {levels_run}" if levels_run != SEED_LEVELS_RUN else ""))
    choose_command = f"\npython Training/level_refine.py choose --inputs {inputs} --out {out}" if choice else ""
    if choice:
        chosen = sorted({(c["threshold"], c["band_px"]) for c in choice["chosen"].values()})
        how = (f"The step's threshold and band were chosen per fold on the scans that fold's refiner was trained on "
               f"(`choose`: threshold 0.3-0.7, band 1-3 px); chosen: {', '.join(f'{t} / {b} px' for t, b in chosen)}. "
               f"At the seed's fixed 0.5 / {recipe.get('band_px', BAND_PX)} px the same refiners give "
               f"{s['dice_after_seed_setting']:.4f}. This model's step: threshold {step['threshold']}, band "
               f"{step['band_px']} px.")
    else:
        how = f"The step at threshold 0.5 and band {step['band_px']} px, fixed before the run."
    rows = []
    for cid, r in sorted(shown["cases"].items()):
        b, a = np.mean(list(r["before"].values())), np.mean(list(r["after"].values()))
        rows.append((cid, r["fold"], "yes" if r["right"] else "NO", f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}",
                     " / ".join(f"{v:.3f}" for v in r["after"].values())))
    worse = sorted(((np.mean(list(r["after"].values())) - np.mean(list(r["before"].values())), cid)
                    for cid, r in shown["cases"].items()))[:3]
    meets = s["dice_after"] >= 0.88
    sections = [
        ("What it does", f"""Task `lumbar-foramina`, optional auxiliary model `refiner` (registry entry
`lumbar-level-refiner`): after the anatomical decoding has named the vertebral bodies L1..L5, it
redraws their outline at the scan's own pixels. A small 2D network (`level_refiner`,
{json.dumps(checkpoint['network']['config'])}; {count_parameters(net):,} parameters; full and half
resolution, dilated convolutions, receptive field 36 px) sees {sees}
(1st..99th percentile of the bodies' box to 0..1) and the level network's summed level probability
(read from the level network's 1.4 mm grid onto the scan's pixels), and adds a correction to that
probability's logit. Only an in-plane band of {step['band_px']} px either side of the decoded outline
may change; a band voxel it calls body takes the level of the nearest decoded voxel in its slice,
so it can never rename, shift, duplicate or drop a level (level identification and
`summaries.level_confidence` are the level model's). `summaries.level_refinement` reports the
voxels it changed and its time. Without it (not installed) the decoded outline stays; `--fast` keeps
it (see Speed)."""),
        ("Why", """Session 28 (`Training/level_dice_errors.py` on the level model's cross-validation): 92 % of the
wrong voxels of correctly named scans lie in slices where both prediction and truth have the
level, about 85 % within 2 px of the true outline (the level network's 1.4 mm grid and its
nearest-sampled targets; session 19 measured those targets alone at 0.952 Dice)."""),
        ("Data", DATA),
        ("Inputs and split", f"""Its training inputs are the level model's **out-of-fold** predictions: each of the 54 scans run by
the fold model of the `lumbar-levels` recipe that never saw it (cv run `{levels_run}`; the same five
case-wise folds, identical images in one fold; the shipped level model is v{levels_version}), decoded by the product's own steps at that fold's decoder settings, and cut into the
refiner's inputs by the Lib's own `refiner_inputs` (`Training/level_refine.py inputs`). So it learns
on predictions like those the shipped level model makes on a new scan. The target is any labelled
vertebra (Zukić's T12 and T11 included)."""),
        ("Training", f"""Random {meta['recipe']['crop']} x {meta['recipe']['crop']} px crops of labelled slices near the decoded bodies, mirrored,
image gain 0.8-1.2; binary cross-entropy weighted 1.1 in a {recipe.get('band_px', BAND_PX)} px band and 0.1 elsewhere; AdamW 2e-3,
one-cycle schedule, batch {meta['recipe']['batch_size']}, {meta['recipe']['steps']} steps, seed {meta['recipe']['seed']}, {meta['recipe']['threads']} CPU thread(s); the last weights are
the model (nothing selected on validation). This model: {meta['train_seconds'] / 60:.1f} min on the CPU, on all
54 scans' out-of-fold inputs. Commands:
```
python Training/level_refine.py inputs --run {levels_run} --summary {levels_run}/cv_summary.json --out {inputs}
python Training/level_refine.py cv --inputs {inputs} --out {out} --steps {recipe['steps']}{network_flags}{choose_command}
python Training/level_refine.py final --inputs {inputs} --out {out} --steps {recipe['steps']}{network_flags}{final_flags}
python Training/level_refine.py ship --out {out} --version {version}
```"""),
        ("Cross-validated results (54 scans, 5 folds)", f"""For each fold a refiner trained on the other folds' scans only, scored on the fold's scans
(whole field of view; Dice after the product's largest-component clean-up, per level, averaged).
{how}

| | before (decoded outline) | after (refined) |
|---|---|---|
| mean per-level Dice, all {s['scans']} scans | {s['dice_before']:.4f} | {s['dice_after']:.4f} |
| on the {s['named_right']} scans named right | {s['dice_before_named_right']:.4f} | {s['dice_after_named_right']:.4f} |
| scans named right | {s['named_right']} | {s['named_right']} (the refiner never renames) |

Per level after: {' / '.join(f'{v:.3f}' for v in s['per_level_after'].values())}. Better on {s['better_on']} of {s['scans']} scans;
the three smallest changes: {', '.join(f'{c} ({d:+.3f})' for d, c in worse)}.
Issue 21's Dice aim (mean per-level Dice >= 0.88 over the cross-validation) is
**{'met' if meets else 'not met'}** with the refiner ({s['dice_after']:.4f}). The one scan the level model names wrong
(myosegmentum/case08, flagged doubtful) stays wrong: the refiner does not touch names.

{table(('case', 'fold', 'named right', 'Dice before', 'after', 'change', 'L1 / L2 / L3 / L4 / L5 after'), rows)}"""),
        *([("How this recipe was chosen", notes)] if notes else []),
        ("Speed", timing),
        ("Known limits", f"""- A starter trained on 54 scans of two sources (T1 water-fat, T2 TSE; 1 x 1 mm in-plane, 4 mm
  slices): on other contrasts or pixel sizes its outline may be worse than the decoded one; compare
  with a run without it (`--aux-weights refiner=none`).
- Trained on fold models' predictions (`{levels_run}`) and applied to the shipped level model
  (v{levels_version}, the recipe trained on all scans; its seed may differ from the fold models'):
  the same kind of prediction on a new scan, but the pairing itself was not scored.
- It redraws the in-plane outline only: the lateral end slices of a body (8 % of the wrong voxels)
  are the level model's.
- ivd-t2 (another centre) has disc labels only, so no Dice there; names are unchanged by design."""),
        ("Licence", "Weights: the repository's licence. Training data: see Data (GPL-3.0 redistribution, CC BY 4.0 articles)."),
    ]
    return render(f"lumbar-level-refiner v{version}", sections,
                  intro="**Status: starter model**, trained on the CPU on 54 labelled scans of two public datasets. "
                        "Every figure is cross-validated (case-wise 5-fold). Not a medical device.")


def cmd_ship(args) -> int:
    from modelcard import publish
    from SpineKneeSegLib.engine.weights import find_entry, load_checkpoint

    checkpoint = load_checkpoint(args.out / "final.pt")
    cv = json.loads((args.out / "refine_cv.json").read_text(encoding="utf-8"))
    choose = args.out / "refine_choose.json"  # the nested choice of the step's settings, when made
    choice = json.loads(choose.read_text(encoding="utf-8")) if choose.exists() else None
    levels = find_entry("lumbar-levels")
    timing = args.timing or "Not measured."
    text = model_card(args.version, checkpoint, cv, timing, levels.version if levels else "?", choice, str(args.out),
                      args.notes or "")
    s = (choice or cv)["summary"]
    entry = publish("lumbar-level-refiner", args.version, text,
                    f"starter level outline refiner (54 scans): CV mean per-level Dice {s['dice_before']:.4f} -> "
                    f"{s['dice_after']:.4f}", weights=args.out / "final.pt")
    print(f"registered {entry.model} {entry.version} SHA256 {entry.sha256}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inputs", help="every scan's out-of-fold prediction and refiner inputs")
    p.add_argument("--run", type=Path, required=True, help="the level model's cv run (foldN/final.pt, folds.json)")
    p.add_argument("--summary", type=Path, required=True, help="its cv_summary.json (decoder settings per fold)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_inputs)
    for name, fn, text in (("cv", cmd_cv, "a refiner per fold, scored on the fold's scans"),
                           ("final", cmd_final, "the refiner on every scan (shipped)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--inputs", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--steps", type=int, default=800)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--size", type=int, default=96, help="training crop, pixels")
        p.add_argument("--band", type=int, default=BAND_PX, help="pixels either side of the outline it may redraw")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--width", type=int, default=NETWORK["width"], help="channels at full scale (the seed's: 16)")
        p.add_argument("--neighbours", type=int, default=0,
                       help="image slices either side it also sees (the seed's: 0, one slice)")
        p.add_argument("--threads", type=int, default=2)
        if name == "final":
            p.add_argument("--threshold", type=float, default=0.5, help="the step's body threshold (the seed's: 0.5)")
            p.add_argument("--step-band", type=int, help="the step's band, pixels (default: --band)")
            p.add_argument("--levels-run", type=Path, default=Path(SEED_LEVELS_RUN),
                           help="the level model's cv run the inputs were made from (named in the card)")
        p.set_defaults(func=fn)
    p = sub.add_parser("choose", help="threshold and band per fold, chosen on its refiner's training scans")
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the cv run's folder (refine_foldN.pt)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_choose)
    p = sub.add_parser("ship", help="card, registry entry and SHA256 for the final refiner")
    p.add_argument("--out", type=Path, required=True, help="the folder with final.pt and refine_cv.json")
    p.add_argument("--version", required=True)
    p.add_argument("--timing", help="the card's speed paragraph (bench_overhead's figures)")
    p.add_argument("--notes", help="the card's paragraph on how the recipe was chosen (what else was tried on these scans)")
    p.set_defaults(func=cmd_ship)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
