"""Boundary refinement of the decoded lumbar levels (issue 21, session 28).

The level network runs on a 1.4 mm grid; most of its wrong voxels lie within two pixels of the
true outline, in slices where the level is present (Training/level_dice_errors.py). A small 2D
network at the scan's own pixels sees the image and the level network's summed body probability
and redraws the outline in a thin in-plane band around the decoded bodies. Names are never
changed: a band voxel it calls body takes the level of the nearest decoded voxel in its slice,
so the refinement cannot shift, duplicate or drop a level. Optional: without its weights the
decoded outline stays. --fast keeps it: on the 59 shared scans it took 0.18-0.68 s, a quarter
(381 mm scans) to a half (224 mm) of the network time, for about 0.02 of mean level Dice (session
34's nested cross-validation: 0.8614 -> 0.8812).
"""
from __future__ import annotations

import time

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.engine.preprocessing import (
    canonical_orientation,
    context_channels,
    histogram_percentile,
    integer_histogram,
)
from SpineKneeSegLib.engine.steps import StepContext, labelled_box, set_labels, step, within
from SpineKneeSegLib.tasks.spine.level_decoding import LOGIT_OF_UINT8, _grid_coordinates

ndimage = LazyModule("scipy.ndimage")
torch = LazyModule("torch")  # the task list must import without torch (Slicer before its dependencies)

BAND_PX = 2  # pixels either side of the decoded outline the refiner may redraw
MARGIN_PX = 24  # context around the bodies' box the refiner sees (its receptive field: 36 px, 18 each side)




def normalise(image: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """The refiner's intensity scale: the 1st..99th percentile of the region it sees to 0..1.
    ``source``: the same voxels as stored (8/16-bit integers: the percentiles from their histogram,
    the same values, 4 ms -> under 1 ms a lumbar scan's box)."""
    hist = None if source is None else integer_histogram(source.ravel())
    lo, hi = np.percentile(image, (1, 99)) if hist is None else histogram_percentile(*hist, (1, 99))
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1.5).astype(np.float32)


def _disc(r: int) -> np.ndarray:
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (y * y + x * x) <= r * r


def band(labels: np.ndarray, width: int) -> np.ndarray:
    """In-plane band of ``width`` pixels either side of the bodies' outline (slices first)."""
    body = labels > 0
    se = _disc(width)[None]
    return ndimage.binary_dilation(body, se) & ~ndimage.binary_erosion(body, se)


def refined_labels(labels: np.ndarray, body: np.ndarray, width: int) -> np.ndarray:
    """``labels`` (slices first) with their outline redrawn by ``body`` inside the band: a band
    voxel called body takes the level of the nearest labelled voxel in its slice."""
    out = labels.copy()
    eroded = ndimage.binary_erosion(labels > 0, _disc(width)[None])
    for s in np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1)):
        # only the slice's labels' box grown by the band is visited: the band and the nearest
        # labels lie inside it
        (r, c), = ndimage.find_objects((labels[s] > 0).view(np.uint8))
        r = slice(max(r.start - width, 0), r.stop + width)
        c = slice(max(c.start - width, 0), c.stop + width)
        crop = labels[s, r, c]
        # ``band``, its dilation read from the distance transform the nearest level needs anyway
        # (the same disc exactly: squared distances are integers)
        outside, (iy, ix) = ndimage.distance_transform_edt(crop == 0, return_indices=True)
        b = (outside <= width) & ~eroded[s, r, c]
        view = out[s, r, c]
        view[b] = 0
        take = b & body[s, r, c]
        view[take] = crop[iy[take], ix[take]]
    return out


def bodies_box(labels: np.ndarray, margin: int, known: tuple[slice, ...] | None = None) -> tuple[slice, ...] | None:
    """The labelled slices and the labels' in-plane box grown by ``margin`` (slices first);
    ``known``: a box already known to hold every label (only it is scanned)."""
    found = ndimage.find_objects((labels[known] > 0).view(np.uint8) if known else (labels > 0).view(np.uint8))
    if not found:
        return None
    box = within(known, found[0])
    return (box[0],) + tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n))
                             for b, n in zip(box[1:], labels.shape[1:]))


