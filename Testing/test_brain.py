"""Brain WMH (seed 002) pieces: attention U-Net, brain-box inference, slab simulation, focal
Tversky loss and the seed's and WMH-2017's metrics on constructed cases with known answers."""

import numpy as np
import pytest
import torch
from brain_wmh import focal_tversky_loss, simulate_slabs, slice_entropy_bits  # noqa: E402
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.engine.inference import segment_slices  # noqa: E402
from SpineKneeSegLib.engine.models import AttentionGate, build_network  # noqa: E402
from SpineKneeSegLib.tasks import (
    TASKS,  # noqa: E402
    make_phantom,  # noqa: E402
)
from wmh_metrics import (  # noqa: E402
    hd95_mm,
    lesion_detection_by_bracket,
    voxel_metrics,
    wmh2017_metrics,
)

CARD = TASKS["brain-wmh"]


def _net(**over):
    torch.manual_seed(0)
    config = {**CARD.network.config, "in_channels": 3, "out_channels": CARD.output_channels,
              "channels": (4, 8, 8), **over}
    return build_network(CARD.network.factory, config).eval()


def test_attention_gates_are_in_the_network_and_change_its_output():
    net = _net()
    assert sum(isinstance(m, AttentionGate) for m in net.modules()) == 2
    plain = _net(attention=False)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "gates" not in k})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert net(x).shape == plain(x).shape == (2, 1, 32, 32)
        assert not torch.allclose(net(x), plain(x))


def test_inference_runs_only_inside_the_brain_box():
    phantom = make_phantom("brain-wmh", seed=1)
    # the phantom's brain fills its field of view: put 16 voxels of zero background around it
    pad = 16
    origin = phantom.image.ijk_to_lps_points([[-pad, -pad, -pad]])[0]
    image = Image(np.pad(phantom.image.array, pad), phantom.image.spacing, tuple(origin), phantom.image.direction)
    lo = np.percentile(image.array, 1)
    background = image.array <= lo + 0.10 * (np.percentile(image.array, 99) - lo)
    assert background.mean() > 0.4
    net = _net()
    # a network that calls everything lesion shows exactly where it was run
    with torch.no_grad():
        net.head.bias.fill_(100.0)
        net.head.weight.zero_()
    labels = segment_slices(CARD, image, net, torch.device("cpu")).labels
    brain = ~background
    assert labels[brain].all()
    covered = labels > 0
    empty_slices = ~brain.any(axis=(1, 2))
    assert not covered[empty_slices].any()
    assert covered.sum() < 0.8 * covered.size, "background outside the box was run"
    full = segment_slices(CARD, image, net, torch.device("cpu"), {"crop_foreground": False}).labels
    assert full.all()


def test_slabs_keep_physical_positions():
    spacing = (1.0, 1.0, 1.0)
    direction = np.diag([1.0, 1.0, 1.0])
    array = np.zeros((60, 20, 20), np.float32)
    labels = np.zeros_like(array, dtype=np.uint8)
    labels[30:38, 8:12, 8:12] = 1  # an 8 mm tall lesion centred at k = 33.5
    array[labels > 0] = 1.0
    image = Image(array, spacing, (0.0, 0.0, -10.0), direction)
    slab, slab_labels = simulate_slabs(image, labels, 7.5)
    assert slab.spacing[2] == 7.5 and slab.array.shape == (8, 20, 20)
    truth_centre = image.ijk_to_lps_points([[9.5, 9.5, 33.5]])[0]
    kji = np.argwhere(slab_labels > 0).mean(0)
    slab_centre = slab.ijk_to_lps_points([kji[::-1]])[0]
    assert abs(slab_centre[2] - truth_centre[2]) <= 3.75  # within half a slab
    # slab 0 averages slices 0..7 (centres 0..7 mm): its centre lies at 3.25 mm above slice 0
    assert np.isclose(slab.origin[2] - image.origin[2], 3.25)
    # another slab phase (training sees several): slab 0 starts 3 mm up, same lesion position
    shifted, shifted_labels = simulate_slabs(image, labels, 7.5, offset_mm=3.0)
    assert np.isclose(shifted.origin[2] - image.origin[2], 6.25) and shifted.array.shape == (7, 20, 20)
    kji = np.argwhere(shifted_labels > 0).mean(0)
    assert abs(shifted.ijk_to_lps_points([kji[::-1]])[0][2] - truth_centre[2]) <= 3.75
    # slab 3 spans 25.5..33 mm: slices 26..32, of which 30..32 are lesion
    assert np.isclose(shifted.array[3, 10, 10], 3 / 7)


