"""``annotate export``: foramen markers -> the seed's training targets as label maps on the scan's
exact grid: ``labels`` holds levels 1..5 (L1..L5), ``<stem>_side.nii.gz`` beside it the sides
(1 left, 2 right). Both are written together, atomically (a failure leaves neither)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from SpineKneeSegLib.annotation.foramen_labels import (
    rasterise_foramen_targets,
    read_foramen_markers,
)
from SpineKneeSegLib.core.atomic import atomic_path
from SpineKneeSegLib.core.errors import InputError

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def side_path(output) -> Path:
    """``labels.nii.gz`` -> ``labels_side.nii.gz`` (same folder, same format)."""
    output = Path(output)
    for suffix in _SUFFIXES:
        if output.name.lower().endswith(suffix):
            return output.with_name(output.name[: -len(suffix)] + "_side" + output.name[-len(suffix):])
    raise InputError(f"the label file must end in one of {', '.join(_SUFFIXES)}", output)


def export_foramen_labels(markers, image_path, output, radius_mm: float = 7.0, *,
                          include_unconfirmed: bool = False) -> dict:
    from SpineKneeSegLib.core.image_io import read_image, write_image

    if not radius_mm > 0:
        raise InputError(f"the disc radius must be positive, got {radius_mm}")
    sides_out = side_path(output)
    points = read_foramen_markers(markers, include_unconfirmed=include_unconfirmed)
    if not points:
        raise InputError("no placed, confirmed foramen points to export", markers)
    image = read_image(image_path)
    levels, sides, notes = rasterise_foramen_targets(points, image, radius_mm)
    if not levels.any():
        raise InputError(f"none of the {len(points)} points lies inside the image {image_path}: "
                         + "; ".join(notes[:3]), markers)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        level_tmp = stack.enter_context(atomic_path(output))
        side_tmp = stack.enter_context(atomic_path(sides_out))
        write_image(image.with_array(levels), level_tmp)
        write_image(image.with_array(sides), side_tmp)
    return {"labels": str(output), "sides": str(sides_out), "points": len(points),
            "foramina": sorted({p.name for p in points}),
            "voxels": {f"L{v}": int(np.count_nonzero(levels == v)) for v in range(1, 6)}, "notes": notes}
