"""Knee label-map synthesis and trainer (Training/knee_synth.py, Training/knee_bones.py).

The label volumes here come from the knee phantom written to a real .nrrd file and prepared by the
same SimpleITK code as the shared label maps; nothing is mocked."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

TRAINING = Path(__file__).resolve().parents[1] / "Training"
import knee_data as kd  # noqa: E402
import knee_train as kt  # noqa: E402
import knee_average as ka  # noqa: E402
import knee_eval as ke  # noqa: E402
import knee_card as kc  # noqa: E402
import knee_synth as ks  # noqa: E402
from SpineKneeSegLib.core.image_io import write_image  # noqa: E402
from SpineKneeSegLib.engine.weights import register_model, resolve_weights  # noqa: E402
from SpineKneeSegLib.tasks import (
    TASKS,  # noqa: E402
    make_phantom,  # noqa: E402
)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("knee-maps")
    out = []
    for seed, side in ((0, "right"), (1, "left")):
        phantom = make_phantom("knee-bones", seed=seed, knee_side=side, shape=(40, 160, 160), spacing=(0.8, 0.8, 2.0))
        path = folder / f"phantom-{side}.nrrd"
        write_image(phantom.labels, path)
        out.append((kd.prepare_volume(path, {1: 1, 2: 2, 3: 3, 4: 4}, 1.0), phantom))
    return out


def test_prepared_volume_keeps_bones_and_finds_the_joint(volumes):
    for vol, phantom in volumes:
        voxel_ml = np.prod(phantom.labels.spacing) / 1000
        truth_ml = [float((phantom.labels.array == v).sum()) * voxel_ml for v in (1, 2, 3, 4)]
        got_ml = [float((vol.labels == v).sum()) * vol.spacing_mm ** 3 / 1000 for v in (1, 2, 3, 4)]
        assert np.allclose(got_ml, truth_ml, rtol=0.1), (got_ml, truth_ml)
        # the phantom's joint centre is RAS; ours LPS. The joint line (S) is well defined; across
        # the joint ours is the mean of the bones near it, the phantom's its own construction point
        ras = np.asarray(phantom.extra["joint_centre_ras"])
        lps = np.asarray(vol.joint_centre_lps) * np.array([-1, -1, 1])
        assert abs(lps[2] - ras[2]) < 2.0 and np.linalg.norm(lps[:2] - ras[:2]) < 10.0, (lps, ras)


def test_synthetic_slices_are_deterministic_normalised_and_labelled(volumes):
    vol = volumes[0][0]
    cfg = ks.SynthConfig(network_px=96)
    a = ks.synthesise(vol, cfg, torch.Generator().manual_seed(4))
    b = ks.synthesise(vol, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = ks.synthesise_batch([vol], cfg, torch.Generator().manual_seed(5), 12)
    assert x.shape == (12, 1, 96, 96) and y.shape == (12, 96, 96)
    assert torch.isfinite(x).all()
    assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3, 4} and (y > 0).any()
    assert abs(float(x.mean())) < 1.0  # z-scored (plus the jitter)


def test_synthetic_series_lands_on_the_label_map_voxels(volumes):
    """Without elastic displacement every voxel of a synthetic series carries the label found at
    its LPS position in the prepared volume: the geometry handed to inference is exact."""
    vol = volumes[0][0]
    s = ks.synthesise_volume(vol, ks.SynthConfig(elastic_mm=0.0, rotation_deg=(0.0, 0.0, 0.0)),
                             torch.Generator().manual_seed(0), plane="sagittal", n_slices=20, slice_mm=2.0,
                             size_px=64, pixel_mm=1.5)
    rng = np.random.default_rng(0)
    k, j, i = (rng.integers(0, n, 300) for n in s["labels"].shape)
    lps = s["origin"] + (np.stack([i, j, k], 1) * np.asarray(s["spacing"])) @ s["direction"].T
    idx = np.round((lps - np.asarray(vol.origin_lps)) / vol.spacing_mm).astype(int)[:, ::-1]
    inside = np.all((idx >= 0) & (idx < np.asarray(vol.labels.shape)), axis=1)
    expect = vol.labels.numpy()[tuple(idx[inside].T)]
    expect = np.where(expect > 4, 0, expect)
    assert inside.sum() > 100
    assert (s["labels"][k[inside], j[inside], i[inside]] == expect).mean() > 0.97


def test_mirroring_swaps_the_fibula_side(volumes):
    vol = volumes[0][0]
    sides = []
    for mirror in (False, True):
        s = ks.synthesise_volume(vol, ks.SynthConfig(elastic_mm=0.0, rotation_deg=(0.0, 0.0, 0.0)),
                                 torch.Generator().manual_seed(1), plane="coronal", n_slices=30, slice_mm=2.0,
                                 size_px=96, pixel_mm=1.5, mirror=mirror)
        lab = s["labels"]
        # coronal canonical: columns run to the patient's left
        sides.append(np.sign(np.argwhere(lab == 3)[:, 2].mean() - np.argwhere(lab == 2)[:, 2].mean()))
    assert sides[0] == -sides[1] != 0


def test_variant_targets():
    y = torch.tensor([[0, 1, 2, 3, 4]])
    assert kt.variant_target(y, "multiclass").tolist() == [[0, 1, 2, 3, 4]]
    assert kt.variant_target(y, "merged").tolist() == [[0, 1, 1, 1, 1]]
    assert kt.variant_target(y, "fibula").tolist() == [[0, 0, 0, 1, 0]]
    assert kt.network_config(kd.Config())["out_channels"] == 5
    assert sum(p.numel() for p in kt.build_network("unet2d", kt.network_config(kd.Config(channels=32))).parameters()) \
        < 500_000  # seed 000: < 500k parameters


def test_overfits_a_fixed_batch_and_reloads_through_the_registry(volumes, tmp_path, monkeypatch):
    vol = volumes[0][0]
    torch.manual_seed(0)
    x, y = ks.synthesise_batch([vol], ks.SynthConfig(network_px=64), torch.Generator().manual_seed(2), 8)
    cfg = kd.Config(channels=16, levels=3, dropout=0.0)
    net = kt.build_network("unet2d", kt.network_config(cfg))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = kt.soft_dice_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] <= 0.5 * losses[0], losses[::10]
    models = tmp_path / "models"
    models.mkdir()
    from SpineKneeSegLib.engine.weights import save_checkpoint

    save_checkpoint(models / "knee-test.pt", "knee-bones", "unet2d", kt.network_config(cfg), net.state_dict())
    monkeypatch.setenv("SPINEKNEESEG_MODELS", str(models))
    register_model(models / "knee-test.pt", "knee-bones", "0.0.1", card="none (test)")
    loaded = resolve_weights(TASKS["knee-bones"])
    assert loaded.entry.version == "0.0.1"
    again = kt.build_network("unet2d", loaded.network["config"])
    again.load_state_dict(loaded.checkpoint["state_dict"])
    net.eval(), again.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), again(x))


def test_trainer_checkpoints_validates_on_the_held_out_map_and_resumes(volumes, tmp_path):
    vols = [v for v, _ in volumes]
    kd.save_volumes(vols, tmp_path / "volumes.pt")
    cfg = kd.Config(channels=4, levels=3, iterations=4, eval_every=2, batch_size=2, patch=64, val_samples=4,
                    held_out=vols[1].name, synth={"network_px": 64})
    log = []
    state = kt.train(cfg, tmp_path, resume=False, max_minutes=None, log=log.append)
    assert state["iteration"] == 4 and state["epoch"] == 2
    assert "validating on 4 synthetic slices of ['phantom-left.nrrd']" in log[0]
    meta = torch.load(tmp_path / "best.pt", weights_only=True)["metadata"]
    assert meta["held_out"] == "phantom-left.nrrd" and meta["trained_on"] == ["phantom-right.nrrd"]
    cfg.iterations = 6
    state = kt.train(cfg, tmp_path, resume=True, log=log.append)
    assert state["iteration"] == 6 and any("resumed at iteration 4" in line for line in log)
    assert len(json.loads(json.dumps(state["history"]))) == 3
    # weight averaging (SWA) of snapshots 2..6: the mean of their weights, batch norm re-estimated
    swa = ka.average_snapshots(tmp_path, 2, 6, bn_batches=2, log=log.append)
    snaps = [torch.load(tmp_path / "snapshots" / f"iter-{i:06d}.pt", weights_only=True) for i in (2, 4, 6)]
    averaged = torch.load(swa, weights_only=True)
    key = next(k for k in averaged["state_dict"] if k.endswith("weight") and averaged["state_dict"][k].dim() == 4)
    assert torch.allclose(averaged["state_dict"][key], sum(c["state_dict"][key] for c in snaps) / 3, atol=1e-6)
    # batch-norm statistics are re-estimated, not the average of the snapshots' statistics
    bn = next(k for k in averaged["state_dict"] if k.endswith("running_mean"))
    assert not torch.allclose(averaged["state_dict"][bn], sum(c["state_dict"][bn] for c in snaps) / 3, atol=1e-4)
    assert averaged["metadata"]["swa"] == {"first": 2, "last": 6, "snapshots": 3, "bn_batches": 2}
    assert resolve_weights(TASKS[kd.TASK], str(swa)).path == swa  # the product loads it
    first = torch.load(swa, weights_only=True)["state_dict"]  # averaging again gives the same model, bit for bit
    again = torch.load(ka.average_snapshots(tmp_path, 2, 6, bn_batches=2, log=log.append), weights_only=True)
    assert all(torch.equal(first[k], again["state_dict"][k]) for k in first)
    # a model soup: the same recipe with another seed, its candidate averaged with this run's
    kt.train(kd.Config(**{**cfg.__dict__, "seed": 7}), tmp_path / "b", resume=False,
             volumes_path=tmp_path / "volumes.pt", log=log.append)
    other = ka.average_snapshots(tmp_path / "b", 2, 6, bn_batches=2, log=log.append,
                                 volumes_path=tmp_path / "volumes.pt")
    soup = ka.soup_checkpoints([swa, other], tmp_path / "soup.pt", tmp_path / "volumes.pt", bn_batches=2,
                               log=log.append)
    parts = [torch.load(p, weights_only=True)["state_dict"] for p in (swa, other)]
    souped = torch.load(soup, weights_only=True)
    assert torch.allclose(souped["state_dict"][key], (parts[0][key] + parts[1][key]) / 2, atol=1e-6)
    assert [r["seed"] for r in souped["metadata"]["soup"]["runs"]] == [cfg.seed, 7]
    assert "swa" not in souped["metadata"] and souped["metadata"]["soup"]["runs"][1]["swa"]["snapshots"] == 3
    no_series = {"series": [], "mean_dice": {b: 0.5 for b in ke.BONE_NAMES.values()}}
    card = " ".join(kc.model_card("9.9.2", souped["metadata"], no_series, [],
                                  [{"variant": "merged", "iteration": 300, "bone": 0.5}]).split())
    assert f"uniform weight average (`soup`, a model soup) of 2 runs of this recipe that differ only in their " \
           f"random seed ({cfg.seed}, 7), each the weight average (SWA) of its snapshots at iterations 2-6" in card
    kt.train(kd.Config(**{**cfg.__dict__, "lr": 1e-2}), tmp_path / "c", resume=False,
             volumes_path=tmp_path / "volumes.pt", log=log.append)
    with pytest.raises(SystemExit, match="not a run of the same recipe.*differs in lr"):
        ka.soup_checkpoints([swa, tmp_path / "c" / "best.pt"], tmp_path / "bad.pt", tmp_path / "volumes.pt")
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(SystemExit, match="at least two snapshots"):
        ka.average_snapshots(tmp_path, 5, 6)
    # fine-tuning starts from a checkpoint's weights: at lr 1e-12 they come out unchanged
    start = torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"]
    tuned = kd.Config(**{**cfg.__dict__, "iterations": 2, "lr": 1e-12, "lr_final": 1e-12,
                         "init": str(tmp_path / "best.pt")})
    kt.train(tuned, tmp_path / "tuned", resume=False, volumes_path=tmp_path / "volumes.pt", log=log.append)
    after = torch.load(tmp_path / "tuned" / "snapshots" / "iter-000002.pt", weights_only=True)["state_dict"]
    assert any(line.startswith("initialised from") for line in log)
    weights = [k for k in start if start[k].is_floating_point() and "running" not in k]
    assert weights and all(torch.allclose(start[k], after[k], atol=1e-9) for k in weights)


def test_held_out_none_trains_and_validates_on_every_anatomy(volumes, tmp_path):
    """--held-out none: the model to ship after the held-out figures are measured sees every label
    map; its validation slices come from each map in turn (fixed seed, not the training stream)."""
    vols = [v for v, _ in volumes]
    kd.save_volumes(vols, tmp_path / "volumes.pt")
    cfg = kd.Config(channels=4, levels=3, iterations=2, eval_every=2, batch_size=2, patch=64, val_samples=4,
                    held_out=kd.ALL_ANATOMIES, synth={"network_px": 64, "shared_tissue_p": 1.0}, ce_weight=0.5)
    log = []
    kt.train(cfg, tmp_path, resume=False, log=log.append)
    assert "phantom-right.nrrd" in log[0] and "phantom-left.nrrd" in log[0].split("validating")[1]
    meta = torch.load(tmp_path / "best.pt", weights_only=True)["metadata"]
    assert meta["held_out"] == "none" and meta["trained_on"] == ["phantom-right.nrrd", "phantom-left.nrrd"]
    assert meta["config"]["ce_weight"] == 0.5 and meta["config"]["synth"]["shared_tissue_p"] == 1.0
    _, y = kd.validation_set(vols, cfg, ks.SynthConfig(network_px=64))
    _, y_right = kd.validation_set(vols[:1], cfg, ks.SynthConfig(network_px=64))
    assert not torch.equal(y, y_right)  # the left map's slices are in the set


def test_marginal_loss_does_not_punish_bones_a_map_does_not_label():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :4] = 1  # femur in the top half; the rest is background (or an unlabelled bone)
    says_background = torch.full((1, 5, 8, 8), -5.0)
    says_background[:, 1, :4] = 5.0
    says_background[:, 0, 4:] = 5.0
    says_fibula = says_background.clone()
    says_fibula[:, 0, 4:], says_fibula[:, 3, 4:] = -5.0, 5.0
    femur_tibia_only = torch.tensor([[True, True, True, False, False]])
    assert abs(float(kt.soft_dice_loss(says_fibula, target, femur_tibia_only))
               - float(kt.soft_dice_loss(says_background, target, femur_tibia_only))) < 1e-3
    everything = torch.ones(1, 5, dtype=torch.bool)
    assert float(kt.soft_dice_loss(says_fibula, target, everything)) > \
        float(kt.soft_dice_loss(says_background, target, everything)) + 0.1
    # the cross-entropy term (--ce-weight) is marginal in the same way
    ce = kt.marginal_cross_entropy
    fibula_ce, background_ce = ce(says_fibula, target, femur_tibia_only), ce(says_background, target, femur_tibia_only)
    assert abs(float(fibula_ce) - float(background_ce)) < 1e-3
    assert float(ce(says_fibula, target, everything)) > float(ce(says_background, target, everything)) + 1.0
    assert torch.allclose(ce(says_fibula, target, everything), F.cross_entropy(says_fibula, target))


def test_cross_entropy_charges_a_small_stray_piece_that_the_batch_dice_hardly_sees():
    """A 2x2 stray femur in a sample without femur, beside a correct large femur in another sample:
    the batch soft F1 changes little; soft F1 + cross-entropy changes by the strays' pixel cost."""
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[0, 4:28, 4:28] = 1
    clean = torch.full((2, 5, 32, 32), -6.0)
    clean[:, 0] = 6.0
    clean[0, 0, 4:28, 4:28], clean[0, 1, 4:28, 4:28] = -6.0, 6.0
    stray = clean.clone()
    stray[1, 0, 10:12, 10:12], stray[1, 1, 10:12, 10:12] = -6.0, 6.0
    dice_only = float(kt.training_loss(stray, target, None, 0.0) - kt.training_loss(clean, target, None, 0.0))
    with_ce = float(kt.training_loss(stray, target, None, 1.0) - kt.training_loss(clean, target, None, 1.0))
    assert 0 < dice_only < 0.01 and with_ce > dice_only + 0.02