def test_entropy_drops_empty_slices():
    stack = np.zeros((3, 32, 32), np.float32)
    stack[1] = np.random.default_rng(0).normal(size=(32, 32))
    bits = slice_entropy_bits(stack)
    assert bits[0] == 0 and bits[2] == 0 and bits[1] > 2


def test_focal_tversky_penalises_misses_more_than_false_alarms():
    target = torch.zeros(1, 1, 10, 10)
    target[..., :5, :] = 1
    miss = torch.full_like(target, -20.0)
    miss[..., :2, :] = 20.0  # finds 2 of 5 rows
    alarm = torch.full_like(target, -20.0)
    alarm[..., :8, :] = 20.0  # finds all and 3 rows extra
    args = (0.85, 0.15, 4 / 3, 2.0)
    assert focal_tversky_loss(miss, target, *args) > focal_tversky_loss(alarm, target, *args)
    assert focal_tversky_loss(target * 40 - 20, target, *args) < 1e-3


def test_metrics_on_known_lesions():
    truth = np.zeros((20, 40, 40), np.uint8)
    truth[5:10, 5:10, 5:10] = 1  # 125 voxels: bracket [10,400)
    truth[15, 30, 30] = 1  # 1 voxel: [0,10)
    pred = np.zeros_like(truth)
    pred[5:10, 5:10, 5:8] = 1  # 75 of 125 = 60 %: not "> 60 %" -> not detected (seed 002)
    pred[2, 35, 35] = 1  # a false positive lesion
    brackets = lesion_detection_by_bracket(pred, truth)
    assert brackets["[10,400)"] == {"lesions": 1, "detected": 0, "any_overlap": 1}  # touched, not > 60 %
    assert brackets["[0,10)"] == {"lesions": 1, "detected": 0, "any_overlap": 0}
    pred[5:10, 5:10, 8] = 1  # 100 of 125
    assert lesion_detection_by_bracket(pred, truth)["[10,400)"]["detected"] == 1
    wmh = wmh2017_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert wmh["lesion_recall"] == 0.5  # the big one touched, the speck missed
    assert wmh["true_lesions"] == 2 and wmh["predicted_lesions"] == 2
    assert np.isclose(wmh["lesion_f1"], 0.5)  # precision 1/2, recall 1/2
    assert np.isclose(wmh["avd_percent"], 100 * abs(101 - 126) / 126)
    v = voxel_metrics(pred, truth)
    assert np.isclose(v["precision"], 100 / 101) and np.isclose(v["recall"], 100 / 126)
    assert np.isclose(v["dice"], 200 / 227)


def test_hd95_of_a_shifted_cube_is_the_shift():
    a = np.zeros((30, 30, 30), bool)
    b = np.zeros_like(a)
    a[10:20, 10:20, 10:20] = True
    b[10:20, 10:20, 13:23] = True  # shifted 3 voxels along i (spacing 2 mm there)
    assert hd95_mm(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)


def test_lesion_table_is_exact_on_a_phantom_with_every_bracket():
    from SpineKneeSegLib.engine.preprocessing import slice_axis
    from SpineKneeSegLib.tasks.brain.lesions import bracket_name, lesion_table

    phantom = make_phantom("brain-wmh", seed=2)
    table, summary = lesion_table(phantom.labels.array, phantom.image,
                                  slice_axis=slice_axis(phantom.image, "axial"))
    truth = sorted(phantom.extra["lesions"], key=lambda les: -les["voxels"])
    assert [r["voxels"] for r in table.rows] == [les["voxels"] for les in truth]
    assert {bracket_name(les["voxels"]) for les in truth} == {"[0,10)", "[10,400)", "[400,1000)", "[1000,inf)"}
    voxel_mm3 = float(np.prod(phantom.image.spacing))
    for row, les in zip(table.rows, truth):
        if sum(r["voxels"] == les["voxels"] for r in table.rows) > 1:
            continue  # equal sizes: order between them is not defined
        assert np.allclose([row["centroid_r"], row["centroid_a"], row["centroid_s"]], les["centroid_ras"], atol=0.006)
        assert row["bracket"] == bracket_name(les["voxels"])
        assert row["volume_mm3"] == pytest.approx(les["voxels"] * voxel_mm3, abs=1e-3)
        inst = phantom.extra["instances"] == les["id"]
        assert row["mean_flair"] == pytest.approx(float(phantom.image.array[inst].mean()), abs=1e-3)
    assert summary["lesion_count"] == len(truth)
    assert summary["total_lesion_load_ml"] == pytest.approx(sum(les["voxels"] for les in truth) * voxel_mm3 / 1000,
                                                            abs=1e-4)
    for name, entry in summary["brackets"].items():
        assert entry["count"] == sum(bracket_name(les["voxels"]) == name for les in truth)


