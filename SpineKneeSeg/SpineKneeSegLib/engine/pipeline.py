"""One run of one task on one case: load -> validate -> weights -> network -> postprocess -> write.

This is the single code path behind the CLI, the Slicer panel (which runs the CLI in a separate
process) and the end-to-end tests.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SpineKneeSegLib import __version__
from SpineKneeSegLib.core.atomic import (
    HeldLock,
    atomic_directory,
    check_writable_dir,
    output_lock,
)
from SpineKneeSegLib.core.beside import run_beside
from SpineKneeSegLib.core.errors import AlreadyFinished, InputError
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import import_seconds as lazy_import_seconds
from SpineKneeSegLib.core.memory import imports_done
from SpineKneeSegLib.core.progress import Progress, pause_point
from SpineKneeSegLib.core.tables import Table
from SpineKneeSegLib.engine.cards import TaskCard, with_checkpoint_labels
from SpineKneeSegLib.engine.hooks import INPUT_CHECKS, LABEL_DECODERS, PLAIN_VARIANT
from SpineKneeSegLib.engine.steps import needs_probabilities


@dataclass
class RunOptions:
    device: str = "auto"
    weights: str | None = None
    aux_weights: dict = field(default_factory=dict)  # auxiliary model name -> checkpoint path
    scene: bool = False
    echo: int | None = None
    series: str | None = None
    image_type: str | None = None  # the ImageType value whose images to read (one contrast of a Dixon series)
    batch_size: int = 8
    threads: int | None = None
    waive_checks: tuple[str, ...] = ()  # input checks the user vouches for (e.g. --skull-stripped yes)
    input_settings: dict = field(default_factory=dict)  # for the input checks (e.g. {"invert": "auto"})
    fast: bool = False  # skip optional refinements (fast_mode_plan): offered on CPU / small GPUs
    weights_dir: str | None = None  # extra folder of registered weights (offline copies), hash-checked
    dicom_seg: bool = True  # write segmentation.dcm (DICOM-SEG) when the input is a DICOM series
    pixel_mm: float | None = None  # 2D inputs: the true pixel size (PNG/JPEG carry none)
    fuse_views: tuple[str, ...] | None = None  # planes for multi-view fusion (None: the task's; (): off)
    overwrite: bool = False  # replace a finished result already in the output folder
    startup_s: float | None = None  # the process's start-up before run_case (interpreter, imports), when known
    # "bfloat16": networks under bfloat16 autocast where the device computes it natively (else
    # float32, with a warning); the model cards' figures are float32's
    precision: str = "float32"
    every_slice: bool = False  # the network on every slice, whole (no slice growth, no column window)
    # the command line's: slicer-core's start-up and the MRML writers (and a DICOM-SEG) in a child
    # forked after the input checks, beside the run (engine/writer_process.py); in-process elsewhere
    writer_process: bool = False


@dataclass(frozen=True)
class FastModePlan:
    overrides: dict  # preprocessing overrides (after the checkpoint's own)
    skip_auxiliary: tuple[str, ...]  # optional auxiliary models not run
    skipped: tuple[str, ...]  # what is skipped, in words (panel tooltip, report)


def run_precision(requested: str, device) -> tuple[str, str | None]:
    """(the precision the networks run in, a warning when it is not the one asked for): bfloat16
    only where ``device`` computes it natively; emulated it would be slower than float32."""
    from SpineKneeSegLib.engine.inference import PRECISIONS, native_bfloat16

    if requested not in PRECISIONS:
        raise InputError(f"unknown precision {requested!r} (one of {', '.join(PRECISIONS)})")
    if requested == "bfloat16" and not native_bfloat16(device):
        return "float32", f"bfloat16 asked for, but {device} has no native bfloat16: ran in float32"
    return requested, None


def fast_mode_plan(card: TaskCard) -> FastModePlan:
    """What fast mode turns off for ``card``: only optional refinements, never the network itself,
    so a task with nothing optional runs the same either way (``skipped`` is then empty)."""
    overrides, skipped = {}, []
    if card.preprocessing.bias_correction:
        overrides["bias_correction"] = None
        skipped.append("N4 bias-field correction")
    if card.preprocessing.crop_window:
        overrides["crop_window"] = None
        skipped.append("joint-centre detection pass (window centred on the field of view)")
    if card.preprocessing.fusion_planes:
        overrides["fusion_planes"] = ()
        skipped.append("multi-view fusion (acquisition plane only)")
    # a seed variant (knee's fibula model) runs only when the user gives it, so fast mode keeps it
    aux = tuple(a.name for a in card.auxiliary if not a.required and not a.seed_variant and a.fast_skips)
    skipped += [f"optional {name} model" for name in aux]
    return FastModePlan(overrides, aux, tuple(skipped))


@dataclass
class RunResult:
    labels: Image
    layers: dict[str, Image] = field(default_factory=dict)  # the card's label_layers (overlapping structures)
    tables: list[Table] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)  # {"label", "ras", "description", "attributes"}
    # measured distances drawn on a radiograph's overlay: {"label", "from_ras", "to_ras"}
    segments: list[dict] = field(default_factory=list)
    steps_network_s: float = 0.0  # networks run inside post-processing steps (counted as network time)
    summaries: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # {label value: a box holding all its voxels in ``labels``} when a step knew them (the clean-up's
    # components): the overlays then need not scan the volume for them (0.036 s on the knee DESS)
    label_boxes: dict | None = None


# ---- loading and validation ------------------------------------------------------------

def load_inputs(card: TaskCard, paths: list[str], options: RunOptions) -> list[Image]:
    from SpineKneeSegLib.core.image_io import read_image

    required = [spec for spec in card.inputs if spec.required]
    if not (len(required) <= len(paths) <= len(card.inputs)):
        names = ", ".join(f"{s.name}{'' if s.required else ' (optional)'}" for s in card.inputs)
        raise InputError(f"task {card.name} takes {names}; got {len(paths)} input(s)")

    def read(path):
        return read_image(path, echo=options.echo, series=options.series, image_type=options.image_type)

    if len(paths) > 1:  # FLAIR + T1: decompression and ITK reading release the GIL (0.23 -> 0.14 s)
        with ThreadPoolExecutor(len(paths)) as pool:
            images = list(pool.map(read, paths))
    else:
        images = [read(paths[0])]
    if options.pixel_mm is not None:
        images = [with_pixel_size(image, options.pixel_mm, path) for image, path in zip(images, paths)]
    for n, (spec, path) in enumerate(zip(card.inputs, paths)):
        validate_input(card, spec, images[n], path)
        for check in spec.checks:
            if check not in options.waive_checks:
                images[n] = INPUT_CHECKS[check].check(images[n], path, options.input_settings) or images[n]
    return drop_non_overlapping(card, images, paths, explicit_weights=options.weights is not None)


MIN_COVERAGE = 0.5  # share of the first input's foreground a further input must cover


def drop_non_overlapping(card: TaskCard, images: list[Image], paths, explicit_weights: bool) -> list[Image]:
    """A further input (a T1) that does not overlap the first (the FLAIR) would feed the network an
    empty channel (the same T1 moved 1 m gave 179 lesions, 22.6 mL, instead of 2.0 mL): it is left out, with a warning,
    so the single-input model runs; with explicit --weights (which may need it) the run is refused."""
    from SpineKneeSegLib.engine.preprocessing import coverage

    kept = [images[0]]
    for spec, image, path in zip(card.inputs[1:], images[1:], paths[1:]):
        share = coverage(images[0], image)
        image.meta.setdefault("checks", {})["overlap"] = (f"covers {100 * share:.0f} % of the {card.inputs[0].name}'s "
                                                          f"foreground (at least {100 * MIN_COVERAGE:.0f} % needed)")
        if share >= MIN_COVERAGE:
            kept.append(image)
            continue
        why = (f"covers only {100 * share:.0f} % of the {card.inputs[0].name}'s foreground (at least "
               f"{100 * MIN_COVERAGE:.0f} % needed): the two are not in one space (register it first)")
        if explicit_weights:
            raise InputError(why, path)
        images[0].meta.setdefault("warnings", []).append(f"{spec.name} {path} not used: {why}; "
                                                         f"ran on the {card.inputs[0].name} alone")
    return kept


def extra_inputs(card: TaskCard, images: list[Image], names, paths) -> tuple[tuple[Image, ...], list[str]]:
    """The further inputs the weights take as channels (``extra_inputs``, e.g. ["t1"]), each
    resampled onto the first input's grid; and the names of given inputs the weights ignore."""
    from SpineKneeSegLib.engine.preprocessing import resample_onto

    given = {spec.name: image for spec, image in zip(card.inputs, images)}
    missing = [n for n in names if n not in given]
    if missing:
        raise InputError(f"these {card.name} weights take {', '.join(missing)} as well; give it after "
                         f"{card.inputs[0].name}", paths[0])
    extra = tuple(resample_onto(given[n], images[0]) for n in names)
    unused = [spec.name for spec in card.inputs[1:len(images)] if spec.name not in names]
    return extra, unused