def test_oai_zib_pairs_train_on_the_real_image(tmp_path):
    """OAI-ZIB layout (<id>.segmentation_masks.mhd + the user's <id>.mhd image) -> pairs CSV ->
    prepared volume whose samples are the real image, in register with the labels."""
    masks, images = tmp_path / "masks", tmp_path / "images"
    masks.mkdir(), images.mkdir()
    phantom = make_phantom("knee-bones", seed=2, shape=(30, 128, 128), spacing=(1.0, 1.0, 2.5))
    oai = phantom.labels.array.copy()
    oai[:] = 0
    oai[phantom.labels.array == 1], oai[phantom.labels.array == 2] = 1, 3  # femoral bone, tibial bone
    import SimpleITK as sitk
    from SpineKneeSegLib.core.image import Image

    # OAI-ZIB ships MetaImage (.mhd + .raw)
    sitk.WriteImage(Image(oai, phantom.labels.spacing, phantom.labels.origin, phantom.labels.direction).to_sitk(),
                    str(masks / f"9001104{kd.OAI_ZIB_SUFFIX}"))
    sitk.WriteImage(phantom.image.to_sitk(), str(images / "9001104.mhd"))
    sitk.WriteImage(phantom.labels.to_sitk(), str(masks / f"9999999{kd.OAI_ZIB_SUFFIX}"))  # no image: skipped
    rows = kd.import_oai_zib(masks, images)
    assert [r["name"] for r in rows] == ["9001104"] and rows[0]["mapping"] == {1: 1, 3: 2}
    kd.write_pairs(rows, tmp_path / "pairs.csv")
    again = kd.read_pairs(tmp_path / "pairs.csv")
    assert again[0]["image"] == rows[0]["image"] and again[0]["mapping"] == {1: 1, 3: 2}
    (vol,) = kd.prepare(tmp_path / "run", None, 1.0, again, log=lambda *_: None)
    assert vol.image is not None and vol.labelled == (1, 2)
    assert set(torch.unique(vol.labels).tolist()) <= {0, 1, 2}

    plain = ks.SynthConfig(network_px=96, blur_px=(0.0, 0.0), downsample=(1.0, 1.0), bias_sd=0.0, gamma_sd=0.0,
                           noise_sd=(0.0, 0.0), pad_fraction=0.0, jitter=(0.0, 0.0), elastic_mm=0.0,
                           thickness_mm=(0.5, 0.5))
    x, y, mask = ks.synthesise_batch([vol], plain, torch.Generator().manual_seed(0), 6, with_mask=True)
    assert mask[0].tolist() == [True, True, True, False, False]
    truth = phantom.image.array.astype(float)
    scale = np.percentile(truth[truth > 0], 99.5)
    for label in (1, 2):  # the sampled real intensities of each bone match the phantom's own
        inside = y == label
        if inside.sum() < 50:
            continue
        sampled = x[:, 0][inside]
        background = x[:, 0][y == 0]
        expect = (truth[phantom.labels.array == label].mean() - truth[phantom.labels.array == 0].mean()) / scale
        got = float(sampled.mean() - background.mean())
        assert np.sign(got) == np.sign(expect), (label, got, expect)


