"""Is this FLAIR skull-stripped? The brain-wmh model was trained on brain-only FLAIR; scalp fat
and marrow are bright on FLAIR and become false lesions, so an unstripped head is refused.

Brain-extraction tools (BET, HD-BET, SynthStrip, ROBEX) set everything outside the brain to one
value, and what is left is a brain: about 1-1.9 L, at most ~170 cm2 in an axial section. An
unstripped head has noisy air (few voxels at one value) or, when the air was zeroed, a head:
3-5 L, 190-260 cm2 at the level of the ventricles. Three measurements decide, each with its reason.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.engine.hooks import input_check
from SpineKneeSegLib.engine.preprocessing import slice_axis

# A skull-stripped image: >= 20 % of voxels at the background value, <= 2.2 L left, and no axial
# section > 185 cm2 (open-ms brains, MNI-scaled: 1.10-1.14 L, 146-155 cm2 at most).
STRIP_LIMITS = {"min_background_fraction": 0.2, "max_foreground_ml": 2200.0, "max_axial_cm2": 185.0}


@dataclass(frozen=True)
class StripEvidence:
    background_value: float
    background_fraction: float
    foreground_ml: float
    max_axial_cm2: float
    stripped: bool
    reason: str

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def background_mask(array: np.ndarray) -> tuple[float, np.ndarray]:
    """The background value (0 or the minimum, whichever more voxels hold) and the voxels at it,
    within 1e-4 of the intensity range (float images resampled after stripping)."""
    lo = float(array.min())
    tol = np.float32(1e-4 * (float(array.max()) - lo))
    best = None
    for value in (lo, 0.0) if lo < 0 else (lo,):
        mask = (array >= np.float32(value) - tol) & (array <= np.float32(value) + tol)
        count = int(np.count_nonzero(mask))
        if best is None or count > best[0]:
            best = (count, value, mask)
    return best[1], best[2]


def assess_skull_stripping(image: Image, limits: dict | None = None) -> StripEvidence:
    limits = {**STRIP_LIMITS, **(limits or {})}
    value, background = background_mask(image.array)
    foreground = ~background
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    axis = slice_axis(image, "axial")
    pixel_cm2 = float(np.prod([s for i, s in enumerate(image.spacing[::-1]) if i != axis])) / 100.0
    per_slice = np.count_nonzero(np.moveaxis(foreground, axis, 0).reshape(foreground.shape[axis], -1), axis=1)
    n_foreground = int(per_slice.sum())
    fraction = 1.0 - n_foreground / foreground.size
    volume_ml = n_foreground * voxel_ml
    max_cm2 = float(per_slice.max()) * pixel_cm2
    reasons = []
    if fraction < limits["min_background_fraction"]:
        reasons.append(f"only {100 * fraction:.1f} % of voxels share one background value (a stripped image has "
                       f">= {100 * limits['min_background_fraction']:.0f} %: air here is noise, not a mask)")
    if volume_ml > limits["max_foreground_ml"]:
        reasons.append(f"{volume_ml / 1000:.2f} L lies outside the background (a brain is <= "
                       f"{limits['max_foreground_ml'] / 1000:.1f} L)")
    if max_cm2 > limits["max_axial_cm2"]:
        reasons.append(f"the largest axial section is {max_cm2:.0f} cm2 (a brain's is <= "
                       f"{limits['max_axial_cm2']:.0f} cm2; a head's with scalp is larger)")
    return StripEvidence(value, fraction, volume_ml, max_cm2, not reasons, "; ".join(reasons))


@input_check("skull_stripped")
def check_skull_stripped(image: Image, path, settings: dict | None = None) -> None:
    """Refuse a head that is not brain-only (waived by ``--skull-stripped yes``)."""
    evidence = assess_skull_stripping(image)
    if not evidence.stripped:
        raise InputError(f"does not look skull-stripped: {evidence.reason}. Skull-strip it first (e.g. SynthStrip or "
                         "HD-BET), or pass --skull-stripped yes if it is brain-only", path)
    image.meta["skull_stripping"] = evidence.as_dict()
