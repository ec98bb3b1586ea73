"""Read and write images: NIfTI, NRRD, MetaImage, PNG/JPEG/TIFF and DICOM series -> ``Image``.

Every reading failure becomes an ``InputError`` that names the file and the problem. DICOM series
are assembled here (not by a series reader) so that slice order, multi-echo splitting, gap checks
and oblique / left-handed geometry are explicit and exact:

* files are grouped by SeriesInstanceUID, then split by echo (EchoNumbers, else EchoTime);
* each frame of an enhanced multi-frame file is a slice, with its position, echo and rescale
  from the functional groups (so such a file reads as the series it holds);
* slices are sorted by position along the slice normal (row x column cosines);
* origin = first sorted ImagePositionPatient, direction = (row, column, slice-step) cosines,
  spacing = (PixelSpacing[1], PixelSpacing[0], measured step).
"""
from __future__ import annotations

import fnmatch
import gzip
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SpineKneeSegLib.core.atomic import atomic_path
from SpineKneeSegLib.core.errors import InputError, encodable_path
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.lazy import LazyModule

pydicom = LazyModule("pydicom")  # DICOM inputs only: 0.09 s of start-up (with requests) a NIfTI run need not pay

# suffix (lower case) -> format name; order matters (".nii.gz" before ".gz")
_READ_SUFFIXES = {
    ".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage",
    ".mhd": "metaimage", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff",
    ".tiff": "tiff", ".dcm": "dicom", ".dicom": "dicom", ".ima": "dicom",
}
_WRITE_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "metaimage",
                   ".png": "png"}
GAP_TOLERANCE = 0.01  # relative deviation of a slice gap from the median spacing
_DUPLICATE_MM = 1e-3  # slice positions closer than this are the same position
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, what PIL's "L" mode uses


# ==== public API =====================================================================

def read_image(paths, echo: int | None = None, series: str | None = None, image_type: str | None = None) -> Image:
    """Read an image file, a DICOM folder, a DICOM file or an explicit list of DICOM files.

    ``series`` picks a SeriesInstanceUID when a folder holds several; ``echo`` picks an echo
    number of a multi-echo series (default: the first echo, with a warning in meta);
    ``image_type`` keeps the images whose ImageType holds that value (a Dixon export's W, F,
    IN_PHASE or OPP_PHASE in one series).
    """
    path_list = _as_path_list(paths)
    if len(path_list) > 1:
        for p in path_list:
            _check_file(p)
        return _read_dicom_files(path_list, echo, series, where=path_list[0].parent, image_type=image_type)
    path = path_list[0]
    if not path.exists():
        raise InputError("no such file or folder", path)
    if path.is_dir():
        return _read_dicom_folder(path, echo, series, image_type)
    _check_file(path)
    fmt = _detect_format(path)
    if fmt == "dicom":
        return _read_dicom_files([path], echo, series, where=path, image_type=image_type)
    if image_type is not None:
        raise InputError(f"--image-type {image_type} picks images of a DICOM series by ImageType; a "
                         f"{fmt.upper()} file has none", path)
    return _read_with_sitk(path, fmt)


def write_image(image: Image, path) -> None:
    """Write atomically; the format comes from the suffix (.nii.gz, .nii, .nrrd, .mha, .png)."""
    path = Path(path)
    fmt = _suffix_format(path, _WRITE_SUFFIXES)
    if fmt is None:
        raise InputError(f"cannot write this format; use one of {', '.join(_WRITE_SUFFIXES)}", path)
    sitk_image = _png_sitk_image(image, path) if fmt == "png" else _writable(image).to_sitk()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # PNG is compressed by its own codec; useCompression only matters for NIfTI .gz/NRRD/MHA
        sitk.WriteImage(sitk_image, str(tmp), useCompression=fmt != "png")


