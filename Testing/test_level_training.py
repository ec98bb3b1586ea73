"""The whole-column level trainer (issue 21): label/image slice mismatches resolved from the image,
duplicates kept in one fold, a training run that learns, resumes bit for bit and whose weights run
through the product's pipeline with the anatomical decoding."""

import level_column as lc  # noqa: E402
import numpy as np
import pytest
import torch
from SpineKneeSegLib.core.datasets import data_root  # noqa: E402
from SpineKneeSegLib.core.image import Image  # noqa: E402
from SpineKneeSegLib.tasks import make_phantom  # noqa: E402


def _bodies_image(extra_at: str):
    """An image with three bright boxes on slices 3..8 and a label map with one slice more,
    inserted at the start or the end (the label slices otherwise match the image)."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 0.3, (12, 64, 64)).astype(np.float32)
    labels = np.zeros((12, 64, 64), np.uint8)
    for n, rows in enumerate((slice(5, 15), slice(25, 35), slice(45, 55))):
        image[3:9, rows, 20:40] += 3.0
        labels[3:9, rows, 20:40] = n + 1
    extra = np.zeros((1, 64, 64), np.uint8)
    labels = np.concatenate([extra, labels] if extra_at == "start" else [labels, extra])
    return Image(image, (1, 1, 4)), Image(labels, (1, 1, 4))


@pytest.mark.parametrize("extra_at, kept", [("start", "first label slice dropped"),
                                            ("end", "last label slice dropped")])
def test_extra_label_slice_is_found_from_the_image(extra_at, kept):
    image, labels = _bodies_image(extra_at)
    aligned, note = lc.align_extra_label_slice(image, labels)
    assert note.startswith(kept), note
    assert aligned.shape == image.array.shape
    assert np.array_equal(aligned > 0, image.array > 1.5)


def test_undecided_alignment_is_refused():
    image = Image(np.random.default_rng(1).normal(0, 1, (6, 32, 32)).astype(np.float32), (1, 1, 4))
    labels = np.zeros((7, 32, 32), np.uint8)
    labels[:, 10:20, 10:20] = 1  # the same on every slice: both alignments alike
    aligned, note = lc.align_extra_label_slice(image, Image(labels, (1, 1, 4)))
    assert aligned is None and note.startswith("excluded")


def test_folds_keep_duplicates_together_and_spread_datasets():
    cases = [{"id": f"myosegmentum/case{i:02d}", "dataset": "myosegmentum", "hash": f"h{i}"} for i in range(20)]
    cases += [{"id": f"zukic-t2/case{i:02d}", "dataset": "zukic-t2", "hash": f"z{i}"} for i in range(5)]
    cases[3]["hash"] = cases[4]["hash"] = "same"
    folds = lc.make_folds(cases, 5)
    assert sorted(sum(folds, [])) == sorted(c["id"] for c in cases)
    together = [f for f in folds if "myosegmentum/case03" in f]
    assert "myosegmentum/case04" in together[0]
    assert [sum(i.startswith("zukic") for i in f) for f in folds] == [1] * 5
    assert max(map(len, folds)) - min(map(len, folds)) <= 2  # groups are dealt whole (here one of two scans)


@pytest.mark.data
def test_shared_spine_data_cases_duplicates_and_alignments():
    root = data_root()
    if root is None or not (root / "spine" / "zukic-t2").exists():
        pytest.skip("shared spine data not present (set SPINEKNEESEG_DATA)")
    cases = lc.spine_cases(root, log=lambda *_: None)
    assert len(cases) == 54
    groups = sorted(sorted(g) for g in lc.duplicate_groups(cases) if len(g) > 1)
    assert groups == [["myosegmentum/case18", "myosegmentum/case19"], ["myosegmentum/case32", "myosegmentum/case33"]]
    resolved = {c["id"]: c["note"] for c in cases if c["note"]}
    assert sorted(resolved) == [f"zukic-t2/case{n}" for n in ("02", "04", "08", "10")]
    assert all(note.startswith("last label slice dropped") for note in resolved.values())
    folds = lc.make_folds(cases, 5)
    assert any({"myosegmentum/case18", "myosegmentum/case19"} <= set(f) for f in folds)


def _tiny_config(**kw):
    return lc.ColumnConfig(steps=kw.pop("steps", 40), batch_size=4, canvas=128, lr=3e-3, max_rotation_deg=0,
                           scale=0.0, shift_px=0, warp_px=0.0, fov_cut_p=0.0, noise_sd=0.0, threads=1,
                           network={"levels": 4, "base_channels": 8, "max_channels": 16, "activation": "elu",
                                    "norm": "batch"}, **kw)


@pytest.fixture(scope="module")
def phantom_cases():
    phantom = make_phantom("lumbar-foramina", seed=3)
    from SpineKneeSegLib.engine.preprocessing import training_slices

    x, y, _ = training_slices(phantom.image, phantom.labels.array, "sagittal", "zscore", 1.4)
    return phantom, [lc.PreparedCase("phantom", "myosegmentum", x, y, np.flatnonzero(y.reshape(len(y), -1).any(1)))]


@pytest.fixture(scope="module")
def trained_run(phantom_cases, tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        return lc.train_column(_tiny_config(steps=80), tmp_path_factory.mktemp("run"), phantom_cases[1], False,
                               log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)


def test_training_resumes_bit_for_bit(phantom_cases, tmp_path):
    threads = torch.get_num_threads()
    _, cases = phantom_cases
    try:
        straight = lc.train_column(_tiny_config(steps=8), tmp_path / "straight", cases, False, log=lambda *_: None)
        assert lc.train_column(_tiny_config(steps=8), tmp_path / "split", cases, False, log=lambda *_: None,
                               max_minutes=0.0) is None  # stops after one step, state saved
        resumed = lc.train_column(_tiny_config(steps=8), tmp_path / "split", cases, True, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["metadata"]["recipe"] == "whole-column" and a["metadata"]["steps"] == 8


def test_training_overfits_a_fixed_batch(phantom_cases, trained_run):
    """A fixed batch, scored by the initial and the trained network: the loss at least halves."""
    from SpineKneeSegLib.engine.models import build_network

    _, cases = phantom_cases
    cfg = _tiny_config(steps=80)
    x, target = lc.sample_batch(cases, cfg, np.random.default_rng(7), torch.Generator().manual_seed(7))
    criterion = lc.make_loss(cfg, lc.level_weights(cases))
    torch.manual_seed(cfg.seed)
    initial = build_network("multinet", lc.network_config(cfg)).eval()
    trained = build_network("multinet", lc.network_config(cfg))
    trained.load_state_dict(torch.load(trained_run, weights_only=True)["state_dict"])
    with torch.no_grad():
        before, after = float(criterion(initial(x), target)), float(criterion(trained.eval()(x), target))
    assert after <= 0.5 * before, (before, after)


@pytest.mark.mrml
def test_trained_weights_run_through_the_pipeline_with_decoding(phantom_cases, trained_run, tmp_path):
    """This trainer's checkpoint loads and runs through the product's pipeline with the decoding
    (naming accuracy: test_level_decoding on phantoms, test_lumbar_real with the shipped model)."""
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
    from SpineKneeSegLib.tasks import TASKS

    phantom, _ = phantom_cases
    write_image(phantom.image, tmp_path / "scan.nii.gz")
    report = run_case(TASKS["lumbar-foramina"], [str(tmp_path / "scan.nii.gz")], tmp_path / "out",
                      RunOptions(weights=str(trained_run)))
    decoding = report["summaries"]["level_decoding"]
    assert 0.0 <= report["summaries"]["level_confidence"] <= 1.0
    names = [b["name"] for b in decoding["bodies"] if b["name"].startswith("L")]
    assert names and names == sorted(names) and len(names) == len(set(names))  # one run, named bodies
    assert names == [f"L{k}" for k in range(int(names[0][1]), int(names[-1][1]) + 1)]  # consecutive
    # the doubtful flag reaches the warnings (the foramen markers' descriptions are checked in
    # test_lumbar_real: markers need two bodies, and this 80-step model finds one or two)
    warned = any(w.startswith("level count doubtful") for w in report["warnings"])
    assert warned == decoding["doubtful"]


def test_packed_cases_round_trip_within_half_a_quantisation_step(phantom_cases, tmp_path):
    """'pack' (for a GPU machine without the data or SimpleITK): labels exact, intensities within
    half of the scan's 8-bit step; a different recipe spacing is refused."""
    _, cases = phantom_cases
    records = [{"id": "phantom", "dataset": "myosegmentum", "hash": "h", "note": ""}]
    info = lc.pack_cases(tmp_path / "p.pkl.xz", records, cases, 1.4)
    back_records, back = lc.unpack_cases(tmp_path / "p.pkl.xz", 1.4)
    assert back_records == records and info["scans"] == 1
    step = (cases[0].stack.max() - cases[0].stack.min()) / 255
    assert np.abs(back[0].stack - cases[0].stack).max() <= step / 2 + 1e-5
    assert np.array_equal(back[0].labels, cases[0].labels)
    assert np.array_equal(back[0].body_slices, cases[0].body_slices)
    with pytest.raises(ValueError, match="1.4 mm"):
        lc.unpack_cases(tmp_path / "p.pkl.xz", 1.0)


