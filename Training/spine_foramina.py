"""Train the foramen model (seed 004: the level model's MultiNet on foramen targets — 7 mm in-slice
discs around marker points, 5 level channels) and score it with the seed's foramen metrics.

    python Training/spine_foramina.py --out Training/runs/foramina-phantom [--manifest M.csv] [--resume]

Cases: phantoms with known foramina (SpineKneeSegLib.core.phantoms: both handedness of the direction
matrix, tilts, spacings, 4/5/6 lumbar vertebrae) and, with ``--manifest``, real scans whose foramen
markers come from the annotation mode or the RSNA importer (rows with a ``markers`` file).
Validation: held-out phantoms (and held-out manifest cases, every 5th), through the Lib's own
inference and localiser, scored by the fraction of foramina within 2 mm.

A model trained on phantoms only must not be shipped (the issue forbids it): its checkpoint goes
to Training/runs or to Testing/fixtures, never into the registry.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from evaluate import foramen_errors, summarise_foramina  # noqa: E402
from spine_levels import CARD, Config, PreparedCase, train_loop  # noqa: E402
from SpineKneeSegLib.annotation.foramen_labels import (  # noqa: E402
    ForamenPoint,
    rasterise_foramen_targets,
    read_foramen_markers,
)
from SpineKneeSegLib.annotation.training_manifest import read_training_manifest  # noqa: E402
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.core.image_io import read_image  # noqa: E402
from SpineKneeSegLib.engine.inference import probability_maps  # noqa: E402
from SpineKneeSegLib.engine.preprocessing import training_slices  # noqa: E402
from SpineKneeSegLib.tasks.spine.foramina import localise_foramina  # noqa: E402
from SpineKneeSegLib.tasks.spine.phantom import spine_phantom  # noqa: E402

TRAIN_SEEDS = tuple(range(0, 48))
VALIDATION_SEEDS = tuple(range(1000, 1012))
TEST_SEEDS = tuple(range(2000, 2012))  # never used while training or selecting (Testing/ uses them)
RADIUS_MM = 7.0  # seed 004's foramen target radius


def phantom_variant(seed: int, lumbar_count: int = 5) -> dict:
    """Varied but reproducible phantom settings: handedness alternates, tilt +-15 deg, in-plane
    spacing 0.9-1.1 mm, slice thickness 3.3-4.5 mm. Five lumbar vertebrae: with 4 or 6 the level
    names depend on where one counts from, which a lumbar field of view cannot show (those spines
    are flagged by the transitional check, and scored apart with ``--transitional``)."""
    rng = np.random.default_rng(10_000 + seed)
    pixel = float(rng.uniform(0.9, 1.1))
    return {"seed": seed, "k_toward": "left" if seed % 2 else "right", "tilt_deg": float(rng.uniform(-15, 15)),
            "spacing": (pixel, pixel, float(rng.uniform(3.3, 4.5))), "lumbar_count": lumbar_count}


def phantom_case(seed: int, lumbar_count: int = 5) -> dict:
    """Image, truth points (one per slice a foramen is seen on) and truth foramen centres."""
    phantom = spine_phantom(**phantom_variant(seed, lumbar_count))
    points = [ForamenPoint(p["level"], p["side"], p["ras"], p["label"]) for p in phantom.points]
    truth = {r["label"]: r["centre_ras"] for r in phantom.extra["foramina"] if r["centre_ras"] is not None}
    return {"id": f"phantom/{seed}", "image": phantom.image, "points": points, "truth": truth}


def manifest_cases(path: Path) -> list[dict]:
    """Real scans with foramen markers (annotation mode / RSNA importer)."""
    cases = []
    for entry in read_training_manifest(path):
        if entry.task != CARD.name or entry.markers is None:
            continue
        points = read_foramen_markers(entry.markers)
        truth: dict[str, list] = {}
        for p in points:
            truth.setdefault(p.name, []).append(p.ras)
        cases.append({"id": f"manifest/{entry.id}", "image": read_image(entry.image), "points": points,
                      "truth": {k: tuple(np.mean(v, axis=0)) for k, v in truth.items()}})
    return cases


def prepare(case: dict, spacing_mm: float, radius_mm: float = RADIUS_MM) -> PreparedCase:
    levels, _, _ = rasterise_foramen_targets(case["points"], case["image"], radius_mm)
    pre = CARD.preprocessing
    x, y, _ = training_slices(case["image"], levels, pre.plane, pre.normalisation, spacing_mm)
    return PreparedCase(case["id"], x, y)


def predict_foramina(net: torch.nn.Module, image: Image, spacing_mm: float) -> dict[str, tuple]:
    """The Lib's inference and localiser, exactly as ``spinekneeseg run`` uses them."""
    pre = {**CARD.preprocessing.__dict__, "in_plane_spacing_mm": spacing_mm}
    out = probability_maps(pre, image, net, torch.device("cpu"), batch_size=8)
    return {f.label: f.ras for f in localise_foramina(out.maps, out.maps_grid)}


