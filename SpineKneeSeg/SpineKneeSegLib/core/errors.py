"""Errors the doors map to exit codes: 2 bad input/usage, 3 no weights, 1 anything else."""
from __future__ import annotations

import os
import sys
from pathlib import Path


class SpineKneeSegError(Exception):
    exit_code = 1


class InputError(SpineKneeSegError):
    """Bad input: the message names the file and the problem."""

    exit_code = 2

    def __init__(self, message: str, path=None):
        self.path = str(path) if path is not None else None
        super().__init__(printable(f"{self.path}: {message}" if self.path else message))


def printable(text: str) -> str:
    """``text`` with the bytes of an undecodable file name (held as surrogates) as UTF-8 where they
    are, else as \\xNN: a message naming such a file can then be printed and written to a UTF-8 table."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def encodable_path(path: str | os.PathLike) -> Path:
    """``path``, when it can be handed to ITK and VTK, which take a path as UTF-8 text. A name
    whose bytes the file-system encoding could not decode reaches Python with surrogates (a
    Latin-1 name from an old share on a UTF-8 system; any non-ASCII name under the C locale with
    Python's UTF-8 coercion off), and ITK aborted the whole process (SIGABRT) on it."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        fs_encoding = sys.getfilesystemencoding()
        why = (f"its bytes are not {fs_encoding}, this process's file-system encoding: rename it, or run "
               "under a UTF-8 locale (PYTHONUTF8=1)" if fs_encoding.lower() not in ("utf-8", "utf8") else
               "its bytes are not UTF-8 (a Latin-1 name from an older system?): rename it")
        raise InputError(f"this file or folder name cannot be opened: {why}", path) from None
    return Path(path)


class OutputBusy(InputError):
    """The output folder is being written by another live run, or holds a finished result that
    was not asked to be replaced (--overwrite)."""


class AlreadyFinished(OutputBusy):
    """The output folder holds a finished result and --overwrite was not given: in a cohort, one
    that another run finished after this run looked (several jobs over one manifest)."""


class HeldByAnotherRun(OutputBusy):
    """Another live run holds the output folder's lock: in a cohort the case is that run's to finish
    (several jobs over one manifest), not a failure of this run. ``owner``: that run in words."""

    def __init__(self, owner: str, path=None):
        self.owner = owner
        super().__init__(f"another run ({owner}) is writing to this output folder; wait for it to finish or "
                         f"choose another output folder", path)


class NoWeightsError(SpineKneeSegError):
    exit_code = 3

    def __init__(self, task: str, detail: str = ""):
        self.task = task
        super().__init__(f"no weights for {task}" + (f" ({detail})" if detail else ""))


class CancelledError(SpineKneeSegError):
    exit_code = 130


class Terminated(BaseException):
    """SIGTERM (a batch scheduler, Slicer's Cancel on some platforms): raised in the main thread
    so that every staging and temporary folder is removed on the way out. BaseException, like
    KeyboardInterrupt, so no ``except Exception`` swallows it."""

    exit_code = 143
