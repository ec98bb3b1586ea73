"""Pure-Python controller behind the Slicer panel: state, validation, the CLI command line and the
parsing of its JSON progress lines. No Qt here, so it is unit-tested; the Widget only forwards
GUI events to it and draws what it says.

State machine of a run (``state.stage``)::

    idle --start()--> loading -> preprocessing -> inference k/n -> postprocessing -> writing
         --(CLI "done", exit 0)--> importing --imported()--> done
         --(CLI "error" / exit != 0)--> failed          --cancel()--> cancelled (from any running stage)

Apply is "Cancel" while running; a cancelled run never imports (the scene stays as it was).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from SpineKneeSegLib.engine.devices import (
    DeviceInfo,
    describe,
    fast_mode_offer,
    resolve,
)
from SpineKneeSegLib.tasks import TASKS

PROCESSING_STATES = ("idle", "loading", "preprocessing", "inference", "postprocessing", "writing", "importing",
                     "done", "failed", "cancelled")
RUNNING_STATES = ("loading", "preprocessing", "inference", "postprocessing", "writing", "importing")
STAGE_TEXT = {"idle": "", "loading": "Loading", "preprocessing": "Preprocessing", "inference": "Inference",
              "postprocessing": "Postprocessing", "writing": "Writing results", "importing": "Importing",
              "done": "Done", "failed": "Failed", "cancelled": "Cancelled"}
LOG_LINES = 2000  # the log keeps the last lines only (a long run must not grow without bound)

# What persists where: scene (parameter node) and user settings (between sessions).
SCENE_PARAMETERS = ("task", "device", "fast", "bfloat16", "weights", "weights_dir")
USER_SETTINGS = ("task", "device", "fast", "bfloat16", "weights_dir")


@dataclass
class PanelState:
    task: str = "knee-bones"
    input_volume_ids: list[str] = field(default_factory=list)
    output_segmentation_id: str = ""  # "" = create a new segmentation
    device: str = "auto"
    fast: bool = False
    bfloat16: bool = False  # --precision bfloat16 (float32 where the device has no native bfloat16)
    weights: str = ""  # explicit checkpoint (developers); "" = the registry's
    weights_dir: str = ""  # folder of downloaded registered weights (offline)
    running: bool = False
    stage: str = "idle"
    step: int = 0
    total: int = 0
    fraction: float = 0.0
    message: str = ""  # the last error, shown next to Apply
    log: list[str] = field(default_factory=list)


def task_summary(task: str) -> str:
    """The task's one-line description and what it needs as input (shown under the selector)."""
    card = TASKS[task]
    needs = "; ".join(f"{s.name}: {s.description or s.modality} ({s.dims}D{'' if s.required else ', optional'})"
                      for s in card.inputs)
    return f"{card.description} Input: {needs}."


