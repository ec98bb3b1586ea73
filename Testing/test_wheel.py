"""A regular (non-editable) install works: ``pip wheel .`` carries the weights, the registry, the
model cards and the Slicer .ui, and the installed command finds and runs the shipped models
(issue 23, part 4)."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "SpineKneeSeg" / "Resources"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the build backend installed for the tests (no download), a clean copy of the tree
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True, cwd=out)
    return next(out.glob("spinekneeseg-*.whl"))


def test_wheel_contains_every_weights_file_card_registry_and_ui(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    registry = json.loads((RESOURCES / "Models" / "registry.json").read_text())
    lib = ROOT / "SpineKneeSeg"
    expected = {"SpineKneeSegLib/_resources/Models/registry.json", "SpineKneeSegLib/_resources/UI/SpineKneeSeg.ui"}
    expected |= {p.relative_to(lib).as_posix() for p in (lib / "SpineKneeSegLib").rglob("*.py")
                 if "__pycache__" not in p.parts}  # every module of every layer (pyproject lists the packages)
    for entry in registry["models"]:
        expected.add(f"SpineKneeSegLib/_resources/Models/{entry['file']}")
        if entry.get("card"):
            expected.add(f"SpineKneeSegLib/_resources/Models/{entry['card']}")
    assert expected <= names, sorted(expected - names)


@pytest.mark.slow
def test_installed_wheel_runs_a_task_with_its_shipped_weights(wheel, tmp_path):
    venv = tmp_path / "venv"
    # system site packages give the dependencies (torch etc.) without a download; the wheel's own
    # copy of the package is installed into the venv and must be the one imported
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPINEKNEESEG_MODELS")}
    where = subprocess.run([str(python), "-c", "import SpineKneeSegLib.engine.weights as w; print(w.__file__); "
                            "print(w.models_dir())"], check=True, capture_output=True, text=True, cwd=tmp_path,
                           env=env).stdout.split()
    assert all(str(venv) in line for line in where), where
    tasks = subprocess.run([str(venv / "bin" / "spinekneeseg"), "tasks"], check=True, capture_output=True,
                           text=True, cwd=tmp_path, env=env).stdout
    registry = json.loads((RESOURCES / "Models" / "registry.json").read_text())
    shipped = {m["file"] for m in registry["models"]}
    assert sum(name in tasks for name in shipped) >= 5, tasks
    # a real task with the wheel's weights: the X-ray femur phantom written by the test's own install
    from SpineKneeSegLib.core.image_io import write_image
    from SpineKneeSegLib.tasks import make_phantom

    write_image(make_phantom("xray-femur", seed=3).image, tmp_path / "hip.nii.gz")
    run = subprocess.run([str(venv / "bin" / "spinekneeseg"), "run", "--task", "xray-femur", str(tmp_path / "hip.nii.gz"),
                          "-o", str(tmp_path / "out"), "--progress", "none"], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    from SpineKneeSegLib.engine.weights import find_entry

    newest = find_entry("xray-femur")  # the version a run without --weights takes (the newest)
    assert json.dumps(report).count(newest.sha256[:12]) >= 1
