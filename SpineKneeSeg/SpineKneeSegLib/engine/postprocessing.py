"""Label-map post-processing and per-structure measurement tables (uint8 throughout)."""
from __future__ import annotations

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.labels import LabelSpec, label_histogram
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.core.tables import ColumnSpec, Table
from SpineKneeSegLib.engine.steps import StepContext, labelled_box, set_labels, step

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py)
# connected-components-3d: the same 26-connected labelling as ndimage.label, faster (the knee DESS
# result's four bone boxes: 0.055-0.08 s -> 0.010 s; that map with 2000 scattered specks:
# 1.6-1.9 s -> 0.025 s)
cc3d = LazyModule("cc3d")



def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two masks; None when both are empty (nothing to score)."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a mask from its projections on each axis (a fraction of
    ndimage.find_objects' cost on a large, mostly empty volume); None when empty."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(hits):
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def label_in_box(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int, tuple[slice, ...] | None]:
    """Connected components labelled only inside the mask's bounding box (lesions, foramen
    candidates: small parts of a large volume): (ids in the box, n, the box; None when empty)."""
    mask = mask > 0
    box = mask_box(mask)
    if box is None:
        return np.zeros((0,) * mask.ndim, np.int32), 0, None
    cropped, n = ndimage.label(mask[box], structure=structure)
    return cropped, n, box


def label_components(labels: np.ndarray) -> dict[int, tuple]:
    """{label value: (bounding box, its 26-connected component map, component sizes with
    sizes[0] = 0)}, labelled inside each label's bounding box (fast on small structures). Computed
    once and shared by the clean-up and the checks that count components."""
    out = {}
    # one pass finds every label's bounding box (labels are small non-negative integers)
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        comp, n = cc3d.connected_components((labels[box] == value).view(np.uint8), connectivity=26, return_N=True)
        sizes = component_sizes(comp, n)
        sizes[0] = 0
        out[value] = (box, comp, sizes)
    return out


def component_sizes(comp: np.ndarray, n: int) -> np.ndarray:
    """Voxels per component id 0..n (int64) of a component map. Ids below 256 (a label's pieces,
    nearly always) are counted as uint8 by torch: numpy's bincount first copies the map to int64
    (the DESS femur's 9 M-voxel box: 18 -> 6 ms)."""
    if n < 256:
        import torch

        return torch.bincount(torch.from_numpy(comp.astype(np.uint8).ravel()), minlength=n + 1).numpy()
    return np.bincount(comp.ravel(), minlength=n + 1)


def _label_components(labels: np.ndarray, components: dict | None = None):
    """The labels of ``label_components`` that have more than one component."""
    for box, comp, sizes in (components if components is not None else label_components(labels)).values():
        if len(sizes) > 2:
            yield box, comp, sizes


def largest_component_per_label(labels: np.ndarray, components: dict | None = None) -> np.ndarray:
    """Keep the largest 26-connected component of every label (removes stray blobs);
    ``components``: ``label_components(labels)`` when the caller has it already."""
    out = labels.copy()
    for box, comp, sizes in _label_components(labels, components):
        out[box][(comp != 0) & (comp != int(sizes.argmax()))] = 0
    return out


def kept_components(components: dict) -> dict:
    """``label_components`` of ``largest_component_per_label``'s output, from its input's: one
    component per label, the largest (box: the input's, which holds it; no component map)."""
    return {value: (box, None, np.array([0, int(sizes.max())])) for value, (box, _, sizes) in components.items()}


def remove_small_components(labels: np.ndarray, min_fraction: float = 0.1) -> np.ndarray:
    """Drop components smaller than ``min_fraction`` of the label's largest one (keeps e.g. both
    femurs on a pelvis radiograph)."""
    out = labels.copy()
    for box, comp, sizes in _label_components(labels):
        small = np.flatnonzero((sizes < min_fraction * sizes.max()) & (sizes > 0))
        out[box][np.isin(comp, small)] = 0
    return out


def _counts(labels, specs) -> np.ndarray:
    """Voxels per label value, over one label map or a list of layers (disjoint values)."""
    maps = labels if isinstance(labels, (list, tuple)) else [labels]
    return sum(label_histogram(m, max(s.value for s in specs) + 1) for m in maps)


