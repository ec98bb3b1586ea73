"""A module imported on first use: the task modules import at package load (they register their
steps), but scipy.ndimage costs ~0.3 s that a refused input should not pay."""
from __future__ import annotations

import importlib


class LazyModule:
    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
