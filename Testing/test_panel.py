"""The panel's controller (pure Python): validation, Apply/Cancel, CLI command, progress parsing.

The Qt widget itself cannot run here (no Slicer GUI); test_module_static.py checks its .ui and
names, and SpineKneeSegTest runs inside a real Slicer."""
import json
import types

import pytest
from SpineKneeSegLib.cli import build_parser
from SpineKneeSegLib.engine import devices
from SpineKneeSegLib.engine.devices import DeviceInfo
from SpineKneeSegLib.engine.pipeline import fast_mode_plan
from SpineKneeSegLib.panel.controller import (
    LOG_LINES,
    PanelController,
    PanelState,
    task_summary,
)
from SpineKneeSegLib.panel.parameters import load_settings, save_settings
from SpineKneeSegLib.tasks import TASKS


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
    assert c.progress_text == "Inference 3/6"
    c.handle_output_line(json.dumps({"event": "stage", "stage": "postprocessing", "fraction": 0.85}))
    assert c.progress_text == "Postprocessing" and c.state.fraction == 0.85
    c.handle_output_line(json.dumps({"event": "done", "status": "ok"}))
    assert c.state.stage == "importing" and c.progress_text == "Importing"
    assert c.finished(0) is True and c.state.running  # still running until the import is done
    assert c.apply_label == "Cancel"
    c.imported()
    assert c.state.stage == "done" and c.state.fraction == 1.0 and not c.state.running
    assert c.apply_label == "Apply"


def test_output_arriving_in_arbitrary_chunks_is_parsed_line_by_line():
    c = PanelController()
    c.start()
    stream = "".join(json.dumps(e) + "\n" for e in (
        {"event": "stage", "stage": "preprocessing", "fraction": 0.1},
        {"event": "progress", "stage": "inference", "step": 2, "total": 5, "fraction": 0.43},
        {"event": "done", "status": "ok"}))
    events = []
    for i in range(0, len(stream), 7):  # 7-character chunks split lines (and JSON) anywhere
        events += c.feed(stream[i:i + 7])
    assert [e["event"] for e in events] == ["stage", "progress", "done"] and c.state.log == []
    c.feed("trailing text without newline")
    assert c.state.log == []
    c.feed("", final=True)
    assert c.state.log == ["trailing text without newline"]


def test_fraction_never_goes_back_and_the_log_is_bounded():
    c = PanelController()
    c.start()
    c.handle_output_line(json.dumps({"event": "progress", "stage": "inference", "step": 5, "total": 6,
                                     "fraction": 0.7}))
    c.handle_output_line(json.dumps({"event": "stage", "stage": "inference", "fraction": 0.15}))  # aux model
    assert c.state.fraction == 0.7
    for i in range(LOG_LINES + 50):
        c.handle_output_line(f"line {i}")
    assert len(c.state.log) == LOG_LINES and c.state.log[-1] == f"line {LOG_LINES + 49}"
    c.handle_output_line("[1, 2]")  # JSON but not an event: logged, not crashed on
    assert c.state.log[-1] == "[1, 2]"


def test_cancel_ignores_late_lines_and_never_imports():
    c = PanelController(PanelState(input_volume_ids=["n1"]))
    c.start()
    c.handle_output_line(json.dumps({"event": "progress", "stage": "inference", "step": 1, "total": 4,
                                     "fraction": 0.3}))
    c.cancel()
    c.handle_output_line(json.dumps({"event": "done", "status": "ok"}))  # buffered before the kill
    assert c.state.stage == "cancelled" and c.finished(0) is False
    assert "nothing was added" in c.state.message and c.validate([False]) == (True, "")


def test_failed_exit_without_error_event_gives_a_reason():
    c = PanelController()
    c.start()
    c.handle_output_line("Traceback (most recent call last):")
    c.handle_output_line("MemoryError")
    assert c.finished(1) is False
    assert c.state.stage == "failed" and "exit code 1" in c.state.message and "MemoryError" in c.state.message
    c.start()
    c.finished(0)
    c.imported("segmentation.seg.nrrd: cannot be read")
    assert c.state.stage == "failed" and "cannot be read" in c.state.message and not c.state.running


def test_task_summary_names_the_inputs():
    text = task_summary("brain-wmh")
    assert TASKS["brain-wmh"].description in text and "flair" in text and "optional" in text
    assert "2D" in task_summary("xray-femur")


# ---- devices and fast mode ------------------------------------------------------------------
def _fake_torch(gpus=(), mps=False, cuda_build=True):
    """A torch-shaped namespace: this machine has no GPU, so the CUDA/MPS branches are fed fake
    device properties (the rule under test is ours, not torch's)."""
    props = [types.SimpleNamespace(name=n, total_memory=int(gb * 2**30)) for n, gb in gpus]
    cuda = types.SimpleNamespace(is_available=lambda: bool(props), device_count=lambda: len(props),
                                 get_device_properties=lambda i: props[i])
    return types.SimpleNamespace(cuda=cuda, version=types.SimpleNamespace(cuda="12.4" if cuda_build else None),
                                 backends=types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: mps)))