def list_dicom_series(folder) -> list[dict]:
    """One dict per series in ``folder`` (searched recursively): uid, description, modality,
    series_number, files (count) and echoes (sorted echo numbers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("not a folder", folder)
    slices = _scan_folder(folder)
    out = []
    for uid, group in _group_by_series(slices).items():
        first = group[0]
        out.append({"uid": uid, "description": first.description, "modality": first.modality,
                    "series_number": first.series_number, "files": _file_count(group),
                    "echoes": sorted(_split_echoes(group))})
    return sorted(out, key=lambda s: (s["series_number"] is None, s["series_number"] or 0,
                                      s["uid"]))


def image_dimensionality(image: Image) -> int:
    """2 for a single-slice image (radiograph), else 3."""
    return 2 if image.array.shape[0] == 1 else 3


# ==== plain image files ==============================================================

def _as_path_list(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [encodable_path(paths)]
    path_list = [encodable_path(p) for p in paths]
    if not path_list:
        raise InputError("empty list of input files")
    return path_list


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("expected a file, got a folder (pass a folder on its own)", path)
    if path.stat().st_size == 0:
        raise InputError("file is empty", path)


def image_suffix(path: str | os.PathLike) -> str | None:
    """The file-name ending by which the reader knows an image format ('.nii.gz', '.mhd', ...), or None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in _READ_SUFFIXES if name.endswith(suffix)), None)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM file by its name ('.dcm', '.ima', ...) or, without one, by its 'DICM' mark."""
    path = Path(path)
    if _suffix_format(path, _READ_SUFFIXES) == "dicom":
        return True
    try:
        return image_suffix(path) is None and _has_dicom_magic(path)
    except OSError:
        return False


def _suffix_format(path: Path, table: dict) -> str | None:
    name = path.name.lower()
    for suffix, fmt in table.items():
        if name.endswith(suffix):
            return fmt
    return None


def _detect_format(path: Path) -> str:
    fmt = _suffix_format(path, _READ_SUFFIXES)
    if fmt is not None:
        return fmt
    if _has_dicom_magic(path):  # DICOM files often have no suffix (IM0001, 1.2.840...)
        return "dicom"
    raise InputError("unknown image format (supported: NIfTI, NRRD, MHA/MHD, PNG, JPEG, TIFF, "
                     "DICOM)", path)


def _has_dicom_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _read_with_sitk(path: Path, fmt: str) -> Image:
    # the NIfTI check decompresses the file while ITK reads it (both release the GIL: a 381 x 381 x 20
    # .nii.gz in 20 ms instead of 38); its findings (truncation, NaN, no spacing) are raised first
    with ThreadPoolExecutor(1) as pool:
        checking = pool.submit(_check_nifti_data, path) if fmt == "nifti" else None
        try:
            sitk_image, error = sitk.ReadImage(str(path)), None
        except RuntimeError as exc:
            sitk_image, error = None, exc
        if checking is not None:
            checking.result()
    if error is not None:
        sitk_image = _read_with_pillow(path) if fmt in _PLAIN_2D else None  # e.g. grey + alpha PNG
        if sitk_image is None:
            raise InputError(f"cannot read {fmt} file (corrupt, truncated or not an image): "
                             f"{_sitk_reason(error)}", path) from None
    components = sitk_image.GetNumberOfComponentsPerPixel()
    image = _image_from_sitk(sitk_image, path)
    image.meta.update({"source": str(path), "format": fmt, "is_dicom": False, "warnings": []})
    if components > 1:
        image.meta["warnings"].append(f"{components}-channel (colour) image converted to grey (BT.601 luminance)")
    if fmt in _PLAIN_2D:
        note = _plain_2d_spacing_note(path, image)
        image.meta["spacing_note"] = note
        image.meta["warnings"].append(note)
    return image


_PLAIN_2D = ("png", "jpeg", "tiff")


def _read_with_pillow(path: Path):
    """Pillow for the plain 2D images ITK's readers refuse (grey + alpha PNG, some palette and
    16-bit TIFF layouts); None when Pillow cannot read it either."""
    try:
        from PIL import Image as PILImage

        with PILImage.open(path) as im:
            im.load()
            if im.mode in ("LA", "La"):
                im = im.getchannel(0)
            elif im.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr"):
                im = im.convert("RGB")
            array = np.asarray(im)
    except Exception:  # Pillow raises many types for a file it cannot decode
        return None
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 3)


def _plain_2d_spacing_note(path: Path, image: Image) -> str:
    """Where the pixel size of a PNG/JPEG/TIFF came from: such files carry at most a resolution
    tag (an export setting, not a calibrated detector pixel); without one ITK reports 1 mm."""
    try:
        from PIL import Image as PILImage

        with PILImage.open(path) as im:
            dpi = im.info.get("dpi")
    except Exception:  # Pillow cannot open what ITK could: no resolution to report
        dpi = None
    sx, sy = image.spacing[:2]
    if abs(sx - 1.0) > 1e-6 or abs(sy - 1.0) > 1e-6:  # ITK found a pixel size in the file
        return (f"pixel size {sx:.4g} x {sy:.4g} mm from the file's metadata, not a calibrated DICOM "
                "pixel spacing; give the true one with --pixel-mm")
    tag = (f" (its resolution tag, {dpi[0]:.4g} dpi, is a screen/print export setting and is not used)"
           if dpi else "")
    return (f"no pixel size in the file{tag}: 1 pixel = 1 mm assumed, so mm and mm2 figures are pixel "
            "units; give the true pixel size with --pixel-mm")


def _sitk_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _image_from_sitk(sitk_image, path: Path) -> Image:
    if sitk_image.GetDimension() not in (2, 3):
        raise InputError(f"{sitk_image.GetDimension()}D images are not supported (2D or 3D only)",
                         path)
    if sitk_image.GetNumberOfComponentsPerPixel() > 1:
        sitk_image = _to_luminance(sitk_image, path)
    image = Image.from_sitk(sitk_image)
    _check_voxels(image.array, path)
    return image


def _to_luminance(sitk_image, path: Path):
    """RGB(A) -> grey (BT.601 weights, alpha ignored), keeping the integer type."""
    n = sitk_image.GetNumberOfComponentsPerPixel()
    if n not in (3, 4):
        raise InputError(f"images with {n} components per pixel are not supported", path)
    rgb = sitk.GetArrayFromImage(sitk_image)
    grey = rgb[..., :3].astype(float) @ _LUMA
    if np.issubdtype(rgb.dtype, np.integer):
        info = np.iinfo(rgb.dtype)
        grey = np.clip(np.rint(grey), info.min, info.max).astype(rgb.dtype)
    else:
        grey = grey.astype(rgb.dtype)
    out = sitk.GetImageFromArray(grey)
    out.CopyInformation(sitk_image)
    return out


def _check_voxels(array: np.ndarray, path) -> None:
    if array.size == 0:
        raise InputError(f"image has zero size (shape {array.shape})", path)
    bad = _non_finite_kind(array)
    if bad:
        raise InputError(f"contains {bad} values", path)


def _non_finite_kind(array: np.ndarray) -> str | None:
    if not np.issubdtype(array.dtype, np.inexact):
        return None
    if np.isnan(array).any():
        return "NaN"
    return "infinite" if np.isinf(array).any() else None


def _check_nifti_data(path: Path) -> None:
    """ITK silently zero-fills a truncated NIfTI and turns NaN voxels into 0, so check the raw
    data (decompressing a .nii.gz once more) before handing the file to ITK."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = _parse_nifti_header(f.read(540))
            if header is None:
                return  # not a NIfTI header we understand: let ITK judge
            _check_nifti_spacing(header, path)
            f.seek(header.offset)
            n_bytes, bad = _scan_data(f, header.data_bytes, header.float_dtype)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise InputError(f"cannot read NIfTI file (corrupt or truncated): {exc}", path) from None
    if n_bytes < header.data_bytes:
        raise InputError(f"truncated NIfTI file: {n_bytes} bytes of voxel data, header needs "
                         f"{header.data_bytes}", path)
    if bad:
        raise InputError(f"contains {bad} values", path)


def _check_nifti_spacing(header: "_NiftiHeader", path: Path) -> None:
    """ITK reads a zero or negative pixdim as 1 mm: volumes and distances would be invented."""
    for axis, (size, mm) in enumerate(zip(header.sizes[:3], header.pixdim[:3])):
        if size > 1 and not (math.isfinite(mm) and mm > 0):
            raise InputError(f"voxel size (pixdim[{axis + 1}]) is {mm:g} along axis {axis}: the file carries no "
                             "spacing, so volumes and distances would be invented; write the true voxel size "
                             "into the header", path)


@dataclass
class _NiftiHeader:
    offset: int
    data_bytes: int
    float_dtype: np.dtype | None  # set for float32/float64 data, which may hold NaN/inf
    sizes: tuple[int, ...] = ()  # dim[1..ndim]
    pixdim: tuple[float, ...] = ()  # pixdim[1..ndim]: voxel size per axis


