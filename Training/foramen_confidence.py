"""Calibrate the foramen markers' confidence (issue 26, part 2) on phantoms with known foramina.

    python Training/foramen_confidence.py collect --out Training/runs/foramen-confidence --seeds 40
    python Training/foramen_confidence.py fit --out Training/runs/foramen-confidence

``collect`` draws lumbar phantoms (tilt, side, spacing, noise and a sixth lumbar vertebra varied by
seed) and gathers, per marker, the evidence ``tasks/spine/foramen_confidence.py`` reads and the
marker's distance to the true foramen of its name, from four sources:
  model      the shipped lumbar-levels model run through the Lib's pipeline (run_case), as a user runs it
  truth      the estimate from the true body labels (decoded like the model's, one-hot probabilities)
  perturbed  the same after the bodies were grown or shrunk by 1-2 voxels (a segmentation's border error)
  displaced  the truth estimate with one marker moved 6-20 mm (a marker put on the wrong spot)
``fit`` fits the logistic weights on even seeds and reports, on the odd seeds it never saw, the
reliability table (predicted vs observed share within tolerance), the Brier score and the ranking
(AUC), beside the old constant confidence (0.50; 0.35 for L5/S1). Paste the printed weights into
``ConfidenceModel.weights`` when they beat the shipped ones on the held-out seeds.
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage
from SpineKneeSegLib.tasks.spine.foramen_confidence import (
    FEATURES,
    ConfidenceModel,
    body_probabilities,
    design_row,
    foramen_evidence,
)
from SpineKneeSegLib.tasks.spine.foramina import Foramen, estimate_foramina_from_levels
from SpineKneeSegLib.tasks.spine.level_decoding import decode_levels
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom
from SpineKneeSegLib.core.atomic import write_text_atomic

COLUMNS = ("seed", "source", "label", *FEATURES, "error_mm")


def draw_phantom(seed: int):
    rng = np.random.default_rng(1000 + seed)
    pixel = float(rng.uniform(0.8, 1.4))
    return spine_phantom(seed=seed, lumbar_count=6 if seed % 5 == 4 else 5, tilt_deg=float(rng.uniform(-12, 12)),
                         k_toward=("left", "right")[seed % 2], spacing=(pixel, pixel, float(rng.uniform(3.0, 5.0))),
                         shape=(16, int(256 / pixel), int(256 / pixel)), noise=float(rng.uniform(0.02, 0.08)))


def _rows(seed, source, foramina, evidence, truth):
    for f, e in zip(foramina, evidence):
        error = float(np.linalg.norm(np.asarray(f.ras) - truth[f.label])) if f.label in truth else 999.0
        yield {"seed": seed, "source": source, "label": f.label, **e, "error_mm": round(error, 2)}


def _decoded_estimate(labels: np.ndarray, image):
    """Estimate from body labels, decoded as the pipeline decodes the model's (one-hot probabilities)."""
    probs = np.stack([(labels == k).astype(np.uint8) * 255 for k in range(1, 6)])
    decoded = decode_levels(probs, image)
    summary = decoded.summary()
    foramina, _ = estimate_foramina_from_levels(decoded.labels, image)
    return foramina, summary


def _grow_or_shrink(labels: np.ndarray, voxels: int) -> np.ndarray:
    out = np.zeros_like(labels)
    for k in range(1, 6):
        mask = labels == k
        mask = ndimage.binary_dilation(mask, iterations=voxels) if voxels > 0 else \
            ndimage.binary_erosion(mask, iterations=-voxels)
        out[mask & (out == 0)] = k
    return out


def _model_run(phantom, folder: Path):
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.tasks import get_task

    write_image(phantom.image, folder / "scan.nii.gz")
    report = run_case(get_task("lumbar-foramina"), [str(folder / "scan.nii.gz")], folder / "out",
                      RunOptions(device="cpu"))
    doc = json.loads((folder / "out" / "foramina.mrk.json").read_text(encoding="utf-8"))
    foramina = []
    for cp in doc["markups"][0]["controlPoints"]:
        level, side = cp["label"].split()
        ras = np.asarray(cp["position"], float) * np.array([-1.0, -1.0, 1.0])  # the file is LPS
        foramina.append(Foramen(int(level[1:]), side, tuple(ras), 0.0, 0, (-1, -1), source="estimated from vertebral levels"))
    return foramina, report["summaries"].get("level_decoding", {})


