"""Shared fixtures: a real (headless) Slicer MRML application, and the data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_ENV = "SPINEKNEESEG_DATA"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def slicer_app():
    """A fresh headless Slicer (scene + module logics, slicer.mrmlScene / slicer.modules set) per
    test: it costs ~15 ms, and no test sees another's nodes. Skips only without slicer-core."""
    from SpineKneeSegLib.mrml.harness import create_headless_slicer, require_slicer

    try:
        require_slicer()
    except ImportError as exc:
        pytest.skip(f"real MRML unavailable: {exc}")
    app = create_headless_slicer()
    yield app
    app.close()


@pytest.fixture(scope="module")
def knee_weights(tmp_path_factory):
    """Tiny untrained knee-bones weights: runs whose outputs' structure, not accuracy, is tested."""
    from SpineKneeSegLib.engine.weights import initialise_weights

    path = tmp_path_factory.mktemp("w") / "knee.pt"
    initialise_weights("knee-bones", path, {"channels": (4, 8)})
    return path


@pytest.fixture(scope="module")
def xray_weights(tmp_path_factory):
    """Tiny untrained xray-femur weights, as ``knee_weights``."""
    from SpineKneeSegLib.engine.weights import initialise_weights

    path = tmp_path_factory.mktemp("wx") / "xray.pt"
    initialise_weights("xray-femur", path, {"channels": (4, 8)})
    return path


@pytest.fixture
def mrml_scene(slicer_app):
    return slicer_app.scene


@pytest.fixture
def data_root() -> Path:
    """$SPINEKNEESEG_DATA, else <repo>/../shared/data; skips the test when it does not exist."""
    env = os.environ.get(DATA_ENV)
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"data folder {root} not found (set {DATA_ENV} to the shared data folder)")
    return root.resolve()


@pytest.fixture
def small_disk(tmp_path):
    """A real small file system (tmpfs) to fill up: ``mount(size)`` mounts it (again, resized) at
    tmp_path/disk and returns that folder; skips where mounting is not allowed (it needs root)."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        options = f"remount,size={size}" if mounted else f"size={size}"
        args = ["mount", "-o", options, str(disk)] if mounted else ["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                                                                     str(disk)]
        if shutil.which("mount") is None or subprocess.run(args, capture_output=True).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounted.append(size)
        return disk

    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.fixture
def second_machine() -> list[str]:
    """A command prefix that runs a command as another machine (``node-b``) would: its own host
    name and pid namespace (``unshare``, root only), the file system shared; skips where that
    cannot be made. Killing the prefix's process group kills the whole machine."""
    import shutil
    import subprocess

    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--uts", "--pid", "--fork", "--mount-proc", "true"],
                                         capture_output=True).returncode != 0:
        pytest.skip("cannot make a second machine here (unshare needs root)")
    return [unshare, "--uts", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
            'hostname node-b && exec "$@"', "sh"]
