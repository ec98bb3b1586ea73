"""A finished run's output folder -> nodes in a scene, as the panel shows them.

Real MRML only (Slicer's own scene in Slicer, slicer-core's in the tests), through the MRML
adapter: the segmentation (2D outline + 3D surface, reference geometry = the input volume, so
Slicer's DICOM-SEG export works), foramen markups with their labels, the tables (lesions,
per-bone volumes, areas). Everything goes into the input's subject-hierarchy folder (its study,
for DICOM data). Loading is all or nothing: on any failure the nodes already added are removed,
so the scene is left as it was.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from SpineKneeSegLib.core.errors import InputError

LESION_CENTROID = ("centroid_r", "centroid_a", "centroid_s")


@dataclass
class LoadedResults:
    segmentation: object
    markups: list = field(default_factory=list)
    tables: dict = field(default_factory=dict)  # file name (e.g. "lesions.tsv") -> table node
    report: dict = field(default_factory=dict)
    added: list = field(default_factory=list)  # nodes this import added to the scene

    @property
    def main_table(self):
        """The table to show in the layout: lesions, else volumes, else areas."""
        for name in ("lesions.tsv", "volumes.tsv", "areas.tsv"):
            if name in self.tables:
                return self.tables[name]
        return next(iter(self.tables.values()), None)


def load_results(scene, output_dir, reference_volume, task: str = "", segmentation_node=None) -> LoadedResults:
    """Load ``output_dir`` (a finished CLI run) into ``scene``.

    ``segmentation_node``: an existing segmentation to write into (segments of the same names
    are replaced, others kept); None creates a new one named after the input and task."""
    from SpineKneeSegLib.mrml import nodes

    output_dir = Path(output_dir)
    report_path = output_dir / "report.json"
    if not report_path.is_file():
        raise InputError("no report.json: the run did not finish", output_dir)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    outputs = report.get("outputs", [])
    task = task or report.get("task", "")
    results = LoadedResults(None, report=report)
    try:
        loaded = nodes.load_segmentation(scene, output_dir / "segmentation.seg.nrrd")
        results.added.append(loaded)
        if segmentation_node is not None:
            _replace_segments(segmentation_node, loaded)
            remove_nodes(scene, [loaded])
            results.added.remove(loaded)
            results.segmentation = segmentation_node
        else:
            loaded.SetName(scene.GenerateUniqueName(f"{reference_volume.GetName()} {task}".strip()))
            results.segmentation = loaded
        show_segmentation(results.segmentation, reference_volume)
        for name in outputs:
            path = output_dir / name
            if name.endswith(".mrk.json"):
                node = nodes.load_markups(scene, path)
                results.added.append(node)
                display = node.GetDisplayNode()
                if display is not None:
                    display.SetPointLabelsVisibility(True)
                results.markups.append(node)
            elif name.endswith(".tsv") and not name.endswith(".schema.tsv"):
                node = nodes.load_table(scene, path)
                results.added.append(node)
                node.SetName(scene.GenerateUniqueName(f"{reference_volume.GetName()} {Path(name).stem}"))
                node.SetLocked(True)  # a result: edits would silently disagree with the segmentation
                results.tables[name] = node
        place_in_study(scene, reference_volume, [results.segmentation, *results.markups, *results.tables.values()])
    except BaseException:
        remove_nodes(scene, results.added)
        raise
    return results


def remove_nodes(scene, nodes) -> None:
    """Remove ``nodes`` with their display and storage nodes (the scene does not remove those)."""
    for node in nodes:
        if node.GetScene() is None:
            continue
        companions = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if hasattr(node, "GetNumberOfDisplayNodes") else []
        companions += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())] \
            if hasattr(node, "GetNumberOfStorageNodes") else []
        scene.RemoveNode(node)
        for companion in companions:
            if companion is not None and companion.GetScene() is not None:
                scene.RemoveNode(companion)


def _replace_segments(target, source) -> None:
    """Copy every segment of ``source`` into ``target``, replacing segments of the same name."""
    into, origin = target.GetSegmentation(), source.GetSegmentation()
    for i in range(origin.GetNumberOfSegments()):
        segment_id = origin.GetNthSegmentID(i)
        name = origin.GetSegment(segment_id).GetName()
        existing = into.GetSegmentIdBySegmentName(name)
        if existing:
            into.RemoveSegment(existing)
        if not into.CopySegmentFromSegmentation(origin, segment_id, False):
            raise InputError(f"segment {name!r} could not be copied into {target.GetName()!r}")


def show_segmentation(node, reference_volume) -> None:
    """Reference geometry = the input (DICOM-SEG export needs it), 2D outline, 3D surface."""
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DOutline(True)
    display.SetVisibility2DFill(True)
    display.SetVisibility3D(True)
    node.CreateClosedSurfaceRepresentation()


def place_in_study(scene, reference_volume, nodes) -> int:
    """Put ``nodes`` in the subject-hierarchy folder of ``reference_volume`` (its study when it
    came from DICOM). Returns that folder's item id."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = sh.GetItemByDataNode(reference_volume)
    parent = sh.GetItemParent(volume_item) if volume_item else sh.GetSceneItemID()
    for node in nodes:
        # Slicer's subject-hierarchy plugins add an item for every new node; headless nobody does
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)
    return parent


def jump_target(table_node, row: int):
    """RAS of a table row's lesion centroid (the panel jumps the slice views there), or None when
    the table has no centroid columns or the row does not exist."""
    table = table_node.GetTable()
    if not 0 <= row < table.GetNumberOfRows():
        return None
    columns = [table.GetColumnByName(name) for name in LESION_CENTROID]
    if any(c is None for c in columns):
        return None
    ras = tuple(float(c.GetVariantValue(row).ToDouble()) for c in columns)
    return ras if all(math.isfinite(v) for v in ras) else None


def input_paths(volume_nodes, folder, file_for_instance=None) -> list[str]:
    """What the CLI reads for each input volume, staged in ``folder``: the volume's own DICOM
    files when it was loaded from Slicer's DICOM database (``DICOM.instanceUIDs`` attribute and
    ``file_for_instance`` = ``slicer.dicomDatabase.fileForInstance``) -- copied into
    ``input<i>/`` so the CLI reads exactly that series and also writes a DICOM-SEG -- else the
    volume written as ``input<i>.nrrd``."""
    import shutil

    from SpineKneeSegLib.mrml import nodes

    folder = Path(folder)
    paths = []
    for i, node in enumerate(volume_nodes):
        files = dicom_source_files(node, file_for_instance) if file_for_instance else None
        if files:
            series = folder / f"input{i}"
            series.mkdir(parents=True, exist_ok=True)
            for n, path in enumerate(files):
                shutil.copyfile(path, series / f"{n:05d}.dcm")
            paths.append(str(series))
        else:
            paths.append(str(nodes.save_node(node, folder / f"input{i}.nrrd")))
    return paths


def dicom_source_files(node, file_for_instance) -> list[str] | None:
    """The DICOM files a volume node was loaded from, or None (not from DICOM, or a file gone)."""
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    files = [file_for_instance(uid) for uid in uids]
    if not files or not all(f and Path(f).is_file() for f in files):
        return None
    return files
