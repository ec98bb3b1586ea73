"""Tasks plug in (issue 23, part 2): post-processing steps are registered by the modules that own
them, the pipeline runs a card's steps without knowing any by name, an unknown step is refused
when the card is registered, and a new task is a card + its steps, run end to end by the CLI."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from SpineKneeSegLib import pipeline
from SpineKneeSegLib.image import Image
from SpineKneeSegLib.labels import LabelSpec
from SpineKneeSegLib.steps import STEPS, StepContext, step
from SpineKneeSegLib.tasks import TASKS, InputSpec, register

LIB = Path(pipeline.__file__).parent


def test_every_cards_steps_are_registered_and_the_pipeline_names_none():
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


@pytest.fixture
def toy_task():
    """A task of two labels with one step of its own: a card, a step, a drawn phantom — nothing else."""
    @step("toy_blob_count")
    def count_blobs(ctx: StepContext) -> None:
        from scipy import ndimage

        ctx.result.summaries["toy_blob_count"] = {
            name: int(ndimage.label(ctx.result.labels.array == value)[1]) for value, name in ctx.card.label_names.items()}

    base = TASKS["brain-wmh"]
    card = replace(base, name="toy-blobs", title="Toy blobs", description="two blob classes",
                   inputs=(InputSpec("image", "MR", 3),), weights_entry="toy-blobs", weights_with_input=(),
                   labels=(LabelSpec(1, "blob a", (1.0, 0.0, 0.0)), LabelSpec(2, "blob b", (0.0, 1.0, 0.0))),
                   label_activation="softmax", postprocessors=("toy_blob_count", "volume_table"),
                   outputs=("labels.nii.gz", "segmentation.seg.nrrd", "report.json", "volumes.tsv"),
                   warn_missing_labels=True, issue=None)
    register(card)
    yield card
    TASKS.pop(card.name, None)
    STEPS.pop("toy_blob_count", None)


@pytest.mark.mrml
def test_a_new_task_is_a_card_and_its_step_run_end_to_end_by_the_cli(toy_task, tmp_path):
    from SpineKneeSegLib import cli
    from SpineKneeSegLib.io import write_image
    from SpineKneeSegLib.weights import initialise_weights

    rng = np.random.default_rng(0)
    array = rng.normal(0, 0.1, (12, 64, 64)).astype(np.float32)
    array[3:9, 10:25, 10:25] += 1.0
    array[3:9, 40:55, 40:55] += 2.0
    write_image(Image(array, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0)), tmp_path / "toy.nii.gz")
    initialise_weights("toy-blobs", tmp_path / "toy.pt", {"channels": (4, 8)}, seed=2)
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "toy-blobs", str(tmp_path / "toy.nii.gz"), "-o", str(out),
                     "--weights", str(tmp_path / "toy.pt"), "--progress", "none"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["summaries"]["toy_blob_count"]) == {"blob a", "blob b"}
    assert (out / "volumes.tsv").exists() and (out / "segmentation.seg.nrrd").exists()
