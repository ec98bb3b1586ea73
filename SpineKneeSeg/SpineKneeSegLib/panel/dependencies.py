"""What to install into Slicer's Python before the first run, and how.

A plan, not an installer: the Widget asks the user, then hands ``plan.pip`` to Slicer's
``pip_ensure`` (``slicer.pydeps``, Slicer >= 5.11; ``slicer.util.pip_install`` before) with
``plan.skip_packages``, and PyTorch to the PyTorch extension when it is installed (it picks the
CUDA build that fits the driver: users' top complaint is a wrong CUDA build). Never installed
into Slicer: what Slicer ships (SimpleITK, numpy, vtk: replacing them breaks Slicer) and the
``headless`` extra (slicer-core: a second copy of Slicer's own MRML). MONAI is not a run-time
dependency (only Training/ uses it), so the panel does not install it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# pyproject.toml's [project] dependencies + the "dicom" extra (DICOM-SEG); a test checks they agree
RUNTIME_REQUIREMENTS = (
    "torch>=2.1",
    "numpy>=1.24",
    "SimpleITK>=2.3",
    "pydicom>=2.4",
    "scipy>=1.10",
    "pillow>=9",
    "tqdm>=4.60",
    "connected-components-3d>=3.12",
    "highdicom>=0.22",
)
SLICER_SHIPS = ("SimpleITK", "numpy", "vtk")
NEVER_IN_SLICER = ("slicer-core", "slicer")  # the headless extra, and PyPI's unrelated "slicer"
TORCH_REQUIREMENT = "torch>=2.1"

_OFFLINE_PATTERNS = (
    "Temporary failure in name resolution", "NewConnectionError", "Failed to establish a new connection",
    "Network is unreachable", "No matching distribution found", "Could not find a version that satisfies",
    "ConnectTimeout", "ReadTimeout", "getaddrinfo failed", "Name or service not known", "ProxyError",
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]


@dataclass
class InstallPlan:
    pip: list[str] = field(default_factory=list)  # requirements for pip_ensure
    skip_packages: list[str] = field(default_factory=list)  # never replaced, even as a dependency
    torch: str = "present"  # present | pytorch-extension | pip
    satisfied: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return bool(self.pip) or self.torch != "present"

    def question(self) -> str:
        """The confirmation text the panel shows before installing anything."""
        parts = []
        if self.torch == "pytorch-extension":
            parts.append("PyTorch (through the PyTorch extension, which picks the build for your GPU)")
        items = ", ".join(self.pip)
        if items:
            parts.append(items)
        return ("SpineKneeSeg needs these Python packages in Slicer: " + "; ".join(parts) +
                ". Download and install them now? (a few minutes; PyTorch is large)")


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution in this interpreter."""
    from importlib import metadata

    return {canonical(d.metadata["Name"] or ""): d.version for d in metadata.distributions() if d.metadata["Name"]}


def satisfies(requirement: str, installed: dict[str, str]) -> bool:
    name = canonical(requirement_name(requirement))
    version = installed.get(name)
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version

        return Requirement(requirement).specifier.contains(Version(version.split("+")[0]), prereleases=True)
    except ImportError:  # no packaging: presence is all we can check
        return True
    except Exception:  # noqa: BLE001 - an odd local version string: do not reinstall over it
        return True


def plan_install(requirements=RUNTIME_REQUIREMENTS, installed: dict[str, str] | None = None,
                 pytorch_extension: bool = False) -> InstallPlan:
    """``installed``: {name: version} (default: this interpreter's); ``pytorch_extension``: the
    PyTorch extension (PyTorchUtils) is available."""
    installed = {canonical(k): v for k, v in (installed if installed is not None else installed_versions()).items()}
    never = {canonical(n) for n in (*SLICER_SHIPS, *NEVER_IN_SLICER)}
    plan = InstallPlan(skip_packages=list(SLICER_SHIPS))
    for requirement in requirements:
        name = canonical(requirement_name(requirement))
        if name in never:
            continue
        if satisfies(requirement, installed):
            plan.satisfied.append(requirement)
        elif name == "torch":
            plan.torch = "pytorch-extension" if pytorch_extension else "pip"
            if not pytorch_extension:
                plan.pip.append(requirement)
        else:
            plan.pip.append(requirement)
    if plan.torch == "pytorch-extension" or any(canonical(requirement_name(r)) == "torch" for r in plan.satisfied):
        plan.skip_packages.append("torch")  # a dependency must never replace the CUDA build in place
    return plan


def is_offline_error(text: str) -> bool:
    return any(p.lower() in (text or "").lower() for p in _OFFLINE_PATTERNS)


def offline_message(plan: InstallPlan) -> str:
    """What to do when pip cannot reach the package index."""
    wanted = " ".join(f'"{r}"' for r in plan.pip) or '"torch>=2.1"'
    return ("Could not download the Python packages: this computer seems to be offline (or a proxy blocks "
            "pip). On a computer with internet access and the same operating system, run "
            f"`pip download {wanted} -d wheels`, copy the wheels folder here, then in Slicer's Python console: "
            "slicer.util.pip_install('--no-index --find-links /path/to/wheels " + " ".join(plan.pip) + "'). "
            "Weights need no download: they ship with the extension, or choose a weights folder.")