def test_sampler_pads_scans_of_different_sizes_without_moving_them(phantom_cases):
    """Scans of different in-plane sizes share one zero-padded stack: a scan sampled with a
    bigger one beside it gives the same batch as when sampled alone (same draws, no intensity
    or geometry randomness left but the slice and the warp seed)."""
    _, cases = phantom_cases
    small = cases[0]
    big = lc.PreparedCase("big", "zukic-t2", np.pad(small.stack, ((0, 0), (0, 40), (0, 70))),
                          np.pad(small.labels, ((0, 0), (0, 40), (0, 70))), small.body_slices)
    cfg = _tiny_config()  # no rotation, scale, shift, warp, cut or noise
    alone = lc.ColumnSampler([small], cfg)
    shared = lc.ColumnSampler([small, big], cfg)
    shared.probabilities = np.array([1.0, 0.0])  # always the small scan
    a = alone(np.random.default_rng(5), torch.Generator().manual_seed(5))
    b = shared(np.random.default_rng(5), torch.Generator().manual_seed(5))
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.equal(a[1], b[1])  # grid rounding only


def test_parallel_runner_with_fixed_steps_trains_every_fold_and_the_final_model(phantom_cases, tmp_path):
    """level_parallel.py --steps (the lent-GPU runner, here on the CPU): no probe, one process per
    fold model and one for the final model, each for exactly the steps given, plan.json with the
    commands that reproduce them; --steps and --budget-minutes together are refused."""
    import json

    import level_parallel

    _, cases = phantom_cases
    records = [{"id": f"myosegmentum/case{k}", "dataset": "myosegmentum", "hash": str(k), "note": ""} for k in (1, 2)]
    lc.pack_cases(tmp_path / "p.pkl.xz", records, cases * 2, 1.4)
    net = '{"levels": 3, "base_channels": 4, "max_channels": 8, "activation": "elu", "norm": "batch"}'
    argv = ["--packed", str(tmp_path / "p.pkl.xz"), "--out", str(tmp_path / "run"), "--folds", "2", "--steps", "2",
            "--recipe", f"T=--batch-size 2 --canvas 64 --network '{net}'", "--", "--device", "cpu", "--threads", "1"]
    assert level_parallel.main(argv) == 0
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["exit_codes"] == {"T/fold0": 0, "T/fold1": 0, "T/final": 0} and plan["probe"] == {}
    assert all("--steps 2" in c for c in plan["commands"].values())
    for job in ("fold0", "fold1", "final"):
        meta = torch.load(tmp_path / "run" / "T" / job / "final.pt", weights_only=False)["metadata"]
        assert meta["steps"] == 2 and meta["config"]["canvas"] == 64
    held_out = {json.loads((tmp_path / "run" / "T" / "folds.json").read_text())["folds"][f][0] for f in (0, 1)}
    assert held_out == {"myosegmentum/case1", "myosegmentum/case2"}  # each fold holds out the other case
    with pytest.raises(SystemExit):
        level_parallel.main(argv[:-5] + ["--budget-minutes", "1", "--", "--device", "cpu"])


