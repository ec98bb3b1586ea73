"""X-ray (issue 8): real 2D files (DICOM CR/DX incl. MONOCHROME1 and rescale, 8/16-bit and RGB
PNG, 2D NIfTI), the aspect-kept letterbox and its exact way back, the femoral-head fit against the
phantom's true heads, and the CLI end to end with the shipped weights on held-out phantoms."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image as PILImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import read_image, write_image
from SpineKneeSegLib.engine.preprocessing import (
    from_network_grid,
    network_grid,
    network_grid_image,
    to_network_grid,
)
from SpineKneeSegLib.engine.weights import find_entry
from SpineKneeSegLib.tasks import TASKS
from SpineKneeSegLib.tasks.xray.anatomy import MIN_FEMUR_MM2, femoral_heads, fit_head
from SpineKneeSegLib.tasks.xray.phantom import xray_femur_phantom

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def write_radiograph_dicom(path: Path, stored: np.ndarray, *, modality="CR", photometric="MONOCHROME2",
                           slope=None, intercept=None, imager_spacing=None, pixel_spacing=None,
                           magnification=None, patient_orientation=None, bits_stored=16, presentation_lut=None):
    """One CR or DX Image Storage file written by pydicom (no ImageOrientationPatient, as projection
    radiographs are): ``stored`` are the raw stored values (uint16)."""
    sop = CR_STORAGE if modality == "CR" else DX_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = modality, "Phantom^Pelvis", "XR001"
    ds.BodyPartExamined = "PELVIS"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:.6g}" for v in imager_spacing]
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
    if magnification is not None:
        ds.EstimatedRadiographicMagnificationFactor = f"{magnification:.6g}"
    if patient_orientation is not None:
        ds.PatientOrientation = list(patient_orientation)
    if presentation_lut is not None:
        ds.PresentationLUTShape = presentation_lut
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.6g}", f"{intercept:.6g}", "US"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_files(tmp_path: Path, seed=90_001, **kw):
    """The same 16-bit phantom as DICOM CR (MONOCHROME1 + rescale), 16-bit PNG and 2D NIfTI."""
    ph = xray_femur_phantom(seed, intensity_range="uint16", **kw)
    values = ph.image.array[0].astype(np.uint16)
    pixel = ph.image.spacing[0]
    # MONOCHROME1: stored = max - v (bone dark when stored); rescale 2 * stored - 100 (an affine map)
    dcm = write_radiograph_dicom(tmp_path / "cr.dcm", 65535 - values, photometric="MONOCHROME1", slope=2.0,
                                 intercept=-100.0, imager_spacing=(pixel, pixel))
    png = tmp_path / "xray16.png"
    write_image(Image(values[None], (pixel, pixel, 1.0)), png)
    nii = tmp_path / "xray2d.nii.gz"
    two_d = sitk.GetImageFromArray(values.astype(np.float32))  # a true 2D NIfTI (dim[0] = 2)
    two_d.SetSpacing((pixel, pixel))
    sitk.WriteImage(two_d, str(nii))
    return ph, {"dicom": dcm, "png16": png, "nifti2d": nii}


# ---- I/O ---------------------------------------------------------------------------------------

def test_monochrome1_and_rescale_read_as_bone_bright(tmp_path):
    ph, files = phantom_files(tmp_path)
    truth = ph.image.array[0]
    for name, path in files.items():
        img = read_image(path)
        assert img.is_2d and img.array.shape == ph.image.array.shape, name
        a = img.array[0].astype(float)
        # the same picture up to a positive affine map (MONOCHROME1 inverted, slope/intercept applied)
        corr = np.corrcoef(a.ravel(), truth.ravel())[0, 1]
        assert corr > 0.9999, (name, corr)
        assert np.allclose(img.spacing[:2], ph.image.spacing[:2], atol=1e-4), name
    meta = read_image(files["dicom"]).meta
    assert meta["photometric"] == "MONOCHROME1" and meta["spacing_source"] == "ImagerPixelSpacing"
    assert any("detector" in w for w in meta["warnings"])


def test_dx_pixel_spacing_magnification_and_patient_orientation(tmp_path):
    stored = (np.arange(40 * 30).reshape(40, 30) * 20).astype(np.uint16)
    plain = read_image(write_radiograph_dicom(tmp_path / "dx.dcm", stored, modality="DX", pixel_spacing=(0.3, 0.2),
                                              imager_spacing=(0.4, 0.4)))
    assert plain.spacing[:2] == (0.2, 0.3)  # (column, row): PixelSpacing wins over ImagerPixelSpacing
    assert plain.meta["spacing_source"] == "PixelSpacing" and "spacing_note" not in plain.meta
    magnified = read_image(write_radiograph_dicom(tmp_path / "m.dcm", stored, imager_spacing=(0.2, 0.2),
                                                  magnification=1.25))
    assert np.allclose(magnified.spacing[:2], (0.16, 0.16))
    # PatientOrientation R\F: columns run toward patient right -> LPS -x; rows toward the feet -> -z
    flipped = read_image(write_radiograph_dicom(tmp_path / "o.dcm", stored, imager_spacing=(0.2, 0.2),
                                                patient_orientation=("R", "F")))
    assert np.allclose(flipped.direction[:, 0], (-1, 0, 0)) and np.allclose(flipped.direction[:, 1], (0, 0, -1))


def test_png_colour_alpha_and_spacing_notes(tmp_path):
    grey = (np.add.outer(np.arange(60), np.arange(80)) % 256).astype(np.uint8)
    PILImage.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    PILImage.fromarray(grey).convert("LA").save(tmp_path / "la.png")  # ITK cannot read grey + alpha
    PILImage.fromarray(grey).save(tmp_path / "dpi.png", dpi=(254, 254))  # 0.1 mm per pixel
    rgb, la, dpi = (read_image(tmp_path / n) for n in ("rgb.png", "la.png", "dpi.png"))
    np.testing.assert_array_equal(rgb.array[0], grey)
    np.testing.assert_array_equal(la.array[0], grey)
    assert any("colour" in w for w in rgb.meta["warnings"])
    assert "1 pixel = 1 mm assumed" in rgb.meta["spacing_note"]
    assert dpi.spacing[:2] == (1.0, 1.0) and "254 dpi" in dpi.meta["spacing_note"]
    assert "1 pixel = 1 mm assumed" in dpi.meta["spacing_note"]
    write_image(Image(grey[None], (0.15, 0.15, 1.0)), tmp_path / "itk.png")  # ITK keeps its own pixel size
    itk = read_image(tmp_path / "itk.png")
    assert np.allclose(itk.spacing[:2], 0.15) and "from the file's metadata" in itk.meta["spacing_note"]


# ---- letterbox -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,spacing", [((300, 517), (0.5, 0.5)), ((420, 260), (0.2, 0.3))])
def test_letterbox_keeps_aspect_and_maps_back_exactly(shape, spacing):
    rng = np.random.default_rng(0)
    img = Image(np.zeros((1, *shape), np.float32), (*spacing, 1.0))
    grid = network_grid(img, 0, None, 8, network_px=256)
    net_img = network_grid_image(img, grid)
    assert np.isclose(net_img.spacing[0], net_img.spacing[1])  # physically square network pixels
    # the network grid's centre is the image's centre
    centre_in = img.ijk_to_lps_points([[(shape[1] - 1) / 2, (shape[0] - 1) / 2, 0]])[0]
    centre_net = net_img.ijk_to_lps_points([[127.5, 127.5, 0]])[0]
    assert np.allclose(centre_in, centre_net, atol=1e-6)
    # a blocky label map (blocks >> a network pixel) goes through the grid and back unchanged
    # away from block edges; a one-pixel shift would be caught
    blocks = rng.integers(0, 2, (shape[0] // 40 + 1, shape[1] // 40 + 1)).astype(np.float32)
    labels = np.kron(blocks, np.ones((40, 40), np.float32))[: shape[0], : shape[1]]
    x = torch.from_numpy(labels)[None, None]
    back, (r0, r1, c0, c1) = from_network_grid(to_network_grid(x, grid), grid)
    assert (r0, r1, c0, c1) == (0, shape[0], 0, shape[1])
    agree = ((back[0, 0].numpy() > 0.5) == (labels > 0.5)).mean()
    shifted = ((back[0, 0].numpy()[:, 1:] > 0.5) == (labels[:, :-1] > 0.5)).mean()
    assert agree > 0.99 and agree - shifted > 0.003, (agree, shifted)


# ---- femoral heads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,kw", [(0, {}), (11, {"pixel_mm": 0.9, "shape": (400, 520)}),
                                     (12, {"view": "hip", "side": "left"}), (13, {"view": "hip"})])
def test_head_fit_on_true_masks(seed, kw):
    ph = xray_femur_phantom(seed, **kw)
    heads, warnings = femoral_heads(ph.labels.array, ph.labels)
    truth = {h["side"]: h for h in ph.extra["femoral_heads"]}
    assert not warnings and sorted(h.side for h in heads) == sorted(truth)
    for h in heads:
        t = truth[h.side]
        assert np.linalg.norm(np.subtract(h.centre_ras, t["centre_ras"])) < 1.0
        assert abs(h.diameter_mm - t["diameter_mm"]) < 1.0
        assert h.arc_coverage > 0.6 and h.fit_rms_mm < 0.5


def test_head_fit_with_anisotropic_pixels():
    """Columns sampled at twice the row spacing: the circle is fitted in mm, not pixels."""
    ph = xray_femur_phantom(3, pixel_mm=0.35, shape=(1000, 1000))
    lab = ph.labels.array[:, :, ::2]  # every other column: (row 0.35, column 0.7) mm pixels
    img = Image(lab, (0.7, 0.35, 1.0), ph.labels.origin, ph.labels.direction)
    heads, _ = femoral_heads(lab, img)
    truth = {h["side"]: h for h in ph.extra["femoral_heads"]}
    for h in heads:
        assert np.linalg.norm(np.subtract(h.centre_ras, truth[h.side]["centre_ras"])) < 1.5
        assert abs(h.diameter_mm - truth[h.side]["diameter_mm"]) < 1.5


def test_sides_follow_the_geometry_and_square_blobs_have_no_head():
    ph = xray_femur_phantom(0)
    last_column = ph.labels.ijk_to_lps_points([[ph.labels.array.shape[2] - 1, 0, 0]])[0]
    mirrored = Image(ph.labels.array[:, :, ::-1].copy(), ph.labels.spacing, last_column,
                     ph.labels.direction @ np.diag([-1.0, 1.0, 1.0]))  # same anatomy, columns toward patient right
    heads, _ = femoral_heads(mirrored.array, mirrored)
    truth = {h["side"]: h for h in ph.extra["femoral_heads"]}
    for h in heads:
        assert np.linalg.norm(np.subtract(h.centre_ras, truth[h.side]["centre_ras"])) < 1.0
    square = np.zeros((1, 200, 200), np.uint8)
    square[0, 40:160, 60:140] = 1
    heads, warnings = femoral_heads(square, Image(square, (0.5, 0.5, 1.0)))
    assert heads == [] and "no round femoral head" in warnings[0]
    assert fit_head(np.zeros((10, 10), bool), (1.0, 1.0)) is None


# ---- CLI end to end ----------------------------------------------------------------------------------

@pytest.mark.mrml
def test_shipped_femur_model_on_held_out_phantoms_in_three_formats(tmp_path, capsys):
    """The registered xray-femur weights on a held-out phantom (test seed, never trained on) as
    DICOM CR MONOCHROME1 + rescale, 16-bit PNG and 2D NIfTI: labels on the input's exact pixels,
    the same in every format, Dice against the known mask, femoral heads near the true ones."""
    from SpineKneeSegLib.mrml import nodes
    from SpineKneeSegLib.mrml.harness import create_headless_slicer

    assert find_entry("xray-femur") is not None, "xray-femur weights are not registered"
    ph, files = phantom_files(tmp_path)
    preds = {}
    for name, path in files.items():
        out = tmp_path / f"out-{name}"
        assert cli.main(["run", "--task", "xray-femur", str(path), "-o", str(out), "--progress", "none"]) == 0
        labels = read_image(out / "labels.nii.gz")
        assert labels.array.shape == ph.image.array.shape
        assert np.allclose(labels.spacing[:2], ph.image.spacing[:2], atol=1e-4)
        preds[name] = labels.array
        report = json.loads((out / "report.json").read_text())
        assert {"areas.tsv", "femoral_heads.tsv", "femoral_heads.mrk.json"} <= set(report["outputs"])
        truth_heads = {h["side"]: h for h in ph.extra["femoral_heads"]}
        found = {h["side"]: h for h in report["summaries"]["femoral_heads"]}
        assert set(found) == set(truth_heads), (name, found)
        for side, h in found.items():
            # positions compared in the image plane (i, j): the files differ in their origin
            assert np.hypot(*np.subtract(h["centre_ij"], truth_heads[side]["centre_ij"])) * ph.image.spacing[0] < 4.0
            assert abs(h["diameter_mm"] - truth_heads[side]["diameter_mm"]) < 4.0
    assert _dice(preds["dicom"] == 1, ph.labels.array == 1) > 0.9
    for name in ("png16", "nifti2d"):
        assert (preds[name] == preds["dicom"]).mean() > 0.999, name
    app = create_headless_slicer()
    try:
        node = nodes.load_markups(app.scene, tmp_path / "out-png16" / "femoral_heads.mrk.json")
        points = nodes.markups_node_to_points(node)
        assert sorted(p["label"] for p in points) == ["femoral head left", "femoral head right"]
        assert all("diameter" in p["description"] for p in points)
        # the named segment lands on the DICOM's own pixels, as labels.nii.gz does
        seg = nodes.load_segmentation(app.scene, tmp_path / "out-dicom" / "segmentation.seg.nrrd")
        assert seg.GetSegmentation().GetNthSegment(0).GetName() == "femur"
        back = nodes.segmentation_node_to_labels(seg, read_image(files["dicom"]), TASKS["xray-femur"].labels)
        np.testing.assert_array_equal(back, preds["dicom"])
    finally:
        app.close()


@pytest.mark.mrml
def test_pixel_mm_overrides_a_png_without_spacing(tmp_path):
    assert find_entry("xray-femur") is not None
    ph = xray_femur_phantom(90_002, intensity_range="uint16")
    png = tmp_path / "nospacing.png"
    PILImage.fromarray(ph.image.array[0].astype(np.uint16)).save(png)  # no pHYs: 1 mm assumed
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    assert cli.main(["run", "--task", "xray-femur", str(png), "-o", str(out1), "--progress", "none"]) == 0
    assert cli.main(["run", "--task", "xray-femur", str(png), "-o", str(out2), "--progress", "none",
                     "--pixel-mm", f"{ph.image.spacing[0]}"]) == 0
    r1, r2 = (json.loads((o / "report.json").read_text()) for o in (out1, out2))
    assert any("1 pixel = 1 mm assumed" in w for w in r1["warnings"])
    assert not any("1 pixel = 1 mm assumed" in w for w in r2["warnings"])
    d1 = r1["summaries"]["femoral_heads"][0]["diameter_mm"]
    d2 = r2["summaries"]["femoral_heads"][0]["diameter_mm"]
    assert np.isclose(d2, d1 * ph.image.spacing[0], rtol=1e-3)  # summaries round to 0.01 mm


def test_cards_and_checkpoint_labels():
    from SpineKneeSegLib.engine.cards import with_checkpoint_labels

    femur, multi = TASKS["xray-femur"], TASKS["xray-multiclass"]
    assert femur.label_activation == "sigmoid" and femur.output_channels == 1
    assert [s.name for s in multi.labels] == ["femur", "hip bone", "sacrum"] and multi.output_channels == 4
    custom = with_checkpoint_labels(multi, {"labels": [{"value": 1, "name": "right lung"},
                                                       {"value": 2, "name": "heart"}]})
    assert [s.name for s in custom.labels] == ["right lung", "heart"] and custom.output_channels == 3
    kept = with_checkpoint_labels(multi, {"labels": [{"value": 1, "name": "sacrum"}]})
    assert kept.labels[0].type.value == "54735007" and kept.labels[0].value == 1


@pytest.mark.mrml
def test_shipped_multiclass_model_on_a_held_out_phantom(tmp_path):
    from SpineKneeSegLib.tasks import make_phantom

    assert find_entry("xray-multiclass") is not None, "xray-multiclass weights are not registered"
    ph = make_phantom("xray-multiclass", seed=90_003, intensity_range="uint16")  # a test seed, never trained on
    png = tmp_path / "pelvis.png"
    write_image(Image(ph.image.array.astype(np.uint16), ph.image.spacing), png)
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "xray-multiclass", str(png), "-o", str(out), "--progress", "none"]) == 0
    pred = read_image(out / "labels.nii.gz").array
    truth = ph.labels.array
    dice = {v: _dice(pred == v, truth == v) for v in (1, 2, 3)}
    assert dice[1] > 0.9 and dice[2] > 0.9 and dice[3] > 0.6, dice
    rows = (out / "areas.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["femur", "hip bone", "sacrum"]


# ---- is there a femur at all (radiograph-level rule) ----------------------------------------------

def _presence(labels: np.ndarray, image: Image):
    from SpineKneeSegLib.engine.pipeline import postprocess

    return postprocess(TASKS["xray-femur"], image, labels)


@pytest.mark.parametrize("seed", [82, 23, 0])  # the training phantoms with the smallest femurs (hip views)
def test_every_true_phantom_femur_survives_the_femur_rule(seed):
    from xray import make_case  # Training/ (pytest's pythonpath)

    image, labels, _ = make_case("xray-femur", seed)
    result = _presence(labels.array.copy(), image)
    np.testing.assert_array_equal(result.labels.array, labels.array)
    assert result.summaries["femur_presence"]["femur_found"] and not result.summaries["femur_presence"]["dropped_mm2"]
    assert min(result.summaries["femur_presence"]["kept_mm2"]) > MIN_FEMUR_MM2


def test_a_blob_too_small_for_a_femur_is_removed_and_said():
    """A 10 cm2 blob beside a pelvis phantom's two femurs goes; alone, it leaves no femur and a
    warning that says so, with its size and the rule's."""
    ph = xray_femur_phantom(5)
    blob = np.zeros_like(ph.labels.array)
    rows, cols = blob.shape[1:]
    radius_px = np.sqrt(1000.0 / np.pi) / ph.image.spacing[0]  # 10 cm2
    jj, ii = np.ogrid[:rows, :cols]
    blob[0][(jj - 40 - radius_px) ** 2 + (ii - cols / 2) ** 2 <= radius_px ** 2] = 1
    assert not (blob & ph.labels.array).any()
    both = _presence(ph.labels.array | blob, ph.image)
    np.testing.assert_array_equal(both.labels.array, ph.labels.array)
    summary = both.summaries["femur_presence"]
    assert summary["femur_found"] and len(summary["kept_mm2"]) == 2 and len(summary["dropped_mm2"]) == 1
    assert abs(summary["dropped_mm2"][0] - 1000.0) < 30
    assert any(w.startswith("2 femur segment(s) kept: removed 1 region") for w in both.warnings)
    alone = _presence(blob, ph.image)
    assert not alone.labels.array.any() and not alone.summaries["femur_presence"]["femur_found"]
    assert any(w.startswith("no femur found in this radiograph") and "(10.0 cm2)" in w and "(20 cm2)" in w
               for w in alone.warnings), alone.warnings
    assert alone.summaries["femoral_heads"] == []


