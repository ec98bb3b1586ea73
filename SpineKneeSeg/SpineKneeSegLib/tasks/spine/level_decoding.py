"""Anatomical decoding of the lumbar level network (issue 21): vertebral bodies as instances,
ordered along the column, named L1..L5 as ONE consecutive run that maximises the summed level
probability. Two bodies never share a name and no level is skipped between two named bodies; a
body missing from the network's output leaves a gap the run steps over (named "not found"), never
a shift. The margin of the winning run over the runs shifted by one level is the level confidence.

Written here (no library decodes vertebral levels): instances are connected components of the
level probabilities; one that holds two levels stacked along the column (a bridged disc) is split
by level; pieces at the same height (a lateral fragment, a posterior element) join their body.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule
from SpineKneeSegLib.engine.postprocessing import mask_box
from SpineKneeSegLib.engine.steps import StepContext, set_labels, step

ndimage = LazyModule("scipy.ndimage")  # loaded on first use (lazy.py)

N_LEVELS = 5
STRUCTURE_6 = np.array([[[0, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                        [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], bool)  # 6-connectivity (generate_binary_structure(3, 1))


@dataclass(frozen=True)
class DecodingParameters:
    threshold: float = 0.5  # a voxel is body when its level probabilities sum to at least this
    split_fraction: float = 0.2  # a component is split when a second level holds this share of it
    min_volume_fraction: float = 0.15  # of the median of the five largest bodies: smaller is noise
    same_height_overlap: float = 0.5  # column-extent overlap (of the smaller) that makes two pieces one body
    gap_factor: float = 1.6  # consecutive bodies this many median spacings apart have a missed body between
    # below this level confidence the count is reported as doubtful; chosen by cross-validation
    # (Training/spine_levels.py cv-report: the smallest margin that held every CV failure)
    doubtful_below: float = 0.3
    # the body just above the named L1 (or just below L5) itself looks like L1 (L5) to the network
    # with at least this probability: doubtful whatever the margin. Off by default (> 1): in the
    # cross-validation at 0.5 it flagged 1 failure and 16 correct predictions (the network often
    # calls T12 "L1" on T2 scans reaching T11 yet the whole run names the column right); the
    # value is always reported (summaries.level_decoding.end_conflict)
    end_conflict_doubtful: float = 1.01
    # weight of each level's probability (L1..L5) in a run's score. Equal: the seed's sum. A larger
    # L5 weight counts from the sacrum, the anchor a lumbar field of view holds (T12 is often cut
    # off, and then the network tends to call the top body L1). cv-report chooses it per fold; in
    # session 20 it changed one or two of 216 predictions, so the shipped model keeps equal weights
    run_weights: tuple = (1.0, 1.0, 1.0, 1.0, 1.0)
    # weight of the network's "above L1" / "below L5" evidence (a context-targets model's two extra
    # outputs, when the decoding is given them): a body left above the run scores its "above L1"
    # probability, one below it its "below L5", so every body is scored as the class the run gives
    # it. 0: the seed's score (bodies outside the run score nothing)
    context_weight: float = 0.0


@dataclass
class Body:
    voxels: np.ndarray | None  # flat indices into the volume (None: a missed body, inserted in a gap)
    probabilities: np.ndarray  # (5,) mean probability of each level over the body
    centre_ras: np.ndarray
    position_mm: float  # along the column, superior positive
    extent_mm: tuple[float, float]
    volume_ml: float
    context: np.ndarray = field(default_factory=lambda: np.zeros(2))  # mean "above L1", "below L5"

    @property
    def found(self) -> bool:
        return self.voxels is not None


@dataclass
class LevelDecoding:
    labels: np.ndarray  # uint8 L1..L5 on the input grid
    level_confidence: float
    doubtful: bool
    offset: int  # index (in superior-to-inferior body order) of the body named L1; may be < 0
    bodies: list[Body] = field(default_factory=list)
    run_scores: dict = field(default_factory=dict)
    end_conflict: float = 0.0  # the neighbour bodies' probability of L1 (above) / L5 (below), the larger

    def assignment(self) -> list[str]:
        """Per body (superior first): the level it was named, or where it lies relative to L1-L5."""
        names = []
        for i, _ in enumerate(self.bodies):
            k = i - self.offset + 1
            names.append(f"L{k}" if 1 <= k <= N_LEVELS else ("above L1" if k < 1 else "below L5"))
        return names

    def summary(self) -> dict:
        names = self.assignment()
        missing = []
        for k in range(1, N_LEVELS + 1):
            i = self.offset + k - 1
            if not (0 <= i < len(self.bodies)):
                missing.append(f"L{k} (outside the bodies found: field of view or not segmented)")
            elif not self.bodies[i].found:
                missing.append(f"L{k} (a gap between two bodies: not segmented)")
        return {
            "level_confidence": round(self.level_confidence, 4),
            "doubtful": self.doubtful,
            "end_conflict": round(self.end_conflict, 3),
            "bodies": [{"name": n, "found": b.found, "centre_ras": [round(float(v), 1) for v in b.centre_ras],
                        "volume_ml": round(b.volume_ml, 2),
                        "level_probabilities": [round(float(p), 3) for p in b.probabilities]}
                       for n, b in zip(names, self.bodies)],
            "levels_not_found": missing,
            "run_scores": {k: round(v, 3) for k, v in self.run_scores.items()},
        }


def _column_axis(centres: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Unit direction of the column through the body centres (weighted PCA), pointing superior."""
    if len(centres) < 2:
        return np.array([0.0, 0.0, 1.0])
    mean = np.average(centres, axis=0, weights=weights)
    _, _, vt = np.linalg.svd((centres - mean) * np.sqrt(weights)[:, None], full_matrices=False)
    axis = vt[0]
    return axis if axis[2] >= 0 else -axis


