"""The evaluation helpers the training scripts share: per-label Dice through the Lib's single
``dice`` (SpineKneeSegLib.engine.postprocessing.dice), means that skip what was not scored, and
per-key means over per-case rows. Task metrics (levels, foramina, lesions) stay in their scripts."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from SpineKneeSegLib.engine.postprocessing import dice as lib_dice


def _numpy(a):
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def dice_or(pred, truth, empty: float = float("nan")) -> float:
    """The Lib's Dice of two masks (numpy or torch); ``empty`` when both are empty (NaN: left out
    of means; 1.0: nothing missed, nothing invented)."""
    value = lib_dice(_numpy(pred), _numpy(truth))
    return empty if value is None else value


def dice_per_label(pred, truth, values: Iterable[int], empty: float = float("nan")) -> dict[int, float]:
    """Dice per label value over the whole arrays given (slices or cases pooled)."""
    pred, truth = _numpy(pred), _numpy(truth)
    return {v: dice_or(pred == v, truth == v, empty) for v in values}


def nanmean(values: Iterable[float], digits: int | None = None) -> float:
    """Mean of the values that are not NaN (None counts as NaN); NaN when none is left."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return float("nan")
    mean = float(np.mean(kept))
    return round(mean, digits) if digits is not None else mean


def write_json(path, result) -> None:
    """An evaluation's result as indented JSON, all or nothing (the Lib's atomic writer)."""
    import json
    from pathlib import Path

    from SpineKneeSegLib.core.atomic import write_text_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")


def mean_per_key(rows: Iterable[dict], keys: Iterable[str], digits: int | None = 4) -> dict[str, float]:
    """Per-key mean over per-case (or per-series) rows; a row without the key, or NaN there, does
    not count for that key."""
    rows = list(rows)
    return {k: nanmean((r.get(k, float("nan")) for r in rows), digits) for k in keys}
