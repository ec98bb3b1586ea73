"""Which way up is a radiograph's grey scale? DICOM says it (MONOCHROME1 is inverted by the reader,
a MONOCHROME2 image with PresentationLUTShape INVERSE here; the image's evidence only cross-checks);
a PNG, JPEG, TIFF or NIfTI radiograph does not, and one stored inverted (air bright, bone dark, as
JSRT is) feeds the network the opposite of what it learnt. The evidence comes from the image:

* ridges: thin dense structures (cortex, ribs, clavicles, vessels) are brighter than what surrounds
  them in the usual display, so bright ridges (Hessian at 1.4 and 2.8 mm) outweigh dark ones;
* border: the edge of the field (air beside the patient, skin) is darker than its centre.

Constant bands along the image edges (collimation, padding) and the extreme grey values of burned-in
text are left out of both. The score is ridge - border (positive: displayed as usual); within
``margin`` of zero the image is kept as stored and the report says the polarity is undecided.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.engine.hooks import input_check
from SpineKneeSegLib.engine.preprocessing import field_mask

ndimage = LazyModule("scipy.ndimage")

ANALYSIS_MM = 1.4  # the image is looked at on about this pixel size
RIDGE_SIGMAS_MM = (2.1, 4.2)
ASSUMED_FIELD_MM = 400.0


def working_pixel_mm(image: Image) -> tuple[float, bool]:
    """(pixel size in mm, assumed?): the file's, or, for a file without one, the size that makes
    the longer side a radiograph's usual field of about 40 cm."""
    spacing = float(image.spacing[0])
    if "no pixel size in the file" in str(image.meta.get("spacing_note", "")) or spacing <= 0:
        return ASSUMED_FIELD_MM / max(image.array.shape[-2:]), True
    return spacing, False


@dataclass(frozen=True)
class PolarityEvidence:
    score: float  # ridge - border; > 0: displayed as usual (bone bright)
    ridge: float
    border: float
    field_fraction: float  # share of the image left after collimation bands and text
    decision: str  # "keep" | "invert" | "undecided"

    def as_dict(self) -> dict:
        return {"score": round(self.score, 3), "ridge": round(self.ridge, 3), "border": round(self.border, 3),
                "field_fraction": round(self.field_fraction, 3), "decision": self.decision}


