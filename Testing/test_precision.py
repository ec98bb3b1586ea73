"""bfloat16 inference (`--precision bfloat16`): the networks' forward pass under bfloat16 autocast
with float32 logits out, asked for per run and recorded in the report; a device without native
bfloat16 runs float32 and says so; an unknown precision is refused. (Speed and agreement on the
real reference inputs: Testing/benchmarks/bench_precision.py.)"""
import json

import pytest
import torch
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.errors import InputError
from SpineKneeSegLib.core.image_io import read_image, write_image
from SpineKneeSegLib.engine.inference import AutocastNetwork, load_network, native_bfloat16
from SpineKneeSegLib.engine.pipeline import run_precision
from SpineKneeSegLib.engine.postprocessing import dice
from SpineKneeSegLib.engine.weights import initialise_weights, resolve_weights
from SpineKneeSegLib.tasks import TASKS, make_phantom

CPU = torch.device("cpu")


def test_bfloat16_network_returns_float32_logits_close_to_float32(tmp_path):
    initialise_weights("knee-bones", tmp_path / "w.pt", {"channels": (8, 16)}, seed=0)
    weights = resolve_weights(TASKS["knee-bones"], tmp_path / "w.pt")
    full, half = load_network(weights, CPU), load_network(weights, CPU, "bfloat16")
    assert isinstance(half, AutocastNetwork) and not isinstance(full, AutocastNetwork)
    x = torch.randn(2, weights.network["config"]["in_channels"], 64, 64)
    with torch.inference_mode():
        a, b = full(x), half(x)
    assert b.dtype == torch.float32 and a.shape == b.shape
    assert not torch.equal(a, b)  # it did run in bfloat16 (8 mantissa bits)
    assert (a.softmax(1) - b.softmax(1)).abs().max() < 0.05
    with pytest.raises(ValueError, match="unknown precision"):
        load_network(weights, CPU, "float16")


def test_precision_is_honoured_only_where_native():
    assert run_precision("float32", CPU) == ("float32", None)
    ran, warning = run_precision("bfloat16", torch.device("mps"))  # no native bfloat16 known there
    assert ran == "float32" and "no native bfloat16" in warning
    assert run_precision("bfloat16", CPU)[0] == ("bfloat16" if native_bfloat16(CPU) else "float32")
    with pytest.raises(InputError, match="unknown precision"):
        run_precision("int8", CPU)


@pytest.mark.mrml
def test_cli_runs_in_bfloat16_and_records_it(tmp_path):
    """The same phantom through the CLI with the registered level model in both precisions: the
    report says which ran (with a warning where bfloat16 is not native), and the levels agree."""
    phantom = make_phantom("lumbar-foramina", seed=3)
    write_image(phantom.image, tmp_path / "scan.nii.gz")
    labels, reports = {}, {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        assert cli.main(["run", "--task", "lumbar-foramina", str(tmp_path / "scan.nii.gz"), "-o", str(out),
                         "--precision", precision, "--progress", "none"]) == 0
        reports[precision] = json.loads((out / "report.json").read_text())
        labels[precision] = read_image(out / "labels.nii.gz").array
    assert reports["float32"]["precision"] == "float32"
    native = native_bfloat16(CPU)
    assert reports["bfloat16"]["precision"] == ("bfloat16" if native else "float32")
    assert any("no native bfloat16" in w for w in reports["bfloat16"]["warnings"]) == (not native)
    decoded = {p: r["summaries"]["level_decoding"] for p, r in reports.items()}
    names = {p: [b["name"] for b in d["bodies"]] for p, d in decoded.items()}
    assert names["float32"] == names["bfloat16"] and len([n for n in names["float32"] if n.startswith("L")]) >= 3
    confidence = {p: r["summaries"]["level_confidence"] for p, r in reports.items()}
    assert abs(confidence["float32"] - confidence["bfloat16"]) < 0.02
    bodies = labels["float32"] > 0
    assert (labels["float32"] != labels["bfloat16"]).sum() < 0.05 * bodies.sum()  # borders only
    assert dice(bodies, labels["bfloat16"] > 0) > 0.97


@pytest.mark.mrml
def test_real_lumbar_scan_keeps_its_levels_in_bfloat16(data_root, tmp_path):
    """zukic-t2 case06 (the speed bench's lumbar case) with the registered model: the same level
    names and doubtful flag, every level's voxels within Dice 0.99 of float32's."""
    scan = data_root / "spine" / "zukic-t2" / "case06" / "image.nii.gz"
    if not scan.exists():
        pytest.skip("zukic-t2 case06 not in the shared data")
    out = {}
    for precision in ("float32", "bfloat16"):
        assert cli.main(["run", "--task", "lumbar-foramina", str(scan), "-o", str(tmp_path / precision),
                         "--precision", precision, "--progress", "none"]) == 0
        report = json.loads((tmp_path / precision / "report.json").read_text())
        decoded = report["summaries"]["level_decoding"]
        out[precision] = ([b["name"] for b in decoded["bodies"]], decoded["doubtful"],
                          read_image(tmp_path / precision / "labels.nii.gz").array)
    assert out["float32"][:2] == out["bfloat16"][:2]
    assert [n for n in out["float32"][0] if n.startswith("L")] == ["L1", "L2", "L3", "L4", "L5"]
    for k in range(1, 6):
        assert dice(out["float32"][2] == k, out["bfloat16"][2] == k) > 0.99
