"""Train the knee-bones model (seed 000) on images synthesised from label maps (knee_synth.py).

    python Training/knee_bones.py prepare --out Training/runs/knee          # label maps -> volumes.pt (SimpleITK)
    python Training/knee_bones.py train --out Training/runs/knee [--resume] [--max-minutes M] [--device cuda]
    python Training/knee_bones.py evaluate --out Training/runs/knee [--checkpoint best.pt]
    python Training/knee_bones.py ship --out Training/runs/knee --version 0.1.0

Data: ../shared/data/knee/labelmaps (SPL knee atlas, pymskt DESS labels) and/or, with --pairs
CSV (name,image,labels,mapping), label maps or image+label pairs users bring (real images train
the same network through the same augmentation; ``import-folders`` (an image folder and a label
folder) and ``import-oai-zib`` write such a CSV). One label map is
held out entirely: validation (early stopping) and the held-out Dice figures come from synthetic
images of the held-out anatomy only. ``train`` needs only torch: run ``prepare`` where SimpleITK
exists, carry volumes.pt to a GPU machine, train there.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from knee_synth import (  # noqa: E402
    BONES,
    KneeVolume,
    SynthConfig,
    synthesise,
    synthesise_batch,
    synthesise_volume,
)
from slicetrain import save_resume_state, tensorboard_writer  # noqa: E402
from SpineKneeSegLib.engine.models import build_network  # noqa: E402

TASK = "knee-bones"

# label map value -> project knee label (1 femur, 2 tibia, 3 fibula, 4 patella); other values are
# kept as separate tissues for synthesis. Checked against each map's colour table / README.
LABEL_MAPS = {
    "spl-atlas-labels.nrrd": {95: 1, 96: 2, 97: 3, 98: 4},
    "pymskt-dess-labels.nrrd": {5: 1, 6: 2, 8: 3, 7: 4},
}
# tissue of the non-bone labels of a map without a colour table (data README: 1-4 cartilage, 9-10 menisci)
TISSUES = {"pymskt-dess-labels.nrrd": {1: "cartilage", 2: "cartilage", 3: "cartilage", 4: "cartilage",
                                       9: "meniscus", 10: "meniscus"}}
HELD_OUT = "pymskt-dess-labels.nrrd"  # validation anatomy: a DESS knee like the real test series
ALL_ANATOMIES = "none"  # --held-out none: train on every label map (the model to ship once held-out figures exist)


@dataclass
class Config:
    variant: str = "multiclass"  # multiclass (bg + 4 bones) | merged ("any bone", split after) | fibula (fibula only)
    channels: int = 16  # constant channels per level; the seed's is 32
    levels: int = 5
    dropout: float = 0.5
    batch_size: int = 8
    patch: int = 160  # random crop of the 224 synthetic slice for training speed (fully convolutional)
    lr: float = 1e-3  # seed 000: Adam 1e-3 decaying to 1e-4
    lr_final: float = 1e-4
    iterations: int = 20000  # the learning-rate schedule's length and the budget
    stop_after: int | None = None  # stop earlier (same schedule): equal-budget variant comparisons
    eval_every: int = 250  # one "epoch" for early stopping
    patience: int = 9  # seed 000 (in epochs of eval_every iterations)
    val_samples: int = 96
    workers: int = 1  # synthesis in a worker process overlaps the training step (CPU); 0 = in-process (GPU)
    seed: int = 0
    held_out: str = HELD_OUT  # label map whose synthetic images validate (never trained on)
    spacing_mm: float = 0.5
    synth: dict = field(default_factory=dict)  # SynthConfig overrides
    init: str | None = None  # start from this checkpoint's weights (e.g. the shipped model), fresh optimiser
    ce_weight: float = 0.0  # 0: seed 000's soft F1 alone; > 0 adds that much pixel cross-entropy


# ---- preparation (SimpleITK) -------------------------------------------------------------------

def read_colour_table(path: Path) -> dict[int, str]:
    """Slicer colour table (.ctbl: ``value name r g b a`` lines) -> value: "r g b a" colour."""
    table = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and not line.startswith("#"):
            table[int(parts[0])] = " ".join(parts[2:6])
    return table


def tissue_of(path: Path, values: list[int]) -> dict[int, str]:
    """Tissue class of each label value: from TISSUES, else from a Slicer colour table beside the map
    (the SPL atlas colours every muscle alike, every ligament alike...), else each value its own."""
    known = TISSUES.get(Path(path).name)
    if known is None:
        ctbl = Path(path).with_name(Path(path).name.split(".")[0] + ".ctbl")
        known = read_colour_table(ctbl) if ctbl.is_file() else {}
    return {v: known.get(v, f"label {v}") for v in values}


def tissue_ids(lut: dict[int, int], tissue: dict[int, str], n_labels: int) -> tuple[int, ...]:
    """Tissue class index per renumbered label id: 0 unlabelled, 1 bone (ids 1..BONES), 2.. the others."""
    names: dict[str, int] = {}
    ids = [0] * n_labels
    for b in range(1, BONES + 1):
        if b < n_labels:
            ids[b] = 1
    for value, new in sorted(lut.items()):
        if new > BONES:
            ids[new] = names.setdefault(tissue[value], len(names) + 2)
    return tuple(ids)


def prepare_volume(path: Path, mapping: dict[int, int], spacing_mm: float, image_path: Path | None = None,
                   name: str | None = None) -> KneeVolume:
    """A label map resampled (nearest) onto an LPS-aligned isotropic grid, labels renumbered:
    bones 1..4 per ``mapping``, every other non-zero value its own id from 5. With ``image_path``
    (any format the product reads: NIfTI, NRRD, MHA/MHD, DICOM folder) the real image is resampled
    (linear) onto the same grid; the bones missing from ``mapping`` are marked unlabelled."""
    import SimpleITK as sitk
    from SpineKneeSegLib.core.image_io import read_image

    label_image = read_image(path)
    image = label_image.to_sitk()
    array = np.rint(label_image.array).astype(np.int32)
    values = [int(v) for v in np.unique(array) if v != 0]
    lut = {v: mapping[v] for v in values if v in mapping}
    others = [v for v in values if v not in mapping]
    lut.update({v: BONES + 1 + i for i, v in enumerate(others)})
    table = np.zeros(int(array.max()) + 1, np.uint8)
    for v, t in lut.items():
        table[v] = t
    relabelled = sitk.GetImageFromArray(table[array])
    relabelled.CopyInformation(image)
    # bounding box of the map in LPS, then an identity-direction grid over it
    size = np.array(image.GetSize())
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
               for corner in np.array(np.meshgrid(*[[0, s - 1] for s in size])).reshape(3, -1).T]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    out_size = [int(math.ceil((h - lo_) / spacing_mm)) + 1 for lo_, h in zip(lo, hi)]
    grid = dict(size=out_size, transform=sitk.Transform(), outputOrigin=lo.tolist(), outputSpacing=[spacing_mm] * 3,
                outputDirection=np.eye(3).ravel().tolist(), defaultPixelValue=0)
    labels = sitk.GetArrayFromImage(sitk.Resample(relabelled, interpolator=sitk.sitkNearestNeighbor,
                                                  outputPixelType=sitk.sitkUInt8, **grid))  # (z, y, x) = (S, P, L)
    real = None
    if image_path is not None:
        source = read_image(image_path).to_sitk()
        real = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(source, sitk.sitkFloat32), interpolator=sitk.sitkLinear,
                                                    outputPixelType=sitk.sitkFloat32, **grid))
        real = torch.from_numpy(real / max(float(np.percentile(real[real > 0], 99.5)), 1e-6)).to(torch.float16)
    labelled = tuple(sorted(set(mapping.values()) & set(range(1, BONES + 1))))
    n_labels = int(labels.max()) + 1
    return KneeVolume(name or Path(path).name, torch.from_numpy(labels), spacing_mm, tuple(float(v) for v in lo),
                      joint_centre(labels, lo, spacing_mm), bone_extent(labels, lo, spacing_mm),
                      n_labels, real, labelled, tissue_ids(lut, tissue_of(path, others), n_labels))


# ---- label maps and image pairs users bring ----------------------------------------------------

OAI_ZIB_MAPPING = {1: 1, 3: 2}  # OAI-ZIB masks: 1 femoral bone, 2 femoral cartilage, 3 tibial bone, 4 tibial cartilage
OAI_ZIB_SUFFIX = ".segmentation_masks.mhd"


def parse_mapping(text: str) -> dict[int, int]:
    """'5:1,6:2' -> {5: 1, 6: 2} (label map value -> knee label 1 femur, 2 tibia, 3 fibula, 4 patella)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        src, _, dst = part.partition(":")
        if not dst or int(dst) not in range(1, BONES + 1):
            raise ValueError(f"bad label mapping {part!r}: expected VALUE:BONE with BONE in 1..4")
        out[int(src)] = int(dst)
    return out