def _pieces(prob: np.ndarray, body: np.ndarray, params: DecodingParameters) -> tuple[np.ndarray, int]:
    """Label map of candidate pieces: connected components of the body mask (components far
    smaller than a vertebral body dropped at once: an untrained or noisy network leaves thousands
    of specks), each split by level when two or more levels hold a real share of it."""
    comp, n = ndimage.label(body, structure=STRUCTURE_6)
    if n == 0:
        return comp, 0
    idx = comp[body]
    lev = prob[:, body].argmax(axis=0)
    counts = np.bincount(idx * N_LEVELS + lev, minlength=(n + 1) * N_LEVELS).reshape(n + 1, N_LEVELS)
    sizes = counts.sum(1)
    sizes[0] = 0
    reference = float(np.median(np.sort(sizes)[::-1][:N_LEVELS]))
    ids = np.zeros((n + 1, N_LEVELS), np.int32)
    next_id = 1
    for c in np.flatnonzero(sizes >= params.min_volume_fraction * reference):
        strong = np.flatnonzero(counts[c] >= params.split_fraction * sizes[c])
        if len(strong) <= 1:
            ids[c, :] = next_id
            next_id += 1
            continue
        # each voxel goes to the strong level nearest to its own most probable level
        for level in range(N_LEVELS):
            ids[c, level] = next_id + int(np.argmin(np.abs(strong - level)))
        next_id += len(strong)
    out = np.zeros_like(comp)
    out[body] = ids[idx, lev]
    return out, next_id - 1


def _as_uint8(probabilities: np.ndarray) -> np.ndarray:
    if probabilities.dtype == np.uint8:
        return probabilities
    return np.round(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)


def decode_levels(probabilities: np.ndarray, image: Image, params: DecodingParameters = DecodingParameters(),
                  context: np.ndarray | None = None) -> LevelDecoding:
    """``probabilities``: (5, *image.array.shape) uint8 0..255 (or float 0..1), one map per level;
    ``context``: the same for "above L1" and "below L5" (2, ...), used when params.context_weight > 0."""
    prob = _as_uint8(probabilities)
    if context is not None and context.shape != (2, *prob.shape[1:]):
        raise ValueError(f"context maps {context.shape} do not match the level maps {prob.shape}")
    shape = prob.shape[1:]
    # summed over levels: a body the network cannot place (0.45 L3 / 0.4 L4) is still a body
    body = prob.sum(axis=0, dtype=np.uint16) >= params.threshold * 255
    box = mask_box(body)  # 0.3 ms; ndimage.find_objects 3 ms on a 381 mm scan's grid
    if box is None:
        return LevelDecoding(np.zeros(shape, np.uint8), 0.0, True, 0)
    # everything below runs inside the bounding box of the body mask
    corner = np.array([b.start for b in box])
    sub = Image(np.empty((0, 0, 0)), image.spacing, tuple(image.ijk_to_lps_points([corner[::-1]])[0]),
                image.direction.copy()) if corner.any() else image
    decoded = _decode_box(prob[(slice(None), *box)], body[box], sub, params,
                          None if context is None else _as_uint8(context)[(slice(None), *box)])
    labels = np.zeros(shape, np.uint8)
    labels[box] = decoded.labels
    decoded.labels = labels
    return decoded