def test_image_and_label_folders_pair_by_case_name_and_prepare(tmp_path):
    """Labelled data a user brings as two folders (case01.nii.gz + case01_seg.nii.gz, MetaImage with
    its .raw, a case with no label map) -> pairs CSV through the CLI -> prepared volumes with the real
    images and only the mapped bones labelled; a folder pair with no common case is a clear error."""
    import subprocess

    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir(), labels.mkdir()
    import SimpleITK as sitk

    cases = [("case01.nii.gz", "case01_seg.nii.gz"), ("case02.mhd", "case02_seg.mhd")]
    for i, (img_name, lab_name) in enumerate(cases):
        phantom = make_phantom("knee-bones", seed=i, shape=(24, 96, 96), spacing=(1.2, 1.2, 3.0))
        lab = phantom.labels.array.copy()
        lab[lab == 3] = 0  # this dataset labels femur 1, tibia 2, patella 4 as 7; the fibula is unlabelled
        lab[lab == 4] = 7
        # MetaImage (.mhd + .raw) through SimpleITK: the product writes only formats it can read back alone
        sitk.WriteImage(phantom.image.to_sitk(), str(images / img_name))
        sitk.WriteImage(phantom.labels.with_array(lab).to_sitk(), str(labels / lab_name))
    write_image(phantom.image, images / "case03.nrrd")  # no label map: skipped with a warning
    csv = tmp_path / "pairs.csv"
    cmd = [sys.executable, str(TRAINING / "knee_bones.py"), "import-folders", "--images", str(images), "--labels",
           str(labels), "--mapping", "1:1,2:2,7:4", "--label-suffix", "_seg", "--csv", str(csv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 case(s)" in proc.stdout and "case03" in proc.stdout
    rows = kd.read_pairs(csv)
    assert [r["name"] for r in rows] == ["case01", "case02"]  # case02_seg.raw (MetaImage data) is not a case
    assert kd.case_name(Path("x/case07.seg.nrrd")) == "case07" and kd.case_name(Path("x/case07.txt")) == "case07"
    assert rows[1]["labels"].name == "case02_seg.mhd" and rows[0]["mapping"] == {1: 1, 2: 2, 7: 4}
    volumes = kd.prepare(tmp_path / "run", None, 1.0, rows, log=lambda *_: None)
    assert [v.name for v in volumes] == ["case01", "case02"]
    assert all(v.image is not None and v.labelled == (1, 2, 4) for v in volumes)
    assert set(torch.unique(volumes[1].labels).tolist()) == {0, 1, 2, 4}

    wrong = subprocess.run(cmd[:-6] + ["--mapping", "1:1", "--csv", str(tmp_path / "none.csv")],
                           capture_output=True, text=True, timeout=120)  # no --label-suffix: no case matches
    assert wrong.returncode != 0 and "no case has both an image" in wrong.stderr and "_seg" in wrong.stderr
    assert not (tmp_path / "none.csv").exists()
    bad = subprocess.run(cmd[:7] + ["--mapping", "1:1,9:5", "--csv", str(tmp_path / "bad.csv")],
                         capture_output=True, text=True, timeout=120)  # bone 5 does not exist
    assert bad.returncode != 0 and "--mapping" in bad.stderr and not (tmp_path / "bad.csv").exists()


def test_a_real_image_is_resampled_onto_its_labels_grid(tmp_path):
    """Image+label pairs: the prepared image sits on the prepared labels' voxels. The small bones
    keep their own mean intensity (within 4 %); a 2 mm shift would already break that."""
    phantom = make_phantom("knee-bones", seed=2, shape=(30, 128, 128), spacing=(1.0, 1.0, 2.5))
    write_image(phantom.image, tmp_path / "image.nii.gz")
    write_image(phantom.labels, tmp_path / "labels.nii.gz")
    vol = kd.prepare_volume(tmp_path / "labels.nii.gz", {1: 1, 2: 2, 3: 3, 4: 4}, 1.0, tmp_path / "image.nii.gz")
    truth = phantom.image.array.astype(float)
    image = vol.image.float().numpy() * np.percentile(truth[truth > 0], 99.5)
    labels = vol.labels.numpy()

    def off(img, value):
        expect = truth[phantom.labels.array == value].mean()
        return abs(img[labels == value].mean() - expect) / expect

    for value in (3, 4):  # fibula, patella: small enough that misregistration shows
        assert off(image, value) < 0.04, value
    assert max(off(np.roll(image, 2, axis=1), v) for v in (3, 4)) > 0.04


def test_model_card_of_a_model_trained_on_every_anatomy_carries_the_held_out_runs_figures():
    """A model that saw every label map has no held-out anatomy: its card must say so and show the
    held-out run's figures as the generalisation measurement, its own as seen-anatomy figures."""
    def evaluation(dice):
        row = {"series": "sagittal 80x1.5 mm", **{b: dice for b in ke.BONE_NAMES.values()},
               **{f"{b}_raw": dice for b in ke.BONE_NAMES.values()}}
        return {"series": [row], "mean_dice": {b: dice for b in ke.BONE_NAMES.values()}}

    cfg = kd.Config(held_out=kd.ALL_ANATOMIES, init="models/knee-bones-0.1.0.pt").__dict__
    val = {"dice": {b: 0.5 for b in ke.BONE_NAMES.values()}}
    meta = {"config": cfg, "val": val, "held_out": "none", "iteration": 900,
            "trained_on": ["spl-atlas-labels.nrrd", "pymskt-dess-labels.nrrd"]}
    held_meta = {**meta, "held_out": kd.HELD_OUT, "trained_on": ["spl-atlas-labels.nrrd"], "iteration": 2800}
    variants = [{"variant": "merged", "iteration": 300, "bone": 0.5}]
    card = kc.model_card("9.9.9", meta, evaluation(0.777), [], variants,
                         {"version": "0.1.0", "evaluation": evaluation(0.333), "meta": held_meta}, "Looked at: ok.")
    assert "No anatomy is held out from this model" in card and "Fine-tuned from `knee-bones-0.1.0.pt`" in card
    held, own = card.split("## This model on the same synthetic series")
    assert "unseen anatomy: v0.1.0" in held and "| **mean** | 0.333" in held and "0.777" not in held
    assert "| **mean** | 0.777" in own.split("## Seed variants")[0] and "Looked at: ok." in card
    single = kc.model_card("9.9.8", held_meta, evaluation(0.333), [], variants)
    assert "Held out entirely" in single and "No anatomy is held out" not in single
    assert "Tissue classes" not in single and "up to 10 mm beyond" in single
    # a model trained with tissue classes says so, and shows the shared-marrow series beside the default ones
    tissue_meta = {**held_meta, "config": {**held_meta["config"], "synth": {"shared_tissue_p": 0.8,
                                                                            "through_plane_margin_mm": 25.0}}}
    tissue = kc.model_card("9.9.7", tissue_meta, evaluation(0.333), [], variants, evaluation_tissue=evaluation(0.444))
    assert "Tissue classes" in tissue and "in 80% of the samples" in tissue and "up to 25 mm beyond" in tissue
    assert "one marrow intensity for all four bones" in tissue and "| **mean** | 0.444" in tissue
    assert "distractors" not in single.lower() and "distractors" not in tissue.lower()
    distract_meta = {**held_meta, "config": {**held_meta["config"], "synth": {"distractor_p": 0.5}}}
    distract = kc.model_card("9.9.6", distract_meta, evaluation(0.333), [], variants)
    assert "Bone-like distractors: in 50% of the samples, 1-4 smooth-edged blobs" in distract
    assert "continue along S-I" not in distract
    extend_meta = {**held_meta, "config": {**held_meta["config"], "synth": {"beyond_volume": "extend"}}}
    extended = kc.model_card("9.9.5", extend_meta, evaluation(0.333), [], variants)
    assert "continue along S-I" in extended and "straight\n  continuations" in extended
    assert "were never seen as bone" in single and "straight\n  continuations" not in single
    shift_meta = {**held_meta, "config": {**held_meta["config"], "synth": {"bone_shift_mm": 8.0}}}
    shifted = kc.model_card("9.9.5", shift_meta, evaluation(0.333), [], variants)
    assert "Per-bone shift: the fibula moved by a random offset (uniform +-8 mm" in shifted
    assert "Per-bone shift" not in single
    lines_meta = {**held_meta, "config": {**held_meta["config"], "synth": {"fascia_p": 0.5, "streak_p": 0.25}}}
    lined = kc.model_card("9.9.6", lines_meta, evaluation(0.333), [], variants)
    lined = " ".join(lined.split())
    assert "in 50% of the samples a 1-px line (fascia)" in lined and "in 25% thin streaks" in lined
    assert "Lines in the soft tissues" not in single
    # a weight average says what it averages; a missed coronal patella is a known limit
    swa_meta = {**held_meta, "swa": {"first": 1500, "last": 2000, "snapshots": 6, "bn_batches": 50}}
    coronal = evaluation(0.333)
    coronal["series"].append({**coronal["series"][0], "series": "coronal 40x3.0 mm", "patella": 0.0})
    swa = kc.model_card("9.9.4", swa_meta, coronal, [], variants)
    assert "weight average (SWA, `average`) of the 6 snapshots at iterations 1500-2000" in swa
    assert "2D validation slices at iteration 2000 (the last averaged snapshot" in swa
    assert "Coronal input: the patella is missed (Dice 0.00" in swa and "Coronal input" not in single
    assert "This checkpoint: iteration 2800 of the planned" in single
    # a real series' row: pass/fail, and beside it the raw pieces, raw-vs-final Dice and fibula width
    from SpineKneeSegLib.engine.postprocessing import largest_component_per_label
    from SpineKneeSegLib.tasks.knee.anatomy import knee_plausibility
    from SpineKneeSegLib.tasks.knee.phantom import knee_phantom

    phantom = knee_phantom(0)
    raw = phantom.labels.array.copy()
    side = int(np.ceil((0.03 * (raw == 3).sum()) ** (1 / 3)))  # a stray fibula piece of >= 3 %, in a corner
    assert not raw[:side, :side, :side].any()
    raw[:side, :side, :side] = 3
    plaus = knee_plausibility(largest_component_per_label(raw), phantom.image, raw_labels=raw)
    fibula_dice = plaus["checks"]["raw_vs_final_dice"]["dice"]["fibula"]
    assert 0.9 < fibula_dice < 0.99
    real = [{"series": "dess-dicom", "summaries": {"knee_plausibility": plaus}, "warnings": [],
             "timings_s": {"total": 4.2}}]
    row = next(line for line in kc.model_card("9.9.3", held_meta, evaluation(0.333), real, variants).splitlines()
               if line.startswith("| dess-dicom"))
    section = plaus["checks"]["fibula_cross_section"]
    assert row.startswith(f"| dess-dicom | passed | 1/1/2/1; 1.00/1.00/{fibula_dice:.2f}/1.00; ")
    width = f"{section['widest_left_right_mm']:.0f} x {section['widest_anterior_posterior_mm']:.0f} mm"
    assert row.endswith(f"; {width} | none | 4.20 |")


def test_tissue_classes_come_from_the_colour_table_beside_a_label_map(tmp_path):
    """Structures a Slicer colour table colours alike (the SPL atlas: every muscle one colour) are one
    tissue class; without a table every structure is its own class; the bones are always one."""
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[2:8, 2:8, 2:8], arr[12:18, 2:8, 2:8] = 95, 96  # femur, tibia
    arr[2:8, 12:18, 2:8], arr[12:18, 12:18, 2:8], arr[2:8, 2:8, 12:18] = 12, 13, 31  # 2 muscles, a ligament
    from SpineKneeSegLib.core.image import Image

    path = tmp_path / "atlas.nrrd"
    write_image(Image(arr, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3)), path)
    plain = kd.prepare_volume(path, {95: 1, 96: 2}, 1.0)
    (tmp_path / "atlas.ctbl").write_text("# colour table\n12 vastus_lateralis 230 125 125 255\n"
                                         "13 vastus_medialis 230 125 125 255\n31 acl 255 255 255 255\n")
    grouped = kd.prepare_volume(path, {95: 1, 96: 2}, 1.0)
    # renumbered: 5 = value 12, 6 = value 13, 7 = value 31
    assert plain.tissue[1:5] == grouped.tissue[1:5] == (1, 1, 1, 1)
    assert len({plain.tissue[i] for i in (5, 6, 7)}) == 3
    assert grouped.tissue[5] == grouped.tissue[6] != grouped.tissue[7]


def test_the_shared_label_maps_group_muscles_and_cartilage(data_root):
    maps = data_root / "knee" / "labelmaps"
    spl = kd.tissue_of(maps / "spl-atlas-labels.nrrd", [12, 13, 26, 31, 83, 86])
    assert spl[12] == spl[13] == spl[26] != spl[31] and spl[83] == spl[86] != spl[12]
    dess = kd.tissue_of(maps / "pymskt-dess-labels.nrrd", [1, 4, 9, 10])
    assert dess[1] == dess[4] == "cartilage" and dess[9] == dess[10] == "meniscus"


def _toy_volume(tissue):
    labels = torch.zeros((4, 4, 4), dtype=torch.uint8)
    return ks.KneeVolume("toy", labels, 1.0, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), ((0, 1),) * 3, 9, tissue=tissue)