def summed_probability_on(probs: np.ndarray, grid: Image, image: Image, box: tuple[slice, ...]) -> np.ndarray:
    """Sum over levels of sigmoid(level logits, linearly interpolated from the network ``grid``)
    at every voxel of ``box`` of ``image`` (numpy axes of the image), as float32 in 0..5."""
    coords = _grid_coordinates(grid, image)
    along, at = [0] * 3, [None] * 3
    for axis, (grid_axis, c) in enumerate(coords):
        along[grid_axis], at[grid_axis] = axis, np.clip(c[box[axis]], 0, probs.shape[grid_axis + 1] - 1)
    lo = [int(np.floor(a.min())) for a in at]
    hi = [int(np.ceil(a.max())) + 1 for a in at]
    slices = np.rint(at[0])
    if np.abs(at[0] - slices).max() < 1e-6:  # the network's own slices (it resamples in-plane only):
        # 2D bilinear on each (a 3D grid_sample was ~40 ms of a 20-slice scan's post-processing)
        logits = torch.from_numpy(LOGIT_OF_UINT8[probs[:, slices.astype(int), lo[1]:hi[1], lo[2]:hi[2]]]
                                  .astype(np.float32)).transpose(0, 1)
        norm = [torch.from_numpy(2 * (a - l) / max(h - l - 1, 1) - 1).float() for a, l, h in zip(at[1:], lo[1:], hi[1:])]
        yy, xx = torch.meshgrid(*norm, indexing="ij")
        sample = torch.stack([xx, yy], -1)[None].expand(len(slices), -1, -1, -1)
        out = torch.nn.functional.grid_sample(logits, sample, mode="bilinear", padding_mode="border",
                                              align_corners=True).transpose(0, 1)
    else:
        logits = torch.from_numpy(LOGIT_OF_UINT8[probs[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]].astype(np.float32))
        # grid_sample's last coordinate indexes the last axis; align_corners: -1 / 1 are the end centres
        norm = [torch.from_numpy(2 * (a - l) / max(h - l - 1, 1) - 1).float() for a, l, h in zip(at, lo, hi)]
        zz, yy, xx = torch.meshgrid(*norm, indexing="ij")
        sample = torch.stack([xx, yy, zz], -1)[None]
        out = torch.nn.functional.grid_sample(logits[None], sample, mode="bilinear", padding_mode="border",
                                              align_corners=True)[0]
    summed = torch.sigmoid(out).sum(0).numpy()
    return np.ascontiguousarray(summed.transpose(np.argsort(along)))  # grid axes -> image axes


def refiner_inputs(image: Image, labels: np.ndarray, probs: np.ndarray, grid: Image,
                   margin: int = MARGIN_PX, known: tuple[slice, ...] | None = None):
    """(inputs (2, slices, h, w) float32, box in the image's axes, slice axis, the labels in the
    box slices first) for the refiner; None without labels. ``probs``/``grid``: the level
    network's uint8 maps on its own grid (or on the image's). ``known``: a box (the image's axes)
    known to hold every label."""
    axis = canonical_orientation(image, "sagittal").axes[0]
    first = np.moveaxis(labels, axis, 0)
    order = [axis] + [a for a in range(3) if a != axis]
    box_first = bodies_box(first, margin, tuple(known[a] for a in order) if known else None)
    if box_first is None:
        return None
    box = [None] * 3  # the same box in the image's axes
    for k, a in enumerate(order):
        box[a] = box_first[k]
    box = tuple(box)
    summed = np.moveaxis(summed_probability_on(probs, grid, image, box), axis, 0)
    stored = image.array[box]
    pixels = np.moveaxis(stored.astype(np.float32), axis, 0)
    x = np.stack([normalise(pixels, stored), np.clip(summed, 0, 1)])
    return x, box, axis, first[box_first]


def slice_channels(x: np.ndarray, slices: np.ndarray, neighbours: int = 0) -> np.ndarray:
    """The network's input for ``slices`` of the refiner inputs ``x`` (2, slices, h, w): the image
    slices ``neighbours`` either side (the end slices repeated past the box) and the probability,
    as (len(slices), 2 + 2 * neighbours, h, w) float32."""
    slices = np.asarray(slices)
    images = context_channels(x[0], slices, 2 * neighbours + 1, repeat_edges=True)
    return np.ascontiguousarray(np.concatenate([images, x[1][slices][:, None]], axis=1))


