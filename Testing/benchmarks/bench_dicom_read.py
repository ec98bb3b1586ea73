"""How long reading a DICOM series takes in the layouts a PACS or a scanner exports it in.

The series (default: the shared knee DESS) is written again, slice by slice, as JPEG lossless
(GDCM, the usual PACS export) and RLE (pydicom), and as one enhanced multi-frame file (highdicom's
legacy converter, as newer scanners and converters write); each layout is read with
``read_image`` in turn, interleaved, and the median printed with whether its voxels and geometry
equal the plain series' (they must).

    python Testing/benchmarks/bench_dicom_read.py [--series FOLDER] [--runs 5] [--echo N]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import locale
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

LAYOUTS = ("plain", "jpeg-lossless", "rle", "enhanced")


def default_series() -> Path | None:
    from SpineKneeSegLib.core.datasets import data_root

    root = data_root()
    return root / "knee" / "dess-dicom" if root else None


@contextlib.contextmanager
def locale_kept():
    """ITK's GDCM writer sets the C locale and leaves it: Python's open() then defaults to ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_layouts(series: Path, folder: Path) -> dict[str, Path]:
    """The series in each layout, under ``folder``; the plain one is the series itself."""
    import pydicom
    from highdicom.legacy import LegacyConvertedEnhancedMRImage
    from pydicom.uid import generate_uid

    files = sorted(p for p in series.iterdir() if p.is_file())
    out = {"plain": series}
    for name in ("jpeg-lossless", "rle"):
        (folder / name).mkdir()
        out[name] = folder / name
    with locale_kept():
        _write_compressed(files, out)
    logging.getLogger("highdicom").setLevel(logging.ERROR)  # each attribute a legacy header lacks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-component PatientName
        datasets = [pydicom.dcmread(f) for f in files]
        out["enhanced"] = folder / "enhanced.dcm"
        LegacyConvertedEnhancedMRImage(datasets, series_instance_uid=generate_uid(), series_number=99,
                                       sop_instance_uid=generate_uid(), instance_number=1).save_as(out["enhanced"])
    return out


def _write_compressed(files: list[Path], out: dict[str, Path]) -> None:
    import pydicom
    import SimpleITK as sitk
    from pydicom.uid import RLELossless

    for f in files:
        ds = pydicom.dcmread(f)
        # the pixels in native byte order: pydicom compresses a big-endian source's bytes (the knee MESE) swapped
        pixels = ds.pixel_array
        ds.compress(RLELossless, pixels.astype(pixels.dtype.newbyteorder("=")))
        pydicom.dcmwrite(out["rle"] / f.name, ds, little_endian=True, implicit_vr=False, enforce_file_format=True)
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.KeepOriginalImageUIDOn()
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.SetFileName(str(out["jpeg-lossless"] / f.name))
        writer.Execute(sitk.ReadImage(str(f)))


def bench(layouts: dict[str, Path], runs: int, echo: int | None) -> list[dict]:
    from SpineKneeSegLib.core.image_io import read_image

    reference = read_image(layouts["plain"], echo=echo)
    times = {name: [] for name in layouts}
    same = {}
    for i in range(runs + 1):  # the first round warms the caches and imports, uncounted
        for name, path in layouts.items():
            image = None
            gc.collect()  # the previous layout's objects: a full collection in the middle of a read cost up to 0.15 s
            t = time.perf_counter()
            image = read_image(path, echo=echo)
            if i:
                times[name].append(time.perf_counter() - t)
            same[name] = (image.array.shape == reference.array.shape and np.array_equal(image.array, reference.array)
                          and image.same_geometry(reference))
    return [{"layout": name, "median_s": statistics.median(times[name]), "min_s": min(times[name]),
             "max_s": max(times[name]), "same": same[name], "shape": reference.array.shape} for name in layouts]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=None, help="a single-frame DICOM series folder")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--echo", type=int, default=None, help="for a multi-echo series")
    args = parser.parse_args(argv)
    series = args.series or default_series()
    if series is None or not series.is_dir():
        print("no series: pass --series FOLDER or set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(write_layouts(series, Path(tmp)), args.runs, args.echo)
    print(f"{series} ({len(list(series.iterdir()))} files), read_image, median of {args.runs}:")
    for r in rows:
        print(f"  {r['layout']:14s} {r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f})  "
              f"same voxels and geometry as plain: {'yes' if r['same'] else 'NO'}")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
