"""Text files are UTF-8 whatever the process's locale. Under the C locale (ASCII: what ITK's GDCM
writer leaves set in its process, and as strict as a Windows code page is loose) a reader's
worklist and training manifest with non-ASCII names still read, Excel's byte-order mark included,
and a training case written there reads back."""
from __future__ import annotations

import locale

import numpy as np
import pytest
from SpineKneeSegLib.annotation.training_manifest import TrainingCase, add_training_case, read_training_manifest
from SpineKneeSegLib.annotation.worklist import Worklist
from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.image_io import write_image

BOM = "\ufeff"


@pytest.fixture
def c_locale():
    saved = locale.setlocale(locale.LC_ALL)
    locale.setlocale(locale.LC_ALL, "C")
    try:
        assert locale.getpreferredencoding(False).lower() in ("ansi_x3.4-1968", "ascii", "us-ascii")
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _scan(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(Image(np.zeros((4, 8, 8), np.float32), spacing=(1.0, 1.0, 4.0)), path)
    return path


def test_a_worklist_with_non_ascii_paths_reads_under_the_c_locale(tmp_path, c_locale):
    first = _scan(tmp_path / "Zoë Müller" / "scan.nii.gz")
    second = _scan(tmp_path / "Łukasz" / "lumbar.nii.gz")
    listing = tmp_path / "worklist.csv"
    listing.write_text(f"{BOM}id,image\nzoë,{first}\nłukasz,{second.relative_to(tmp_path)}\n", encoding="utf-8")
    worklist = Worklist.from_path(listing)
    assert [(c.id, c.image) for c in worklist.cases] == [("zoë", first), ("łukasz", second)]


def test_a_training_manifest_with_non_ascii_ids_round_trips_under_the_c_locale(tmp_path, c_locale):
    scan = _scan(tmp_path / "Zoë" / "scan.nii.gz")
    labels = _scan(tmp_path / "Zoë" / "labels.nii.gz")
    manifest = tmp_path / "training.csv"
    manifest.write_text(f"{BOM}id,task,image,labels\nzoë-1,lumbar-foramina,{scan},{labels}\n", encoding="utf-8")
    (case,) = read_training_manifest(manifest)
    assert (case.id, case.image, case.labels) == ("zoë-1", scan, labels)
    add_training_case(manifest, TrainingCase("łukasz-2", "lumbar-foramina", scan, None, labels))
    assert [c.id for c in read_training_manifest(manifest)] == ["zoë-1", "łukasz-2"]
    assert "łukasz-2" in manifest.read_text(encoding="utf-8")
