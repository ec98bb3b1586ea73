"""Level naming on scans no level model was trained or chosen on (issue 21): the five ivd-t2 scans
in ../shared/data/spine (Menezes-Reis et al., T2 FSE, another centre than the 54 training scans),
whose labels are the five lumbar discs (1 = L1/L2 .. 5 = L5/S1), not the bodies. Each scan runs
through the product (``run_case`` of lumbar-foramina, as a user's would), and each named body is
placed by the discs around it:

- between disc k-1 and disc k: L_k (L2..L5);
- above disc 1: L1 within one L1/L2-to-L2/L3 disc spacing of disc 1, T12 within two, then T11;
- below disc 5: the sacrum.

The failure kinds are level_eval's (shift up / down, gap, duplicate, missing). The foramen markers
are placed against their own disc (marker "L_k ..." is the L_k/L_k+1 foramen, at the level of disc
k): signed superior offset in mm, and whether the nearest disc is its own. No Dice: there are no
body labels. Laterality is unknown in these scans, so left and right are not told apart.

``--fov`` also runs each scan with a smaller field of view, cut at the discs' centroids as
level_eval cuts the training scans by their bodies: "cut through L1" (the scan starts at L1's
middle, half a disc spacing above disc 1: T12 outside, as in many lumbar protocols), "cut above
L2" (it starts at the middle of disc 1: L1 outside, to be left unnamed) and "cut below L5" (it
ends at the middle of disc 5: the sacrum outside). Discs are tilted, so a cut at a centroid can
leave a corner of the body beyond it. Each cut is a real smaller image (origin moved, written to
NIfTI) run through the product.

    python Training/level_external.py [--weights registered PATH ...] [--fov full "cut through L1" ...]
        [--out Training/runs/levels-external]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from level_eval import NAME, N_LEVELS, classify, crop_along, superior_axis
from SpineKneeSegLib.core.atomic import write_text_atomic
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.tasks.spine.level_decoding import DecodingParameters

N_DISCS = 5
DATASET = "spine/ivd-t2"
FIELDS_OF_VIEW = ("full", "cut through L1", "cut above L2", "cut below L5")


def superior_mm(image: Image, kji: np.ndarray) -> np.ndarray:
    """Patient-superior coordinate (RAS S, mm) of (N, 3) k, j, i indices."""
    return image.ijk_to_ras_points(np.asarray(kji, dtype=float)[:, ::-1])[:, 2]


def disc_centroids(discs: np.ndarray) -> np.ndarray:
    """(5, 3) kji centroid of each disc 1..5; refuses a map without all five."""
    centroids = []
    for d in range(1, N_DISCS + 1):
        kji = np.argwhere(discs == d)
        if len(kji) == 0:
            raise ValueError(f"disc {d} is not labelled")
        centroids.append(kji.mean(axis=0))
    return np.array(centroids)


def disc_levels(discs: np.ndarray, image: Image) -> np.ndarray:
    """S (mm) of each disc's centroid, discs 1..5; refuses a map without all five, or with them
    out of order (superior to inferior)."""
    levels = np.array([float(s) for s in superior_mm(image, disc_centroids(discs))])
    if not np.all(np.diff(levels) < 0):
        raise ValueError(f"discs are not ordered superior to inferior: S {np.round(levels, 1).tolist()}")
    return levels


def place_body(s: float, discs_s: np.ndarray) -> tuple[int, str]:
    """(ordinal position as level_eval's POSITION: T11 -1, T12 0, L1..L5 1..5, sacrum 6; name) of
    a body whose centroid is at S ``s``."""
    if s < discs_s[-1]:
        return 6, "below L5 (sacrum)"
    for k in range(1, N_DISCS):  # between disc k and disc k+1: L(k+1)
        if discs_s[k] <= s < discs_s[k - 1]:
            return k + 1, NAME[k + 1]
    above = int(np.floor((s - discs_s[0]) / (discs_s[0] - discs_s[1])))  # in disc spacings above disc 1
    position = 1 - above
    return position, NAME.get(position, "above T11")


def identify_by_discs(pred: np.ndarray, discs: np.ndarray | None, image: Image,
                      discs_s: np.ndarray | None = None, expected=range(1, N_LEVELS + 1)) -> dict:
    """level_eval.identify's result ({"all_correct", "kinds", "where"}) for a predicted body map,
    each body placed by the discs (no body labels). ``discs_s``: the discs' S (mm) measured on the
    whole scan (then ``discs`` may be None: a cut field of view may hold only part of them);
    ``expected``: the levels inside the field of view, whose absence is a failure (for the whole
    scan all five: callers check that it reaches above disc 1, see field_of_view_ok); a level
    outside it is "absent", and naming one is a failure like any misplaced name."""
    discs_s = disc_levels(discs, image) if discs_s is None else np.asarray(discs_s, dtype=float)
    where, positions, missing = {}, {}, []
    for k in range(1, N_LEVELS + 1):
        kji = np.argwhere(pred == k)
        if len(kji) == 0:
            where[f"L{k}"] = "missing" if k in expected else "absent (outside the field of view)"
            if k in expected:
                missing.append(k)
            continue
        positions[k], where[f"L{k}"] = place_body(float(superior_mm(image, kji.mean(axis=0, keepdims=True))[0]),
                                                  discs_s)
    return {**classify(where, positions, missing), "disc_s_mm": [round(float(s), 1) for s in discs_s]}


def disc_rows(discs: np.ndarray, axis: int) -> np.ndarray:
    """Each disc's centroid index along numpy ``axis`` (discs 1..5)."""
    return disc_centroids(discs)[:, axis]


def field_of_view_cuts(image: Image, discs: np.ndarray) -> dict:
    """{name: (image, discs, levels inside)}: the whole scan and the three cuts of FIELDS_OF_VIEW,
    placed by the discs' centroids as place_body places bodies (see the module's docstring)."""
    axis, up = superior_axis(image)
    n = discs.shape[axis]
    rows = disc_rows(discs, axis)
    spacing = rows[0] - rows[1]  # disc 1 to disc 2, signed toward superior

    def starting_at(row):  # the field of view's superior end at ``row`` (kept)
        row = int(np.clip(round(row), 0, n - 1))
        return crop_along(image, discs, axis, 0, row + 1) if up else crop_along(image, discs, axis, row, n)

    def ending_at(row):  # its inferior end at ``row`` (kept)
        row = int(np.clip(round(row), 0, n - 1))
        return crop_along(image, discs, axis, row, n) if up else crop_along(image, discs, axis, 0, row + 1)

    all_five = tuple(range(1, N_LEVELS + 1))
    return {"full": (image, discs, all_five),
            "cut through L1": (*starting_at(rows[0] + spacing / 2), all_five),  # L1's middle
            "cut above L2": (*starting_at(rows[0]), all_five[1:]),  # the middle of the L1/L2 disc
            "cut below L5": (*ending_at(rows[4]), all_five)}  # the middle of the L5/S1 disc


def field_of_view_ok(discs: np.ndarray, image: Image, min_mm: float = 15.0) -> bool:
    """The scan reaches at least ``min_mm`` above disc 1's centroid (L1 is then in it)."""
    corners = np.array([[k, j, i] for k in (0, image.array.shape[0] - 1) for j in (0, image.array.shape[1] - 1)
                        for i in (0, image.array.shape[2] - 1)])
    return bool(float(superior_mm(image, corners).max()) - disc_levels(discs, image)[0] >= min_mm)


def foramen_offsets(points, discs_s: np.ndarray) -> list[dict]:
    """Per marker (annotation's ForamenPoint: level k = the L_k/L_k+1 foramen, RAS mm): S offset
    from its own disc k (positive: above) and whether disc k is the nearest of the five."""
    out = []
    for p in points:
        s = float(p.ras[2])
        nearest = int(np.argmin(np.abs(discs_s - s))) + 1
        out.append({"label": p.label, "offset_mm": round(s - float(discs_s[p.level - 1]), 1),
                    "nearest_disc_is_own": bool(nearest == p.level)})
    return out


def external_cases(root: Path) -> list[dict]:
    folder = root / DATASET
    cases = [{"id": f"ivd-t2/{d.name}", "image": d / "image.nii.gz", "discs": d / "discs.nii.gz"}
             for d in sorted(folder.glob("case*")) if (d / "discs.nii.gz").exists()]
    if not cases:
        raise FileNotFoundError(f"{folder}: no case with image.nii.gz and discs.nii.gz")
    return cases


def evaluate(case: dict, weights: str | None, out: Path, field_of_view: str = "full") -> dict:
    """One scan (or its cut ``field_of_view``) through the product's lumbar-foramina run, scored
    against its discs."""
    import tempfile

    from SpineKneeSegLib.annotation.foramen_labels import read_foramen_markers
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.tasks import TASKS

    whole = read_image(case["image"])
    discs = read_image(case["discs"]).array.astype(np.int64)
    discs_s = disc_levels(discs, whole)
    image, _, expected = field_of_view_cuts(whole, discs)[field_of_view]
    with tempfile.TemporaryDirectory() as tmp:
        path = case["image"]
        if field_of_view != "full":
            path = Path(tmp) / "image.nii.gz"
            write_image(image, path)
        report = run_case(TASKS["lumbar-foramina"], [str(path)], out, RunOptions(weights=weights, overwrite=True))
    pred = read_image(out / "labels.nii.gz")
    if pred.array.shape != image.array.shape:
        raise ValueError(f"{out / 'labels.nii.gz'}: shape {pred.array.shape}, the input {image.array.shape}")
    ident = identify_by_discs(pred.array, None, image, discs_s, expected)
    forams = foramen_offsets(read_foramen_markers(out / "foramina.mrk.json"), discs_s)
    decoding = report["summaries"].get("level_decoding", {})
    transitional = report["summaries"].get("transitional_anatomy", {})
    return {"identification": ident, "field_of_view": field_of_view,
            "field_of_view_ok": field_of_view_ok(discs, whole) if field_of_view == "full" else True,
            "rows": int(image.array.shape[superior_axis(whole)[0]]),
            "level_confidence": decoding.get("level_confidence"), "doubtful": decoding.get("doubtful"),
            "transitional": transitional.get("status"), "foramina": forams,
            "warnings": report["warnings"], "network_s": report["timings_s"]["network"]}


def table(results: dict, doubtful_below: float) -> str:
    from modelcard import table as markdown_table

    rows = []
    for name, cases in results.items():
        for cid, r in cases.items():
            ident = r["identification"]
            offs = [f["offset_mm"] for f in r["foramina"]]
            rows.append((name, cid, "yes" if ident["all_correct"] else "NO " + ",".join(ident["kinds"]),
                         ", ".join(f"{k}: {w}" for k, w in ident["where"].items() if w != k) or "-",
                         f"{r['level_confidence']:.2f}", "yes" if r["level_confidence"] < doubtful_below else "no",
                         r["transitional"],
                         f"{np.median(offs):+.1f} ({min(offs):+.1f} to {max(offs):+.1f})" if offs else "-",
                         f"{sum(f['nearest_disc_is_own'] for f in r['foramina'])} of {len(offs)}"))
    return markdown_table(["weights", "case", "all five right", "where (wrong ones)", "confidence", "doubtful",
                           "transitional", "foramen offset from own disc, mm (median, range)", "nearest disc own"],
                          rows, fmt=str)


def registered_doubtful_below(weights: list[str] | None = None) -> tuple[float, str]:
    """The doubtful threshold every run is judged by, and whose it is: the first checkpoint among
    ``weights`` that carries one (a candidate written by ``level_ship --candidate``: its own
    cross-validated threshold), else the shipped level model's, so that fold models, which carry
    none, are judged by the same rule."""
    from SpineKneeSegLib.engine.weights import load_checkpoint, resolve_weights
    from SpineKneeSegLib.tasks import TASKS

    for w in weights or []:
        if w != "registered":
            decoding = load_checkpoint(Path(w))["metadata"].get("postprocessing", {}).get("level_decoding", {})
            if "doubtful_below" in decoding:
                return float(decoding["doubtful_below"]), f"the threshold stored in {w}"
    settings = resolve_weights(TASKS["lumbar-foramina"], None).checkpoint.get("metadata", {}).get("postprocessing", {})
    return (float(settings.get("level_decoding", {}).get("doubtful_below", DecodingParameters().doubtful_below)),
            "the registered model's threshold")


def summary(results: dict, doubtful_below: float) -> dict:
    """Per weights: scans named right, and at one doubtful threshold how many were right and
    confident, right but doubtful, wrong and doubtful (caught), wrong and confident (silent)."""
    out = {}
    for name, cases in results.items():
        counts = {"right": 0, "right, confident": 0, "right, doubtful": 0, "wrong, doubtful": 0,
                  "wrong, confident (silent)": 0}
        for r in cases.values():
            right, doubtful = r["identification"]["all_correct"], r["level_confidence"] < doubtful_below
            counts["right"] += right
            counts[f"{'right' if right else 'wrong'}, {'doubtful' if doubtful else 'confident'}"
                   + ("" if right or doubtful else " (silent)")] += 1
        out[name] = {"scans": len(cases), **counts}
    return out


def card_section(path: Path, name: str = "registered") -> str:
    """A model card's section from an external.json: the table and the tally of one weights' runs."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if name not in data["cases"]:
        raise KeyError(f"{path}: no runs of {name!r} (has {', '.join(data['cases'])})")
    counts = data["summary"][name]
    return (f"""Five T2 FSE scans from another centre (`ivd-t2`, Menezes-Reis et al., Quant Imaging Med Surg 6:402,
2016; redistributed in FastCleverSeg, GPL-3.0) that no level model was trained or chosen on. Their labels
are the five lumbar discs, not the bodies, so each named body is placed between its discs (no Dice);
each foramen marker is measured against its own disc (`Training/level_external.py`, the product's
`run_case`). Doubtful below {data['doubtful_below']:.2f}:

{table({name: data['cases'][name]}, data['doubtful_below'])}

All five right on {counts['right']} of {counts['scans']}: """
            + "; ".join(f"{k} {v}" for k, v in counts.items() if k not in ("scans", "right")) + "."
            + others_line(data, name))


def others_line(data: dict, name: str) -> str:
    """The other weights run into the same external.json (the fold models of the same recipe), tallied
    at the same threshold: one model's five scans are few, and its fold models show the spread."""
    others = {k: v for k, v in data["summary"].items() if k != name}
    if not others:
        return ""
    total = {k: sum(v[k] for v in others.values()) for k in next(iter(others.values()))}
    return (f"\n\nThe same five scans through {len(others)} other models of the same recipe "
            f"({', '.join(others)}), at the same threshold: all five right on {total['right']} of {total['scans']} "
            f"runs; " + "; ".join(f"{k} {v}" for k, v in total.items() if k not in ("scans", "right")) + ".")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", nargs="+", default=["registered"],
                        help="level checkpoints; 'registered': the registered lumbar-levels model (the default)")
    parser.add_argument("--name", nargs="+", help="a name per --weights for the tables (default: registered, "
                        "else the checkpoint's run/job folders, e.g. D/fold0)")
    parser.add_argument("--fov", nargs="+", default=["full"], choices=FIELDS_OF_VIEW,
                        help="fields of view to run each scan with (default: full); a cut's runs are tabled "
                        "as 'WEIGHTS, CUT'")
    parser.add_argument("--out", type=Path, default=Path("Training/runs/levels-external"))
    parser.add_argument("--data", type=Path, help="shared data root (default: SPINEKNEESEG_DATA or ../shared/data)")
    args = parser.parse_args(argv)
    if args.name and len(args.name) != len(args.weights):
        parser.error("--name needs one name per --weights")
    root = args.data or data_root()
    if root is None or not (root / DATASET).exists():
        print(f"no {DATASET} folder: set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    cases = external_cases(root)
    results = {}
    for n, weights in enumerate(args.weights):
        base = (args.name[n] if args.name else
                weights if weights == "registered" else "/".join(Path(weights).parts[-3:-1]))  # e.g. D/fold0
        for fov in args.fov:
            name = base if fov == "full" else f"{base}, {fov}"
            results[name] = {}
            for case in cases:
                folder = args.out / base / (case["id"].split("/")[1] + ("" if fov == "full" else "-" + fov.replace(" ", "-")))
                r = evaluate(case, None if weights == "registered" else weights, folder, fov)
                results[name][case["id"]] = r
                ident = r["identification"]
                print(f"{name:28s} {case['id']:14s} {'ok ' if ident['all_correct'] else 'BAD'} "
                      f"{','.join(ident['kinds']) or '-':16s} conf {r['level_confidence']:.2f}"
                      + ("" if r["field_of_view_ok"] else "  (the scan ends < 15 mm above disc 1: L1 may be outside, "
                         "its 'missing' not a failure)"), flush=True)
    threshold, whose = registered_doubtful_below(args.weights)
    totals = summary(results, threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "external.json", json.dumps({"doubtful_below": threshold, "summary": totals,
                                                              "cases": results}, indent=2))
    print(table(results, threshold))
    print(f"\nat level confidence < {threshold:.2f} = doubtful ({whose}):")
    for name, counts in totals.items():
        print(f"{name:14s} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