def fusion_planes(card: TaskCard, planes) -> tuple[str, ...]:
    """Validated ``--fuse-views``: known planes, and a task whose labels are one softmax."""
    planes = tuple(planes)
    unknown = [p for p in planes if p not in ("sagittal", "coronal", "axial")]
    if unknown:
        raise InputError(f"--fuse-views: unknown plane(s) {', '.join(unknown)} (sagittal, coronal, axial)")
    if planes and card.label_activation != "softmax":
        raise InputError(f"--fuse-views: task {card.name} has {card.label_activation} labels; fusion averages "
                         "softmax probabilities")
    return planes


def with_pixel_size(image: Image, pixel_mm: float, path) -> Image:
    """A 2D image with the pixel size the user gave (square pixels), replacing the file's."""
    if not pixel_mm > 0:
        raise InputError(f"--pixel-mm must be positive, got {pixel_mm}")
    if not image.is_2d:
        raise InputError("--pixel-mm applies to 2D images (radiographs) only; this is a 3D volume", path)
    meta = dict(image.meta)
    meta["warnings"] = [w for w in meta.get("warnings", []) if "--pixel-mm" not in w]
    meta["spacing_note"] = f"pixel size {pixel_mm:g} mm given with --pixel-mm (file said {image.spacing[0]:g} x " \
                           f"{image.spacing[1]:g} mm)"
    return Image(image.array, (pixel_mm, pixel_mm, image.spacing[2]), image.origin, image.direction, meta)


def label_variant(card: TaskCard, weights) -> str:
    """The checkpoint's label layout (metadata "variant"), when the card knows other layouts."""
    if not card.label_variants:
        return PLAIN_VARIANT
    variant = weights.checkpoint.get("metadata", {}).get("variant", PLAIN_VARIANT)
    if variant not in card.label_variants:
        raise InputError(f"weights are a {variant!r} model; task {card.name} runs "
                         f"{', '.join(card.label_variants)} models", weights.path)
    return variant


