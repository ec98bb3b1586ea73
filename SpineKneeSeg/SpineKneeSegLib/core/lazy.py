"""A module imported on first use: the task modules import at package load (they register their
steps), but scipy.ndimage costs ~0.3 s that a refused input should not pay. The seconds its first
import takes are counted (``import_seconds``) so that a run can report them as start-up, with
the other imports, rather than as the work of the step that happened to touch it first."""
from __future__ import annotations

import importlib
import time

_IMPORT_SECONDS = 0.0


def import_seconds() -> float:
    """Seconds spent so far in this process importing lazy modules on first use."""
    return _IMPORT_SECONDS


class LazyModule:
    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attr: str):
        if self._module is None:
            global _IMPORT_SECONDS
            t = time.perf_counter()
            self._module = importlib.import_module(self._name)
            _IMPORT_SECONDS += time.perf_counter() - t
        return getattr(self._module, attr)