@pytest.mark.mrml
def test_cli_on_thick_slice_anisotropic_flair(tmp_path):
    """0.5 x 0.5 x 7 mm FLAIR (common clinically): every output on the input's own grid. A tiny
    untrained network: this checks the plumbing and geometry, the model card has the accuracy."""
    import json

    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import read_image, write_image
    from SpineKneeSegLib.engine.weights import initialise_weights
    from SpineKneeSegLib.tasks.brain.phantom import brain_phantom

    phantom = brain_phantom(3, slice_thickness_mm=7.0, pixel_mm=0.5, in_plane=416)
    write_image(phantom.image, tmp_path / "flair.nii.gz")
    initialise_weights("brain-wmh", tmp_path / "w.pt", {"channels": (4, 8)}, seed=1)
    out = tmp_path / "out"
    assert cli.main(["run", "--task", "brain-wmh", str(tmp_path / "flair.nii.gz"), "-o", str(out),
                     "--weights", str(tmp_path / "w.pt"), "--progress", "none"]) == 0
    labels = read_image(out / "labels.nii.gz")
    assert labels.array.shape == (21, 416, 416) and labels.same_geometry(phantom.image)
    header = (out / "lesions.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["lesion_id", "voxels", "volume_mm3", "depth_slices", "centroid_r", "centroid_a", "centroid_s",
                      "bbox", "bracket", "mean_flair"]
    report = json.loads((out / "report.json").read_text())
    assert set(report["summaries"]["lesions"]["brackets"]) == {"[0,10)", "[10,400)", "[400,1000)", "[1000,inf)"}
    assert (out / "segmentation.seg.nrrd").exists()


def test_resample_onto_keeps_physical_positions():
    from SpineKneeSegLib.engine.preprocessing import resample_onto

    reference = Image(np.zeros((40, 60, 60), np.float32), (1.0, 1.0, 1.0), (-30.0, -30.0, -20.0))
    moving = np.zeros((20, 25, 25), np.float32)
    moving[8:12, 10:14, 10:14] = 100.0  # a 8 mm cube on a 2 mm grid whose origin is elsewhere
    t1 = Image(moving, (2.0, 2.0, 2.0), (-26.0, -24.0, -22.0))
    out = resample_onto(t1, reference)
    assert out.same_geometry(reference)
    centre_moving = t1.ijk_to_lps_points([np.argwhere(moving > 50).mean(0)[::-1]])[0]
    centre_out = out.ijk_to_lps_points([np.argwhere(out.array > 50).mean(0)[::-1]])[0]
    assert np.allclose(centre_moving, centre_out, atol=0.6)


