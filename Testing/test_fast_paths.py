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