def volume_table(labels: np.ndarray, image: Image, specs: tuple[LabelSpec, ...]) -> Table:
    """One row per label of the task, absent ones included with 0 voxels (e.g. knee-bones' patella
    when it is out of view): a fixed schema that tables across cases can be stacked on; 0 ml
    means not found (the report's knee_plausibility says whether that is plausible)."""
    voxel_mm3 = float(np.prod(image.spacing))
    counts = _counts(labels, specs)
    rows = [{"structure": s.name, "label": s.value, "voxels": int(counts[s.value]),
             "volume_mm3": round(float(counts[s.value]) * voxel_mm3, 3),
             "volume_ml": round(float(counts[s.value]) * voxel_mm3 / 1000.0, 4)} for s in specs]
    columns = [ColumnSpec("structure", "string", description="segment name"),
               ColumnSpec("label", "int", description="label value"),
               ColumnSpec("voxels", "int", "voxels"),
               ColumnSpec("volume_mm3", "float", "mm3"),
               ColumnSpec("volume_ml", "float", "mL")]
    return Table("Volumes", columns, rows, "volumes.tsv")


def area_table(labels: np.ndarray, image: Image, specs: tuple[LabelSpec, ...]) -> Table:
    """In-plane area for single-slice (radiograph) label maps."""
    pixel_mm2 = float(image.spacing[0] * image.spacing[1])
    counts = _counts(labels, specs)
    rows = [{"structure": s.name, "label": s.value, "pixels": int(counts[s.value]),
             "area_mm2": round(float(counts[s.value]) * pixel_mm2, 3)} for s in specs]
    columns = [ColumnSpec("structure", "string", description="segment name"),
               ColumnSpec("label", "int", description="label value"),
               ColumnSpec("pixels", "int", "pixels"),
               ColumnSpec("area_mm2", "float", "mm2")]
    return Table("Areas", columns, rows, "areas.tsv")


# ---- steps (registered by name; see steps.py) ----------------------------------------------------

def label_maps(result) -> list[np.ndarray]:
    """The run's label map and its overlapping layers (disjoint label values)."""
    return [result.labels.array, *(layer.array for layer in result.layers.values())]


def decode_sigmoid(probabilities: np.ndarray, values) -> np.ndarray:
    """uint8 labels from uint8 sigmoid maps (one per label, value v in channel v - 1): each voxel
    takes the most probable of ``values`` whose probability is above 0.5."""
    values = np.asarray(list(values), np.uint8)
    sub = probabilities[values.astype(int) - 1]
    best = sub.argmax(axis=0)
    return np.where(sub.max(axis=0) >= 128, values[best], 0).astype(np.uint8)


@step("label_layers", needs_probabilities=True)
def _label_layers_step(ctx: StepContext) -> None:
    """Structures that overlap others (the card's ``label_layers``) decoded apart from the main map,
    so that e.g. a clavicle over a lung keeps both."""
    probabilities = ctx.maps["probabilities"]
    layered = {v for _, values in ctx.card.label_layers for v in values}
    main = [spec.value for spec in ctx.card.labels if spec.value not in layered]
    ctx.result.labels = ctx.image.with_array(decode_sigmoid(probabilities, main))
    for name, values in ctx.card.label_layers:
        ctx.result.layers[name] = ctx.image.with_array(decode_sigmoid(probabilities, values))


@step("largest_component_per_label")
def _largest_component_step(ctx: StepContext) -> None:
    components = None
    labels, known = ctx.result.labels.array, labelled_box(ctx)
    if known is not None and labels is not ctx.raw:  # every label inside the box: only it is cleaned
        cleaned = labels.copy()
        cleaned[known] = largest_component_per_label(labels[known])
        set_labels(ctx, cleaned, known)
        return
    if labels is ctx.raw:  # labelled once, shared with checks that read the raw output
        components = ctx.raw_components = label_components(ctx.raw)
    cleaned = largest_component_per_label(labels, components)
    if components is not None:  # the checks on the final labels need not label them again (0.15 s on a knee)
        ctx.made_components = (cleaned, kept_components(components))
    ctx.result.labels = ctx.image.with_array(cleaned)


@step("remove_small_components")
def _remove_small_components_step(ctx: StepContext) -> None:
    ctx.result.labels = ctx.image.with_array(remove_small_components(ctx.result.labels.array))
    for name, layer in ctx.result.layers.items():
        ctx.result.layers[name] = layer.with_array(remove_small_components(layer.array))


@step("volume_table")
def _volume_table_step(ctx: StepContext) -> None:
    ctx.result.tables.append(volume_table(label_maps(ctx.result), ctx.image, ctx.card.labels))


@step("area_table")
def _area_table_step(ctx: StepContext) -> None:
    ctx.result.tables.append(area_table(label_maps(ctx.result), ctx.image, ctx.card.labels))
