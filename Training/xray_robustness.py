"""How the X-ray path copes with what real radiographs carry and JSRT does not (issue 24 part 2):
collimation shutters, burned-in text, 8/12/16-bit storage. The shipped xray-chest model on the
held-out JSRT radiographs, each drawn clean and with one of those added; Dice against the truth
inside the exposed field (both the clean and the changed radiograph scored on the same pixels, so
the difference is what the change did, not what it hid).

    python Training/xray_robustness.py [--cases 20] [--normalisation percentile|percentile-field] [--run RUN]

Prints a table of mean Dice per structure and the worst case per variant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from SpineKneeSegLib.engine.inference import load_network
from SpineKneeSegLib.engine.postprocessing import dice
from SpineKneeSegLib.engine.weights import resolve_weights
from SpineKneeSegLib.tasks import TASKS
from xray_chest import STRUCTURES, Config, config_from, load_split, load_trained, predict_structures, run_preprocessing

CARD = TASKS["xray-chest"]


def shutters(a: np.ndarray, fraction: tuple[float, float, float, float], value: float) -> tuple[np.ndarray, np.ndarray]:
    """Collimator shutters: bands of (top, bottom, left, right) fractions at one grey value.
    Returns (image, exposed-field mask)."""
    h, w = a.shape
    out, field = a.copy(), np.ones(a.shape, bool)
    t, b, left, r = (int(round(f * n)) for f, n in zip(fraction, (h, h, w, w)))
    for rows, cols in ((slice(0, t), slice(None)), (slice(h - b, h), slice(None)),
                       (slice(None), slice(0, left)), (slice(None), slice(w - r, w))):
        out[rows, cols], field[rows, cols] = value, False
    return out, field


def burned_text(a: np.ndarray, value: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of glyph-like strokes (patient name, date, side marker) near the corners, at one
    extreme grey value, as scanners burn them in."""
    h, w = a.shape
    out, field = a.copy(), np.ones(a.shape, bool)
    for top, left in ((0.03, 0.03), (0.03, 0.62), (0.90, 0.03), (0.90, 0.70), (0.45, 0.02)):
        r0, c0 = int(top * h), int(left * w)
        glyphs = rng.random((3, 40)) < 0.45  # 3 rows x 40 columns of 4-px strokes
        block = np.kron(glyphs, np.ones((4, 4), bool))
        rows, cols = slice(r0, r0 + block.shape[0]), slice(c0, c0 + block.shape[1])
        out[rows, cols][block[: out[rows, cols].shape[0], : out[rows, cols].shape[1]]] = value
        field[rows, cols] = False
    return out, field


def bit_depth(a: np.ndarray, bits: int) -> np.ndarray:
    """The same radiograph stored with ``bits`` bits (rescaled to the full range, then rounded)."""
    lo, hi = float(a.min()), float(a.max())
    return np.round((a - lo) / (hi - lo) * (2 ** bits - 1)).astype(np.float32)


def variants(a: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    full = np.ones(a.shape, bool)
    top = float(a.max())
    v = {"clean": (a, full), "8-bit": (bit_depth(a, 8), full), "12-bit": (bit_depth(a, 12), full)}
    v["shutters 10% bright"] = shutters(a, (0.10, 0.10, 0.10, 0.10), top)
    v["shutters 20% bright"] = shutters(a, (0.20, 0.05, 0.20, 0.20), top)
    v["shutters 10% dark"] = shutters(a, (0.10, 0.10, 0.10, 0.10), float(a.min()))
    v["burned-in text"] = burned_text(a, top * 1.5, rng)
    shut, field = shutters(a, (0.12, 0.08, 0.15, 0.15), top)
    text, text_field = burned_text(shut, top * 1.5, rng)
    v["shutters + text + 8-bit"] = (bit_depth(text, 8), field & text_field)
    return v


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="held-out radiographs (first N of the 50)")
    parser.add_argument("--normalisation", default=None, help="override the card's (e.g. percentile-field)")
    parser.add_argument("--run", type=Path, help="a training run (xray_chest.py train --out) instead of the shipped model")
    parser.add_argument("--json", help="write the per-case rows here")
    args = parser.parse_args(argv)
    if args.run:
        net, ckpt = load_trained(args.run)
        pre = run_preprocessing(config_from(ckpt["config"]))
    else:
        weights = resolve_weights(CARD)
        net = load_network(weights, torch.device("cpu"))
        pre = dict(weights.preprocessing)
    if args.normalisation:
        pre["normalisation"] = args.normalisation
    _, cases, _ = load_split(Config(out="", n_train=0), log=lambda *_: None)
    rng = np.random.default_rng(0)
    rows = []
    for c in cases[: args.cases]:
        a = c.image.array[0]
        for name, (changed, field) in variants(a, rng).items():
            image = c.image.with_array(changed[None].astype(np.float32))
            predicted = predict_structures(net, image, pre)
            row = {"case": c.id, "variant": name}
            for n, s in enumerate(STRUCTURES):
                d = dice((predicted[0 if n < 3 else 1] == n + 1) & field, c.truth[n] & field)
                row[s] = float("nan") if d is None else round(d, 4)
            rows.append(row)
        print(c.id, " ".join(f"{r['variant']}: {np.nanmean([r[s] for s in STRUCTURES]):.3f}"
                             for r in rows if r["case"] == c.id), flush=True)
    names = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"\nnormalisation: {pre.get('normalisation', CARD.preprocessing.normalisation)}; {len(cases[: args.cases])} held-out JSRT radiographs; "
          "Dice inside the exposed field")
    print("| variant | " + " | ".join(STRUCTURES) + " | mean | worst case (mean) |")
    print("|---" * (len(STRUCTURES) + 3) + "|")
    for name in names:
        sel = [r for r in rows if r["variant"] == name]
        means = [np.nanmean([r[s] for r in sel]) for s in STRUCTURES]
        per_case = [np.nanmean([r[s] for s in STRUCTURES]) for r in sel]
        worst = int(np.argmin(per_case))
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) +
              f" | {np.mean(means):.3f} | {sel[worst]['case']} ({per_case[worst]:.3f}) |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
