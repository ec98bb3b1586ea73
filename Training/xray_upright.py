"""The xray-chest layout check (``tasks/xray/chest.py``) on real radiographs: how often it warns on
an upright chest (false alarms) and how often it catches one stored turned or flipped.

The shipped xray-chest model runs through the Lib's inference and the task's own steps (as
`spinekneeseg run`) on the JSRT radiographs in usual display, as stored and turned 90 / 180 / 270
degrees or flipped left-right / upside down; the split is the model's own (its checkpoint's
test_fraction and split_seed), so the held-out 50 were never trained on. The check's margins are
geometric (tasks/xray/chest.py), not fitted here. Also recorded, as stored and mirrored: the heart's
offset from the lungs' midline (the candidate check for a mirrored image, which was not adopted).

    python Training/xray_upright.py --json Training/results/xray-upright.json [--subset held-out]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from evalhelpers import write_json
from xray_chest import TASK, UINT16, case_ids, split

VARIANTS = {"as stored": lambda a: a, "turned 90": lambda a: np.rot90(a, 1), "turned 180": lambda a: np.rot90(a, 2),
            "turned 270": lambda a: np.rot90(a, 3), "flipped left-right": lambda a: a[:, ::-1],
            "flipped upside down": lambda a: a[::-1]}


def layouts(ids: list[str], root: Path, log=print) -> list[dict]:
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.engine.inference import load_network, segment_slices
    from SpineKneeSegLib.engine.pipeline import postprocess
    from SpineKneeSegLib.engine.weights import resolve_weights
    from SpineKneeSegLib.tasks import TASKS
    from SpineKneeSegLib.tasks.xray.polarity import inverted

    card = TASKS[TASK]
    weights = resolve_weights(card, None)
    net = load_network(weights, torch.device("cpu"))
    rows = []
    for case in ids:
        stored = inverted(read_image(root / case / "image.nii.gz"))  # JSRT is stored inverted
        usual = stored.array[0].astype(np.float32) * UINT16
        row = {"case": case}
        for name, turn in VARIANTS.items():
            image = stored.with_array(np.ascontiguousarray(turn(usual))[None])
            out = segment_slices(card, image, net, torch.device("cpu"), weights.preprocessing, keep_probabilities=True)
            result = postprocess(card, image, out.labels, {"probabilities": out.probabilities},
                                 {"probabilities": image})
            row[name] = result.summaries["chest_layout"]["failed"]
            if name in ("as stored", "flipped left-right"):
                row[f"heart offset, {name}"] = heart_offset(result.labels.array[0])
        rows.append(row)
        log(json.dumps(row))
    return rows


def heart_offset(labels: np.ndarray) -> float | None:
    """The heart's centre column from the midpoint of the lungs' centres, in units of half their
    spacing; positive toward the left lung (patient left, the image's right when upright)."""
    cols = {v: np.nonzero(labels == v)[1] for v in (1, 2, 3)}
    if any(c.size == 0 for c in cols.values()):
        return None
    right, left, heart = (float(cols[v].mean()) for v in (1, 2, 3))
    return round((heart - (right + left) / 2) / ((left - right) / 2), 3)


def offsets(rows: list[dict]) -> dict:
    out = {}
    for name in ("as stored", "flipped left-right"):
        values = np.array([r[f"heart offset, {name}"] for r in rows if r[f"heart offset, {name}"] is not None])
        out[name] = {"min": round(float(values.min()), 3), "median": round(float(np.median(values)), 3),
                     "max": round(float(values.max()), 3)}
    return out


def flagged(rows: list[dict]) -> dict:
    return {name: sum(bool(r[name]) for r in rows) for name in VARIANTS}


def main(argv=None) -> int:
    from SpineKneeSegLib.core.datasets import data_root
    from SpineKneeSegLib.engine.weights import find_entry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("held-out", "trained-on", "all"), default="all")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    root = data_root() / "xray" / "jsrt-scr"
    config = torch.load(find_entry(TASK).path(), map_location="cpu", weights_only=False)["metadata"]["config"]
    train, test, _ = split(case_ids(root), root, config["test_fraction"], config["split_seed"])
    subsets = {"held-out": test, "trained-on": train}
    chosen = subsets if args.subset == "all" else {args.subset: subsets[args.subset]}
    t = time.time()
    result = {}
    for name, ids in chosen.items():
        rows = layouts(ids, root)
        result[name] = {"cases": len(rows), "flagged": flagged(rows), "heart_offset": offsets(rows), "rows": rows}
        print(name, len(rows), "radiographs, flagged:", json.dumps(result[name]["flagged"]),
              "heart offset:", json.dumps(result[name]["heart_offset"]))
    print(f"{time.time() - t:.0f} s")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
