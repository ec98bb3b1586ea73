"""Importers for the X-ray image + mask formats users bring; each writes label maps on the image's
exact grid (NIfTI, uint8) and a manifest CSV (id,image,labels) that ``Training/xray.py train
--manifest`` reads.

    python Training/xray_import.py folders --images imgs/ --masks masks/ --out imported/ [--classes femur]
    python Training/xray_import.py coco --json _annotations.coco.json --images train/ --out imported/ [--classes femur]
    python Training/xray_import.py jsrt --images All247images/ --masks scr/masks/ --out imported/ \
        --classes "right lung,left lung,heart"

* folders: image and mask files paired by name stem (a mask may add ``_mask``, ``-mask``,
  ``_label`` or ``_seg``); masks are PNG/TIFF/NIfTI/NRRD/... with 0 = background and either one
  foreground value (0/1, 0/255: label 1) or the label values themselves (1..N).
* coco: COCO instance JSON (Roboflow's export, as seed 003's dataset came): polygons (and
  uncompressed RLE) rasterised on pixel centres (COCO puts pixel (0, 0)'s centre at (0.5, 0.5));
  categories become labels 1..N in ``--classes`` order (default: the categories that have
  annotations, by id). Compressed RLE needs pycocotools and is refused with a clear message.
* jsrt: JSRT/SCR layout: images (JSRT ``.IMG`` raw 2048 x 2048 big-endian 12-bit, 0.175 mm,
  stored dark-is-high and inverted here; or any format the product reads) and one mask folder per
  class (``<masks>/<class>/<image stem>.gif|png``); SCR masks at a fraction of the image size
  (1024 for 2048) are expanded by pixel replication (exact pixel-area correspondence); overlaps
  take the later class in ``--classes``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from SpineKneeSegLib.core.errors import InputError  # noqa: E402
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.core.image_io import read_image, write_image  # noqa: E402
from SpineKneeSegLib.core.atomic import write_text_atomic  # noqa: E402

MASK_SUFFIXES = ("", "_mask", "-mask", "_label", "-label", "_seg", "-seg")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz", ".nrrd", ".mha", ".img")
JSRT_SHAPE, JSRT_PIXEL_MM = (2048, 2048), 0.175


def _stem(path: Path) -> str:
    name = path.name
    for ext in sorted(IMAGE_EXTS + (".gif",), key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_any_image(path: Path) -> Image:
    """The product's reader, plus JSRT's raw .IMG (no header: 2048 x 2048 big-endian, inverted)."""
    if path.suffix.lower() == ".img":
        raw = np.fromfile(path, dtype=">u2")
        if raw.size != JSRT_SHAPE[0] * JSRT_SHAPE[1]:
            raise InputError(f"not a JSRT .IMG ({raw.size} values, expected {JSRT_SHAPE[0]}x{JSRT_SHAPE[1]})", path)
        return Image((4095 - np.clip(raw.reshape(JSRT_SHAPE), 0, 4095)).astype(np.uint16)[None],
                     (JSRT_PIXEL_MM, JSRT_PIXEL_MM, 1.0), meta={"source": str(path)})
    return read_image(path)


def read_mask(path: Path) -> np.ndarray:
    """(rows, cols) uint8 of a mask file (GIF through Pillow, everything else through the reader)."""
    if path.suffix.lower() == ".gif":
        from PIL import Image as PILImage

        with PILImage.open(path) as im:
            return np.asarray(im.convert("L"))
    image = read_image(path)
    if not image.is_2d:
        raise InputError(f"mask is not 2D (shape {image.array.shape})", path)
    return image.array[0]


def binary_or_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(mask)
    if len(values) <= 2:
        return (mask > 0).astype(np.uint8)
    if values.max() > 255 or not np.allclose(values, np.round(values)):
        raise InputError(f"mask values {values[:8]} are neither binary nor label values 1..N", path)
    return mask.astype(np.uint8)


def fit_to_image(mask: np.ndarray, shape: tuple[int, int], path: Path) -> np.ndarray:
    """A mask on the image's pixels: equal shape, or an integer fraction expanded by replication."""
    if mask.shape == shape:
        return mask
    fr, fc = shape[0] / mask.shape[0], shape[1] / mask.shape[1]
    if fr == fc and fr == int(fr) and fr > 1:
        return np.kron(mask, np.ones((int(fr), int(fr)), mask.dtype))
    raise InputError(f"mask is {mask.shape[0]}x{mask.shape[1]}, image is {shape[0]}x{shape[1]} (not an integer "
                     "fraction): cannot put it on the image's pixels", path)


