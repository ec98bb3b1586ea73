"""Slice-wise network inference with memory proportional to one batch of slices."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.progress import Progress
from SpineKneeSegLib.engine.cards import TaskCard
from SpineKneeSegLib.engine.models import build_network, fold_batch_norm
from SpineKneeSegLib.engine.preprocessing import (
    ONE_AFFINE_NORMALISATIONS,
    NetworkInput,
    acquisition_planes,
    bias_correct,
    canonical_image,
    canonical_orientation,
    crop_in_plane,
    foreground_box,
    from_network_grid,
    input_normalisation_stats,
    in_plane_spacing,
    network_grid,
    network_grid_image,
    network_label_box,
    pad_to,
    reformatted_from,
    resolve_plane,
    window_centre_rc,
)
from SpineKneeSegLib.engine.weights import LoadedWeights


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from SpineKneeSegLib.core.errors import InputError

        raise InputError("--device cuda requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


@dataclass
class NetworkOutput:
    labels: np.ndarray | None = None  # uint8, input array shape
    # probability maps (uint8 0..255, (C, *grid shape)) of auxiliary models, kept on the network
    # grid: the seed localises foramina there, and resampling them would only cost time
    maps: np.ndarray | None = None
    maps_grid: Image | None = None
    # the label network's own per-label probabilities (uint8 0..255), kept when a postprocessor
    # decodes them: (C, *input shape), or with keep_probabilities="network" (C, *grid shape) on the
    # network's own grid ``probabilities_grid`` (lumbar levels: decoded there, no resampling)
    probabilities: np.ndarray | None = None
    probabilities_grid: Image | None = None
    labels_box: tuple | None = None  # a box (the input's axes) holding every label, when known
    network_s: float = 0.0
    preprocess_s: float = 0.0
    postprocess_s: float = 0.0
    bias_s: float = 0.0  # bias-field correction (not in preprocess_s)
    summaries: dict = field(default_factory=dict)  # e.g. crop_window, bias_correction: for the report
    warnings: list = field(default_factory=list)


PRECISIONS = ("float32", "bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: oneDNN's avx512_bf16 / AMX kernels;
    elsewhere it is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without oneDNN
            return False
    return False


class AutocastNetwork(torch.nn.Module):
    """The network's forward pass under bfloat16 autocast, its logits handed back as float32 (every
    step after the network stays as it is)."""

    def __init__(self, net: torch.nn.Module, device_type: str):
        super().__init__()
        self.net, self.device_type = net, device_type

    @property
    def size_multiple(self) -> int:
        return getattr(self.net, "size_multiple", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.net(x)
        return out.float()


class SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Inside it, the random initialisers do nothing: for a network built only to have its weights
    loaded (a strict load_state_dict then overwrites every parameter they would fill; lumbar-levels'
    build 22 -> 14 ms). Torch function modes are per thread: other threads build as usual."""

    SKIPPED = frozenset({torch.Tensor.uniform_, torch.Tensor.normal_, torch.nn.init.uniform_, torch.nn.init.normal_,
                         torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_, torch.nn.init.xavier_uniform_,
                         torch.nn.init.xavier_normal_, torch.nn.init.trunc_normal_, torch.nn.init.orthogonal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def load_network(weights: LoadedWeights, device: torch.device, precision: str = "float32") -> torch.nn.Module:
    """``precision`` "bfloat16": the forward pass under bfloat16 autocast (about 2x faster on CPUs
    with native bfloat16; the figures in the model cards are float32's)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({' | '.join(PRECISIONS)})")
    with SkipRandomInit():
        net = build_network(weights.network["factory"], weights.network["config"])
    net.load_state_dict(weights.checkpoint["state_dict"])  # strict: every parameter is overwritten
    # batch norm folded into the convolutions (inference only); channels-last: oneDNN's fast layout
    # for convolutions with few channels (knee-bones' 16-channel U-Net on 2 CPU cores: 14.3 -> 8.6 s
    # per 80 slices of 224 x 224); inputs follow it in _batches
    net = fold_batch_norm(net.eval()).to(device).to(memory_format=torch.channels_last)
    return AutocastNetwork(net, device.type) if precision == "bfloat16" else net


class SliceGrowth:
    """Which slices the network runs, decided as it goes: first the ``start`` middle slices, then
    ``step`` more on each side per batch, until on each side the outermost slice run has fewer
    than ``min_px`` labelled pixels. For a structure in one block of neighbouring slices (the
    lumbar column in a sagittal stack) the slices beyond it are never run; they stay background.
    Nothing in the middle slices (a column far off the middle, or none): every slice runs."""

    def __init__(self, n: int, min_px: int, start: int = 4, step: int = 2):
        self.n, self.min_px, self.step = n, min_px, step
        self.lo = max(n // 2 - start // 2, 0)
        self.hi = min(self.lo + start, n)  # slices lo..hi-1 are run (or queued)
        self.labelled: dict[int, int] = {}  # slice -> labelled pixels
        self.fallback = False
        self.columns: tuple[int, int, int] | None = None  # (first, end, of) network columns run after the middle
        self.batch_columns: tuple[int, int] | None = None  # the columns the batch just yielded ran on (None: all)

    def record(self, index, labelled_px) -> None:
        self.labelled.update({int(i): int(c) for i, c in zip(index, labelled_px)})

    def _open(self, edge: int) -> bool:
        return self.labelled[edge] >= self.min_px

    def batches(self, batch_size: int):
        """Slice index arrays, each decided after the previous one's ``record``."""
        yield np.arange(self.lo, self.hi)
        if max(self.labelled[i] for i in range(self.lo, self.hi)) < self.min_px:
            self.fallback = True
            rest = np.array([i for i in range(self.n) if i not in self.labelled], dtype=int)
            for start in range(0, len(rest), batch_size):
                yield rest[start:start + batch_size]
            return
        while True:
            index = []
            if self.lo > 0 and self._open(self.lo):
                index += range(max(self.lo - self.step, 0), self.lo)
            if self.hi < self.n and self._open(self.hi - 1):
                index += range(self.hi, min(self.hi + self.step, self.n))
            if not index:
                return
            self.lo, self.hi = min(self.lo, index[0]), max(self.hi, index[-1] + 1)
            yield np.array(index)

    def column_window(self, labelled: torch.Tensor, width: int | None, padded_w: int, multiple: int) -> None:
        """After the middle slices: a window ``width`` network columns wide (a multiple of
        ``multiple``, on the same pooling grid as the whole slice) centred on the columns
        ``labelled`` (N, h, w) there; none when the slice is not wider or nothing was labelled."""
        cols = torch.nonzero(labelled.any(dim=1).any(dim=0)).flatten()
        if not width or padded_w <= width or cols.numel() == 0:
            return
        if width % multiple:
            raise ValueError(f"column_px {width} is not a multiple of the network's {multiple}")
        centre = (int(cols.min()) + int(cols.max()) + 1) / 2
        first = int(np.clip(round((centre - width / 2) / multiple) * multiple, 0, padded_w - width))
        self.columns = (first, first + width, padded_w)

    def summary(self) -> dict:
        run = sorted(self.labelled)
        return {"slices_run": len(run), "of": self.n, "first": run[0], "last": run[-1],
                **({"network_columns": list(self.columns)} if self.columns else {}),
                "min_px": self.min_px, "every_slice": self.fallback or len(run) == self.n,
                "note": "nothing in the middle slices: every slice run" if self.fallback else
                "run outward from the middle until a slice with fewer labelled pixels than min_px on each side" +
                ("; after the middle slices only network_columns (first, end, of) were run" if self.columns else "")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batches(image: Image, net: torch.nn.Module, device: torch.device, pre: dict, batch_size: int,
             progress: Progress | None, timings: dict, slices: np.ndarray | None = None, centre_lps=None,
             extra: tuple[Image, ...] = ()):
    """Yield (slice indices, logits on the unpadded network grid, grid, in-plane box, grid image)
    for every batch of slices; accumulate preprocessing and forward-pass seconds in ``timings``.
    With ``crop_foreground`` only foreground slices inside the foreground box are run; ``slices``
    (canonical indices) runs only those, or a ``SliceGrowth`` decides them batch by batch. With
    ``network_px`` the network sees a square ``crop_mm`` window centred on ``centre_lps`` (None:
    the field-of-view centre). ``extra``:
    further inputs on ``image``'s grid (e.g. a T1), each normalised on its own and appended as
    ``context_slices`` more channels."""
    t0 = time.perf_counter()
    canon, _ = canonical_image(image, pre["plane"])  # slices along axis 0, canonical in-plane orientation
    n = canon.array.shape[0]
    found = foreground_box(canon.array) if pre.get("crop_foreground") else None
    run, box = found if found else (np.arange(n), (0, canon.array.shape[1], 0, canon.array.shape[2]))
    growth = slices if isinstance(slices, SliceGrowth) else None
    if slices is not None and growth is None:
        run = np.asarray(slices)
    cropped = crop_in_plane(canon, box)
    # statistics from the whole (uncropped) volumes; normalised batch by batch on the network grid
    first = (input_normalisation_stats(image, pre["plane"], pre["normalisation"])
             if pre["normalisation"] in ONE_AFFINE_NORMALISATIONS else None)
    source = NetworkInput.of([canon.array] + [canonical_image(e, pre["plane"])[0].array for e in extra],
                             pre["normalisation"], pre.get("stats"), pre["context_slices"], first).crop(box)
    centre = window_centre_rc(cropped, centre_lps) if centre_lps is not None else None
    grid = network_grid(cropped, 0, pre["in_plane_spacing_mm"], getattr(net, "size_multiple", 1),
                        pre.get("network_px"), pre.get("crop_mm"), centre)
    # outside the image the window shows the normalised image minimum: what air (the MRI
    # background) looks like to the network, whereas 0 after z-score would be average tissue
    pad_value = source.normalised_min() if grid.window is not None else 0.0
    timings["pre"] += time.perf_counter() - t0
    plan = growth.batches(batch_size) if growth else (run[s:s + batch_size] for s in range(0, len(run), batch_size))
    done = 0
    for index in plan:
        t = time.perf_counter()
        x = source.batch(index, grid, pad_value).to(device)
        x = pad_to(x, grid.padded_hw).contiguous(memory_format=torch.channels_last)
        if growth:
            growth.batch_columns = growth.columns[:2] if growth.columns else None
        windowed = bool(growth and growth.columns)
        if windowed:  # the network's input: the column window only
            c0, c1, _ = growth.columns
            width, x = x.shape[-1], x[..., c0:c1].contiguous(memory_format=torch.channels_last)
        _sync(device)
        t_net = time.perf_counter()
        timings["pre"] += t_net - t
        logits = tiled_forward(net, x, pre.get("tile_px"))
        _sync(device)
        timings["net"] += time.perf_counter() - t_net
        if windowed:  # beyond the window: no label (probability ~1e-13)
            inside, logits = logits, logits.new_full((*logits.shape[:-1], width), -30.0)
            logits[..., c0:c1] = inside
        logits = logits[..., : grid.network_hw[0], : grid.network_hw[1]]
        if growth:  # sigmoid labels: a pixel is labelled where some channel's logit is > 0
            labelled = logits.amax(dim=1) > 0
            growth.record(index, labelled.sum(dim=(1, 2)).tolist())
            if done == 0:
                growth.column_window(labelled, pre.get("column_px"), grid.padded_hw[1],
                                     getattr(net, "size_multiple", 1))
        yield index, logits, grid, box, cropped
        done += len(index)
        if progress:
            progress.step("inference", done, n if growth else len(run))


SATURATED_LOGIT = 7.0  # 255 x sigmoid(-7) = 0.23 rounds to 0, 255 x sigmoid(7) = 254.8 to 255


def uint8_sigmoid(logits: torch.Tensor) -> np.ndarray:
    """round(255 x sigmoid) as uint8, same shape; in numpy, one thread: a chain of torch
    element-wise ops cost ~10 ms a batch more on 2 busy cores (each waits for both threads).
    Only logits within +-7 are computed, beyond it the result is 0 or 255: a trained network
    leaves under 1 % of them inside (a 381 mm lumbar scan's level maps: 16 -> 9 ms a run)."""
    x = logits.float().cpu().numpy()
    # axes in memory order (the network's output is channels-last): the masked gather then walks
    # memory in order; the result is returned in the caller's axis order
    order = np.argsort([-abs(s) for s in x.strides], kind="stable")
    x = x.transpose(order)
    out = (x >= SATURATED_LOGIT).view(np.uint8)
    out *= np.uint8(255)
    inside = x > -SATURATED_LOGIT
    inside &= x < SATURATED_LOGIT
    q = np.exp(-x[inside])
    q += 1.0
    np.divide(255.0, q, out=q)
    out[inside] = np.rint(q, out=q)
    return out.transpose(np.argsort(order))


def _labels_of(card: TaskCard, image: Image, net, device, pre: dict, batch_size: int, progress, timings: dict,
               slices=None, centre_lps=None, extra: tuple[Image, ...] = (), probabilities: list | None = None,
               probabilities_on: str = "input", boxes: list | None = None) -> np.ndarray:
    """Label map in the canonical layout (slices not run stay background). ``probabilities``: a
    list that receives the sigmoid probabilities of a sigmoid task (uint8) and their grid:
    on the canonical grid, (C, *canonical shape), and None; with ``probabilities_on="network"``
    on the network grid, (C, slices, *network_hw), and that grid as an Image (canonical).
    ``boxes``: receives a box (canonical layout) holding every label written."""
    labels = np.zeros(canonical_image(image, pre["plane"])[0].array.shape, dtype=np.uint8)
    probs, grid_image = None, None
    for index, logits, grid, (r0, _, c0, _), cropped in _batches(image, net, device, pre, batch_size, progress,
                                                                  timings, slices, centre_lps, extra):
        t = time.perf_counter()
        # with a window, labels only near the network's own (probabilities on the input grid: all);
        # likewise beside probabilities kept on the network grid (the lumbar levels, whose raw labels
        # only the transitional check reads): the whole slice as the window, resampled near the
        # labels only (0.03 s of a 381 x 381 scan; grid_sample, not F.interpolate: a near tie may differ)
        near_only = probabilities is not None and probabilities_on == "network"
        restrict = near_only or (grid.window is not None and probabilities is None)
        # a batch run on a column window (SliceGrowth) has no label and probability 0 beyond it
        cols = slices.batch_columns if isinstance(slices, SliceGrowth) else None
        cols = (cols[0], min(cols[1], logits.shape[-1])) if cols else (0, logits.shape[-1])
        within = network_label_box(logits_to_labels(logits[..., cols[0]:cols[1]], card.label_activation)) \
            if restrict else None
        if within is not None:
            within = (within[0], within[1], within[2] + cols[0], within[3] + cols[0])
        if within is not None or not restrict:
            sampled = grid if grid.window is not None or not near_only else \
                dataclasses.replace(grid, window=(0.0, 0.0, float(grid.input_hw[0]), float(grid.input_hw[1])))
            out, (a0, a1, b0, b1) = from_network_grid(logits, sampled, within)
            labels[index, r0 + a0:r0 + a1, c0 + b0:c0 + b1] = logits_to_labels(out, card.label_activation).cpu().numpy()
            if boxes is not None and a1 > a0 and b1 > b0:
                hull = [(int(np.min(index)), int(np.max(index)) + 1), (r0 + a0, r0 + a1), (c0 + b0, c0 + b1)]
                boxes[:] = [hull] if not boxes else [[(min(p[0], q[0]), max(p[1], q[1])) for p, q in zip(boxes[0], hull)]]
        if probabilities is not None and probabilities_on == "network":
            if probs is None:
                probs = np.zeros((logits.shape[1], labels.shape[0], *logits.shape[-2:]), np.uint8)
                grid_image = network_grid_image(cropped, grid)
            probs[:, index, :, cols[0]:cols[1]] = uint8_sigmoid(logits[..., cols[0]:cols[1]]).swapaxes(0, 1)
        elif probabilities is not None:
            if probs is None:
                probs = np.zeros((out.shape[1], *labels.shape), np.uint8)
            probs[:, index, r0 + a0:r0 + a1, c0 + b0:c0 + b1] = uint8_sigmoid(out).swapaxes(0, 1)
        timings["post"] += time.perf_counter() - t
    if probabilities is not None:
        probabilities.append((probs, grid_image))
    return labels


def _probabilities_of(image: Image, net, device, pre: dict, batch_size: int, timings: dict, slices=None,
                      centre_lps=None, extra: tuple[Image, ...] = ()) -> np.ndarray:
    """Softmax class probabilities as uint8 0..255, (C, *canonical shape); slices not run and
    pixels outside the window stay 0 (no class)."""
    shape = canonical_image(image, pre["plane"])[0].array.shape
    probs = None
    for index, logits, grid, (r0, _, c0, _), _ in _batches(image, net, device, pre, batch_size, None, timings,
                                                            slices, centre_lps, extra):
        t = time.perf_counter()
        out, (a0, a1, b0, b1) = from_network_grid(torch.softmax(logits, dim=1), grid)
        if probs is None:
            probs = np.zeros((out.shape[1], *shape), np.uint8)
        q = (out * 255).round().to(torch.uint8).cpu().numpy().swapaxes(0, 1)
        probs[:, index, r0 + a0:r0 + a1, c0 + b0:c0 + b1] = q
        timings["post"] += time.perf_counter() - t
    return probs


def _fill_between(probs: np.ndarray, run: np.ndarray) -> None:
    """Linear interpolation along the slice axis (axis 1) between the slices in ``run``."""
    for a, b in zip(run[:-1], run[1:]):
        for i in range(a + 1, b):
            w = (i - a) / (b - a)
            probs[:, i] = np.round((1 - w) * probs[:, a] + w * probs[:, b])


def reformat_slices(card: TaskCard, image: Image, pre: dict) -> np.ndarray | None:
    """The canonical slices to run of a softmax task's reformats (every ~reformat_slice_mm, the
    last included), or None: every slice (no step set, slices already that far apart, or a
    sigmoid task, whose probabilities this path does not keep)."""
    step_mm = pre.get("reformat_slice_mm")
    if not step_mm or card.label_activation != "softmax":
        return None
    view = canonical_image(image, pre["plane"])[0]
    n, step = view.array.shape[0], int(round(step_mm / view.spacing[2]))
    if step < 2:
        return None
    return np.unique(np.r_[np.arange(0, n, step), n - 1])


def fused_labels(card: TaskCard, image: Image, net, device, pre: dict, batch_size: int, progress, timings: dict,
                 centre_lps=None, extra: tuple[Image, ...] = ()) -> tuple[np.ndarray, dict]:
    """Multi-view fusion: class probabilities of the acquisition plane (every slice) and of each
    other plane in ``fusion_planes`` (every ~fusion_slice_mm, linear between) averaged on the
    canonical grid of ``pre["plane"]``; returns labels there and a summary for the report."""
    if card.label_activation != "softmax":
        raise ValueError(f"multi-view fusion needs a softmax task; {card.name} is {card.label_activation}")
    t0 = time.perf_counter()
    main, main_orientation = canonical_image(image, pre["plane"])
    main_plane = resolve_plane(image, pre["plane"])
    acc = _probabilities_of(image, net, device, pre, batch_size, timings, None, centre_lps, extra).astype(np.uint16)
    if progress:
        progress.step("inference", 1, 2)
    summary = {"planes": [main_plane], "slices": [int(main.array.shape[0])]}
    for plane in dict.fromkeys(pre["fusion_planes"]):
        if plane == main_plane:
            continue
        view, orientation = canonical_image(image, plane)
        n = view.array.shape[0]
        step = max(1, int(round(pre["fusion_slice_mm"] / view.spacing[2])))
        run = np.unique(np.r_[np.arange(0, n, step), n - 1])
        probs = _probabilities_of(image, net, device, {**pre, "plane": plane}, batch_size, timings, run,
                                  centre_lps, extra)
        t = time.perf_counter()
        _fill_between(probs, run)
        for c in range(probs.shape[0]):  # the view's canonical layout -> the input's -> the main plane's
            acc[c] += main_orientation.apply(orientation.undo(probs[c]))
        timings["post"] += time.perf_counter() - t
        summary["planes"].append(plane)
        summary["slices"].append(int(len(run)))
    t = time.perf_counter()
    labels = acc.argmax(axis=0).astype(np.uint8)
    timings["post"] += time.perf_counter() - t
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if progress:
        progress.step("inference", 2, 2)
    return labels, summary


def window_centre_key(crop_window: str | None) -> str:
    """The report key of the window centre: "<finder>_centre_ras" (knee: joint_centre_ras), else
    "window_centre_ras"."""
    return f"{crop_window}_centre_ras" if crop_window else "window_centre_ras"


def window_centre(card: TaskCard, image: Image, net, device, pre: dict, batch_size: int,
                  timings: dict) -> tuple[np.ndarray | None, dict, list[str]]:
    """Where the square window goes: (centre in LPS or None = field-of-view centre, report
    summary, warnings). ``crop_window`` names a registered window finder (hooks.py; the knee's
    "joint", seed 000): when the longer in-plane field of view exceeds 1.1 x crop_mm, a coarse pass
    of the same network (every 4th slice of the central half, window = the whole field of view)
    gives the finder its labels and the window is centred where it says; else the field-of-view
    centre is used and no pass is run."""
    from SpineKneeSegLib.engine.hooks import PLAIN_VARIANT, WINDOW_FINDERS

    canon, _ = canonical_image(image, pre["plane"])
    n, h, w = canon.array.shape
    sr, sc = in_plane_spacing(canon, 0)
    fov = max(h * sr, w * sc)
    crop_mm = pre.get("crop_mm") or fov
    fov_centre_lps = canon.ijk_to_lps_points([[(w - 1) / 2.0, (h - 1) / 2.0, (n - 1) / 2.0]])[0]
    info = {"plane": resolve_plane(image, pre["plane"]), "network_px": int(pre["network_px"]),
            "crop_mm": round(float(crop_mm), 3), "field_of_view_mm": [round(h * sr, 2), round(w * sc, 2)],
            "crop_window": pre.get("crop_window")}
    centre_lps, warnings = None, []
    if pre.get("crop_window") is not None and pre["crop_window"] not in WINDOW_FINDERS:
        raise ValueError(f"unknown crop_window {pre['crop_window']!r} ({', '.join(sorted(WINDOW_FINDERS))})")
    if pre.get("crop_window") is None:
        info["method"] = "field-of-view centre"
    elif fov <= 1.1 * crop_mm:
        info["method"] = "field-of-view centre (field of view <= 1.1 x crop_mm: no detection pass)"
    else:
        t = time.perf_counter()
        net_before = timings["net"]
        run = np.arange(n // 4, n - n // 4, 4) if n >= 4 else np.arange(n)
        coarse = _labels_of(card, image, net, device, {**pre, "crop_mm": None}, batch_size, None, timings, run)
        ras, note, found_from = WINDOW_FINDERS[pre["crop_window"]].find(coarse, canon,
                                                                        pre.get("label_variant", PLAIN_VARIANT))
        info["coarse_pass"] = {"slices": [int(i) for i in run], "seconds": round(time.perf_counter() - t, 3),
                               "network_seconds": round(timings["net"] - net_before, 3), "note": note}
        if ras is None:
            info["method"] = f"field-of-view centre (fallback: coarse pass found no {pre['crop_window']})"
            warnings.append(f"{pre['crop_window']} centre not found by the coarse pass ({note}); the crop window is "
                            "centred on the field of view")
        else:
            info["method"] = f"coarse pass ({found_from})"
            centre_lps = np.asarray(ras) * np.array([-1.0, -1.0, 1.0])
    used = fov_centre_lps if centre_lps is None else centre_lps
    ras = np.asarray(used) * np.array([-1.0, -1.0, 1.0])
    info[window_centre_key(pre.get("crop_window"))] = [round(float(v), 2) for v in ras]
    return centre_lps, info, warnings


def _ramp(n: int, overlap: int) -> torch.Tensor:
    """1D blending weights: linear ramps over the overlaps, flat in the middle."""
    w = torch.ones(n)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
        w[:overlap], w[-overlap:] = ramp, ramp.flip(0)
    return w


def tiled_forward(net: torch.nn.Module, x: torch.Tensor, tile: int | None, overlap_fraction: float = 0.25):
    """Forward pass over overlapping square tiles blended with linear ramps (bounded memory on
    large slices); the whole slice at once when ``tile`` is None or the slice already fits."""
    h, w = x.shape[-2:]
    if not tile or (h <= tile and w <= tile):
        return net(x)
    overlap = int(tile * overlap_fraction)
    step = tile - overlap
    starts = lambda n: sorted({min(s, max(n - tile, 0)) for s in range(0, max(n - overlap, 1), step)})  # noqa: E731
    out = weight = None
    for top in starts(h):
        for left in starts(w):
            patch = net(x[..., top:top + tile, left:left + tile])
            ph, pw = patch.shape[-2:]
            wt = (_ramp(ph, overlap if ph == tile else 0)[:, None] * _ramp(pw, overlap if pw == tile else 0)[None])
            wt = wt.to(patch.device)
            if out is None:
                out = torch.zeros(x.shape[0], patch.shape[1], h, w, device=patch.device, dtype=patch.dtype)
                weight = torch.zeros(h, w, device=patch.device, dtype=patch.dtype)
            out[..., top:top + ph, left:left + pw] += patch * wt
            weight[top:top + ph, left:left + pw] += wt
    return out / weight


def logits_to_labels(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """softmax head: channel 0 is background; sigmoid head: one channel per label, a voxel takes
    the most probable label whose probability exceeds 0.5 (logit > 0)."""
    # max().indices: torch's CPU argmax over a non-last dim is ~10x slower
    best = logits.max(dim=1)
    if activation == "softmax":
        return best.indices.to(torch.uint8)
    if activation == "sigmoid":
        return torch.where(best.values > 0, best.indices + 1, 0).to(torch.uint8)
    raise ValueError(f"unknown label activation {activation!r}")


def reformat_note(image: Image, plane: str, acquired: str) -> tuple[dict, str]:
    """The report's record of a run on reformats, and its warning."""
    used = resolve_plane(image, plane)
    row_mm, col_mm = in_plane_spacing(image, canonical_orientation(image, plane).axes[0])
    record = {"acquired": acquired, "network_plane": used, "pixel_mm": [round(row_mm, 3), round(col_mm, 3)],
              "trained_planes": list(acquisition_planes(plane) or (plane,))}
    return record, (f"the series is {acquired}; the model was trained on {' and '.join(record['trained_planes'])} "
                    f"slices only, so it ran on {used} reformats ({row_mm:.2g} x {col_mm:.2g} mm pixels): check "
                    "the result")


@torch.inference_mode()
def segment_slices(card: TaskCard, image: Image, net: torch.nn.Module, device: torch.device,
                   preprocessing: dict | None = None, batch_size: int = 8,
                   progress: Progress | None = None, extra: tuple[Image, ...] = (),
                   centre_lps=None, keep_probabilities: bool | str = False) -> NetworkOutput:
    """Run the label network over every slice; labels on the input's exact grid (logits are
    resampled back, not labels). ``extra``: further input channels on ``image``'s grid (the
    weights' ``extra_inputs``, e.g. a T1 resampled onto the FLAIR). ``centre_lps``: a crop window
    centre already found (a second model reuses the main network's; no coarse pass).
    ``keep_probabilities``: a sigmoid task's probabilities come back too (``probabilities``), on
    the input grid (True or "input") or on the network's own grid ("network": no resampling of
    C maps, ``probabilities_grid`` says where)."""
    pre = {**card.preprocessing.__dict__, **(preprocessing or {})}
    timings = {"pre": 0.0, "net": 0.0, "post": 0.0}
    summaries, warnings = {}, []
    labels_box = None
    probabilities, probabilities_grid = None, None
    orientation = canonical_orientation(image, pre["plane"])
    acquired = reformatted_from(image, pre["plane"])
    if acquired:  # e.g. an axial knee series: the model has never seen axial slices (Training/knee_planes.py)
        summaries["reformatted"], note = reformat_note(image, pre["plane"], acquired)
        warnings.append(note)
    t = time.perf_counter()
    if pre.get("bias_correction"):  # on the canonical image: the same physical image, the same field
        image, info = bias_correct(canonical_image(image, pre["plane"])[0], pre["bias_correction"], pre)
        extra = tuple(canonical_image(e, pre["plane"])[0] for e in extra)  # onto the same canonical grid
    else:
        info = {}
    bias_s = time.perf_counter() - t
    if info:
        summaries["bias_correction"] = {**info, "seconds": round(bias_s, 3)}
    if pre.get("network_px") and centre_lps is None:
        centre_lps, summaries["crop_window"], window_warnings = window_centre(card, image, net, device, pre,
                                                                               batch_size, timings)
        warnings += window_warnings
    slice_mm = canonical_image(image, pre["plane"])[0].spacing[2]
    fused = bool(pre.get("fusion_planes")) and slice_mm <= pre.get("fusion_max_slice_mm", float("inf"))
    sparse = reformat_slices(card, image, pre) if acquired and not fused and not keep_probabilities else None
    if fused:
        labels, summaries["view_fusion"] = fused_labels(card, image, net, device, pre, batch_size, progress, timings,
                                                        centre_lps, tuple(extra))
    elif sparse is not None:  # reformats as close as the series' pixels: every ~reformat_slice_mm, linear between
        probs = _probabilities_of(image, net, device, pre, batch_size, timings, sparse, centre_lps, tuple(extra))
        t = time.perf_counter()
        _fill_between(probs, sparse)
        labels = probs.argmax(axis=0).astype(np.uint8)
        timings["post"] += time.perf_counter() - t
        summaries["reformatted"]["slices_run"] = [int(len(sparse)), int(probs.shape[1])]
    else:
        if pre.get("fusion_planes"):
            summaries["view_fusion"] = {"planes": [resolve_plane(image, pre["plane"])],
                                        "skipped": f"slices {slice_mm:.2f} mm apart, more than "
                                                   f"{pre['fusion_max_slice_mm']} mm: reformats too blurred"}
        kept = [] if keep_probabilities and card.label_activation == "sigmoid" else None
        growth = None
        if pre.get("grow_min_px") is not None:
            if card.label_activation != "sigmoid" or pre.get("crop_foreground"):
                raise ValueError(f"{card.name}: grow_min_px needs sigmoid labels and no crop_foreground")
            growth = SliceGrowth(canonical_image(image, pre["plane"])[0].array.shape[0], pre["grow_min_px"])
        boxes = []
        labels = _labels_of(card, image, net, device, pre, batch_size, progress, timings, slices=growth,
                            centre_lps=centre_lps, extra=tuple(extra), probabilities=kept,
                            probabilities_on="network" if keep_probabilities == "network" else "input", boxes=boxes)
        if boxes:  # canonical -> the input's axes
            labels_box = [None] * 3
            for (start, stop), axis, flip, n in zip(boxes[0], orientation.axes, orientation.flips, labels.shape):
                labels_box[axis] = slice(n - stop, n - start) if flip else slice(start, stop)
            labels_box = tuple(labels_box)
        if growth:
            summaries["slice_growth"] = growth.summary()
        if kept:
            probabilities, probabilities_grid = kept[0]
            if probabilities_grid is None:  # on the canonical grid: back to the input's layout
                t = time.perf_counter()
                probabilities = np.stack([orientation.undo(p) for p in probabilities])
                timings["post"] += time.perf_counter() - t
    return NetworkOutput(labels=np.ascontiguousarray(orientation.undo(labels)), probabilities=probabilities,
                         probabilities_grid=probabilities_grid, labels_box=labels_box, network_s=timings["net"],
                         preprocess_s=timings["pre"], postprocess_s=timings["post"], bias_s=bias_s,
                         summaries=summaries, warnings=warnings)


@torch.inference_mode()
def probability_maps(preprocessing: dict, image: Image, net: torch.nn.Module, device: torch.device,
                     batch_size: int = 8, progress: Progress | None = None) -> NetworkOutput:
    """Sigmoid maps of an auxiliary network (e.g. foramina) as uint8 on the network grid. No
    bias-field correction and no joint search here (no task with auxiliary models uses them): a
    ``network_px`` window is centred on the field of view."""
    timings = {"pre": 0.0, "net": 0.0, "post": 0.0}
    maps, grid, cropped = None, None, None
    n = canonical_image(image, preprocessing["plane"])[0].array.shape[0]
    for index, logits, grid, _, cropped in _batches(image, net, device, preprocessing, batch_size, progress, timings):
        t = time.perf_counter()
        if maps is None:  # (C, slices, h, w) on the canonical network grid; skipped slices stay 0
            maps = np.zeros((logits.shape[1], n, *logits.shape[-2:]), np.uint8)
        maps[:, index] = uint8_sigmoid(logits).swapaxes(0, 1)
        timings["post"] += time.perf_counter() - t
    return NetworkOutput(maps=maps, maps_grid=network_grid_image(cropped, grid),
                         network_s=timings["net"], preprocess_s=timings["pre"], postprocess_s=timings["post"])
