"""How often the radiograph polarity evidence (SpineKneeSegLib/tasks/xray/polarity.py) decides
right, wrong or not at all, on every JSRT/SCR radiograph in both polarities (the stored inverted
8-bit image; the usual display at 12 bits with collimation bands and burned-in text; at 16 bits)
and on the project's drawn femur and pelvis phantoms (usual display).

    python Training/xray_polarity.py [--phantoms 30]
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
from SpineKneeSegLib.core.datasets import data_root
from SpineKneeSegLib.core.image_io import read_image
from SpineKneeSegLib.tasks.xray.phantom import xray_femur_phantom, xray_pelvis_phantom
from SpineKneeSegLib.tasks.xray.polarity import polarity_evidence


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantoms", type=int, default=30)
    args = parser.parse_args(argv)
    tally = {k: Counter() for k in ("stored inverted, 8 bit", "usual, 12 bit + collimation + text", "usual, 16 bit")}
    hard = []
    root = data_root() / "xray" / "jsrt-scr"
    cases = sorted(p for p in root.glob("JPC*") if p.is_dir())
    for case in cases:
        stored = read_image(case / "image.nii.gz").array.reshape(512, 512).astype(np.float64)
        usual = 255.0 - stored
        collimated = np.pad(usual * 16, ((24, 24), (40, 40)), constant_values=4095)
        collimated[30:46, 60:200] = 4095
        for (name, counter), (array, truth) in zip(tally.items(), ((stored, "invert"), (collimated, "keep"),
                                                                    (usual * 257, "keep"))):
            decision = polarity_evidence(array, 0.7).decision
            counter["right" if decision == truth else "undecided" if decision == "undecided" else "WRONG"] += 1
            if decision != truth:
                hard.append(f"{case.name} ({name}): {decision}")
    print(f"JSRT/SCR, {len(cases)} radiographs")
    print("| version | right | undecided (kept, warned) | wrong |\n|---|---|---|---|")
    for name, counter in tally.items():
        print(f"| {name} | {counter['right']} | {counter['undecided']} | {counter['WRONG']} |")
    print("not right:", "; ".join(hard))
    phantom = Counter(polarity_evidence(p.image.array.reshape(p.image.array.shape[-2:]), p.image.spacing[0]).decision
                      for p in ((xray_femur_phantom if s % 2 else xray_pelvis_phantom)(seed=s)
                                for s in range(args.phantoms)))
    print(f"drawn phantoms (usual display), {args.phantoms}: {dict(phantom)}")


if __name__ == "__main__":
    main()