def score_foramina(net: torch.nn.Module, cases: list[dict], spacing_mm: float) -> dict:
    rows = {}
    for case in cases:
        predicted = predict_foramina(net, case["image"], spacing_mm)
        for label, row in foramen_errors(case["truth"], predicted).items():
            rows[f"{case['id']}:{label}"] = row
        for label in set(predicted) - set(case["truth"]):
            rows[f"{case['id']}:{label}:spurious"] = {"spurious": True}
    scored = {k: r for k, r in rows.items() if not r.get("spurious")}
    summary = summarise_foramina(scored)
    found = [r for r in scored.values() if not r["missed"]]
    distances = [float(np.hypot(r["in_plane_mm"], r["lateral_mm"])) for r in found]
    summary["percent_within_2mm"] = round(100.0 * sum(d <= 2.0 for d in distances) / max(len(scored), 1), 2)
    summary["max_distance_mm"] = round(max(distances), 3) if distances else None
    summary["spurious"] = len(rows) - len(scored)
    return {"summary": summary, "foramina": rows}


def train(cfg: Config, out: Path, manifest: Path | None, resume: bool, log=print,
          max_minutes: float | None = None) -> dict:
    train_cases = [phantom_case(s) for s in TRAIN_SEEDS]
    val_cases = [phantom_case(s) for s in VALIDATION_SEEDS]
    if manifest is not None:
        real = manifest_cases(manifest)
        val_cases += real[::5]
        train_cases += [c for i, c in enumerate(real) if i % 5]
        log(f"manifest: {len(real)} real cases with foramen markers")
    prepared = [prepare(c, cfg.spacing_mm) for c in train_cases]
    log(f"{len(train_cases)} training / {len(val_cases)} validation cases")

    def evaluate(net):
        metrics = score_foramina(net, val_cases, cfg.spacing_mm)
        s = metrics["summary"]
        mean_error = s["mean_in_plane_mm"] if s["mean_in_plane_mm"] is not None else 99.0
        score = s["percent_within_2mm"] - 0.01 * mean_error - s["missed"] - s["spurious"]
        scalars = {"val/percent_within_2mm": s["percent_within_2mm"], "val/percent_within_5mm": s["percent_within_5mm"],
                   "val/mean_in_plane_mm": mean_error, "val/missed": s["missed"], "val/spurious": s["spurious"]}
        return score, scalars, {"summary": s}

    return train_loop(cfg, out, prepared, evaluate, resume, log, max_minutes, model="foramina",
                      metadata={"trained_on": "phantoms" + (" + manifest" if manifest else ""),
                                "train_seeds": list(TRAIN_SEEDS), "validation_seeds": list(VALIDATION_SEEDS),
                                "target_radius_mm": RADIUS_MM})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="Training/runs/foramina-phantom")
    parser.add_argument("--manifest", type=Path, help="training manifest with foramen markers (real scans)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-minutes", type=float)
    defaults = {**asdict(Config()), "epochs": 60, "patience": 15}
    for name, value in defaults.items():
        if not isinstance(value, dict):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--evaluate", help="score this checkpoint on the test phantoms instead of training")
    parser.add_argument("--transitional", type=int, choices=(4, 5, 6), default=5,
                        help="with --evaluate: lumbar vertebrae in the test phantoms")
    args = parser.parse_args(argv)
    if args.evaluate:
        from SpineKneeSegLib.engine.inference import load_network
        from SpineKneeSegLib.engine.weights import resolve_weights

        weights = resolve_weights(CARD, args.evaluate, "foramina")
        net = load_network(weights, torch.device("cpu"))
        spacing = weights.preprocessing.get("in_plane_spacing_mm", CARD.preprocessing.in_plane_spacing_mm)
        cases = [phantom_case(s, args.transitional) for s in TEST_SEEDS]
        print(json.dumps(score_foramina(net, cases, spacing), indent=2))
        return 0
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config()) if k != "network"})
    train(cfg, Path(args.out), args.manifest, args.resume, max_minutes=args.max_minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