def _parse_nifti_header(header: bytes) -> _NiftiHeader | None:
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:  # NIfTI-1
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            dims = struct.unpack(endian + "8h", header[40:56])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 348)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            offset = max(struct.unpack(endian + "q", header[168:176])[0], 540)
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = math.prod(max(int(d), 1) for d in dims[1:ndim + 1])
    float_dtype = {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(datatype)
    return _NiftiHeader(offset, voxels * bitpix // 8, float_dtype, tuple(int(d) for d in dims[1:ndim + 1]),
                        tuple(float(v) for v in pixdim[1:ndim + 1]))


def _scan_data(f, limit: int, float_dtype, chunk: int = 1 << 22) -> tuple[int, str | None]:
    """-> (bytes available up to ``limit``, "NaN"/"infinite" when float data holds such)."""
    total, bad = 0, None
    while total < limit and (block := f.read(min(chunk, limit - total))):
        if float_dtype is not None and bad is None:
            usable = len(block) - len(block) % float_dtype.itemsize
            bad = _non_finite_kind(np.frombuffer(block[:usable], float_dtype))
        total += len(block)
    return total, bad


def _writable(image: Image) -> Image:
    """SimpleITK has no bool or float16 pixels."""
    if image.array.dtype == bool:
        return image.with_array(image.array.astype(np.uint8))
    if image.array.dtype == np.float16:
        return image.with_array(image.array.astype(np.float32))
    return image


def _png_sitk_image(image: Image, path: Path):
    if not image.is_2d or image.array.dtype not in (np.uint8, np.uint16):
        raise InputError(f"PNG needs a single-slice uint8/uint16 image, got shape "
                         f"{image.array.shape} {image.array.dtype}", path)
    out = sitk.GetImageFromArray(np.ascontiguousarray(image.array[0]))
    out.SetSpacing(image.spacing[:2])  # PNG keeps pixel size only: no origin or direction
    return out


# ==== DICOM ==========================================================================

@dataclass
class _Slice:
    """The header fields of one DICOM image file that the reader needs."""

    path: Path
    series_uid: str
    description: str
    modality: str
    series_number: int | None
    echo_number: int | None
    echo_time: float | None
    orientation: np.ndarray | None  # 6 cosines: row (i direction), column (j direction)
    position: np.ndarray | None
    rows: int
    columns: int
    frames: int
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), as DICOM
    slice_step: float | None  # SpacingBetweenSlices, else SliceThickness
    laterality: str | None = None  # ImageLaterality (0020,0062), else Laterality (0020,0060): R | L | B | U
    spacing_source: str = "PixelSpacing"  # or ImagerPixelSpacing (projection radiographs), or none
    patient_orientation: tuple[str, str] | None = None  # PatientOrientation (0020,0020): row, column directions
    photometric: str = ""
    presentation_lut_shape: str = ""  # (2050,0020): INVERSE on a MONOCHROME2 image means displayed inverted
    image_type: tuple[str, ...] = ()  # ImageType (0008,0008) values, upper case; a frame's FrameType
    component: str = ""  # ComplexImageComponent of an enhanced frame (MAGNITUDE, PHASE, REAL, IMAGINARY)
    plain_pixels: bool = False  # uncompressed MONOCHROME2 integers without rescale: numpy can read them as stored
    stored: "_StoredPixels | None" = None  # where a plain file keeps them, when the header pass could say
    header: object = None  # the pydicom header without PixelData (a DICOM-SEG references it)
    frame: int | None = None  # 0-based frame of an enhanced multi-frame file (None: the file is the slice)
    rescale: tuple[float, float] = (1.0, 0.0)  # a frame's RescaleSlope, RescaleIntercept
    rescale_uniform: bool = True  # every frame of its file has the same rescale

    @property
    def label(self) -> str:
        """How messages name it: the file, and the frame of a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"


@dataclass(frozen=True)
class _StoredPixels:
    """An uncompressed little-endian PixelData value: file position, byte count, numpy dtype and
    the bits that hold the value (the rest are masked, or carry the sign, as pydicom does)."""

    offset: int
    nbytes: int
    dtype: str
    bits_stored: int


def _read_dicom_folder(folder: Path, echo, series, image_type: str | None = None) -> Image:
    not_images: list[tuple[str, str]] = []
    slices = _scan_folder(folder, not_images)
    if not slices:
        held = f"; it holds only {_named_kinds(not_images)}: nothing to segment" if not_images else ""
        raise InputError(f"no DICOM image files found in this folder{held}", folder)
    image = _assemble_dicom(slices, echo, series, where=folder, image_type=image_type)
    if not_images:  # said in the report: left out, not silently
        image.meta["ignored_dicom"] = [f"{name} ({kind})" for name, kind in not_images]
    return image


def _read_dicom_files(files: list[Path], echo, series, where: Path, image_type: str | None = None) -> Image:
    slices = []
    for path in files:
        not_images: list[tuple[str, str]] = []
        found = _read_header(path, not_images)
        if not found:
            raise InputError(f"is {not_images[0][1]}, not an image" if not_images else "not a DICOM image file",
                             path)
        slices += found
    return _assemble_dicom(slices, echo, series, where=where, image_type=image_type)


def _scan_folder(folder: Path, not_images: list[tuple[str, str]] | None = None) -> list[_Slice]:
    slices = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        slices += _read_header(path, not_images)
    return slices


# objects with rows and columns, some with pixels, that are not images of the patient: never read
# as a series. Our own DICOM-SEG, once sent to PACS, comes back in the next export of the study.
_NOT_IMAGE_MODALITIES = {"SEG": "a DICOM Segmentation", "RTDOSE": "an RT dose grid"}


def _not_an_image(ds) -> str | None:
    """What a DICOM object with Rows and Columns is when it is not an image, else None."""
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality in _NOT_IMAGE_MODALITIES:
        return _NOT_IMAGE_MODALITIES[modality]
    if str(ds.get("SOPClassUID", "")) == pydicom.uid.SegmentationStorage:
        return _NOT_IMAGE_MODALITIES["SEG"]
    return None


def _named_kinds(not_images: list[tuple[str, str]], most: int = 3) -> str:
    named = ", ".join(f"{name} ({kind})" for name, kind in not_images[:most])
    return named + (f" and {len(not_images) - most} more" if len(not_images) > most else "")


def _file_count(slices: list[_Slice]) -> int:
    return len({s.path for s in slices})


# values over this size (PixelData, private blobs such as a Siemens CSA header) are skipped by the
# header pass, their file position kept: the pixel pass then reads PixelData without parsing again
_DEFER_BYTES = 1024


def _read_header(path: Path, not_images: list[tuple[str, str]] | None = None) -> list[_Slice]:
    """The slices of a DICOM image file (one, or one per frame of an enhanced multi-frame file);
    none when the file is not one (a DICOM object that is not an image is named in ``not_images``)."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except pydicom.errors.InvalidDicomError:
        if path.suffix.lower() not in ("", ".dcm", ".ima", ".dicom"):
            return []
        try:  # DICOM files written without the 128-byte preamble
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
        except Exception:  # any parse failure of a forced read means "not DICOM"
            return []
    except Exception as exc:  # a truncated or corrupt DICOM header
        raise InputError(f"cannot read DICOM header: {exc}", path) from None
    if "SeriesInstanceUID" not in ds or "Rows" not in ds or "Columns" not in ds:
        return []  # not an image (DICOMDIR, structured report, presentation state, junk)
    kind = _not_an_image(ds)
    if kind:
        if not_images is not None:
            not_images.append((path.name, kind))
        return []
    try:
        s = _slice_from_dataset(path, ds)
        frames = _enhanced_frames(s, ds)
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise InputError(f"malformed DICOM header: {exc}", path) from None
    if "PixelData" in ds:
        del ds.PixelData  # as a stop_before_pixels read: the DICOM-SEG writer parses no file again
    s.header = ds
    for f in frames:
        f.header = ds
    return frames or [s]


