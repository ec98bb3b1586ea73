"""Slice growth for lumbar-foramina (issue 21's 2 s per case): the level network run outward from
the middle slices (cards.Preprocessing.grow_min_px; column_px: the later slices on a window around
the column) against every slice, whole, on every shared spine scan. Both runs use the shipped
models; per scan it prints the slices run, the network seconds, whether the final labels are
identical (else the voxels that differ and the level Dice between the two), the level names, the
level confidence and the largest foramen-marker move. Exits 1 when a scan's names, its foramen
markers or its doubtful flag change.

    python Testing/benchmarks/bench_slice_growth.py [--min-px 20 40] [--column-px 192] [--sources zukic-t2 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_process import add_process_flags, set_up_process
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
from SpineKneeSegLib.engine.postprocessing import dice
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.tasks.spine.level_decoding import DecodingParameters

SOURCES = ("myosegmentum", "zukic-t2", "ivd-t2")


def card_with(min_px: int | None, column_px: int | None = None):
    card = TASKS["lumbar-foramina"]
    return dataclasses.replace(card, preprocessing=dataclasses.replace(card.preprocessing, grow_min_px=min_px,
                                                                       column_px=column_px))


def doubtful(confidence: float) -> bool:
    return confidence < DecodingParameters().doubtful_below


def level_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over L1..L5 of the Dice between two label maps (1.0 where both lack a level)."""
    return float(np.mean([1.0 if d is None else d for d in (dice(a == k, b == k) for k in range(1, 6))]))


def run(card, image: Path, out: Path) -> tuple[dict, np.ndarray, dict]:
    report = run_case(card, [str(image)], out, RunOptions(threads=2))
    labels = read_image(out / "labels.nii.gz").array
    markers = json.loads((out / "foramina.mrk.json").read_text(encoding="utf-8"))["markups"][0]["controlPoints"]
    return report, labels, {p["label"]: np.asarray(p["position"]) for p in markers}


def compare(image: Path, settings: list[int | None], column_px: int | None, workdir: Path) -> list[dict]:
    base_report, base_labels, base_points = run(card_with(None), image, workdir / "all")
    rows = []
    for min_px in settings:
        report, labels, points = run(card_with(min_px, column_px), image, workdir / f"grow{min_px}")
        s = base_report["summaries"]
        g = report["summaries"]
        moved = [float(np.linalg.norm(points[k] - base_points[k])) for k in points if k in base_points]
        rows.append({
            "scan": f"{image.parent.parent.name}/{image.parent.name}", "min_px": min_px,
            "slices": f"{g['slice_growth']['slices_run']}/{g['slice_growth']['of']}",
            "fallback": g["slice_growth"]["every_slice"], "columns": g["slice_growth"].get("network_columns"),
            "level_dice_to_all": level_dice(labels, base_labels),
            "network_all": base_report["timings_s"]["network"], "network_grown": report["timings_s"]["network"],
            "voxels_differ": int((labels != base_labels).sum()),
            "names_same": sorted(np.unique(labels)) == sorted(np.unique(base_labels)),
            "confidence_all": s.get("level_confidence"), "confidence_grown": g.get("level_confidence"),
            "markers_same_set": set(points) == set(base_points),
            "marker_move_mm": max(moved, default=0.0),
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_process_flags(parser)
    parser.add_argument("--min-px", type=int, nargs="+", default=[TASKS["lumbar-foramina"].preprocessing.grow_min_px])
    parser.add_argument("--column-px", type=int, default=TASKS["lumbar-foramina"].preprocessing.column_px,
                        help="window width after the middle slices (0: whole slices)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    set_up_process(args)  # as the command line does
    root = data_root()
    if root is None:
        print("no shared data (SPINEKNEESEG_DATA)", file=sys.stderr)
        return 2
    images = [p for src in args.sources for p in sorted((root / "spine" / src).glob("case*/image.nii.gz"))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(images):
            rows += compare(image, args.min_px, args.column_px or None, Path(tmp) / str(i))
            for r in rows[-len(args.min_px):]:
                print(f"{r['scan']:22} min_px {r['min_px']:>3}  slices {r['slices']:>5}{' (all)' if r['fallback'] else '':6}"
                      f"  network {r['network_all']:.2f} -> {r['network_grown']:.2f} s  differ {r['voxels_differ']:>6}"
                      f" (Dice {r['level_dice_to_all']:.4f}){'  columns ' + str(r['columns']) if r['columns'] else ''}"
                      f"  names {'same' if r['names_same'] else 'CHANGED'}"
                      f"  confidence {r['confidence_all']} -> {r['confidence_grown']}"
                      f"  markers {'same set' if r['markers_same_set'] else 'CHANGED'}, max move {r['marker_move_mm']:.2f} mm",
                      flush=True)
    bad = 0
    for min_px in args.min_px:
        mine = [r for r in rows if r["min_px"] == min_px]
        ratio = [r["network_grown"] / r["network_all"] for r in mine]
        changed = [r["scan"] for r in mine if not (r["names_same"] and r["markers_same_set"]
                                                   and doubtful(r["confidence_all"]) == doubtful(r["confidence_grown"]))]
        moved = [abs(r["confidence_grown"] - r["confidence_all"]) for r in mine]
        bad += len(changed)
        print(f"min_px {min_px}: {len(mine)} scans; identical labels on {sum(r['voxels_differ'] == 0 for r in mine)}; "
              f"every slice run on {sum(r['fallback'] for r in mine)}; network time grown / all: median "
              f"{statistics.median(ratio):.2f} (range {min(ratio):.2f}-{max(ratio):.2f}); level Dice to every slice "
              f"min {min(r['level_dice_to_all'] for r in mine):.4f}; confidence moved at most {max(moved):.4f}; "
              f"names, markers or the doubtful flag changed on: {', '.join(changed) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