def test_device_detection_and_auto_choice():
    found, note = devices.detect_devices(_fake_torch([("RTX 3060", 12.0), ("T400", 2.0)]))
    assert [d.kind for d in found] == ["cpu", "cuda", "cuda"] and found[1].memory_gb == 12.0 and note == ""
    assert devices.resolve("auto", found)[0].name == "RTX 3060"
    assert devices.resolve("cpu", found)[0].kind == "cpu"
    assert devices.resolve("mps", found) == (None, "No MPS device detected; choose auto or CPU.")
    assert "CUDA: RTX 3060, 12.0 GB" in devices.describe(found)
    mac, _ = devices.detect_devices(_fake_torch(mps=True))
    assert devices.resolve("auto", mac)[0].kind == "mps"
    real, _ = devices.detect_devices()  # the real torch of this machine (CPU-only CI)
    assert real[0].kind == "cpu" and devices.resolve("auto", real)[0] is not None


def test_fast_mode_offered_on_cpu_and_small_gpus_only():
    assert devices.fast_mode_offer(DeviceInfo("cpu", "CPU"))[0]
    assert devices.fast_mode_offer(DeviceInfo("cuda", "T400", 2.0)) == (True, "GPU has 2.0 GB (< 7 GB)")
    assert devices.fast_mode_offer(DeviceInfo("cuda", "A100", 40.0)) == (False, "")
    c = PanelController(PanelState(task="knee-bones", device="auto"))
    c.set_devices(devices.detect_devices(_fake_torch([("A100", 40.0)]))[0], initial=True)
    assert c.fast_mode_offered[0] is False and c.state.fast is False
    c.state.device = "cpu"
    offer, why = c.fast_mode_offered
    assert offer and "N4 bias-field correction" in why and "joint-centre" in why
    c.set_devices(devices.detect_devices(_fake_torch([("T400", 2.0)]))[0], initial=True)
    assert c.state.fast is True  # offered -> on by default
    c.state.task = "brain-wmh"  # nothing optional to skip: not offered
    assert c.fast_mode_offered == (False, "nothing optional to skip for this task")
    assert fast_mode_plan(TASKS["lumbar-foramina"]).skip_auxiliary == ("foramina",)


def test_cuda_chosen_but_absent_is_refused_next_to_apply():
    c = PanelController(PanelState(task="knee-bones", device="cuda", input_volume_ids=["n1"]))
    ok, reason = c.validate([False])
    assert not ok and reason == "No CUDA device detected; choose auto or CPU."
    c.state.device, c.state.weights_dir = "auto", "/nonexistent/weights"
    assert c.validate([False]) == (False, "Weights folder not found: /nonexistent/weights")


def test_command_carries_fast_bfloat16_and_weights_dir(tmp_path):
    c = PanelController(PanelState(task="knee-bones", fast=True, bfloat16=True, weights_dir=str(tmp_path)))
    args = build_parser().parse_args(c.command("python", ["in.nrrd"], "out")[3:])
    assert args.fast and args.weights_dir == str(tmp_path) and args.precision == "bfloat16"
    c.state.bfloat16 = False
    assert build_parser().parse_args(c.command("python", ["in.nrrd"], "out")[3:]).precision == "float32"


class _Settings:
    """Dict-backed object with QSettings' value/setValue (the Qt class itself exists only in Slicer)."""

    def __init__(self):
        self.values = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):  # noqa: N802 - QSettings' name
        self.values[key] = value


def test_user_settings_round_trip_and_bad_values_are_ignored():
    settings = _Settings()
    save_settings(PanelController(PanelState(task="brain-wmh", device="cpu", fast=True, weights_dir="/w")), settings)
    assert settings.values["SpineKneeSeg/fast"] == "true"
    restored = PanelController()
    load_settings(restored, settings)
    assert (restored.state.task, restored.state.device, restored.state.fast, restored.state.weights_dir) == \
        ("brain-wmh", "cpu", True, "/w")
    settings.values.update({"SpineKneeSeg/task": "no-such-task", "SpineKneeSeg/device": "tpu"})
    fresh = PanelController()
    load_settings(fresh, settings)
    assert fresh.state.task == "knee-bones" and fresh.state.device == "auto"


@pytest.mark.parametrize("line", ["", "   ", "{not json"])
def test_blank_and_broken_lines_do_not_change_the_stage(line):
    c = PanelController()
    c.start()
    c.handle_output_line(line)
    assert c.state.stage == "loading"


def test_error_event_stops_the_run():
    c = PanelController()
    c.start()
    c.handle_output_line(json.dumps({"event": "error", "exit_code": 2, "message": "x.nii.gz: contains NaN"}))
    assert c.state.stage == "failed" and not c.state.running
    assert "contains NaN" in c.state.log[-1] and c.state.message == "x.nii.gz: contains NaN"
    assert c.finished(2) is False and c.state.message == "x.nii.gz: contains NaN"


def test_a_doubtful_level_count_is_shown_after_the_import():
    from SpineKneeSegLib.panel.controller import result_notice

    report = {"summaries": {"level_decoding": {"doubtful": True, "level_confidence": 0.07},
                            "transitional_anatomy": {"flagged": False, "status": "typical"}}}
    c = PanelController()
    c.start()
    c.handle_output_line(json.dumps({"event": "done", "status": "ok"}))
    assert c.finished(0)
    c.imported(report=report)
    assert c.state.stage == "done"
    assert c.state.message.startswith("Level count doubtful (level confidence 0.07)")
    confident = {"summaries": {"level_decoding": {"doubtful": False, "level_confidence": 0.8}}}
    assert result_notice(confident) == ""
    flagged = {"summaries": {"transitional_anatomy": {"flagged": True, "status": "suspected-6", "message": "m"}}}
    assert result_notice(flagged).startswith("Transitional anatomy suspected (suspected-6)")