# where an enhanced file keeps a frame's echo time, in order of preference: the Enhanced MR macro,
# then what a legacy-converted file (highdicom, dcm2dcm) carries over from the single-frame headers
_ECHO_TIME_MACROS = (("MREchoSequence", "EffectiveEchoTime"),
                     ("UnassignedPerFrameConvertedAttributesSequence", "EchoTime"),
                     ("UnassignedSharedConvertedAttributesSequence", "EchoTime"))
_ECHO_NUMBER_MACROS = (("UnassignedPerFrameConvertedAttributesSequence", "EchoNumbers"),
                       ("UnassignedSharedConvertedAttributesSequence", "EchoNumbers"))


def _enhanced_frames(s: _Slice, ds) -> list[_Slice]:
    """One slice per frame of an enhanced (or legacy-converted enhanced) file, its position,
    orientation, pixel spacing, echo and rescale read from the functional groups (per-frame, else
    shared); [] for any other file. GDCM would read such a file as one stack in file order, so a
    multi-echo file's echoes became interleaved slices (192 frames of 8 echoes: a 768 mm knee)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if (not per_frame or len(per_frame) != s.frames or int(ds.get("SamplesPerPixel", 1) or 1) != 1
            or "PixelData" not in ds):
        return []
    shared_sequence = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_sequence[0] if shared_sequence else None

    def value(item, *macros):
        for macro, keyword in macros:
            for group in (item, shared):
                sequence = group.get(macro) if group is not None else None
                if sequence and sequence[0].get(keyword) is not None:
                    return sequence[0].get(keyword)
        return None

    frames = []
    for n, item in enumerate(per_frame):
        position = value(item, ("PlanePositionSequence", "ImagePositionPatient"))
        orientation = value(item, ("PlaneOrientationSequence", "ImageOrientationPatient"))
        if position is None or len(position) != 3 or orientation is None or len(orientation) != 6:
            return []  # not a stack of planes (e.g. a multi-frame without patient geometry): GDCM reads it
        spacing = value(item, ("PixelMeasuresSequence", "PixelSpacing"))
        step = value(item, ("PixelMeasuresSequence", "SpacingBetweenSlices"),
                     ("PixelMeasuresSequence", "SliceThickness"))
        echo_time = value(item, *_ECHO_TIME_MACROS)
        echo_number = value(item, *_ECHO_NUMBER_MACROS)
        if echo_number is not None and not isinstance(echo_number, (int, str)):
            echo_number = echo_number[0] if len(echo_number) else None
        frame_type = value(item, ("MRImageFrameTypeSequence", "FrameType"), ("CTImageFrameTypeSequence", "FrameType"))
        component = value(item, ("MRImageFrameTypeSequence", "ComplexImageComponent"))
        slope = value(item, ("PixelValueTransformationSequence", "RescaleSlope"))
        intercept = value(item, ("PixelValueTransformationSequence", "RescaleIntercept"))
        frames.append(replace(
            s, frame=n, position=np.array([float(v) for v in position]),
            orientation=np.array([float(v) for v in orientation]),
            pixel_spacing=(tuple(float(v) for v in spacing) if spacing is not None and len(spacing) == 2
                           else s.pixel_spacing),
            slice_step=_float_or_none(step) if step is not None else s.slice_step,
            echo_time=_float_or_none(echo_time) if echo_time is not None else s.echo_time,
            echo_number=_int_or_none(echo_number) if echo_number is not None else s.echo_number,
            spacing_source="PixelSpacing" if spacing is not None else s.spacing_source,
            image_type=_values(frame_type) if frame_type is not None else s.image_type,
            component=str(component or "").strip().upper(),
            rescale=(float(slope) if slope is not None else float(ds.get("RescaleSlope", 1) or 1),
                     float(intercept) if intercept is not None else float(ds.get("RescaleIntercept", 0) or 0)),
            plain_pixels=False, stored=None))
    uniform = len({f.rescale for f in frames}) == 1
    for f in frames:
        f.rescale_uniform = uniform
    return frames


def _slice_from_dataset(path: Path, ds) -> _Slice:
    def floats(name, n):
        value = ds.get(name)
        if value is None or len(value) != n:
            return None
        return np.array([float(v) for v in value])

    echo_numbers = ds.get("EchoNumbers")
    if echo_numbers is not None and not isinstance(echo_numbers, (int, str)):
        echo_numbers = echo_numbers[0] if len(echo_numbers) else None  # multi-valued IS
    pixel_spacing = floats("PixelSpacing", 2)
    spacing_source = "PixelSpacing"
    if pixel_spacing is None:  # projection radiographs: spacing at the detector, not at the patient
        pixel_spacing = floats("ImagerPixelSpacing", 2)
        spacing_source = "ImagerPixelSpacing" if pixel_spacing is not None else "none"
        magnification = _float_or_none(ds.get("EstimatedRadiographicMagnificationFactor"))
        if pixel_spacing is not None and magnification and magnification > 0:
            pixel_spacing = pixel_spacing / magnification
            spacing_source = f"ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor {magnification:g}"
    orientation_letters = ds.get("PatientOrientation")
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    plain = _plain_pixels(ds)
    return _Slice(
        path=path, series_uid=str(ds.SeriesInstanceUID),
        description=str(ds.get("SeriesDescription", "")), modality=str(ds.get("Modality", "")),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        echo_number=_int_or_none(echo_numbers),
        echo_time=_float_or_none(ds.get("EchoTime")),
        orientation=floats("ImageOrientationPatient", 6),
        position=floats("ImagePositionPatient", 3),
        rows=int(ds.Rows), columns=int(ds.Columns),
        frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        pixel_spacing=tuple(pixel_spacing) if pixel_spacing is not None else None,
        slice_step=_float_or_none(step),
        laterality=str(ds.get("ImageLaterality") or ds.get("Laterality") or "").strip().upper() or None,
        spacing_source=spacing_source, photometric=str(ds.get("PhotometricInterpretation", "")),
        presentation_lut_shape=str(ds.get("PresentationLUTShape", "") or "").strip().upper(),
        image_type=_values(ds.get("ImageType")),
        plain_pixels=plain, stored=_stored_pixels(ds) if plain else None,
        patient_orientation=(tuple(str(v).strip().upper() for v in orientation_letters)
                             if orientation_letters is not None and len(orientation_letters) == 2 else None))


def _values(value) -> tuple[str, ...]:
    """A multi-valued code string (ImageType, FrameType) as upper-case values."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in items)


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float_or_none(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _group_by_series(slices: list[_Slice]) -> dict[str, list[_Slice]]:
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    return groups


def _select_series(slices: list[_Slice], series: str | None, where: Path) -> list[_Slice]:
    groups = _group_by_series(slices)
    if series is not None:
        chosen = series_matching(groups, series)
        if len(chosen) == 1:
            return groups[chosen[0]]
        if not chosen:
            raise InputError(f"no DICOM series matches {series!r} (a SeriesInstanceUID, a series number or a "
                             f"series description, * and ? as wildcards); available: {_listing(groups)}", where)
        raise InputError(f"{len(chosen)} DICOM series match {series!r}: "
                         f"{_listing({uid: groups[uid] for uid in chosen})}; choose one by its UID", where)
    if len(groups) > 1:
        raise InputError(f"{len(groups)} DICOM series found: {_listing(groups)}. Choose one with series=UID, "
                         f"number or description (CLI flag --series)", where)
    return next(iter(groups.values()))


def series_matching(groups: dict[str, list[_Slice]], series: str) -> list[str]:
    """The UIDs of the series ``series`` names: its SeriesInstanceUID; else, all digits, its
    SeriesNumber; else its SeriesDescription, ignoring case and outer spaces, ``*`` and ``?`` as
    shell wildcards. A cohort's PACS exports differ in UIDs but share numbers and descriptions."""
    if series in groups:
        return [series]
    text = series.strip()
    if text.isdigit():
        return [uid for uid, g in groups.items() if g[0].series_number == int(text)]
    pattern = text.casefold()
    described = {uid: g[0].description.strip().casefold() for uid, g in groups.items()}
    return [uid for uid, d in described.items() if d == pattern or fnmatch.fnmatchcase(d, pattern)]


def _listing(groups: dict[str, list[_Slice]]) -> str:
    return "; ".join(f"{uid} (number {g[0].series_number if g[0].series_number is not None else 'none'}, "
                     f"{g[0].description or 'no description'!r}, {_file_count(g)} files)" for uid, g in groups.items())


# what ImageType (value 3 on, by vendor) or an enhanced frame's ComplexImageComponent calls an image
# that is not the magnitude: Siemens M / P / R / I, Philips and GE words
_COMPONENT_WORDS = {"P": "phase", "PHASE": "phase", "PHASE MAP": "phase", "R": "real", "REAL": "real",
                    "I": "imaginary", "IMAGINARY": "imaginary"}


def _component(s: _Slice) -> str:
    """magnitude | phase | real | imaginary: a frame's ComplexImageComponent, else ImageType's
    values after the first two (ORIGINAL/DERIVED, PRIMARY/SECONDARY); magnitude when neither says."""
    if s.component in ("PHASE", "REAL", "IMAGINARY"):
        return s.component.lower()
    if s.component == "MAGNITUDE":
        return "magnitude"
    for value in s.image_type[2:]:
        if value in _COMPONENT_WORDS:
            return _COMPONENT_WORDS[value]
    return "magnitude"


def _select_image_type(slices: list[_Slice], image_type: str | None, where: Path) -> tuple[list[_Slice], list[str]]:
    """--image-type VALUE: the images whose ImageType (an enhanced frame's FrameType) holds VALUE,
    any case: one contrast of a Dixon export in one series (W, F, IN_PHASE, OPP_PHASE; WATER, FAT)."""
    if image_type is None:
        return slices, []
    wanted = image_type.strip().upper()
    kept = [s for s in slices if wanted in s.image_type]
    if not kept:
        values = _distinguishing_values(slices) or sorted({v for s in slices for v in s.image_type})
        raise InputError(f"no image of the series has ImageType value {wanted} (its values: "
                         f"{', '.join(values) or 'none given'})", where)
    left = len(slices) - len(kept)
    return kept, ([f"--image-type {wanted}: {len(kept)} of {len(slices)} images kept"] if left else [])


def _distinguishing_values(slices: list[_Slice]) -> list[str]:
    """The ImageType values some images of a series have and others not (a Dixon export's W, F,
    IN_PHASE, OPP_PHASE), in order of first appearance."""
    types = {s.image_type for s in slices if s.image_type}
    common = set.intersection(*(set(t) for t in types)) if types else set()
    return list(dict.fromkeys(v for s in slices for v in s.image_type if v not in common))


def _select_magnitude(slices: list[_Slice], where: Path) -> tuple[list[_Slice], list[str]]:
    """A series that holds phase (or real / imaginary) images beside its magnitude images, as a
    gradient-echo export may, reads as its magnitude images, with a warning; one with no magnitude
    image is refused (a phase map shows no anatomy to segment)."""
    kinds = _group(slices, _component)
    if set(kinds) == {"magnitude"}:
        return slices, []
    if "magnitude" not in kinds:
        raise InputError(f"holds only {' and '.join(kinds)} images ({_file_count(slices)} files, ImageType "
                         f"{'/'.join(slices[0].image_type) or 'not given'}): no magnitude image to segment", where)
    left = ", ".join(f"{len(g)} {kind}" for kind, g in kinds.items() if kind != "magnitude")
    return kinds["magnitude"], [f"the series holds magnitude and {' and '.join(k for k in kinds if k != 'magnitude')} "
                                f"images: the {len(kinds['magnitude'])} magnitude images were used ({left} left out)"]


def _split_echoes(slices: list[_Slice]) -> dict[int, list[_Slice]]:
    """Echo number -> slices. EchoNumbers when they differ; else EchoTime rank (1-based), but
    only when positions repeat, so a series with a per-slice TE jitter is not shattered."""
    numbers = {s.echo_number for s in slices}
    if len(numbers) > 1 and None not in numbers:
        return _group(slices, lambda s: s.echo_number)
    times = sorted({s.echo_time for s in slices if s.echo_time is not None})
    if len(times) > 1 and _has_repeated_positions(slices) and all(
            s.echo_time is not None for s in slices):
        rank = {t: i + 1 for i, t in enumerate(times)}
        return _group(slices, lambda s: rank[s.echo_time])
    only = numbers.pop() if len(numbers) == 1 else None
    return {only or 1: list(slices)}


def _group(slices, key) -> dict:
    out: dict = {}
    for s in slices:
        out.setdefault(key(s), []).append(s)
    return dict(sorted(out.items()))


def _has_repeated_positions(slices: list[_Slice]) -> bool:
    keys = [tuple(np.round(s.position, 3)) for s in slices if s.position is not None]
    return len(set(keys)) < len(keys)


def _select_echo(slices: list[_Slice], echo: int | None, where: Path):
    """-> (echo number, its slices, echo time, all echo numbers, warnings)."""
    echoes = _split_echoes(slices)
    times = {e: g[0].echo_time for e, g in echoes.items()}
    warnings = []
    if echo is None:
        echo = min(echoes)
        if len(echoes) > 1:
            te = ", ".join(f"{times[e]:g}" if times[e] is not None else "?" for e in echoes)
            warnings.append(f"multi-echo series with {len(echoes)} echoes (TE {te} ms): using "
                            f"echo {echo}; choose with --echo N")
    elif echo not in echoes:
        raise InputError(f"echo {echo} not available; this series has echo(es) "
                         f"{', '.join(map(str, echoes))}", where)
    return echo, echoes[echo], times[echo], sorted(echoes), warnings


def _assemble_dicom(slices: list[_Slice], echo, series, where: Path, image_type: str | None = None) -> Image:
    chosen = _select_series(slices, series, where)
    chosen, type_warnings = _select_image_type(chosen, image_type, where)
    chosen, component_warnings = _select_magnitude(chosen, where)
    component_warnings = type_warnings + component_warnings
    echo, chosen, echo_time, all_echoes, warnings = _select_echo(chosen, echo, where)
    warnings = component_warnings + warnings
    if len(chosen) == 1 and chosen[0].frames > 1 and chosen[0].frame is None:
        image = _read_multiframe(chosen[0])
        chosen_sorted = chosen
    else:
        chosen_sorted = _sort_along_normal(chosen, where)
        spacing, origin, direction, geo_warnings = _dicom_geometry(chosen_sorted, where)
        warnings += geo_warnings
        image = Image(_read_dicom_pixels(chosen_sorted), spacing, origin, direction)
    _check_voxels(image.array, where)
    first = chosen_sorted[0]
    image.meta.update({
        "source": str(where), "format": "dicom", "is_dicom": True,
        "series_uid": first.series_uid, "series_description": first.description,
        "modality": first.modality, "laterality": first.laterality,
        "echo": echo, "echo_time": echo_time, "echoes": all_echoes,
        **({"image_type": image_type.strip().upper()} if image_type is not None else {}),
        "photometric": first.photometric, "presentation_lut_shape": first.presentation_lut_shape,
        "spacing_source": first.spacing_source,
        **({"patient_axes": _stated_axes(first)} if _stated_axes(first) else {}),
        **({"spacing_note": f"pixel size from {first.spacing_source}"}
           if first.spacing_source != "PixelSpacing" else {}),
        **_source_files(chosen_sorted),
        "warnings": warnings})
    return image


def _source_files(slices: list[_Slice]) -> dict:
    """meta's dicom_files / dicom_headers, one per file in slice order, and dicom_frames (1-based,
    per slice) when the slices are frames of multi-frame files."""
    if all(s.frame is None for s in slices):
        return {"dicom_files": [str(s.path) for s in slices], "dicom_headers": [s.header for s in slices]}
    files = {s.path: s.header for s in slices}
    return {"dicom_files": [str(p) for p in files], "dicom_headers": list(files.values()),
            "dicom_frames": [(str(s.path), s.frame + 1 if s.frame is not None else None) for s in slices]}


def _slice_normal(s: _Slice) -> np.ndarray:
    row, col = _unit(s.orientation[:3]), _unit(s.orientation[3:])
    return np.cross(row, col)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _sort_along_normal(slices: list[_Slice], where: Path) -> list[_Slice]:
    """Sort by position along the slice normal; check one orientation, one matrix size and one
    pixel spacing (the first slice's is the volume's: another one would be silently wrong)."""
    first = slices[0]
    for s in slices:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(f"slices of different sizes: {first.label} is "
                             f"{first.rows}x{first.columns}, {s.label} is {s.rows}x{s.columns}",
                             where)
        if not _same_pixel_spacing(s.pixel_spacing, first.pixel_spacing):
            raise InputError(f"slices with different pixel spacings: {first.label} {_spacing_text(first)}, "
                             f"{s.label} {_spacing_text(s)} (a mixed or reformatted series?)", where)
    if len(slices) == 1:
        return list(slices)
    missing = [s.label for s in slices if s.orientation is None or s.position is None]
    if missing:
        raise InputError(f"cannot order slices: no ImagePositionPatient/ImageOrientationPatient in "
                         f"{', '.join(missing[:3])}", where)
    for s in slices:
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise InputError(f"slices with different orientations ({first.label} and "
                             f"{s.label}): a localizer or a mixed series?", where)
    normal = _slice_normal(first)
    return sorted(slices, key=lambda s: float(normal @ s.position))


_SPACING_RTOL = 1e-4  # relative: DS values of one spacing rounded to different digits still agree


def _same_pixel_spacing(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a, b, rtol=_SPACING_RTOL, atol=0))