def validate_input(card: TaskCard, spec, image: Image, path) -> None:
    from SpineKneeSegLib.engine.preprocessing import reformatted_from, resolve_plane, slice_axis

    if spec.dims == 3 and image.is_2d:
        raise InputError(f"is a 2D image (shape {image.array.shape[1:]}); task {card.name} needs a 3D volume", path)
    if spec.dims == 2 and not image.is_2d:
        raise InputError(f"is a 3D volume with {image.array.shape[0]} slices; task {card.name} needs a single "
                         "2D image", path)
    modality = check_modality(card, spec, image, path)
    if not np.issubdtype(image.array.dtype, np.number) or np.issubdtype(image.array.dtype, np.complexfloating):
        raise InputError(f"has non-real voxel type {image.array.dtype}", path)
    if np.issubdtype(image.array.dtype, np.floating) and not np.all(np.isfinite(image.array)):
        raise InputError("contains NaN or infinite values", path)
    if spec.dims == 3 and image.meta.get("spacing_source") == "none":  # DICOM without PixelSpacing
        raise InputError("has no PixelSpacing: the in-plane voxel size is unknown, so volumes and distances would "
                         "be invented", path)
    if not all(np.isfinite(s) and s > 0 for s in image.spacing):
        raise InputError(f"voxel size {tuple(image.spacing)} mm is not positive: volumes and distances would be "
                         "invented", path)
    check_orthogonal_axes(image, path)  # the file's own faults first, then the task's size rules
    axis = slice_axis(image, card.preprocessing.plane)
    n_slices = image.array.shape[axis]
    in_plane = [s for i, s in enumerate(image.array.shape) if i != axis]
    if n_slices < card.preprocessing.min_slices:
        plane = resolve_plane(image, card.preprocessing.plane)
        raise InputError(f"has {n_slices} slice(s) along the {plane} normal; task {card.name} "
                         f"needs at least {card.preprocessing.min_slices}", path)
    if min(in_plane) < card.preprocessing.min_size:
        acquired = reformatted_from(image, card.preprocessing.plane)
        slices = (f"its {resolve_plane(image, card.preprocessing.plane)} reformats (the series is {acquired}; "
                  f"task {card.name} runs such a series so) are" if acquired else "slices are")
        raise InputError(f"{slices} {in_plane[0]}x{in_plane[1]} pixels; task {card.name} needs at least "
                         f"{card.preprocessing.min_size}x{card.preprocessing.min_size}", path)
    if float(image.array.max()) == float(image.array.min()):
        raise InputError("is constant (every voxel has the same value): nothing to segment", path)
    spacing_note = image.meta.get("spacing_note")
    checks = {"voxel_type": "real numbers, all finite",
              "spacing_mm": "positive" + (f"; {spacing_note}" if spacing_note else " (from the file)"),
              "axes": f"orthogonal (within |cos| {AXES_TOLERANCE})"}
    if modality:
        checks["modality"] = modality
    if card.preprocessing.normalisation in ("zscore", "percentile", "percentile-field"):
        from SpineKneeSegLib.engine.preprocessing import (
            ONE_AFFINE_NORMALISATIONS,
            input_normalisation_stats,
            normalisation_stats,
        )

        try:  # on the network's canonical slices, remembered for its input (one pass, not two)
            centre, spread = (input_normalisation_stats(image, card.preprocessing.plane, card.preprocessing.normalisation)
                              if card.preprocessing.normalisation in ONE_AFFINE_NORMALISATIONS
                              else normalisation_stats(image.array, card.preprocessing.normalisation))
        except InputError as exc:
            raise InputError(str(exc), path) from None
        checks["intensity"] = f"{card.preprocessing.normalisation} centre {centre:.4g}, spread {spread:.4g} (float64)"
    image.meta["checks"] = checks


UNSTATED_MODALITIES = ("", "OT")  # missing, or "other": converters and anonymisers write these


def check_modality(card: TaskCard, spec, image: Image, path) -> str | None:
    """A DICOM series of another modality (a CT given to an MR task, a single MR slice to an X-ray
    task) is refused: the model has never seen such images, and its labels would look plausible and
    mean nothing. An unstated modality is run, with a warning. Other formats carry no modality.
    Returns what the check found, for the report (None: nothing to check)."""
    modality = image.meta.get("modality")
    if modality is None:
        return None
    modality = str(modality).strip().upper()
    known = spec.known_modalities
    if modality in known:
        return f"DICOM Modality {modality}"
    if modality in UNSTATED_MODALITIES:
        stated = f"DICOM Modality {modality}" if modality else "no DICOM Modality"
        image.meta.setdefault("warnings", []).append(
            f"{stated}: the file does not say it is {spec.modality}; the {card.name} model knows "
            f"{'/'.join(known)} images only, so check that the input is one")
        return f"{stated}: not stated as {'/'.join(known)} (warned)"
    raise InputError(f"is a {modality} series (DICOM Modality {modality}); task {card.name} reads "
                     f"{'/'.join(known)} images: its model has never seen {modality}, and its labels would be "
                     f"meaningless", path)


AXES_TOLERANCE = 1e-3  # |cos| between voxel axes (0.06 degrees): DICOM / NIfTI rounding stays far below


