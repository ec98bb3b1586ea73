"""MRML adapter: Image / label arrays / points / rows <-> Slicer nodes, and node files.

Used by the Slicer widget and by the headless CLI alike; imports ``slicer`` and ``vtk`` only
(never qt/ctk). Geometry follows Slicer: nodes carry IJKToRAS, ``Image`` carries ITK/LPS geometry,
and ``Image.ijk_to_ras`` / ``Image.from_ijk_to_ras`` are the only bridges between them.
Parent transforms are ignored (as Slicer's own writers do): harden them first.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from SpineKneeSegLib.core.errors import InputError, SpineKneeSegError
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.labels import Code, LabelSpec, present_labels
from SpineKneeSegLib.core.tables import ColumnSpec
from SpineKneeSegLib.mrml.harness import (
    HeadlessSlicer,
    context_for_scene,
    create_headless_slicer,
    is_real_slicer,
    require_slicer,
)

slicer = require_slicer()  # clear ImportError (how to install slicer-core) when it is missing
import slicer.util  # noqa: E402, F811  (after the check above; binds the submodule)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

# Our own terminology contexts (slicer-core ships none of Slicer's JSON files, and Slicer's lists
# need not hold every code we use): registered with the Terminologies logic, headless or in Slicer.
TERMINOLOGY_CONTEXT = "Segmentation category and type - SpineKneeSeg"
REGION_CONTEXT = "Anatomic codes - SpineKneeSeg"
POINT_ATTRIBUTES = "SpineKneeSeg.pointAttributes"  # node attribute: JSON {control point id: {k: v}}

_TERMINOLOGY = slicer.vtkSlicerTerminologiesModuleLogic
_LABELMAP = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()

# What save_node writes, by node class (checked in order: label maps are volumes too).
_WRITE_SUFFIXES = (
    ("vtkMRMLSegmentationNode", (".seg.nrrd", ".nrrd")),
    ("vtkMRMLVolumeNode", (".nrrd", ".nii.gz", ".nii", ".mha")),
    ("vtkMRMLMarkupsNode", (".mrk.json",)),
    ("vtkMRMLTableNode", (".tsv", ".csv")),
)


# ---- volumes -------------------------------------------------------------------------------
def image_to_volume_node(scene, image: Image, name: str):
    """A new vtkMRMLScalarVolumeNode with the image's voxels and exact physical geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(image.ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, _vtk_compatible(image.array))
    node.CreateDefaultDisplayNodes()
    return node


def volume_node_to_image(node) -> Image:
    """Voxels (copied, ``array[k, j, i]``) and geometry of a scalar volume node."""
    if node.GetImageData() is None:
        raise InputError(f"volume node {node.GetName()!r} has no voxels")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    array = slicer.util.arrayFromVolume(node).copy()
    return Image.from_ijk_to_ras(array, slicer.util.arrayFromVTKMatrix(matrix), {"name": node.GetName()})


def _vtk_compatible(array: np.ndarray) -> np.ndarray:
    """VTK has no bool, and Slicer refuses 64-bit integers ("long long"): narrow them."""
    array = np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError("64-bit integer voxels outside the int32 range cannot go into a volume node")
        return array.astype(np.int32)
    return array