def test_the_femur_rule_without_a_pixel_size_assumes_a_radiographs_field():
    """A 128-pixel PNG-like image without a pixel size: at the 1 mm ITK reports, a true femur
    would be 'too small'; the rule takes the longer side as a 40 cm field and keeps it."""
    ph = xray_femur_phantom(5, shape=(128, 128), pixel_mm=3.0)
    plain = Image(ph.labels.array, (1.0, 1.0, 1.0))
    plain.meta["spacing_note"] = "no pixel size in the file: 1 pixel = 1 mm assumed"
    assert (ph.labels.array == 1).sum() < MIN_FEMUR_MM2  # in pixels
    result = _presence(ph.labels.array.copy(), plain)
    np.testing.assert_array_equal(result.labels.array, ph.labels.array)
    assert result.summaries["femur_presence"]["pixel_mm_assumed"] == round(400.0 / 128, 4)
    tiny = np.zeros_like(ph.labels.array)
    tiny[0, 10:14, 10:14] = 1  # 16 px = 1.6 cm2 at the assumed 3.1 mm
    said = _presence(tiny, plain)
    assert not said.labels.array.any()
    assert any("assumed 3.12 mm pixel" in w for w in said.warnings), said.warnings


def test_checkpoint_settings_override_the_femur_rule():
    from SpineKneeSegLib.engine.pipeline import postprocess

    ph = xray_femur_phantom(5)
    result = postprocess(TASKS["xray-femur"], ph.image, ph.labels.array.copy(),
                         settings={"femur_presence": {"min_area_mm2": 1e6}})
    assert not result.labels.array.any() and result.summaries["femur_presence"]["min_area_mm2"] == 1e6
