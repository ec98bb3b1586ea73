"""Lesion segmentation metrics: seed 002's and the WMH-2017 challenge's (report both).

Seed 002: voxel Dice, recall, precision, F-beta (beta 3), and lesion counts per size bracket where
a lesion counts as detected when more than 60 % of its voxels are found. WMH-2017: Dice, HD95 in
mm (the larger of the two directed 95th percentiles), absolute volume difference %, lesion recall
and lesion F1 with 26-connected lesions detected on any overlap.
"""
from __future__ import annotations

import numpy as np
from evalhelpers import dice_or
from scipy import ndimage
from SpineKneeSegLib.tasks.brain.lesions import BRACKETS, bracket_name, label_lesions  # noqa: E402


def voxel_metrics(pred: np.ndarray, truth: np.ndarray, beta: float = 3.0) -> dict:
    pred, truth = pred > 0, truth > 0
    tp = float(np.logical_and(pred, truth).sum())
    fp, fn = float(pred.sum()) - tp, float(truth.sum()) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    b2 = beta * beta
    f_beta = (1 + b2) * precision * recall / (b2 * precision + recall) if precision + recall else 0.0
    dice = dice_or(pred, truth, empty=1.0)
    return {"dice": dice, "precision": precision, "recall": recall, f"f{beta:g}": f_beta}


def lesion_detection_by_bracket(pred: np.ndarray, truth: np.ndarray, found_fraction: float = 0.6,
                                connectivity: int = 26) -> dict:
    """Seed 002: per size bracket, how many true lesions have > ``found_fraction`` of voxels found
    ("detected"); and, WMH-2017's rule, how many any prediction touches ("any_overlap")."""
    comp, n = label_lesions(truth, connectivity)
    out = {bracket_name(lo): {"lesions": 0, "detected": 0, "any_overlap": 0} for lo, _ in BRACKETS}
    if n:
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        hits = np.bincount(comp[pred > 0].ravel(), minlength=n + 1)[1:]
        for size, hit in zip(sizes, hits):
            row = out[bracket_name(int(size))]
            row["lesions"] += 1
            row["detected"] += int(hit > found_fraction * size)
            row["any_overlap"] += int(hit > 0)
    return out


def hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing_kji) -> float:
    """Larger of the two directed 95th-percentile surface distances (WMH-2017), in mm; 2D masks
    (a radiograph) with a 2D ``spacing_kji``."""
    pred, truth = pred > 0, truth > 0
    if not pred.any() or not truth.any():
        return float("inf")

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1))

    sp, st = surface(pred), surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing_kji)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing_kji)
    return float(max(np.percentile(to_truth[sp], 95), np.percentile(to_pred[st], 95)))


def wmh2017_metrics(pred: np.ndarray, truth: np.ndarray, spacing_kji) -> dict:
    pred, truth = pred > 0, truth > 0
    pc, pn = label_lesions(pred, 26)
    tc, tn = label_lesions(truth, 26)
    detected_true = len(np.unique(tc[pred & (tc > 0)]))  # true lesions touched by the prediction
    true_pred = len(np.unique(pc[truth & (pc > 0)]))  # predicted lesions touching a true lesion
    recall = detected_true / tn if tn else 1.0
    precision = true_pred / pn if pn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    volume_t, volume_p = float(truth.sum()), float(pred.sum())
    return {"dice": voxel_metrics(pred, truth)["dice"], "hd95_mm": hd95_mm(pred, truth, spacing_kji),
            "avd_percent": 100.0 * abs(volume_p - volume_t) / volume_t if volume_t else float("inf"),
            "lesion_recall": recall, "lesion_f1": f1, "true_lesions": int(tn), "predicted_lesions": int(pn)}


def all_metrics(pred: np.ndarray, truth: np.ndarray, spacing_kji) -> dict:
    return {"seed002": {**voxel_metrics(pred, truth), "brackets": lesion_detection_by_bracket(pred, truth)},
            "wmh2017": wmh2017_metrics(pred, truth, spacing_kji)}
