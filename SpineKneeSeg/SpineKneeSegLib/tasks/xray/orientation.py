"""Which way up does a radiograph go to the network? Every X-ray model learnt radiographs in the
display convention: head up, patient right on the image's left (PatientOrientation L\\F). A DICOM
radiograph says how its pixels lie (PatientOrientation, or ImageOrientationPatient): a plate read
turned, or a mirrored image, says F\\R or R\\F. Before, such an image went to the network as
stored: the chest model gave lungs and a heart that looked like nothing, and on a mirror it named
the patient's left lung "right". Now the image is shown upright by an exact turn and/or flip
(engine.preprocessing.radiograph_display), and the labels come back onto the stored pixels.

A PNG, JPEG, TIFF or NIfTI radiograph states nothing: it is shown as stored (upright assumed), and
the chest's layout check finds it when it is not, and the chest is then run the way up its layout
check and the heart's side choose (engine/upright.py). ``--upright no`` shows every image as stored
(the seeds' way).
"""
from __future__ import annotations

import numpy as np

from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.engine.hooks import input_check
from SpineKneeSegLib.engine.preprocessing import radiograph_display
from SpineKneeSegLib.engine.upright import how_stored

UPRIGHT_CHOICES = ("auto", "no")
CONVENTION = "head up, patient right on the image's left"

@input_check("radiograph_orientation")
def radiograph_orientation(image: Image, path, settings: dict | None = None) -> Image | None:
    """Record (``checks.orientation``) how the radiograph goes to the network, and warn where the
    file says it is not a frontal view. ``settings['upright']``: 'auto' (the file's stated
    directions, when it states them) or 'no' (as stored)."""
    choice = (settings or {}).get("upright", "auto")
    if choice not in UPRIGHT_CHOICES:
        raise InputError(f"--upright must be one of {', '.join(UPRIGHT_CHOICES)}, not {choice!r}", path)
    checks = image.meta.setdefault("checks", {})
    stated = image.meta.get("patient_axes")
    if choice == "no":
        image.meta["display"] = "as stored"
        checks["orientation"] = "shown to the network as stored (--upright no)"
        return None
    if not stated:
        checks["orientation"] = ("shown to the network as stored: the file does not say which way is up "
                                 f"({CONVENTION} assumed; a task with a layout check searches the other ways "
                                 "when its labels fail it: summaries.upright_search)")
        return None
    turn = radiograph_display(image)
    if turn is None:
        beam = int(np.argmax(np.abs(image.direction[:, 2])))  # the axis the image plane faces: 1 (A-P) is frontal
        checks["orientation"] = f"shown to the network as stored: {stated} is not a frontal view"
        if beam == 0:  # an image axis runs front to back: a lateral (a plane facing up is a default, not a view)
            image.meta.setdefault("warnings", []).append(
                f"the file's {stated} says this is a lateral view (an image axis runs front to back); the X-ray "
                "models were trained on frontal (AP/PA) radiographs: check the result")
        return None
    stored = how_stored(turn)
    checks["orientation"] = (f"upright as stored ({stated})" if stored == "as stored" else
                             f"{stated}: stored {stored}, shown to the network upright ({CONVENTION}); the labels are "
                             "on the stored pixels")
    return None
