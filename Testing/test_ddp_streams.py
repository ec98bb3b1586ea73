"""Every training script draws its own batches in each data-parallel process (issue 25, part 4).
Under torchrun, rank 1 must not draw rank 0's batches (the run would be no faster than one
process), and rank 0 must draw exactly what a single process draws (the same recipe, the same
model). The scripts' own data and stream code run here; only the process group is stood in for
(``trainloop.init_distributed`` answering rank r of 2; test_trainloop.py runs a real gloo group
through ``rank_stream`` and run_loop's check), and run_loop is stopped at its first batch."""
import numpy as np
import pytest
import torch
import trainloop
from SpineKneeSegLib.core.image_io import write_image
from SpineKneeSegLib.tasks import TASKS, make_phantom

pytestmark = pytest.mark.slow


class _Drawn(Exception):
    pass


def _first_batch(monkeypatch, module, call, rank: int | None):
    """The first batch ``call()`` hands to ``module.run_loop``: a single process (``rank`` None) or
    rank ``rank`` of two."""
    def stop_at_first_batch(net, optimiser, batches, *args, **kwargs):
        raise _Drawn(next(batches(0) if callable(batches) else batches))

    with monkeypatch.context() as m:
        m.setattr(module, "run_loop", stop_at_first_batch)
        if rank is not None:
            for owner in {trainloop, module}:  # the name where the script imported it, too
                if hasattr(owner, "init_distributed"):
                    m.setattr(owner, "init_distributed", lambda: (rank, 2))
        with pytest.raises(_Drawn) as drawn:
            call()
    return drawn.value.args[0]


def _same(a, b) -> bool:
    a, b = (x[0] if isinstance(x, (tuple, list)) else x for x in (a, b))
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _check(monkeypatch, module, call):
    single, first, second = (_first_batch(monkeypatch, module, call, r) for r in (None, 0, 1))
    assert _same(single, first)  # rank 0 draws as one process does
    assert not _same(first, second)  # rank 1 its own


def test_slice_trainer(monkeypatch, tmp_path):
    import slicetrain

    phantoms = [make_phantom("xray-femur", seed=s, shape=(64, 64), pixel_mm=5.6) for s in (5, 6, 7)]
    pairs = [(p.image, p.labels) for p in phantoms]  # each process takes every other batch of the epoch
    config = slicetrain.TrainConfig(network={"channels": (4, 8)}, epochs=1, batch_size=1, seed=0,
                                    preprocessing={"network_px": 64})
    _check(monkeypatch, slicetrain, lambda: slicetrain.train(TASKS["xray-femur"], pairs, config, tmp_path / "w.pt"))


def test_slice_trainer_takes_its_share_of_each_epoch(monkeypatch, tmp_path):
    """Each of two processes runs half an epoch's steps (rounded up, so they stay in step), not a
    whole epoch each: the data is seen once an epoch across them, not twice."""
    import slicetrain

    phantoms = [make_phantom("xray-femur", seed=s, shape=(64, 64), pixel_mm=5.6) for s in (5, 6, 7)]
    config = slicetrain.TrainConfig(network={"channels": (4, 8)}, epochs=2, batch_size=1, seed=0,
                                    preprocessing={"network_px": 64})
    steps = {}
    for world in (1, 2):
        with monkeypatch.context() as m:
            m.setattr(slicetrain, "init_distributed", lambda w=world: (0, w))
            m.setattr(slicetrain, "run_loop", lambda *a, **k: (_ for _ in ()).throw(_Drawn(a[4])))
            with pytest.raises(_Drawn) as drawn:
                slicetrain.train(TASKS["xray-femur"], [(p.image, p.labels) for p in phantoms], config,
                                 tmp_path / "w.pt")
        steps[world] = (drawn.value.args[0].steps, drawn.value.args[0].checkpoint_every)
    assert steps == {1: (6, 3), 2: (4, 2)}  # 3 batches an epoch: 2 a process


def test_lumbar_level_column_trainer(monkeypatch, tmp_path):
    import level_column as lc
    from SpineKneeSegLib.engine.preprocessing import training_slices

    phantom = make_phantom("lumbar-foramina", seed=3)
    x, y, _ = training_slices(phantom.image, phantom.labels.array, "sagittal", "zscore", 1.4)
    cases = [lc.PreparedCase("phantom", "myosegmentum", x, y, np.flatnonzero(y.reshape(len(y), -1).any(1)))]
    cfg = lc.ColumnConfig(steps=2, batch_size=2, canvas=128, threads=1,
                          network={"levels": 4, "base_channels": 8, "max_channels": 16, "activation": "elu",
                                   "norm": "batch"})
    _check(monkeypatch, lc, lambda: lc.train_column(cfg, tmp_path, cases, False, log=lambda *_: None))


def test_level_and_foramen_multinet_trainer(monkeypatch, tmp_path):
    import spine_levels
    from SpineKneeSegLib.engine.preprocessing import training_slices

    phantom = make_phantom("lumbar-foramina", seed=3)
    x, y, _ = training_slices(phantom.image, phantom.labels.array, "sagittal", "zscore", 1.4)
    prepared = [spine_levels.PreparedCase("phantom", x, y)]
    cfg = spine_levels.Config(epochs=1, batch_size=2)
    _check(monkeypatch, spine_levels, lambda: spine_levels.train_loop(cfg, tmp_path, prepared, None, False,
                                                                      log=lambda *_: None))


def test_brain_lesion_trainer(monkeypatch, tmp_path):
    import brain_wmh
    from SpineKneeSegLib.tasks.brain.phantom import brain_phantom

    ph = brain_phantom(4, slice_thickness_mm=4.0)
    write_image(ph.image, tmp_path / "flair.nii.gz")
    write_image(ph.labels, tmp_path / "lesions.nii.gz")
    cases = [{"id": "case4", "flair": tmp_path / "flair.nii.gz", "labels": tmp_path / "lesions.nii.gz"}]
    cfg = brain_wmh.Config(epochs=1, steps_per_epoch=1, batch_size=2, patch=64, slab_mm="8")
    _check(monkeypatch, brain_wmh, lambda: brain_wmh.train(cfg, cases, tmp_path / "run", log=lambda _: None))


def test_xray_femur_trainer(monkeypatch, tmp_path):
    import xray

    cfg = xray.Config(task="xray-femur", variant="cpu", network_px=64, n_train=2, n_val=1, steps=2, batch_size=2,
                      eval_every=2, noise_p=0.0, flip_p=0.0)
    _check(monkeypatch, xray, lambda: xray.train(cfg, tmp_path / "run", log=lambda *_: None))


def test_knee_synthetic_stream(monkeypatch, tmp_path):
    import knee_data as kd

    phantom = make_phantom("knee-bones", seed=0, shape=(40, 160, 160), spacing=(0.8, 0.8, 2.0))
    write_image(phantom.labels, tmp_path / "phantom.nrrd")
    volumes = [kd.prepare_volume(tmp_path / "phantom.nrrd", {1: 1, 2: 2, 3: 3, 4: 4}, 1.0)]
    cfg = kd.Config(batch_size=2, workers=0)

    def draw(rank):
        with monkeypatch.context() as m:
            if rank is not None:
                m.setattr(trainloop, "init_distributed", lambda: (rank, 2))
            return next(kd.batch_stream(volumes, kd.SynthConfig(), cfg, 0))

    single, first, second = draw(None), draw(0), draw(1)
    assert _same(single, first) and not _same(first, second)