def _decode_box(prob: np.ndarray, body: np.ndarray, image: Image, params: DecodingParameters,
                context: np.ndarray | None = None) -> LevelDecoding:
    shape = prob.shape[1:]
    pieces, n = _pieces(prob, body, params)
    if n == 0:
        return LevelDecoding(np.zeros(shape, np.uint8), 0.0, True, 0)
    flat = pieces.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(n + 2))
    members = [order[bounds[i]:bounds[i + 1]] for i in range(1, n + 1)]
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    probs_flat = prob.reshape(N_LEVELS, -1)

    def describe(vox: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        k, j, i = np.unravel_index(vox, shape)
        centre = image.ijk_to_ras_points([[i.mean(), j.mean(), k.mean()]])[0]
        return probs_flat[:, vox].mean(axis=1) / 255.0, centre, len(vox) * voxel_ml

    raw = [(vox, *describe(vox)) for vox in members if len(vox)]
    volumes = np.array([r[3] for r in raw])
    reference = float(np.median(np.sort(volumes)[::-1][:N_LEVELS]))
    raw = [r for r in raw if r[3] >= params.min_volume_fraction * reference]
    centres = np.array([r[2] for r in raw])
    axis = _column_axis(centres, np.array([r[3] for r in raw]))
    # each piece's extent along the column from its voxels (5th-95th percentile: robust to specks)
    affine = image.ijk_to_ras_points(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float))
    steps = (affine[1:] - affine[0]) @ axis  # mm along the column per step in i, j, k
    origin = float(affine[0] @ axis)
    bodies = []
    for vox, p, centre, volume in raw:
        k, j, i = np.unravel_index(vox, shape)
        t = origin + i * steps[0] + j * steps[1] + k * steps[2]
        lo, hi = np.percentile(t, [5, 95])
        ctx = np.zeros(2) if context is None else context.reshape(2, -1)[:, vox].mean(axis=1) / 255.0
        bodies.append(Body(vox, p, centre, float(centre @ axis), (float(lo), float(hi)), volume, ctx))
    bodies = _merge_same_height(bodies, params)
    bodies.sort(key=lambda b: -b.position_mm)  # superior first
    bodies = _fill_gaps(bodies, params)
    weights = np.asarray(params.run_weights, dtype=float)
    if weights.shape != (N_LEVELS,) or np.any(weights <= 0):
        raise ValueError(f"run_weights must be {N_LEVELS} positive numbers, not {params.run_weights!r}")
    scores = np.array([b.probabilities for b in bodies]) * weights  # (n, 5); missed bodies score 0
    beyond = np.array([b.context for b in bodies]) * params.context_weight  # (n, 2): above L1, below L5
    m = len(bodies)

    def run_score(offset: int) -> float:
        inside = sum(scores[offset + k, k] for k in range(N_LEVELS) if 0 <= offset + k < m)
        return float(inside + beyond[:max(offset, 0), 0].sum() + beyond[max(offset + N_LEVELS, 0):, 1].sum())

    run_scores = {o: run_score(o) for o in range(-N_LEVELS, m + 1)}
    best = max(run_scores, key=lambda o: (run_scores[o], -abs(o)))
    neighbours = [run_scores[o] for o in (best - 1, best + 1) if o in run_scores]
    confidence = (run_scores[best] - max(neighbours)) / float(weights.sum())  # 0..1 whatever the weights
    labels = np.zeros(int(np.prod(shape)), np.uint8)
    for k in range(N_LEVELS):
        i = best + k
        if 0 <= i < m and bodies[i].found:
            labels[bodies[i].voxels] = k + 1
    ends = [bodies[i].probabilities[k] for i, k in ((best - 1, 0), (best + N_LEVELS, N_LEVELS - 1)) if 0 <= i < m]
    conflict = float(max(ends, default=0.0))
    doubtful = confidence < params.doubtful_below or conflict >= params.end_conflict_doubtful
    return LevelDecoding(labels.reshape(shape), float(confidence), bool(doubtful), best, bodies,
                         {f"L1 on body {o}": s for o, s in run_scores.items() if abs(o - best) <= 1}, conflict)


def _merge(a: Body, b: Body) -> Body:
    wa, wb = a.volume_ml, b.volume_ml
    total = wa + wb
    return Body(np.concatenate([a.voxels, b.voxels]), (a.probabilities * wa + b.probabilities * wb) / total,
                (a.centre_ras * wa + b.centre_ras * wb) / total, (a.position_mm * wa + b.position_mm * wb) / total,
                (min(a.extent_mm[0], b.extent_mm[0]), max(a.extent_mm[1], b.extent_mm[1])), total,
                (a.context * wa + b.context * wb) / total)


