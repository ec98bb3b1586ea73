"""Speed rule for every task: time outside the network, (total - network), must be
<= max(0.3 x network, 0.3 s). Prints medians of several runs; exits 1 when a task breaks the rule.

    python Testing/benchmarks/bench_overhead.py [--runs 3] [--tasks knee-bones ...] [--data]

Networks: the registered weights when a task has them, else the task card's full-size network
freshly initialised. Network time does not depend on the weights' values, but post-processing
does: an untrained network's noisy output (thousands of specks) is a worst case for connected
components, lesion tables and the foramen localiser, so such rows are marked "untrained".
Inputs are the built-in phantoms, or with --data one real shared case per task where one exists.
The first run of each task is a warm-up and is not counted; then the tasks take turns, one run
each per round, so that a slow spell of the machine falls on every task alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_process import add_process_flags, set_up_process
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import write_image
from SpineKneeSegLib.demo import SHARED_CASES
from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
from SpineKneeSegLib.engine.weights import (
    find_entry,
    initialise_weights,
    main_entry_name,
)
from SpineKneeSegLib.tasks import TASKS, make_phantom


def prepare(task: str, use_data: bool, workdir: Path, input_paths: list[str] | None = None,
            with_aux: bool = True, aux_given: dict | None = None) -> dict:
    """What one task's runs need: weights (registered, else the card's network untrained), the
    auxiliary models, and the input (given, one real shared case, or the phantom)."""
    card = TASKS[task]
    entry = find_entry(main_entry_name(card, len(input_paths or [None])))  # FLAIR + T1: the T1 model
    if entry is not None:
        weights, kind = entry.path(), f"v{entry.version}"
    else:
        weights, kind = workdir / f"{task}.pt", "untrained"
        initialise_weights(task, weights)
    aux = dict(aux_given or {})
    for model in card.auxiliary if with_aux else ():  # registered, else untrained so its cost is measured
        if model.seed_variant:  # e.g. knee's per-bone fibula model: not the default pipeline
            continue
        if model.name not in aux and find_entry(model.weights_entry) is None:
            aux[model.name] = str(workdir / f"{task}-{model.name}.pt")
            initialise_weights(task, aux[model.name], model=model.name)
            kind = "untrained"
    root = data_root()
    if input_paths:
        source, inputs = " + ".join(Path(p).name for p in input_paths), list(input_paths)
    elif use_data and root is not None and task in SHARED_CASES and (root / SHARED_CASES[task][0]).exists():
        source, inputs = SHARED_CASES[task][0], [str(root / SHARED_CASES[task][0])]
    else:
        path = workdir / f"{task}.nii.gz"
        write_image(make_phantom(task, seed=0).image, path)
        source, inputs = "phantom", [str(path)]
    return {"task": task, "kind": kind, "source": source, "inputs": inputs,
            "options": RunOptions(weights=str(weights), aux_weights=aux)}


def run_once(plan: dict, workdir: Path, i: int) -> dict:
    return run_case(TASKS[plan["task"]], plan["inputs"], workdir / f"out-{plan['task']}-{i}", plan["options"])


def summarise(plan: dict, reports: list[dict]) -> dict:
    samples = [r["timings_s"] for r in reports]
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    overhead = med["total"] - med["network"]
    limit = max(0.3 * med["network"], 0.3)
    return {"task": plan["task"], "weights": plan["kind"], "source": plan["source"],
            "shape": reports[-1]["inputs"][0]["shape_kji"], **med,
            "overhead": overhead, "ratio": overhead / med["network"], "limit": limit, "ok": overhead <= limit}


def bench_all(plans: list[dict], runs: int, workdir: Path) -> list[dict]:
    """Every task once as a warm-up (not counted), then ``runs`` rounds of every task in turn:
    interleaved, so a slow spell of the machine lands on all tasks alike rather than on one."""
    for plan in plans:
        run_once(plan, workdir, 0)
    reports = {plan["task"]: [] for plan in plans}
    for i in range(1, runs + 1):
        for plan in plans:
            reports[plan["task"]].append(run_once(plan, workdir, i))
    return [summarise(plan, reports[plan["task"]]) for plan in plans]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_process_flags(parser)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--data", action="store_true", help="use one real shared case per task when present")
    parser.add_argument("--no-aux", action="store_true",
                        help="leave unregistered auxiliary models out (the shipped configuration)")
    parser.add_argument("--aux-weights", action="append", default=[], metavar="NAME=PATH",
                        help="a trained auxiliary model, e.g. foramina=Testing/fixtures/foramen-phantom.pt")
    parser.add_argument("--input", nargs="+", help="benchmark these inputs (with a single --tasks entry), e.g. a "
                                                   "224x224x20 lumbar MRI for the spine issue's < 2 s target, or "
                                                   "FLAIR and T1 for brain-wmh with its T1 model")
    parser.add_argument("--json", help="also write the results (one object per task) to this file")
    args = parser.parse_args(argv)
    set_up_process(args)  # as the command line does
    with tempfile.TemporaryDirectory() as tmp:
        aux = dict(a.split("=", 1) for a in args.aux_weights)
        plans = [prepare(task, args.data, Path(tmp), args.input, not args.no_aux, aux) for task in args.tasks]
        results = bench_all(plans, args.runs, Path(tmp))
    print(f"{'task':16} {'weights':9} {'input':42} {'shape':16} {'total':>7} {'network':>8} {'outside':>8} {'ratio':>6} "
          f"{'limit':>6}  rule   (medians of {args.runs} interleaved runs, seconds)")
    for r in results:
        print(f"{r['task']:16} {r['weights']:9} {r['source'][:42]:42} {'x'.join(map(str, r['shape'])):16} {r['total']:7.3f} "
              f"{r['network']:8.3f} {r['overhead']:8.3f} {r['ratio']:6.2f} {r['limit']:6.3f}  "
              f"{'ok' if r['ok'] else 'FAIL'}")
        print(f"{'':26} load {r['load']:.3f}  bias field {r.get('bias_correction', 0):.3f}  preprocess {r['preprocess']:.3f}  "
              f"postprocess {r['postprocess']:.3f}  "
              f"write {r['write']:.3f}  mrml start-up {r.get('mrml_startup', 0):.3f}  dicom-seg {r.get('dicom_seg', 0):.3f}"
              f"  (all in total; start-up before it {r.get('startup', 0):.3f})")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
                if line.startswith("model name")), "?")[:60] if Path("/proc/cpuinfo").exists() else "?"  # one core's name
    import resource

    import torch

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(f"machine: {cpu}; torch threads {torch.get_num_threads()}; peak memory of this process "
          f"{peak_mb:.0f} MB (all tasks above; run one --tasks for its own figure)")
    if args.json:
        Path(args.json).write_text(json.dumps([{**r, "shape": list(r["shape"]), "ok": bool(r["ok"])} for r in results],
                                              indent=2), encoding="utf-8")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