def check_orthogonal_axes(image: Image, path) -> None:
    """Refuse a sheared grid (non-orthogonal direction matrix, e.g. a gantry tilt kept as acquired):
    the writers store orthogonal axes, so the labels would not lie on the input's voxels."""
    d = np.asarray(image.direction, float)
    d = d / np.linalg.norm(d, axis=0)
    cosines = np.abs(d.T @ d - np.eye(3))
    a, b = np.unravel_index(int(np.argmax(cosines)), cosines.shape)
    if cosines[a, b] > AXES_TOLERANCE:
        angle = float(np.degrees(np.arccos(np.clip(d[:, a] @ d[:, b], -1, 1))))
        raise InputError(f"its voxel axes are not orthogonal (axes {min(a, b)} and {max(a, b)} meet at {angle:.2f} "
                         f"degrees, a shear of {abs(90 - angle):.2f}): outputs on an orthogonal grid would not lie "
                         "on its voxels; resample it onto an orthogonal grid first", path)


# ---- the run ---------------------------------------------------------------------------

def run_case(card: TaskCard, inputs: list[str], output_dir: str | Path, options: RunOptions | None = None,
             progress: Progress | None = None, on_start: Callable[[], None] | None = None) -> dict:
    """Run ``card`` on ``inputs`` and write every output into ``output_dir`` atomically.

    Returns the report (also written as report.json). The output folder is locked for the run
    (a second run into it is refused while this one lives); a finished result already there is
    replaced only with ``options.overwrite``. ``on_start`` is called once the run holds the folder
    (a cohort's "started" line: never for a case another run holds or has finished)."""
    options = options or RunOptions()
    progress = progress or Progress("none")
    output_dir = Path(output_dir)
    check_writable_dir(output_dir)
    with output_lock(output_dir) as lock, contextlib.ExitStack() as run_scope:
        earlier = finished_result(output_dir)
        if earlier is not None and not options.overwrite:
            raise AlreadyFinished(f"already holds a finished result ({earlier.summary}); pass --overwrite to "
                                  "replace it, or choose another output folder", output_dir)
        if on_start is not None:
            on_start()
        return _run_locked(card, inputs, output_dir, options, progress, earlier.outputs if earlier else (), run_scope,
                           lock)


@dataclass(frozen=True)
class EarlierResult:
    outputs: tuple[str, ...]  # its files and folders (report.json's "outputs"), removed when not rewritten
    summary: str
    task: str = ""
    inputs: tuple[str, ...] = ()  # the paths it was run on (report.json's inputs)
    warnings: tuple[str, ...] = ()  # report.json's warnings

    @property
    def warnings_text(self) -> str:
        return warnings_text(self.warnings)

    def other_inputs(self, task: str, inputs: list[str]) -> str | None:
        """What makes this result another's than a run of ``task`` on ``inputs``, or None: a cohort's
        re-run must not keep, as finished, the result of an input that the manifest has changed."""
        if self.task and self.task != task:
            return f"it is a {self.task} result"
        if self.inputs and not (len(self.inputs) == len(inputs) and all(map(_same_input, self.inputs, inputs))):
            return f"it was made from {', '.join(self.inputs)}"
        return None


def warnings_text(warnings) -> str:
    """A report's warnings on one line (a cohort's summary.tsv column: a tab or newline in one is a space)."""
    return " | ".join(" ".join(str(w).split()) for w in warnings)


def _same_input(earlier: str, now: str) -> bool:
    if Path(earlier).is_absolute():
        return os.path.realpath(earlier) == os.path.realpath(now)
    return Path(earlier).name == Path(now).name  # an older report's path relative to a working folder now unknown


