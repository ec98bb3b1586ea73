"""`spinekneeseg` command line (also `PythonSlicer -m SpineKneeSegLib.cli` inside 3D Slicer).

Exit codes: 0 ok, 2 bad input/usage, 3 no weights, 1 internal error.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from SpineKneeSegLib.core.errors import InputError, SpineKneeSegError, Terminated


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2 with the reason, as argparse does, but uniformly
        self.print_usage(sys.stderr)
        print(f"spinekneeseg: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from SpineKneeSegLib.tasks import TASKS

    parser = _Parser(prog="spinekneeseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("tasks", help="list tasks with inputs, outputs and weight status").add_argument(
        "--json", action="store_true", help="machine-readable listing")

    run = sub.add_parser("run", help="segment one case (or a manifest of cases)")
    run.add_argument("--task", required=True, choices=sorted(TASKS))
    run.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="image file(s) or DICOM folder(s), in the task's input order")
    run.add_argument("--manifest", help="a cohort: a CSV with columns id,input[,input2...], or a folder of scans "
                     "(each image file or sub-folder a case); one output folder per case")
    run.add_argument("--workers", type=int, default=2,
                     help="--manifest: cases in flight at once in this process (reading and writing overlap "
                          "the network; default 2)")
    run.add_argument("--dry-run", action="store_true",
                     help="--manifest: list what each case would do (run / skip / fail / busy, and why) and write "
                          "nothing")
    run.add_argument("--scan-name", metavar="NAME",
                     help="--manifest FOLDER: the file that is the scan in each sub-folder (e.g. 'image*', any case), "
                          "where a scan's label map lies beside it")
    run.add_argument("--scheduler", metavar="ADDRESS",
                     help="--manifest: run the cases on a Dask distributed cluster (e.g. tcp://host:8786); "
                          "-o must be a folder every worker can write")
    run.add_argument("-o", "--output", required=True, help="output folder")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a finished result already in the output folder (default: refuse; with "
                          "--manifest: redo finished cases instead of skipping them)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    run.add_argument("--weights", help="checkpoint file (default: the registered weights for the task)")
    run.add_argument("--weights-dir", help="folder of downloaded registered weights (offline); each file is "
                                           "checked against the registry's SHA256")
    run.add_argument("--fast", action="store_true",
                     help="skip optional refinements (N4, joint-centre pass, optional auxiliary models)")
    run.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                     help="bfloat16: the networks under bfloat16 autocast, about 2x faster on CPUs with native "
                          "bfloat16 (else float32, with a warning); the model cards' figures are float32's")
    run.add_argument("--no-writer-process", action="store_true",
                     help="one INPUT: write every output in this process, after importing slicer-core (by "
                          "default a child process started after the input checks imports it and writes "
                          "the MRML outputs and the DICOM-SEG while this one segments)")
    run.add_argument("--no-dicom-seg", action="store_true",
                     help="do not write segmentation.dcm (DICOM-SEG) for a DICOM input")
    run.add_argument("--aux-weights", action="append", default=[], metavar="NAME=PATH",
                     help="checkpoint of an auxiliary model, e.g. foramina=foramen.pt, or NAME=none to run "
                          "without an optional one, e.g. refiner=none (repeatable)")
    run.add_argument("--scene", action="store_true", help="also write scene.mrb (opens in 3D Slicer)")
    run.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    run.add_argument("--echo", type=int, help="echo number for multi-echo DICOM series (default 1)")
    run.add_argument("--image-type", metavar="VALUE",
                     help="DICOM: read the images whose ImageType holds VALUE (one contrast of a Dixon series "
                          "exported as one: e.g. W, F, IN_PHASE, OPP_PHASE)")
    run.add_argument("--series", help="the series to use from a DICOM folder holding several: its "
                     "SeriesInstanceUID, series number or description (* and ? as wildcards, any case)")
    run.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    run.add_argument("--fuse-views", metavar="PLANES",
                     help="multi-view fusion: also run the network along these planes (comma list, e.g. "
                          "sagittal,coronal) and average the probabilities; 'none' turns it off")
    run.add_argument("--every-slice", action="store_true",
                     help="lumbar-foramina: run the level network on every slice, whole (seed 004's way; slower). "
                          "By default it runs outward from the middle slices, stops a slice beyond the column, and "
                          "runs all but the middle four on a 269 mm window around it. knee-bones on an axial "
                          "series: every sagittal reformat (by default every ~1.5 mm, linear between)")
    run.add_argument("--skull-stripped", default="auto", choices=("auto", "yes"),
                     help="brain-wmh: 'auto' refuses FLAIR that does not look skull-stripped; 'yes' skips the check")
    run.add_argument("--invert", default="auto", choices=("auto", "yes", "no"),
                     help="radiographs: turn the grey scale over (yes), never (no), or decide (auto: a DICOM's "
                          "header, else the image's evidence; the report records the decision and why)")
    run.add_argument("--upright", default="auto", choices=("auto", "no"),
                     help="radiographs: show the image to the network upright where its DICOM header says it is "
                          "stored turned or mirrored (auto), or as stored (no)")
    run.add_argument("--pixel-mm", type=float, help="2D inputs: true pixel size in mm (PNG/JPEG carry none; "
                                                    "DICOM's is replaced)")

    demo = sub.add_parser("demo", help="run every task with weights on built-in phantoms; HTML report")
    demo.add_argument("-o", "--output", required=True)
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    demo.add_argument("--no-data", action="store_true", help="skip ../shared/data cases even when present")
    _add_annotate_parser(sub)
    return parser


def _add_annotate_parser(sub) -> None:
    annotate = sub.add_parser("annotate", help="foramen annotation: export labels, import RSNA points, "
                                               "compare readers, worklists, corrections")
    commands = annotate.add_subparsers(dest="annotate_command", required=True, parser_class=_Parser)

    export = commands.add_parser("export", help="markers -> level label map (+ <stem>_side.nii.gz) on the scan's grid")
    export.add_argument("--markers", required=True, help="foramen markers (.mrk.json, LPS or RAS)")
    export.add_argument("--image", required=True, help="the scan the markers were placed on (file or DICOM folder)")
    export.add_argument("--output", required=True, help="level labels 1..5 = L1..L5 (e.g. labels.nii.gz)")
    export.add_argument("--radius", type=float, default=7.0, help="in-slice disc radius in mm (default 7, seed 004)")
    export.add_argument("--include-unconfirmed", action="store_true",
                        help="also rasterise pre-filled model points no reader has confirmed")
    export.add_argument("--manifest", help="also add the case (image + markers) to this training manifest")
    export.add_argument("--id", help="case id for --manifest (default: the markers file name)")

    rsna = commands.add_parser("import-rsna", help="RSNA-2024 lumbar point annotations -> one .mrk.json per series")
    rsna.add_argument("--csv", required=True, help="train_label_coordinates.csv (or the same columns)")
    rsna.add_argument("--series-dir", required=True, help="folder with <study_id>/<series_id>/*.dcm")
    rsna.add_argument("--output", required=True, help="output folder")
    rsna.add_argument("--manifest", help="also add each series (DICOM folder + markers) to this training manifest")

    compare = commands.add_parser("compare", help="agreement of two readers' foramen markers")
    compare.add_argument("markers", nargs=2, metavar="MARKERS", help="reader A and reader B (.mrk.json)")
    compare.add_argument("--image", help="the scan (slices from its geometry; else from the points' descriptions)")
    compare.add_argument("--json", action="store_true", help="print the full result as JSON")

    status = commands.add_parser("status", help="per-case status of a worklist")
    status.add_argument("worklist", help="folder of scans or list file")
    status.add_argument("--annotations", help="annotations folder (default: <worklist>/annotations)")
    status.add_argument("--json", action="store_true")

    manifest = commands.add_parser("manifest", help="add a worklist's finished cases to a training manifest")
    manifest.add_argument("worklist", help="folder of scans or list file")
    manifest.add_argument("--annotations", help="annotations folder (default: <worklist>/annotations)")
    manifest.add_argument("--manifest", required=True, help="training manifest CSV (created or updated)")
    manifest.add_argument("--reviewed-only", action="store_true", help="only cases marked reviewed")

    predict = commands.add_parser("predict", help="model markers for pre-filling: <case>.pred.mrk.json per case")
    predict.add_argument("worklist", help="folder of scans or list file")
    predict.add_argument("--annotations", help="annotations folder (default: <worklist>/annotations)")
    predict.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    predict.add_argument("--weights", help="level model checkpoint (default: registered)")
    predict.add_argument("--aux-weights", action="append", default=[], metavar="NAME=PATH",
                         help="e.g. foramina=foramen.pt")
    predict.add_argument("--overwrite", action="store_true", help="predict again where predictions exist")

    correction = commands.add_parser("save-correction",
                                     help="a corrected segmentation -> <case>.seg.nrrd + manifest entry")
    correction.add_argument("--segmentation", required=True, help="the corrected segmentation (.seg.nrrd from Slicer)")
    correction.add_argument("--image", required=True, help="the scan it belongs to")
    correction.add_argument("--task", required=True, help="task whose label names the segments use")
    correction.add_argument("--case", required=True, help="case id")
    correction.add_argument("--output", required=True, help="folder for <case>.seg.nrrd (and the manifest)")
    correction.add_argument("--manifest", help="training manifest (default: OUTPUT/training-manifest.csv)")


def _version() -> str:
    from SpineKneeSegLib import __version__

    return f"spinekneeseg {__version__}"


def cmd_tasks(args) -> int:
    from SpineKneeSegLib.engine.weights import find_entry
    from SpineKneeSegLib.tasks import TASKS

    listing = []
    for card in TASKS.values():
        entry = find_entry(card.weights_entry)
        listing.append({
            "task": card.name, "title": card.title, "description": card.description,
            "inputs": [f"{s.name} ({s.modality}, {s.dims}D{'' if s.required else ', optional'})" for s in card.inputs],
            "labels": {s.value: s.name for s in card.labels}, "outputs": list(card.outputs),
            "weights": f"{entry.file} v{entry.version} sha256 {entry.sha256[:12]}" if entry else
            f"none (trained in issue {card.issue}; pass --weights PATH)"})
        for needs, name in card.weights_with_input:  # e.g. brain-wmh with a T1
            extra = find_entry(name)
            listing[-1]["weights"] += (f"; with {needs}: {extra.file} v{extra.version} sha256 {extra.sha256[:12]}"
                                       if extra else f"; with {needs}: none registered (the {needs} is not used)")
        listing[-1]["auxiliary"] = {}
        for aux in card.auxiliary:  # optional models beside the main one (foramina, the level refiner, ...)
            found = find_entry(aux.weights_entry)
            listing[-1]["auxiliary"][aux.name] = (f"{found.file} v{found.version} sha256 {found.sha256[:12]}" if found
                                                  else "none registered" + ("" if aux.required else " (optional)"))
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for t in listing:
        print(f"{t['task']}: {t['title']}\n  {t['description']}\n  inputs:  {'; '.join(t['inputs'])}\n"
              f"  labels:  {', '.join(f'{k} {v}' for k, v in t['labels'].items())}\n"
              f"  outputs: {', '.join(t['outputs'])}\n  weights: {t['weights']}"
              + "".join(f"\n    {name}: {status}" for name, status in t["auxiliary"].items()))
    return 0


def parse_aux_weights(items) -> dict[str, str]:
    aux = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--aux-weights takes NAME=PATH, got {item!r}")
        aux[name] = path
    return aux


def parse_planes(text: str | None) -> tuple[str, ...] | None:
    """``--fuse-views``: None (not given: the task's default), 'none' -> (), else the comma list."""
    if text is None:
        return None
    return () if text.strip().lower() == "none" else tuple(p.strip().lower() for p in text.split(",") if p.strip())


def cmd_run(args) -> int:
    import SpineKneeSegLib.core.image_io  # noqa: F401  (SimpleITK, ~0.05 s cold, an import, so start-up;
    # imported before the process age is read below, and needed by a refusal all the same; pydicom loads
    # when a DICOM input is read, counted as start-up by core.lazy)
    from SpineKneeSegLib.core.progress import Progress, process_age_s
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.tasks import get_task

    card = get_task(args.task)
    aux = parse_aux_weights(args.aux_weights)
    options = RunOptions(device=args.device, weights=args.weights, aux_weights=aux, scene=args.scene,
                         echo=args.echo, series=args.series, image_type=args.image_type,
                         batch_size=args.batch_size, threads=args.threads,
                         waive_checks=("skull_stripped",) if args.skull_stripped == "yes" else (), fast=args.fast, weights_dir=args.weights_dir,
                         dicom_seg=not args.no_dicom_seg, pixel_mm=args.pixel_mm, overwrite=args.overwrite,
                         input_settings={"invert": args.invert, "upright": args.upright}, startup_s=process_age_s(),
                         fuse_views=parse_planes(args.fuse_views), precision=args.precision,
                         every_slice=args.every_slice)
    progress = Progress(args.progress)
    if args.dry_run and not args.manifest:
        raise InputError("--dry-run lists what a --manifest cohort would do")
    if args.scan_name and not args.manifest:
        raise InputError("--scan-name picks the scan in each sub-folder of a --manifest folder of scans")
    if args.scheduler and not args.manifest:
        raise InputError("--scheduler runs a --manifest on a cluster; give --manifest cases.csv")
    if args.manifest:
        if args.inputs:
            raise InputError("give either INPUT files or --manifest, not both")
        from SpineKneeSegLib.engine.batch import dry_run, run_manifest

        if args.dry_run:
            return dry_run(card, args.manifest, args.output, options, progress, scan_name=args.scan_name)
        if args.scheduler:
            from SpineKneeSegLib.core.memory import imports_done
            from SpineKneeSegLib.engine.batch import run_manifest_on_cluster

            imports_done()  # this process runs no case: the collector, paused for one, resumes now
            return run_manifest_on_cluster(card, args.manifest, args.output, options, progress, args.scheduler,
                                           scan_name=args.scan_name)
        return run_manifest(card, args.manifest, args.output, options, progress, workers=args.workers,
                            scan_name=args.scan_name)
    if not args.inputs:
        raise InputError("no INPUT given (or use --manifest cases.csv)")
    import dataclasses

    # one case, one process: slicer-core's start-up and the MRML writers in a child beside the run
    options = dataclasses.replace(options, writer_process=not args.no_writer_process)
    report = run_case(card, args.inputs, args.output, options, progress)
    if args.progress == "bar":
        t = report["timings_s"]
        print(f"wrote {', '.join(report['outputs'])} to {args.output} "
              f"(total {t['total']:.2f} s, network {t['network']:.2f} s)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output, device=args.device, use_data=not args.no_data)
    return 0


def cmd_annotate(args) -> int:
    from SpineKneeSegLib import annotate_cli

    return annotate_cli.run(args)


def _raise_terminated(signum, _frame):
    raise Terminated()


def main(argv=None) -> int:
    import signal
    import threading

    from SpineKneeSegLib.core.memory import imports_done, keep_freed_memory

    keep_freed_memory()  # large arrays reuse freed memory instead of faulting in fresh pages
    args = build_parser().parse_args(argv)
    if args.command != "run":  # console_main paused the collector for one run's imports only
        imports_done()
    handler = {"tasks": cmd_tasks, "run": cmd_run, "demo": cmd_demo, "annotate": cmd_annotate}[args.command]
    progress_json = getattr(args, "progress", None) == "json"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None  # unwind like Ctrl-C
    try:
        return handler(args)
    except SpineKneeSegError as exc:
        return _fail(exc.exit_code, str(exc), progress_json)
    except OSError as exc:  # unwritable output, disk full, ...: the user's environment, not our bug
        return _fail(2, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), progress_json)
    except KeyboardInterrupt:
        return _fail(130, "cancelled", progress_json)
    except Terminated:
        return _fail(Terminated.exit_code, "terminated (SIGTERM); nothing partial was left", progress_json)
    except Exception as exc:  # noqa: BLE001 - last resort: internal error with the traceback
        traceback.print_exc()
        return _fail(1, f"internal error — please report it with the traceback above (stderr): "
                        f"{type(exc).__name__}: {exc}", progress_json)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _fail(code: int, message: str, progress_json: bool) -> int:
    if progress_json:
        print(json.dumps({"event": "error", "exit_code": code, "message": message}), flush=True)
    print(f"spinekneeseg: error: {message}", file=sys.stderr)
    return code


def console_main() -> int:
    """The ``spinekneeseg`` command (and ``python -m SpineKneeSegLib.cli``): main(), then a quick exit.
    The interpreter's last garbage collection walks every object torch and VTK made: from main()'s
    return to the process's end took 0.64-0.67 s, and 0.15 s with the heap frozen here (session 38,
    2 cores); frozen objects are skipped by it, and the process ends anyway.
    Not in main(), which tests and other callers run in a process that goes on. The collector also
    rests during the imports (core/memory.py: pause_collection, imports_done)."""
    import gc

    from SpineKneeSegLib.core.memory import pause_collection

    pause_collection()
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