class Writer:
    """Label maps as <out>/labels/<id>.nii.gz on the image grid + <out>/manifest.csv."""

    def __init__(self, out: Path, classes: list[str]):
        self.out, self.rows, self.classes = out, [], classes
        (out / "labels").mkdir(parents=True, exist_ok=True)

    def add(self, case_id: str, image_path: Path, image: Image, labels: np.ndarray) -> None:
        if labels.shape != image.array.shape[1:]:
            raise InputError(f"labels {labels.shape} do not match the image {image.array.shape[1:]}", image_path)
        target = self.out / "labels" / f"{case_id}.nii.gz"
        write_image(image.with_array(labels[None].astype(np.uint8)), target)
        if image_path.suffix.lower() == ".img":  # the trainer's reader has no raw .IMG: store a NIfTI copy
            image_path = self.out / "images" / f"{case_id}.nii.gz"
            write_image(image, image_path)
        self.rows.append({"id": case_id, "image": str(image_path.resolve()), "labels": str(target.resolve())})

    def close(self) -> Path:
        manifest = self.out / "manifest.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "image", "labels"])
            w.writeheader()
            w.writerows(self.rows)
        write_text_atomic(self.out / "classes.json", json.dumps(
            [{"value": n + 1, "name": c} for n, c in enumerate(self.classes)], indent=1))
        print(f"{len(self.rows)} cases -> {manifest}")
        return manifest


def import_folders(images: Path, masks: Path, out: Path, classes: list[str]) -> Path:
    by_stem = {_stem(p): p for p in _files(masks)}
    writer = Writer(out, classes)
    missing = []
    for path in _files(images):
        stem = _stem(path)
        mask_path = next((by_stem[stem + s] for s in MASK_SUFFIXES if stem + s in by_stem), None)
        if mask_path is None:
            missing.append(path.name)
            continue
        image = read_any_image(path)
        labels = binary_or_labels(fit_to_image(read_mask(mask_path), image.array.shape[1:], mask_path), mask_path)
        if labels.max() > len(classes):
            raise InputError(f"label {labels.max()} but only {len(classes)} class(es) given ({', '.join(classes)})",
                             mask_path)
        writer.add(stem, path, image, labels)
    if missing:
        print(f"no mask for {len(missing)} image(s): {', '.join(missing[:5])}", file=sys.stderr)
    return writer.close()


