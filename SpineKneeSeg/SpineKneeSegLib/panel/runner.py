"""Running the CLI in a separate process and ending it for good.

The panel starts ``PythonSlicer -m SpineKneeSegLib.cli run ... --progress json`` with QProcess.
PythonSlicer is a launcher that starts the real interpreter as a *child*, so killing only the
process QProcess knows would leave the run going: ``kill_process_tree`` ends every descendant.
``CliProcess`` is the same run with ``subprocess`` (the tests, and any Python caller): real
process, real kill.
"""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LIB_PARENT = Path(__file__).resolve().parents[2]  # the folder holding SpineKneeSegLib


def cli_python(executable: str | None = None) -> str:
    """The interpreter for the CLI: Slicer's PythonSlicer beside Slicer's binary when there is
    one (never Slicer's GUI executable itself), else this interpreter."""
    executable = executable or sys.executable
    folder = Path(executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (folder / name).is_file():
            return str(folder / name)
    return executable


def cli_environment(base: dict | None = None) -> dict:
    """``base`` (default os.environ) with SpineKneeSegLib's folder first on PYTHONPATH, so the
    child imports this very copy of the Lib, and Python's UTF-8 mode: its output is decoded as UTF-8
    here and in the panel, and a pipe's encoding is otherwise the locale's (a Windows code page, or
    ASCII under the C locale, where a non-ASCII path could neither be printed nor handed to ITK)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LIB_PARENT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONUTF8"] = "1"  # also makes its stdout and stderr UTF-8
    return env


def descendants(pid: int) -> list[int]:
    """Every descendant process id of ``pid`` (children first level by level)."""
    children: dict[int, list[int]] = {}
    for child, parent in _process_table():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        found.extend(frontier)
    return found


def _process_table() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process: /proc on Linux, ``ps`` elsewhere on POSIX."""
    proc = Path("/proc")
    if proc.is_dir():
        table = []
        for entry in proc.iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
                except OSError:  # the process ended meanwhile
                    continue
                table.append((int(entry.name), int(stat.rsplit(")", 1)[1].split()[1])))
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    return [tuple(int(v) for v in line.split()) for line in out.splitlines() if line.strip()]


def kill_process_tree(pid: int, timeout: float = 5.0) -> list[int]:
    """Kill ``pid`` and all its descendants (SIGKILL; ``taskkill /T /F`` on Windows); wait up to
    ``timeout`` s until they are gone. Returns the ids that were signalled."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True)
        return [pid]
    # Stop the parent first so it cannot start new children while the tree is collected.
    with _ignore_gone():
        os.kill(pid, signal.SIGSTOP)
    tree = [pid, *descendants(pid)]
    for p in reversed(tree):
        with _ignore_gone():
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.02)
    return tree


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text(encoding="utf-8", errors="replace").rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    return True


def discard_partial(output_dir: str | os.PathLike) -> list[Path]:
    """After a kill: remove the staging folders ``atomic_directory`` leaves beside the output
    (``.<name>.partial.*``). The output folder itself is only created by a finished run."""
    output_dir = Path(output_dir)
    parent = output_dir.parent
    removed = [p for p in parent.glob(f".{output_dir.name}.partial.*") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


class CliProcess:
    """One CLI run in a child process; stdout lines arrive in ``lines`` (a queue) as they are
    printed. ``cancel()`` kills the whole tree and discards partial output."""

    def __init__(self, command: list[str], output_dir: str | os.PathLike | None = None, env: dict | None = None):
        self.command = list(command)
        self.output_dir = Path(output_dir) if output_dir else None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        encoding="utf-8", errors="replace", bufsize=1,
                                        env=env if env is not None else cli_environment())
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.process.stdout, self.lines.put, True),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr.append, False),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink, mark_end: bool) -> None:
        for line in stream:
            sink(line.rstrip("\n"))
        if mark_end:
            sink(None)  # end of output

    @property
    def pid(self) -> int:
        return self.process.pid

    def next_line(self, timeout: float | None = None) -> str | None:
        """The next stdout line; None at the end of output. Raises queue.Empty on timeout."""
        return self.lines.get(timeout=timeout)

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def cancel(self) -> list[int]:
        tree = kill_process_tree(self.pid)
        self.process.wait(10)
        if self.output_dir is not None:
            discard_partial(self.output_dir)
        return tree