def polarity_evidence(array: np.ndarray, pixel_mm: float, margin: float = 0.2) -> PolarityEvidence:
    """Evidence from a 2D radiograph ``array`` (rows, columns) with square pixels of ``pixel_mm``."""
    step = max(1, int(round(ANALYSIS_MM / max(pixel_mm, 1e-3))))
    a = np.asarray(array, np.float64)[::step, ::step]
    mask = field_mask(a)
    if mask.sum() < 0.2 * mask.size:
        return PolarityEvidence(0.0, 0.0, 0.0, float(mask.mean()), "undecided")
    lo, hi = np.percentile(a[mask], (1, 99))
    a = np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1)
    # outside the field: the nearest field pixel's value (no artificial edge), and no ridge is
    # counted within two filter widths of it
    nearest = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
    a = a[tuple(nearest)]
    inner = ndimage.binary_erosion(mask, iterations=int(np.ceil(2 * max(RIDGE_SIGMAS_MM) / (pixel_mm * step))))
    ridge = 0.0
    for sigma_mm in RIDGE_SIGMAS_MM:
        s = sigma_mm / (pixel_mm * step)
        hrr = ndimage.gaussian_filter(a, s, order=(2, 0))
        hcc = ndimage.gaussian_filter(a, s, order=(0, 2))
        hrc = ndimage.gaussian_filter(a, s, order=(1, 1))
        mean, half = (hrr + hcc) / 2, np.sqrt(((hrr - hcc) / 2) ** 2 + hrc ** 2)
        l1, l2 = mean - half, mean + half  # l1 <= l2
        bright = np.clip(-l1, 0, None) * (np.abs(l2) < 0.5 * np.abs(l1)) * inner
        dark = np.clip(l2, 0, None) * (np.abs(l1) < 0.5 * np.abs(l2)) * inner
        ridge += float(np.log((bright.sum() + 1e-9) / (dark.sum() + 1e-9)))
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    h, w = r1 - r0, c1 - c0
    b = max(1, int(0.06 * min(h, w)))
    field = np.zeros_like(mask)
    field[r0:r1, c0:c1] = True
    ring = field.copy()
    ring[r0 + b:r1 - b, c0 + b:c1 - b] = False
    centre = np.zeros_like(mask)
    centre[r0 + h // 4:r1 - h // 4, c0 + w // 4:c1 - w // 4] = True
    border = float(a[ring & mask].mean() - a[centre & mask].mean())
    score = ridge - border
    decision = "keep" if score > margin else "invert" if score < -margin else "undecided"
    return PolarityEvidence(score, ridge, border, float(mask.mean()), decision)


def inverted(image: Image) -> Image:
    """The same radiograph with its grey scale turned over (within its own range)."""
    a = image.array
    out = (a.max() + a.min()) - a if np.issubdtype(a.dtype, np.floating) else (int(a.max()) + int(a.min())) - a.astype(np.int64)
    return image.with_array(out.astype(a.dtype, copy=False))


INVERT_CHOICES = ("auto", "yes", "no")


def _decide(image: Image, path, settings: dict | None, act: bool) -> Image | None:
    """--invert yes|no is done as asked; auto: a DICOM's header decides (the reader already turned
    MONOCHROME1 over), with the image's evidence as a cross-check that only warns; else the image's
    evidence when ``act``; the decision and its evidence go into the report (``checks.polarity``)."""
    choice = (settings or {}).get("invert", "auto")
    if choice not in INVERT_CHOICES:
        raise InputError(f"--invert must be one of {', '.join(INVERT_CHOICES)}, not {choice!r}", path)
    checks = image.meta.setdefault("checks", {})
    if choice != "auto":
        checks["polarity"] = f"{'inverted' if choice == 'yes' else 'kept as stored'} (--invert {choice})"
        return inverted(image) if choice == "yes" else None
    if image.meta.get("is_dicom"):
        return _decide_from_header(image)
    evidence, summary = _evidence(image)
    if evidence.decision == "invert" and act:
        checks["polarity"] = f"inverted: the image looks stored inverted (bone dark, air bright; {summary})"
        image.meta.setdefault("warnings", []).append(
            f"the radiograph looked inverted ({summary}) and was turned over; pass --invert no if it was not")
        return inverted(image)
    if evidence.decision == "invert":
        checks["polarity"] = f"kept as stored, though it looks inverted ({summary})"
        image.meta.setdefault("warnings", []).append(
            f"the radiograph looks inverted (bone dark, air bright; {summary}); if so, run again with --invert yes")
        return None
    checks["polarity"] = (f"kept as stored: {'displayed as usual' if evidence.decision == 'keep' else 'undecided'} "
                          f"({summary})")
    if evidence.decision == "undecided":
        image.meta.setdefault("warnings", []).append(
            f"the radiograph's polarity could not be told from the image ({summary}); kept as stored "
            "(bone should be bright: if it is dark, run again with --invert yes)")
    return None


def _evidence(image: Image) -> tuple[PolarityEvidence, str]:
    evidence = polarity_evidence(image.array.reshape(image.array.shape[-2:]), working_pixel_mm(image)[0])
    image.meta["polarity"] = evidence.as_dict()
    return evidence, f"score {evidence.score:+.2f} (ridges {evidence.ridge:+.2f}, border {evidence.border:+.2f})"


def _decide_from_header(image: Image) -> Image | None:
    """PhotometricInterpretation (MONOCHROME1 was turned over by the reader) and, on a MONOCHROME2
    image, PresentationLUTShape INVERSE: viewers show such an image inverted, so its stored values
    have bone dark. Then the image's evidence: a header that does not match the pixels (a converter
    that inverted the values and kept the tag) gets a warning, never a silent run."""
    photometric = image.meta.get("photometric") or "not given"
    lut = image.meta.get("presentation_lut_shape") or ""
    header_inverts = photometric == "MONOCHROME2" and lut == "INVERSE"
    result = inverted(image) if header_inverts else image
    header = f"PhotometricInterpretation {photometric}" + (f", PresentationLUTShape {lut}" if lut else "")
    evidence, summary = _evidence(result)
    done = "inverted" if header_inverts else "kept as stored"
    result.meta.setdefault("checks", {})["polarity"] = (
        f"{done}: from the DICOM header ({header}); "
        + ("the image agrees" if evidence.decision == "keep" else f"image evidence {evidence.decision} ({summary})"))
    if evidence.decision == "invert":
        result.meta.setdefault("warnings", []).append(
            f"the radiograph looks inverted (bone dark, air bright; {summary}) though {done} as its DICOM header "
            f"({header}) says; if it is, run again with --invert {'no' if header_inverts else 'yes'}")
    return result if header_inverts else None


@input_check("radiograph_polarity")
def decide_polarity(image: Image, path, settings: dict | None = None) -> Image | None:
    """Turn a radiograph stored inverted the usual way up (tasks trained on real radiographs)."""
    return _decide(image, path, settings, act=True)


@input_check("radiograph_polarity_advice")
def advise_polarity(image: Image, path, settings: dict | None = None) -> Image | None:
    """Record the evidence and warn, but act only on --invert (tasks trained on phantoms, whose
    drawn radiographs do not follow real ones' statistics: the evidence would turn 12 of 30 over)."""
    return _decide(image, path, settings, act=False)