def rasterise_polygon(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres (COCO: (c + 0.5, r + 0.5)) lie inside the polygon (even-odd rule)."""
    h, w = shape
    out = np.zeros(shape, bool)
    x, y = xy[:, 0], xy[:, 1]
    r0, r1 = max(0, int(np.floor(y.min() - 0.5))), min(h, int(np.ceil(y.max() + 0.5)))
    c0, c1 = max(0, int(np.floor(x.min() - 0.5))), min(w, int(np.ceil(x.max() + 0.5)))
    if r1 <= r0 or c1 <= c0:
        return out
    py, px = np.mgrid[r0:r1, c0:c1] + 0.5
    inside = np.zeros(py.shape, bool)
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    for xa, ya, xb, yb in zip(x, y, x2, y2):  # crossing number, one edge at a time
        if ya == yb:
            continue
        crosses = (ya > py) != (yb > py)
        xcross = xa + (py - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (px < xcross)
    out[r0:r1, c0:c1] = inside
    return out


def rle_decode(counts: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Uncompressed COCO RLE (column-major runs, starting with background)."""
    flat = np.zeros(shape[0] * shape[1], bool)
    pos, value = 0, False
    for n in counts:
        flat[pos:pos + n] = value
        pos, value = pos + n, not value
    return flat.reshape(shape[1], shape[0]).T


def import_coco(json_path: Path, images: Path, out: Path, classes: list[str] | None) -> Path:
    data = json.loads(json_path.read_text(encoding="utf-8"))
    cats = {c["id"]: c["name"] for c in data.get("categories", [])}
    used = sorted({a["category_id"] for a in data.get("annotations", [])})
    if classes is None:
        classes = [cats[c] for c in used]
    value_of = {cid: classes.index(name) + 1 for cid, name in cats.items() if name in classes}
    unknown = {cats.get(c, c) for c in used if c not in value_of}
    if unknown:
        print(f"annotations of categories not in --classes are ignored: {sorted(map(str, unknown))}", file=sys.stderr)
    anns: dict[int, list] = {}
    for a in data.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    writer = Writer(out, classes)
    for info in data.get("images", []):
        path = images / info["file_name"]
        image = read_any_image(path)
        h, w = image.array.shape[1:]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise InputError(f"COCO says {info['height']}x{info['width']}, the file is {h}x{w}", path)
        labels = np.zeros((h, w), np.uint8)
        for a in sorted(anns.get(info["id"], []), key=lambda a: value_of.get(a["category_id"], 0)):
            if a["category_id"] not in value_of:
                continue
            seg = a["segmentation"]
            if isinstance(seg, dict):
                if not isinstance(seg.get("counts"), list):
                    raise InputError("compressed RLE segmentation: install pycocotools and convert to polygons or "
                                     "uncompressed RLE first", json_path)
                mask = rle_decode(seg["counts"], tuple(seg["size"]))
            else:
                mask = np.zeros((h, w), bool)
                for poly in seg:
                    if len(poly) >= 6:
                        mask ^= rasterise_polygon(np.asarray(poly, float).reshape(-1, 2), (h, w))
            labels[mask] = value_of[a["category_id"]]
        writer.add(Path(info["file_name"]).stem, path, image, labels)
    return writer.close()


def import_jsrt(images: Path, masks: Path, out: Path, classes: list[str]) -> Path:
    folders = {c: masks / c for c in classes}
    absent = [str(f) for f in folders.values() if not f.is_dir()]
    if absent:
        raise InputError(f"no mask folder for class(es): {', '.join(absent)}", masks)
    writer = Writer(out, classes)
    for path in _files(images):
        stem = _stem(path)
        mask_files = {c: next((f / (stem + e) for e in (".gif", ".png", ".tif") if (f / (stem + e)).exists()), None)
                      for c, f in folders.items()}
        if any(m is None for m in mask_files.values()):
            print(f"{path.name}: masks missing for {[c for c, m in mask_files.items() if m is None]}, skipped",
                  file=sys.stderr)
            continue
        image = read_any_image(path)
        labels = np.zeros(image.array.shape[1:], np.uint8)
        for n, c in enumerate(classes):
            m = fit_to_image(read_mask(mask_files[c]) > 0, image.array.shape[1:], mask_files[c])
            labels[m] = n + 1
        writer.add(stem, path, image, labels)
    return writer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("folders")
    f.add_argument("--images", type=Path, required=True)
    f.add_argument("--masks", type=Path, required=True)
    c = sub.add_parser("coco")
    c.add_argument("--json", type=Path, required=True)
    c.add_argument("--images", type=Path, help="folder of the images (default: the JSON's folder)")
    j = sub.add_parser("jsrt")
    j.add_argument("--images", type=Path, required=True)
    j.add_argument("--masks", type=Path, required=True)
    for p in (f, c, j):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--classes", help="comma-separated class names = labels 1..N")
    args = parser.parse_args(argv)
    classes = [s.strip() for s in args.classes.split(",")] if args.classes else None
    try:
        if args.command == "folders":
            import_folders(args.images, args.masks, args.out, classes or ["femur"])
        elif args.command == "coco":
            import_coco(args.json, args.images or args.json.parent, args.out, classes)
        else:
            import_jsrt(args.images, args.masks, args.out, classes or ["right lung", "left lung", "heart"])
    except InputError as exc:
        print(f"xray_import: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