def _spacing_text(s: _Slice) -> str:
    return "without PixelSpacing" if s.pixel_spacing is None else \
        f"{s.pixel_spacing[0]:g} x {s.pixel_spacing[1]:g} mm (PixelSpacing, rows x columns)"


def _dicom_geometry(slices: list[_Slice], where: Path):
    """-> spacing, origin, direction, warnings for slices sorted along their normal."""
    first = slices[0]
    row_spacing, col_spacing = first.pixel_spacing or (1.0, 1.0)
    warnings = [] if first.pixel_spacing else [f"no PixelSpacing in {first.label}: using 1 mm"]
    if first.spacing_source.startswith("ImagerPixelSpacing"):
        warnings.append(f"pixel size from {first.spacing_source} ({col_spacing:g} x {row_spacing:g} mm): "
                        "measured at the detector, so lengths and areas at the patient are overestimated by "
                        "the geometric magnification" + ("" if "/" in first.spacing_source else
                                                          " (no EstimatedRadiographicMagnificationFactor given)"))
    if first.orientation is None:  # a projection radiograph: no patient geometry
        origin = first.position if first.position is not None else np.zeros(3)
        step = first.slice_step or 1.0
        return (col_spacing, row_spacing, step), tuple(origin), _projection_direction(first), warnings
    row, col = _unit(first.orientation[:3]), _unit(first.orientation[3:])
    if len(slices) == 1:
        step_vector = np.cross(row, col) * (first.slice_step or 1.0)
    else:
        step_vector = _measured_step(slices, where)
        tilt = _angle_deg(step_vector, np.cross(row, col))
        if tilt > 0.01:
            warnings.append(f"slices are sheared by {tilt:.2f} degrees (gantry tilt): geometry "
                            "kept as acquired, the axes are not orthogonal")
    step = float(np.linalg.norm(step_vector))
    direction = np.column_stack([row, col, step_vector / step])
    return (col_spacing, row_spacing, step), tuple(first.position), direction, warnings


