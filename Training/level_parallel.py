"""Run several whole-column level recipes' cross-validation folds and final models side by side on
one machine (a lent GPU: one process per model), each for the same number of steps, chosen to
fit a wall-clock budget from a short probe run of every job at once.

    python Training/level_parallel.py --packed .devdata/levels-1.4mm.pkl.xz --out RUN \\
        --budget-minutes 6 --recipe C='--batch-size 32' --recipe D='--batch-size 32 --network {...}' \\
        -- --device cuda

Writes RUN/<recipe>/fold<k>/final.pt and RUN/<recipe>/final/final.pt, logs, and RUN/plan.json
(probe step times, the steps chosen, every command: a re-run with those commands reproduces the
models without the probe). Held-out scoring happens where the data are:
``spine_levels.py cv --out RUN/<recipe> --evaluate-only`` then ``cv-report``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from SpineKneeSegLib.core.atomic import write_text_atomic

SCRIPT = Path(__file__).with_name("spine_levels.py")


def job_commands(recipe_out: Path, packed: Path, folds: int, steps: int, args: list[str]) -> dict[str, list[str]]:
    """{job name: argv} for the fold models and the final model of one recipe."""
    base = [sys.executable, str(SCRIPT)]
    common = ["--packed", str(packed), "--steps", str(steps), *args]
    jobs = {f"fold{f}": base + ["cv", "--out", str(recipe_out), "--folds", str(folds), "--fold", str(f), *common]
            for f in range(folds)}
    jobs["final"] = base + ["final", "--out", str(recipe_out / "final"), *common]
    return jobs


def run_all(jobs: dict[str, list[str]], logs: Path) -> dict[str, int]:
    """Start every job at once; wait for all; {name: exit code}."""
    logs.mkdir(parents=True, exist_ok=True)
    running = {}
    for name, argv in jobs.items():
        log = open(logs / f"{name.replace('/', '-')}.log", "w", encoding="utf-8")
        running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log)
    codes = {}
    for name, (process, log) in running.items():
        codes[name] = process.wait()
        log.close()
    return codes


def checkpoint_of(recipe_out: Path, job: str) -> Path:
    return recipe_out / ("final" if job == "final" else job) / "final.pt"


def probe_steps(args, recipes: dict[str, str], plan: dict) -> tuple[float, dict[str, int] | None]:
    """Every job for a few steps at once; each recipe's steps from its slowest job's wall step time
    (median_step_s: batch to batch, the GPU's work included)."""
    started = time.time()
    probe_jobs = {}
    for name, options in recipes.items():
        for job, cmd in job_commands(args.out / "probe" / name, args.packed, args.folds, args.probe_steps,
                                     shlex.split(options) + args.common).items():
            probe_jobs[f"{name}/{job}"] = cmd
    codes = run_all(probe_jobs, args.out / "logs" / "probe")
    if any(codes.values()):
        print(f"probe failed: {codes}", file=sys.stderr)
        return round(time.time() - started, 1), None
    steps = {}
    for name in recipes:
        times = {job: torch.load(checkpoint_of(args.out / "probe" / name, job), weights_only=False)["metadata"]
                 ["median_step_s"] for job in job_commands(args.out, args.packed, args.folds, 1, []).keys()}
        slowest = max(times.values())
        steps[name] = int(min(args.max_steps, max(100, args.budget_minutes * 60 / slowest // 100 * 100)))
        plan["probe"][name] = {"median_step_s": times, "steps": steps[name]}
        print(f"recipe {name}: slowest step {slowest:.4f} s with every job running -> {steps[name]} steps", flush=True)
    return round(time.time() - started, 1), steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", action="append", required=True, help="NAME='spine_levels.py options'")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--budget-minutes", type=float, help="training wall time per model (a probe fits the steps)")
    parser.add_argument("--steps", type=int, help="steps of every job, no probe (a step time known from an "
                        "earlier run on the same machine kind: plan.json's probe)")
    parser.add_argument("--probe-steps", type=int, default=40)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("common", nargs="*", help="options for every job (after --)")
    args = parser.parse_args(argv)
    if (args.steps is None) == (args.budget_minutes is None):
        parser.error("give --budget-minutes (probe) or --steps (no probe)")
    recipes = dict(r.split("=", 1) for r in args.recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = {"budget_minutes": args.budget_minutes, "recipes": recipes, "common": args.common,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "probe": {}}
    steps = {name: args.steps for name in recipes}
    if args.steps is None:
        plan["probe_seconds"], steps = probe_steps(args, recipes, plan)
        if steps is None:
            return 1
    jobs = {}
    for name, options in recipes.items():
        for job, cmd in job_commands(args.out / name, args.packed, args.folds, steps[name],
                                     shlex.split(options) + args.common).items():
            jobs[f"{name}/{job}"] = cmd
    plan["commands"] = {k: shlex.join(v) for k, v in jobs.items()}
    write_text_atomic(args.out / "plan.json", json.dumps(plan, indent=2))
    started = time.time()
    codes = run_all(jobs, args.out / "logs")
    plan["train_seconds"] = round(time.time() - started, 1)
    plan["exit_codes"] = codes
    write_text_atomic(args.out / "plan.json", json.dumps(plan, indent=2))
    print(json.dumps({k: plan.get(k) for k in ("probe_seconds", "train_seconds", "exit_codes")}, indent=2))
    return int(any(codes.values()))


if __name__ == "__main__":
    sys.exit(main())
