"""Progress reporting: human-readable bars on stderr, or one JSON object per line on stdout
(``--progress json``) that the Slicer panel's QProcess parses to drive its progress bar.

JSON lines: {"event": "stage", "stage": "preprocessing", "fraction": 0.2}
            {"event": "progress", "stage": "inference", "step": 3, "total": 12, "fraction": 0.41}
            {"event": "log", "level": "warning", "message": "..."}
            {"event": "done", "status": "ok", "output": "DIR"} | {"event": "error", "exit_code": 2, ...}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import sys
import time

PAUSE_ENV = "SPINEKNEESEG_PAUSE_AT_STAGE"  # "writing:5": sleep 5 s when the stage starts (tests send signals there)

# Stage weights for a single overall fraction (inference dominates).
STAGES = {"loading": (0.0, 0.1), "preprocessing": (0.1, 0.15), "inference": (0.15, 0.85),
          "postprocessing": (0.85, 0.93), "writing": (0.93, 1.0)}


def pause_point(name: str) -> None:
    """Test hook: with $SPINEKNEESEG_PAUSE_AT_STAGE = "name:seconds" the run sleeps here (a stage's
    start, or "staged": inside the output's staging folder), so a test can signal it there."""
    wanted = os.environ.get(PAUSE_ENV, "")
    if wanted.split(":")[0] == name:
        time.sleep(float((wanted.split(":") + ["30"])[1]))


class Progress:
    def __init__(self, mode: str = "bar", stream=None):
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.stream = stream
        self._bar = None
        self.case: str | None = None  # a cohort's case: its messages name it
        self.bars = True

    def for_case(self, case_id: str, bars: bool = True) -> "Progress":
        """One case of a cohort: its lines name the case (JSON events carry "case"); ``bars``
        False where cases run side by side (one shared bar would mix their steps)."""
        child = Progress(self.mode, self.stream)
        child.case, child.bars = case_id, bars
        return child

    def _text(self, message: str) -> str:
        return f"{self.case}: {message}" if self.case is not None else message

    def _emit(self, **event) -> None:
        if self.case is not None:
            event["case"] = self.case
        _write_line(self.stream or sys.stdout, json.dumps(event))

    def stage(self, name: str) -> None:
        self._close_bar()
        pause_point(name)
        if self.mode == "json":
            self._emit(event="stage", stage=name, fraction=STAGES.get(name, (0, 0))[0])
        elif self.mode == "bar":
            _write_line(self.stream or sys.stderr, f"[spinekneeseg] {self._text(name)}")

    def step(self, stage: str, step: int, total: int) -> None:
        lo, hi = STAGES.get(stage, (0.0, 1.0))
        if self.mode == "json":
            self._emit(event="progress", stage=stage, step=step, total=total,
                       fraction=round(lo + (hi - lo) * step / max(total, 1), 4))
        elif self.mode == "bar" and self.bars:
            if self._bar is None:
                from tqdm import tqdm

                # disable=None: no bar where the stream is not a terminal (a log file would keep
                # every redraw and the next message on the bar's line)
                self._bar = tqdm(total=total, desc=self._text(stage), file=self.stream or sys.stderr, leave=False,
                                 disable=None)
            self._bar.update(step - self._bar.n)

    def log(self, message: str, level: str = "info") -> None:
        if self.mode == "json":
            self._emit(event="log", level=level, message=message)
        elif self.mode == "bar":
            _write_line(self.stream or sys.stderr, f"[spinekneeseg] {level}: {self._text(message)}")

    def done(self, **info) -> None:
        self._close_bar()
        if self.mode == "json":
            self._emit(event="done", **info)

    def error(self, exit_code: int, message: str) -> None:
        self._close_bar()
        if self.mode == "json":
            self._emit(event="error", exit_code=exit_code, message=message)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def process_age_s() -> float | None:
    """Seconds since this process started (interpreter start-up included), from /proc on Linux;
    None where the system does not say."""
    try:
        stat = Path("/proc/self/stat").read_text(encoding="utf-8", errors="replace")  # comm may be any bytes
        start_ticks = float(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text(encoding="utf-8").split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _write_line(stream, text: str) -> None:
    """One line in one write: print() writes the newline apart, so the lines of cases side by side
    (a cohort's workers) ran into each other."""
    stream.write(text + "\n")
    stream.flush()