def test_shared_tissue_draws_one_intensity_per_tissue_class():
    tissue = (0, 1, 1, 1, 1, 2, 2, 2, 3)  # 4 bones; three muscles; a ligament
    cfg = ks.SynthConfig(shared_tissue_p=1.0, tissue_jitter=0.05)
    gen = torch.Generator().manual_seed(0)
    spreads = {"bones": [], "muscles": [], "across": []}
    for _ in range(50):
        m = ks.tissue_means(_toy_volume(tissue), cfg, gen, 12)
        spreads["bones"].append(float(m[1:5].max() - m[1:5].min()))
        spreads["muscles"].append(float(m[5:8].max() - m[5:8].min()))
        spreads["across"].append(float((m[1] - m[8]).abs()))
    assert max(spreads["bones"]) <= 0.1 + 1e-6 and max(spreads["muscles"]) <= 0.1 + 1e-6
    assert np.mean(spreads["across"]) > 0.15  # different tissues still differ
    # p = 0 (the session 1-5 synthesis) draws exactly as a volume without tissue classes
    a = ks.tissue_means(_toy_volume(tissue), ks.SynthConfig(), torch.Generator().manual_seed(1), 12)
    b = ks.tissue_means(_toy_volume(None), ks.SynthConfig(), torch.Generator().manual_seed(1), 12)
    assert torch.equal(a, b) and float(a[1:5].max() - a[1:5].min()) > 0.1