def test_weights_with_a_t1_channel_need_the_t1_and_use_it(tmp_path, capsys):
    """Weights trained with --t1 take 3 FLAIR + 3 T1 channels; the T1 (another grid) is resampled
    onto the FLAIR; without a T1 the run stops with a clear message."""
    import json

    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.inference import _batches, load_network
    from SpineKneeSegLib.engine.preprocessing import resample_onto
    from SpineKneeSegLib.engine.weights import initialise_weights, resolve_weights
    from SpineKneeSegLib.tasks.brain.phantom import brain_phantom

    flair = brain_phantom(2, slice_thickness_mm=5.0).image
    t1 = Image(flair.array[:, ::2, ::2].max() - flair.array[:, ::2, ::2], (4.0, 4.0, 5.0), flair.origin,
               flair.direction)  # darker lesions, half the in-plane resolution
    write_image(flair, tmp_path / "flair.nii.gz")
    write_image(t1, tmp_path / "t1.nii.gz")
    initialise_weights("brain-wmh", tmp_path / "w.pt", {"channels": (4, 8)}, seed=1,
                       preprocessing={"extra_inputs": ["t1"]})
    base = ["run", "--task", "brain-wmh", "--weights", str(tmp_path / "w.pt"), "--progress", "none"]
    assert cli.main(base + [str(tmp_path / "flair.nii.gz"), "-o", str(tmp_path / "no-t1")]) == 2
    assert "take t1 as well" in capsys.readouterr().err and not (tmp_path / "no-t1").exists()
    assert cli.main(base + [str(tmp_path / "flair.nii.gz"), str(tmp_path / "t1.nii.gz"), "-o", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert not [w for w in report["warnings"] if "not used" in w]
    # the T1 channels reach the network: another T1 gives other logits
    weights = resolve_weights(CARD, tmp_path / "w.pt")
    net = load_network(weights, torch.device("cpu"))
    pre = {**CARD.preprocessing.__dict__, **weights.preprocessing}
    timings = {"pre": 0.0, "net": 0.0, "post": 0.0}
    on_grid = resample_onto(t1, flair)
    with torch.no_grad():
        a = next(_batches(flair, net, torch.device("cpu"), pre, 4, None, timings, extra=(on_grid,)))[1]
        b = next(_batches(flair, net, torch.device("cpu"), pre, 4, None, timings,
                          extra=(on_grid.with_array(on_grid.array[:, ::-1].copy()),)))[1]
    assert a.shape[1] == 1 and not torch.allclose(a, b)


def test_a_registered_t1_model_is_used_when_a_t1_is_given(tmp_path, monkeypatch, capsys):
    """Without --weights: FLAIR alone runs the brain-wmh entry; FLAIR + T1 runs brain-wmh-t1 when
    it is registered (weights_with_input), else brain-wmh with a 'not used' warning."""
    import json

    from SpineKneeSegLib import cli
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.weights import initialise_weights, register_model
    from SpineKneeSegLib.tasks.brain.phantom import brain_phantom

    flair = brain_phantom(3, slice_thickness_mm=5.0).image
    write_image(flair, tmp_path / "flair.nii.gz")
    write_image(flair.with_array(flair.array.max() - flair.array), tmp_path / "t1.nii.gz")
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("SPINEKNEESEG_MODELS", str(models))
    initialise_weights("brain-wmh", models / "flair-only.pt", {"channels": (4, 8)}, seed=1)
    register_model(models / "flair-only.pt", "brain-wmh", "0.0.1", card="none (test)")

    def run(*inputs, out):
        assert cli.main(["run", "--task", "brain-wmh", *map(str, inputs), "-o", str(tmp_path / out),
                         "--progress", "none"]) == 0
        return json.loads((tmp_path / out / "report.json").read_text())

    report = run(tmp_path / "flair.nii.gz", tmp_path / "t1.nii.gz", out="no-t1-model")
    assert report["weights"]["path"].endswith("flair-only.pt")
    assert any("not used" in w for w in report["warnings"])
    initialise_weights("brain-wmh", models / "with-t1.pt", {"channels": (4, 8)}, seed=2,
                       preprocessing={"extra_inputs": ["t1"]})
    register_model(models / "with-t1.pt", "brain-wmh-t1", "0.0.1", card="none (test)")
    report = run(tmp_path / "flair.nii.gz", tmp_path / "t1.nii.gz", out="t1-model")
    assert report["weights"]["path"].endswith("with-t1.pt") and report["weights"]["registered"]
    assert not any("not used" in w for w in report["warnings"])
    assert run(tmp_path / "flair.nii.gz", out="flair")["weights"]["path"].endswith("flair-only.pt")
    capsys.readouterr()


def test_trainer_with_t1_writes_weights_the_pipeline_runs(tmp_path):
    """A 2-epoch run of Training/brain_wmh.py's train() on phantom cases with --t1: real files in,
    a checkpoint whose channels and extra_inputs the product's inference accepts."""
    from brain_wmh import Config, train
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.inference import load_network
    from SpineKneeSegLib.engine.weights import resolve_weights
    from SpineKneeSegLib.tasks.brain.phantom import brain_phantom

    cases = []
    for seed in (4, 5):
        ph = brain_phantom(seed, slice_thickness_mm=4.0)
        folder = tmp_path / f"case{seed}"
        folder.mkdir()
        write_image(ph.image, folder / "flair.nii.gz")
        write_image(ph.image.with_array(ph.image.array.max() - ph.image.array), folder / "t1.nii.gz")
        write_image(ph.labels, folder / "lesions.nii.gz")
        cases.append({"id": f"case{seed}", "flair": folder / "flair.nii.gz", "t1": folder / "t1.nii.gz",
                      "labels": folder / "lesions.nii.gz"})
    cfg = Config(epochs=2, steps_per_epoch=2, batch_size=2, patch=64, slab_mm="8", t1=True)
    info = train(cfg, cases, tmp_path / "run", log=lambda _: None)
    assert info["epochs"] == 2
    weights = resolve_weights(CARD, tmp_path / "run" / "best.pt")
    assert weights.preprocessing == {"extra_inputs": ["t1"]}
    assert weights.checkpoint["network"]["config"]["in_channels"] == 6
    net = load_network(weights, torch.device("cpu"))
    flair = brain_phantom(6, slice_thickness_mm=4.0).image
    labels = segment_slices(CARD, flair, net, torch.device("cpu"), weights.preprocessing,
                            extra=(flair.with_array(flair.array.max() - flair.array),)).labels
    assert labels.shape == flair.array.shape
