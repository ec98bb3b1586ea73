"""`spinekneeseg annotate ...`: the headless side of the annotation mode (same Lib code as the panel)."""
from __future__ import annotations

import json
from pathlib import Path


def run(args) -> int:
    handler = {"export": export, "import-rsna": import_rsna, "compare": compare, "status": status,
               "manifest": manifest, "predict": predict, "save-correction": save_correction}[args.annotate_command]
    return handler(args)


def export(args) -> int:
    from SpineKneeSegLib.annotation.export import export_foramen_labels
    from SpineKneeSegLib.annotation.training_manifest import (
        TrainingCase,
        add_training_case,
    )
    from SpineKneeSegLib.annotation.worklist import FORAMEN_TASK

    result = export_foramen_labels(args.markers, args.image, args.output, args.radius,
                                   include_unconfirmed=args.include_unconfirmed)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"wrote {result['labels']} and {result['sides']}: {result['points']} point(s), "
          f"{len(result['foramina'])} foramina, radius {args.radius:g} mm")
    if args.manifest:
        case_id = args.id or Path(args.markers).name.removesuffix(".mrk.json")
        add_training_case(args.manifest, TrainingCase(case_id, FORAMEN_TASK, Path(args.image), markers=Path(args.markers)))
        print(f"added {case_id} to {args.manifest}")
    return 0


def import_rsna(args) -> int:
    from SpineKneeSegLib.annotation.rsna import import_rsna as run_import

    summary = run_import(args.csv, args.series_dir, args.output, manifest=args.manifest)
    skipped = ", ".join(f"{n} {c!r}" for c, n in summary["skipped_conditions"].items())
    print(f"wrote {len(summary['files'])} marker file(s) with {summary['points']} foramen point(s) to {args.output}"
          + (f"; skipped rows of other conditions: {skipped}" if skipped else ""))
    return 0


def compare(args) -> int:
    from SpineKneeSegLib.annotation.agreement import compare_readers
    from SpineKneeSegLib.annotation.foramen_labels import read_marker_records
    from SpineKneeSegLib.core.image_io import read_image

    a, b = (read_marker_records(p) for p in args.markers)
    image = read_image(args.image) if args.image else None
    result = compare_readers(a, b, image, paths=tuple(args.markers))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'foramen':9} {'A':>3} {'B':>3}  common slices   in-plane mm  agreement")
    for r in result["foramina"]:
        distance = f"{r['in_plane_mm']:.2f}" if r["in_plane_mm"] is not None else "-"
        common = ",".join(map(str, r["common_slices"])) or "-"
        print(f"{r['foramen']:9} {r['a_points']:>3} {r['b_points']:>3}  {common:14} {distance:>11}  {r['agreement']}")
    s = result["summary"]
    print(f"both: {s['foramina_both']}, on a common slice: {s['with_common_slice']}, within 5 mm: {s['within_5mm']} "
          f"({s['percent_within_5mm']}%), in-plane mean {s['mean_in_plane_mm']} / median {s['median_in_plane_mm']} "
          f"/ max {s['max_in_plane_mm']} mm; only A: {', '.join(s['only_a']) or '-'}; only B: {', '.join(s['only_b']) or '-'}")
    return 0


def _worklist(args):
    from SpineKneeSegLib.annotation.worklist import Worklist

    return Worklist.from_path(args.worklist, args.annotations)


def status(args) -> int:
    worklist = _worklist(args)
    statuses = worklist.statuses()
    not_cases = {str(n.path): n.reason for n in worklist.skipped}
    if args.json:
        print(json.dumps({"cases": statuses, "counts": worklist.counts(), "not_cases": not_cases}, indent=2))
        return 0
    for case_id, value in statuses.items():
        print(f"{case_id}\t{value}")
    for path, reason in not_cases.items():
        print(f"not a case: {path}: {reason}")
    print(", ".join(f"{n} {s}" for s, n in worklist.counts().items()))
    return 0


def manifest(args) -> int:
    from SpineKneeSegLib.annotation.worklist import add_to_training_manifest

    added = add_to_training_manifest(_worklist(args), args.manifest, args.reviewed_only)
    print(f"added {len(added)} case(s) to {args.manifest}" + (f": {', '.join(added)}" if added else ""))
    return 0


def predict(args) -> int:
    from SpineKneeSegLib.annotation.worklist import predict_worklist
    from SpineKneeSegLib.engine.pipeline import RunOptions

    from .cli import parse_aux_weights

    options = RunOptions(device=args.device, weights=args.weights, aux_weights=parse_aux_weights(args.aux_weights))
    done = predict_worklist(_worklist(args), options, overwrite=args.overwrite)
    print(f"predicted {len(done)} case(s)" + (f": {', '.join(done)}" if done else " (all had predictions)"))
    return 0


def save_correction(args) -> int:
    from SpineKneeSegLib.annotation.corrections import save_correction as save
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.mrml import nodes
    from SpineKneeSegLib.mrml.harness import get_app

    scene = get_app().scene
    volume = nodes.image_to_volume_node(scene, read_image(args.image), args.case)
    segmentation = nodes.load_segmentation(scene, args.segmentation)
    try:
        saved = save(segmentation, volume, args.case, args.task, args.output, image_path=Path(args.image),
                     manifest=args.manifest)
    finally:
        scene.RemoveNode(segmentation)
        scene.RemoveNode(volume)
    if saved.skipped:
        print(f"note: segments without a {args.task} label were left out: {', '.join(saved.skipped)}")
    print(f"wrote {saved.labels} and its entry in {saved.manifest}")
    return 0