def test_slab_positions_reach_the_through_plane_margin(volumes):
    vol = volumes[0][0]
    normal = torch.tensor(ks.PLANES["sagittal"][0])
    lo, hi = (float(v) for v in sorted(-torch.tensor(vol.bone_extent_lps[0])))  # sagittal normal is -L
    for margin in (0.0, 30.0):
        cfg = ks.SynthConfig(network_px=16, rotation_deg=(0.0, 0.0, 0.0), elastic_mm=0.0, sub_planes=1,
                             through_plane_margin_mm=margin)
        gen = torch.Generator().manual_seed(2)
        pos = [float(ks.sample_geometry(vol, cfg, gen, "cpu", "sagittal")[0][0, 8, 8] @ normal) for _ in range(200)]
        assert lo - margin - 0.5 <= min(pos) and max(pos) <= hi + margin + 0.5
        beyond = np.mean([p < lo - 10 or p > hi + 10 for p in pos])
        assert (beyond == 0) if margin == 0 else (beyond > 0.2), (margin, beyond)


def test_synth_overrides_from_the_command_line_are_typed_and_checked():
    assert kd.parse_synth_overrides(["shared_tissue_p=0.8", "fov_mm=100,150", "sub_planes=3"]) == {
        "shared_tissue_p": 0.8, "fov_mm": (100.0, 150.0), "sub_planes": 3}
    assert kd.parse_synth_overrides(["shift_bones=3,4"]) == {"shift_bones": (3, 4)}  # a list of bones
    assert kd.parse_synth_overrides(["shift_bones=4"]) == {"shift_bones": (4,)}
    for bad in (["nonsense=1"], ["fov_mm=100"], ["shared_tissue_p=high"], ["extra=1"], ["shift_bones=7"]):
        with pytest.raises(SystemExit, match="--synth"):
            kd.parse_synth_overrides(bad)


