"""`spinekneeseg annotate ...` end to end on real files: export (oblique and left-handed grids, LPS
and RAS marker files), RSNA import (a DICOM series written here with non-sequential
InstanceNumbers and files in reverse order), reader comparison, worklist status / manifest /
predict, and corrections. Expected values are computed here in index space with the spacing,
independently of the rasteriser's physical-space code."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.annotation.foramen_labels import (
    point_description,
    read_foramen_markers,
)
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import read_image, write_image
from SpineKneeSegLib.mrml.harness import require_slicer

try:
    require_slicer()
except ImportError as exc:  # marker files are written by Slicer's own storage node
    pytest.skip(f"real MRML unavailable: {exc}", allow_module_level=True)

from SpineKneeSegLib.mrml import nodes
from SpineKneeSegLib.mrml.harness import get_app


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# Sagittal-ish grids (k runs roughly left-right, LPS x), rotated about all three axes; one left-handed.
_SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # LPS; i: A->P, j: S->I, k: L->R
GEOMETRIES = {
    "oblique": _rotation(0.25, -0.15, 0.2) @ _SAGITTAL,
    "oblique-left-handed": _rotation(-0.2, 0.1, 0.3) @ _SAGITTAL @ np.diag([1.0, 1.0, -1.0]),
}
SHAPE, SPACING = (9, 60, 50), (0.9, 1.1, 3.5)  # (k, j, i); spacing (i, j, k)


def _image(direction) -> Image:
    array = np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32)
    return Image(array, SPACING, (30.0, -12.0, 900.0), direction)


def _save_markers(path, points, labels, descriptions=None):
    scene = get_app().scene
    node = nodes.points_to_markups_node(scene, points, labels, descriptions=descriptions, name="markers")
    nodes.save_node(node, path)
    scene.RemoveNode(node)
    return path


def _expected_disc(image: Image, ijk, radius, with_edge: bool = False):
    """Voxels of slice round(k) within ``radius`` of the point, measured in index space with the
    spacing (valid because these direction matrices are orthonormal). ``with_edge``: also the
    voxels within 1 micrometre of the circle, where rounding may decide either way."""
    i, j, k = ijk
    jj, ii = np.meshgrid(np.arange(SHAPE[1]), np.arange(SHAPE[2]), indexing="ij")
    d = np.hypot((ii - i) * SPACING[0], (jj - j) * SPACING[1])
    out, edge = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    out[round(k)] = d <= radius
    edge[round(k)] = np.abs(d - radius) < 1e-3
    return (out, edge) if with_edge else out


# ---- export ------------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("radius", [7.0, 4.5])
def test_export_discs_of_the_radius_on_the_points_slices(tmp_path, geometry, radius):
    image = _image(GEOMETRIES[geometry])
    write_image(image, tmp_path / "scan.nii.gz")
    # voxel positions (i, j, k); the second is off-centre by 0.3 slice (same slice) and 0.4 pixel
    ijk = {"L2 left": (20.0, 18.0, 2.0), "L4 right": (30.4, 40.0, 6.3), "L5 right": (33.0, 44.0, 7.0)}
    ras = image.ijk_to_ras_points(list(ijk.values()))
    markers = _save_markers(tmp_path / "reader.mrk.json", ras, list(ijk))
    assert json.loads(markers.read_text())["markups"][0]["coordinateSystem"] == "LPS"
    out = tmp_path / "out" / "labels.nii.gz"
    code = cli.main(["annotate", "export", "--markers", str(markers), "--image", str(tmp_path / "scan.nii.gz"),
                     "--output", str(out), "--radius", str(radius)])
    assert code == 0
    levels, sides = read_image(out), read_image(tmp_path / "out" / "labels_side.nii.gz")
    for written in (levels, sides):  # the scan's exact grid
        np.testing.assert_allclose(written.direction, image.direction, atol=1e-5)
        np.testing.assert_allclose(written.origin, image.origin, atol=1e-4)
        np.testing.assert_allclose(written.spacing, image.spacing, atol=1e-6)
    expected_levels = np.zeros(SHAPE, np.uint8)
    expected_sides = np.zeros(SHAPE, np.uint8)
    edges = np.zeros(SHAPE, bool)
    for name, point in ijk.items():
        disc, edge = _expected_disc(image, point, radius, with_edge=True)
        expected_levels[disc] = int(name[1])
        expected_sides[disc] = 1 if name.endswith("left") else 2
        edges |= edge
        area = disc.sum() * SPACING[0] * SPACING[1]
        assert area == pytest.approx(np.pi * radius ** 2, rel=0.12)
    assert edges.sum() < 10
    np.testing.assert_array_equal(levels.array[~edges], expected_levels[~edges])
    np.testing.assert_array_equal(sides.array[~edges], expected_sides[~edges])
    assert set(np.unique(levels.array)) == {0, 2, 4, 5}


def test_export_reads_ras_files_labels_only_and_skips_unplaced_and_unconfirmed(tmp_path):
    image = _image(GEOMETRIES["oblique-left-handed"])
    write_image(image, tmp_path / "scan.nrrd")
    ras = image.ijk_to_ras_points([(25, 30, 4), (10, 10, 1), (12, 12, 3)])
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
        {"label": "L3 left", "position": list(ras[0]), "positionStatus": "defined"},
        {"label": "L1 right", "position": list(ras[1]), "positionStatus": "undefined"},
        {"label": "L2 right", "position": list(ras[2]), "positionStatus": "defined",
         "description": point_description(2, "right", status="unconfirmed")},
        {"label": "L2 left", "position": "", "positionStatus": "missing",
         "description": point_description(2, "left", status="not visible")},
    ]}]}
    markers = tmp_path / "ras.mrk.json"
    markers.write_text(json.dumps(doc))
    out = tmp_path / "labels.nii.gz"
    assert cli.main(["annotate", "export", "--markers", str(markers), "--image", str(tmp_path / "scan.nrrd"),
                     "--output", str(out)]) == 0
    levels = read_image(out).array
    np.testing.assert_array_equal(levels == 3, _expected_disc(image, (25, 30, 4), 7.0))
    assert set(np.unique(levels)) == {0, 3}
    # the pre-filled point counts when asked for
    assert cli.main(["annotate", "export", "--markers", str(markers), "--image", str(tmp_path / "scan.nrrd"),
                     "--output", str(out), "--include-unconfirmed", "--manifest", str(tmp_path / "m.csv")]) == 0
    assert set(np.unique(read_image(out).array)) == {0, 2, 3}
    from SpineKneeSegLib.annotation.training_manifest import read_training_manifest

    [case] = read_training_manifest(tmp_path / "m.csv")
    assert (case.id, case.task, case.markers) == ("ras", "lumbar-foramina", markers)


def test_export_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    image = _image(GEOMETRIES["oblique"])
    write_image(image, tmp_path / "scan.nii.gz")
    out = tmp_path / "out" / "labels.nii.gz"
    args = ["annotate", "export", "--image", str(tmp_path / "scan.nii.gz"), "--output", str(out)]
    assert cli.main([*args, "--markers", str(tmp_path / "none.mrk.json")]) == 2
    assert "none.mrk.json: markers file does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.mrk.json"
    bad.write_text(json.dumps({"markups": [{"controlPoints": [{"label": "F-1", "position": [0, 0, 0]}]}]}))
    assert cli.main([*args, "--markers", str(bad)]) == 2
    assert "bad.mrk.json: control point 1 ('F-1') names no foramen" in capsys.readouterr().err
    far = _save_markers(tmp_path / "far.mrk.json", [(500.0, 500.0, 500.0)], ["L1 left"])
    assert cli.main([*args, "--markers", str(far)]) == 2
    assert "lies outside the image" in capsys.readouterr().err
    assert cli.main([*args, "--markers", str(far), "--radius", "0"]) == 2
    assert not out.parent.exists() or not any(out.parent.iterdir())


# ---- RSNA import --------------------------------------------------------------------------------

INSTANCES = [5, 2, 11, 7, 1, 9]  # InstanceNumber of the slice at each position along the normal


def _rsna_series(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six sagittal oblique slices; files written in reverse position order, named by write order."""
    from test_io import write_dicom_slice

    direction = GEOMETRIES["oblique"]
    origin, step = np.array([40.0, -30.0, 20.0]), 4.0
    orientation = list(direction[:, 0]) + list(direction[:, 1])
    folder.mkdir(parents=True)
    for n, k in enumerate(reversed(range(len(INSTANCES)))):
        pixels = np.full((40, 32), 100 * k, np.int16)
        write_dicom_slice(folder / f"IM{n:04d}.dcm", pixels, series_uid="1.2.3.200", position=origin + k * step * direction[:, 2],
                          orientation=orientation, pixel_spacing=(0.8, 0.7), instance=INSTANCES[k])
    return direction, origin, step