def test_dice_ceiling_is_one_on_the_native_grid_and_drops_with_nearest_targets():
    """Training/level_ceiling.py: a perfect network on the scan's own 1 mm grid scores 1; on a
    1.4 mm grid, labels averaged onto it come back nearly whole and nearest-sampled ones lose
    boundary voxels (the training targets' own limit)."""
    from level_ceiling import case_ceilings

    rng = np.random.default_rng(1)
    labels = np.zeros((6, 120, 90), np.uint8)
    for level in range(1, 6):  # five bodies down the column, their edges off the 1.4 mm grid
        top = 8 + 21 * (level - 1) + int(rng.integers(0, 3))
        labels[1:5, top:top + 17, 30:61] = level
    image = Image(rng.normal(100, 10, labels.shape).astype(np.float32), (1.0, 1.0, 4.0))
    ceilings = case_ceilings(image, labels, [1.4, 1.0])
    assert ceilings["1 mm area"] == ceilings["1 mm nearest"] == 1.0
    assert ceilings["1.4 mm area"] > 0.99 > ceilings["1.4 mm nearest"] > 0.85


def test_soft_targets_are_the_labels_resampled_as_the_image_and_train(phantom_cases, tmp_path):
    """targets="soft": each level's share of a pixel on the network grid (exactly one-hot on the
    scan's own pixels; shares summing to one, with fractional boundaries, at 1.4 mm) stays soft
    through the warp and the field-of-view cut, survives packing, trains, and is refused where
    the fractions were never made."""
    from SpineKneeSegLib.engine.preprocessing import training_slices

    phantom, cases = phantom_cases
    labels = phantom.labels.array
    native_mm = float(min(phantom.image.spacing[:2]))
    _, y_native, grid_native = training_slices(phantom.image, labels, "sagittal", "zscore", native_mm)
    native = lc.label_fractions(phantom.image, labels, grid_native)
    assert set(np.unique(native)) <= {0, 255} and np.array_equal(native.argmax(1), y_native)
    _, y, grid = training_slices(phantom.image, labels, "sagittal", "zscore", 1.4)
    shares = lc.label_fractions(phantom.image, labels, grid)
    assert shares.shape == (len(y), 6, *y.shape[1:])
    assert np.abs(shares.astype(int).sum(1) - 255).max() <= 3  # rounding of six shares
    fractional = (shares > 0) & (shares < 255)
    assert fractional[:, 1:].any() and (shares.argmax(1) == y).mean() > 0.97

    soft_case = lc.PreparedCase("phantom", "myosegmentum", cases[0].stack, y, cases[0].body_slices, shares)
    records = [{"id": "phantom", "dataset": "myosegmentum", "hash": "h", "note": ""}]
    lc.pack_cases(tmp_path / "soft.pkl.xz", records, [soft_case], 1.4)
    soft_case = lc.unpack_cases(tmp_path / "soft.pkl.xz", 1.4)[1][0]
    assert np.array_equal(soft_case.fractions, shares)
    from dataclasses import replace

    cfg = replace(_tiny_config(steps=4, targets="soft"), fov_cut_p=1.0, warp_px=3.0)
    _, target = lc.ColumnSampler([soft_case], cfg)(np.random.default_rng(3), torch.Generator().manual_seed(3))
    assert target.shape == (cfg.batch_size, 5, cfg.canvas, cfg.canvas) and 0 <= float(target.min())
    assert float(target.sum(1).max()) <= 1.0 + 1e-4 and ((target > 0.05) & (target < 0.95)).any()  # soft edges
    _, hard = lc.ColumnSampler([soft_case], replace(cfg, targets="nearest"))(np.random.default_rng(3),
                                                                              torch.Generator().manual_seed(3))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}  # the seed's targets stay hard
    threads = torch.get_num_threads()
    try:
        final = lc.train_column(cfg, tmp_path / "run", [soft_case], False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert torch.load(final, weights_only=True)["metadata"]["config"]["targets"] == "soft"
    with pytest.raises(ValueError, match="fractions"):
        lc.ColumnSampler(cases, cfg)
    with pytest.raises(ValueError, match="unknown targets"):
        lc.ColumnSampler(cases, _tiny_config(targets="fuzzy"))


def test_context_targets_mark_the_half_planes_beyond_the_column_ends():
    """beyond_ends on a drawn column (rows run inferior): "above L1" is every row above L1's top
    row in each canvas column, "below L5" every row below L5's bottom row, columns without the body
    taking the nearest column's row; a level cut away by the field of view gives 0 (its beyond
    region is cut away too); a slice that never held the level gives -1 (ignored)."""
    y = torch.zeros((3, 40, 20), dtype=torch.long)
    for level, (top, bottom) in enumerate([(8, 11), (13, 16), (18, 21), (23, 26), (28, 31)], start=1):
        y[0, top:bottom + 1, 6:12] = level
    y[0, 28:33, 10:12] = 5  # L5 reaches two rows lower in columns 10-11 (a tilted endplate)
    keep = torch.ones((3, 40), dtype=torch.bool)
    y[1] = y[0]
    y[1, 27:] = 0  # the field of view ends above L5: L5 cut away
    keep[1, 27:] = False
    had = (y[:, None] == torch.arange(1, 6)[None, :, None, None]).flatten(2).any(2)
    had[1] = True  # slice 1 held L5 before the cut
    t = lc.beyond_ends(y, keep, had)  # slice 2: no body at all
    assert t.shape == (3, 2, 40, 20)
    above, below = t[0, 0], t[0, 1]
    assert torch.equal(above[:8], torch.ones(8, 20)) and not above[8:].any()
    assert below[32:, 6:10].all() and not below[:32, 6:10].any()  # L5's bottom row 31 there
    assert below[33:, 10:].all() and not below[:33, 10:].any()  # 32 in the tilted columns and beyond
    assert below[32:, :6].all() and not below[:32, :6].any()  # the nearest column's row on the left
    assert not t[1, 1].any() and t[1, 0][:8].all()  # L5 cut away: nothing below it inside the view
    assert (t[2] == -1).all()
    logits = torch.zeros_like(t)
    assert float(lc.context_bce(logits[2:], t[2:])) == 0.0  # nothing defined, nothing learnt
    assert abs(float(lc.context_bce(logits[:1], t[:1])) - np.log(2)) < 1e-5


def test_context_channels_train_under_bf16_and_are_stripped_from_the_saved_model(phantom_cases, tmp_path):
    """context_targets: the training network has 5 + 2 outputs, the saved one 5, whose logits are
    exactly the training network's first five (the heads' summed 1x1 outputs); bfloat16 autocast
    trains too and is recorded where the CPU computes it natively, and is refused where it would be
    emulated (about 20 times slower); an unknown autocast is refused."""
    from dataclasses import replace

    from SpineKneeSegLib.engine.inference import native_bfloat16
    from SpineKneeSegLib.engine.models import build_network

    _, cases = phantom_cases
    native = native_bfloat16(torch.device("cpu"))
    cfg = replace(_tiny_config(steps=4), context_targets=True, autocast="bf16" if native else "none")
    if not native:
        with pytest.raises(ValueError, match="no native bfloat16"):
            lc.train_column(replace(cfg, autocast="bf16"), tmp_path / "refused", cases, False, log=lambda *_: None)
        assert not (tmp_path / "refused").exists()  # refused before anything was written
    x, target = lc.sample_batch(cases, cfg, np.random.default_rng(2), torch.Generator().manual_seed(2))
    assert target.shape[1] == 7
    threads = torch.get_num_threads()
    try:
        final = lc.train_column(cfg, tmp_path / "run", cases, False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    saved = torch.load(final, weights_only=True)
    assert saved["network"]["config"]["out_channels"] == 5
    assert saved["metadata"]["config"]["context_targets"] and saved["metadata"]["config"]["autocast"] == cfg.autocast
    training = build_network("multinet", lc.network_config(cfg, training=True)).eval()
    training.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"])
    shipped = build_network("multinet", saved["network"]["config"]).eval()
    shipped.load_state_dict(saved["state_dict"])
    rebuilt = build_network("multinet", lc.with_context_heads(saved)[0]).eval()
    rebuilt.load_state_dict(lc.with_context_heads(saved)[1])  # the context heads kept in the metadata
    with torch.no_grad():
        assert torch.allclose(shipped(x), training(x)[:, :5], atol=1e-6)
        assert torch.equal(rebuilt(x), training(x))  # all seven outputs, bit for bit
    # a model saved before the heads were kept gets them from its run's last checkpoint
    without = {**saved, "metadata": {k: v for k, v in saved["metadata"].items() if k != "context_heads"}}
    torch.save(without, final)
    with pytest.raises(ValueError, match="kept no context heads"):
        lc.with_context_heads(torch.load(final, weights_only=True))
    lc.attach_context(final, tmp_path / "run" / "last.pt")
    again = torch.load(final, weights_only=True)
    assert all(torch.equal(again["metadata"]["context_heads"][k], v) for k, v in saved["metadata"]["context_heads"].items())
    assert all(torch.equal(again["state_dict"][k], v) for k, v in saved["state_dict"].items())
    other = tmp_path / "other.pt"
    torch.save({**saved, "state_dict": {k: v + 1 if k.startswith("heads.0") else v
                                        for k, v in saved["state_dict"].items()}}, other)
    with pytest.raises(ValueError, match="not the training network"):
        lc.attach_context(other, tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match="unknown autocast"):
        lc.autocast_context(replace(cfg, autocast="fp8"))


def test_ensemble_of_two_runs_averages_their_probabilities_fold_by_fold(phantom_cases, trained_run, tmp_path):
    """level_ensemble.py: two runs on the same folds become one run whose fold and final models are
    mean_of checkpoints (members' sigmoid probabilities averaged, read by the product's loader
    like one network), its recipe the members' with differing settings listed; runs on other
    folds are refused."""
    import json
    import shutil

    import level_ensemble
    from SpineKneeSegLib.engine.inference import load_network
    from SpineKneeSegLib.engine.weights import resolve_weights
    from SpineKneeSegLib.tasks import TASKS

    _, cases = phantom_cases
    threads = torch.get_num_threads()
    try:
        other = lc.train_column(_tiny_config(steps=6, seed=1), tmp_path / "seed1", cases, False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    runs = []
    for name, ckpt, seed in (("a", trained_run, 0), ("b", other, 1)):
        run = tmp_path / name
        for model in ("fold0", "fold1", "final"):
            (run / model).mkdir(parents=True)
            shutil.copy(ckpt, run / model / "final.pt")
        (run / "folds.json").write_text(json.dumps({"folds": [["x"], ["y"]], "duplicates": [], "label_notes": {},
                                                    "config": {"steps": 6, "seed": seed}}))
        runs.append(run)
    assert level_ensemble.main(["--member", str(runs[0]), "--member", str(runs[1]), "--out", str(tmp_path / "e")]) == 0
    folds = json.loads((tmp_path / "e" / "folds.json").read_text())
    assert folds["folds"] == [["x"], ["y"]] and folds["config"] == {"steps": 6, "seed": [0, 1]}
    card = TASKS["lumbar-foramina"]
    weights = resolve_weights(card, tmp_path / "e" / "final" / "final.pt")
    assert weights.network["factory"] == "mean_of" and weights.checkpoint["metadata"]["ensemble_of"] == 2
    assert weights.network["config"]["out_channels"] == 5  # what the pipeline checks against the task
    ensemble = load_network(weights, torch.device("cpu"))
    members = [load_network(resolve_weights(card, p), torch.device("cpu")) for p in (trained_run, other)]
    x = lc.sample_batch(cases, _tiny_config(), np.random.default_rng(4), torch.Generator().manual_seed(4))[0]
    with torch.no_grad():
        expected = torch.stack([m(x).sigmoid() for m in members]).mean(0)
        assert torch.allclose(ensemble(x).sigmoid(), expected, atol=1e-5)
        assert not torch.allclose(members[0](x).sigmoid(), expected, atol=1e-3)  # the members do differ
    (runs[1] / "folds.json").write_text(json.dumps({"folds": [["y"], ["x"]], "config": {}}))
    with pytest.raises(SystemExit, match="folds differ"):
        level_ensemble.make_ensemble_run(runs, tmp_path / "bad")


def test_kept_results_outlive_the_run_and_report_partially(phantom_cases, trained_run, tmp_path):
    """spine_levels.py keep: a scored fold's evaluation and its model's SHA256 go into a folder that
    is committed (Training/runs is not); cv-report --partial reports the folds kept so far, and
    without it refuses a cross-validation with a fold missing; a stale evaluation (older than its
    model) and a folder kept from other folds are refused."""
    import json
    import os
    import re
    import shutil

    from level_eval import cv_report, evaluate_fold
    from level_results import keep
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.engine.weights import check_weights_dir, sha256_of
    import spine_levels

    phantom, _ = phantom_cases
    write_image(phantom.image, tmp_path / "phantom.nii.gz")
    case = {"id": "a/case1", "image": tmp_path / "phantom.nii.gz", "aligned_labels": phantom.labels.array}
    run = tmp_path / "run"
    (run / "fold0").mkdir(parents=True)
    shutil.copy(trained_run, run / "fold0" / "final.pt")
    (run / "folds.json").write_text(json.dumps({"folds": [["a/case1"], ["a/case2"]], "duplicates": [],
                                                "label_notes": {}, "config": {"steps": 80}}))
    evaluate_fold(run / "fold0" / "final.pt", [case], run / "fold0" / "evaluation.json", log=lambda *_: None)
    assert spine_levels.main(["keep", "--out", str(run), "--to", str(tmp_path / "kept")]) == 0
    kept = tmp_path / "kept"
    model = json.loads((kept / "fold0" / "model.json").read_text())
    assert model["sha256"] == sha256_of(trained_run) and model["steps"] == 80
    assert not (kept / "fold0" / "final.pt").exists() and not (kept / "fold1").exists()  # weights on request only
    assert spine_levels.main(["keep", "--out", str(run), "--to", str(tmp_path / "heavy"), "--weights"]) == 0
    heavy = tmp_path / "heavy" / "fold0"
    assert sha256_of(heavy / "final.pt") == model["sha256"]
    assert check_weights_dir(heavy, root=heavy) == {"final.pt": "ok"}  # registered where it lies, as the tree asks
    card = (heavy / "card.md").read_text()
    assert "not a release" in card and model["sha256"] in card and re.search(r"[01] of 1 named right", card)
    summary = cv_report(kept, partial=True)
    assert summary["folds_scored"] == [0] and summary["cases"] == 1
    assert summary["decoded/full"]["scans"] == 1
    assert summary["body_threshold"]["per_fold"][0] == 0.5  # no other fold scored: the default, not a mean over nothing
    with pytest.raises(FileNotFoundError, match="fold 1 not evaluated"):
        cv_report(kept)
    later = (run / "fold0" / "evaluation.json").stat().st_mtime + 10
    os.utime(run / "fold0" / "final.pt", (later, later))  # the model was trained again after its scoring
    with pytest.raises(ValueError, match="older than"):
        keep(run, kept)
    os.utime(run / "fold0" / "evaluation.json", (later + 1, later + 1))
    torch.save({"other": 1}, heavy / "final.pt")  # what was kept is not the run's model any more
    with pytest.raises(ValueError, match="another model"):
        keep(run, tmp_path / "heavy")
    (run / "folds.json").write_text(json.dumps({"folds": [["a/case2"], ["a/case1"]], "duplicates": []}))
    with pytest.raises(ValueError, match="folds differ"):
        keep(run, kept)


def test_more_folds_of_a_run_keep_its_recipe(tmp_path, capsys):
    """cv on a run begun earlier: a command whose recipe differs from the run's folds.json is refused
    (one run, one recipe), --same-recipe takes the stored one, and how it runs (threads, device,
    autocast) may change between machines."""
    import json
    from dataclasses import asdict, replace

    import spine_levels

    stored = lc.ColumnConfig(steps=1300, batch_size=32, context_targets=True, seed=1, threads=2)
    folds_json = tmp_path / "folds.json"
    folds_json.write_text(json.dumps({"folds": [["a"], ["b"]], "config": asdict(stored)}))
    assert spine_levels.recipe_of_run(folds_json, replace(stored, threads=16, device="cuda"), False).threads == 16
    with pytest.raises(ValueError, match=r"seed=0 \(run: 1\).*--same-recipe"):
        spine_levels.recipe_of_run(folds_json, replace(stored, seed=0), False)
    with pytest.raises(ValueError, match="context_targets=False"):
        spine_levels.recipe_of_run(folds_json, lc.ColumnConfig(steps=1300, batch_size=32, seed=1), False)
    taken = spine_levels.recipe_of_run(folds_json, lc.ColumnConfig(threads=4, autocast="bf16"), True)
    assert taken == replace(stored, threads=4, autocast="bf16")
    # the command refuses before it reads anything (no pack, no data needed to be refused)
    assert spine_levels.main(["cv", "--out", str(tmp_path), "--packed", str(tmp_path / "none.pkl.xz"),
                              "--fold", "1", "--seed", "0"]) == 2
    assert "seed=0 (run: 1)" in capsys.readouterr().err  # refused for the recipe, not for the missing pack


def test_context_maps_reach_the_decoder_through_the_products_own_slicing(phantom_cases, tmp_path):
    """level_context_decoding: the kept context heads, run where the product reads levels 1-2, give
    the training network's "above L1" / "below L5" probabilities on the scan's grid; decoding with
    them at weight 0 is the seed's decoding, and a model without heads is refused."""
    from dataclasses import replace

    import level_context_decoding as lcd
    from level_eval import run_network
    from SpineKneeSegLib.engine.models import build_network
    from SpineKneeSegLib.engine.weights import load_checkpoint
    from SpineKneeSegLib.tasks.spine.level_decoding import DecodingParameters

    phantom, cases = phantom_cases
    threads = torch.get_num_threads()
    try:
        final = lc.train_column(replace(_tiny_config(steps=4), context_targets=True), tmp_path / "run", cases, False,
                                log=lambda *_: None)
        plain = lc.train_column(_tiny_config(steps=2), tmp_path / "plain", cases, False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    wrapped = lcd.context_network(final)
    config, state = lc.with_context_heads(load_checkpoint(final))
    full = build_network("multinet", config).eval()
    full.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = wrapped(x)
        assert torch.allclose(out[:, :2], full(x)[:, 5:], atol=1e-4)  # batch norm folded: not bit for bit
        assert (out[:, 2:] == -30).all()
    pre = {"in_plane_spacing_mm": 1.4}
    context = run_network(wrapped, pre, phantom.image).probabilities
    assert context.shape[1:] == phantom.image.array.shape and context[2:].max() <= 1  # ~sigmoid(-30): 0 of 255
    levels = lcd.load_network(lcd.resolve_weights(lcd.CARD, final), torch.device("cpu"))
    seed, with_context = lcd.decode_both(levels, wrapped, pre, phantom.image, DecodingParameters(), 0.0)
    assert np.array_equal(seed.labels, with_context.labels) and seed.run_scores == with_context.run_scores
    with pytest.raises(ValueError, match="kept no context heads"):
        lcd.context_network(plain)