def test_synthetic_series_can_give_the_four_bones_one_marrow_intensity(volumes):
    """evaluate --synth shared_tissue_p=1: the held-out series shows all bones with one marrow signal,
    as real MR does; by default (the v0.1.0 card's series) every bone draws its own."""
    vol = volumes[0][0]

    def bone_spread(p, seed):
        s = ks.synthesise_volume(vol, ks.SynthConfig(shared_tissue_p=p, bias_sd=0.0),
                                 torch.Generator().manual_seed(seed),
                                 plane="sagittal", n_slices=20, slice_mm=2.0, size_px=96, pixel_mm=1.5)
        medians = [float(np.median(s["image"][s["labels"] == b])) for b in (1, 2) if (s["labels"] == b).sum() > 50]
        return (max(medians) - min(medians)) / 1000  # the series is scaled x1000; means lie in [0.05, 1]

    shared = [bone_spread(1.0, seed) for seed in range(6)]
    independent = [bone_spread(0.0, seed) for seed in range(6)]
    # shared: within the +-0.05 jitter (plus noise and partial volume); independent: uniform draws
    assert max(shared) < 0.13 and max(independent) > 0.3, (shared, independent)


def test_distractors_never_cover_bone_and_get_a_rim_of_their_own():
    """Bone-like distractors: blobs over non-bone pixels only, ids after the cortex id, and (when
    they mimic a bone) a dark rim like a cortex."""
    labels = torch.zeros((3, 64, 64), dtype=torch.long)
    labels[:, 20:44, 20:44] = 1  # a femur filling the centre
    labels[:, :, :8] = 5  # a muscle
    cfg = ks.SynthConfig(distractors=(6, 6), distractor_mm=(10.0, 30.0))
    out, k = ks._distractors(labels, 20, 100.0, cfg, torch.Generator().manual_seed(3))
    assert k == 6
    assert torch.equal(out == 1, labels == 1)  # bone untouched
    painted = out >= 20
    assert painted.any() and set(torch.unique(out[painted]).tolist()) <= set(range(20, 26))
    assert torch.equal(painted[0], painted[2])  # the same blob through the slab
    rimmed = ks._cortex(out, 2, 19, also=torch.arange(20, 26))
    assert ((rimmed == 19) & painted).any()  # the distractors' own rim
    assert torch.equal(ks._cortex(out, 2, 19)[~painted], rimmed[~painted])  # the bone's rim as before


def test_distractors_leave_the_target_and_the_old_stream_alone(volumes):
    vol = volumes[0][0]
    base = ks.SynthConfig(network_px=96)
    with_d = ks.SynthConfig(network_px=96, distractor_p=1.0, distractor_mimic_p=1.0)
    for seed in range(4):
        x0, y0, _ = ks.synthesise(vol, base, torch.Generator().manual_seed(seed))
        x1, y1, _ = ks.synthesise(vol, with_d, torch.Generator().manual_seed(seed))
        assert torch.equal(y0, y1) and not torch.equal(x0, x1)
    # distractor_p = 0 draws nothing extra: the stream after a sample is the one without the option
    g0, g1 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ks.synthesise(vol, base, g0)
    ks.synthesise(vol, ks.SynthConfig(network_px=96, distractor_p=0.0, distractors=(3, 9)), g1)
    assert torch.equal(g0.get_state(), g1.get_state())


def test_beyond_the_label_map_the_first_labelled_slices_continue(volumes):
    """beyond_volume="extend": below the map's lowest labelled axial slice the shafts go on (that
    slice's labels), the in-plane outside stays empty; "empty" (default) keeps 0 beyond the map."""
    vol = volumes[0][0]
    lo, hi = ks.labelled_z_range(vol)
    assert (vol.labels[:lo] == 0).all() and (vol.labels[hi + 1:] == 0).all() and (vol.labels[lo] > 0).any()
    ys, xs = torch.meshgrid(torch.arange(vol.labels.shape[1]), torch.arange(vol.labels.shape[2]), indexing="ij")
    origin = torch.tensor(vol.origin_lps)
    for z_mm, z_idx in ((-40.0, lo), (vol.labels.shape[0] * vol.spacing_mm + 40.0, hi)):
        pts = origin + torch.stack([xs * vol.spacing_mm, ys * vol.spacing_mm,
                                    torch.full(xs.shape, z_mm)], dim=-1).float()
        assert torch.equal(ks.sample_labels(vol, pts, False, extend=True), vol.labels[z_idx].long())
        assert (ks.sample_labels(vol, pts, False) == 0).all()
    outside = origin + torch.tensor([[-50.0, 10.0, -40.0]])  # off the map to the right as well
    assert int(ks.sample_labels(vol, outside, False, extend=True)[0]) == 0
    # synthesise uses it: same geometry (no extra draws), more bone where windows pass the map's ends
    grown = 0
    for seed in range(8):
        _, y0, _ = ks.synthesise(vol, ks.SynthConfig(network_px=64), torch.Generator().manual_seed(seed))
        x1, y1, _ = ks.synthesise(vol, ks.SynthConfig(network_px=64, beyond_volume="extend"),
                                  torch.Generator().manual_seed(seed))
        assert torch.isfinite(x1).all() and torch.equal(y1[y0 > 0], y0[y0 > 0])
        grown += int((y1 > 0).sum() > (y0 > 0).sum())
    assert grown >= 2, grown
    with pytest.raises(ValueError, match="beyond_volume"):
        ks.synthesise(vol, ks.SynthConfig(network_px=64, beyond_volume="mirror"), torch.Generator().manual_seed(0))


def test_components_are_described_largest_first_with_their_place_relative_to_the_tibia():
    from SpineKneeSegLib.core.image import Image

    labels = np.zeros((10, 20, 30), np.uint8)  # (k, j, i); identity direction = LPS axes
    labels[2:8, 5:15, 5:15] = 2  # tibia: centroid index (4.5, 9.5, 9.5)
    labels[3:7, 16:19, 20:26] = 3  # fibula, 72 voxels
    labels[0:1, 0:2, 0:2] = 3  # a stray piece, 4 voxels
    image = Image(np.zeros(labels.shape, np.float32), (1.0, 1.0, 2.0))
    rows = ke.describe_components(labels, image, 3)
    assert [r["ml"] for r in rows] == [round(72 * 2 / 1000, 3), round(4 * 2 / 1000, 3)]
    assert rows[0]["slices"] == [3, 6] and rows[1]["slices"] == [0, 0]
    # fibula centroid index (4.5, 17, 22.5): 13 voxels to patient left (RAS -13), 7.5 posterior (-7.5), level
    assert rows[0]["offset_ras_mm"] == [-13.0, -7.5, 0.0]
    assert ke.describe_components(labels, image, 4) == []