def refiner_probability(net, x: np.ndarray, batch: int = 8, timings: dict | None = None) -> np.ndarray:
    """The refiner's body probability (slices, h, w), float32, for its inputs ``x`` (2, slices, h, w).
    ``timings``: its "network_s" grows by the forward passes' seconds (not the inputs' assembly)."""
    prob = np.zeros(x.shape[1:], np.float32)
    device = next(net.parameters()).device  # the pipeline's --device
    # image slices either side, from the first convolution's input channels (2 + 2k): read through
    # the bfloat16 wrapper too
    neighbours = (next(p for p in net.parameters() if p.dim() == 4).shape[1] - 2) // 2
    with torch.inference_mode():
        for i in range(0, x.shape[1], batch):
            xs = torch.from_numpy(slice_channels(x, np.arange(i, min(i + batch, x.shape[1])), neighbours)).to(device)
            t = time.perf_counter()
            out = net(xs)
            if out.device.type == "cuda":
                torch.cuda.synchronize()
            if timings is not None:
                timings["network_s"] = timings.get("network_s", 0.0) + time.perf_counter() - t
            prob[i:i + batch] = torch.sigmoid(out.float())[:, 0].cpu().numpy()
    return prob


def refiner_body(net, x: np.ndarray, threshold: float = 0.5, batch: int = 8,
                 timings: dict | None = None) -> np.ndarray:
    """The refiner's body mask (slices, h, w) for its inputs ``x`` (2, slices, h, w)."""
    return refiner_probability(net, x, batch, timings) >= threshold


def refine_levels(net, image: Image, labels: np.ndarray, probs: np.ndarray, grid: Image,
                  band_px: int = BAND_PX, threshold: float = 0.5,
                  known: tuple[slice, ...] | None = None) -> tuple[np.ndarray, dict]:
    """The decoded ``labels`` (image axes) with their outline redrawn by the refiner, and a summary.
    ``known``: a box holding every label, when known."""
    inputs = refiner_inputs(image, labels, probs, grid, known=known)
    if inputs is None:
        return labels, {"changed_voxels": 0}
    x, box, axis, first = inputs
    timings = {"network_s": 0.0}
    body = refiner_body(net, x, threshold, timings=timings)
    network_s = timings["network_s"]
    new_first = refined_labels(first, body, band_px)
    out = labels.copy()
    out[box] = np.moveaxis(new_first, 0, axis)
    changed = int((new_first != first).sum())  # nothing outside the box changes
    return out, {"changed_voxels": changed, "band_px": band_px, "network_s": round(network_s, 4)}


# ---- step ----------------------------------------------------------------------------------------

@step("level_refinement", needs_probabilities="network")
def _level_refinement_step(ctx: StepContext) -> None:
    """Redraw the decoded levels' outline with the refiner (optional auxiliary model "refiner")."""
    found = ctx.networks.get("refiner")
    probs = ctx.maps.get("probabilities")
    if found is None or probs is None:
        return
    net, weights = found
    settings = weights.checkpoint.get("metadata", {}).get("postprocessing", {}).get("level_refinement", {})
    known = labelled_box(ctx)
    band_px = settings.get("band_px", BAND_PX)
    labels, summary = refine_levels(net, ctx.image, ctx.result.labels.array, probs,
                                    ctx.maps_grids.get("probabilities", ctx.image), band_px,
                                    settings.get("threshold", 0.5), known)
    ctx.network_s += summary.get("network_s", 0.0)
    if known is not None:  # the outline moves at most band_px in-plane, never to another slice
        axis = canonical_orientation(ctx.image, "sagittal").axes[0]
        known = tuple(b if a == axis else slice(max(b.start - band_px, 0), min(b.stop + band_px, n))
                      for a, (b, n) in enumerate(zip(known, labels.shape)))
    set_labels(ctx, labels, known)
    ctx.result.summaries["level_refinement"] = summary
