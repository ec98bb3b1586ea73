"""Train the knee-bones model (seed 000) on images synthesised from label maps (knee_synth.py).

    python Training/knee_bones.py prepare --out Training/runs/knee          # label maps -> volumes.pt (SimpleITK)
    python Training/knee_bones.py train --out Training/runs/knee [--resume] [--max-minutes M] [--device cuda]
    python Training/knee_bones.py evaluate --out Training/runs/knee [--checkpoint best.pt]
    python Training/knee_bones.py ship --out Training/runs/knee --version 0.1.0

Data: ../shared/data/knee/labelmaps (SPL knee atlas, pymskt DESS labels) and/or, with --pairs
CSV (name,image,labels,mapping), label maps or image+label pairs users bring (real images train
the same network through the same augmentation; ``import-folders`` (an image folder and a label
folder) and ``import-oai-zib`` write such a CSV). One label map is
held out entirely: validation (early stopping) and the held-out Dice figures come from synthetic
images of the held-out anatomy only. ``train`` needs only torch: run ``prepare`` where SimpleITK
exists, carry volumes.pt to a GPU machine, train there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from knee_average import average_snapshots, soup_checkpoints
from knee_card import ship
from knee_data import (
    Config,
    import_folders,
    import_oai_zib,
    parse_mapping,
    parse_synth_overrides,
    prepare,
    read_pairs,
    write_pairs,
)
from knee_eval import (
    BONE_NAMES,
    check_real_series,
    compare_variants,
    evaluate_series,
    pool_evaluations,
    raw_components,
    slice_fit,
)
from knee_train import train
from SpineKneeSegLib.core.atomic import write_text_atomic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--labelmaps", type=Path, default=None)
    p.add_argument("--spacing", type=float, default=Config.spacing_mm)
    p.add_argument("--pairs", type=Path, default=None, help="CSV name,image,labels,mapping of data you bring")
    p.add_argument("--no-shared", action="store_true", help="only --pairs, not the shared label maps")
    z = sub.add_parser("import-oai-zib", help="pair OAI-ZIB masks with OAI images -> a --pairs CSV")
    z.add_argument("--masks", type=Path, required=True)
    z.add_argument("--images", type=Path, required=True)
    z.add_argument("--csv", type=Path, required=True)
    f = sub.add_parser("import-folders",
                       help="pair an image folder with a label-map folder by case name -> a --pairs CSV")
    f.add_argument("--images", type=Path, required=True, help="images: files (NIfTI, NRRD, MHA/MHD) or DICOM folders")
    f.add_argument("--labels", type=Path, required=True, help="label maps, one per image, same case names")
    f.add_argument("--mapping", required=True, help="label value -> bone, e.g. 1:1,2:2,3:3,4:4 (1 femur, 2 tibia, "
                   "3 fibula, 4 patella); bones left out are unlabelled, not background")
    f.add_argument("--label-suffix", default="", help="end of a label file's name to drop, e.g. _seg")
    f.add_argument("--csv", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--volumes", type=Path, default=None, help="prepared volumes.pt (default: OUT/volumes.pt)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--variant", default=Config.variant, choices=("multiclass", "merged", "fibula"))
    t.add_argument("--channels", type=int, default=Config.channels)
    t.add_argument("--iterations", type=int, default=Config.iterations)
    t.add_argument("--batch-size", type=int, default=Config.batch_size)
    t.add_argument("--patch", type=int, default=Config.patch)
    t.add_argument("--eval-every", type=int, default=Config.eval_every)
    t.add_argument("--stop-after", type=int, default=None, help="stop at this iteration (schedule unchanged)")
    t.add_argument("--patience", type=int, default=Config.patience, help="early stopping, in evaluations")
    t.add_argument("--seed", type=int, default=Config.seed)
    t.add_argument("--held-out", default=Config.held_out, help="name of the volume that only validates")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--workers", type=int, default=Config.workers)
    t.add_argument("--init", default=None, help="start from this checkpoint's weights (fresh optimiser and schedule)")
    t.add_argument("--lr", type=float, default=Config.lr, help="schedule start (seed 000: 1e-3)")
    t.add_argument("--lr-final", type=float, default=Config.lr_final, help="schedule end (seed 000: 1e-4)")
    t.add_argument("--ce-weight", type=float, default=Config.ce_weight,
                   help="add this much pixel cross-entropy to the seed's soft F1 loss (0: the seed's loss alone)")
    t.add_argument("--synth", nargs="+", default=[], metavar="KEY=VALUE",
                   help="knee_synth.SynthConfig overrides, e.g. shared_tissue_p=0.8 through_plane_margin_mm=25")
    e = sub.add_parser("evaluate")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--checkpoint", type=Path, default=None, help="default: OUT/best.pt")
    e.add_argument("--volumes", type=Path, default=None)
    e.add_argument("--synth", nargs="+", default=[], metavar="KEY=VALUE",
                   help="SynthConfig overrides for the series (e.g. shared_tissue_p=1); the JSON name gets -synth")
    e.add_argument("--seeds", type=int, nargs="+", default=[777],
                   help="one draw of the six series per seed, pooled (777: the model cards' figures)")
    sp = sub.add_parser("soup", help="weight-average the candidates of runs of one recipe (differing only in seed)")
    sp.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    sp.add_argument("--out", type=Path, required=True, help="the averaged checkpoint (.pt)")
    sp.add_argument("--volumes", type=Path, required=True, help="prepared volumes.pt (batch-norm re-estimate)")
    a = sub.add_parser("average", help="weight-average a run's snapshots (SWA) -> OUT/swa-FIRST-LAST.pt")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--first", type=int, required=True)
    a.add_argument("--last", type=int, required=True)
    a.add_argument("--volumes", type=Path, default=None, help="prepared volumes.pt (default: OUT/volumes.pt)")
    c = sub.add_parser("compare", help="validation Dice of variant runs at one iteration -> JSON")
    c.add_argument("--runs", nargs="+", required=True, help="VARIANT=RUN_DIR ...")
    c.add_argument("--at", type=int, required=True)
    c.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("check-real", help="run the product on the two real knee series")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--checkpoint", type=Path, default=None)
    f = sub.add_parser("fit", help="per-bone Dice on 2D synthetic slices of one anatomy (e.g. a training one)")
    f.add_argument("--checkpoint", type=Path, required=True)
    f.add_argument("--volumes", type=Path, required=True, help="prepared volumes.pt")
    f.add_argument("--anatomy", default="spl", help="name prefix of the prepared volume (default: spl, the atlas)")
    f.add_argument("--samples", type=int, default=150)
    f.add_argument("--synth", nargs="+", default=[], metavar="KEY=VALUE", help="SynthConfig overrides")
    k = sub.add_parser("components", help="raw (pre-clean-up) components of one bone on a series, largest first")
    k.add_argument("--checkpoint", type=Path, required=True)
    k.add_argument("--series", type=Path, required=True, help="DICOM folder or image file")
    k.add_argument("--bone", default="fibula", choices=list(BONE_NAMES.values()))
    s = sub.add_parser("ship")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--variants", type=Path, default=None, help="variant comparison JSON (default: OUT/variants.json)")
    s.add_argument("--held-out-figures", type=Path, default=None,
                   help='for a model trained on every anatomy: JSON {"version", "evaluation", "checkpoint"} of the '
                        "run that held the DESS map out")
    s.add_argument("--notes", type=Path, default=None, help="markdown: what the real-series overlays showed")
    s.add_argument("--checkpoint", type=Path, default=None, help="weights to ship (default: OUT/best.pt)")
    s.add_argument("--evaluation", type=Path, default=None, help="evaluate JSON (default: OUT/eval-best.json)")
    s.add_argument("--evaluation-tissue", type=Path, default=None,
                   help="evaluate --synth shared_tissue_p=1 JSON of the same checkpoint")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from SpineKneeSegLib.core.datasets import data_root

        labelmaps = None if args.no_shared else (args.labelmaps or data_root() / "knee" / "labelmaps")
        prepare(args.out, labelmaps, args.spacing, read_pairs(args.pairs) if args.pairs else None)
        return 0
    if args.command == "import-folders":
        try:
            mapping = parse_mapping(args.mapping)
        except ValueError as exc:
            raise SystemExit(f"--mapping: {exc}") from None
        rows = import_folders(args.images, args.labels, mapping, args.label_suffix)
        write_pairs(rows, args.csv)
        print(f"{len(rows)} case(s) -> {args.csv}; next: prepare --pairs {args.csv}")
        return 0
    if args.command == "import-oai-zib":
        rows = import_oai_zib(args.masks, args.images)
        write_pairs(rows, args.csv)
        print(f"{len(rows)} OAI-ZIB case(s) -> {args.csv} (femur and tibia labelled; fibula and patella "
              "unlabelled: the loss treats them as unknown, not background)")
        return 0
    if args.command == "train":
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = Config(variant=args.variant, channels=args.channels, iterations=args.iterations,
                     batch_size=args.batch_size, patch=args.patch, eval_every=args.eval_every, seed=args.seed,
                     patience=args.patience, held_out=args.held_out, stop_after=args.stop_after,
                     workers=args.workers, init=args.init, lr=args.lr, lr_final=args.lr_final,
                     synth=parse_synth_overrides(args.synth), ce_weight=args.ce_weight)
        state = train(cfg, args.out, args.resume, args.device, args.max_minutes, volumes_path=args.volumes)
        print(f"best mean Dice {state['best']:.4f} at epoch {state['best_epoch']}")
        return 0
    if args.command == "evaluate":
        overrides = parse_synth_overrides(args.synth)
        result = pool_evaluations([evaluate_series(args.checkpoint or args.out / "best.pt",
                                                   args.volumes or args.out / "volumes.pt", seed=seed, synth=overrides)
                                   for seed in args.seeds])
        name = (args.checkpoint or args.out / "best.pt").stem + ("-synth" if overrides else "")
        name += "" if args.seeds == [777] else "-seeds-" + "-".join(map(str, args.seeds))
        write_text_atomic(args.out / f"eval-{name}.json", json.dumps(result, indent=2))
        print(json.dumps(result["mean_dice"]))
        return 0
    if args.command == "soup":
        soup_checkpoints(args.checkpoints, args.out, args.volumes)
        return 0
    if args.command == "average":
        average_snapshots(args.out, args.first, args.last, volumes_path=args.volumes)
        return 0
    if args.command == "compare":
        runs = dict(item.split("=", 1) for item in args.runs)
        rows = compare_variants({k: Path(v) for k, v in runs.items()}, args.at)
        write_text_atomic(args.json, json.dumps(rows, indent=2))
        print(json.dumps(rows, indent=1))
        return 0
    if args.command == "check-real":
        checkpoint = args.checkpoint or args.out / "best.pt"
        rows = check_real_series(checkpoint, args.out / "real")
        write_text_atomic(args.out / "real.json", json.dumps(rows, indent=2))
        return 0
    if args.command == "fit":
        result = slice_fit(args.checkpoint, args.volumes, args.anatomy, parse_synth_overrides(args.synth), args.samples)
        print(json.dumps(result))
        return 0
    if args.command == "components":
        bone = {v: k for k, v in BONE_NAMES.items()}[args.bone]
        rows = raw_components(args.checkpoint, args.series, bone)
        print(f"{args.bone}: {len(rows)} raw component(s); offsets from the tibia's centroid (RAS mm)")
        for r in rows:
            first, last = r["slices"]
            print(f"{r['ml']:8.2f} ml  slices {first}-{last}  right/anterior/superior {r['offset_ras_mm']}")
        return 0
    if args.command == "ship":
        return ship(args.out, args.version, args.evaluation or args.out / "eval-best.json", args.out / "real.json",
                    args.variants or args.out / "variants.json", args.held_out_figures, args.notes, args.checkpoint,
                    args.evaluation_tissue)
    return 2


if __name__ == "__main__":
    sys.exit(main())

