"""Tasks plug in (issue 23, part 2): post-processing steps are registered by the modules that own
them, the pipeline runs a card's steps without knowing any by name, an unknown step is refused
when the card is registered, and a new task is a card + its steps, run end to end by the CLI."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from SpineKneeSegLib.engine import pipeline
from SpineKneeSegLib.engine.cards import register
from SpineKneeSegLib.engine.steps import STEPS, step
from SpineKneeSegLib.tasks import TASKS

LIB = Path(pipeline.__file__).parent


def test_every_cards_steps_are_registered_and_the_pipeline_names_none():
    assert len(TASKS) >= 5
    for card in TASKS.values():
        assert all(name in STEPS for name in card.postprocessors), card.name
    source = (LIB / "pipeline.py").read_text()
    for name in STEPS:  # no step, and no task, is special-cased by name in the engine
        assert f'"{name}"' not in source, name
    for card in TASKS:
        assert f'"{card}"' not in source, card


def test_a_card_with_an_unknown_step_is_refused_when_registered():
    card = replace(TASKS["brain-wmh"], name="toy-unknown-step", postprocessors=("no_such_step",))
    with pytest.raises(ValueError, match="no_such_step"):
        register(card)
    assert "toy-unknown-step" not in TASKS


def test_a_step_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="registered twice"):
        step("volume_table")(lambda ctx: None)


TOY_TASK = '''"""A toy task: two blob classes, one step of its own, its own phantom: one folder."""
import numpy as np
from scipy import ndimage

from SpineKneeSegLib.core.image import Image
from SpineKneeSegLib.core.phantoms import Phantom
from SpineKneeSegLib.engine.cards import COMMON_OUTPUTS, InputSpec, NetworkSpec, Preprocessing, TaskCard, register
from SpineKneeSegLib.core.labels import LabelSpec
from SpineKneeSegLib.engine.steps import StepContext, step


@step("toy_blob_count")
def count_blobs(ctx: StepContext) -> None:
    ctx.result.summaries["toy_blob_count"] = {
        name: int(ndimage.label(ctx.result.labels.array == value)[1]) for value, name in ctx.card.label_names.items()}


def toy_phantom(seed=0):
    rng = np.random.default_rng(seed)
    array = rng.normal(0, 0.1, (12, 64, 64)).astype(np.float32)
    labels = np.zeros(array.shape, np.uint8)
    labels[3:9, 10:25, 10:25], labels[3:9, 40:55, 40:55] = 1, 2
    array += labels
    geometry = ((1.0, 1.0, 3.0), (0.0, 0.0, 0.0))
    return Phantom("toy-blobs", Image(array, *geometry), Image(labels, *geometry))


register(TaskCard(
    name="toy-blobs", title="Toy blobs", description="two blob classes", modality="MR",
    inputs=(InputSpec("image", "MR", 3),), preprocessing=Preprocessing(plane="axial", min_slices=3),
    network=NetworkSpec("unet2d", {"channels": (4, 8), "activation": "relu", "norm": "batch"}),
    weights_entry="toy-blobs",
    labels=(LabelSpec(1, "blob a", (1.0, 0.0, 0.0)), LabelSpec(2, "blob b", (0.0, 1.0, 0.0))),
    postprocessors=("toy_blob_count", "volume_table"), outputs=COMMON_OUTPUTS + ("volumes.tsv",),
    phantom=toy_phantom,
))
'''


@pytest.fixture
def toy_package(tmp_path):
    """A copy of the package with the toy task added as the issue says a task is added: one folder
    under tasks/ and one name in tasks/__init__.py's import line; nothing else is edited."""
    copy = tmp_path / "site" / "SpineKneeSegLib"
    shutil.copytree(LIB.parent, copy, ignore=shutil.ignore_patterns("__pycache__", "_resources"))
    (copy / "tasks" / "toy").mkdir()
    (copy / "tasks" / "toy" / "__init__.py").write_text(TOY_TASK)
    init = copy / "tasks" / "__init__.py"
    line = "from SpineKneeSegLib.tasks import knee, spine, brain, xray"
    assert line in init.read_text()
    init.write_text(init.read_text().replace(line, line + ", toy"))
    return copy.parent


def _cli(site: Path, *args, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(site), "SPINEKNEESEG_MODELS": str(cwd)}
    return subprocess.run([sys.executable, "-m", "SpineKneeSegLib.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.mrml
@pytest.mark.slow
def test_a_new_task_is_one_folder_and_one_import_line_run_end_to_end_by_the_cli(toy_package, tmp_path):
    listing = _cli(toy_package, "tasks", "--json", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "toy-blobs" in [t["task"] for t in json.loads(listing.stdout)]
    make = ("from SpineKneeSegLib.tasks import make_phantom; from SpineKneeSegLib.core.image_io import write_image; "
            "from SpineKneeSegLib.engine.weights import initialise_weights; "
            "write_image(make_phantom('toy-blobs').image, 'toy.nii.gz'); "
            "initialise_weights('toy-blobs', 'toy.pt', {'channels': (4, 8)}, seed=2)")
    made = subprocess.run([sys.executable, "-c", make], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(toy_package)},
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    run = _cli(toy_package, "run", "--task", "toy-blobs", "toy.nii.gz", "-o", "out", "--weights", "toy.pt",
               "--progress", "none", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["summaries"]["toy_blob_count"]) == {"blob a", "blob b"}
    assert (tmp_path / "out" / "volumes.tsv").exists() and (tmp_path / "out" / "segmentation.seg.nrrd").exists()
