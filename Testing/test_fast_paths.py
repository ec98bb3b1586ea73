"""Shortcuts taken for speed give exactly what the plain computation gives (session 36)."""
from __future__ import annotations

import numpy as np
import torch
from SpineKneeSegLib.engine.inference import SATURATED_LOGIT, uint8_sigmoid


def _plain_uint8_sigmoid(x: np.ndarray) -> np.ndarray:
    """round(255 x sigmoid(x)) over every element, in float32 (the computation before the shortcut)."""
    with np.errstate(over="ignore"):
        q = np.exp(-x.astype(np.float32))
    q += 1.0
    np.divide(255.0, q, out=q)
    return np.rint(q, out=q).astype(np.uint8)


def test_uint8_sigmoid_equals_the_plain_computation_everywhere():
    rng = np.random.default_rng(0)
    logits = rng.normal(-8.0, 8.0, size=(3, 5, 40, 56)).astype(np.float32)
    edges = np.float32(SATURATED_LOGIT)
    special = np.array([edges, -edges, np.nextafter(edges, 0), np.nextafter(-edges, 0),
                        np.nextafter(edges, 99), np.nextafter(-edges, -99), 0.0, 1e30, -1e30,
                        np.inf, -np.inf, 6.24, -6.24, 6.25, -6.25], np.float32)
    logits.reshape(-1)[:special.size] = special
    # every float32 in [-8, 8] at a coarse step: all rounding boundaries of 0..255 are crossed
    dense = np.linspace(-8, 8, 200_001, dtype=np.float32)
    for x in (logits, dense.reshape(1, 1, 1, -1)):
        t = torch.from_numpy(x)
        got = uint8_sigmoid(t)
        assert got.dtype == np.uint8 and got.shape == x.shape
        assert np.array_equal(got, _plain_uint8_sigmoid(x))
    # a strided view (the network output cut to the grid) as well
    view = torch.from_numpy(logits)[..., :33]
    assert not view.is_contiguous()
    assert np.array_equal(uint8_sigmoid(view), _plain_uint8_sigmoid(view.numpy()))
    # channels-last (the network's own output layout): computed in memory order, returned as given
    last = torch.from_numpy(logits).contiguous(memory_format=torch.channels_last)
    assert not last.is_contiguous()
    assert np.array_equal(uint8_sigmoid(last), _plain_uint8_sigmoid(logits))
    # both saturated values and the middle occur
    assert {0, 255} <= set(np.unique(uint8_sigmoid(torch.from_numpy(dense))).tolist())
    assert len(np.unique(uint8_sigmoid(torch.from_numpy(dense)))) == 256


def test_histogram_percentile_is_numpys_percentile_to_the_bit():
    from SpineKneeSegLib.engine.preprocessing import histogram_percentile, integer_histogram, sampled_percentile

    rng = np.random.default_rng(1)
    qs = (0, 0.5, 1, 5, 10, 33.3, 50, 90, 99, 99.5, 100)
    for dtype in (np.uint8, np.int8, np.uint16, np.int16):
        info = np.iinfo(dtype)
        for size in (1, 2, 3, 17, 1000, 12_345):
            for spread in ("narrow", "wide", "gaps"):
                if spread == "narrow":
                    a = rng.integers(max(info.min, -20), min(info.max, 40), size)
                elif spread == "wide":
                    a = rng.integers(info.min, info.max, size, endpoint=True)
                else:  # a few far-apart values: interpolation between distant order statistics
                    a = rng.choice([info.min, 0, 3, info.max], size)
                a = a.astype(dtype)
                hist = integer_histogram(a)
                assert hist is not None and int(hist[0].sum()) == size
                got = histogram_percentile(*hist, qs)
                want = np.percentile(a, qs)
                if dtype in (np.int8, np.int16) and spread != "narrow":
                    # numpy subtracts the two order statistics in the input type: a signed range over
                    # half the type wraps in numpy itself, so only compare where it cannot
                    lo_hi = np.percentile(a.astype(np.int64), qs)
                    assert np.array_equal(got, lo_hi)
                else:
                    assert np.array_equal(got, want), (dtype, size, spread)
                assert histogram_percentile(*hist, 5) == np.percentile(a.astype(np.int64), 5)
    # floats (and empty arrays) keep np.percentile
    f = rng.normal(size=5000).astype(np.float32)
    assert integer_histogram(f) is None and sampled_percentile(f, 5) == np.percentile(f, 5)
    big = rng.integers(0, 255, 3_000_001).astype(np.uint8)
    assert sampled_percentile(big, (1, 99)).tolist() == np.percentile(big[::3], (1, 99)).tolist()