def _rsna_csv(path: Path, rows) -> Path:
    path.write_text("study_id,series_id,instance_number,condition,level,x,y\n"
                    + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_import_rsna_lands_points_on_the_instances_slices(tmp_path, capsys):
    series = tmp_path / "train_images" / "100" / "200"
    _rsna_series(series)
    rows = [(100, 200, 11, "Left Neural Foraminal Narrowing", "L4/L5", 10.5, 20.25),
            (100, 200, 1, "Right Neural Foraminal Narrowing", "L5/S1", 3, 7),
            (100, 200, 5, "Right Neural Foraminal Narrowing", "L1/L2", 31, 0),
            (100, 200, 7, "Spinal Canal Stenosis", "L3/L4", 16, 16)]
    out = tmp_path / "markers"
    code = cli.main(["annotate", "import-rsna", "--csv", str(_rsna_csv(tmp_path / "coords.csv", rows)),
                     "--series-dir", str(tmp_path / "train_images"), "--output", str(out),
                     "--manifest", str(tmp_path / "m.csv")])
    assert code == 0
    assert "skipped rows of other conditions: 1 'Spinal Canal Stenosis'" in capsys.readouterr().out
    points = read_foramen_markers(out / "100_200.mrk.json")
    assert [p.name for p in points] == ["L4 left", "L5 right", "L1 right"]
    image = read_image(series)  # the project's reader sorts the slices along their normal
    for p, (_, _, instance, _, _, x, y) in zip(points, rows):
        ijk = image.ras_to_ijk_points([p.ras])[0]
        np.testing.assert_allclose(ijk, (x, y, INSTANCES.index(instance)), atol=1e-3)
    # the imported markers export straight onto the DICOM grid
    assert cli.main(["annotate", "export", "--markers", str(out / "100_200.mrk.json"), "--image", str(series),
                     "--output", str(tmp_path / "l.nii.gz")]) == 0
    levels = read_image(tmp_path / "l.nii.gz").array
    assert [sorted(set(np.unique(levels[k])) - {0}) for k in range(6)] == [[1], [], [4], [], [5], []]
    from SpineKneeSegLib.annotation.training_manifest import read_training_manifest

    [case] = read_training_manifest(tmp_path / "m.csv")
    assert case.id == "100_200" and case.image == series and case.markers == out / "100_200.mrk.json"


def test_import_rsna_bad_rows_exit_2_and_write_nothing(tmp_path, capsys):
    _rsna_series(tmp_path / "images" / "100" / "200")
    base = ["annotate", "import-rsna", "--series-dir", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    missing = _rsna_csv(tmp_path / "a.csv", [(100, 200, 11, "Left Neural Foraminal Narrowing", "L4/L5", 1, 1),
                                            (100, 200, 99, "Left Neural Foraminal Narrowing", "L3/L4", 1, 1)])
    assert cli.main([*base, "--csv", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "a.csv: line 3: instance 99 is not in series folder" in err
    outside = _rsna_csv(tmp_path / "b.csv", [(100, 200, 11, "Left Neural Foraminal Narrowing", "L4/L5", 40, 1)])
    assert cli.main([*base, "--csv", str(outside)]) == 2
    assert "pixel (40, 1) lies outside instance 11 (32 columns x 40 rows)" in capsys.readouterr().err
    level = _rsna_csv(tmp_path / "c.csv", [(100, 200, 11, "Left Neural Foraminal Narrowing", "L4/S1", 1, 1)])
    assert cli.main([*base, "--csv", str(level)]) == 2
    assert "not a lumbar motion segment: 'L4/S1'" in capsys.readouterr().err
    (tmp_path / "d.csv").write_text("study_id,series_id,x,y\n1,2,3,4\n")
    assert cli.main([*base, "--csv", str(tmp_path / "d.csv")]) == 2
    assert "missing column(s) instance_number, condition, level" in capsys.readouterr().err
    nowhere = _rsna_csv(tmp_path / "e.csv", [(100, 300, 11, "Left Neural Foraminal Narrowing", "L4/L5", 1, 1)])
    assert cli.main([*base, "--csv", str(nowhere)]) == 2
    assert "no folder for study 100, series 300" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- reader agreement -------------------------------------------------------------------------

def test_compare_two_readers(tmp_path, capsys):
    image = _image(GEOMETRIES["oblique-left-handed"])
    write_image(image, tmp_path / "scan.nii.gz")

    def reader(path, entries):
        ras = image.ijk_to_ras_points([e[1] for e in entries])
        descriptions = [point_description(int(e[0][1]), e[0].split()[1], slice_index=round(e[1][2]))
                        for e in entries]
        _save_markers(path, ras, [e[0] for e in entries], descriptions)
        return path

    a = reader(tmp_path / "a.mrk.json", [("L1 left", (20, 20, 3)), ("L1 left", (20, 21, 4)), ("L2 left", (25, 30, 5)),
                                         ("L3 left", (30, 35, 5))])
    # B: L1 left 1.5 mm away (i by 1.5/0.9 voxels) on slice 4 and another on 6; L2 left two slices over; L5 right
    b = reader(tmp_path / "b.mrk.json", [("L1 left", (20 + 1.5 / 0.9, 21, 4)), ("L1 left", (20, 20, 6)),
                                         ("L2 left", (25, 30, 7)), ("L5 right", (30, 40, 1))])
    shift = image.ijk_to_ras_points([(1.5 / 0.9, 0, 0), (0, 0, 2)]) - image.ijk_to_ras_points([(0, 0, 0)])
    for extra in ([], ["--image", str(tmp_path / "scan.nii.gz")]):
        assert cli.main(["annotate", "compare", str(a), str(b), "--json", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        rows = {r["foramen"]: r for r in result["foramina"]}
        # with the scan: distances in its slice plane; without: the seed's yz (RAS x removed)
        in_plane, lateral = (1.5, 2 * SPACING[2]) if extra else (np.hypot(*shift[0, 1:]), abs(shift[1, 0]))
        across = 0.0 if extra else np.hypot(*shift[1, 1:])
        assert rows["L1 left"]["common_slices"] == [4]
        assert rows["L1 left"]["in_plane_mm"] == pytest.approx(in_plane, abs=1e-3)
        assert rows["L2 left"]["overlap"] is False and rows["L2 left"]["in_plane_mm"] is None
        assert rows["L2 left"]["lateral_mm"] == pytest.approx(lateral, abs=1e-3)
        assert rows["L2 left"]["centroid_in_plane_mm"] == pytest.approx(across, abs=1e-3)
        s = result["summary"]
        assert (s["foramina_both"], s["with_common_slice"], s["within_5mm"], s["percent_within_5mm"]) == (2, 1, 1, 50.0)
        assert s["only_a"] == ["L3 left"] and s["only_b"] == ["L5 right"]
    assert cli.main(["annotate", "compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert "L1 left" in table and "within 5 mm: 1 (50.0%)" in table


# ---- worklist: status, manifest, predictions; corrections ------------------------------------

def _done_markers(path, image: Image):
    names = [f"L{level} {side}" for side in ("left", "right") for level in range(1, 6)]
    ijk = [(10 + 3 * n, 10 + 4 * n, 1 if "left" in name else 7) for n, name in enumerate(names)]
    descriptions = [point_description(int(n[1]), n.split()[1], slice_index=int(p[2])) for n, p in zip(names, ijk)]
    return _save_markers(path, image.ijk_to_ras_points(ijk), names, descriptions)


def test_worklist_status_and_training_manifest(tmp_path, capsys):
    from SpineKneeSegLib.annotation.foramen_labels import rasterise_foramen_targets
    from SpineKneeSegLib.annotation.training_manifest import read_training_manifest

    scans = tmp_path / "scans"
    image = _image(GEOMETRIES["oblique"])
    for case_id in ("a", "b"):
        write_image(image, scans / f"{case_id}.nii.gz")
    _done_markers(scans / "annotations" / "a.mrk.json", image)
    _save_markers(scans / "annotations" / "b.mrk.json", image.ijk_to_ras_points([(5, 5, 1)]), ["L1 left"])
    assert cli.main(["annotate", "status", str(scans)]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["a\tdone", "b\tpartial"]
    manifest = tmp_path / "training.csv"
    assert cli.main(["annotate", "manifest", str(scans), "--manifest", str(manifest)]) == 0
    [case] = read_training_manifest(manifest)
    assert (case.id, case.image, case.markers) == ("a", scans / "a.nii.gz", scans / "annotations" / "a.mrk.json")
    # what Training/ does with it: markers rasterised on the scan
    levels, sides, notes = rasterise_foramen_targets(read_foramen_markers(case.markers), read_image(case.image))
    assert not notes and set(np.unique(levels)) == {0, 1, 2, 3, 4, 5} and set(np.unique(sides)) == {0, 1, 2}
    assert cli.main(["annotate", "manifest", str(scans), "--manifest", str(manifest), "--reviewed-only"]) == 0
    assert "added 0 case(s)" in capsys.readouterr().out


def test_predict_writes_prefill_markers(tmp_path, capsys):
    from SpineKneeSegLib.tasks.spine.phantom import spine_phantom

    scans = tmp_path / "scans"
    phantom = spine_phantom(seed=3, shape=(12, 128, 128), spacing=(2.0, 2.0, 4.0), k_toward="right")
    write_image(phantom.image, scans / "p.nii.gz")
    assert cli.main(["annotate", "predict", str(scans), "--device", "cpu"]) == 0
    predictions = scans / "annotations" / "p.pred.mrk.json"
    points = read_foramen_markers(predictions, include_unconfirmed=True)
    assert points and all(p.name in {f"L{level} {side}" for level in range(1, 6) for side in ("left", "right")}
                          for p in points)
    # issue 26: the file itself says a model made every point and no reader confirmed it
    assert all(p.status == "unconfirmed" and "origin=model" in p.description and "model=lumbar-levels" in p.description
               for p in points)
    assert read_foramen_markers(predictions) == []
    capsys.readouterr()
    code = cli.main(["annotate", "export", "--markers", str(predictions), "--image", str(scans / "p.nii.gz"),
                     "--output", str(tmp_path / "lab.nii.gz")])
    assert code == 2 and "no placed, confirmed foramen points" in capsys.readouterr().err
    # a model's file written before points were marked: still not labels
    import json

    doc = json.loads(predictions.read_text())
    for cp in doc["markups"][0]["controlPoints"]:
        cp["description"] = cp["description"].split("; status=")[0]
    old = scans / "annotations" / "old.pred.mrk.json"
    old.write_text(json.dumps(doc))
    assert read_foramen_markers(old) == [] and len(read_foramen_markers(old, include_unconfirmed=True)) == len(points)
    capsys.readouterr()
    assert cli.main(["annotate", "predict", str(scans), "--device", "cpu"]) == 0
    assert "predicted 0 case(s) (all had predictions)" in capsys.readouterr().out


def _three_layouts(tmp_path):
    """A worklist folder holding a case in each layout, plus three entries that are not cases."""
    from test_io import write_dicom_series

    from SpineKneeSegLib.tasks.spine.phantom import spine_phantom

    scans = tmp_path / "scans"
    phantom = spine_phantom(seed=3, shape=(12, 128, 128), spacing=(2.0, 2.0, 4.0), k_toward="right")
    image = phantom.image
    write_image(image, scans / "top.nii.gz")  # an image file at the top level
    write_image(image, scans / "sub" / "image.nii.gz")  # a sub-folder with one image file
    write_dicom_series(scans / "dcm", np.round(image.array).astype(np.int16), direction=image.direction,
                       origin=image.origin, step=image.spacing[2], pixel_spacing=(image.spacing[1], image.spacing[0]))
    (scans / "notes.txt").write_text("reading notes")
    write_image(image, scans / "two" / "a.nii.gz")
    write_image(image, scans / "two" / "b.nii.gz")
    (scans / "empty").mkdir()
    return scans, image


def test_three_worklist_layouts_are_cases_alike_in_status_predict_and_manifest(tmp_path, capsys):
    from SpineKneeSegLib.annotation.training_manifest import read_training_manifest

    scans, image = _three_layouts(tmp_path)
    capsys.readouterr()
    assert cli.main(["annotate", "status", str(scans), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["cases"] == {"dcm": "not started", "sub": "not started", "top": "not started"}
    reasons = {Path(p).name: r for p, r in listing["not_cases"].items()}
    assert set(reasons) == {"notes.txt", "two", "empty"}
    assert "holds 2 image files" in reasons["two"] and "no image file and no DICOM series" in reasons["empty"]
    assert cli.main(["annotate", "status", str(scans)]) == 0
    assert "not a case: " in capsys.readouterr().out

    assert cli.main(["annotate", "predict", str(scans), "--device", "cpu"]) == 0
    predicted = {case: read_foramen_markers(scans / "annotations" / f"{case}.pred.mrk.json", include_unconfirmed=True)
                 for case in ("top", "sub", "dcm")}
    assert all(predicted.values())
    # the same scan in three layouts: the same markers (DICOM stores int16 pixels, hence a tolerance)
    for case in ("sub", "dcm"):
        assert [p.name for p in predicted[case]] == [p.name for p in predicted["top"]]
        assert np.allclose([p.ras for p in predicted[case]], [p.ras for p in predicted["top"]], atol=2.0)

    for case in ("top", "sub", "dcm"):
        _done_markers(scans / "annotations" / f"{case}.mrk.json", image)
    manifest = tmp_path / "training.csv"
    assert cli.main(["annotate", "manifest", str(scans), "--manifest", str(manifest)]) == 0
    images = {case.id: case.image for case in read_training_manifest(manifest)}
    assert images == {"top": scans / "top.nii.gz", "sub": scans / "sub" / "image.nii.gz", "dcm": scans / "dcm"}
    for path in images.values():  # every manifest image is readable as the scan it names
        assert read_image(path).array.shape == image.array.shape


def test_save_correction_from_files(tmp_path, capsys):
    from SpineKneeSegLib.annotation.training_manifest import read_training_manifest
    from SpineKneeSegLib.core.labels import SPINE_LABELS

    image = _image(GEOMETRIES["oblique-left-handed"])
    write_image(image, tmp_path / "scan.nii.gz")
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 10:20, 10:20] = 2
    labels[5:7, 30:40, 5:15] = 4
    scene = get_app().scene
    seg = nodes.labels_to_segmentation_node(scene, image.with_array(labels), SPINE_LABELS, "edited")
    nodes.save_node(seg, tmp_path / "edited.seg.nrrd")
    scene.RemoveNode(seg)
    code = cli.main(["annotate", "save-correction", "--segmentation", str(tmp_path / "edited.seg.nrrd"),
                     "--image", str(tmp_path / "scan.nii.gz"), "--task", "lumbar-foramina", "--case", "c7",
                     "--output", str(tmp_path / "corr")])
    assert code == 0, capsys.readouterr().err
    written = read_image(tmp_path / "corr" / "c7.seg.nrrd")
    assert written.same_geometry(image)
    ijk = written.ras_to_ijk_points(image.ijk_to_ras_points(np.argwhere(labels >= 0)[:, ::-1]))
    k, j, i = np.rint(ijk[:, ::-1]).astype(int).T
    np.testing.assert_array_equal(written.array[k, j, i].reshape(SHAPE), labels)
    [case] = read_training_manifest(tmp_path / "corr" / "training-manifest.csv")
    assert (case.id, case.labels, case.image) == ("c7", tmp_path / "corr" / "c7.seg.nrrd", tmp_path / "scan.nii.gz")
    assert cli.main(["annotate", "save-correction", "--segmentation", str(tmp_path / "edited.seg.nrrd"),
                     "--image", str(tmp_path / "scan.nii.gz"), "--task", "brain-wmh", "--case", "c8",
                     "--output", str(tmp_path / "corr")]) == 2
    assert "has no segment named like a brain-wmh label" in capsys.readouterr().err