def _oriented_image(array: np.ndarray | None, ijk_to_ras: np.ndarray, shape_kji) -> "slicer.vtkOrientedImageData":
    """vtkOrientedImageData with the given IJKToRAS geometry; voxels from ``array`` if given."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*reversed(tuple(int(n) for n in shape_kji)))
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    if array is not None:
        # VTK's x (i) runs fastest, as in a C-ordered array[k, j, i]
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    return image


# ---- segmentations -------------------------------------------------------------------------
def labels_to_segmentation_node(scene, label_image: Image, labels: Sequence[LabelSpec], name: str,
                                reference_volume=None, layers: Sequence[tuple[Image, Sequence[LabelSpec]]] = ()):
    """A segmentation node with one segment per LabelSpec (id ``spec.segment_id``, name, colour,
    terminology), all sharing one labelmap: a label absent from the array still gets its (empty)
    segment, so segment names do not depend on what was found. ``layers``: further label maps on
    the same grid whose segments may overlap the first's (e.g. clavicles over the lungs), each a
    labelmap layer of its own."""
    labels = list(labels)
    values = _check_label_values(label_image.array, labels)
    extra = [(_check_label_values(image.array, list(specs)), list(specs)) for image, specs in layers]
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    segmentation.SetSourceRepresentationName(_LABELMAP)
    shared = _oriented_image(values, label_image.ijk_to_ras, label_image.array.shape)
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    else:
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(shared))
    register_terminology(scene, labels + [spec for _, specs in extra for spec in specs])
    for spec in labels:
        segmentation.AddSegment(_segment(spec, shared), spec.segment_id)
    for layer_values, specs in extra:
        layer = _oriented_image(layer_values, label_image.ijk_to_ras, label_image.array.shape)
        for spec in specs:
            segmentation.AddSegment(_segment(spec, layer), spec.segment_id)
    return node


def _check_label_values(array: np.ndarray, labels: Sequence[LabelSpec]) -> np.ndarray:
    known = {spec.value for spec in labels}
    if len(known) != len(labels) or not all(0 < v < 256 for v in known):
        raise ValueError("label values must be distinct and within 1..255")
    array = np.asarray(array)
    if array.dtype == np.uint8 and known == set(range(1, len(known) + 1)) and int(array.max()) <= len(known):
        return array  # values 1..N known: the maximum says all are (the knee's 21 M voxels: 5 passes -> 1)
    present = set(present_labels(array))
    unknown = sorted(present - known)
    if unknown:
        raise ValueError(f"label values {unknown} have no LabelSpec")
    return np.asarray(array, dtype=np.uint8)


def _segment(spec: LabelSpec, shared_labelmap) -> "slicer.vtkSegment":
    segment = slicer.vtkSegment()
    segment.SetName(spec.name)
    segment.SetNameAutoGenerated(False)  # else Slicer may rename it from the terminology
    segment.SetColor(*spec.color)
    segment.SetColorAutoGenerated(False)
    segment.SetLabelValue(spec.value)
    segment.AddRepresentation(_LABELMAP, shared_labelmap)
    entry = terminology_entry(spec)
    if entry:
        segment.SetTerminology(entry)
    return segment


def segmentation_node_to_labels(node, reference_image: Image, labels: Sequence[LabelSpec]) -> np.ndarray:
    """uint8 label array on ``reference_image``'s grid, each segment painted with the value of
    the LabelSpec of the same name (or segment id); segments no LabelSpec names are skipped.
    Resampling is nearest-neighbour in physical space, so any grid (e.g. a left-handed one stored
    with reordered slices) maps correctly."""
    by_name = {spec.name: spec.value for spec in labels}
    by_name.update({spec.segment_id: spec.value for spec in labels if spec.segment_id not in by_name})
    segmentation = node.GetSegmentation()
    if not segmentation.ContainsRepresentation(_LABELMAP) and not segmentation.CreateRepresentation(_LABELMAP):
        raise InputError(f"segmentation {node.GetName()!r} cannot be converted to a labelmap")
    reference = _oriented_image(None, reference_image.ijk_to_ras, reference_image.array.shape)
    out = np.zeros(reference_image.array.shape, np.uint8)
    for layer in range(segmentation.GetNumberOfLayers()):
        layer_values = _resampled_layer(segmentation.GetLayerDataObject(layer), reference)
        if layer_values is None:
            continue
        for segment_id in segmentation.GetSegmentIDsForLayer(layer):
            segment = segmentation.GetSegment(segment_id)
            value = by_name.get(segment.GetName(), by_name.get(segment_id))
            if value is not None:
                out[layer_values == segment.GetLabelValue()] = value
    return out


def _resampled_layer(layer, reference) -> np.ndarray | None:
    if layer is None or layer.IsEmpty() or layer.GetPointData().GetScalars() is None:
        return None
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            layer, reference, resampled):
        raise SpineKneeSegError("resampling a segmentation layer onto the reference grid failed")
    dims = resampled.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0])


# ---- terminology -------------------------------------------------------------------------
def terminology_entry(spec: LabelSpec) -> str:
    """Slicer's segment "TerminologyEntry" tag for a LabelSpec ('' without codes).

    Seven '~'-separated fields, codes as scheme^value^meaning:
    context~category~type~typeModifier~regionContext~region~regionModifier
    """
    if spec.category is None or spec.type is None:
        return ""
    category, kind, region, modifier = spec.category, spec.type, spec.region, spec.modifier
    return _TERMINOLOGY.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT,
        category.value, category.scheme, category.meaning,
        kind.value, kind.scheme, kind.meaning,
        modifier.value if modifier else "", modifier.scheme if modifier else "", modifier.meaning if modifier else "",
        REGION_CONTEXT if region else "",
        region.value if region else "", region.scheme if region else "", region.meaning if region else "",
        "", "", "")


def terminology_codes(entry: str) -> dict[str, Code | None]:
    """Parse a TerminologyEntry tag: {"context", "category", "type", "region"} (Codes or None)."""
    parsed = slicer.vtkSlicerTerminologyEntry()
    if not entry or not _TERMINOLOGY.DeserializeTerminologyEntry(entry, parsed):
        return {"context": None, "category": None, "type": None, "modifier": None, "region": None}
    return {"context": parsed.GetTerminologyContextName(),
            "category": _code(parsed.GetCategoryObject()),
            "type": _code(parsed.GetTypeObject()),
            "modifier": _code(parsed.GetTypeModifierObject()),
            "region": _code(parsed.GetRegionObject())}


def _code(coded) -> Code | None:
    if coded is None or not coded.GetCodeValue():
        return None
    return Code(coded.GetCodingSchemeDesignator(), coded.GetCodeValue(), coded.GetCodeMeaning())


def register_terminology(scene, labels: Sequence[LabelSpec] = ()) -> bool:
    """Load our terminology contexts (every project label plus ``labels``) into the Terminologies
    logic of ``scene``'s application, once, so Slicer's terminology selector and look-ups know
    our codes. Returns False when no Terminologies logic is reachable (tags are still written)."""
    try:
        logic = context_for_scene(scene).terminologies
    except (ValueError, KeyError, AttributeError):
        return False
    specs = [s for s in (*_project_labels(), *labels) if s.category is not None and s.type is not None]
    if _terminology_knows(logic, specs):
        return True
    with tempfile.TemporaryDirectory(prefix="spinekneeseg-terms-") as folder:
        types_file = Path(folder) / "SpineKneeSeg.term.json"
        types_file.write_text(json.dumps(_types_context(specs), indent=1), encoding="utf-8")
        if logic.LoadTerminologyFromFile(str(types_file)) != TERMINOLOGY_CONTEXT:
            raise SpineKneeSegError("Slicer's Terminologies logic refused our terminology file")
        regions = _regions_context(specs)
        if regions["AnatomicCodes"]["AnatomicRegion"]:
            regions_file = Path(folder) / "SpineKneeSeg-regions.term.json"
            regions_file.write_text(json.dumps(regions, indent=1), encoding="utf-8")
            logic.LoadRegionContextFromFile(str(regions_file))
    return True


def _project_labels() -> list[LabelSpec]:
    from SpineKneeSegLib.core import labels as labels_module

    return [spec for key, value in vars(labels_module).items() if key.endswith("_LABELS") for spec in value]


def _terminology_knows(logic, specs: Sequence[LabelSpec]) -> bool:
    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    if TERMINOLOGY_CONTEXT not in {names.GetValue(i) for i in range(names.GetNumberOfValues())}:
        return False
    found = slicer.vtkSlicerTerminologyEntry()
    return all(logic.FindTypeInTerminologyBy3dSlicerLabel(TERMINOLOGY_CONTEXT, _slicer_label(s), found)
               and found.GetTypeObject().GetCodeValue() == s.type.value for s in specs)


def _slicer_label(spec: LabelSpec) -> str:
    return f"{spec.type.meaning} ({spec.type.value})"  # unique per code, unlike our short names


def _code_json(code: Code) -> dict:
    return {"CodingSchemeDesignator": code.scheme, "CodeValue": code.value, "CodeMeaning": code.meaning}


def _types_context(specs: Sequence[LabelSpec]) -> dict:
    """A segment-context JSON (dcmqi schema, as Slicer's .term.json files) for our labels."""
    categories: dict[Code, dict] = {}
    for spec in specs:
        category = categories.setdefault(spec.category, {**_code_json(spec.category), "showAnatomy": True,
                                                         "Type": []})
        if all(t["CodeValue"] != spec.type.value for t in category["Type"]):
            category["Type"].append({**_code_json(spec.type), "3dSlicerLabel": _slicer_label(spec),
                                     "recommendedDisplayRGBValue": [round(c * 255) for c in spec.color]})
        if spec.modifier is not None:  # laterality: one type, its right and left modifiers
            kind = next(t for t in category["Type"] if t["CodeValue"] == spec.type.value)
            modifiers = kind.setdefault("Modifier", [])
            if all(m["CodeValue"] != spec.modifier.value for m in modifiers):
                modifiers.append({**_code_json(spec.modifier), "3dSlicerLabel": spec.name,
                                  "recommendedDisplayRGBValue": [round(c * 255) for c in spec.color]})
    return {"SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT,
            "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#",
            "SegmentationCodes": {"Category": list(categories.values())}}


def _regions_context(specs: Sequence[LabelSpec]) -> dict:
    regions = {spec.region: _code_json(spec.region) for spec in specs if spec.region is not None}
    return {"AnatomicContextName": REGION_CONTEXT,
            "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/anatomic-context-schema.json#",
            "AnatomicCodes": {"AnatomicRegion": list(regions.values())}}


# ---- markups -----------------------------------------------------------------------------
_MARKUPS = slicer.vtkMRMLMarkupsNode
_POSITION_STATUS = {_MARKUPS.PositionDefined: "defined", _MARKUPS.PositionPreview: "preview",
                    _MARKUPS.PositionMissing: "missing", _MARKUPS.PositionUndefined: "undefined"}


def points_to_markups_node(scene, points_ras, labels: Sequence[str], descriptions: Sequence[str] | None = None,
                           name: str = "points", attributes=None):
    """A point list, one control point per label (e.g. "L3 right"), in RAS millimetres.

    A point given as None (or with a NaN) is added as *missing*: its label stays in the list.
    ``attributes``: a dict (node attributes), or one dict per point (kept in the node attribute
    ``POINT_ATTRIBUTES``). Slicer writes node attributes to .mrb scenes, not to .mrk.json files;
    descriptions are what a .mrk.json keeps per point.
    """
    points = list(points_ras)
    labels = list(labels)
    if len(points) != len(labels) or (descriptions is not None and len(descriptions) != len(labels)):
        raise ValueError("points_ras, labels and descriptions must have the same length")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    was_modifying = node.StartModify()
    for i, (point, label) in enumerate(zip(points, labels)):
        index = _add_point(node, point, label)
        if descriptions is not None and descriptions[i]:
            node.SetNthControlPointDescription(index, str(descriptions[i]))
    node.EndModify(was_modifying)
    _set_attributes(node, attributes)
    return node


def _add_point(node, point, label: str) -> int:
    xyz = None if point is None else np.asarray(point, dtype=float).reshape(3)
    if xyz is None or not np.all(np.isfinite(xyz)):
        index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), str(label))
        node.SetNthControlPointPositionMissing(index)
        return index
    return node.AddControlPoint(vtk.vtkVector3d(*xyz), str(label))


