"""The refiner's nested setting choice (Training/level_refine.py choose): each fold's threshold and
band are chosen on the scans its refiner was trained on, never on the fold's own scans.

The refiner's network is replaced by a fixed probability map (its second input channel), because
what is tested is the choice, not a trained network; the outline redrawing, clean-up and scoring
are the real ones."""
import json

import level_refine
import numpy as np
import torch
from SpineKneeSegLib.engine.models import LevelRefiner

SIZE, SLICES = 32, 3


def square(lo: int, hi: int) -> np.ndarray:
    out = np.zeros((SLICES, SIZE, SIZE), np.uint8)
    out[:, lo:hi, lo:hi] = 1
    return out


def case(truth_lo: int, truth_hi: int, fold: int) -> dict:
    """Decoded L1 on [10:20]; the map is 0.9 there and 0.35 on the 1 px ring around it; the truth
    is either the ring too ([9:21]: a low threshold is best) or smaller ([11:19]: a high one is)."""
    labels = square(10, 20)
    prob = np.where(square(9, 21) > 0, 0.35, 0.0) + 0.55 * labels
    x = np.stack([np.zeros_like(prob), prob]).astype(np.float16)
    return {"x": x, "labels": labels, "truth": square(truth_lo, truth_hi), "fold": np.array(fold),
            "right": np.array(True), "box": np.array([[0, SLICES], [0, SIZE], [0, SIZE]])}


def test_choice_is_made_on_the_refiners_training_scans_only(tmp_path, monkeypatch):
    cases = {"t/grow0": case(9, 21, 0), "t/grow1": case(9, 21, 0),
             "t/shrink0": case(11, 19, 1), "t/shrink1": case(11, 19, 1)}
    np.savez(tmp_path / "in.npz", **{f"{cid.replace('/', '__')}__{k}": v for cid, c in cases.items() for k, v in c.items()})
    # as `cv` keeps them: fold 0 the seed's refiner, fold 1 a wider one seeing a slice either side
    # (choose must build each fold's network from its recipe to load its weights)
    for f, recipe in ((0, {"steps": 1}), (1, {"steps": 1, "width": 8, "neighbours": 1})):
        torch.save(LevelRefiner(**level_refine.network_config(recipe)).state_dict(), tmp_path / f"refine_fold{f}.pt")
        (tmp_path / f"refine_fold{f}.json").write_text(json.dumps({"recipe": recipe, "cases": {}}))
    monkeypatch.setattr(level_refine, "refiner_probability", lambda net, x: x[1])

    assert level_refine.main(["choose", "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path), "--threads", "1"]) == 0
    out = json.loads((tmp_path / "refine_choose.json").read_text())
    chosen, held = out["chosen"], out["held_out_grid_not_used_for_choosing"]
    # fold 0's scans want the ring (0.3), but fold 0 is chosen on fold 1's scans, which do not: every
    # threshold from 0.4 scores the same there, and the tie goes to the seed's 0.5 / 2 px
    assert (chosen["0"]["threshold"], chosen["0"]["band_px"]) == (0.5, 2)
    assert held["0"]["0.3/2"] > held["0"]["0.5/2"]
    # and the other way round
    assert chosen["1"]["threshold"] == 0.3
    assert held["1"]["0.5/2"] > held["1"][f"0.3/{chosen['1']['band_px']}"]
    # the scored rows are the held-out scans at the chosen setting
    for f in ("0", "1"):
        setting = f"{chosen[f]['threshold']}/{chosen[f]['band_px']}"
        rows = [r for r in out["cases"].values() if r["fold"] == int(f)]
        assert len(rows) == 2
        assert np.isclose(np.mean([np.mean(list(r["after"].values())) for r in rows]), held[f][setting], atol=1e-4)


def test_choice_refuses_without_the_fold_refiners(tmp_path, capsys):
    np.savez(tmp_path / "in.npz", **{f"t__a__{k}": v for k, v in case(9, 21, 0).items()})
    assert level_refine.main(["choose", "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path)]) == 2
    assert "refine_fold0.pt" in capsys.readouterr().err