def collect(out: Path, seeds: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in range(seeds):
        phantom = draw_phantom(seed)
        truth = {f["label"]: np.asarray(f["centre_ras"], float) for f in phantom.extra["foramina"]}
        rng = np.random.default_rng(seed)
        with tempfile.TemporaryDirectory() as tmp:
            foramina, decoding = _model_run(phantom, Path(tmp))
        rows += _rows(seed, "model", foramina, foramen_evidence(
            foramina, decoding.get("level_confidence"), body_probabilities(decoding)), truth)
        foramina, decoding = _decoded_estimate(phantom.labels.array, phantom.image)
        evidence = foramen_evidence(foramina, decoding["level_confidence"], body_probabilities(decoding))
        rows += _rows(seed, "truth", foramina, evidence, truth)
        grown, decoding_g = _decoded_estimate(_grow_or_shrink(phantom.labels.array, int(rng.choice([-2, -1, 1, 2]))),
                                              phantom.image)
        rows += _rows(seed, "perturbed", grown, foramen_evidence(
            grown, decoding_g["level_confidence"], body_probabilities(decoding_g)), truth)
        if foramina:
            moved = list(foramina)
            i = int(rng.integers(len(moved)))
            direction = rng.normal(size=3)
            direction[0] *= 0.3  # mostly along the column and front to back, where a reader would misplace it
            shift = direction / np.linalg.norm(direction) * rng.uniform(6, 20)
            f = moved[i]
            moved[i] = Foramen(f.level, f.side, tuple(np.asarray(f.ras) + shift), 0.0, 0, (-1, -1), source=f.source)
            rows += _rows(seed, "displaced", moved, foramen_evidence(
                moved, decoding["level_confidence"], body_probabilities(decoding)), truth)
        print(f"seed {seed}: {len(rows)} markers so far", flush=True)
    path = out / "markers.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """Newton-Raphson for logistic regression with a small ridge (no intercept penalty)."""
    w = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        gradient = x.T @ (p - y) + penalty * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        w -= np.linalg.solve(hessian, gradient)
    return w


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def _report(name: str, p: np.ndarray, y: np.ndarray) -> list[str]:
    lines = [f"**{name}**: Brier {np.mean((p - y) ** 2):.3f}, AUC {_auc(p, y):.3f}, n {len(y)}", "",
             "| predicted | markers | mean predicted | observed within tolerance |", "|---|---|---|---|"]
    for lo, hi in ((0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.01)):
        m = (p >= lo) & (p < hi)
        if m.any():
            lines.append(f"| {lo:.1f}-{min(hi, 1):.1f} | {m.sum()} | {p[m].mean():.2f} | {y[m].mean():.2f} |")
    return lines + [""]


def fit(out: Path) -> None:
    with open(out / "markers.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    model = ConfidenceModel()
    x = np.array([design_row({k: float(r[k]) for k in FEATURES}) for r in rows])
    y = np.array([float(r["error_mm"]) < model.tolerance_mm for r in rows], float)
    seeds = np.array([int(r["seed"]) for r in rows])
    train, test = seeds % 2 == 0, seeds % 2 == 1
    w = _fit_logistic(x[train], y[train])
    fitted = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
    shipped = np.array([model.probability({k: float(r[k]) for k in FEATURES}) for r in rows])
    constant = np.array([0.35 if float(r["extrapolated"]) else 0.5 for r in rows])
    lines = [f"Markers: {len(rows)} ({int(train.sum())} fitting, even seeds; {int(test.sum())} held out, odd seeds); "
             f"within {model.tolerance_mm:g} mm: {y.mean():.2f}", ""]
    sources = sorted({r["source"] for r in rows})
    lines += ["| source | markers | within tolerance | median error mm |", "|---|---|---|---|"]
    for s in sources:
        m = np.array([r["source"] == s for r in rows])
        lines.append(f"| {s} | {m.sum()} | {y[m].mean():.2f} | {np.median([float(r['error_mm']) for r, k in zip(rows, m) if k]):.1f} |")
    lines += ["", f"Fitted weights (intercept, {', '.join(FEATURES)}): {tuple(round(float(v), 2) for v in w)}", ""]
    lines += ["Held-out seeds:", ""]
    lines += _report("fitted now", fitted[test], y[test])
    lines += _report("shipped ConfidenceModel", shipped[test], y[test])
    lines += _report("old constant (0.50, L5/S1 0.35)", constant[test], y[test])
    text = "\n".join(lines)
    write_text_atomic(out / "calibration.md", text + "\n")
    print(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--seeds", type=int, default=40)
    f = sub.add_parser("fit")
    f.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "collect":
        collect(args.out, args.seeds)
    else:
        fit(args.out)


if __name__ == "__main__":
    main()