def _set_attributes(node, attributes) -> None:
    if not attributes:
        return
    if isinstance(attributes, dict):
        for key, value in attributes.items():
            node.SetAttribute(str(key), str(value))
        return
    attributes = list(attributes)
    if len(attributes) != node.GetNumberOfControlPoints():
        raise ValueError("per-point attributes need one dict per point")
    per_point = {node.GetNthControlPointID(i): {str(k): str(v) for k, v in (a or {}).items()}
                 for i, a in enumerate(attributes)}
    node.SetAttribute(POINT_ATTRIBUTES, json.dumps(per_point))


def markups_node_to_points(node) -> list[dict]:
    """One dict per control point: label, description, ras (None when missing), status
    ("defined", "preview", "missing" or "undefined"), id and per-point attributes."""
    per_point = json.loads(node.GetAttribute(POINT_ATTRIBUTES) or "{}")
    points = []
    for i in range(node.GetNumberOfControlPoints()):
        status = _POSITION_STATUS.get(node.GetNthControlPointPositionStatus(i), "undefined")
        point_id = node.GetNthControlPointID(i)
        points.append({
            "label": node.GetNthControlPointLabel(i),
            "description": node.GetNthControlPointDescription(i),
            "ras": tuple(node.GetNthControlPointPositionVector(i)) if status != "missing" else None,
            "status": status,
            "id": point_id,
            "attributes": per_point.get(point_id, {}),
        })
    return points


