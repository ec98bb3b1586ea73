"""Offscreen PNG overlays (numpy + Pillow: no display, no OpenGL) for reports.

Slices are shown the radiological way: axial with patient right on the left and anterior up,
sagittal with anterior left and superior up, coronal with patient right left and superior up.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.labels import LabelSpec
from SpineKneeSegLib.engine.postprocessing import mask_box


def to_lps_array(image: Image) -> np.ndarray:
    """Array reoriented so that i runs toward L, j toward P, k toward S (array[k, j, i])."""
    import SimpleITK as sitk

    if image.is_2d:
        return image.array
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image.to_sitk(), "LPS"))


def display_spacing(image: Image, plane: str) -> tuple[float, float]:
    """(row, col) pixel size in mm of what display_slice shows, for square-pixel rendering."""
    if image.is_2d or plane == "image":
        return image.spacing[1], image.spacing[0]
    lps_spacing = np.abs(image.direction @ np.diag(image.spacing)).max(axis=1)  # mm along L, P, S
    x, y, z = lps_spacing
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[plane]


def display_slice(array_lps: np.ndarray, plane: str, index: int | None = None) -> tuple[np.ndarray, int]:
    if array_lps.shape[0] == 1 or plane == "image":
        return array_lps[0], 0
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}[plane]
    n = array_lps.shape[axis]
    index = n // 2 if index is None else int(np.clip(index, 0, n - 1))
    sl = np.take(array_lps, index, axis=axis)
    return (sl if plane == "axial" else sl[::-1]), index


def _grey(sl: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(sl, (1, 99)) if sl.size else (0, 1)
    return (np.clip((sl.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
    return mask & ~inner


def overlay_rgb(grey: np.ndarray, labels: np.ndarray | None, specs: tuple[LabelSpec, ...],
                alpha: float = 0.4) -> np.ndarray:
    """``grey`` (or an RGB picture: a second layer drawn over the first) with each label blended in
    and outlined in its colour. One pass through a colour table for all labels (a pass per label
    cost 5 ms a 381 x 381 slice)."""
    rgb = grey if grey.ndim == 3 else np.repeat(grey[..., None], 3, axis=2)
    if labels is None or not specs:
        return rgb.astype(np.uint8, copy=True)
    top = max(spec.value for spec in specs)
    table = np.zeros((top + 1, 3), np.uint16)
    known = np.zeros(top + 1, bool)
    for spec in specs:
        table[spec.value], known[spec.value] = np.array(spec.color) * 255, True
    values = np.where(labels <= top, labels, 0).astype(np.intp)
    drawn = known[values]
    picture = rgb.astype(np.uint8, copy=True)
    if (box := mask_box(drawn)) is None:
        return picture
    # only the labels' box, a pixel wider (so that its rim holds no label whose outline it would
    # hide), in 8-bit fixed point (boolean indexing of a radiograph's large lungs in floats: 7 ms)
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
    values, drawn = values[box], drawn[box]
    weight = (drawn * np.uint16(round(alpha * 256)))[..., None]
    colour = np.take(table, values, axis=0)  # a gather several times quicker than table[values]
    out = (rgb[box].astype(np.uint16) * (256 - weight) + colour * weight) >> 8
    edge = (drawn & ~_interior(values))[..., None]
    picture[box] = np.where(edge, colour, out)
    return picture


def _interior(values: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours carry their own label (the image's rim counts as interior, as before)."""
    inner = np.ones(values.shape, bool)
    centre = values[1:-1, 1:-1]
    inner[1:-1, 1:-1] = ((centre == values[:-2, 1:-1]) & (centre == values[2:, 1:-1])
                         & (centre == values[1:-1, :-2]) & (centre == values[1:-1, 2:]))
    return inner


def best_slice(labels_lps: np.ndarray, plane: str) -> int | None:
    """The slice with the most labelled voxels (None for an empty label map)."""
    if labels_lps.shape[0] == 1 or plane == "image" or not labels_lps.any():
        return None
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}[plane]
    other = tuple(a for a in range(3) if a != axis)
    return int(np.argmax((labels_lps > 0).sum(axis=other)))


def save_overlay(path: str | Path, image: Image, labels: Image | None, specs: tuple[LabelSpec, ...],
                 plane: str, title: str = "", index: int | None = None, min_size: int = 320) -> Path:
    from SpineKneeSegLib.engine.preprocessing import resolve_plane

    plane = resolve_plane(image, plane)  # a task card's "acquisition" plane: the one this image is shown in
    arr = to_lps_array(image)
    lab = to_lps_array(labels) if labels is not None else None
    return _save_lps_overlay(path, arr, lab, image, specs, plane, title, index, min_size)