def read_pairs(csv_path: Path) -> list[dict]:
    """Rows name,image,labels,mapping (image may be empty: a label map alone); relative paths are
    taken from the CSV's folder."""
    import csv

    rows = []
    with open(csv_path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            missing = {"name", "labels", "mapping"} - {k for k, v in row.items() if v}
            if missing:
                raise SystemExit(f"{csv_path}:{i}: missing {', '.join(sorted(missing))}")
            base = csv_path.parent
            rows.append({"name": row["name"], "labels": base / row["labels"],
                         "image": base / row["image"] if row.get("image") else None,
                         "mapping": parse_mapping(row["mapping"])})
    return rows


def write_pairs(rows: list[dict], csv_path: Path) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["name", "image", "labels", "mapping"])
    writer.writeheader()
    for row in rows:
        writer.writerow({"name": row["name"], "image": str(row["image"] or ""), "labels": str(row["labels"]),
                         "mapping": ",".join(f"{k}:{v}" for k, v in row["mapping"].items())})
    tmp = csv_path.with_suffix(".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(csv_path)


def import_oai_zib(masks: Path, images: Path) -> list[dict]:
    """OAI-ZIB manual segmentations (``<id>.segmentation_masks.mhd``) paired with the OAI DESS
    images the user obtained (``<id>.mhd|.nii.gz|.nrrd|.mha`` or a DICOM folder ``<id>/``)."""
    rows, unmatched = [], []
    for mask in sorted(masks.glob(f"*{OAI_ZIB_SUFFIX}")):
        case = mask.name[: -len(OAI_ZIB_SUFFIX)]
        found = [p for p in (images / f"{case}{ext}" for ext in (".mhd", ".mha", ".nii.gz", ".nii", ".nrrd"))
                 if p.exists()] or ([images / case] if (images / case).is_dir() else [])
        if not found:
            unmatched.append(case)
            continue
        rows.append({"name": case, "image": found[0].resolve(), "labels": mask.resolve(), "mapping": OAI_ZIB_MAPPING})
    if not rows:
        raise SystemExit(f"no OAI-ZIB masks (*{OAI_ZIB_SUFFIX}) in {masks} with an image in {images}")
    if unmatched:
        print(f"warning: {len(unmatched)} mask(s) without an image, skipped: {', '.join(unmatched[:10])}")
    return rows


def case_name(path: Path, strip: str = "") -> str:
    """'case01_seg.nii.gz' -> 'case01' with strip='_seg' (and Slicer's 'case01.seg.nrrd' -> 'case01'): the
    name an image and its label map share; a DICOM series folder is named by the folder."""
    from SpineKneeSegLib.core.image_io import image_suffix

    name = path.name
    if not path.is_dir():
        name = name[: -len(image_suffix(path) or path.suffix)]
        name = name[: -len(".seg")] if name.endswith(".seg") else name
    return name[: -len(strip)] if strip and name.endswith(strip) else name


def import_folders(images: Path, labels: Path, mapping: dict[int, int], label_suffix: str = "") -> list[dict]:
    """An image folder and a label folder (the common layout of labelled data: imagesTr/labelsTr,
    case01.nii.gz + case01_seg.nii.gz, DICOM series folders beside label files) paired by case name
    -> pairs rows; ``mapping`` says which label values are which bone (1 femur ... 4 patella)."""
    from SpineKneeSegLib.core.image_io import image_suffix

    def entries(folder: Path, strip: str) -> dict[str, Path]:
        if not folder.is_dir():
            raise SystemExit(f"{folder}: not a folder")
        found = {}
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not (p.is_dir() or image_suffix(p)):
                continue  # MetaImage .raw data files and anything else the reader does not open
            name = case_name(p, strip)
            if name in found:
                raise SystemExit(f"{folder}: two files for case {name!r}: {found[name].name}, {p.name}")
            found[name] = p
        return found

    if not mapping:
        raise SystemExit("--mapping: say which label values are bones, e.g. 1:1,2:2 "
                         "(1 femur, 2 tibia, 3 fibula, 4 patella)")
    image_of, label_of = entries(images, ""), entries(labels, label_suffix)
    cases = sorted(set(image_of) & set(label_of))
    if not cases:
        raise SystemExit(f"no case has both an image in {images} and a label map in {labels} "
                         f"(images: {', '.join(sorted(image_of)[:5]) or 'none'}; labels: "
                         f"{', '.join(sorted(label_of)[:5]) or 'none'}; --label-suffix strips e.g. _seg)")
    alone = sorted(set(image_of) ^ set(label_of))
    if alone:
        print(f"warning: {len(alone)} case(s) with only an image or only a label map, skipped: {', '.join(alone[:10])}")
    return [{"name": c, "image": image_of[c].resolve(), "labels": label_of[c].resolve(), "mapping": dict(mapping)}
            for c in cases]


def _lps(idx_zyx: np.ndarray, origin, spacing) -> np.ndarray:
    return np.asarray(origin) + idx_zyx[..., ::-1] * spacing


def joint_centre(labels: np.ndarray, origin, spacing) -> tuple[float, float, float]:
    """The product's joint centre (knee.joint_centre_from_labels) of an LPS-aligned (z, y, x) grid, in LPS."""
    from SpineKneeSegLib.core.image import Image
    from SpineKneeSegLib.tasks.knee.anatomy import joint_centre_from_labels

    grid = Image(labels, (spacing,) * 3, tuple(float(v) for v in origin), np.eye(3))
    ras, note = joint_centre_from_labels(labels, grid)
    if ras is None:
        raise SystemExit(f"label map has no joint: {note}")
    return (-ras[0], -ras[1], ras[2])


def bone_extent(labels: np.ndarray, origin, spacing) -> tuple[tuple[float, float], ...]:
    zyx = np.argwhere(np.isin(labels[::2, ::2, ::2], (1, 2, 3))) * 2
    lo, hi = _lps(zyx.min(axis=0).astype(float), origin, spacing), _lps(zyx.max(axis=0).astype(float), origin, spacing)
    return tuple((float(a), float(b)) for a, b in zip(lo, hi))


def save_volumes(volumes: list[KneeVolume], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    # dataclass fields only: a cache kept in vol.__dict__ (knee_synth.labelled_z_range) is not a field
    torch.save([{f.name: getattr(vol, f.name) for f in fields(KneeVolume)} for vol in volumes], tmp)
    tmp.replace(path)


def load_volumes(path: Path, device="cpu") -> list[KneeVolume]:
    return [KneeVolume(**d).to(device) for d in torch.load(path, map_location="cpu", weights_only=False)]


def prepare(out: Path, labelmaps: Path | None, spacing_mm: float, pairs: list[dict] | None = None,
            log=print) -> list[KneeVolume]:
    """The shared label maps (``labelmaps``) and/or user rows (``pairs``) -> OUT/volumes.pt."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [{"name": name, "labels": labelmaps / name, "image": None, "mapping": mapping}
            for name, mapping in LABEL_MAPS.items()] if labelmaps else []
    volumes = []
    for job in jobs + list(pairs or []):
        t = time.time()
        vol = prepare_volume(job["labels"], job["mapping"], spacing_mm, job["image"], job["name"])
        volumes.append(vol)
        counts = np.bincount(vol.labels.numpy().ravel(), minlength=BONES + 1)[1:BONES + 1]
        ml = counts * spacing_mm ** 3 / 1000
        log(f"{vol.name}: grid {tuple(vol.labels.shape)} at {spacing_mm} mm, {vol.n_labels - 1} labels, bones "
            f"femur/tibia/fibula/patella {np.round(ml, 1).tolist()} ml (labelled {list(vol.labelled)}), "
            f"{max(vol.tissue) - 1} non-bone tissue classes, "
            f"{'real image' if vol.image is not None else 'label map only'}, joint centre LPS "
            f"{np.round(vol.joint_centre_lps, 1).tolist()} ({time.time() - t:.1f} s)")
    save_volumes(volumes, out / "volumes.pt")
    return volumes


# ---- training ----------------------------------------------------------------------------------

def out_channels(variant: str) -> int:
    return {"multiclass": BONES + 1, "merged": 2, "fibula": 2}[variant]


def variant_target(target: torch.Tensor, variant: str) -> torch.Tensor:
    """Bone labels 0..4 -> the variant's classes: merged = any bone; fibula = the fibula alone."""
    if variant == "merged":
        return (target > 0).long()
    if variant == "fibula":
        return (target == 3).long()
    return target


def network_config(cfg: Config) -> dict:
    return {"channels": (cfg.channels,) * cfg.levels, "activation": "elu", "norm": "batch",
            "dropout": cfg.dropout, "in_channels": 1, "out_channels": out_channels(cfg.variant)}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Seed 000's soft F1: 1 - mean over foreground classes of the batch soft Dice (softmax).
    ``labelled`` (B, C) bool marks the classes each sample's label map has: a class it lacks
    (OAI-ZIB has no fibula or patella) counts as background for that sample (marginal loss, Shi
    et al. 2021) and is left out of that class's Dice. Written here: the GPU image has no MONAI."""
    probs = torch.softmax(logits, dim=1)
    channels = probs.shape[1]
    onehot = F.one_hot(target, channels).permute(0, 3, 1, 2).float()
    weight = torch.ones(probs.shape[:2], device=probs.device)
    if labelled is not None and not bool(labelled.all()):
        known = labelled.float()[:, :, None, None]
        background = probs[:, :1] + (probs * (1 - known)).sum(1, keepdim=True)
        probs = torch.cat([background, probs[:, 1:] * known[:, 1:]], dim=1)
        weight = labelled.float()
    inter = (probs * onehot).sum((2, 3))
    denom = (probs + onehot).sum((2, 3))
    inter, denom = (weight * inter).sum(0), (weight * denom).sum(0)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    present = weight.sum(0)[1:] > 0
    return 1 - dice[1:][present].mean()


def marginal_cross_entropy(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None = None):
    """Pixel-wise cross-entropy; a class a sample's map lacks is merged into that sample's background
    (the marginal loss, as in soft_dice_loss). Unlike the batch Dice it charges every false-positive
    pixel, so stray pieces far from any bone cost as much as a wrong border."""
    logp = torch.log_softmax(logits, dim=1)
    if labelled is not None and not bool(labelled.all()):
        merge = ~labelled.clone()
        merge[:, 0] = True  # background plus the classes this sample's map does not label
        background = torch.logsumexp(logp.masked_fill(~merge[:, :, None, None], -math.inf), dim=1, keepdim=True)
        logp = torch.cat([background, logp[:, 1:]], dim=1)
    return F.nll_loss(logp, target)


def training_loss(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None, ce_weight: float):
    """Seed 000's soft F1 (ce_weight 0), or soft F1 + ce_weight x cross-entropy (nnU-Net's pairing)."""
    loss = soft_dice_loss(logits, target, labelled)
    return loss if ce_weight <= 0 else loss + ce_weight * marginal_cross_entropy(logits, target, labelled)


def widen_state(old: dict, new: dict, old_width: int, new_width: int) -> dict:
    """Function-preserving widening of a constant-width U-Net (Net2Net's idea, Chen et al. 2016,
    with zero-weight links instead of copied units): ``new`` is a freshly initialised wider
    network's state. Old units keep their weights and BatchNorm statistics and read no new unit;
    new units read everything (their own random weights); the head and every old unit get zero
    weights from the new units, so the widened network's eval output equals the old one's. A
    tensor dimension of old_width (one level's features) or 2 x old_width (decoder input: the
    upsampled features concatenated with the skip) is mapped block by block."""
    def index(old_size: int, new_size: int) -> torch.Tensor:
        if old_size == new_size:
            return torch.arange(old_size)
        blocks = old_size // old_width
        if old_size % old_width or new_size != blocks * new_width:
            raise ValueError(f"cannot map a dimension of {old_size} onto {new_size} when widening "
                             f"{old_width} -> {new_width} channels")
        return torch.cat([torch.arange(old_width) + b * new_width for b in range(blocks)])

    out = {}
    for name, w_new in new.items():
        w_old = old[name]
        if w_new.dim() == 0:  # num_batches_tracked
            out[name] = w_old.clone()
            continue
        w = w_new.clone()
        if name.endswith("running_var"):
            w.fill_(1.0)
        elif name.endswith("running_mean") or name.endswith("bias"):
            w.zero_()
        elif w.dim() == 1:  # BatchNorm scale
            w.fill_(1.0)
        idx = [index(a, b) for a, b in zip(w_old.shape, w_new.shape)]
        if w.dim() == 4:  # conv: old units (and the head) read no new unit
            out_dim = 1 if name.startswith("up.") and name.count(".") == 2 else 0  # ConvTranspose2d is (in, out, k, k)
            rows = [slice(None)] * 4
            rows[out_dim] = idx[out_dim]
            w[tuple(rows)] = 0.0
        w[torch.meshgrid(*idx, indexing="ij")] = w_old
        out[name] = w
    return out


def lr_at(cfg: Config, iteration: int) -> float:
    """Exponential decay from lr to lr_final over the iteration budget (seed: 1e-3 toward 1e-4)."""
    return cfg.lr * (cfg.lr_final / cfg.lr) ** min(1.0, iteration / max(1, cfg.iterations))


def validation_set(volumes: list[KneeVolume], cfg: Config, synth: SynthConfig, seed: int = 12345):
    """A fixed set of synthetic slices of the validation anatomies, shared equally (same seed every
    run; the training stream is seeded from cfg.seed and the iteration, so its samples differ)."""
    gen = torch.Generator(device=volumes[0].labels.device).manual_seed(seed)
    xs, ys = [], []
    for i in range(cfg.val_samples):
        x, y, _ = synthesise(volumes[i % len(volumes)], synth, gen)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, classes) -> dict[int, float]:
    """Dice over the whole set (all slices pooled) per class; NaN when the class is absent in both."""
    out = {}
    for c in classes:
        p, t = pred == c, truth == c
        denom = int(p.sum() + t.sum())
        out[c] = 2 * int((p & t).sum()) / denom if denom else float("nan")
    return out


@torch.no_grad()
def evaluate_slices(net, x: torch.Tensor, y: torch.Tensor, variant: str, batch: int = 16) -> dict:
    net.eval()
    preds = torch.cat([net(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    truth = variant_target(y.to(preds.device), variant)
    classes = range(1, out_channels(variant))
    d = dice_per_class(preds, truth, classes)
    names = {"multiclass": {1: "femur", 2: "tibia", 3: "fibula", 4: "patella"}, "merged": {1: "bone"},
             "fibula": {1: "fibula"}}[variant]
    per = {names[c]: round(v, 4) for c, v in d.items()}
    if variant == "multiclass":  # comparable with the merged variant's single channel
        per["any_bone"] = round(dice_per_class((preds > 0).long(), (truth > 0).long(), [1])[1], 4)
    return {"dice": per, "mean_dice": round(float(np.nanmean(list(d.values()))), 4)}


class SynthBatches(torch.utils.data.IterableDataset):
    """Endless (x, y) training batches; seeded by the iteration it starts at, so a resumed run
    continues with fresh, reproducible samples."""

    def __init__(self, volumes: list[KneeVolume], synth: SynthConfig, cfg: Config, seed: int):
        self.volumes, self.synth, self.cfg, self.seed = volumes, synth, cfg, seed

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)  # the training step owns the other cores
        gen = torch.Generator(device=self.volumes[0].labels.device).manual_seed(self.seed)
        while True:
            x, y, labelled = synthesise_batch(self.volumes, self.synth, gen, self.cfg.batch_size, with_mask=True)
            yield (*random_crop(x, y, self.cfg.patch, gen), labelled)


def batch_stream(volumes, synth, cfg: Config, iteration: int):
    seed = cfg.seed * 100_003 + iteration
    dataset = SynthBatches(volumes, synth, cfg, seed)
    if cfg.workers <= 0 or volumes[0].labels.device.type != "cpu":
        return iter(dataset)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.workers, prefetch_factor=2))


def random_crop(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    n = x.shape[-1]
    if size >= n:
        return x, y
    r, c = (int(torch.randint(0, n - size + 1, (1,), generator=gen, device=gen.device)) for _ in range(2))
    return x[..., r:r + size, c:c + size], y[..., r:r + size, c:c + size]


def train(cfg: Config, out: Path, resume: bool, device: str = "cpu", max_minutes: float | None = None,
          log=print, volumes_path: Path | None = None) -> dict:
    from SpineKneeSegLib.engine.weights import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    volumes = load_volumes(volumes_path or out / "volumes.pt", dev)
    if cfg.held_out == ALL_ANATOMIES:  # the final model: every anatomy trains; validation has no unseen anatomy
        train_vols, held = volumes, volumes
    else:
        train_vols = [v for v in volumes if v.name != cfg.held_out]
        held = [v for v in volumes if v.name == cfg.held_out]
    if not held or not train_vols:
        raise SystemExit(f"need the held-out label map {cfg.held_out} and at least one other in {volumes_path}")
    if cfg.variant != "multiclass" and any(len(v.labelled) < BONES for v in train_vols):
        raise SystemExit(f"variant {cfg.variant} needs all four bones labelled in every training volume")
    synth = SynthConfig(**cfg.synth)
    val_x, val_y = validation_set(held, cfg, synth)
    log(f"training on {[v.name for v in train_vols]}, validating on {len(val_x)} synthetic slices of "
        f"{[v.name for v in held]}")
    torch.manual_seed(cfg.seed)
    net = build_network("unet2d", network_config(cfg)).to(dev)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    state = {"iteration": 0, "epoch": 0, "best": -math.inf, "best_epoch": 0, "history": []}
    if cfg.init:  # fine-tuning: a shipped model on data users bring, or a lower-lr continuation
        from SpineKneeSegLib.engine.weights import load_checkpoint

        init = load_checkpoint(Path(cfg.init))
        widths = tuple(init["network"]["config"]["channels"])
        width = widths[0]
        if width != cfg.channels:  # e.g. the seed's 32 channels started from a trained 16-channel model
            if width > cfg.channels or widths != (width,) * cfg.levels:
                raise SystemExit(f"{cfg.init}: a {widths}-channel network cannot "
                                 f"start a {cfg.channels}-channel one (only widening a constant width)")
            net.load_state_dict(widen_state(init["state_dict"], net.state_dict(), width, cfg.channels))
            log(f"initialised from {cfg.init}, widened {width} -> {cfg.channels} channels")
        else:
            net.load_state_dict(init["state_dict"])
            log(f"initialised from {cfg.init}")
    last = out / "last.pt"
    if resume and last.exists():
        ckpt = torch.load(last, map_location=dev, weights_only=False)  # our own file
        net.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
        state = ckpt["state"]
        log(f"resumed at iteration {state['iteration']} (best {state['best']:.4f} at epoch {state['best_epoch']})")
    writer = tensorboard_writer(out)
    started = time.time()
    batches = batch_stream(train_vols, synth, cfg, state["iteration"])
    budget = min(cfg.iterations, cfg.stop_after or cfg.iterations)
    while state["iteration"] < budget and state["epoch"] - state["best_epoch"] < cfg.patience:
        t0 = time.time()
        net.train()
        losses = []
        for _ in range(cfg.eval_every):
            for group in optimiser.param_groups:
                group["lr"] = lr_at(cfg, state["iteration"])
            x, y, labelled = (t.to(dev) for t in next(batches))
            optimiser.zero_grad()
            mask = labelled if cfg.variant == "multiclass" else None
            loss = training_loss(net(x), variant_target(y, cfg.variant), mask, cfg.ce_weight)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            state["iteration"] += 1
        metrics = evaluate_slices(net, val_x, val_y, cfg.variant)
        state["epoch"] += 1
        entry = {"epoch": state["epoch"], "iteration": state["iteration"], "loss": round(float(np.mean(losses)), 4),
                 "lr": lr_at(cfg, state["iteration"]), **metrics, "seconds": round(time.time() - t0, 1)}
        state["history"].append(entry)
        if writer:
            writer.add_scalar("train/loss", entry["loss"], state["iteration"])
            writer.add_scalar("val/mean_dice", metrics["mean_dice"], state["iteration"])
            for name, v in metrics["dice"].items():
                writer.add_scalar(f"val/dice_{name}", v, state["iteration"])
            writer.flush()
        weights = {k: v.cpu() for k, v in net.state_dict().items()}
        meta = {"iteration": state["iteration"], "val": metrics, "config": asdict(cfg), "variant": cfg.variant,
                "held_out": cfg.held_out, "trained_on": [v.name for v in train_vols]}
        # every evaluation's weights (~0.2 MB): variants are compared at equal iterations
        (out / "snapshots").mkdir(exist_ok=True)
        model = "fibula" if cfg.variant == "fibula" else "labels"  # the per-bone model runs as --aux-weights fibula=
        save_checkpoint(out / "snapshots" / f"iter-{state['iteration']:06d}.pt", TASK, "unet2d", network_config(cfg),
                        weights, metadata=meta, model=model)
        if metrics["mean_dice"] > state["best"]:
            state["best"], state["best_epoch"] = metrics["mean_dice"], state["epoch"]
            save_checkpoint(out / "best.pt", TASK, "unet2d", network_config(cfg), weights, metadata=meta, model=model)
        save_resume_state(last, {"model": net.state_dict(), "optimiser": optimiser.state_dict(), "state": state,
                                 "config": asdict(cfg)})
        log(json.dumps(entry))
        if max_minutes and (time.time() - started) / 60 > max_minutes:
            log("time budget reached; resume with --resume")
            break
    return state


def _averaged_network(ckpts: list[dict], volumes_path: Path, bn_batches: int):
    """Uniform weight average of checkpoints of one network -> (network, its Config, the last one's
    metadata). Batch-norm statistics are re-estimated on ``bn_batches`` fresh synthetic training
    batches (the checkpoints' own synthesis and training anatomies; fixed seed)."""
    from torch.optim.swa_utils import update_bn

    meta = dict(ckpts[-1]["metadata"])
    cfg = Config(**{k: v for k, v in meta["config"].items() if k in Config.__dataclass_fields__})
    state = {k: (sum(c["state_dict"][k].double() for c in ckpts) / len(ckpts)).to(v.dtype)
             if v.is_floating_point() else v for k, v in ckpts[-1]["state_dict"].items()}
    net = build_network("unet2d", network_config(cfg))
    net.load_state_dict(state)
    volumes = [v for v in load_volumes(volumes_path) if v.name in meta["trained_on"]]
    gen = torch.Generator().manual_seed(4242)
    synth = SynthConfig(**cfg.synth)
    batches = [random_crop(*synthesise_batch(volumes, synth, gen, cfg.batch_size), cfg.patch, gen)[0]
               for _ in range(bn_batches)]
    with torch.random.fork_rng():  # update_bn runs in train mode: seed the dropout too, so averaging repeats exactly
        torch.manual_seed(4242)
        update_bn(batches, net)
    return net, cfg, meta


def _save_averaged(out: Path, net, cfg: Config, meta: dict) -> None:
    from SpineKneeSegLib.engine.weights import save_checkpoint

    model = "fibula" if cfg.variant == "fibula" else "labels"
    save_checkpoint(out, TASK, "unet2d", network_config(cfg), {k: v.cpu() for k, v in net.state_dict().items()},
                    metadata=meta, model=model)


def average_snapshots(run: Path, first: int, last: int, bn_batches: int = 50, log=print,
                      volumes_path: Path | None = None) -> Path:
    """Stochastic weight averaging (Izmailov et al., UAI 2018) of a run's snapshots ``first``..``last``
    -> RUN/swa-FIRST-LAST.pt: one model from the many that the noisy late schedule visits."""
    paths = [p for p in sorted((run / "snapshots").glob("iter-*.pt")) if first <= int(p.stem[5:]) <= last]
    if len(paths) < 2:
        raise SystemExit(f"need at least two snapshots in {run / 'snapshots'} between {first} and {last}")
    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    net, cfg, meta = _averaged_network(ckpts, volumes_path or run / "volumes.pt", bn_batches)
    meta["swa"] = {"first": int(paths[0].stem[5:]), "last": int(paths[-1].stem[5:]), "snapshots": len(paths),
                   "bn_batches": bn_batches}
    out = run / f"swa-{first}-{last}.pt"
    _save_averaged(out, net, cfg, meta)
    log(f"averaged {len(paths)} snapshots ({paths[0].stem}..{paths[-1].stem}) -> {out}")
    return out


SOUP_MAY_DIFFER = {"seed"}  # runs of one recipe: only this Config field may differ


def soup_checkpoints(paths: list[Path], out: Path, volumes_path: Path, bn_batches: int = 50, log=print) -> Path:
    """Uniform weight average of the candidates of several runs of one recipe that differ only in their
    random seed (a "model soup", Wortsman et al., ICML 2022; the runs share their initialisation, so
    their weights average). Smooths out the run-to-run spread that a single CPU run carries."""
    if len(paths) < 2:
        raise SystemExit("soup: give at least two checkpoints")
    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    configs = [{k: v for k, v in c["metadata"]["config"].items() if k not in SOUP_MAY_DIFFER} for c in ckpts]
    for p, c, cfg in zip(paths, ckpts, configs):
        differ = sorted(k for k in set(cfg) | set(configs[0]) if cfg.get(k) != configs[0].get(k))
        if differ or c["metadata"]["trained_on"] != ckpts[0]["metadata"]["trained_on"]:
            raise SystemExit(f"soup: {p} is not a run of the same recipe as {paths[0]} "
                             f"(differs in {', '.join(differ) or 'training anatomies'})")
    net, cfg, meta = _averaged_network(ckpts, volumes_path, bn_batches)
    meta.pop("swa", None)
    meta["soup"] = {"bn_batches": bn_batches, "runs": [
        {"file": f"{p.parent.name}/{p.name}", "seed": c["metadata"]["config"]["seed"],
         "iteration": c["metadata"]["iteration"], "swa": c["metadata"].get("swa")} for p, c in zip(paths, ckpts)]}
    _save_averaged(out, net, cfg, meta)
    log(f"averaged {len(paths)} runs' checkpoints (seeds {', '.join(str(r['seed']) for r in meta['soup']['runs'])})"
        f" -> {out}")
    return out


# ---- evaluation on synthetic 3D series of the held-out anatomy ---------------------------------

EVAL_SERIES = (  # (plane, slices, slice mm, pixel mm, mirror): like clinical knee protocols
    ("sagittal", 80, 1.5, 0.6, False), ("sagittal", 36, 3.0, 0.5, True), ("sagittal", 120, 1.0, 0.7, False),
    ("coronal", 40, 3.0, 0.5, False), ("coronal", 80, 1.5, 0.6, True), ("sagittal", 30, 4.0, 0.4, True),
)
BONE_NAMES = {1: "femur", 2: "tibia", 3: "fibula", 4: "patella"}


def load_knee_checkpoint(checkpoint: Path):
    """(weights, label variant, network on the CPU) of a knee checkpoint, main or per-bone model."""
    from SpineKneeSegLib.engine.inference import load_network
    from SpineKneeSegLib.engine.weights import load_checkpoint, resolve_weights
    from SpineKneeSegLib.tasks import TASKS

    weights = resolve_weights(TASKS[TASK], str(checkpoint), load_checkpoint(checkpoint).get("model", "labels"))
    variant = weights.checkpoint["metadata"].get("variant", "multiclass")
    return weights, variant, load_network(weights, torch.device("cpu"))


def evaluate_series(checkpoint: Path, volumes_path: Path, seed: int = 777, log=print,
                    synth: dict | None = None) -> dict:
    """Run the product's inference (task card + checkpoint preprocessing) on synthetic series of
    the held-out anatomy; per-bone Dice of the raw network labels and after post-processing.
    ``synth``: SynthConfig overrides for the series (e.g. shared_tissue_p=1: one marrow intensity
    for the four bones, as in real MR; default: every structure its own intensity, as in v0.1.0's card)."""
    from SpineKneeSegLib.core.image import Image
    from SpineKneeSegLib.engine.inference import segment_slices
    from SpineKneeSegLib.engine.postprocessing import dice, largest_component_per_label
    from SpineKneeSegLib.tasks import TASKS
    from SpineKneeSegLib.tasks.knee.bone_split import split_any_bone

    card = TASKS[TASK]
    weights, variant, net = load_knee_checkpoint(checkpoint)
    held = [v for v in load_volumes(volumes_path) if v.name == HELD_OUT][0]
    overrides = dict(synth or {})
    synth = SynthConfig(**overrides)
    rows = []
    for i, (plane, n, slice_mm, pixel_mm, mirror) in enumerate(EVAL_SERIES):
        gen = torch.Generator().manual_seed(seed + i)
        s = synthesise_volume(held, synth, gen, plane=plane, n_slices=n, slice_mm=slice_mm, pixel_mm=pixel_mm,
                              size_px=int(round(160 / pixel_mm)), mirror=mirror)
        image = Image(s["image"], s["spacing"], tuple(s["origin"]), s["direction"])
        t = time.time()
        raw = segment_slices(card, image, net, torch.device("cpu"), weights.preprocessing).labels
        if variant == "merged":  # seed 000's merged channel, split into bones by components and position
            raw = split_any_bone(raw > 0, image)
        elif variant == "fibula":  # the per-bone model: its one class is the fibula
            raw = np.where(raw > 0, 3, 0).astype(np.uint8)
        final = largest_component_per_label(raw)
        row = {"series": f"{plane} {n}x{slice_mm} mm{' mirrored' if mirror else ''}",
               "seconds": round(time.time() - t, 2)}
        for value, name in BONE_NAMES.items():
            truth = s["labels"] == value
            if truth.sum() == 0 or (variant == "fibula" and value != 3):
                continue
            d = {name: dice(final == value, truth), f"{name}_raw": dice(raw == value, truth),
                 f"{name}_raw_vs_final": dice(raw == value, final == value)}
            row.update({k: float("nan") if v is None else round(v, 4) for k, v in d.items()})
        rows.append(row)
        log(json.dumps(row))
    return {"checkpoint": str(checkpoint), "held_out": HELD_OUT, "synthesis": overrides, "seed": seed, "series": rows,
            "mean_dice": mean_series_dice(rows)}


def mean_series_dice(rows: list[dict]) -> dict:
    """Per-bone Dice averaged over series rows (a bone absent from a series does not count there)."""
    def mean(values):
        values = [v for v in values if not np.isnan(v)]
        return round(float(np.mean(values)), 4) if values else float("nan")
    return {name: mean([r.get(name, np.nan) for r in rows]) for name in BONE_NAMES.values()}


def pool_evaluations(results: list[dict]) -> dict:
    """evaluate_series results with different seeds (other contrasts and poses of the same six series
    layouts) -> one result over all their series (one draw's fibula Dice differed by up to 0.25 between
    draws in session 10). One result is returned as it is: the model cards' seed-777 JSON."""
    if len(results) == 1:
        return results[0]
    rows = [dict(r, seed=res["seed"]) for res in results for r in res["series"]]
    return {**results[0], "seed": [res["seed"] for res in results], "series": rows, "mean_dice": mean_series_dice(rows)}


def slice_fit(checkpoint: Path, volumes_path: Path, anatomy: str, synth: dict | None = None, samples: int = 150,
              seed: int = 4242) -> dict:
    """Per-bone Dice (slices pooled) of a checkpoint on ``samples`` 2D synthetic slices of one prepared
    anatomy (name prefix), drawn like training samples with ``synth`` overrides and a fixed seed. On a
    *training* anatomy this measures how well the network fits its own training distribution (not
    generalisation); varying one SynthConfig field at a time shows which augmentation costs a bone."""
    _, variant, net = load_knee_checkpoint(checkpoint)
    matches = [v for v in load_volumes(volumes_path) if v.name.startswith(anatomy)]
    if len(matches) != 1:
        raise SystemExit(f"--anatomy {anatomy!r} matches {len(matches)} of the prepared volumes in {volumes_path}")
    x, y = validation_set(matches, Config(val_samples=samples), SynthConfig(**(synth or {})), seed)
    result = evaluate_slices(net, x, y, variant)
    return {"checkpoint": str(checkpoint), "anatomy": matches[0].name, "synthesis": dict(synth or {}),
            "samples": samples, "seed": seed, **result}


# ---- variant comparison, real-series check, model card -----------------------------------------

def compare_variants(runs: dict[str, Path], at_iteration: int) -> list[dict]:
    """Validation Dice of each variant's run at the same iteration (same validation slices)."""
    rows = []
    for variant, run in runs.items():
        history = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["state"]["history"]
        entry = next((h for h in history if h["iteration"] == at_iteration), None)
        if entry is None:
            raise SystemExit(f"{run}: no evaluation at iteration {at_iteration}")
        rows.append({"variant": variant, "iteration": at_iteration, **entry["dice"]})
    return rows


def check_real_series(checkpoint: Path, out: Path, log=print) -> list[dict]:
    """Run the product (CLI code path) on the two real knee series; nothing here is tuned on them."""
    from SpineKneeSegLib.core.datasets import data_root
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.engine.render import save_label_montage
    from SpineKneeSegLib.tasks import TASKS

    results = []
    for name in ("dess-dicom", "mese-t2-dicom"):
        series = data_root() / "knee" / name
        report = run_case(TASKS[TASK], [str(series)], out / name, RunOptions(weights=str(checkpoint)))
        montage = save_label_montage(out / name / "montage.png", read_image(series),
                                     read_image(out / name / "labels.nii.gz"), TASKS[TASK])
        results.append({"series": name, "summaries": report["summaries"], "warnings": report["warnings"],
                        "timings_s": report["timings_s"], "outputs": report["outputs"], "montage": str(montage)})
        log(json.dumps({"series": name, "warnings": report["warnings"], "timings_s": report["timings_s"]}))
    return results


def describe_components(labels: np.ndarray, image, bone: int, reference: int = 2) -> list[dict]:
    """Every 26-connected component of ``bone`` in a label map on ``image``'s grid, largest first:
    volume, slice range and centroid offset (mm, RAS: right, anterior, superior) from the
    ``reference`` bone's centroid (default the tibia). Shows where a network's stray pieces lie."""
    from scipy import ndimage
    from SpineKneeSegLib.tasks.knee.anatomy import _to_ras

    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    ref = np.argwhere(labels == reference)
    ref_ras = _to_ras(image, ref.mean(axis=0, keepdims=True))[0] if len(ref) else None
    comp, _ = ndimage.label(labels == bone, structure=np.ones((3, 3, 3)))
    rows = []
    for i, box in enumerate(ndimage.find_objects(comp), start=1):
        vox = np.argwhere(comp[box] == i) + [sl.start for sl in box]
        centre = _to_ras(image, vox.mean(axis=0, keepdims=True))[0]
        rows.append({"ml": round(len(vox) * voxel_ml, 3), "slices": [int(vox[:, 0].min()), int(vox[:, 0].max())],
                     "offset_ras_mm": None if ref_ras is None else [round(float(v), 1) for v in centre - ref_ras]})
    return sorted(rows, key=lambda r: -r["ml"])


def raw_components(checkpoint: Path, series: Path, bone: int) -> list[dict]:
    """The network's own (raw, before clean-up) labels of ``checkpoint`` on a series -> describe_components."""
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.engine.inference import load_network, segment_slices
    from SpineKneeSegLib.engine.weights import resolve_weights
    from SpineKneeSegLib.tasks import TASKS

    card = TASKS[TASK]
    image = read_image(str(series))
    weights = resolve_weights(card, str(checkpoint))
    net = load_network(weights, torch.device("cpu"))
    raw = segment_slices(card, image, net, torch.device("cpu"), {**weights.preprocessing}).labels
    return describe_components(np.asarray(raw), image, bone)


def _series_table(evaluation: dict) -> str:
    rows = "\n".join(
        f"| {r['series']} | " + " | ".join(f"{r.get(b, float('nan')):.3f} ({r.get(b + '_raw', float('nan')):.3f})"
                                          for b in BONE_NAMES.values()) + " |" for r in evaluation["series"])
    mean = evaluation["mean_dice"]
    means = " | ".join(f"{mean[b]:.3f}" for b in BONE_NAMES.values())
    return f"| series | femur | tibia | fibula | patella |\n|---|---|---|---|---|\n{rows}\n| **mean** | {means} |"


MAP_SOURCES = {"spl-atlas-labels.nrrd": "SPL Knee Atlas, Richolt/Jakab/Kikinis, Apache-2.0",
               "pymskt-dess-labels.nrrd": "pymskt, Gatti et al., MIT; a sagittal 3D DESS right knee"}


def _real_series_figures(plaus: dict) -> str:
    """The plausibility figures a reader of a card wants beside pass/fail: the network's raw pieces
    (>= 1 % of a bone), raw-vs-final Dice per bone and the fibula's widest cross-section."""
    checks = plaus.get("checks", {})
    pieces = checks.get("one_component_per_bone", {})
    pieces = pieces.get("raw_components", pieces.get("components", {}))
    dice = checks.get("raw_vs_final_dice", {}).get("dice", {})
    section = checks.get("fibula_cross_section", {})
    return ("/".join(str(pieces.get(b, "—")) for b in BONE_NAMES.values()) + "; "
            + "/".join("—" if dice.get(b) is None else f"{dice[b]:.2f}" for b in BONE_NAMES.values()) + "; "
            + (f"{section['widest_left_right_mm']:.0f} x {section['widest_anterior_posterior_mm']:.0f} mm"
               if "widest_left_right_mm" in section else "—"))


def model_card(version: str, meta: dict, evaluation: dict, real: list[dict], variants: list[dict],
               held_out: dict | None = None, notes: str = "", evaluation_tissue: dict | None = None) -> str:
    """``evaluation``: this checkpoint's synthetic series (of HELD_OUT). When the checkpoint saw
    every anatomy (--held-out none), ``held_out`` = {"version", "evaluation", "meta"} of the run
    that held HELD_OUT out, whose figures stand for generalisation. ``notes``: what the overlays
    showed (markdown, written after looking at them)."""
    cfg = meta["config"]
    val = meta["val"]["dice"]
    all_maps = meta["held_out"] == ALL_ANATOMIES
    variant_rows = "\n".join(f"| {v['variant']} | " + " | ".join(
        f"{v[k]:.3f}" if k in v else "—" for k in ("femur", "tibia", "fibula", "patella", "any_bone", "bone")) + " |"
        for v in variants)
    real_rows = []
    for r in real:
        plaus = r["summaries"].get("knee_plausibility", {})
        real_rows.append(f"| {r['series']} | {'passed' if plaus.get('passed') else 'FAILED'} | "
                         f"{_real_series_figures(plaus)} | "
                         f"{'; '.join(r['warnings']) or 'none'} | {r['timings_s'].get('total', float('nan')):.2f} |")
    trained_on = "; ".join(f"{m} ({MAP_SOURCES.get(m, 'data you brought')})" for m in meta["trained_on"])
    synth = {**asdict(SynthConfig()), **cfg.get("synth", {})}
    tissue_text = (f"""
- Tissue classes (SynthSeg's generation classes): in {synth['shared_tissue_p']:.0%} of the samples the
  structures of one tissue share one random intensity (within +-{synth['tissue_jitter']}): the four bones one
  marrow signal, all muscles one, as in real MR. The classes come from the label map's Slicer colour
  table (the SPL atlas colours every muscle alike) or the data README (pymskt: cartilage, menisci).""" if
                   synth["shared_tissue_p"] > 0 else "")
    if synth.get("distractor_p", 0) > 0:
        lo, hi = synth["distractors"]
        tissue_text += f"""
- Bone-like distractors: in {synth['distractor_p']:.0%} of the samples, {lo}-{hi} smooth-edged blobs
  ({synth['distractor_mm'][0]:g}-{synth['distractor_mm'][1]:g} mm semi-axes) over non-bone pixels, labelled
  background; {synth['distractor_mimic_p']:.0%} of them take a bone's marrow intensity and a dark rim, as
  a muscle belly can look."""
    if synth.get("bone_shift_mm", 0) > 0:
        names = ", ".join(BONE_NAMES[b] for b in synth["shift_bones"])
        tissue_text += f"""
- Per-bone shift: the {names} moved by a random offset (uniform +-{synth['bone_shift_mm']:g} mm per axis)
  relative to the other bones before the image is drawn, its old place unlabelled tissue, so that its place
  relative to the tibia varies as between people."""
    if synth.get("fascia_p", 0) > 0 or synth.get("streak_p", 0) > 0:
        tissue_text += f"""
- Lines in the soft tissues, which flat synthetic tissues lack and real muscle has: in
  {synth['fascia_p']:.0%} of the samples a 1-px line (fascia) between every two soft tissues, in
  {synth['streak_p']:.0%} thin streaks along a direction within {synth['streak_tilt_deg']:g} degrees of S-I
  (fat septa along muscle fibres, amplitude up to {synth['streak_amp']:g}); dark in
  {synth['line_dark_p']:.0%} of the samples, so a thin dark rim no longer means bone only."""
    loss_text = ("Soft F1 (Dice) loss" if not cfg.get("ce_weight") else
                 f"Soft F1 (Dice) loss plus {cfg['ce_weight']:g} x pixel cross-entropy (the seed's soft F1 alone: "
                 "`--ce-weight 0`)")
    slab_text = f"slabs anywhere across the bones and up to {synth['through_plane_margin_mm']:g} mm beyond"
    if synth.get("beyond_volume") == "extend":
        slab_text += ("; beyond a label map's first and last labelled axial slices those slices continue "
                      "along S-I (shafts and muscles reach the window's edge instead of stopping)")
    tissue_table = "" if evaluation_tissue is None else f"""

The same series with one marrow intensity for all four bones (`evaluate --synth shared_tissue_p=1`;
real MR shows every bone's marrow alike):

{_series_table(evaluation_tissue)}"""
    init = f" Fine-tuned from `{Path(cfg['init']).name}` (fresh optimiser)." if cfg.get("init") else ""
    swa, soup = meta.get("swa"), meta.get("soup")
    at_text = "at this checkpoint" if not swa else (
        f"at iteration {swa['last']} (the last averaged snapshot; the average itself is measured by the series below)")
    checkpoint_text = (f"iteration {meta['iteration']} of the planned {cfg['iterations']}" if not swa else
                       f"the weight average (SWA, `average`) of the {swa['snapshots']} snapshots at iterations "
                       f"{swa['first']}-{swa['last']} of the planned {cfg['iterations']}, batch-norm statistics "
                       f"re-estimated on {swa['bn_batches']} fresh synthetic batches")
    if soup:
        runs = soup["runs"]
        at_text = (f"of the seed-{cfg['seed']} run at iteration {meta['iteration']} (one of the averaged runs; the "
                   "average itself is measured by the series below)")
        spans = {None if not r["swa"] else (r["swa"]["first"], r["swa"]["last"]) for r in runs}
        each_text = (f"each the weight average (SWA) of its snapshots at iterations {runs[0]['swa']['first']}-"
                     f"{runs[0]['swa']['last']}" if len(spans) == 1 and runs[0]["swa"] else
                     "; ".join(f"{r['file']} at iteration {r['iteration']}" for r in runs))
        checkpoint_text = (f"the uniform weight average (`soup`, a model soup) of {len(runs)} runs of this recipe that "
                           f"differ only in their random seed ({', '.join(str(r['seed']) for r in runs)}), "
                           f"{each_text} of the planned {cfg['iterations']}; batch-norm statistics re-estimated on "
                           f"{soup['bn_batches']} fresh synthetic batches")
    coronal_patella = [r["patella"] for r in evaluation["series"]
                       if r["series"].startswith("coronal") and "patella" in r]
    coronal_text = ("\n- Coronal input: the patella is missed (Dice "
                    + ", ".join(f"{d:.2f}" for d in coronal_patella) + " on the coronal synthetic series); femur and "
                    "tibia hold." if coronal_patella and max(coronal_patella) < 0.2 else "")
    shaft_text = ("Beyond the label maps' ends (the SPL atlas covers ~119 mm along the leg) the shafts and muscles "
                  "are straight\n  continuations of the last labelled slice, not real anatomy."
                  if synth.get("beyond_volume") == "extend" else
                  "Label maps end where the atlases end (SPL covers ~119 mm along the leg): long-bone shafts beyond "
                  "that\n  were never seen as bone far from the joint.")
    if all_maps:
        ho = held_out["meta"]
        held_text = f"""- **No anatomy is held out from this model**: it saw both label maps, the final-model step once
  the held-out figures exist. Validation (checkpoint choice) used fixed synthetic slices of both maps,
  drawn apart from the training stream. Generalisation to an unseen anatomy is measured on the same
  recipe with {HELD_OUT} held out entirely: v{held_out['version']} (trained on {', '.join(ho['trained_on'])},
  iteration {ho['iteration']}), which this model started from."""
        figures = f"""## Held-out synthetic figures (unseen anatomy: v{held_out['version']}, trained without {HELD_OUT})
2D validation slices, Dice: femur {ho['val']['dice']['femur']:.3f}, tibia {ho['val']['dice']['tibia']:.3f},
fibula {ho['val']['dice']['fibula']:.3f}, patella {ho['val']['dice']['patella']:.3f}.

Synthetic 3D series of the held-out anatomy through the product's inference (Dice after
post-processing, raw network output in brackets):

{_series_table(held_out['evaluation'])}

## This model on the same synthetic series (anatomy seen in training; new synthesis draws)
These are not held-out figures: the DESS anatomy was in this model's training set. 2D validation
slices (both maps) at this checkpoint, Dice: femur {val['femur']:.3f}, tibia {val['tibia']:.3f},
fibula {val['fibula']:.3f}, patella {val['patella']:.3f}.

{_series_table(evaluation)}"""
    else:
        held_text = f"""- Held out entirely (validation and every figure below): {meta['held_out']}
  ({MAP_SOURCES.get(meta['held_out'], '')})."""
        figures = f"""## Held-out synthetic figures
2D validation slices {at_text}, Dice: femur {val['femur']:.3f}, tibia {val['tibia']:.3f},
fibula {val['fibula']:.3f}, patella {val['patella']:.3f}.

Synthetic 3D series of the held-out anatomy through the product's inference (Dice after
post-processing, raw network output in brackets):

{_series_table(evaluation)}{tissue_table}"""
    return f"""# Model card: knee-bones v{version} (starter, trained on synthetic images only)

**Task** `knee-bones` (seed 000): femur, tibia, fibula, patella in knee MRI, slice-wise 2D U-Net.

## Data
- **No labelled real knee MRI was available.** Training images are synthesised on the fly from
  label maps, the SynthSeg way (Billot et al., MedIA 2023; `Training/knee_synth.py`): random
  per-structure intensities and texture, pseudo-tissues in unlabelled regions, a dark cortical rim,
  partial volume over 0.5-4 mm slabs, blur, resolution loss, bias field, gamma, Rician noise,
  random 110-200 mm windows near the joint, rotation, anisotropic scale, elastic displacement,
  left/right mirroring, sagittal and coronal planes, {slab_text}.{tissue_text}
- Trained on: {trained_on}.
{held_text}
- Real series checked (no labels; nothing tuned on them): pyKNEEr DESS (GPL-3.0 repository) and pymskt
  multi-echo T2 (MIT) from ../shared/data/knee.

## Preprocessing (the task card; stored with the weights)
Slices along the acquisition axis (largest spacing; sagittal or coronal), canonical orientation;
fast N4 (estimated on a shrunk, masked image, applied at full resolution); a 160 mm square window
centred on the femorotibial joint, resampled to 224x224; per-volume z-score over the foreground.
The synthetic training population has random intensities by design, so it has no meaningful fixed
mean/std: statistics are the input's own (mean/std of voxels above the 5th percentile). The seed's
population-statistics variant is `normalisation: fixed` with `stats` in a checkpoint (for models
trained on one protocol's real images).

## Network and training
2D U-Net, constant {cfg['channels']} channels x {cfg['levels']} levels, ELU, batch norm, dropout
{cfg['dropout']} at the end of the contracting path, softmax background + 4 bones
({'lighter than ' if cfg['channels'] < 32 else ''}the seed's constant 32, selectable: `--channels 32`).
{loss_text}, Adam {cfg['lr']:g} decaying exponentially toward {cfg['lr_final']:g} over
{cfg['iterations']} iterations, batches of {cfg['batch_size']} random {cfg['patch']}x{cfg['patch']} crops of
224x224 synthetic slices, early stopping patience {cfg['patience']} evaluations ({cfg['eval_every']}
iterations each) on {cfg['val_samples']} fixed synthetic validation slices.{init}
This checkpoint: {checkpoint_text} (CPU, 2 cores; training resumes
with `Training/knee_bones.py train --resume`; a GPU session is the place to finish it).

{figures}

## Seed variants (same synthetic data, same schedule, validation Dice at equal iterations)

| variant | femur | tibia | fibula | patella | any bone | merged "bone" |
|---|---|---|---|---|---|---|
{variant_rows}

Merged "bone" is seed 000's single any-bone channel; compare it with the multiclass model's "any
bone" (prediction > 0 against truth > 0). The fibula variant is the seed's separate per-bone model;
compare it with the multiclass fibula column. The variant runs were stopped at {variants[0]['iteration']}
iterations to leave the CPU to the main model, so this is an early-training comparison. The seed's
finding that a merged channel learns more easily holds here too. Both variants run in the product:
a merged checkpoint (`--weights`, metadata `variant: merged`) is split into bones by
`SpineKneeSegLib.tasks.knee.bone_split.split_any_bone`; a per-bone fibula model runs beside the main one with
`--aux-weights fibula=FILE` and its fibula replaces the main one's.

## Real series (plausibility check, no labels)

| series | plausibility | raw pieces fem/tib/fib/pat; raw-vs-final Dice; fibula widest R-L x A-P | warnings | total s |
|---|---|---|---|---|
{chr(10).join(real_rows)}

{notes.strip() or "Overlays: no observations recorded."}

## Known limits
- A starter model: {'two' if all_maps else 'one'} training {'anatomies' if all_maps else 'anatomy'}, synthetic
  images only, stopped far short of its schedule.{coronal_text}
- {shaft_text}
- Nothing was measured on labelled real images; the figures above are synthetic.

## Licence of the data
SPL Knee Atlas: Apache-2.0. pymskt label map and T2 series: MIT. pyKNEEr DESS series: GPL-3.0 repository.
"""


def ship(out: Path, version: str, evaluation: Path, real: Path, variants: Path, held_out: Path | None = None,
         notes: Path | None = None, checkpoint: Path | None = None, evaluation_tissue: Path | None = None) -> int:
    """``held_out``: a JSON {"version", "evaluation": eval JSON path, "checkpoint": path} for a
    model trained on every anatomy (the held-out-anatomy run whose figures it carries).
    ``checkpoint``: the weights to ship (default OUT/best.pt, the best validation evaluation);
    ``evaluation_tissue``: the same series with one marrow intensity for all bones (evaluate --synth)."""
    import shutil

    from SpineKneeSegLib.engine.weights import models_dir, register_model

    checkpoint = checkpoint or out / "best.pt"
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["metadata"]
    held = None
    if held_out is not None:
        spec = json.loads(held_out.read_text())
        held = {"version": spec["version"], "evaluation": json.loads(Path(spec["evaluation"]).read_text()),
                "meta": torch.load(spec["checkpoint"], map_location="cpu", weights_only=True)["metadata"]}
    elif meta["held_out"] == ALL_ANATOMIES:
        raise SystemExit("a model trained on every anatomy ships with --held-out-figures (its held-out run)")
    target = models_dir() / f"{TASK}-{version}.pt"
    card = models_dir() / f"{TASK}-{version}.md"
    shutil.copyfile(checkpoint, target)
    card.write_text(model_card(version, meta, json.loads(evaluation.read_text()), json.loads(real.read_text()),
                               json.loads(variants.read_text()), held, notes.read_text() if notes else "",
                               json.loads(evaluation_tissue.read_text()) if evaluation_tissue else None))
    mean = (held or {}).get("evaluation") or json.loads(evaluation.read_text())
    mean = mean["mean_dice"]
    maps = "both label maps" if held else "one label map"
    entry = register_model(target, TASK, version, card=card.name,
                           description=f"starter knee-bones trained on synthetic images from {maps}: held-out "
                                       "synthetic Dice femur/tibia/fibula/patella "
                                       + "/".join(f"{mean[b]:.2f}" for b in BONE_NAMES.values()))
    print(f"registered {entry.file} sha256 {entry.sha256}")
    return 0


VARIABLE_LENGTH_SYNTH = {"shift_bones"}  # SynthConfig tuples that are lists, not fixed (lo, hi) pairs


def parse_synth_overrides(items: list[str]) -> dict:
    """["shared_tissue_p=0.8", "fov_mm=110,200"] -> SynthConfig overrides, typed like the defaults."""
    defaults = asdict(SynthConfig())
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        if key not in defaults or key == "extra" or not text:
            raise SystemExit(f"--synth {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(k for k in defaults if k != 'extra')}")
        kind = defaults[key]
        try:
            if key in VARIABLE_LENGTH_SYNTH:  # any number of values, typed like the first default
                out[key] = tuple(type(kind[0])(v) for v in text.split(","))
                if key == "shift_bones" and not all(1 <= b <= BONES for b in out[key]):
                    raise SystemExit(f"--synth {item!r}: bones are 1 femur, 2 tibia, 3 fibula, 4 patella")
            elif isinstance(kind, tuple):
                out[key] = tuple(type(d)(v) for d, v in zip(kind, text.split(",")))
                if len(text.split(",")) != len(kind):
                    raise ValueError
            else:
                out[key] = type(kind)(text)
        except ValueError:
            raise SystemExit(f"--synth {item!r}: {key} takes {len(kind) if isinstance(kind, tuple) else 1} "
                             f"{type(kind[0] if isinstance(kind, tuple) else kind).__name__} value(s)") from None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--labelmaps", type=Path, default=None)
    p.add_argument("--spacing", type=float, default=Config.spacing_mm)
    p.add_argument("--pairs", type=Path, default=None, help="CSV name,image,labels,mapping of data you bring")
    p.add_argument("--no-shared", action="store_true", help="only --pairs, not the shared label maps")
    z = sub.add_parser("import-oai-zib", help="pair OAI-ZIB masks with OAI images -> a --pairs CSV")
    z.add_argument("--masks", type=Path, required=True)
    z.add_argument("--images", type=Path, required=True)
    z.add_argument("--csv", type=Path, required=True)
    f = sub.add_parser("import-folders",
                       help="pair an image folder with a label-map folder by case name -> a --pairs CSV")
    f.add_argument("--images", type=Path, required=True, help="images: files (NIfTI, NRRD, MHA/MHD) or DICOM folders")
    f.add_argument("--labels", type=Path, required=True, help="label maps, one per image, same case names")
    f.add_argument("--mapping", required=True, help="label value -> bone, e.g. 1:1,2:2,3:3,4:4 (1 femur, 2 tibia, "
                   "3 fibula, 4 patella); bones left out are unlabelled, not background")
    f.add_argument("--label-suffix", default="", help="end of a label file's name to drop, e.g. _seg")
    f.add_argument("--csv", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--volumes", type=Path, default=None, help="prepared volumes.pt (default: OUT/volumes.pt)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--variant", default=Config.variant, choices=("multiclass", "merged", "fibula"))
    t.add_argument("--channels", type=int, default=Config.channels)
    t.add_argument("--iterations", type=int, default=Config.iterations)
    t.add_argument("--batch-size", type=int, default=Config.batch_size)
    t.add_argument("--patch", type=int, default=Config.patch)
    t.add_argument("--eval-every", type=int, default=Config.eval_every)
    t.add_argument("--stop-after", type=int, default=None, help="stop at this iteration (schedule unchanged)")
    t.add_argument("--patience", type=int, default=Config.patience, help="early stopping, in evaluations")
    t.add_argument("--seed", type=int, default=Config.seed)
    t.add_argument("--held-out", default=Config.held_out, help="name of the volume that only validates")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--workers", type=int, default=Config.workers)
    t.add_argument("--init", default=None, help="start from this checkpoint's weights (fresh optimiser and schedule)")
    t.add_argument("--lr", type=float, default=Config.lr, help="schedule start (seed 000: 1e-3)")
    t.add_argument("--lr-final", type=float, default=Config.lr_final, help="schedule end (seed 000: 1e-4)")
    t.add_argument("--ce-weight", type=float, default=Config.ce_weight,
                   help="add this much pixel cross-entropy to the seed's soft F1 loss (0: the seed's loss alone)")
    t.add_argument("--synth", nargs="+", default=[], metavar="KEY=VALUE",
                   help="knee_synth.SynthConfig overrides, e.g. shared_tissue_p=0.8 through_plane_margin_mm=25")
    e = sub.add_parser("evaluate")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--checkpoint", type=Path, default=None, help="default: OUT/best.pt")
    e.add_argument("--volumes", type=Path, default=None)
    e.add_argument("--synth", nargs="+", default=[], metavar="KEY=VALUE",
                   help="SynthConfig overrides for the series (e.g. shared_tissue_p=1); the JSON name gets -synth")
    e.add_argument("--seeds", type=int, nargs="+", default=[777],
                   help="one draw of the six series per seed, pooled (777: the model cards' figures)")
    sp = sub.add_parser("soup", help="weight-average the candidates of runs of one recipe (differing only in seed)")
    sp.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    sp.add_argument("--out", type=Path, required=True, help="the averaged checkpoint (.pt)")
    sp.add_argument("--volumes", type=Path, required=True, help="prepared volumes.pt (batch-norm re-estimate)")
    a = sub.add_parser("average", help="weight-average a run's snapshots (SWA) -> OUT/swa-FIRST-LAST.pt")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--first", type=int, required=True)
    a.add_argument("--last", type=int, required=True)
    a.add_argument("--volumes", type=Path, default=None, help="prepared volumes.pt (default: OUT/volumes.pt)")
    c = sub.add_parser("compare", help="validation Dice of variant runs at one iteration -> JSON")
    c.add_argument("--runs", nargs="+", required=True, help="VARIANT=RUN_DIR ...")
    c.add_argument("--at", type=int, required=True)
    c.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("check-real", help="run the product on the two real knee series")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--checkpoint", type=Path, default=None)
    f = sub.add_parser("fit", help="per-bone Dice on 2D synthetic slices of one anatomy (e.g. a training one)")
    f.add_argument("--checkpoint", type=Path, required=True)
    f.add_argument("--volumes", type=Path, required=True, help="prepared volumes.pt")
    f.add_argument("--anatomy", default="spl", help="name prefix of the prepared volume (default: spl, the atlas)")
    f.add_argument("--samples", type=int, default=150)
    f.add_argument("--synth", nargs="+", default=[], metavar="KEY=VALUE", help="SynthConfig overrides")
    k = sub.add_parser("components", help="raw (pre-clean-up) components of one bone on a series, largest first")
    k.add_argument("--checkpoint", type=Path, required=True)
    k.add_argument("--series", type=Path, required=True, help="DICOM folder or image file")
    k.add_argument("--bone", default="fibula", choices=list(BONE_NAMES.values()))
    s = sub.add_parser("ship")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--variants", type=Path, default=None, help="variant comparison JSON (default: OUT/variants.json)")
    s.add_argument("--held-out-figures", type=Path, default=None,
                   help='for a model trained on every anatomy: JSON {"version", "evaluation", "checkpoint"} of the '
                        "run that held the DESS map out")
    s.add_argument("--notes", type=Path, default=None, help="markdown: what the real-series overlays showed")
    s.add_argument("--checkpoint", type=Path, default=None, help="weights to ship (default: OUT/best.pt)")
    s.add_argument("--evaluation", type=Path, default=None, help="evaluate JSON (default: OUT/eval-best.json)")
    s.add_argument("--evaluation-tissue", type=Path, default=None,
                   help="evaluate --synth shared_tissue_p=1 JSON of the same checkpoint")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from SpineKneeSegLib.core.datasets import data_root

        labelmaps = None if args.no_shared else (args.labelmaps or data_root() / "knee" / "labelmaps")
        prepare(args.out, labelmaps, args.spacing, read_pairs(args.pairs) if args.pairs else None)
        return 0
    if args.command == "import-folders":
        try:
            mapping = parse_mapping(args.mapping)
        except ValueError as exc:
            raise SystemExit(f"--mapping: {exc}") from None
        rows = import_folders(args.images, args.labels, mapping, args.label_suffix)
        write_pairs(rows, args.csv)
        print(f"{len(rows)} case(s) -> {args.csv}; next: prepare --pairs {args.csv}")
        return 0
    if args.command == "import-oai-zib":
        rows = import_oai_zib(args.masks, args.images)
        write_pairs(rows, args.csv)
        print(f"{len(rows)} OAI-ZIB case(s) -> {args.csv} (femur and tibia labelled; fibula and patella "
              "unlabelled: the loss treats them as unknown, not background)")
        return 0
    if args.command == "train":
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = Config(variant=args.variant, channels=args.channels, iterations=args.iterations,
                     batch_size=args.batch_size, patch=args.patch, eval_every=args.eval_every, seed=args.seed,
                     patience=args.patience, held_out=args.held_out, stop_after=args.stop_after,
                     workers=args.workers, init=args.init, lr=args.lr, lr_final=args.lr_final,
                     synth=parse_synth_overrides(args.synth), ce_weight=args.ce_weight)
        state = train(cfg, args.out, args.resume, args.device, args.max_minutes, volumes_path=args.volumes)
        print(f"best mean Dice {state['best']:.4f} at epoch {state['best_epoch']}")
        return 0
    if args.command == "evaluate":
        overrides = parse_synth_overrides(args.synth)
        result = pool_evaluations([evaluate_series(args.checkpoint or args.out / "best.pt",
                                                   args.volumes or args.out / "volumes.pt", seed=seed, synth=overrides)
                                   for seed in args.seeds])
        name = (args.checkpoint or args.out / "best.pt").stem + ("-synth" if overrides else "")
        name += "" if args.seeds == [777] else "-seeds-" + "-".join(map(str, args.seeds))
        (args.out / f"eval-{name}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["mean_dice"]))
        return 0
    if args.command == "soup":
        soup_checkpoints(args.checkpoints, args.out, args.volumes)
        return 0
    if args.command == "average":
        average_snapshots(args.out, args.first, args.last, volumes_path=args.volumes)
        return 0
    if args.command == "compare":
        runs = dict(item.split("=", 1) for item in args.runs)
        rows = compare_variants({k: Path(v) for k, v in runs.items()}, args.at)
        args.json.write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows, indent=1))
        return 0
    if args.command == "check-real":
        checkpoint = args.checkpoint or args.out / "best.pt"
        rows = check_real_series(checkpoint, args.out / "real")
        (args.out / "real.json").write_text(json.dumps(rows, indent=2))
        return 0
    if args.command == "fit":
        result = slice_fit(args.checkpoint, args.volumes, args.anatomy, parse_synth_overrides(args.synth), args.samples)
        print(json.dumps(result))
        return 0
    if args.command == "components":
        bone = {v: k for k, v in BONE_NAMES.items()}[args.bone]
        rows = raw_components(args.checkpoint, args.series, bone)
        print(f"{args.bone}: {len(rows)} raw component(s); offsets from the tibia's centroid (RAS mm)")
        for r in rows:
            first, last = r["slices"]
            print(f"{r['ml']:8.2f} ml  slices {first}-{last}  right/anterior/superior {r['offset_ras_mm']}")
        return 0
    if args.command == "ship":
        return ship(args.out, args.version, args.evaluation or args.out / "eval-best.json", args.out / "real.json",
                    args.variants or args.out / "variants.json", args.held_out_figures, args.notes, args.checkpoint,
                    args.evaluation_tissue)
    return 2


if __name__ == "__main__":
    sys.exit(main())
