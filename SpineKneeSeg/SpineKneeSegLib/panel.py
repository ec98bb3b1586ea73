"""Pure-Python controller behind the Slicer panel: state, validation, the CLI command line and the
parsing of its JSON progress lines. No Qt here, so it is unit-tested; the Widget only forwards
GUI events to it and draws what it says.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import TASKS

PROCESSING_STATES = ("idle", "loading", "preprocessing", "inference", "postprocessing", "writing", "importing",
                     "done", "failed", "cancelled")


@dataclass
class PanelState:
    task: str = "knee-bones"
    input_volume_ids: list[str] = field(default_factory=list)
    device: str = "auto"
    weights: str = ""
    running: bool = False
    stage: str = "idle"
    fraction: float = 0.0
    log: list[str] = field(default_factory=list)


class PanelController:
    def __init__(self, state: PanelState | None = None):
        self.state = state or PanelState()

    # ---- validation: the reason shows next to Apply --------------------------------
    def validate(self, input_is_2d: list[bool] | None = None) -> tuple[bool, str]:
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
        if self.state.weights and not Path(self.state.weights).is_file():
            return False, f"Weights file not found: {self.state.weights}"
        if self.state.running:
            return False, "A segmentation is running."
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
        return args

    def start(self) -> None:
        self.state.running, self.state.stage, self.state.fraction = True, "loading", 0.0
        self.state.log.clear()

    def cancel(self) -> None:
        self.state.running, self.state.stage = False, "cancelled"

    def handle_output_line(self, line: str) -> dict | None:
        """Parse one stdout line of the CLI; update stage/fraction/log. Non-JSON lines are logged."""
        line = line.strip()
        if not line:
            return None
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            self.state.log.append(line)
            return None
        kind = event.get("event")
        if kind in ("stage", "progress"):
            self.state.stage = event.get("stage", self.state.stage)
            self.state.fraction = float(event.get("fraction", self.state.fraction))
        elif kind == "log":
            self.state.log.append(f"{event.get('level', 'info')}: {event.get('message', '')}")
        elif kind == "done":
            self.state.stage, self.state.fraction = "importing", 0.95
        elif kind == "error":
            self.state.running, self.state.stage = False, "failed"
            self.state.log.append(f"error: {event.get('message', '')}")
        return event

    def finished(self, exit_code: int) -> None:
        if self.state.stage == "cancelled":
            return
        self.state.running = False
        if exit_code == 0:
            self.state.stage, self.state.fraction = "done", 1.0
        else:
            self.state.stage = "failed"
