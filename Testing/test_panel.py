"""The panel's controller (pure Python): validation, Apply/Cancel, CLI command, progress parsing.

The Qt widget itself cannot run here (no Slicer GUI); test_module_static.py checks its .ui and
names, and SpineKneeSegTest runs inside a real Slicer."""
import json

from SpineKneeSegLib.cli import build_parser
from SpineKneeSegLib.panel import PanelController, PanelState


def test_validation_reasons():
    c = PanelController(PanelState(task="knee-bones"))
    ok, reason = c.validate()
    assert not ok and "Select the input volume" in reason
    c.state.input_volume_ids = ["vtkMRMLScalarVolumeNode1"]
    assert c.validate([False]) == (True, "")
    ok, reason = c.validate([True])
    assert not ok and "needs a 3D volume" in reason
    c.state.task = "xray-femur"
    ok, reason = c.validate([False])
    assert not ok and "single 2D image" in reason
    c.state.weights = "/nonexistent/model.pt"
    assert "Weights file not found" in c.validate([True])[1]


def test_apply_becomes_cancel_and_back():
    c = PanelController(PanelState(input_volume_ids=["n1"]))
    assert c.apply_label == "Apply"
    c.start()
    assert c.apply_label == "Cancel" and c.state.stage == "loading"
    assert c.validate([False])[0] is False
    c.cancel()
    assert c.apply_label == "Apply" and c.state.stage == "cancelled"
    c.finished(-9)  # the killed process reports later: stays cancelled
    assert c.state.stage == "cancelled"


def test_command_is_the_cli_the_tests_run():
    c = PanelController(PanelState(task="brain-wmh", device="cpu", weights="/w.pt"))
    cmd = c.command("/opt/Slicer/bin/PythonSlicer", ["/tmp/in.nrrd"], "/tmp/out")
    assert cmd[:3] == ["/opt/Slicer/bin/PythonSlicer", "-m", "SpineKneeSegLib.cli"]
    args = build_parser().parse_args(cmd[3:])  # the real CLI parser accepts it
    assert args.task == "brain-wmh" and args.inputs == ["/tmp/in.nrrd"] and args.progress == "json"
    assert args.weights == "/w.pt" and args.device == "cpu"


def test_progress_lines_drive_state():
    c = PanelController()
    c.start()
    c.handle_output_line(json.dumps({"event": "stage", "stage": "preprocessing", "fraction": 0.1}))
    assert c.state.stage == "preprocessing"
    c.handle_output_line(json.dumps({"event": "progress", "stage": "inference", "step": 3, "total": 6,
                                     "fraction": 0.5}))
    assert c.state.stage == "inference" and c.state.fraction == 0.5
    c.handle_output_line("a plain line from a library")
    c.handle_output_line(json.dumps({"event": "log", "level": "warning", "message": "echo 1 used"}))
    assert c.state.log[-2:] == ["a plain line from a library", "warning: echo 1 used"]
    c.handle_output_line(json.dumps({"event": "done", "status": "ok"}))
    assert c.state.stage == "importing"
    c.finished(0)
    assert c.state.stage == "done" and c.state.fraction == 1.0 and not c.state.running


def test_error_event_stops_the_run():
    c = PanelController()
    c.start()
    c.handle_output_line(json.dumps({"event": "error", "exit_code": 2, "message": "x.nii.gz: contains NaN"}))
    assert c.state.stage == "failed" and not c.state.running
    assert "contains NaN" in c.state.log[-1]
