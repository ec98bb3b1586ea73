"""What a foramen marker's confidence means: the calibrated probability that the marker lies within
``tolerance_mm`` of the true foramen of its name (right level, right side, right place).

It is a logistic model over evidence a reader can check: the level decoding's confidence (a
column named one level off moves every marker by a whole segment), the level model's probability
of the bodies the foramen sits between (or, for the foramen model, its own map's probability), how
far the marker is from its contralateral partner along the column and front to back (left and
right foramina of one segment lie level with each other), how irregular its spacing from the
neighbouring foramina of its side is, and whether it was extrapolated (L5/S1: S1 is not segmented).
The weights are fitted by ``Training/foramen_confidence.py`` on phantoms with known foramina
(the shipped level model's own runs, label perturbations and displaced markers) and checked on
phantom seeds they were not fitted on; refit as annotated cases arrive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FEATURES = ("level_confidence", "body_probability", "asymmetry_mm", "spacing_deviation", "extrapolated")


@dataclass(frozen=True)
class ConfidenceModel:
    # intercept, logit(level confidence), logit(body probability), asymmetry / 5 mm, spacing
    # deviation (relative), extrapolated (0/1): fitted by Training/foramen_confidence.py on 1,540
    # markers of 40 phantoms (even seeds fit, odd seeds held out; figures in Training/README)
    weights: tuple[float, ...] = (-1.31, 0.62, 0.09, -0.5, -2.1, -0.87)
    tolerance_mm: float = 5.0

    def probability(self, evidence: dict) -> float:
        x = design_row(evidence)
        z = float(np.dot(self.weights, x))
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


def _logit(p: float) -> float:
    p = min(max(float(p), 0.01), 0.99)
    return math.log(p / (1.0 - p))


def design_row(evidence: dict) -> np.ndarray:
    return np.array([1.0, _logit(evidence["level_confidence"]), _logit(evidence["body_probability"]),
                     evidence["asymmetry_mm"] / 5.0, evidence["spacing_deviation"], float(evidence["extrapolated"])])


def body_probabilities(decoding: dict) -> dict[int, float]:
    """Per level k: the level model's mean probability of L<k> over the body it named L<k> (0 when
    that level was not found), from ``summaries.level_decoding``."""
    out = {}
    for body in decoding.get("bodies", []):
        name = str(body.get("name", ""))
        if name[:1] == "L" and name[1:].isdigit() and body.get("found", True):
            k = int(name[1:])
            probs = body.get("level_probabilities") or []
            out[k] = float(probs[k - 1]) if len(probs) >= k else 0.0
    return out


def foramen_evidence(foramina, level_confidence: float | None = None,
                     body_probability: dict[int, float] | None = None) -> list[dict]:
    """The evidence behind each foramen (``foramina.Foramen``s of one scan, any source)."""
    points = {(f.level, f.side): np.asarray(f.ras, float) for f in foramina}
    lateral = np.array([1.0, 0.0, 0.0])  # RAS x: patient left-right
    spacing = {side: _spacing_deviation({lv: p for (lv, s), p in points.items() if s == side}) for side in ("left", "right")}
    out = []
    for f in foramina:
        here = points[(f.level, f.side)]
        partner = points.get((f.level, "right" if f.side == "left" else "left"))
        if partner is None:
            asymmetry = 0.0
        else:
            d = here - partner
            asymmetry = float(np.linalg.norm(d - np.dot(d, lateral) * lateral))
        estimated = "estimated" in f.source
        if estimated:
            flanking = [body_probability.get(k, 0.0) for k in (f.level, f.level + 1) if k <= 5] \
                if body_probability is not None else [1.0]
            body = min(flanking)
        else:  # the foramen model's own detection
            body = f.probability
        out.append({"level_confidence": 1.0 if level_confidence is None else float(level_confidence),
                    "body_probability": float(body), "asymmetry_mm": round(asymmetry, 2),
                    "spacing_deviation": round(spacing[f.side].get(f.level, 0.0), 3),
                    "extrapolated": int(estimated and f.level == 5)})
    return out


def _spacing_deviation(by_level: dict[int, np.ndarray]) -> dict[int, float]:
    """Per level: the largest relative deviation of its distances to the next foramina up and down
    the same side from the side's median distance (0 with fewer than three foramina)."""
    levels = sorted(by_level)
    if len(levels) < 3:
        return {lv: 0.0 for lv in levels}
    gaps = {(a, b): float(np.linalg.norm(by_level[a] - by_level[b])) / (b - a) for a, b in zip(levels, levels[1:])}
    median = float(np.median(list(gaps.values())))
    if median <= 0:
        return {lv: 0.0 for lv in levels}
    out = {}
    for lv in levels:
        near = [abs(g - median) / median for (a, b), g in gaps.items() if lv in (a, b)]
        out[lv] = max(near) if near else 0.0
    return out


def confidences(evidence: list[dict], model: ConfidenceModel = ConfidenceModel()) -> list[float]:
    return [round(model.probability(e), 3) for e in evidence]
