"""Knee-bones data: the shared label maps and the pairs users bring -> prepared volumes
(``volumes.pt``, SimpleITK), the synthetic training stream and validation slices (knee_synth.py),
and the run's Config. Used by knee_bones.py (the command line)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from knee_synth import BONES, KneeVolume, SynthConfig, synthesise, synthesise_batch
from trainloop import rank_seed

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
    for line in path.read_text(encoding="utf-8").splitlines():
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
    with open(csv_path, newline="", encoding="utf-8") as f:
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
    tmp.write_text(buf.getvalue(), encoding="utf-8")
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
    seed = rank_seed(cfg.seed) * 100_003 + iteration  # a data-parallel process's own stream (rank 0: cfg.seed)
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

