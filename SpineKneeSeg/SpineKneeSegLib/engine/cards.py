"""Declarative task cards and their registry: what each door (panel, CLI, Training/, tests) needs
to know about a task.

A task is a plug-in: its folder under ``tasks/`` registers its card (``register``) and the steps,
window finders, label decoders and input checks the card names (steps.py, hooks.py); the engine
knows no task by name. Label values are fixed project-wide: knee 1 femur, 2 tibia, 3 fibula, 4
patella; spine 1..5 = L1..L5 vertebral bodies; brain 1 = lesion; X-ray 1 = femur (multi-class: 2
hip bone, 3 sacrum).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from SpineKneeSegLib.core.labels import LabelSpec
from SpineKneeSegLib.engine import postprocessing  # noqa: F401  (registers the generic steps)
from SpineKneeSegLib.engine.hooks import check_hooks
from SpineKneeSegLib.engine.steps import check_steps


@dataclass(frozen=True)
class InputSpec:
    name: str
    modality: str
    dims: int  # 3 = volume, 2 = single-slice image (radiograph)
    required: bool = True
    description: str = ""
    checks: tuple[str, ...] = ()  # registered input checks (hooks.py), e.g. "skull_stripped" for FLAIR
    dicom_modalities: tuple[str, ...] = ()  # DICOM Modality values the model knows; () = ``modality`` split on "/"

    @property
    def known_modalities(self) -> tuple[str, ...]:
        return self.dicom_modalities or tuple(m.strip().upper() for m in self.modality.split("/"))


@dataclass(frozen=True)
class Preprocessing:
    """Slice-wise preprocessing shared by inference and Training/.

    ``plane`` picks the slice axis from the direction matrix (the array axis most aligned with the
    plane's normal), so a sagittal task gets sagittal slices whatever the file's axis order;
    ``acquisition`` keeps the acquisition's slice axis (the largest spacing; isotropic: sagittal)
    and shows it like the closest of sagittal/coronal/axial (preprocessing.acquisition_plane);
    ``acquisition:sagittal,coronal`` does so only for those planes, and runs any other acquisition
    on reformats in the first (preprocessing.acquisition_planes).
    """

    plane: str = "axial"  # axial | sagittal | coronal | acquisition[:planes] | image (2D inputs: the image plane)
    in_plane_spacing_mm: float | None = None  # None: keep the input's pixel size
    normalisation: str = "zscore"  # zscore (per volume, foreground) | percentile | percentile-field (radiographs) | fixed
    context_slices: int = 1  # 1 = 2D; 3 = 2.5D (neighbours as channels)
    min_size: int = 16  # smallest accepted in-plane size (pixels)
    min_slices: int = 1  # smallest accepted number of slices along the plane normal
    tile_px: int | None = 512  # larger (resampled, padded) slices run as blended overlapping tiles
    # run the network only inside the in-plane box of non-background voxels and on slices that
    # hold any (seed 002: crop to the brain, skip empty slices); the rest is background
    crop_foreground: bool = False
    # square window: every slice is cut to a crop_mm x crop_mm physical window (None: the longer
    # in-plane field of view) and resampled to network_px x network_px; outside the image is padded
    # with the normalised image minimum, and the output goes back onto the input's exact pixels
    network_px: int | None = None
    crop_mm: float | None = None
    crop_window: str | None = None  # None: field-of-view centre | "joint": femorotibial joint centre
    bias_correction: str | None = None  # None | "n4" (fast, shrunk) | "n4-full" (seed 000's, slow)
    # multi-view fusion (softmax tasks): the same 2D network also runs along these planes and the
    # class probabilities are averaged on the input grid; the acquisition plane always runs. A
    # reformat's slices are run every ~fusion_slice_mm (linear in between), and only when the
    # acquisition's slices are at most fusion_max_slice_mm apart (thicker: the reformat is blurred)
    fusion_planes: tuple[str, ...] = ()
    fusion_slice_mm: float = 1.5
    fusion_max_slice_mm: float = 2.0
    # softmax tasks run on reformats (an acquisition plane the task does not take): the reformat's
    # slices, as close as the series' pixels, run every ~reformat_slice_mm (linear in between, as
    # view fusion's); None: every reformat slice
    reformat_slice_mm: float | None = None
    # sigmoid tasks whose structure fills one block of neighbouring slices (the lumbar column):
    # the network runs outward from the middle slices and stops on each side after a slice with
    # fewer than grow_min_px labelled pixels (inference.SliceGrowth; nothing in the middle: every
    # slice runs). None: every slice runs.
    grow_min_px: int | None = None
    # with grow_min_px: the slices after the middle ones run on a window column_px network pixels
    # wide (the training canvas), centred on the columns labelled in the middle slices; wider
    # slices only. None: whole slices
    column_px: int | None = None


@dataclass(frozen=True)
class NetworkSpec:
    factory: str
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AuxiliaryModel:
    """A second network of a task (e.g. the foramen model beside the level model), handed to a
    postprocessor. Optional ones fall back to what the postprocessor can do without. ``output``
    "maps": sigmoid maps on the network grid; "labels": argmax labels on the input grid through the
    card's whole preprocessing (N4, the main network's crop window), e.g. a per-bone model;
    "step": not run by the pipeline but handed to the post-processing steps, which run it on what
    they made (e.g. the level outline refiner on the decoded levels)."""

    name: str
    weights_entry: str
    network: NetworkSpec
    channels: int
    required: bool = False
    output: str = "maps"
    seed_variant: bool = False  # an alternative a user selects (not the default pipeline's; benchmarks skip it)
    fast_skips: bool = True  # --fast leaves it out (False: kept, e.g. the level refiner, 0.18-0.68 s for ~0.02 Dice, session 34)


@dataclass(frozen=True)
class TaskCard:
    name: str
    title: str
    description: str
    modality: str
    inputs: tuple[InputSpec, ...]
    preprocessing: Preprocessing
    network: NetworkSpec
    weights_entry: str  # registry entry name looked up when --weights is not given
    labels: tuple[LabelSpec, ...]
    postprocessors: tuple[str, ...]
    outputs: tuple[str, ...]
    label_activation: str = "softmax"  # softmax: background + labels; sigmoid: one channel per label
    auxiliary: tuple[AuxiliaryModel, ...] = ()
    issue: int | None = None  # the issue that trains this task's real weights
    # other label layouts a checkpoint may declare (metadata "variant"), decoded into the card's
    # labels after the network (a registered label decoder, hooks.py); "multiclass" = the card's own labels
    label_variants: tuple[str, ...] = ()
    # (optional input, registry entry): weights trained with that input, used instead of
    # weights_entry when the input is given and the entry is present (e.g. FLAIR + T1)
    weights_with_input: tuple[tuple[str, str], ...] = ()
    warn_missing_labels: bool = True  # "no voxels predicted for ..." (not for lesions: none is a finding)
    # (name, label values): structures that may overlap the others (sigmoid tasks), decoded into a
    # label map of their own, written as <name>.nii.gz and as a layer of the .seg.nrrd
    label_layers: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # overlays/: "each" a slice through each structure found (the knee's bones lie in different
    # slices); "together" one slice through them all (the lumbar levels share the mid-sagittal ones)
    overlay_views: str = "each"
    # (what, dotted path into report.json's summaries): the findings a cohort's review page shows
    # beside each case's pictures (lesion load, level confidence, bone volumes)
    headline: tuple[tuple[str, str], ...] = ()
    # a 2D task's summary (a step's) whose "passed" says the labels lie as on an upright image and
    # whose "upright_score" (> 0) ranks the ways up: where it fails on an image whose file does not
    # say which way is up, the other layouts are run and the best passing one kept (engine/upright.py)
    upright_summary: str | None = None
    # ``phantom(seed=0, **kw) -> core.phantoms.Phantom``: a synthetic scan with exact labels drawn by
    # code that shares nothing with the model (the demo's fallback, the self-test, geometry tests)
    phantom: Callable | None = field(default=None, compare=False)

    @property
    def dims(self) -> int:
        return self.inputs[0].dims

    @property
    def label_names(self) -> dict[int, str]:
        return {spec.value: spec.name for spec in self.labels}

    @property
    def output_channels(self) -> int:
        return len(self.labels) + (1 if self.label_activation == "softmax" else 0)

    def auxiliary_model(self, name: str) -> AuxiliaryModel:
        for aux in self.auxiliary:
            if aux.name == name:
                return aux
        raise KeyError(f"task {self.name} has no auxiliary model {name!r}")


def with_checkpoint_labels(card: "TaskCard", metadata: dict, where=None) -> "TaskCard":
    """The card with the label names a checkpoint was trained on (``metadata["labels"]``: a list of
    {"value", "name"[, "color"]}), e.g. xray-multiclass trained on imported JSRT/SCR masks (lungs,
    heart, clavicles) instead of the default femur / hip bone / sacrum. Names the card already
    knows keep their colours and SNOMED codes; others get a colour and no code."""
    from dataclasses import replace

    from SpineKneeSegLib.core.errors import InputError
    from SpineKneeSegLib.core.labels import LabelSpec

    labels = metadata.get("labels")
    if not labels:
        return card
    known = {spec.name: spec for spec in card.labels}
    palette = [(0.95, 0.84, 0.57), (0.85, 0.4, 0.31), (0.44, 0.72, 0.82), (0.5, 0.68, 0.5), (0.72, 0.61, 0.86),
               (0.9, 0.6, 0.2), (0.6, 0.6, 0.6)]
    specs = []
    for n, item in enumerate(sorted(labels, key=lambda d: int(d["value"]))):
        if int(item["value"]) != n + 1:
            raise InputError(f"checkpoint label values must be 1..N, got {[d['value'] for d in labels]}", where)
        base = known.get(item["name"])
        specs.append(replace(base, value=n + 1) if base else
                     LabelSpec(n + 1, str(item["name"]), tuple(item.get("color", palette[n % len(palette)]))))
    return replace(card, labels=tuple(specs))


COMMON_OUTPUTS = ("labels.nii.gz", "segmentation.seg.nrrd", "report.json")
OVERLAY_VIEWS = ("each", "together")  # TaskCard.overlay_views

TASKS: dict[str, TaskCard] = {}


def register(card: TaskCard) -> TaskCard:
    if card.name in TASKS:
        raise ValueError(f"task {card.name!r} registered twice")
    values = [spec.value for spec in card.labels]
    if values != list(range(1, len(values) + 1)):
        raise ValueError(f"task {card.name!r}: label values must be 1..N, got {values}")
    layered = [v for _, group in card.label_layers for v in group]
    if card.label_layers and (card.label_activation != "sigmoid" or len(set(layered)) != len(layered)
                              or not set(layered) < set(values)):
        raise ValueError(f"task {card.name!r}: label layers need sigmoid labels and disjoint groups of its labels")
    if card.overlay_views not in OVERLAY_VIEWS:
        raise ValueError(f"task {card.name!r}: overlay_views must be one of {', '.join(OVERLAY_VIEWS)}")
    check_steps(card.postprocessors, f"task {card.name!r}")
    check_hooks(card)
    TASKS[card.name] = card
    return card


# The task plug-ins (each sub-package registers its card on import), imported on the first lookup
# so that the engine names no task; doors may import SpineKneeSegLib.tasks themselves.
TASK_PACKAGE = "SpineKneeSegLib.tasks"


def load_tasks() -> dict[str, TaskCard]:
    importlib.import_module(TASK_PACKAGE)
    return TASKS


def get_task(name: str) -> TaskCard:
    from SpineKneeSegLib.core.errors import InputError

    tasks = load_tasks()
    if name not in tasks:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(tasks)}")
    return tasks[name]


def phantom_tasks() -> tuple[str, ...]:
    return tuple(name for name, card in load_tasks().items() if card.phantom is not None)


def make_phantom(task: str, seed=0, **kw):
    """The task's own phantom (its card's ``phantom``)."""
    card = load_tasks().get(task)
    if card is None or card.phantom is None:
        raise ValueError(f"unknown phantom task {task!r}; expected one of {phantom_tasks()}")
    return card.phantom(seed=seed, **kw)