_LETTER_LPS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "H": (0, 0, 1), "F": (0, 0, -1)}


def _stated_axes(s: _Slice) -> str | None:
    """Where the image's patient directions come from, when its file states them (the report and
    the radiograph display rule rely on it): ImageOrientationPatient, or usable PatientOrientation
    letters (a radiograph); None when the direction is the reader's default."""
    if s.orientation is not None:
        return "ImageOrientationPatient"
    if _letters_direction(s.patient_orientation) is not None:
        return "PatientOrientation " + "\\".join(s.patient_orientation)
    return None


def _projection_direction(s: _Slice) -> np.ndarray:
    """Direction of a radiograph without ImageOrientationPatient, from PatientOrientation (the
    patient directions of the rows and columns, e.g. L\\F: columns run toward patient left, rows
    toward the feet); identity (= L\\P: the radiographic convention, patient right on the image
    left) when absent or not two distinct primary directions."""
    direction = _letters_direction(s.patient_orientation)
    return np.eye(3) if direction is None else direction


def _letters_direction(letters: tuple[str, str] | None) -> np.ndarray | None:
    if not letters or any(not a or any(c not in _LETTER_LPS for c in a) for a in letters):
        return None
    i_dir, j_dir = (_unit(np.sum([_LETTER_LPS[c] for c in a], axis=0).astype(float)) for a in letters)
    if abs(float(i_dir @ j_dir)) > 1e-6:
        return None
    return np.column_stack([i_dir, j_dir, np.cross(i_dir, j_dir)])