def _merge_same_height(bodies: list[Body], params: DecodingParameters) -> list[Body]:
    """Pieces whose extents along the column overlap by more than ``same_height_overlap`` of the
    smaller one lie at one vertebral level: one body (largest pieces absorb smaller ones)."""
    bodies = sorted(bodies, key=lambda b: -b.volume_ml)
    merged: list[Body] = []
    for piece in bodies:
        for n, body in enumerate(merged):
            overlap = min(piece.extent_mm[1], body.extent_mm[1]) - max(piece.extent_mm[0], body.extent_mm[0])
            smaller = min(piece.extent_mm[1] - piece.extent_mm[0], body.extent_mm[1] - body.extent_mm[0])
            if smaller > 0 and overlap > params.same_height_overlap * smaller:
                merged[n] = _merge(body, piece)
                break
        else:
            merged.append(piece)
    return merged


def _fill_gaps(bodies: list[Body], params: DecodingParameters) -> list[Body]:
    """Insert missed bodies where consecutive bodies lie ``gap_factor`` median spacings apart."""
    if len(bodies) < 3:
        return bodies
    positions = np.array([b.position_mm for b in bodies])
    spacing = float(np.median(-np.diff(positions)))
    out = [bodies[0]]
    for prev, body in zip(bodies[:-1], bodies[1:]):
        gap = prev.position_mm - body.position_mm
        if spacing > 0 and gap > params.gap_factor * spacing:
            missed = int(round(gap / spacing)) - 1
            for m in range(1, missed + 1):
                t = prev.position_mm - m * gap / (missed + 1)
                w = m / (missed + 1)
                out.append(Body(None, np.zeros(N_LEVELS), prev.centre_ras * (1 - w) + body.centre_ras * w, t,
                                (t, t), 0.0))
        out.append(body)
    return out


# ---- from the network's grid to the input's ----------------------------------------------------

UNNAMED = 255  # a body voxel of no named level (above L1, below L5, noise): never grown into


def _grid_coordinates(grid: Image, target: Image) -> list[tuple[int, np.ndarray]]:
    """For each array axis of ``target``: (the array axis of ``grid`` it runs along, the grid's
    continuous index at every target index). The two grids must be axis-aligned (the network grid
    is the input's, reoriented to the canonical layout and rescaled in-plane)."""
    unit = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    mapped = grid.lps_to_ijk_points(target.ijk_to_lps_points(unit))  # grid (i, j, k) of target's
    steps = mapped[1:] - mapped[0]
    out = []
    for axis in range(3):  # target array axis; its ijk axis is 2 - axis
        row = steps[2 - axis]
        along = int(np.argmax(np.abs(row)))
        if np.abs(np.delete(row, along)).max() > 1e-6 * np.abs(row[along]):
            raise ValueError("level decoding: the probabilities' grid is not axis-aligned with the image")
        out.append((2 - along, mapped[0, along] + row[along] * np.arange(target.array.shape[axis])))
    return out


# logit of each uint8 probability (clipped half a step inside 0..255): levels interpolated as logits,
# as the input-grid decoding saw them (bilinear logits), not as probabilities (which would move a
# 0.4 outline by up to a quarter of a network pixel where the logits outside are strongly negative)
_P = (np.clip(np.arange(256.0), 0.5, 254.5)) / 255.0
LOGIT_OF_UINT8 = np.log(_P / (1.0 - _P))


