"""Dependency planning for Slicer's Python (pure logic; installing itself happens only in Slicer,
through slicer.pydeps.pip_ensure / the PyTorch extension, which cannot run here)."""
from pathlib import Path

import tomllib
from SpineKneeSegLib.panel.dependencies import (
    RUNTIME_REQUIREMENTS,
    is_offline_error,
    offline_message,
    plan_install,
    requirement_name,
)

ROOT = Path(__file__).resolve().parents[1]
FRESH_SLICER = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "vtk": "9.4.2", "pydicom": "2.4.4", "pillow": "10.2.0"}


def test_requirements_match_pyproject_dependencies_and_dicom_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = set(project["dependencies"]) | set(project["optional-dependencies"]["dicom"])
    assert set(RUNTIME_REQUIREMENTS) == expected


def test_fresh_slicer_without_pytorch_extension():
    plan = plan_install(installed=FRESH_SLICER)
    names = [requirement_name(r) for r in plan.pip]
    assert names == ["torch", "scipy", "tqdm", "connected-components-3d", "highdicom"] and plan.torch == "pip"
    assert not {"numpy", "SimpleITK", "vtk", "slicer-core"} & set(names)
    assert set(plan.skip_packages) == {"SimpleITK", "numpy", "vtk"}  # dependencies never replace them
    assert "pydicom>=2.4" in plan.satisfied and plan.needed


def test_pytorch_extension_installs_torch_and_pip_never_touches_it():
    plan = plan_install(installed=FRESH_SLICER, pytorch_extension=True)
    assert plan.torch == "pytorch-extension" and "torch" not in [requirement_name(r) for r in plan.pip]
    assert "torch" in plan.skip_packages and "PyTorch extension" in plan.question()


def test_everything_present_needs_nothing_but_old_versions_are_upgraded():
    everything = {**FRESH_SLICER, "torch": "2.13.0+cu126", "scipy": "1.14", "tqdm": "4.66", "highdicom": "0.28.2",
                  "connected-components-3d": "4.1.1"}
    plan = plan_install(installed=everything)
    assert not plan.needed and plan.torch == "present" and "torch" in plan.skip_packages
    old = plan_install(installed={**everything, "scipy": "1.5.0", "pydicom": "2.1"})
    assert old.pip == ["pydicom>=2.4", "scipy>=1.10"]


def test_headless_extra_is_never_planned():
    plan = plan_install(requirements=("slicer-core==5.12.4.0", "SimpleITK>=2.3", "tqdm>=4.60"), installed={})
    assert plan.pip == ["tqdm>=4.60"]


def test_offline_errors_are_recognised_and_explained():
    assert is_offline_error("ERROR: Could not find a version that satisfies the requirement torch>=2.1")
    assert is_offline_error("Failed to establish a new connection: [Errno -3] Temporary failure in name resolution")
    assert not is_offline_error("ERROR: torch-2.1.whl is not a supported wheel on this platform.")
    text = offline_message(plan_install(installed=FRESH_SLICER))
    assert "offline" in text and "--no-index --find-links" in text and "scipy>=1.10" in text