def _measured_step(slices: list[_Slice], where: Path) -> np.ndarray:
    """Mean slice-step vector after checking for duplicates, gaps and off-line slices."""
    normal = _slice_normal(slices[0])
    positions = np.array([s.position for s in slices])
    distances = positions @ normal
    gaps = np.diff(distances)
    for n, gap in enumerate(gaps):
        if gap < _DUPLICATE_MM:
            types = {"/".join(s.image_type) for s in slices if s.image_type}
            why = (f"images of {len(types)} types ({'; '.join(sorted(types)[:4])}) in one series: a Dixon "
                   "(water / fat / in / opposed phase) or other multi-contrast export? Pick one with --image-type "
                   f"({' / '.join(_distinguishing_values(slices)[:6])}), or export each type as a series of its own"
                   if len(types) > 1 else
                   "several images per position: a multi-echo, dynamic or diffusion series?")
            raise InputError(
                f"duplicate slice position {distances[n]:.3f} mm in {slices[n].label} and "
                f"{slices[n + 1].label} ({why})", where)
    median = float(np.median(gaps))
    for n, gap in enumerate(gaps):
        if abs(gap - median) > GAP_TOLERANCE * median:
            raise InputError(
                f"missing or uneven slices: gap of {gap:.3g} mm between slice {n + 1} and {n + 2} "
                f"({slices[n].label}, {slices[n + 1].label}), "
                f"median spacing {median:.3g} mm",
                where)
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    expected = positions[0] + np.outer(np.arange(len(slices)), step)
    worst = int(np.argmax(np.linalg.norm(positions - expected, axis=1)))
    if np.linalg.norm(positions[worst] - expected[worst]) > GAP_TOLERANCE * median:
        raise InputError(f"slice positions are not on a straight line (slice {worst + 1}, "
                         f"{slices[worst].label})", where)
    return step


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = abs(float(a @ b)) / (np.linalg.norm(a) * np.linalg.norm(b))
    return math.degrees(math.acos(min(1.0, cos)))


_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
_BIG_ENDIAN = "1.2.840.10008.1.2.2"  # explicit VR big endian: retired, yet the knee MESE (GE, 2015) is stored so
_UNCOMPRESSED_EITHER_ORDER = (*_UNCOMPRESSED, _BIG_ENDIAN)


def _plain_pixels(ds) -> bool:
    """True when the stored values are the pixel values: uncompressed (either byte order), one
    sample, MONOCHROME2, 8/16-bit integers, no rescale (identity slope and intercept), one frame."""
    return (_syntax(ds) in _UNCOMPRESSED_EITHER_ORDER
            and str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME2"
            and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and int(ds.get("BitsAllocated", 0) or 0) in (8, 16)
            and float(ds.get("RescaleSlope", 1) or 1) == 1.0 and float(ds.get("RescaleIntercept", 0) or 0) == 0.0
            and (_int_or_none(ds.get("NumberOfFrames")) or 1) == 1)


def _syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", "")) if meta is not None else ""


