"""Write the small real sample scans shipped in SpineKneeSeg/Resources/SampleData (issue 23, part 5)
from the shared data folder — the only data copied into the repository, each openly licensed and
attributed in that folder's README.md.

    python Training/make_sample_data.py [--data ../shared/data]

lumbar: MyoSegmenTUM case01 (image + L1-L5 labels, as stored: 20 x 224 x 224 uint8);
knee: the pymskt multi-echo T2 series, echo 1 only, as int16 NIfTI;
brain: open-ms patient07 FLAIR + lesion mask, cropped to the brain's box, FLAIR as int16 (x10).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from SpineKneeSegLib.core.datasets import data_root  # noqa: E402
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.core.image_io import read_image, write_image  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "SpineKneeSeg" / "Resources" / "SampleData"


def crop(image: Image, box: tuple[slice, ...]) -> Image:
    """The sub-volume ``box`` (k, j, i) with its origin moved so every voxel keeps its position
    (a 3D box; preprocessing.crop_in_plane crops rows and columns only)."""
    origin = image.ijk_to_lps_points([[s.start for s in box][::-1]])[0]
    return Image(np.ascontiguousarray(image.array[box]), image.spacing, tuple(origin), image.direction)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path)
    args = parser.parse_args(argv)
    root = args.data or data_root()
    if root is None:
        print("no shared data folder: set SPINEKNEESEG_DATA", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    spine = root / "spine" / "myosegmentum" / "case01"
    write_image(read_image(spine / "image.nii.gz"), OUT / "lumbar-myosegmentum-case01.nii.gz")
    write_image(read_image(spine / "vertebrae.nii.gz"), OUT / "lumbar-myosegmentum-case01-labels.nii.gz")
    knee = read_image(root / "knee" / "mese-t2-dicom")  # echo 1 of the multi-echo series
    write_image(Image(knee.array.astype(np.int16), knee.spacing, knee.origin, knee.direction),
                OUT / "knee-mese-t2-echo1.nii.gz")
    flair = read_image(root / "brain" / "open-ms" / "patient07" / "flair.nii.gz")
    lesions = read_image(root / "brain" / "open-ms" / "patient07" / "lesions.nii.gz")
    inside = np.argwhere(flair.array != 0)
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(inside.min(0), inside.max(0)))
    scaled = flair.with_array(np.round(flair.array * 10).clip(-32768, 32767).astype(np.int16))
    write_image(crop(scaled, box), OUT / "brain-openms-patient07-flair.nii.gz")
    write_image(crop(lesions.with_array(lesions.array.astype(np.uint8)), box),
                OUT / "brain-openms-patient07-lesions.nii.gz")
    for f in sorted(OUT.glob("*.nii.gz")):
        print(f"{f.name}: {f.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