def finished_result(folder: Path, report_name: str = "report.json") -> EarlierResult | None:
    """The result an earlier run left in ``folder`` (its report.json), or None."""
    import datetime

    report = Path(folder) / report_name
    if not report.is_file():
        return None
    try:
        earlier = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = {}
    earlier = earlier if isinstance(earlier, dict) else {}
    outputs = tuple(str(o).rstrip("/") for o in earlier.get("outputs", []) if "/" not in str(o).rstrip("/"))
    when = datetime.datetime.fromtimestamp(report.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    inputs = [i for i in earlier.get("inputs", []) if isinstance(i, dict)]
    warnings = earlier.get("warnings", [])
    return EarlierResult(outputs + (report_name,), f"{earlier.get('task', 'unknown task')}, written {when}",
                         str(earlier.get("task", "")), tuple(str(i.get("path", "")) for i in inputs),
                         tuple(map(str, warnings)) if isinstance(warnings, list) else ())


def _run_locked(card: TaskCard, inputs: list[str], output_dir: Path, options: RunOptions, progress: Progress,
                stale: tuple[str, ...], run_scope: contextlib.ExitStack, lock: HeldLock) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # inputs are read and checked before torch and MRML load: a refusal comes in well under a second
    progress.stage("loading")
    lazy_before = lazy_import_seconds()
    images = load_inputs(card, [str(p) for p in inputs], options)
    # an input check's first use of a lazy module (X-ray polarity: scipy.ndimage, ~0.1-0.3 s cold;
    # pydicom for a DICOM input) is an import: start-up with torch's below, not loading
    lazy_imports_s = lazy_import_seconds() - lazy_before
    image = images[0]
    unknown = set(options.aux_weights) - {aux.name for aux in card.auxiliary}
    if unknown:
        raise InputError(f"task {card.name} has no auxiliary model {', '.join(sorted(unknown))}")
    off_but_required = [a.name for a in card.auxiliary if a.required and _turned_off(options.aux_weights.get(a.name))]
    if off_but_required:
        raise InputError(f"task {card.name} cannot run without its auxiliary model {', '.join(off_but_required)}")

    with_dicom_seg = bool(options.dicom_seg and image.meta.get("is_dicom"))
    writer = None
    if options.writer_process:  # slicer-core's start-up on the other core (None where it cannot fork)
        from SpineKneeSegLib.engine.writer_process import writer_process

        writer = run_scope.enter_context(writer_process(image, with_dicom_seg))
    t_imports = time.perf_counter()  # importing torch, slicer-core and VTK is start-up (timings_s.startup)
    import scipy.ndimage  # noqa: F401  (the steps' lazy module, core/lazy.py: imported here, with the rest)
    import torch

    if writer is None:
        from SpineKneeSegLib.mrml import nodes  # noqa: F401  (slicer-core and VTK: imports, not the run)

        if with_dicom_seg:
            warm_dicom_seg_writer()

    from SpineKneeSegLib.engine.inference import (
        load_network,
        pick_device,
        probability_maps,
        segment_slices,
        window_centre_key,
    )
    from SpineKneeSegLib.engine.upright import search_upright, upright_note, upright_unknown
    from SpineKneeSegLib.engine.weights import resolve_weights

    if options.threads:
        torch.set_num_threads(options.threads)
    imports_done()  # the command line's garbage collector, paused for the imports, resumes
    imports_s = time.perf_counter() - t_imports + lazy_imports_s
    t_start += imports_s
    # the scene/logic set-up (none inside Slicer) is part of the wait: in total, itemised
    t_startup = time.perf_counter()
    if writer is None:
        from SpineKneeSegLib.mrml.harness import get_app

        get_app()
    timings["mrml_startup"] = time.perf_counter() - t_startup  # with a writer process: its wait, below
    weights = resolve_weights(card, options.weights, weights_dir=options.weights_dir,  # after input validation
                              inputs_given=len(images))
    fast = fast_mode_plan(card) if options.fast else None
    aux_weights = {aux.name: None if _turned_off(options.aux_weights.get(aux.name))  # NAME=none
                   else resolve_weights(card, options.aux_weights.get(aux.name), aux.name,
                                        weights_dir=options.weights_dir)
                   for aux in card.auxiliary if not (fast and aux.name in fast.skip_auxiliary)}
    card = with_checkpoint_labels(card, weights.checkpoint.get("metadata", {}), weights.path)
    variant = label_variant(card, weights)
    decoder = LABEL_DECODERS.get(variant)  # None: the card's own labels
    needs = decoder.channels if decoder else card.output_channels
    if weights.network["config"].get("out_channels", card.output_channels) != needs:
        raise InputError(f"weights have {weights.network['config'].get('out_channels')} output channels; task "
                         f"{card.name} with labels {', '.join(card.label_names.values())} needs "
                         f"{needs}", weights.path)
    device = pick_device(options.device)
    precision, precision_warning = run_precision(options.precision, device)
    net = load_network(weights, device, precision)
    aux_nets = {name: load_network(w, device, precision) for name, w in aux_weights.items() if w is not None}
    timings["load"] = time.perf_counter() - t_start

    progress.stage("preprocessing")
    pre_overrides = {**weights.preprocessing, **(fast.overrides if fast else {}), "label_variant": variant}
    if options.fuse_views is not None:
        pre_overrides["fusion_planes"] = fusion_planes(card, options.fuse_views)
    if options.every_slice:
        pre_overrides.update(grow_min_px=None, column_px=None, reformat_slice_mm=None)
    t = time.perf_counter()
    extra, unused = extra_inputs(card, images, weights.preprocessing.get("extra_inputs", ()), inputs)
    resample_s = time.perf_counter() - t
    step_nets = {name: (aux_net, aux_weights[name]) for name, aux_net in aux_nets.items()
                 if card.auxiliary_model(name).output == "step"}  # run by a post-processing step

    def network_and_steps(image: Image, progress: Progress | None):
        """The networks and the post-processing steps on ``image``: (network output, result), with
        the steps' seconds in the output's network_s / postprocess_s."""
        out = segment_slices(card, image, net, device, pre_overrides, options.batch_size, progress, extra,
                             keep_probabilities=needs_probabilities(card.postprocessors))
        maps, maps_grids = {}, {}
        if out.probabilities is not None:  # the network's own probabilities, for level / lesion decoding
            maps["probabilities"] = out.probabilities
            maps_grids["probabilities"] = image if out.probabilities_grid is None else out.probabilities_grid
        for name, aux_net in aux_nets.items():
            if name in step_nets:
                continue
            if card.auxiliary_model(name).output == "labels":  # same preprocessing and window as the main network
                window = out.summaries.get("crop_window", {}).get(window_centre_key(pre_overrides.get(
                    "crop_window", card.preprocessing.crop_window)))
                centre = None if window is None else np.asarray(window) * np.array([-1.0, -1.0, 1.0])
                aux_out = segment_slices(card, image, aux_net, device, {**pre_overrides, "label_variant": PLAIN_VARIANT,
                                                                         **aux_weights[name].preprocessing},
                                         options.batch_size, progress, centre_lps=centre)
                maps[name], maps_grids[name] = aux_out.labels, image
                out.bias_s += aux_out.bias_s
            else:
                pre = {**card.preprocessing.__dict__, **aux_weights[name].preprocessing}
                aux_out = probability_maps(pre, image, aux_net, device, options.batch_size, progress)
                maps[name], maps_grids[name] = aux_out.maps, aux_out.maps_grid
            for attr in ("network_s", "preprocess_s", "postprocess_s"):
                setattr(out, attr, getattr(out, attr) + getattr(aux_out, attr))
        if progress:
            progress.stage("postprocessing")
        t = time.perf_counter()
        if decoder:  # the steps then see the card's labels (e.g. the knee's bones split from "any bone")
            out.labels, decoded = decoder.decode(out.labels, image)
            out.summaries["label_variant"] = {"variant": variant, **decoded}
        result = postprocess(card, image, out.labels, maps, maps_grids,
                             settings=weights.checkpoint.get("metadata", {}).get("postprocessing", {}),
                             networks=step_nets, labels_box=out.labels_box)
        out.network_s += result.steps_network_s
        out.postprocess_s += time.perf_counter() - t - result.steps_network_s
        return out, result

    out, result = network_and_steps(image, progress)
    first = out  # its seconds, and every search attempt's, are the run's (the chosen one is among them)
    search_s = {"network": 0.0, "preprocess": 0.0, "postprocess": 0.0}
    if card.upright_summary and upright_unknown(image) and not result.summaries[card.upright_summary]["passed"]:
        def attempt(turned: Image):
            tried = network_and_steps(turned, None)
            for key in search_s:
                search_s[key] += getattr(tried[0], f"{key}_s")
            return tried

        (out, result), found = search_upright(image, attempt, (out, result), card.upright_summary)
        result.summaries["upright_search"] = found
        if found["chosen"] != "as stored":
            result.warnings.append(upright_note(found))
    timings["preprocess"] = first.preprocess_s + resample_s + search_s["preprocess"]
    timings["network"] = first.network_s + search_s["network"]
    if pre_overrides.get("bias_correction", card.preprocessing.bias_correction):
        timings["bias_correction"] = first.bias_s
    t = time.perf_counter()
    result.warnings[:0] = list(image.meta.get("warnings", [])) + list(out.warnings)
    result.summaries.update(out.summaries)
    if fast and fast.skipped:
        result.warnings.append(f"fast mode: skipped {'; '.join(fast.skipped)}")
    if precision_warning:
        result.warnings.append(precision_warning)
    if "skull_stripping" in image.meta:
        result.summaries["skull_stripping"] = image.meta["skull_stripping"]
    if unused:
        result.warnings.append(f"input(s) {', '.join(unused)} were validated but are not used by these weights")
    timings["postprocess"] = first.postprocess_s + search_s["postprocess"] + time.perf_counter() - t

    progress.stage("writing")
    t = time.perf_counter()
    report = {
        "task": card.name, "status": "ok",
        "inputs": [describe_input(p, im) for p, im in zip(inputs, images)],
        "versions": versions(),
        "device": str(device),
        "precision": precision,
        "fast_mode": list(fast.skipped) if fast else False,
        "weights": {"path": str(weights.path), "sha256": weights.sha256, "registered": weights.entry is not None,
                    "registry_version": weights.entry.version if weights.entry else None,
                    "auxiliary": {name: ({"path": str(w.path), "sha256": w.sha256,
                                          "registry_version": w.entry.version if w.entry else None}
                                         if w is not None else None) for name, w in aux_weights.items()}},
        "labels": {str(s.value): s.name for s in card.labels},
        "warnings": result.warnings,
        "summaries": result.summaries,
        "outputs": [],
    }
    for w in result.warnings:
        progress.log(w, "warning")
    try:
        with atomic_directory(output_dir, stale=stale) as stage, contextlib.ExitStack() as beside:
            pause_point("staged")
            # the DICOM-SEG (highdicom, pure Python) is built while the MRML writers and the PNG
            # encoder write the rest: in a forked child where that is safe (a thread would take
            # turns with them for the GIL), else in a thread
            if writer is not None:  # it writes the MRML outputs and the DICOM-SEG; this process the rest
                beside.callback(writer.stop)  # on a failure, stopped before the staging folder goes
                writer.submit(card, result, stage, options.scene)
                own = write_outputs(card, image, result, stage, options.scene, mrml=False)
                done = writer.result()
                # to the child's last file, less the wait for its start-up, which is mrml_startup's
                timings["write"] = time.perf_counter() - t - done["waited_s"]
                report["outputs"] = merged_outputs(own, done["written"])
                timings["mrml_startup"] += done["waited_s"]
                seg_outcome = done["dicom_seg"]
            else:
                seg_job = (beside.enter_context(run_beside(write_dicom_seg_output, card, image, result, stage))
                           if with_dicom_seg else None)
                report["outputs"] = write_outputs(card, image, result, stage, options.scene)
                timings["write"] = time.perf_counter() - t
                seg_outcome = seg_job.result() if seg_job is not None else None
            if seg_outcome is not None:
                timings["dicom_seg"], problem = seg_outcome
                if problem is None:
                    report["outputs"].insert(report["outputs"].index("report.json"), "segmentation.dcm")
                else:
                    report["warnings"].append(problem)
                    progress.log(problem, "warning")
            # total: what the user waits for from the end of the imports to the last file written
            timings["total"] = time.perf_counter() - t_start
            report["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            report["timings_s"]["startup"] = round((options.startup_s or 0.0) + imports_s, 4)
            report["timings_s"]["startup_measured"] = options.startup_s is not None  # else: the late imports only
            (stage / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            lock.check(output_dir)  # a run that lost its lock to another does not commit over that one's
    except Exception as exc:  # a writer's own message (VTK, ITK) hides a full disk or a lost permission
        problem = storage_problem(output_dir)
        if problem is None:
            raise
        raise OSError(problem[0], problem[1], str(output_dir)) from exc
    if writer is None:
        release_scene()
    progress.done(status="ok", output=str(output_dir))
    return report


def release_scene() -> None:
    """Free this run's MRML nodes once its last file is written (outside ``total``): otherwise the
    next run in the process (a manifest, the benchmark) pays for clearing them, e.g. 45 ms of a
    lumbar run after the knee's 21 M-voxel segmentation."""
    from SpineKneeSegLib.mrml.harness import SCENE_LOCK, get_app

    with SCENE_LOCK:
        get_app().scene.Clear(0)


MIN_FREE_BYTES = 64 << 20  # below this a failed write is put down to a full disk


def storage_problem(folder: Path) -> tuple[int, str] | None:
    """(errno, reason) when the output folder's file system is full or not writable, else None."""
    import errno
    import os
    import shutil

    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if shutil.disk_usage(where).free < MIN_FREE_BYTES:
            return errno.ENOSPC, "No space left on device"
    except OSError:
        return None
    if not os.access(where, os.W_OK):
        return errno.EACCES, "Permission denied"
    return None


def warm_dicom_seg_writer() -> None:
    """Import highdicom and load the DICOM standard tables it and pydicom's code dictionaries parse
    on first use: library start-up (a cold CLI run: 0.3-0.4 s import, then 0.6 s of JSON and
    0.14 s of pydicom's concept module inside the first DICOM-SEG),
    timed with the other imports; once per process (the panel's second run has them)."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return  # the writer says so in the report's warnings
    try:  # a warm-up only: whatever fails here, the writer meets (and reports) in its own time
        from pydicom.sr.codedict import codes

        codes.cid7162.ArtificialIntelligence  # noqa: B018  (pydicom's SNOMED/DCM concept tables: 0.14 s)
        from highdicom import _standard_utils  # private, cached loaders (highdicom 0.28)

        for loader in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
            getattr(_standard_utils, loader)()
    except Exception:
        pass


def write_dicom_seg_output(card: TaskCard, image: Image, result: RunResult, folder: Path) -> tuple[float, str | None]:
    """segmentation.dcm beside the other outputs: (seconds, None), or (seconds, why not) when it
    cannot be written (highdicom missing, a multi-frame or incomplete source): the run still
    succeeds and says why in its warnings."""
    t = time.perf_counter()
    problem = None
    try:
        from SpineKneeSegLib.engine.dicomseg import can_write, write_dicom_seg

        ok, why = can_write(image)
        if not ok:
            raise ValueError(why)
        write_dicom_seg(image, result.labels.array, card, folder / "segmentation.dcm")
    except ImportError:
        problem = "no DICOM-SEG written: highdicom is not installed (pip install highdicom)"
    except ValueError as exc:
        problem = f"no DICOM-SEG written: {exc}"
    return round(time.perf_counter() - t, 4), problem


def _turned_off(aux_weight) -> bool:
    """--aux-weights NAME=none: run without that optional auxiliary model."""
    return isinstance(aux_weight, str) and aux_weight.strip().lower() == "none"


def postprocess(card: TaskCard, image: Image, labels: np.ndarray, maps: dict[str, np.ndarray] | None = None,
                maps_grids: dict[str, Image] | None = None, settings: dict | None = None,
                networks: dict | None = None, labels_box: tuple | None = None) -> RunResult:
    """Run the card's registered steps in order (steps.py). ``maps``/``maps_grids``: probability
    maps by name ("probabilities": the main network's; auxiliary models' by model name) and their
    grids; ``settings``: per-step parameters a checkpoint carries (metadata "postprocessing",
    e.g. thresholds chosen by cross-validation); ``networks``: auxiliary models the steps run
    (name -> (network, weights)); their seconds come back as ``steps_network_s``. ``labels_box``: a box
    holding every label of ``labels``, when known (the steps then scan only it)."""
    from SpineKneeSegLib.engine.steps import STEPS, StepContext

    ctx = StepContext(card, image, RunResult(image.with_array(labels)), labels, dict(maps or {}),
                      dict(maps_grids or {}), dict(settings or {}), networks=dict(networks or {}))
    if labels_box is not None:
        ctx.known_box = (ctx.result.labels.array, labels_box)
    for name in card.postprocessors:
        STEPS[name].run(ctx)
    result = ctx.result
    result.steps_network_s = ctx.network_s
    if ctx.made_components is not None and ctx.made_components[0] is result.labels.array:
        result.label_boxes = {value: c[0] for value, c in ctx.made_components[1].items()}
    from SpineKneeSegLib.core.labels import present_labels

    present = sorted({v for array in (result.labels.array, *(layer.array for layer in result.layers.values()))
                      for v in present_labels(array)})
    result.summaries["segments_present"] = [card.label_names[v] for v in present if v in card.label_names]
    missing = [s.name for s in card.labels if s.value not in present]
    if missing and card.warn_missing_labels:
        result.warnings.append(f"no voxels predicted for: {', '.join(missing)}")
    return result


def write_outputs(card: TaskCard, image: Image, result: RunResult, folder: Path, scene: bool,
                  mrml: bool = True) -> list[str]:
    """Every output goes through the same MRML adapter as the Slicer module (one writer at a time
    in the shared scene: a batch's workers take turns). ``mrml=False``: labels.nii.gz and the
    overlays only (a writer process writes the rest: ``merged_outputs``)."""
    if not mrml:
        return _write_outputs(card, image, result, folder, scene, mrml)
    from SpineKneeSegLib.mrml.harness import SCENE_LOCK

    with SCENE_LOCK:
        return _write_outputs(card, image, result, folder, scene)


def write_mrml_outputs(card: TaskCard, image: Image, result: RunResult, folder: Path, scene: bool,
                       overlays: bool = True) -> list[str]:
    from SpineKneeSegLib.mrml.harness import SCENE_LOCK

    with SCENE_LOCK:
        return _write_mrml_outputs(card, image, result, folder, scene, overlays)


def merged_outputs(own: list[str], mrml: list[str]) -> list[str]:
    """The outputs in the order of one process's write_outputs: labels.nii.gz first, the overlays
    (``own``'s others) before the scene file and report.json."""
    first, overlays = own[:1], own[1:]
    at = next((i for i, name in enumerate(mrml) if name in ("scene.mrb", "report.json")), len(mrml))
    return first + mrml[:at] + overlays + mrml[at:]


def _write_outputs(card: TaskCard, image: Image, result: RunResult, folder: Path, scene: bool,
                   mrml: bool = True) -> list[str]:
    from SpineKneeSegLib.core.image_io import write_image

    # SimpleITK writes (and compresses) labels.nii.gz, and Pillow encodes the overlays, mostly without
    # holding the GIL: beside the MRML writers
    io = ThreadPoolExecutor(1)
    labels_job = io.submit(write_image, result.labels.with_array(result.labels.array.astype(np.uint8)),
                           folder / "labels.nii.gz")
    overlays_job = io.submit(write_overlays, card, image, result, folder)
    try:
        written = _write_mrml_outputs(card, image, result, folder, scene, overlays=False) if mrml else []
    finally:
        io.shutdown(wait=True)
    labels_job.result()  # their errors, if any
    return merged_outputs(["labels.nii.gz"] + overlays_job.result(), written)


def write_overlays(card: TaskCard, image: Image, result: RunResult, folder: Path) -> list[str]:
    if "overlays/" not in card.outputs:
        return []
    from SpineKneeSegLib.engine.render import save_label_overlays

    # the folder (as the card names it), then its PNGs
    return ["overlays/"] + save_label_overlays(folder, "overlays", image, result.labels, card, boxes=result.label_boxes,
                                               layers=result.layers, points=result.points,
                                               segments=result.segments)


def _write_mrml_outputs(card: TaskCard, image: Image, result: RunResult, folder: Path, scene: bool,
                        overlays: bool = True) -> list[str]:
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.mrml import nodes
    from SpineKneeSegLib.mrml.harness import get_app

    written = []
    app = get_app()
    mrml_scene = app.scene
    mrml_scene.Clear(0)
    # the labels lie on the input's grid, so they carry its reference geometry themselves; the input
    # volume node (a 0.07 s copy of a 7 M-voxel brain) is made only for the scene file
    volume = nodes.image_to_volume_node(mrml_scene, image, "input") if scene else None
    layers = []
    for name, values in card.label_layers:  # overlapping structures: a file and a segmentation layer each
        layer = result.layers[name]
        write_image(layer.with_array(layer.array.astype(np.uint8)), folder / f"{name}.nii.gz")
        written.append(f"{name}.nii.gz")
        layers.append((layer, [spec for spec in card.labels if spec.value in values]))
    main_specs = [spec for spec in card.labels if all(spec.value not in values for _, values in card.label_layers)]
    seg = nodes.labels_to_segmentation_node(mrml_scene, result.labels, main_specs, f"{card.name} segmentation",
                                           reference_volume=volume, layers=layers)
    nodes.save_node(seg, folder / "segmentation.seg.nrrd")
    written.append("segmentation.seg.nrrd")
    for markups_file in (o for o in card.outputs if o.endswith(".mrk.json")):  # foramina, femoral heads
        markups = nodes.points_to_markups_node(
            mrml_scene, [p["ras"] for p in result.points], [p["label"] for p in result.points],
            descriptions=[p["description"] for p in result.points], name=markups_file[: -len(".mrk.json")],
            attributes=[p["attributes"] for p in result.points])
        nodes.save_node(markups, folder / markups_file)
        written.append(markups_file)
    for table in result.tables:
        node = nodes.rows_to_table_node(mrml_scene, table.rows, table.columns, table.name)
        nodes.save_node(node, folder / table.file_name)
        written.append(table.file_name)
    if overlays:
        written += write_overlays(card, image, result, folder)
    if scene:
        nodes.save_scene_mrb(mrml_scene, folder / "scene.mrb")
        written.append("scene.mrb")
    written.append("report.json")
    return written


def describe_input(path, image: Image) -> dict:
    """The report's record of an input: its absolute path, geometry and checks, and for DICOM the
    series and echo read (which of a folder's series was segmented)."""
    described = {"path": os.path.abspath(path), "shape_kji": list(image.array.shape), "spacing": list(image.spacing),
                 "origin": list(image.origin), "direction": image.direction.round(6).tolist(),
                 "dtype": str(image.array.dtype), "checks": image.meta.get("checks", {})}
    if image.meta.get("is_dicom"):
        described["dicom_series"] = {"uid": image.meta.get("series_uid"),
                                     "description": image.meta.get("series_description"),
                                     "modality": image.meta.get("modality"),
                                     "echo": image.meta.get("echo"),
                                     **({"image_type": image.meta["image_type"]} if "image_type" in image.meta
                                        else {})}
        if image.meta.get("ignored_dicom"):
            described["dicom_series"]["not_images_left_out"] = image.meta["ignored_dicom"]
    return described


def versions() -> dict:
    import SimpleITK
    import torch

    out = {"spinekneeseg": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "SimpleITK": SimpleITK.Version_VersionString()}
    try:
        from importlib.metadata import version

        out["slicer-core"] = version("slicer-core")
    except Exception:  # inside Slicer: Slicer's own version
        try:
            import slicer

            out["slicer"] = slicer.app.applicationVersion
        except Exception:
            pass
    return out
