"""Find which way up a 2D image lies when its file does not say, by the task's own layout check.

A PNG, JPEG or NIfTI radiograph, or a DICOM without PatientOrientation, goes to the network as
stored. When it was stored turned or flipped, the labels fail the task's layout check (the chest's:
tasks/xray/chest.py). Then the image is run in each of the other seven layouts a 2D image can have
(three turns, four flips), and the one whose labels pass, with the highest ``upright_score`` above 0
(the chest: the heart lies toward the left lung), is kept; its labels come back onto the stored
pixels. The score is what tells a mirror from upright: the layout check alone cannot, since the
network names the lungs by their side of the image. Without a passing layout the as-stored run
stands, with the check's warning.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from SpineKneeSegLib.engine.preprocessing import Orientation

# how an image can be stored, by what np does to the upright image to store it so
STORED_AS = {
    "as stored": lambda a: a,
    "turned 90 degrees clockwise": lambda a: np.rot90(a, -1),
    "turned 180 degrees": lambda a: np.rot90(a, 2),
    "turned 90 degrees counter-clockwise": lambda a: np.rot90(a, 1),
    "mirrored left-right": lambda a: a[:, ::-1],
    "flipped upside down": lambda a: a[::-1],
    "transposed (mirrored across its main diagonal)": lambda a: a.T,
    "mirrored across its other diagonal": lambda a: np.rot90(a, 2).T,
}
_ALL_2D = [Orientation((0, r, 3 - r), (False, fr, fc)) for r in (1, 2) for fr in (False, True) for fc in (False, True)]


def how_stored(turn: Orientation) -> str:
    """How a stored image lies relative to upright, in words, when ``turn`` shows it upright."""
    upright = np.arange(6).reshape(2, 3)
    for name, store in STORED_AS.items():
        shown = turn.apply(store(upright)[None])[0]
        if shown.shape == upright.shape and np.array_equal(shown, upright):
            return name
    raise ValueError(f"not a turn of a 2D image: {turn}")


def upright_turns() -> dict[str, Orientation]:
    """name (how the image is stored) -> the turn that shows it upright."""
    return {how_stored(turn): turn for turn in _ALL_2D}


# an image's layout and its mirror both pass the layout check; when their scores are closer than
# this, which lung is which is uncertain and the warning says so. Chosen on the chest model's 148
# trained-on JSRT radiographs (the smallest margin leaving under 1 % of them run mirrored without
# it: 1 of 148; 8 flagged), then measured on the 50 held-out (Training/xray_upright.py)
MIRROR_MARGIN = 0.1


def search_upright(image, run: Callable, first, summary_key: str,
                   mirror_margin: float = MIRROR_MARGIN) -> tuple[object, dict]:
    """``first``: ``run(image)``'s (output, result) as stored, whose ``summaries[summary_key]``
    failed. Runs the other seven layouts (``run`` on ``image`` with ``meta['display_turn']``, which
    engine.preprocessing.radiograph_display follows) and returns the chosen (output, result) and the
    search's record for the report: every layout's verdict, the chosen one, and the runner-up when
    it scored within ``mirror_margin`` (``ambiguous``)."""
    tried = {"as stored": _verdict(first[1], summary_key)}
    passing = []
    for name, turn in upright_turns().items():
        if name == "as stored":
            continue
        attempt = run(image.with_array(image.array, display_turn=turn))
        verdict = tried[name] = _verdict(attempt[1], summary_key)
        if verdict["passed"] and verdict["score"] is not None and verdict["score"] > 0:
            passing.append((verdict["score"], name, attempt))
    passing.sort(key=lambda p: -p[0])
    record = {"tried": tried, "chosen": passing[0][1] if passing else "as stored"}
    if len(passing) > 1 and passing[0][0] - passing[1][0] < mirror_margin:
        record["ambiguous"] = {"runner_up": passing[1][1], "margin": mirror_margin}
    return (passing[0][2] if passing else first), record


def upright_unknown(image) -> bool:
    """A 2D image whose file does not say which way is up, and no --upright no."""
    return image.is_2d and not image.meta.get("patient_axes") and image.meta.get("display") != "as stored"


def upright_note(found: dict) -> str:
    """The report's warning when the search ran the image another way up than stored."""
    score = found["tried"][found["chosen"]]["score"]
    note = (f"the labels did not lie as on an upright image as stored, and the file does not say which way is up: "
            f"the image looks {found['chosen']} and was run upright (the layout check passes, upright score "
            f"{score:+.2f}); the labels are on the stored pixels")
    if "ambiguous" in found:
        other = found["ambiguous"]["runner_up"]
        note += (f". Run as if {other}, it scores {found['tried'][other]['score']:+.2f}, within "
                 f"{found['ambiguous']['margin']:g}: which side is the patient's right is uncertain")
    return note + ". Check the result; if the image was upright, run again with --upright no"


def _verdict(result, summary_key: str) -> dict:
    summary = result.summaries.get(summary_key, {})
    return {"passed": bool(summary.get("passed")), "score": summary.get("upright_score")}
