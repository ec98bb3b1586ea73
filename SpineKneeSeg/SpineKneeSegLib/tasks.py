"""Declarative task cards: what each door (panel, CLI, Training/, tests) needs to know about a task.

Adding a task = adding a card (and its pieces), not editing every door. Label values are fixed
project-wide: knee 1 femur, 2 tibia, 3 fibula, 4 patella; spine 1..5 = L1..L5 vertebral bodies;
brain 1 = lesion; X-ray 1 = femur (multi-class: 2 hip bone, 3 sacrum).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# the modules that own post-processing steps register them on import (steps.py)
from . import foramina, knee, lesions, level_decoding, postprocessing, transitional, xray  # noqa: F401
from .labels import BRAIN_LABELS, KNEE_LABELS, SPINE_LABELS, XRAY_FEMUR_LABELS, XRAY_PELVIS_LABELS, LabelSpec
from .steps import check_steps


@dataclass(frozen=True)
class InputSpec:
    name: str
    modality: str
    dims: int  # 3 = volume, 2 = single-slice image (radiograph)
    required: bool = True
    description: str = ""
    skull_stripped: bool = False  # refuse an unstripped head (skullstrip.py) unless the user vouches for it


@dataclass(frozen=True)
class Preprocessing:
    """Slice-wise preprocessing shared by inference and Training/.

    ``plane`` picks the slice axis from the direction matrix (the array axis most aligned with the
    plane's normal), so a sagittal task gets sagittal slices whatever the file's axis order;
    ``acquisition`` keeps the acquisition's slice axis (the largest spacing; isotropic: sagittal)
    and shows it like the closest of sagittal/coronal/axial (preprocessing.acquisition_plane).
    """

    plane: str = "axial"  # axial | sagittal | coronal | acquisition | image (2D inputs: the image plane)
    in_plane_spacing_mm: float | None = None  # None: keep the input's pixel size
    normalisation: str = "zscore"  # zscore (per volume, foreground) | percentile | fixed
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


@dataclass(frozen=True)
class NetworkSpec:
    factory: str
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AuxiliaryModel:
    """A second network of a task (e.g. the foramen model beside the level model), handed to a
    postprocessor. Optional ones fall back to what the postprocessor can do without. ``output``
    "maps": sigmoid maps on the network grid; "labels": argmax labels on the input grid through the
    card's whole preprocessing (N4, the main network's crop window), e.g. a per-bone model."""

    name: str
    weights_entry: str
    network: NetworkSpec
    channels: int
    required: bool = False
    output: str = "maps"
    seed_variant: bool = False  # an alternative a user selects (not the default pipeline's; benchmarks skip it)


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
    # labels after the network (bone_split.decode_variant); "multiclass" = the card's own labels
    label_variants: tuple[str, ...] = ()
    # (optional input, registry entry): weights trained with that input, used instead of
    # weights_entry when the input is given and the entry is present (e.g. FLAIR + T1)
    weights_with_input: tuple[tuple[str, str], ...] = ()
    warn_missing_labels: bool = True  # "no voxels predicted for ..." (not for lesions: none is a finding)

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

    from .errors import InputError
    from .labels import LabelSpec

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

TASKS: dict[str, TaskCard] = {}


def register(card: TaskCard) -> TaskCard:
    if card.name in TASKS:
        raise ValueError(f"task {card.name!r} registered twice")
    values = [spec.value for spec in card.labels]
    if values != list(range(1, len(values) + 1)):
        raise ValueError(f"task {card.name!r}: label values must be 1..N, got {values}")
    check_steps(card.postprocessors, f"task {card.name!r}")
    TASKS[card.name] = card
    return card


def get_task(name: str) -> TaskCard:
    from .errors import InputError

    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


register(TaskCard(
    name="knee-bones",
    title="Knee bones (MRI)",
    description="Femur, tibia, fibula and patella in sagittal or coronal knee MRI (seed 000).",
    modality="MR",
    inputs=(InputSpec("image", "MR", 3, description="knee MRI volume, sagittal or coronal"),),
    # seed 000: N4, joint-centred square window, 224 x 224 in-plane, slices kept as acquired (sagittal
    # or coronal), z-score (a checkpoint stores the training population's statistics as "fixed")
    preprocessing=Preprocessing(plane="acquisition", in_plane_spacing_mm=None, normalisation="zscore",
                                context_slices=1, min_slices=3, tile_px=None, network_px=224,
                                crop_mm=160.0, crop_window="joint", bias_correction="n4"),
    # seed 000's network is a constant 32 channels ("channels": (32,) * 5, 0.21 M parameters); 16
    # channels (0.05 M, ~4x fewer operations) for the issue's <= 4.5 s network budget on 2 cores
    network=NetworkSpec("unet2d", {"channels": (16, 16, 16, 16, 16), "activation": "elu",
                                   "norm": "batch", "dropout": 0.5}),
    weights_entry="knee-bones",
    labels=KNEE_LABELS,
    # seed 000's separate per-bone fibula model (Training/knee_bones.py --variant fibula), optional:
    # with --aux-weights fibula=FILE its fibula replaces the main network's
    auxiliary=(AuxiliaryModel("fibula", "knee-bones-fibula",
                              NetworkSpec("unet2d", {"channels": (16, 16, 16, 16, 16), "activation": "elu",
                                                     "norm": "batch", "dropout": 0.5}),
                              channels=2, output="labels", seed_variant=True),),
    # plausibility sees the raw network labels too (pipeline.postprocess keeps them), so its
    # component count and raw-vs-final Dice are honest whatever its place in this list
    postprocessors=("fibula_model", "largest_component_per_label", "knee_plausibility", "volume_table"),
    outputs=COMMON_OUTPUTS + ("volumes.tsv", "overlays/"),
    issue=6,
    # seed 000's merged "any bone" channel (Training/knee_bones.py --variant merged), split into bones
    label_variants=("multiclass", "merged"),
))

register(TaskCard(
    name="lumbar-foramina",
    title="Lumbar levels and foramina (MRI)",
    description="L1-L5 vertebral bodies by level and the ten neural foramina (L1-L5 left/right) "
                "in sagittal lumbar MRI (seed 004).",
    modality="MR",
    inputs=(InputSpec("image", "MR", 3, description="sagittal T1 or T2 lumbar spine MRI"),),
    preprocessing=Preprocessing(plane="sagittal", in_plane_spacing_mm=1.4, normalisation="zscore",
                                context_slices=3, min_slices=3),
    # seed 004: MultiNet, 3 sagittal slices in, 5 sigmoid level channels out
    network=NetworkSpec("multinet", {"levels": 5, "base_channels": 8, "max_channels": 16, "activation": "elu",
                                     "norm": "batch"}),
    weights_entry="lumbar-levels",
    labels=SPINE_LABELS,
    label_activation="sigmoid",
    auxiliary=(AuxiliaryModel("foramina", "lumbar-foramen-points",
                              NetworkSpec("multinet", {"levels": 5, "base_channels": 8, "max_channels": 16,
                                                       "activation": "elu", "norm": "batch"}), channels=5),),
    # transitional reads the raw network labels; level_decoding then names the bodies as one run
    postprocessors=("transitional", "level_decoding", "largest_component_per_label", "foramina"),
    outputs=COMMON_OUTPUTS + ("foramina.mrk.json",),
    issue=3,
))

register(TaskCard(
    name="brain-wmh",
    title="Brain white-matter lesions (FLAIR)",
    description="White-matter / MS lesions on FLAIR with a per-lesion table (seed 002).",
    modality="MR",
    inputs=(InputSpec("flair", "MR", 3, description="FLAIR volume (skull-stripped)", skull_stripped=True),
            InputSpec("t1", "MR", 3, required=False, description="optional T1, resampled onto FLAIR")),
    preprocessing=Preprocessing(plane="axial", in_plane_spacing_mm=1.0, normalisation="zscore",
                                context_slices=3, min_slices=3, crop_foreground=True),
    # seed 002: 2.5D attention U-Net; 16 base channels (the seed's 32: "channels": (32, 64, 128, 256))
    network=NetworkSpec("unet2d", {"channels": (16, 32, 64, 128), "activation": "relu", "norm": "batch",
                                   "attention": True}),
    weights_entry="brain-wmh",
    weights_with_input=(("t1", "brain-wmh-t1"),),
    labels=BRAIN_LABELS,
    label_activation="sigmoid",  # seed 002: one sigmoid lesion channel
    postprocessors=("lesion_decoding", "lesion_table"),
    warn_missing_labels=False,
    outputs=COMMON_OUTPUTS + ("lesions.tsv",),
    issue=5,
))

# X-ray (seeds 001, 003): the radiograph is shown to the network as stored (rows, columns), cut to
# a square of its longer side centred on the image (aspect ratio kept, the rest padded with the
# normalised minimum) and resampled to network_px x network_px; the output goes back onto the
# input's exact pixels (preprocessing.from_network_grid). Percentile normalisation (0.5-99.5 %)
# makes 8-bit, 12-bit and 16-bit images and any rescale slope/intercept look alike.
XRAY_PREPROCESSING = Preprocessing(plane="image", in_plane_spacing_mm=None, normalisation="percentile",
                                   context_slices=1, tile_px=None, network_px=256, crop_mm=None)

register(TaskCard(
    name="xray-femur",
    title="Proximal femur (X-ray)",
    description="Binary proximal femur on AP pelvis/hip radiographs with femoral-head centre and "
                "diameter (seed 003).",
    modality="CR/DX",
    inputs=(InputSpec("image", "CR/DX", 2, description="2D radiograph (DICOM CR/DX, PNG/JPEG/TIFF, 2D NIfTI)"),),
    preprocessing=XRAY_PREPROCESSING,
    # seed 003: U-Net 32-64-128-128, dropout 0.2, one sigmoid channel (Dice loss, Adam 3e-4,
    # betas 0.8/0.991 in Training/xray.py); a checkpoint may carry a narrower CPU variant
    network=NetworkSpec("unet2d", {"channels": (32, 64, 128, 128), "activation": "relu", "norm": "none",
                                   "dropout": 0.2}),
    weights_entry="xray-femur",
    labels=XRAY_FEMUR_LABELS,
    label_activation="sigmoid",
    # both femurs of a pelvis view are kept; femoral heads: circle fitted to each femur's boundary
    postprocessors=("remove_small_components", "area_table", "femoral_heads"),
    outputs=COMMON_OUTPUTS + ("areas.tsv", "femoral_heads.tsv", "femoral_heads.mrk.json"),
    issue=8,
))

register(TaskCard(
    name="xray-multiclass",
    title="Pelvis bones (X-ray, multi-class)",
    description="Femur, hip bone and sacrum on AP pelvis radiographs (seed 001: 3 classes; a "
                "checkpoint trained on other classes carries its own label names).",
    modality="CR/DX",
    inputs=(InputSpec("image", "CR/DX", 2, description="2D radiograph (DICOM CR/DX, PNG/JPEG/TIFF, 2D NIfTI)"),),
    preprocessing=XRAY_PREPROCESSING,
    # seed 001: U-Net with batch norm and transposed-convolution upsampling, softmax over
    # background + N classes (Dice + cross-entropy, RMSprop, ReduceLROnPlateau, clipping in Training/)
    network=NetworkSpec("unet2d", {"channels": (32, 64, 128, 128), "activation": "relu", "norm": "batch"}),
    weights_entry="xray-multiclass",
    labels=XRAY_PELVIS_LABELS,
    postprocessors=("remove_small_components", "area_table"),
    outputs=COMMON_OUTPUTS + ("areas.tsv",),
    issue=8,
))