def _save_lps_overlay(path, arr: np.ndarray, lab: np.ndarray | None, image: Image, specs, plane: str, title: str,
                      index: int | None, min_size: int) -> Path:
    if index is None and lab is not None:
        index = best_slice(lab, plane)
    grey, index = display_slice(arr, plane, index)
    lab_sl = display_slice(lab, plane, index)[0] if lab is not None else None
    return _save_slice(path, grey, lab_sl, specs, display_spacing(image, plane), title, min_size)


MARK_COLOUR = (0, 255, 255)  # cyan: apart from every label colour (the femur's is a pale yellow)


def _save_slice(path, grey: np.ndarray, lab_sl: np.ndarray | None, specs, spacing_rc: tuple[float, float],
                title: str, min_size: int, layer_slices: tuple[np.ndarray, ...] = (),
                marks: tuple[tuple[float, float, float, str], ...] = (),
                lines: tuple[tuple[float, float, float, float, str], ...] = ()) -> Path:
    """``marks``: (row, column, radius in mm (0: a cross only), text) in the slice's pixels, drawn in
    cyan (a radiograph's femoral-head centres and fitted circles, the lumbar foramen markers);
    ``lines``: (row, column, row, column, text), drawn in cyan with end ticks (measured widths)."""
    rgb = overlay_rgb(_grey(grey), lab_sl, specs)
    for layer_sl in layer_slices:  # overlapping structures (the chest's clavicles) drawn over the rest
        rgb = overlay_rgb(rgb, layer_sl, specs)
    img = PILImage.fromarray(rgb)
    row_mm, col_mm = spacing_rc
    width, height = img.width * col_mm / min(row_mm, col_mm), img.height * row_mm / min(row_mm, col_mm)
    scale = max(1.0, min_size / max(width, height))
    size = (round(width * scale), round(height * scale))
    across, down = size[0] / img.width, size[1] / img.height  # output pixels per slice pixel
    img = img.resize(size, PILImage.NEAREST)
    if marks:
        draw = ImageDraw.Draw(img)
        for row, col, radius_mm, text in marks:
            x, y = (col + 0.5) * across, (row + 0.5) * down
            draw.line([x - 6, y, x + 6, y], fill=MARK_COLOUR)
            draw.line([x, y - 6, x, y + 6], fill=MARK_COLOUR)
            if text:
                draw.text((x + 5, y + 2), text, fill=MARK_COLOUR)
            if radius_mm > 0:
                rx, ry = radius_mm / col_mm * across, radius_mm / row_mm * down
                draw.ellipse([x - rx, y - ry, x + rx, y + ry], outline=MARK_COLOUR)
    if lines:
        draw = ImageDraw.Draw(img)
        for r0, c0, r1, c1, text in lines:
            (x0, y0), (x1, y1) = (((c + 0.5) * across, (r + 0.5) * down) for r, c in ((r0, c0), (r1, c1)))
            draw.line([x0, y0, x1, y1], fill=MARK_COLOUR, width=2)
            for x, y in ((x0, y0), (x1, y1)):
                draw.line([x, y - 5, x, y + 5], fill=MARK_COLOUR, width=2)
            if text:
                draw.text((min(x0, x1) + 4, min(y0, y1) - 12), text, fill=MARK_COLOUR)
    if title:
        draw = ImageDraw.Draw(img)
        draw.rectangle([0, 0, img.width, 14], fill=(0, 0, 0))
        draw.text((3, 1), title, fill=(255, 255, 255))
    img.save(path, compress_level=1)  # zlib fastest level: a third of the default's encoding time, similar size on noisy MRI
    return Path(path)