def _stored_pixels(ds) -> _StoredPixels | None:
    """Where a plain file's pixels lie (None: let pydicom decode them, e.g. a short PixelData kept
    in memory, an undefined length, or a high bit that is not the stored bits' top)."""
    try:
        element = ds.get_item(0x7FE00010, keep_deferred=True)
    except TypeError:  # pydicom 2.x (which Slicer may bundle) has no keep_deferred: pydicom reads them
        return None
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if (not isinstance(element, pydicom.dataelem.RawDataElement) or element.value_tell is None
            or not 0 < stored <= allocated or int(ds.get("HighBit", stored - 1)) != stored - 1):
        return None
    size = int(ds.Rows) * int(ds.Columns) * allocated // 8
    if element.length not in (size, size + 1):  # an odd 8-bit value is padded to even length
        return None
    kind = "i" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "u"
    order = ">" if _syntax(ds) == _BIG_ENDIAN else "<"
    return _StoredPixels(int(element.value_tell), size, f"{order}{kind}{allocated // 8}", stored)


def _read_stored_pixels(s: _Slice) -> np.ndarray:
    """What pydicom's pixel_array gives for a plain file, read straight from the file."""
    p = s.stored
    with open(s.path, "rb") as f:
        f.seek(p.offset)
        raw = f.read(p.nbytes)
    if len(raw) != p.nbytes:
        raise InputError(f"cannot read DICOM pixel data: {len(raw)} of {p.nbytes} bytes (truncated file)", s.path)
    array = _native(np.frombuffer(raw, p.dtype).reshape(s.rows, s.columns))
    bits = array.dtype.itemsize * 8
    if p.bits_stored < bits:  # as pydicom: unused high bits masked, or the stored sign bit extended
        shift = bits - p.bits_stored
        array = (array << shift) >> shift if array.dtype.kind == "i" else array & ((1 << p.bits_stored) - 1)
    return array


def _native(array: np.ndarray) -> np.ndarray:
    """In this machine's byte order (a big-endian file's values as numbers, not swapped bytes)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _read_plain_pixels(s: _Slice) -> np.ndarray:
    if s.stored is not None:
        return _read_stored_pixels(s)
    try:
        return _native(pydicom.dcmread(s.path).pixel_array)
    except Exception as exc:  # truncated pixel data and the like
        raise InputError(f"cannot read DICOM pixel data: {exc}", s.path) from None


def _read_frame_pixels(slices: list[_Slice]) -> np.ndarray:
    """Stack frames of enhanced multi-frame files: each file decoded once, each frame's own rescale
    applied (GDCM applies the first frame's to all; Philips files vary it per frame)."""
    a_frame = {s.path: s for s in slices if s.frame is not None}  # any frame of a file says how to decode it
    decoded = {path: _decode_frames(s) for path, s in a_frame.items()}
    planes = []
    for s in slices:
        if s.frame is None:  # a single-frame instance of the same series
            planes.append(_read_dicom_pixels([s])[0])
            continue
        array, rescaled = decoded[s.path]
        plane = array[s.frame]
        slope, intercept = s.rescale
        if not rescaled and (slope, intercept) != (1.0, 0.0):
            plane = plane.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        planes.append(plane)
    dtype = np.result_type(*planes)
    return np.stack([p.astype(dtype, copy=False) for p in planes])


def _decode_frames(frame: _Slice) -> tuple[np.ndarray, bool]:
    """(every frame of ``frame``'s file as stored, False) by pydicom; where pydicom has no decoder for
    the transfer syntax, (GDCM's frames, True): GDCM applies a rescale, so it must be one for all frames."""
    first = frame
    syntax = _syntax(first.header)
    try:
        from pydicom.pixels import get_decoder
        pydicom_decodes = get_decoder(syntax).is_available
    except (ImportError, NotImplementedError, ValueError):
        pydicom_decodes = syntax in _UNCOMPRESSED_EITHER_ORDER
    try:
        if pydicom_decodes:
            array = _native(pydicom.dcmread(first.path).pixel_array)
            rescaled = False
        else:
            if not first.rescale_uniform:
                raise InputError(f"frames with different rescale slopes/intercepts, compressed with transfer syntax "
                                 f"{syntax} that only GDCM decodes (it applies one rescale to all frames)", first.path)
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(first.path)))
            rescaled = True
    except InputError:
        raise
    except Exception as exc:  # truncated pixel data and the like
        raise InputError(f"cannot read DICOM pixel data: {_sitk_reason(exc) if isinstance(exc, RuntimeError) else exc}",
                         first.path) from None
    array = array.reshape(first.frames, first.rows, first.columns)
    return array, rescaled


def _read_dicom_pixels(slices: list[_Slice]) -> np.ndarray:
    """Stack the slices' pixels. Plain stored integers (the common uncompressed MR series) are
    read by pydicom, about 3x faster than a GDCM call per file and the same values; everything
    else by SimpleITK/GDCM, which decodes every transfer syntax and applies RescaleSlope/Intercept
    per file (so per-slice scaling is honoured)."""
    if any(s.frame is not None for s in slices):
        return _read_frame_pixels(slices)
    if all(s.plain_pixels for s in slices):
        planes = [_read_plain_pixels(s) for s in slices]
        if all(p.shape == (s.rows, s.columns) for p, s in zip(planes, slices)):
            dtype = np.result_type(*planes)
            return np.stack([p.astype(dtype, copy=False) for p in planes])
    # GDCM releases the GIL while it decodes: a JPEG-lossless 80-slice DESS in 0.25 s on 2 threads, not 0.47
    with ThreadPoolExecutor(min(len(slices), _DECODE_THREADS)) as pool:
        planes = list(pool.map(_read_gdcm_plane, slices))
    dtype = np.result_type(*planes)
    return np.stack([p.astype(dtype, copy=False) for p in planes])


_DECODE_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _read_gdcm_plane(s: _Slice) -> np.ndarray:
    try:
        plane = sitk.ReadImage(str(s.path))
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM pixel data: {_sitk_reason(exc)}", s.path) from None
    if plane.GetNumberOfComponentsPerPixel() > 1:
        plane = _to_luminance(plane, s.path)
    return sitk.GetArrayFromImage(plane).reshape(-1, s.rows, s.columns)[0]


def _read_multiframe(s: _Slice) -> Image:
    """A multi-frame file without per-frame plane positions (not a stack ``_enhanced_frames`` can
    split): GDCM builds its geometry."""
    try:
        sitk_image = sitk.ReadImage(str(s.path))
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM file: {_sitk_reason(exc)}", s.path) from None
    return _image_from_sitk(sitk_image, s.path)
