"""DICOM-SEG output (highdicom) for a run whose input was a DICOM series.

One binary segment per task label, in label order (segment number = label value), with the
task's SNOMED category / type / anatomic region codes, referencing the source instances; frames
are the source slices that hold the segment (empty frames omitted). Written when the input was
read from single-frame DICOM files (``image.meta["dicom_files"]``, sorted along the slice normal by
image_io.py: array slice k is file k) or from the frames of one enhanced multi-frame file
(``image.meta["dicom_frames"]``: array slice k is that frame), so each frame maps to its source
frame exactly.
"""
from __future__ import annotations

from pathlib import Path
import warnings

import numpy as np

from SpineKneeSegLib import __version__
from SpineKneeSegLib.core.labels import LabelSpec

SEGMENTATION_SERIES_NUMBER = 9901  # off the scanner's usual range; Slicer shows it under the study


def can_write(image) -> tuple[bool, str]:
    """(writable, why not) for an input Image."""
    files = image.meta.get("dicom_files") or []
    if not image.meta.get("is_dicom") or not files:
        return False, "the input is not a DICOM series"
    frames = image.meta.get("dicom_frames")
    if frames is not None:
        if len(files) != 1 or len(frames) != image.array.shape[0]:
            return False, (f"the input's slices come from {len(files)} DICOM files, some of them multi-frame "
                           "(DICOM-SEG is written for one multi-frame file or a single-frame series)")
        headers = image.meta.get("dicom_headers") or [None]
        count = int(getattr(headers[0], "NumberOfFrames", 0) or 0)
        if len(frames) != count:  # highdicom refuses a source whose frames repeat a plane position
            return False, (f"the input is {len(frames)} of the {count} frames of a multi-frame DICOM file (one echo "
                           "of several, or its magnitude frames): a DICOM-SEG could not say which frames it segments")
        return True, ""
    if len(files) != image.array.shape[0]:
        return False, "the input is a multi-frame DICOM file read as one stack (no per-frame geometry)"
    return True, ""


# Type 2 (required, may be empty) patient/study attributes highdicom copies from the source;
# anonymised or synthetic series often lack them. Filled empty in memory only.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(ds):
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _code(code):
    from highdicom.sr import CodedConcept

    return CodedConcept(code.value, code.scheme, code.meaning)


def segment_descriptions(labels: tuple[LabelSpec, ...], task: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=f"SpineKneeSeg {task}", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for spec in labels:
        if spec.category is None or spec.type is None:
            raise ValueError(f"label {spec.name!r} has no category/type code: DICOM-SEG needs both")
        lab = hd.color.CIELabColor(*_rgb_to_lab(spec.color))
        out.append(hd.seg.SegmentDescription(
            segment_number=spec.value, segment_label=spec.name,
            segmented_property_category=_code(spec.category), segmented_property_type=_code(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[_code(spec.region)] if spec.region is not None else None, display_color=lab))
    return out


def _rgb_to_lab(rgb) -> tuple[float, float, float]:
    """sRGB (0..1) -> CIE L*a*b* (D65), as DICOM's RecommendedDisplayCIELabValue needs."""
    c = np.asarray(rgb, dtype=float)
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return (float(116 * f[1] - 16), float(500 * (f[0] - f[1])), float(200 * (f[1] - f[2])))


def _on_source_frames(labels: np.ndarray, frames: list[int], count: int) -> np.ndarray:
    """Slice k of ``labels`` placed at source frame frames[k] (1-based) of a ``count``-frame file
    (the reader sorts frames along the slice normal; a file may store them in any order)."""
    out = np.zeros((count, *labels.shape[1:]), np.uint8)
    out[np.asarray(frames) - 1] = labels
    return out


def write_dicom_seg(image, labels: np.ndarray, card, path) -> Path:
    """Write ``labels`` (uint8, values = the card's label values, on ``image``'s grid) as a
    DICOM-SEG referencing ``image``'s source files. Atomic."""
    import highdicom as hd
    import pydicom

    from SpineKneeSegLib.core.atomic import atomic_path

    ok, why = can_write(image)
    if not ok:
        raise ValueError(why)
    # the headers are all a SEG references (highdicom reads no source pixels): the reader's own when it
    # kept them (80 DESS headers parsed again took a quarter of this writer's time), else read here
    headers = image.meta.get("dicom_headers") or [None] * len(image.meta["dicom_files"])
    sources = [_with_type2(h if h is not None else pydicom.dcmread(f, stop_before_pixels=True))
               for h, f in zip(headers, image.meta["dicom_files"])]
    if "FrameOfReferenceUID" not in sources[0]:
        raise ValueError(f"{image.meta['dicom_files'][0]}: no FrameOfReferenceUID, a DICOM-SEG cannot reference it")
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    frames = image.meta.get("dicom_frames")
    if frames is not None:
        labels = _on_source_frames(labels, [frame for _, frame in frames], int(sources[0].NumberOfFrames))
    elif labels.shape != (len(sources), rows, columns):
        raise ValueError(f"labels {labels.shape} do not match the {len(sources)} source slices of {rows}x{columns}")
    # highdicom warns about a one-component PatientName (e.g. an anonymised "T2004_07APR2015"); the
    # SEG copies the source's name as it is, as it must, so the warning is console noise. Set here,
    # not at import: a caller's catch_warnings would drop it (re-adding replaces, never duplicates)
    warnings.filterwarnings("ignore", message=r'The string ".*" is unlikely to represent the intended person name',
                            category=UserWarning, module=r"highdicom\.")
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(labels, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(card.labels, card.name),
        series_instance_uid=hd.UID(), series_number=SEGMENTATION_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="SpineKneeSeg", manufacturer_model_name=card.name,
        software_versions=__version__, device_serial_number="none",
        series_description=f"SpineKneeSeg {card.title}"[:64], content_label="SEGMENTATION",
        content_description=f"{card.title}: automatic, not for diagnosis"[:64])
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)
