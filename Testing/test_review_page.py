"""Every task's overlay pictures, and a cohort's review page (OUT/review.html): all cases on one page,
those that need a look first (failed, not run, finished with warnings), each with its pictures, so a
reader checks a large cohort by scrolling instead of opening each folder."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image as PILImage
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.image_io import write_image
from SpineKneeSegLib.engine import batch, review
from SpineKneeSegLib.engine.render import save_label_overlays
from SpineKneeSegLib.engine.weights import initialise_weights
from SpineKneeSegLib.tasks import TASKS, make_phantom


class _Page(HTMLParser):
    """The page's table rows: each a list of its cells' text, and the links and pictures in it."""

    def __init__(self):
        super().__init__()
        self.rows, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append({"cells": [], "links": [], "pictures": [], "classes": []})
        elif tag == "td" and self.rows:
            self.rows[-1]["cells"].append("")
            self.rows[-1]["classes"].append(attrs.get("class", ""))
        elif tag == "a" and self.rows:
            self.rows[-1]["links"].append(unquote(attrs["href"]))
        elif tag == "img" and self.rows:
            self.rows[-1]["pictures"].append(unquote(attrs["src"]))
            assert attrs.get("loading") == "lazy"  # a page of a thousand cases loads what is scrolled to

    def handle_data(self, data):
        if self.rows and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1] += data


def _page(path: Path) -> list[dict]:
    parser = _Page()
    parser.feed(path.read_text(encoding="utf-8"))
    return [row for row in parser.rows if row["cells"]]  # the header row has no td


@pytest.fixture
def cohort(tmp_path):
    """Tiny knee weights (their results fail the knee's plausibility checks: flagged), a phantom,
    and a manifest: a, a broken case, an ID that needs escaping, b."""
    initialise_weights("knee-bones", tmp_path / "knee.pt", {"channels": (4, 8)}, seed=1)
    write_image(make_phantom("knee-bones", seed=1).image, tmp_path / "knee.nii.gz")
    (tmp_path / "cases.csv").write_text("id,input\na,knee.nii.gz\nbroken,absent.nii.gz\n"
                                        "x <&'> y,knee.nii.gz\nb,knee.nii.gz\n")
    return ["run", "--task", "knee-bones", "--manifest", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out"),
            "--weights", str(tmp_path / "knee.pt")]


def test_the_review_page_shows_every_case_those_to_look_at_first(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(cohort) == 2  # the broken case
    assert "review.html (each case's pictures, those to review first)" in capsys.readouterr().err
    rows = _page(out / "review.html")
    summary = batch.summary_rows((out / "summary.tsv").read_text())
    assert sorted(row["cells"][0] for row in rows) == sorted(summary)  # the same cases as summary.tsv
    assert rows[0]["cells"][:3] == ["broken", "failed", ""] and "absent.nii.gz" in rows[0]["cells"][3]
    assert rows[0]["pictures"] == [] and rows[0]["links"] == []
    assert [row["cells"][0] for row in rows[1:]] == ["a", "x <&'> y", "b"]  # manifest order within a standing
    for row in rows[1:]:
        case = row["cells"][0]
        assert row["classes"][1] == "flagged" and "knee plausibility check failed" in row["cells"][3]
        assert row["cells"][3] == summary[case][7]  # its warnings column
        report = json.loads((out / case / "report.json").read_text())["summaries"]["knee_plausibility"]
        assert f"plausible: {report['passed']}" in row["cells"][2]  # the card's headline findings
        assert f"femur mL: {report['volumes_ml']['femur']}" in row["cells"][2]
        pictures = sorted(f"{case}/overlays/{p.name}" for p in (out / case / "overlays").glob("*.png"))
        assert sorted(row["pictures"]) == pictures and len(pictures) >= 1
        assert row["links"] == [f"{case}/report.json"] + row["pictures"]  # the ID, then each picture
        assert all((out / link).is_file() for link in row["links"])  # relative: the page moves with the folder

    assert cli.main(cohort) == 2  # a re-run: the finished cases are skipped, and still on the page
    again = _page(out / "review.html")
    assert [row["cells"][:2] for row in again[1:]] == [[c, "skipped"] for c in ("a", "x <&'> y", "b")]
    assert [row["pictures"] for row in again[1:]] == [row["pictures"] for row in rows[1:]]


def test_the_review_page_orders_by_what_a_reader_must_decide(tmp_path):
    rows = [batch.summary_row("ok1", "ok", 0, "", str(tmp_path / "ok1")),
            batch.summary_row("busy1", "busy", 0, "another run holds it"),
            batch.summary_row("flag1", "ok", 0, "", str(tmp_path / "flag1"), warnings="level count doubtful"),
            batch.summary_row("pend1", "pending", 2, "not run: stopped"),
            batch.summary_row("fail1", "failed", 2, "x.nii.gz: empty")]
    review.write_review_page(tmp_path, rows, {})
    page = _page(tmp_path / review.REVIEW_PAGE)
    assert [row["cells"][0] for row in page] == ["fail1", "pend1", "flag1", "busy1", "ok1"]
    text = (tmp_path / review.REVIEW_PAGE).read_text()
    assert re.search(r"1 failed.*1 pending.*1 flagged.*1 busy.*1 ok", text)
    assert batch.cohort_file("Review.html") and batch.cohort_file("summary.tsv")


def test_findings_come_from_the_report_by_the_task_cards_headline():
    """What the page shows beside a case: the card's headline values from its report, those present
    (a structure not found is in its warnings, "no voxels predicted for ...", already shown)."""
    def findings(task, summaries):
        return review.findings({"task": task, "summaries": summaries})

    assert findings("lumbar-foramina", {"level_confidence": 0.42, "level_decoding": {"doubtful": True},
                                        "transitional_anatomy": {"status": "typical"}, "foramina": {"found": 8}}) == [
        "level confidence: 0.42", "doubtful: True", "anatomy: typical", "foramina: 8"]
    assert findings("brain-wmh", {"lesions": {"lesion_count": 0, "total_lesion_load_ml": 0.0}}) == [
        "lesions: 0", "lesion load mL: 0.0"]
    assert findings("lumbar-foramina", {"level_confidence": 0.9, "level_decoding": "not a dict"}) == [
        "level confidence: 0.9"]  # a path that does not lead to a value is left out
    assert findings("xray-chest", {"segments_present": ["heart"]}) == []  # no headline
    assert findings("no-such-task", {"a": 1}) == [] and review.findings(["not", "a", "report"]) == []


def test_a_review_page_that_cannot_be_written_is_named_and_exits_2(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "review.html").mkdir(parents=True)  # a folder in the page's place
    assert cli.main(cohort) == 2
    err = capsys.readouterr().err
    assert "the cohort's tables are incomplete" in err and "review.html could not be written" in err
    assert (out / "summary.tsv").is_file()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_draws_its_overlays(tmp_path, task):
    """Each task's result as pictures: a slice through each structure found (3D), the whole image
    with every structure (2D; overlapping structures in a second layer, the chest's clavicles,
    drawn over the rest)."""
    card = TASKS[task]
    phantom = make_phantom(task, seed=2)
    layers = phantom.extra.get("layers") or None  # the chest's clavicles
    written = save_label_overlays(tmp_path, "overlays", phantom.image, phantom.labels, card, layers=layers)
    maps = [phantom.labels.array, *(layer.array for layer in (layers or {}).values())]
    present = [spec for spec in card.labels if any((m == spec.value).any() for m in maps)]
    assert len(present) == len(card.labels)
    if phantom.image.is_2d:
        assert written == ["overlays/image.png"]
        picture = np.asarray(PILImage.open(tmp_path / written[0]).convert("RGB"))
        for spec in present:  # each structure's outline is drawn in its own colour
            colour = np.array(spec.color, dtype=np.float32) * 255
            assert (np.abs(picture.astype(np.float32) - colour) <= 1).all(axis=2).any(), spec.name
    elif card.overlay_views == "together":  # the lumbar levels: one picture through their middle
        assert [name.split("-", 1)[1] for name in written] == ["labels.png"]
        picture = np.asarray(PILImage.open(tmp_path / written[0]).convert("RGB"))
        for spec in present:  # the phantom's bodies lie side by side: every level shows
            colour = np.array(spec.color, dtype=np.float32) * 255
            assert (np.abs(picture.astype(np.float32) - colour) <= 1).all(axis=2).any(), spec.name
    else:  # "<plane>-<segment>.png"
        assert [name.split("-", 1)[1] for name in written] == [f"{spec.segment_id}.png" for spec in present]
    assert all((tmp_path / name).is_file() for name in written)


def test_a_radiographs_picture_shows_its_markups_and_fitted_circles(tmp_path):
    """The femoral heads' centres (a cross) and fitted circles (their diameter) on the radiograph's
    picture, where a reader checks the measurement at a glance: cyan pixels on the circle's ring,
    none well inside or outside it."""
    from SpineKneeSegLib.engine.render import MARK_COLOUR

    card = TASKS["xray-femur"]
    phantom = make_phantom("xray-femur", seed=3)
    image = phantom.image
    centre_ij, diameter_mm = (200.0, 260.0), 40.0
    point = {"label": "femoral head right", "ras": image.ijk_to_ras_points([[*centre_ij, 0]])[0], "description": "",
             "attributes": {"side": "right", "diameter_mm": f"{diameter_mm:.2f}"}}
    written = save_label_overlays(tmp_path, "overlays", image, phantom.labels, card, points=[point])
    picture = np.asarray(PILImage.open(tmp_path / written[0]).convert("RGB"))
    across = picture.shape[1] / image.array.shape[2]  # output pixels per image pixel (no title band offset)
    rows, cols = np.nonzero((picture == MARK_COLOUR).all(axis=2))
    assert rows.size
    distance_mm = np.hypot((cols + 0.5) / across - (centre_ij[0] + 0.5), (rows + 0.5) / across - (centre_ij[1] + 0.5)) \
        * image.spacing[0]
    ring = np.abs(distance_mm - diameter_mm / 2) <= 2 * image.spacing[0]
    cross = distance_mm <= 7 / across * image.spacing[0]
    assert ring.sum() > 50 and (ring | cross).all()
    no_circle = save_label_overlays(tmp_path / "plain", "overlays", image, phantom.labels, card)
    assert not (np.asarray(PILImage.open(tmp_path / "plain" / no_circle[0]).convert("RGB")) == MARK_COLOUR).all(
        axis=2).any()


def test_the_lumbar_foramen_markers_get_a_picture_a_side(tmp_path):
    """The foramen markers lie beside the bodies, in parasagittal slices the mid-sagittal picture
    misses: a picture a side, through the middle of that side's markers, each marker a cyan cross
    at its own in-plane position, projected onto it."""
    from SpineKneeSegLib.engine.preprocessing import canonical_orientation
    from SpineKneeSegLib.engine.render import MARK_COLOUR

    card = TASKS["lumbar-foramina"]
    phantom = make_phantom("lumbar-foramina", seed=2)
    points = [{"label": p["label"], "ras": p["ras"], "attributes": {"side": p["side"]}} for p in phantom.points]
    written = save_label_overlays(tmp_path, "overlays", phantom.image, phantom.labels, card, points=points)
    assert written == ["overlays/sagittal-labels.png", "overlays/sagittal-left-markers.png",
                       "overlays/sagittal-right-markers.png"]
    orientation = canonical_orientation(phantom.image, "sagittal")
    shape = orientation.apply(phantom.image.array).shape
    for side in ("left", "right"):
        picture = np.asarray(PILImage.open(tmp_path / f"overlays/sagittal-{side}-markers.png").convert("RGB"))
        across, down = picture.shape[1] / shape[2], picture.shape[0] / shape[1]
        cyan = (picture == MARK_COLOUR).all(axis=2)
        theirs = [p for p in phantom.points if p["side"] == side]
        for point in theirs:  # the cross's centre pixel: where the marker's own voxel lands on the slices
            voxel = np.zeros(phantom.image.array.shape, bool)
            voxel[tuple(int(round(v)) for v in point["ijk"][::-1])] = True
            _, r, c = np.argwhere(orientation.apply(voxel))[0]
            row, col = int((r + 0.5) * down), int((c + 0.5) * across)
            assert cyan[row - 1:row + 2, col - 1:col + 2].any(), (side, point["label"])
    assert not (np.asarray(PILImage.open(tmp_path / written[0]).convert("RGB")) == MARK_COLOUR).all(axis=2).any()


def test_the_overlays_label_boxes_equal_find_objects():
    """The boxes the pictures are cut by, found by projections first (a brain's lesions fill a small
    part of it): the same as scipy's find_objects over the whole map, labels above the card's too."""
    from scipy import ndimage
    from SpineKneeSegLib.engine.render import _label_boxes

    rng = np.random.default_rng(0)
    for _ in range(200):
        array = np.zeros(tuple(rng.integers(1, 12, 3)), np.uint8)
        for value in (1, 2, 3, 4, 9):
            for _ in range(rng.integers(0, 3)):
                array[tuple(rng.integers(0, n) for n in array.shape)] = value
        expected = {v: b for v, b in enumerate(ndimage.find_objects(array, max_label=4), 1) if b is not None}
        assert _label_boxes(array, 4) == expected


def _overlay_by_label(grey, labels, specs, alpha=0.4):
    """The drawing the colour-table pass replaced: a boolean pass per label, in floats."""
    rgb = (grey if grey.ndim == 3 else np.repeat(grey[..., None], 3, axis=2)).astype(np.float32)
    for spec in specs:
        mask = labels == spec.value
        if mask.any():
            colour = np.array(spec.color, dtype=np.float32) * 255
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
            inner = mask.copy()
            inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2]
                                 & mask[1:-1, 2:])
            rgb[mask & ~inner] = colour
    return rgb.clip(0, 255).astype(np.uint8)


def test_the_colour_table_drawing_matches_a_pass_per_label():
    """Blend and outline of every label, labels on the image's edge and values outside the card
    included, within one grey level of the plain per-label drawing (8-bit fixed point rounds)."""
    from SpineKneeSegLib.engine.render import overlay_rgb

    rng = np.random.default_rng(1)
    for card in TASKS.values():
        for _ in range(30):
            grey = rng.integers(0, 256, (40, 50)).astype(np.uint8)
            labels = np.zeros((40, 50), np.uint8)
            for value in range(1, len(card.labels) + 3):
                if rng.random() < 0.6:
                    r, c = rng.integers(0, 39), rng.integers(0, 49)
                    labels[r:r + rng.integers(1, 15), c:c + rng.integers(1, 15)] = value
            drawn = overlay_rgb(grey, labels, card.labels)
            assert np.abs(drawn.astype(int) - _overlay_by_label(grey, labels, card.labels).astype(int)).max() <= 1
            over = overlay_rgb(drawn, labels[::-1].copy(), card.labels)  # a second layer over an RGB picture
            assert np.abs(over.astype(int) - _overlay_by_label(drawn, labels[::-1], card.labels).astype(int)).max() <= 1
