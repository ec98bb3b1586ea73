"""The xray-chest layout check and the upright search on real radiographs whose file does not say
which way is up: how often the check warns on an upright chest (false alarms), how often it catches
one stored turned or flipped, which way up the search (``engine/upright.py``) then runs it, and the
Dice against the SCR masks that results.

The shipped xray-chest model runs through the Lib's inference and the task's own steps (as
`spinekneeseg run` on a PNG or NIfTI) on the JSRT radiographs in usual display, stored in each of
the eight layouts a 2D image can have. Each is run as stored; where the layout check fails, the
search runs the other seven and keeps the best passing one (the heart toward the left lung), as the
pipeline does, and says when the runner-up (its mirror) scored within MIRROR_MARGIN. The labels
are turned back upright and scored against the SCR masks (right lung, left lung, heart). The split
is the model's own (its checkpoint's test_fraction and split_seed), so the held-out 50 were never
trained on. The check's margins are geometric (tasks/xray/chest.py), not fitted here; MIRROR_MARGIN
was chosen on the trained-on radiographs (engine/upright.py).

    python Training/xray_upright.py --json Training/results/xray-upright.json [--subset held-out]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from evalhelpers import dice_per_label, mean_per_key, write_json
from xray_chest import UINT16, run_chest, shipped_model_split

STRUCTURES = {1: "right lung", 2: "left lung", 3: "heart"}


def runs(ids: list[str], root: Path, net, weights, log=print) -> list[dict]:
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.engine.upright import STORED_AS, search_upright, upright_turns
    from SpineKneeSegLib.tasks.xray.polarity import inverted

    turns = upright_turns()

    def run(image):  # the pipeline's network_and_steps for this task (no auxiliary models)
        return run_chest(net, image, weights.preprocessing)

    rows = []
    for case in ids:
        stored = inverted(read_image(root / case / "image.nii.gz"))  # JSRT is stored inverted
        usual = stored.array[0].astype(np.float32) * UINT16
        truth = read_image(root / case / "labels.nii.gz").array[0]
        row = {"case": case}
        for name, store in STORED_AS.items():
            image = stored.with_array(np.ascontiguousarray(store(usual))[None])
            first = run(image)
            layout = first[1].summaries["chest_layout"]
            chosen, ambiguous = "as stored", False
            if layout["passed"]:
                final = first
            else:
                final, found = search_upright(image, run, first, "chest_layout")
                chosen, ambiguous = found["chosen"], "ambiguous" in found
            labels = turns[name].apply(final[1].labels.array)[0]  # upright again, for the masks
            dice = dice_per_label(labels, truth, STRUCTURES)
            row[name] = {"failed as stored": layout["failed"], "score as stored": layout["upright_score"],
                         "run as": chosen, "ambiguous": ambiguous, "warnings": [w[:60] for w in final[1].warnings],
                         **{f"dice {STRUCTURES[v]}": round(d, 4) for v, d in dice.items()}}
        rows.append(row)
        log(json.dumps({"case": case, **{n: (r["run as"], r["dice right lung"])
                                         for n, r in row.items() if n != "case"}}))
    return rows


def summary(rows: list[dict]) -> dict:
    from SpineKneeSegLib.engine.upright import STORED_AS

    keys = [f"dice {s}" for s in STRUCTURES.values()]
    out = {}
    for name in STORED_AS:
        per = [r[name] for r in rows]
        out[name] = {"flagged as stored": sum(bool(p["failed as stored"]) for p in per),
                     "run the right way up": sum(p["run as"] == name for p in per),
                     "left as stored": sum(p["run as"] == "as stored" for p in per),
                     "run another way": sum(p["run as"] not in (name, "as stored") for p in per),
                     "said uncertain (mirror within the margin)": sum(p["ambiguous"] for p in per),
                     "run another way and not said uncertain": sum(p["run as"] not in (name, "as stored")
                                                                   and not p["ambiguous"] for p in per),
                     "heart toward the image's left, warned": sum(
                         any(w.startswith("the heart lies") for w in p["warnings"]) for p in per),
                     "mean dice": mean_per_key(per, keys),
                     "scores as stored": _range([p["score as stored"] for p in per
                                                 if p["score as stored"] is not None])}
    return out


def _range(values: list[float]) -> dict:
    values = np.array(values)
    return ({"min": round(float(values.min()), 3), "median": round(float(np.median(values)), 3),
             "max": round(float(values.max()), 3)} if values.size else {})


def main(argv=None) -> int:
    from SpineKneeSegLib.core.datasets import data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("held-out", "trained-on", "all"), default="all")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    root = data_root() / "xray" / "jsrt-scr"
    net, weights, train, test = shipped_model_split(root)
    subsets = {"held-out": test, "trained-on": train}
    chosen = subsets if args.subset == "all" else {args.subset: subsets[args.subset]}
    t = time.time()
    result = {}
    for name, ids in chosen.items():
        rows = runs(ids, root, net, weights)
        result[name] = {"cases": len(rows), "by layout": summary(rows), "rows": rows}
        print(name, len(rows), "radiographs:")
        for layout, s in result[name]["by layout"].items():
            print(f"  {layout}: {json.dumps(s)}")
    print(f"{time.time() - t:.0f} s")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
