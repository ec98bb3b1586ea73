"""A Dixon export in one series (water, fat, in-phase and opposed-phase images at every position,
as Philips mDixon and some PACS exports hold them): refused without a choice, naming the values
to choose from; --image-type (or a manifest's image_type column) reads one contrast. Before
session 47 the only way out was to export each contrast as a series of its own.

The end-to-end test writes a real MyoSegmenTUM lumbar scan (itself a chemical-shift water-fat
acquisition) as the water images of such a series, beside three other contrasts made from it,
and runs lumbar-foramina on it through the CLI: the labels equal those of the same scan as NIfTI."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image_io import read_image
from test_io import _volume, write_dicom_series

CONTRASTS = ("W", "F", "IN_PHASE", "OPP_PHASE")


def _dixon_series(folder: Path, water: np.ndarray, **kw) -> None:
    """``water`` and three other contrasts (fat: its negative image; in phase: half of it; opposed
    phase: a shuffle of it) in one series, Siemens-style ImageType ORIGINAL/PRIMARY/M/DIXON/<c>."""
    rng = np.random.default_rng(0)
    others = {"F": water.max() - water, "IN_PHASE": water // 2,
              "OPP_PHASE": rng.permutation(water.ravel()).reshape(water.shape)}
    _, uid = write_dicom_series(folder, water, name="w", image_type=("ORIGINAL", "PRIMARY", "M", "DIXON", "W"), **kw)
    for contrast, values in others.items():
        write_dicom_series(folder, values, name=contrast.lower(), series_uid=uid,
                           image_type=("ORIGINAL", "PRIMARY", "M", "DIXON", contrast), **kw)


def test_image_type_picks_one_contrast_of_a_dixon_series(tmp_path):
    volume = _volume((4, 6, 7))
    _dixon_series(tmp_path / "dixon", volume)
    with pytest.raises(InputError, match=r"in one series: a Dixon .* Pick one with --image-type "
                                         r"\((W|F|IN_PHASE|OPP_PHASE)( / (W|F|IN_PHASE|OPP_PHASE)){3}\)"):
        read_image(tmp_path / "dixon")
    water = read_image(tmp_path / "dixon", image_type="w")  # any case
    np.testing.assert_array_equal(water.array, volume)
    assert water.meta["image_type"] == "W" and len(water.meta["dicom_files"]) == 4
    assert "--image-type W: 4 of 16 images kept" in water.meta["warnings"]
    fat = read_image(tmp_path / "dixon", image_type="F")
    np.testing.assert_array_equal(fat.array, volume.max() - volume)
    with pytest.raises(InputError, match=r"no image of the series has ImageType value WATER \(its values: "
                                         r"(W|F|IN_PHASE|OPP_PHASE)(, (W|F|IN_PHASE|OPP_PHASE)){3}\)"):
        read_image(tmp_path / "dixon", image_type="WATER")
    with pytest.raises(InputError, match="DIXON"):  # a value every image has picks them all: still four per position
        read_image(tmp_path / "dixon", image_type="DIXON")
    plain = tmp_path / "plain"
    write_dicom_series(plain, volume, image_type=("ORIGINAL", "PRIMARY", "M", "ND"))
    assert not read_image(plain, image_type="M").meta["warnings"]  # all kept: nothing to say


@pytest.mark.data
@pytest.mark.mrml
def test_a_real_lumbar_scan_in_a_dixon_series_runs_on_the_chosen_contrast(tmp_path):
    from SpineKneeSegLib import cli

    root = data_root()
    case = (root / "spine" / "myosegmentum" / "case01") if root else None
    if case is None or not case.is_dir():
        pytest.skip("MyoSegmenTUM data not available")
    scan = read_image(case / "image.nii.gz")
    water = scan.array.astype(np.int16)
    (tmp_path / "dixon").mkdir()
    _dixon_series(tmp_path / "dixon", water, direction=scan.direction, origin=scan.origin, step=scan.spacing[2],
                  pixel_spacing=(scan.spacing[1], scan.spacing[0]))

    def run(*args) -> int:
        return cli.main(["run", "--task", "lumbar-foramina", *args, "--progress", "none", "--no-dicom-seg"])

    assert run(str(case / "image.nii.gz"), "-o", str(tmp_path / "nifti")) == 0
    assert run(str(tmp_path / "dixon"), "-o", str(tmp_path / "refused")) == 2
    assert not (tmp_path / "refused" / "labels.nii.gz").exists()
    assert run(str(tmp_path / "dixon"), "-o", str(tmp_path / "water"), "--image-type", "W") == 0
    report = json.loads((tmp_path / "water" / "report.json").read_text())
    assert report["inputs"][0]["dicom_series"]["image_type"] == "W"
    reference = read_image(tmp_path / "nifti" / "labels.nii.gz").array
    assert reference.max() == 5  # L1-L5 found
    np.testing.assert_array_equal(read_image(tmp_path / "water" / "labels.nii.gz").array, reference)
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "input", "image_type"], ["water", str(tmp_path / "dixon"), "W"],
                                 ["fat", str(tmp_path / "dixon"), "F"]])
    assert cli.main(["run", "--task", "lumbar-foramina", "--manifest", str(tmp_path / "cases.csv"), "-o",
                     str(tmp_path / "cohort"), "--progress", "none", "--no-dicom-seg", "--workers", "1"]) == 0
    np.testing.assert_array_equal(read_image(tmp_path / "cohort" / "water" / "labels.nii.gz").array, reference)
    fat = json.loads((tmp_path / "cohort" / "fat" / "report.json").read_text())
    assert fat["inputs"][0]["dicom_series"]["image_type"] == "F"
