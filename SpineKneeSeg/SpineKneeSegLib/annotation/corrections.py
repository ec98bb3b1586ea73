"""Corrections as training labels: a segmentation a reader corrected in Slicer's Segment Editor
(any task) becomes ``<case>.seg.nrrd`` plus an entry of the training manifest, so every
correction feeds the next training run.

The written file holds one shared labelmap on the scan's exact grid, each segment painted with the
value its task card gives its name (e.g. L3 = 3), whatever layers or names-by-id the Segment
Editor left behind; segments the task does not know are reported and left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SpineKneeSegLib.annotation.training_manifest import TrainingCase, add_training_case
from SpineKneeSegLib.core.errors import InputError

MANIFEST_NAME = "training-manifest.csv"


@dataclass(frozen=True)
class SavedCorrection:
    labels: Path
    image: Path
    manifest: Path
    segments: dict[str, int]  # segment name -> voxels written
    skipped: list[str]  # segment names the task has no label for


def save_correction(segmentation_node, volume_node, case_id: str, task: str, folder, *,
                    image_path=None, manifest=None) -> SavedCorrection:
    """Write ``folder/<case_id>.seg.nrrd`` from ``segmentation_node`` on ``volume_node``'s grid and
    add (or replace) the case in ``manifest`` (default ``folder/training-manifest.csv``). The
    manifest's image is ``image_path`` when the scan is already a file, else the volume is saved
    as ``folder/<case_id>.nrrd``."""
    from SpineKneeSegLib.mrml import nodes
    from SpineKneeSegLib.tasks import get_task

    card = get_task(task)
    folder = Path(folder)
    if not case_id or any(c in case_id for c in "/\\"):
        raise InputError(f"not a usable case id: {case_id!r}")
    names = _segment_names(segmentation_node)
    known = {spec.name for spec in card.labels}
    skipped = [n for n in names if n not in known]
    if not set(names) & known:
        raise InputError(f"segmentation {segmentation_node.GetName()!r} has no segment named like a "
                         f"{task} label ({', '.join(sorted(known))}); its segments: {', '.join(names) or 'none'}")
    reference = nodes.volume_node_to_image(volume_node)
    labels = nodes.segmentation_node_to_labels(segmentation_node, reference, card.labels)
    counts = {spec.name: int(np.count_nonzero(labels == spec.value)) for spec in card.labels if spec.name in names}
    scene = segmentation_node.GetScene()
    clean = nodes.labels_to_segmentation_node(scene, reference.with_array(labels), card.labels,
                                             f"{case_id} correction", reference_volume=volume_node)
    try:
        labels_path = nodes.save_node(clean, folder / f"{case_id}.seg.nrrd")
    finally:
        scene.RemoveNode(clean)
    if image_path is None:
        image_path = nodes.save_node(volume_node, folder / f"{case_id}.nrrd")
    manifest = Path(manifest) if manifest else folder / MANIFEST_NAME
    add_training_case(manifest, TrainingCase(case_id, task, Path(image_path), labels=labels_path))
    return SavedCorrection(labels_path, Path(image_path), manifest, counts, skipped)


def _segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
