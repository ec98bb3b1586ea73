"""The cardiothoracic ratio xray-chest reports (``tasks/xray/chest.py``), against the same measure
on the SCR expert masks, on the JSRT radiographs.

The shipped xray-chest model runs through the Lib's inference and the task's own steps (as
`spinekneeseg run`) on each radiograph in usual display; its ``summaries.cardiothoracic_ratio`` is
compared with ``cardiothoracic_ratio`` on the SCR right lung, left lung and heart masks (the same
code, so the comparison measures the segmentation, not the definition). The split is the model's
own (its checkpoint's test_fraction and split_seed): the held-out 50 were never trained on.
Printed and stored: mean and largest absolute difference, bias, Pearson r, and agreement on the
0.5 limit, per subset; per-case rows in the JSON.

    python Training/xray_ctr.py --json Training/results/xray-ctr.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from evalhelpers import write_json
from xray_chest import UINT16, run_chest, shipped_model_split


def ratios(ids: list[str], root: Path, net, weights, log=print) -> list[dict]:
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.tasks.xray.chest import cardiothoracic_ratio
    from SpineKneeSegLib.tasks.xray.polarity import inverted

    rows = []
    for case in ids:
        stored = inverted(read_image(root / case / "image.nii.gz"))  # JSRT is stored inverted
        image = stored.with_array(stored.array.astype(np.float32) * UINT16)
        model = run_chest(net, image, weights.preprocessing)[1].summaries["cardiothoracic_ratio"]
        truth = cardiothoracic_ratio(read_image(root / case / "labels.nii.gz").array[0],
                                     (float(image.spacing[1]), float(image.spacing[0])))
        row = {"case": case, "truth": truth["ratio"], "model": model["ratio"],
               "truth heart mm": truth.get("heart_width_mm"), "model heart mm": model.get("heart_width_mm"),
               "truth thorax mm": truth.get("thorax_width_mm"), "model thorax mm": model.get("thorax_width_mm")}
        rows.append(row)
        log(json.dumps(row))
    return rows


def summary(rows: list[dict]) -> dict:
    measured = [r for r in rows if r["truth"] is not None and r["model"] is not None]
    truth = np.array([r["truth"] for r in measured])
    model = np.array([r["model"] for r in measured])
    diff = model - truth
    worst = measured[int(np.argmax(np.abs(diff)))]["case"] if measured else None
    return {"cases": len(rows), "measured": len(measured),
            "mean_abs_diff": round(float(np.abs(diff).mean()), 4), "max_abs_diff": round(float(np.abs(diff).max()), 4),
            "worst_case": worst, "bias": round(float(diff.mean()), 4),
            "pearson_r": round(float(np.corrcoef(truth, model)[0, 1]), 4),
            "truth_range": [round(float(truth.min()), 3), round(float(truth.max()), 3)],
            "above_0.5": {"truth": int((truth > 0.5).sum()), "model": int((model > 0.5).sum()),
                          "both": int(((truth > 0.5) & (model > 0.5)).sum()),
                          "disagree": int(((truth > 0.5) != (model > 0.5)).sum())}}


def main(argv=None) -> int:
    from SpineKneeSegLib.core.datasets import data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    root = data_root() / "xray" / "jsrt-scr"
    net, weights, train, test = shipped_model_split(root)
    t = time.time()
    result = {}
    for name, ids in (("held-out", test), ("trained-on", train)):
        rows = ratios(ids, root, net, weights, log=lambda *_: None)
        result[name] = {"summary": summary(rows), "rows": rows}
        print(name, json.dumps(result[name]["summary"]))
    print(f"{time.time() - t:.0f} s")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