def test_slice_fit_measures_the_fit_to_one_anatomys_synthetic_slices(volumes, tmp_path):
    """`fit`: Dice on a fixed draw of training-like slices of a named anatomy. A network overfit on
    exactly that draw scores high, an untrained one low; an unknown or ambiguous anatomy is refused."""
    from SpineKneeSegLib.engine.weights import save_checkpoint

    vols = [v for v, _ in volumes]
    kd.save_volumes(vols, tmp_path / "volumes.pt")
    synth = {"network_px": 64}
    gen = torch.Generator().manual_seed(4242)
    x, y = (torch.stack(t) for t in zip(*(ks.synthesise(vols[0], ks.SynthConfig(**synth), gen)[:2] for _ in range(6))))
    cfg = kd.Config(channels=16, levels=3, dropout=0.0)
    torch.manual_seed(0)
    net = kt.build_network("unet2d", kt.network_config(cfg))
    save_checkpoint(tmp_path / "untrained.pt", "knee-bones", "unet2d", kt.network_config(cfg), net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        kt.soft_dice_loss(net(x), y).backward()
        opt.step()
    save_checkpoint(tmp_path / "fit.pt", "knee-bones", "unet2d", kt.network_config(cfg), net.state_dict())
    name = vols[0].name.split(".")[0]
    fit = ke.slice_fit(tmp_path / "fit.pt", tmp_path / "volumes.pt", name, synth, samples=6)
    untrained = ke.slice_fit(tmp_path / "untrained.pt", tmp_path / "volumes.pt", name, synth, samples=6)
    assert fit["anatomy"] == vols[0].name and fit["samples"] == 6
    assert fit["dice"]["femur"] > 0.8 and fit["dice"]["tibia"] > 0.8, fit
    assert untrained["dice"]["femur"] < 0.5, untrained
    with pytest.raises(SystemExit, match="matches 0"):
        ke.slice_fit(tmp_path / "fit.pt", tmp_path / "volumes.pt", "spl", synth, samples=2)
    with pytest.raises(SystemExit, match="matches 2"):
        ke.slice_fit(tmp_path / "fit.pt", tmp_path / "volumes.pt", "phantom", synth, samples=2)


def test_widening_keeps_the_networks_output_and_the_new_units_learn(volumes, tmp_path):
    torch.manual_seed(0)
    narrow = kt.build_network("unet2d", kt.network_config(kd.Config(channels=4, levels=3))).eval()
    for m in narrow.modules():  # non-trivial batch-norm statistics, as in a trained network
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    wide = kt.build_network("unet2d", kt.network_config(kd.Config(channels=6, levels=3)))
    wide.load_state_dict(kt.widen_state(narrow.state_dict(), wide.state_dict(), 4, 6))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wide.eval()(x), narrow(x), atol=1e-5)
    # the head reads the new units through zero weights that the first step moves; from the second
    # step the gradient reaches the new units of the first layer too
    wide.train()
    first_new = wide.down[0][0].weight[4:].detach().clone()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    target = torch.randint(0, 5, (3, 32, 32))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(wide(x), target).backward()
        opt.step()
    assert wide.head.weight[:, 4:].abs().sum() > 0
    assert not torch.allclose(wide.down[0][0].weight[4:], first_new)
    with pytest.raises(ValueError, match="cannot map"):
        kt.widen_state(narrow.state_dict(), wide.state_dict(), 3, 6)
    # the trainer widens a narrower --init checkpoint (and refuses a narrowing one)
    vols = [v for v, _ in volumes]
    kd.save_volumes(vols, tmp_path / "volumes.pt")
    cfg = kd.Config(channels=4, levels=3, iterations=2, eval_every=2, batch_size=2, patch=64, val_samples=4,
                    held_out=vols[1].name, synth={"network_px": 64})
    kt.train(cfg, tmp_path / "narrow", resume=False, volumes_path=tmp_path / "volumes.pt", log=lambda *_: None)
    log = []
    wider = kd.Config(**{**cfg.__dict__, "channels": 6, "init": str(tmp_path / "narrow" / "best.pt")})
    kt.train(wider, tmp_path / "wide", resume=False, volumes_path=tmp_path / "volumes.pt", log=log.append)
    assert any("widened 4 -> 6 channels" in line for line in log)
    assert torch.load(tmp_path / "wide" / "best.pt", weights_only=True)["network"]["config"]["channels"] == (6, 6, 6)
    narrower = kd.Config(**{**cfg.__dict__, "channels": 2, "init": str(tmp_path / "narrow" / "best.pt")})
    with pytest.raises(SystemExit, match="cannot start"):
        kt.train(narrower, tmp_path / "bad", resume=False, volumes_path=tmp_path / "volumes.pt", log=log.append)


def test_a_shifted_bone_moves_by_its_offset_and_never_overwrites_another_bone(volumes):
    vol = volumes[0][0]
    ys, xs = torch.meshgrid(torch.arange(vol.labels.shape[1]), torch.arange(vol.labels.shape[2]), indexing="ij")
    origin = torch.tensor(vol.origin_lps)
    z = int(torch.nonzero((vol.labels == 3).flatten(1).any(1)).flatten().float().median())  # through the fibula
    pts = origin + torch.stack([xs * vol.spacing_mm, ys * vol.spacing_mm,
                                torch.full(xs.shape, z * vol.spacing_mm)], dim=-1).float()
    labels = ks.sample_labels(vol, pts, False)
    moved = ks.shift_bone(vol, labels, pts, False, False, 3, torch.tensor([6.0, 0.0, 0.0]))  # 6 voxels along x
    fib, new_fib = labels == 3, moved == 3
    other = (labels >= 1) & (labels <= 4) & (labels != 3)
    expected = torch.zeros_like(fib)
    expected[:, 6:] = fib[:, :-6]
    assert torch.equal(new_fib, expected & ~other) and new_fib.sum() > 0.8 * fib.sum()
    assert torch.equal(moved[other], labels[other])  # the other bones stay as they were
    assert (moved[fib & ~new_fib] == 0).all()  # the old place becomes unlabelled tissue
    # in synthesise: the fibula's target moves, the other bones' targets lie where they were; off by
    # default, with no extra draws (the old stream)
    shifted, base = ks.SynthConfig(network_px=96, bone_shift_mm=8.0), ks.SynthConfig(network_px=96)
    with_fibula = 0
    for seed in range(12):
        _, y0, _ = ks.synthesise(vol, base, torch.Generator().manual_seed(seed))
        _, y1, _ = ks.synthesise(vol, shifted, torch.Generator().manual_seed(seed))
        assert torch.equal(y1[(y0 == 1) | (y0 == 2) | (y0 == 4)], y0[(y0 == 1) | (y0 == 2) | (y0 == 4)])
        if (y0 == 3).sum() > 20:
            with_fibula += 1
            assert not torch.equal(y0 == 3, y1 == 3), seed
    assert with_fibula >= 2, with_fibula
    # a real labelled image (OAI-ZIB pairs) keeps its labels where its bones are
    import dataclasses

    real = dataclasses.replace(vol, image=vol.labels.float())
    for seed in range(4):
        _, y0, _ = ks.synthesise(real, base, torch.Generator().manual_seed(seed))
        _, y1, _ = ks.synthesise(real, shifted, torch.Generator().manual_seed(seed))
        assert torch.equal(y0, y1)
    g0, g1 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ks.synthesise(vol, base, g0)
    ks.synthesise(vol, ks.SynthConfig(network_px=96, bone_shift_mm=0.0, shift_bones=(3, 4)), g1)
    assert torch.equal(g0.get_state(), g1.get_state())


