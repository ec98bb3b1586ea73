"""The common training loop: overfits a fixed small batch, its checkpoint goes through the weights
registry (SHA256 checked) and runs unchanged through the CLI; a tampered file is refused."""
import json

import numpy as np
import pytest
from slicetrain import TrainConfig, train  # noqa: E402
from SpineKneeSegLib import cli  # noqa: E402
from SpineKneeSegLib.core.image_io import read_image, write_image  # noqa: E402
from SpineKneeSegLib.engine.weights import find_entry, register_model, sha256_of  # noqa: E402
from SpineKneeSegLib.tasks import (
    TASKS,  # noqa: E402
    make_phantom,  # noqa: E402
)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    phantom = make_phantom("xray-femur", seed=5, shape=(128, 128), pixel_mm=2.8)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster than contended ones
    history = train(TASKS["xray-femur"], [(phantom.image, phantom.labels)],
                    TrainConfig(network={"channels": (8, 16, 16)}, epochs=200, lr=3e-3, seed=0,
                                preprocessing={"network_px": 128}),  # stored in the checkpoint
                    models / "xray-femur-test.pt")
    torch.set_num_threads(threads)
    return models, phantom, history


def test_loss_falls_by_half(trained):
    _, _, history = trained
    assert history[-1] <= 0.5 * history[0], history[::10]


@pytest.mark.mrml
def test_registered_weights_run_through_the_cli(trained, tmp_path, monkeypatch, capsys):
    models, phantom, _ = trained
    monkeypatch.setenv("SPINEKNEESEG_MODELS", str(models))
    entry = register_model(models / "xray-femur-test.pt", "xray-femur", "0.0.1", card="none (test)")
    assert find_entry("xray-femur") == entry
    assert json.loads((models / "registry.json").read_text())["models"][0]["sha256"] == entry.sha256
    image_path = tmp_path / "xray.nii.gz"
    write_image(phantom.image, image_path)
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "xray-femur", str(image_path), "-o", str(out), "--progress", "none"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["weights"]["sha256"] == sha256_of(models / "xray-femur-test.pt")
    assert report["weights"]["registry_version"] == "0.0.1"
    pred = read_image(out / "labels.nii.gz").array
    # an overfitted network on its own training image: a geometry slip anywhere would ruin this
    assert _dice(pred == 1, phantom.labels.array == 1) > 0.8

    blob = bytearray((models / "xray-femur-test.pt").read_bytes())
    blob[-10] ^= 0xFF
    (models / "xray-femur-test.pt").write_bytes(bytes(blob))
    assert cli.main(["run", "--task", "xray-femur", str(image_path), "-o", str(tmp_path / "o2")]) == 2
    assert "does not match the registry" in capsys.readouterr().err


def test_level_trainer_takes_corrected_label_maps_from_a_manifest(tmp_path):
    from spine_levels import manifest_label_cases, prepare
    from SpineKneeSegLib.annotation.training_manifest import (
        TrainingCase,
        add_training_case,
    )

    phantom = make_phantom("lumbar-foramina", seed=2)
    write_image(phantom.image, tmp_path / "scan.nii.gz")
    write_image(phantom.labels, tmp_path / "scan.labels.nii.gz")
    manifest = tmp_path / "manifest.csv"
    add_training_case(manifest, TrainingCase("scan", "lumbar-foramina", tmp_path / "scan.nii.gz",
                                             labels=tmp_path / "scan.labels.nii.gz"))
    add_training_case(manifest, TrainingCase("scan", "brain-wmh", tmp_path / "scan.nii.gz",
                                             labels=tmp_path / "scan.labels.nii.gz"))
    (case,) = manifest_label_cases(manifest)
    prepared = prepare(case, 1.4)
    assert prepared.stack.shape == prepared.labels.shape
    assert set(np.unique(prepared.labels)) == {0, 1, 2, 3, 4, 5}


def test_foreground_dice_loss_scores_both_heads():
    """The one soft-Dice core behind every 2D trainer's loss: ~0 for a confident right answer,
    ~1 for a confident wrong one, on sigmoid (one channel per label) and softmax heads alike."""
    import torch
    from slicetrain import dice_ce_loss, foreground_dice_loss, sigmoid_dice_bce_loss

    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:12, 4:12] = 1
    right_sigmoid = (target[:, None].float() * 2 - 1) * 20
    assert foreground_dice_loss(right_sigmoid, target, 1, "sigmoid") < 0.01
    assert foreground_dice_loss(-right_sigmoid, target, 1, "sigmoid") > 0.99
    right_softmax = torch.cat([-right_sigmoid, right_sigmoid], 1)
    assert foreground_dice_loss(right_softmax, target, 1, "softmax") < 0.01
    assert foreground_dice_loss(-right_softmax, target, 1, "softmax") > 0.99
    assert dice_ce_loss(right_softmax, target, 2) < 0.01 and sigmoid_dice_bce_loss(right_sigmoid, target, 1) < 0.01
