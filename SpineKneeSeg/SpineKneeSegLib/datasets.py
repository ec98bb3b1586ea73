"""Where the shared real imaging data lives (never inside the repository)."""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "SPINEKNEESEG_DATA"
# SpineKneeSeg/SpineKneeSegLib/datasets.py -> repository root is two folders up
_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path | None:
    """The data folder: $SPINEKNEESEG_DATA, else <repo>/../shared/data, else ./../shared/data;
    None when the chosen folder does not exist (tests then skip)."""
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else [_REPO_ROOT.parent / "shared" / "data",
                                          Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None