def _summed_probability_at(probs: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    """Sum over levels of sigmoid(level logits interpolated linearly) at points given by their
    continuous indices along the three grid axes (edge values beyond the first / last centre)."""
    lows, weights = [], []
    for axis, c in enumerate(coords):
        c = np.clip(c, 0, probs.shape[axis + 1] - 1)
        low = np.floor(c).astype(np.int64)
        lows.append(low)
        weights.append(c - low)
    logits = np.zeros((probs.shape[0], len(coords[0])))
    for corner in range(8):
        up = [(corner >> axis) & 1 for axis in range(3)]
        w = np.prod([weights[a] if up[a] else 1 - weights[a] for a in range(3)], axis=0)
        if not w.any():  # e.g. along the slices: the network's are the input's
            continue
        idx = tuple(np.minimum(lows[a] + up[a], probs.shape[a + 1] - 1) for a in range(3))
        logits += w * LOGIT_OF_UINT8[probs[(slice(None), *idx)]]
    return (1.0 / (1.0 + np.exp(-logits))).sum(axis=0)


def labels_onto_image(labels: np.ndarray, probs: np.ndarray, threshold: float, grid: Image, image: Image,
                      mask: np.ndarray, boxes: list | None = None) -> np.ndarray:
    """Decoded levels on the network grid (``labels``; ``probs`` the level maps there, uint8) ->
    the input grid. An input voxel is body when ``mask`` (the network's labels on the input grid:
    one level above 0.5, from bilinear logits) holds it, or else when its level probabilities,
    interpolated, sum to ``threshold`` (the outline of the decoding's body mask, drawn on the input
    grid); it takes the level of the nearest grid voxel, grid levels first grown one voxel in-plane
    into the background (an outline voxel may lie nearest to a grid voxel just outside) but not
    into body voxels of no named level (above L1, below L5, noise). Only the levels' bounding box
    is visited, and only voxels next to a level are interpolated. ``boxes``: receives that box on
    the input grid (every labelled voxel lies inside it)."""
    box = mask_box(labels > 0)
    out = np.zeros(image.array.shape, np.uint8)
    if box is None:
        return out
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # one voxel of margin
    crop = np.where(probs[(slice(None), *box)].sum(axis=0, dtype=np.uint16) >= threshold * 255, UNNAMED, 0)
    crop = crop.astype(np.uint8)
    named = labels[box] > 0
    crop[named] = labels[box][named]
    grown = ndimage.grey_dilation(np.where(crop == UNNAMED, 0, crop), footprint=np.ones((1, 3, 3), bool))
    crop = np.where(crop == 0, grown, crop)
    crop[crop == UNNAMED] = 0
    picks, axes, target, coords = [None] * 3, [0] * 3, [], [None] * 3
    for axis, (grid_axis, coord) in enumerate(_grid_coordinates(grid, image)):
        index = np.rint(coord).astype(np.int64)
        inside = np.flatnonzero((index >= box[grid_axis].start) & (index < box[grid_axis].stop))
        if not len(inside):
            return out
        picks[grid_axis], axes[axis] = index[inside] - box[grid_axis].start, grid_axis
        target.append(slice(int(inside[0]), int(inside[-1]) + 1))
        coords[axis] = (grid_axis, coord[inside[0]:inside[-1] + 1])
    target = tuple(target)
    levels = crop[np.ix_(*picks)].transpose(axes)
    body = mask[target].copy()
    ask = np.nonzero((levels > 0) & ~body)
    at = [None] * 3
    for axis, (grid_axis, coord) in enumerate(coords):
        at[grid_axis] = coord[ask[axis]]
    body[ask] = _summed_probability_at(probs, at) >= threshold
    out[target] = np.where(body, levels, 0)
    if boxes is not None:
        boxes.append(target)
    return out


# ---- steps (registered by name; see steps.py) ----------------------------------------------------

@step("level_decoding", needs_probabilities="network")
def _level_decoding_step(ctx: StepContext) -> None:
    """L1..L5 as one consecutive run over the bodies (issue 21). Decoded on the network's own
    grid (5 maps never resampled; about half the voxels of a 1 mm input), the levels then carried
    onto the input grid (labels_onto_image)."""
    probs = ctx.maps.get("probabilities")
    grid = ctx.maps_grids.get("probabilities", ctx.image)
    if probs is None:  # no probabilities (labels only): the decoding still enforces one run
        probs, grid = np.stack([(ctx.result.labels.array == k).astype(np.uint8) * 255 for k in range(1, 6)]), ctx.image
    params = DecodingParameters(**ctx.settings.get("level_decoding", {}))
    decoded = decode_levels(probs, grid, params)
    boxes = []
    if grid is not ctx.image:
        decoded.labels = labels_onto_image(decoded.labels, probs, params.threshold, grid, ctx.image,
                                           ctx.result.labels.array > 0, boxes)
    set_labels(ctx, decoded.labels, boxes[0] if boxes else None)
    ctx.result.summaries["level_decoding"] = decoded.summary()
    ctx.result.summaries["level_confidence"] = round(decoded.level_confidence, 4)
    if decoded.doubtful:
        why = (f"the body beyond one end of L1-L5 looks like that end's level too "
               f"(probability {decoded.end_conflict:.2f})" if decoded.end_conflict >= params.end_conflict_doubtful
               else "the run of L1-L5 shifted by one level scores almost as well")
        ctx.result.warnings.append(f"level count doubtful: level confidence {decoded.level_confidence:.2f}; {why}; "
                                   "check the levels against T12 (last rib) and the sacrum")