def test_zscore_statistics_of_integers_match_the_voxelwise_computation():
    from SpineKneeSegLib.engine.preprocessing import foreground_mask, normalisation_stats

    rng = np.random.default_rng(2)
    for dtype, shape in ((np.uint8, (20, 120, 130)), (np.uint16, (9, 300, 400)), (np.int16, (10, 80, 90)),
                         (np.uint8, (30, 520, 600))):  # the last over 8 M voxels: strided by 2, then sampled
        a = rng.gamma(2.0, 30.0, size=shape)
        a[:, :20] = 0  # background below the foreground threshold
        a = np.clip(a, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
        flat = a.reshape(-1)[::max(1, a.size // 4_000_000)]
        values = flat[foreground_mask(flat)]
        mean, std = normalisation_stats(a, "zscore")
        assert mean == float(np.mean(values, dtype=np.float64))
        assert abs(std - float(np.std(values, dtype=np.float64))) <= 4 * np.spacing(std)
    empty_background = np.full((4, 10, 10), 7, np.uint8)  # no voxel above the 5th percentile: all kept
    with np.testing.assert_raises(Exception):
        normalisation_stats(empty_background, "zscore")  # zero spread is refused, as before


def test_networks_built_without_random_init_load_to_the_same_weights_and_outputs():
    import threading

    from SpineKneeSegLib.engine.inference import SkipRandomInit, load_network
    from SpineKneeSegLib.engine.models import build_network
    from SpineKneeSegLib.engine.weights import LoadedWeights

    config = {"levels": 3, "base_channels": 4, "max_channels": 8}
    torch.manual_seed(0)
    trained = build_network("multinet", config).eval()
    weights = LoadedWeights(None, "", {"network": {"factory": "multinet", "config": config},
                                       "state_dict": trained.state_dict()})
    loaded = load_network(weights, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = build_network("multinet", config)
        plain.load_state_dict(trained.state_dict())
        from SpineKneeSegLib.engine.models import fold_batch_norm
        folded = fold_batch_norm(plain.eval()).to(memory_format=torch.channels_last)  # as load_network does
        assert loaded.state_dict().keys() == folded.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), folded.state_dict().values()))
        assert torch.equal(loaded(x), folded(x))
    # inside the mode the random initialisers leave a tensor as it is; outside they fill it
    t = torch.full((4, 4), 7.0)
    with SkipRandomInit():
        torch.nn.init.kaiming_uniform_(t)
        t.normal_()
        torch.nn.init.zeros_(t[0])  # not random: still done
    assert (t[1:] == 7).all() and (t[0] == 0).all()
    torch.nn.init.kaiming_uniform_(t)
    assert not (t == 7).any()
    # per thread: a network built in another thread meanwhile is initialised as usual
    built = {}
    go, done = threading.Event(), threading.Event()

    def other():
        go.wait()
        torch.manual_seed(1)
        built["net"] = build_network("multinet", config)
        done.set()

    worker = threading.Thread(target=other)
    worker.start()
    with SkipRandomInit():
        go.set()
        done.wait()
    worker.join()
    torch.manual_seed(1)
    reference = build_network("multinet", config)
    assert all(torch.equal(a, b) for a, b in zip(built["net"].state_dict().values(), reference.state_dict().values()))


def test_refiner_normalisation_from_the_stored_integers_is_the_same():
    from SpineKneeSegLib.tasks.spine.level_refinement import normalise

    rng = np.random.default_rng(3)
    for dtype, high in ((np.uint8, 256), (np.uint16, 4000), (np.int16, 3000)):
        for shape in ((1,), (7,), (6, 40, 30)):
            stored = rng.integers(0, high, shape).astype(dtype)
            pixels = stored.astype(np.float32)
            assert np.array_equal(normalise(pixels, stored), normalise(pixels))
    floats = rng.normal(size=(3, 10, 10)).astype(np.float32)
    assert np.array_equal(normalise(floats, floats), normalise(floats))  # not integers: np.percentile