class PanelController:
    def __init__(self, state: PanelState | None = None):
        self.state = state or PanelState()
        self.devices: list[DeviceInfo] = [DeviceInfo("cpu", "CPU")]
        self.device_note = ""
        self._partial = ""  # an incomplete last line of process output

    # ---- devices and fast mode ---------------------------------------------------------
    def set_devices(self, devices: list[DeviceInfo], note: str = "", initial: bool = False) -> None:
        """Record what was detected; ``initial`` turns fast mode on when it is offered (the
        user can still untick it; a saved choice is restored after this)."""
        self.devices, self.device_note = list(devices), note
        if initial:
            self.state.fast = self.fast_mode_offered[0]

    @property
    def device_text(self) -> str:
        return describe(self.devices, self.device_note)

    @property
    def fast_mode_offered(self) -> tuple[bool, str]:
        """(offer, why): CPU or a GPU with < 7 GB, and only for tasks that have optional steps."""
        from SpineKneeSegLib.engine.pipeline import fast_mode_plan

        device, _ = resolve(self.state.device, self.devices)
        offer, why = fast_mode_offer(device)
        if self.state.task not in TASKS:
            return False, ""
        skipped = fast_mode_plan(TASKS[self.state.task]).skipped
        if not skipped:
            return False, "nothing optional to skip for this task"
        return offer, f"{why}: skips {'; '.join(skipped)}" if offer else ""

    # ---- validation: the reason shows next to Apply --------------------------------
    def validate(self, input_is_2d: list[bool] | None = None) -> tuple[bool, str]:
        if self.state.running:
            return False, "A segmentation is running."
        if self.state.task not in TASKS:
            return False, f"Unknown task {self.state.task!r}."
        card = TASKS[self.state.task]
        required = [s for s in card.inputs if s.required]
        if len(self.state.input_volume_ids) < len(required):
            return False, f"Select the input volume ({', '.join(s.name for s in required)})."
        for spec, is_2d in zip(card.inputs, input_is_2d or []):
            if spec.dims == 3 and is_2d:
                return False, f"{card.title} needs a 3D volume; the selected {spec.name} is a single 2D slice."
            if spec.dims == 2 and not is_2d:
                return False, f"{card.title} needs a single 2D image; the selected {spec.name} is a 3D volume."
        device, reason = resolve(self.state.device, self.devices)
        if device is None:
            return False, reason
        if self.state.weights and not Path(self.state.weights).is_file():
            return False, f"Weights file not found: {self.state.weights}"
        if self.state.weights_dir and not Path(self.state.weights_dir).is_dir():
            return False, f"Weights folder not found: {self.state.weights_dir}"
        return True, ""

    @property
    def apply_label(self) -> str:
        return "Cancel" if self.state.running else "Apply"

    # ---- the command the QProcess runs: the same CLI as everywhere --------------------
    def command(self, python_executable: str, input_files: list[str], output_dir: str) -> list[str]:
        args = [python_executable, "-m", "SpineKneeSegLib.cli", "run", "--task", self.state.task, *input_files,
                "-o", output_dir, "--device", self.state.device, "--progress", "json"]
        if self.state.weights:
            args += ["--weights", self.state.weights]
        if self.state.weights_dir:
            args += ["--weights-dir", self.state.weights_dir]
        if self.state.fast:
            args.append("--fast")
        if self.state.bfloat16:
            args += ["--precision", "bfloat16"]
        return args

    # ---- the run's state machine ----------------------------------------------------
    def start(self) -> None:
        s = self.state
        s.running, s.stage, s.fraction, s.step, s.total, s.message = True, "loading", 0.0, 0, 0, ""
        s.log.clear()
        self._partial = ""

    def cancel(self) -> None:
        """The user pressed Cancel: the widget kills the process tree; nothing is imported."""
        if self.state.running:
            self.state.running, self.state.stage = False, "cancelled"
            self.state.message = "Cancelled: nothing was added to the scene."

    def feed(self, chunk: str, final: bool = False) -> list[dict]:
        """Process output as it arrives (QProcess hands over arbitrary chunks, not lines): whole
        lines are handled, an incomplete last line waits for the next chunk (or ``final``)."""
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = "" if final else lines.pop()
        return [e for e in (self.handle_output_line(line) for line in lines) if e is not None]

    def handle_output_line(self, line: str) -> dict | None:
        """Parse one stdout line of the CLI; update stage/fraction/log. Non-JSON lines are logged."""
        line = line.strip()
        if not line:
            return None
        if self.state.stage == "cancelled":  # lines still buffered from a killed process
            return None
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            self._log(line)
            return None
        if not isinstance(event, dict):
            self._log(line)
            return None
        kind = event.get("event")
        if kind in ("stage", "progress"):
            stage = event.get("stage", self.state.stage)
            if stage != self.state.stage:
                self.state.step = self.state.total = 0
            self.state.stage = stage
            if kind == "progress":
                self.state.step, self.state.total = int(event.get("step", 0)), int(event.get("total", 0))
            self.state.fraction = max(self.state.fraction, float(event.get("fraction", self.state.fraction)))
        elif kind == "log":
            self._log(f"{event.get('level', 'info')}: {event.get('message', '')}")
        elif kind == "done":
            self.state.stage, self.state.fraction, self.state.step, self.state.total = "importing", 0.95, 0, 0
        elif kind == "error":
            self.state.running, self.state.stage = False, "failed"
            self.state.message = str(event.get("message", "")) or f"exit code {event.get('exit_code')}"
            self._log(f"error: {self.state.message}")
        return event

    def _log(self, line: str) -> None:
        self.state.log.append(line)
        del self.state.log[:-LOG_LINES]

    @property
    def progress_text(self) -> str:
        """"Inference 3/12", "Postprocessing", ... for the progress bar's format."""
        text = STAGE_TEXT.get(self.state.stage, self.state.stage.capitalize())
        if self.state.total:
            text += f" {self.state.step}/{self.state.total}"
        return text

    def finished(self, exit_code: int) -> bool:
        """The process ended. Returns True when the widget should import the results."""
        if self.state.stage == "cancelled":
            return False
        if exit_code == 0 and self.state.stage != "failed":
            self.state.stage, self.state.fraction = "importing", max(self.state.fraction, 0.95)
            return True
        self.state.running = False
        self.state.stage = "failed"
        if not self.state.message:
            last = next((line for line in reversed(self.state.log) if line.strip()), "")
            self.state.message = f"The run failed (exit code {exit_code}){': ' + last if last else ''}."
        return False

    def imported(self, error: str = "", report: dict | None = None) -> None:
        """Importing the results into the scene finished (``error``: why it did not). A finished
        run's notice (``result_notice`` of its report, e.g. a doubtful level count) stays shown."""
        self.state.running = False
        if error:
            self.state.stage, self.state.message = "failed", error
            self._log(f"error: {error}")
        else:
            self.state.stage, self.state.fraction, self.state.message = "done", 1.0, result_notice(report or {})

    # ---- persistence: scene parameter node and user settings ------------------------
    def parameters(self, keys=SCENE_PARAMETERS) -> dict[str, str]:
        return {k: _to_text(getattr(self.state, k)) for k in keys}

    def restore(self, values: dict, keys=SCENE_PARAMETERS) -> None:
        """Set state fields from saved text values; unknown or invalid values are ignored
        (a task renamed since, a device name mistyped in a settings file)."""
        for key in keys:
            value = values.get(key)
            if value in (None, ""):
                continue
            if key == "task" and value not in TASKS:
                continue
            if key == "device" and value not in ("auto", "cpu", "cuda", "mps"):
                continue
            setattr(self.state, key, _from_text(value, type(getattr(PanelState(), key))))


def result_notice(report: dict) -> str:
    """What the user must see beside Apply after a run, from its report: a doubtful lumbar level
    count (level confidence below the cross-validated threshold) and suspected transitional anatomy."""
    summaries = report.get("summaries", {})
    notes = []
    decoding = summaries.get("level_decoding", {})
    if decoding.get("doubtful"):
        notes.append(f"Level count doubtful (level confidence {decoding.get('level_confidence', 0):.2f}): check "
                     "L1-L5 against T12 and the sacrum before using the levels or the foramen markers.")
    transitional = summaries.get("transitional_anatomy", {})
    if transitional.get("flagged"):
        notes.append(f"Transitional anatomy suspected ({transitional.get('status')}): {transitional.get('message', '')}")
    timings = report.get("timings_s", {})
    if "total" in timings:  # the wait: start-up (interpreter, imports) + the run itself
        notes.append(f"Took {timings.get('startup', 0) + timings['total']:.1f} s (start-up {timings.get('startup', 0):.1f} s, "
                     f"network {timings.get('network', 0):.1f} s).")
    return " ".join(notes)


def _to_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _from_text(value, kind):
    if kind is bool:
        return value is True or str(value).lower() in ("true", "1", "yes")
    return str(value)
