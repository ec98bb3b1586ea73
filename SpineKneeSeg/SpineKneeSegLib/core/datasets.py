"""Where the shared real imaging data lives (never inside the repository)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "SPINEKNEESEG_DATA"
# SpineKneeSeg/SpineKneeSegLib/ -> the repository root is two folders above the package
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # SpineKneeSegLib/
_REPO_ROOT = PACKAGE_DIR.parents[1]


def data_root() -> Path | None:
    """The data folder: $SPINEKNEESEG_DATA, else <repo>/../shared/data, else ./../shared/data;
    None when the chosen folder does not exist (tests then skip)."""
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else [_REPO_ROOT.parent / "shared" / "data",
                                          Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


# ---- small real samples shipped with the module (Resources/SampleData; README.md there) ----------

@dataclass(frozen=True)
class Sample:
    name: str  # as Slicer's Sample Data module shows it
    task: str
    image: str  # file in the sample folder
    labels: str | None  # the dataset's reference labels, when it has any
    source: str  # dataset, licence
    seen_in_training: str  # whether the shipped model was trained on it (a demo must say so)


SAMPLES = (
    Sample("SpineKneeSeg lumbar T1 (MyoSegmenTUM case01)", "lumbar-foramina", "lumbar-myosegmentum-case01.nii.gz",
           "lumbar-myosegmentum-case01-labels.nii.gz", "MyoSegmenTUM spine (Burian et al. 2019), CC BY 4.0",
           "yes: one of the 54 scans every lumbar-levels model from v0.2.0 on was trained on (cross-validated figures: its card)"),
    Sample("SpineKneeSeg knee multi-echo T2, echo 1 (pymskt)", "knee-bones", "knee-mese-t2-echo1.nii.gz", None,
           "pymskt demo data (Gatti et al.), MIT",
           "no: the knee model was trained on synthetic images only and has no labels for this scan"),
    Sample("SpineKneeSeg brain FLAIR (open-ms patient07)", "brain-wmh", "brain-openms-patient07-flair.nii.gz",
           "brain-openms-patient07-lesions.nii.gz", "open-ms (Lesjak et al. 2018), CC BY",
           "yes: one of the 3 volumes brain-wmh was trained on (its leave-one-out figures are in the card)"),
)


def resources_dir() -> Path:
    """The module's Resources/ beside the package (Slicer module, source tree), or the wheel's
    copy of it, ``SpineKneeSegLib/_resources``."""
    beside = PACKAGE_DIR.parent / "Resources"
    return beside if beside.is_dir() else PACKAGE_DIR / "_resources"


def sample_dir() -> Path:
    return resources_dir() / "SampleData"


def samples_for(task: str) -> list[Sample]:
    return [s for s in SAMPLES if s.task == task and (sample_dir() / s.image).exists()]


def sample_data_sources() -> list[dict]:
    """Keyword arguments for Slicer's SampleDataLogic.registerCustomSampleDataSource, one per
    sample (local files, so nothing is downloaded)."""
    icon = sample_dir().parent / "Icons" / "SpineKneeSeg.png"
    return [{"category": "SpineKneeSeg", "sampleName": s.name, "uris": (sample_dir() / s.image).as_uri(),
             "fileNames": s.image, "nodeNames": s.image.split(".")[0], "thumbnailFileName": str(icon),
             "loadFileType": "VolumeFile"} for s in SAMPLES if (sample_dir() / s.image).exists()]