def test_soft_tissue_boundaries_get_one_pixel_lines_and_bones_none():
    """Fascia: a 1-px line on one side of every boundary between two soft tissues; bone and cortex
    pixels never, and a soft tissue's edge against bone gets none (the cortex is that line)."""
    labels = torch.full((2, 32, 32), 5, dtype=torch.long)
    labels[:, :, 16:] = 6  # two muscles side by side: boundary between columns 15 and 16
    labels[:, 10:22, 12:20] = 20  # a cortex rim ...
    labels[:, 12:20, 14:18] = 1  # ... around a bone on that boundary
    soft = (labels > 4) & (labels != 20)
    line = ks.soft_boundary(labels, soft)
    assert not line[~soft].any()
    expected = torch.zeros_like(line)
    expected[:, :, 15] = True  # the lower id's side only, where both sides are muscle
    expected[:, 10:22, 15] = False  # there the bone and its rim sit
    assert torch.equal(line, expected), torch.nonzero(line ^ expected)[:5]


def test_streaks_run_along_the_fibres_near_s_i():
    """The streak field is long along S-I: in sagittal and coronal planes its lines run down the
    rows; in an axial plane they are cross-sections with no preferred direction."""
    cfg = ks.SynthConfig(streak_tilt_deg=0.0)
    t = torch.linspace(-80, 80, 160)
    rr, cc = torch.meshgrid(t, t, indexing="ij")
    zero = torch.zeros_like(rr)
    planes = {"sagittal": torch.stack([zero, cc, -rr], -1), "coronal": torch.stack([cc, zero, -rr], -1),
              "axial": torch.stack([cc, rr, zero], -1)}
    for name, pts in planes.items():
        for seed in range(3):
            lines = ks.streak_lines(pts[None], torch.zeros(3), cfg, torch.Generator().manual_seed(seed))[0]
            assert lines.shape == rr.shape and 0 <= float(lines.min()) and float(lines.max()) <= 1
            assert float(lines.max()) > 0.9 and float(lines.mean()) < 0.4  # thin lines, not a wash
            down = float((lines[1:] - lines[:-1]).abs().mean())
            across = float((lines[:, 1:] - lines[:, :-1]).abs().mean())
            if name == "axial":
                assert 0.5 < down / across < 2, (name, seed, down, across)
            else:
                assert down < 0.3 * across, (name, seed, down, across)


def test_soft_tissue_lines_leave_bones_the_target_and_the_old_stream_alone(volumes):
    vol = volumes[0][0]
    flat = dict(network_px=96, texture_sd=0.0, blur_px=(0.0, 0.0), downsample=(1.0, 1.0), bias_sd=0.0,
                noise_sd=(0.0, 0.0), sub_planes=1, elastic_mm=0.0, pad_fraction=0.0, cortex_px=(2, 2))
    base = ks.SynthConfig(**flat)
    lined = ks.SynthConfig(**flat, fascia_p=1.0, streak_p=1.0, streak_amp=0.5)
    varied = 0
    for seed in range(6):
        x0, y0, _ = ks.synthesise(vol, base, torch.Generator().manual_seed(seed))
        x1, y1, _ = ks.synthesise(vol, lined, torch.Generator().manual_seed(seed))
        assert torch.equal(y0, y1) and not torch.equal(x0, x1)
        for img, target in ((x0[0], y0), (x1[0], y1)):
            for bone in range(1, 5):  # a bone's marrow stays one flat intensity (inside its cortex)
                inner = -F.max_pool2d(-(target == bone).float()[None, None], 7, stride=1, padding=3)[0, 0] > 0.5
                if inner.sum() > 4:
                    assert float(img[inner].std()) < 1e-4, (seed, bone)
        # without lines the soft tissues are a few flat intensities; with streaks, a continuum
        soft = -F.max_pool2d(-(y1 == 0).float()[None, None], 9, stride=1, padding=4)[0, 0] > 0.5
        varied += int(x1[0][soft].unique().numel() > 10 * x0[0][soft].unique().numel())
    assert varied >= 5, varied
    g0, g1 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ks.synthesise(vol, ks.SynthConfig(network_px=96), g0)
    ks.synthesise(vol, ks.SynthConfig(network_px=96, fascia_p=0.0, streak_p=0.0, streak_amp=0.9,
                                      line_dark_p=0.1), g1)
    assert torch.equal(g0.get_state(), g1.get_state())


def test_evaluations_with_several_seeds_pool_their_series():
    def result(seed, rows):
        return {"checkpoint": "ck.pt", "seed": seed, "series": rows, "mean_dice": ke.mean_series_dice(rows)}
    a = result(777, [{"series": "s1", "femur": 0.8, "fibula": 0.2}, {"series": "s2", "femur": 0.6}])
    b = result(1777, [{"series": "s1", "femur": 0.9, "fibula": 0.6}])
    pooled = ke.pool_evaluations([a, b])
    assert pooled["seed"] == [777, 1777] and [r["seed"] for r in pooled["series"]] == [777, 777, 1777]
    assert pooled["mean_dice"]["femur"] == round((0.8 + 0.6 + 0.9) / 3, 4)
    assert pooled["mean_dice"]["fibula"] == 0.4  # a series without the fibula does not count for it
    assert a["mean_dice"]["fibula"] == 0.2 and np.isnan(pooled["mean_dice"]["tibia"])
    assert ke.pool_evaluations([a]) is a  # one seed: the result as it was, seed an int


def test_held_out_series_can_carry_the_soft_tissue_lines(volumes):
    """evaluate --synth fascia_p=1 streak_p=1: the 3D series gets the lines, its bone labels and
    geometry stay; with the lines off (default) nothing extra is drawn."""
    vol = volumes[0][0]
    kw = dict(n_slices=12, size_px=64, pixel_mm=2.0, slice_mm=3.0)
    flat = ks.synthesise_volume(vol, ks.SynthConfig(), torch.Generator().manual_seed(5), **kw)
    lined = ks.synthesise_volume(vol, ks.SynthConfig(fascia_p=1.0, streak_p=1.0), torch.Generator().manual_seed(5),
                                 **kw)
    assert np.array_equal(flat["labels"], lined["labels"]) and np.allclose(flat["origin"], lined["origin"])
    assert np.isfinite(lined["image"]).all() and not np.allclose(flat["image"], lined["image"])
    # same draws with zero streak amplitude: the difference is the streaks alone, in the soft tissues
    no_amp = ks.synthesise_volume(vol, ks.SynthConfig(fascia_p=1.0, streak_p=1.0, streak_amp=0.0),
                                  torch.Generator().manual_seed(5), **kw)
    diff = np.abs(lined["image"] - no_amp["image"])
    bone = lined["labels"] > 0
    inner = np.stack([ndimage.binary_erosion(b, iterations=3) for b in bone])
    outer = np.stack([~ndimage.binary_dilation(b, iterations=3) for b in bone])
    assert inner.sum() > 50 and diff[outer].mean() > 5 * diff[inner].mean(), (diff[outer].mean(), diff[inner].mean())
    g0, g1 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ks.synthesise_volume(vol, ks.SynthConfig(), g0, **kw)
    ks.synthesise_volume(vol, ks.SynthConfig(fascia_p=0.0, streak_p=0.0, streak_amp=0.9), g1, **kw)
    assert torch.equal(g0.get_state(), g1.get_state())