def save_label_overlays(folder: str | Path, subdir: str, image: Image, labels: Image, card,
                        min_size: int = 320, boxes: dict | None = None, layers: dict[str, Image] | None = None,
                        points: list[dict] = (), segments: list[dict] = ()) -> list[str]:
    """A report's overlay PNGs (a task opts in with the output name "overlays/"): one slice in the
    task's plane through the centroid of every label present (for knee-bones the femur, tibia,
    fibula and patella slices; the femur/tibia slice is the mid-knee one), or with the card's
    ``overlay_views`` "together" one, ``<plane>-labels.png``, through the centroid of them all (the
    lumbar levels), or the middle slice when nothing was found; a 2D image (a radiograph) is one
    picture, ``image.png``, with every label. Returns the paths relative to ``folder`` (written
    inside it, i.e. inside the run's staging folder).

    Slices are cut from the canonical views of preprocessing (a transpose and flips: no copy of
    the volume), whose in-plane orientation is the display convention above: sagittal anterior
    left and superior up, coronal patient right left and superior up, axial anterior up.
    ``boxes``: {label value: a box holding all its voxels} when the caller knows them. ``layers``:
    the label maps of ``card.label_layers`` (overlapping structures, the chest's clavicles) by
    name, drawn over each picture; a 3D task's pictures include a slice through each of theirs.
    ``points``: the run's markups (``RunResult.points``), drawn on a radiograph's picture as a cross,
    with the circle of their ``diameter_mm`` attribute where they have one (the femoral heads); a 3D
    task's get a picture a ``side`` attribute, ``<plane>-<side>-markers.png`` (the lumbar foramina
    left and right), through their middle slice, each marker projected onto it and named.
    ``segments``: measured distances ({"label", "from_ras", "to_ras"}, the chest's heart and thorax
    widths), drawn on a radiograph's picture as named lines."""
    from scipy import ndimage

    from SpineKneeSegLib.engine.preprocessing import (
        canonical_orientation,
        resolve_plane,
    )

    plane = "image" if image.is_2d else resolve_plane(image, card.preprocessing.plane)
    orientation = canonical_orientation(image, plane)
    arr, lab = orientation.apply(image.array), orientation.apply(labels.array)
    spacing_by_axis = tuple(reversed(image.spacing))  # (k, j, i)
    spacing_rc = (spacing_by_axis[orientation.axes[1]], spacing_by_axis[orientation.axes[2]])
    out_dir = Path(folder) / subdir
    out_dir.mkdir(parents=True, exist_ok=True)
    top = max(s.value for s in card.labels)
    if boxes is None:
        boxes = _label_boxes(labels.array, top)
    boxes, holders = dict(boxes), {value: labels.array for value in boxes}  # the caller's boxes stay as they are
    for name, values in card.label_layers if layers else ():
        found = ndimage.find_objects(layers[name].array, max_label=top)
        boxes.update({value: found[value - 1] for value in values if value <= len(found) and found[value - 1]})
        holders.update({value: layers[name].array for value in values})
    layer_arrays = tuple(orientation.apply(layers[name].array) for name, _ in card.label_layers if layers)
    views = []
    a = orientation.axes[0]

    def centre_slice(box, mask) -> int:
        # the centroid along the slicing axis only: voxels per slice in the box (argwhere's coordinate
        # arrays of a whole femur cost 0.1 s on the knee DESS)
        per_slice = np.count_nonzero(mask, axis=tuple(x for x in range(3) if x != a))
        index = int(round(box[a].start + float(per_slice @ np.arange(len(per_slice))) / per_slice.sum()))
        return labels.array.shape[a] - 1 - index if orientation.flips[0] else index

    present = [spec for spec in card.labels if spec.value in boxes]
    if plane == "image":  # every label lies on the one slice: one picture, not one copy a label
        views.append(("image.png", 0, f"{card.name}: " + (", ".join(s.name for s in present) or "no labels found")))
    elif card.overlay_views == "together" and present:
        box = tuple(slice(min(boxes[s.value][d].start for s in present), max(boxes[s.value][d].stop for s in present))
                    for d in range(3))
        index = centre_slice(box, labels.array[box] > 0)
        views.append((f"{plane}-labels.png", index,
                      f"{card.name}: {plane} slice {index}, " + ",".join(s.name for s in present)))
    for spec in present if plane != "image" and card.overlay_views != "together" else ():
        box = boxes[spec.value]
        index = centre_slice(box, holders[spec.value][box] == spec.value)
        views.append((f"{plane}-{spec.segment_id}.png", index,
                      f"{card.name}: {plane} slice {index} through the {spec.name}"))
    if not views:
        views.append((f"{plane}-middle.png", arr.shape[0] // 2, f"{card.name}: {plane} middle slice (no labels)"))
    marks, lines = {}, ()
    if plane == "image":
        marks = {view[0]: _marks_on_radiograph(image, orientation, points) for view in views}
        lines = _lines_on_radiograph(image, orientation, segments)
    elif points:
        for side, (index, on_slice) in _marker_views(image, orientation, points).items():
            name = f"{plane}-{side}-markers.png"
            views.append((name, index, f"{card.name}: {plane} slice {index}, {side} markers (projected)"))
            marks[name] = on_slice
    written = []
    for name, index, title in views:
        _save_slice(out_dir / name, arr[index], lab[index], card.labels, spacing_rc, title, min_size,
                    tuple(layer[index] for layer in layer_arrays), marks.get(name, ()), lines)
        written.append(f"{subdir}/{name}")
    return written


def _label_boxes(array: np.ndarray, top: int) -> dict[int, tuple[slice, ...]]:
    """{label value: its bounding box}, scanning with find_objects only the box of all labels (by
    projections, ``mask_box``: 12 ms -> 2 ms on a 7 M-voxel brain whose lesions fill a small part)."""
    from scipy import ndimage

    from SpineKneeSegLib.engine.steps import within

    box = mask_box(array)
    if box is None:
        return {}
    found = ndimage.find_objects(array[box], max_label=top)
    return {value: within(box, f) for value, f in enumerate(found, start=1) if f is not None}


def _on_canonical_slices(image: Image, orientation, points) -> list[tuple[float, float, float]]:
    """Each point (RAS) as (slice, row, column) of the canonical slices ``orientation`` cuts."""
    if not points:
        return []
    shape = orientation.apply(image.array).shape
    kji = image.ras_to_ijk_points([point["ras"] for point in points])[:, ::-1]
    return [tuple(float(shape[n] - 1 - at[a] if flip else at[a])
                  for n, (a, flip) in enumerate(zip(orientation.axes, orientation.flips))) for at in kji]


def _marker_views(image: Image, orientation, points) -> dict[str, tuple[int, tuple]]:
    """The 3D markers grouped by their ``side`` attribute: {side: (the slice through their median,
    each as (row, column, 0, its label's first word) on the canonical slices)}."""
    groups: dict[str, list] = {}
    for point, at in zip(points, _on_canonical_slices(image, orientation, points)):
        side = str((point.get("attributes") or {}).get("side") or "all")
        groups.setdefault(side, []).append((at, str(point.get("label", "")).split(" ")[0]))
    last = orientation.apply(image.array).shape[0] - 1
    return {side: (int(np.clip(round(float(np.median([at[0] for at, _ in found]))), 0, last)),
                   tuple((at[1], at[2], 0.0, text) for at, text in found))
            for side, found in groups.items()}


def _marks_on_radiograph(image: Image, orientation, points) -> tuple[tuple[float, float, float, str], ...]:
    """Each point as (row, column, the radius of its ``diameter_mm`` attribute or 0, no text)."""
    def radius(point) -> float:
        try:
            return float((point.get("attributes") or {}).get("diameter_mm", 0)) / 2
        except ValueError:
            return 0.0

    return tuple((at[1], at[2], radius(point), "")
                 for point, at in zip(points, _on_canonical_slices(image, orientation, points)))


def _lines_on_radiograph(image: Image, orientation, segments) -> tuple[tuple[float, float, float, float, str], ...]:
    """Each segment as (row, column, row, column, its label) on the radiograph's picture."""
    ends = _on_canonical_slices(image, orientation,
                                [{"ras": end} for s in segments for end in (s["from_ras"], s["to_ras"])])
    return tuple((a[1], a[2], b[1], b[2], str(s.get("label", ""))) for s, a, b in zip(segments, ends[::2], ends[1::2]))


def save_label_montage(path: str | Path, image: Image, labels: Image, card, tiles: int = 24, columns: int = 6,
                       tile_px: int = 200) -> Path:
    """One PNG of ``tiles`` slices evenly spread through the volume in the task's plane (same
    display convention as save_label_overlays), each with its slice number: for checking a whole
    result at a glance (stray pieces in outer slices that the per-label overlays never show)."""
    from SpineKneeSegLib.engine.preprocessing import (
        canonical_orientation,
        resolve_plane,
    )

    plane = resolve_plane(image, card.preprocessing.plane)
    orientation = canonical_orientation(image, plane)
    arr, lab = orientation.apply(image.array), orientation.apply(labels.array)
    lo, hi = np.percentile(arr[:: max(1, arr.shape[0] // 8)], (1, 99))
    spacing_by_axis = tuple(reversed(image.spacing))
    row_mm, col_mm = spacing_by_axis[orientation.axes[1]], spacing_by_axis[orientation.axes[2]]
    h, w = arr.shape[1] * row_mm, arr.shape[2] * col_mm
    size = (round(tile_px * w / max(h, w)), round(tile_px * h / max(h, w)))
    indices = np.unique(np.linspace(0, arr.shape[0] - 1, min(tiles, arr.shape[0])).round().astype(int))
    rows = -(-len(indices) // columns)
    canvas = PILImage.new("RGB", (columns * size[0], rows * size[1]))
    for n, index in enumerate(indices):
        grey = (np.clip((arr[index].astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
        tile = PILImage.fromarray(overlay_rgb(grey, lab[index], card.labels)).resize(size, PILImage.BILINEAR)
        ImageDraw.Draw(tile).text((3, 1), str(int(index)), fill=(255, 255, 0))
        canvas.paste(tile, ((n % columns) * size[0], (n // columns) * size[1]))
    tmp = Path(path).with_name(Path(path).name + ".part")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return Path(path)


def side_by_side(paths: list[Path], out: Path) -> Path:
    images = [PILImage.open(p).convert("RGB") for p in paths]
    height = max(i.height for i in images)
    canvas = PILImage.new("RGB", (sum(i.width for i in images) + 4 * (len(images) - 1), height))
    x = 0
    for i in images:
        canvas.paste(i, (x, 0))
        x += i.width + 4
    canvas.save(out)
    return out