# ---- tables ------------------------------------------------------------------------------
_ARRAY_CLASS = {"int": vtk.vtkIntArray, "float": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}
_VTK_TYPE = {"int": vtk.VTK_INT, "float": vtk.VTK_DOUBLE, "string": vtk.VTK_STRING}


def rows_to_table_node(scene, rows: Sequence[dict], columns: Sequence[ColumnSpec], name: str):
    """A table node with one typed vtk array per ColumnSpec and its type, unit and description
    as column properties (written to ``<name>.schema.tsv`` beside the .tsv)."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    for column in columns:
        table.AddColumn(_column_array(column, rows))
    for column in columns:
        node.SetColumnType(column.name, _VTK_TYPE[column.type])  # the "type" column property
        if column.unit:
            node.SetColumnUnitLabel(column.name, column.unit)
        if column.description:
            node.SetColumnDescription(column.name, column.description)
    node.Modified()
    return node


def _column_array(column: ColumnSpec, rows: Sequence[dict]):
    array = _ARRAY_CLASS[column.type]()
    array.SetName(column.name)
    for i, row in enumerate(rows):
        array.InsertNextValue(_cell(column, row.get(column.name), i))
    return array


def _cell(column: ColumnSpec, value, row: int):
    if column.type == "string":
        return "" if value is None else str(value)
    if column.type == "float":
        return float("nan") if value is None else float(value)
    if value is None:
        raise ValueError(f"column {column.name!r}, row {row}: an int column cannot hold a missing value")
    return int(value)


def table_node_to_rows(node, columns: Sequence[str] | None = None) -> list[dict]:
    """Rows as dicts, columns read by name (a reloaded table may list them in another order);
    values are Python int / float / str by column array type."""
    table = node.GetTable()
    names = list(columns) if columns is not None else [node.GetColumnName(i) for i in range(node.GetNumberOfColumns())]
    values = {}
    for name in names:
        array = table.GetColumnByName(name)
        if array is None:
            raise KeyError(f"table {node.GetName()!r} has no column {name!r}")
        values[name] = _column_values(array)
    return [{name: values[name][i] for name in names} for i in range(table.GetNumberOfRows())]


def table_node_columns(node) -> list[ColumnSpec]:
    """The ColumnSpecs of a table node (type from its arrays, unit and description properties)."""
    table = node.GetTable()
    specs = []
    for i in range(node.GetNumberOfColumns()):
        name = node.GetColumnName(i)
        specs.append(ColumnSpec(name, _column_type(table.GetColumnByName(name)),
                                node.GetColumnUnitLabel(name) or "", node.GetColumnDescription(name) or ""))
    return specs


def _column_type(array) -> str:
    if isinstance(array, vtk.vtkStringArray):
        return "string"
    if array.GetDataType() in (vtk.VTK_FLOAT, vtk.VTK_DOUBLE):
        return "float"
    return "int"


def _column_values(array) -> list:
    kind = _column_type(array)
    if kind == "string":
        return [array.GetValue(i) for i in range(array.GetNumberOfValues())]
    data = numpy_support.vtk_to_numpy(array)
    return [float(v) for v in data] if kind == "float" else [int(v) for v in data]


# ---- files -------------------------------------------------------------------------------
def save_node(node, path) -> Path:
    """Write a node to ``path`` atomically: volumes (.nrrd, .nii.gz, .nii, .mha), segmentations
    (.seg.nrrd), markups (.mrk.json, LPS coordinates in the file as Slicer writes by default) and
    tables (.tsv/.csv, plus the .schema.tsv/.schema.csv that keeps types, units, descriptions)."""
    path = Path(path)
    _check_write_suffix(node, path)
    storage = node.CreateDefaultStorageNode()
    if storage is None:
        raise InputError(f"{node.GetClassName()} nodes cannot be written", path)
    if hasattr(storage, "SetUseCompression"):
        storage.SetUseCompression(1)
    with _staged(path) as staged:
        storage.SetFileName(str(staged))
        if not storage.WriteData(node):
            raise SpineKneeSegError(f"{path}: writing {node.GetClassName()} {node.GetName()!r} failed")
    return path


def _check_write_suffix(node, path: Path) -> None:
    name = path.name.lower()
    for class_name, suffixes in _WRITE_SUFFIXES:
        if node.IsA(class_name):
            if not name.endswith(suffixes):
                raise InputError(f"{node.GetClassName()} can be written as {', '.join(suffixes)}", path)
            return
    raise InputError(f"{node.GetClassName()} nodes cannot be written", path)


@contextlib.contextmanager
def _staged(target: Path):
    """Yield ``target``'s name inside a hidden staging folder beside it; on success move what was
    written there onto the target folder (the named file last) and remove the staging folder.

    Same file name, not a temporary one, because writers derive companion names from it: the
    table's .schema.tsv and the folder inside a .mrb. Same folder, so each move is a rename."""
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    from SpineKneeSegLib.core.atomic import staging_dir

    stage = staging_dir(parent, target.name)
    try:
        staged = stage / target.name
        yield staged
        if not staged.is_file():
            raise SpineKneeSegError(f"{target}: the writer reported success but wrote no file")
        for companion in sorted(stage.iterdir()):
            if companion != staged:
                os.replace(companion, parent / companion.name)
        os.replace(staged, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    return path


def _node_name(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", ".mrk.json", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _in_slicer_app(scene) -> bool:
    """Inside Slicer, for its own scene, loading goes through slicer.util (IO manager, views);
    that branch cannot run headless, so only the logic branch is tested here."""
    return is_real_slicer() and scene is slicer.mrmlScene


def _messages():
    return slicer.vtkMRMLMessageCollection()


def _reason(messages, fallback: str) -> str:
    """Slicer's own explanation of a failed read, kept short."""
    text = " ".join(messages.GetAllMessagesAsString().split())
    return (text[:600] + " ...") if len(text) > 600 else (text or fallback)


def load_volume(scene, path, name: str | None = None):
    path = _existing(path)
    name = name or _node_name(path)
    if _in_slicer_app(scene):
        return slicer.util.loadVolume(str(path), {"name": name})
    messages = _messages()
    single_file = 4  # loadingOptions bit 2: do not pull in similarly named files as a series
    node = context_for_scene(scene).volumes.AddArchetypeVolume(str(path), name, single_file, None, messages)
    if node is None:
        raise InputError(f"cannot be read as a volume: {_reason(messages, 'unsupported file')}", path)
    return node


def load_segmentation(scene, path, name: str | None = None):
    path = _existing(path)
    name = name or _node_name(path)
    if _in_slicer_app(scene):
        return slicer.util.loadSegmentation(str(path), {"name": name})
    messages = _messages()
    node = context_for_scene(scene).segmentations.LoadSegmentationFromFile(str(path), False, name, None, messages)
    if node is None:
        raise InputError(f"cannot be read as a segmentation: {_reason(messages, 'unsupported file')}", path)
    return node


def load_markups(scene, path, name: str | None = None):
    path = _existing(path)
    name = name or _node_name(path)
    if _in_slicer_app(scene):
        return slicer.util.loadMarkups(str(path))
    messages = _messages()
    node_id = context_for_scene(scene).markups.LoadMarkups(str(path), name, messages)
    node = scene.GetNodeByID(node_id) if node_id else None
    if node is None:
        raise InputError(f"cannot be read as markups: {_reason(messages, 'not a Slicer markups file')}", path)
    return node


def load_table(scene, path, name: str | None = None):
    path = _existing(path)
    if not path.name.lower().endswith((".tsv", ".csv", ".txt")):
        raise InputError("a table must be a .tsv, .csv or .txt file", path)  # else any text reads as one
    name = name or _node_name(path)
    if _in_slicer_app(scene):
        return slicer.util.loadTable(str(path))
    messages = _messages()
    node = context_for_scene(scene).tables.AddTable(str(path), name, True, None, messages)
    if node is None:
        raise InputError(f"cannot be read as a table: {_reason(messages, 'unsupported file')}", path)
    return node


def save_scene_mrb(scene, path) -> Path:
    """Write the whole scene (every storable node's data + the .mrml) as a .mrb bundle, atomically."""
    path = Path(path)
    if not path.name.lower().endswith(".mrb"):
        raise InputError("a scene bundle must end in .mrb", path)
    messages = _messages()
    with _staged(path) as staged:
        if not scene.WriteToMRB(str(staged), None, messages):
            raise SpineKneeSegError(f"{path}: writing the scene bundle failed: "
                                    f"{_reason(messages, 'no details')}")
    return path


def load_scene_mrb(path, cache_dir=None, activate: bool = True) -> HeadlessSlicer:
    """Load a .mrb into a FRESH headless application (its own scene and logics) and return it.
    ``activate`` points slicer.mrmlScene / slicer.modules at it (never inside Slicer)."""
    path = _existing(path)
    app = create_headless_slicer(cache_dir, activate=activate)
    messages = _messages()
    if not app.scene.ReadFromMRB(str(path), True, messages):
        app.close()
        raise InputError(f"cannot be read as a scene bundle: {_reason(messages, 'not a .mrb file')}", path)
    return app
