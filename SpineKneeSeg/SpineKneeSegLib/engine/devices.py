"""Compute devices: what torch can see, which one "auto" picks, and when to offer fast mode.

Pure Python over a torch-like module (injected, so the decisions are unit-tested without a GPU).
The panel shows ``describe()`` next to its device selector; the CLI uses ``inference.pick_device``
for the run itself (the same rule: CUDA, then MPS, then CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

# SlicerTotalSegmentator offers its fast mode on CPU or on a GPU with less than 7 GB (users' out of
# memory reports); the same threshold here.
FAST_MODE_GPU_GB = 7.0
CHOICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # cpu | cuda | mps
    name: str
    memory_gb: float | None = None  # total device memory (CUDA only; None when unknown)

    def label(self) -> str:
        memory = f", {self.memory_gb:.1f} GB" if self.memory_gb is not None else ""
        return f"{self.kind.upper() if self.kind != 'cpu' else 'CPU'}: {self.name}{memory}"


def detect_devices(torch_module=None) -> tuple[list[DeviceInfo], str]:
    """(devices, note). ``torch_module`` None imports torch; without torch: CPU only, and the note
    says so (the panel then offers the install)."""
    if torch_module is None:
        try:
            import torch as torch_module
        except ImportError:
            return [DeviceInfo("cpu", "CPU")], "PyTorch is not installed yet"
    devices = [DeviceInfo("cpu", "CPU")]
    note = ""
    try:
        if torch_module.cuda.is_available():
            for i in range(torch_module.cuda.device_count()):
                props = torch_module.cuda.get_device_properties(i)
                devices.append(DeviceInfo("cuda", str(props.name), round(props.total_memory / 2**30, 1)))
        elif getattr(torch_module.version, "cuda", None) is None and _has_nvidia_driver():
            note = ("an NVIDIA driver is present but this PyTorch is a CPU-only build: reinstall PyTorch "
                    "with CUDA (PyTorch extension) to use the GPU")
    except Exception as exc:  # noqa: BLE001 - a broken CUDA set-up must not break the panel
        note = f"CUDA check failed: {type(exc).__name__}: {exc}"
    mps = getattr(getattr(torch_module, "backends", None), "mps", None)
    if mps is not None and mps.is_available():
        devices.append(DeviceInfo("mps", "Apple GPU"))
    return devices, note


def _has_nvidia_driver() -> bool:
    import os

    return os.path.exists("/proc/driver/nvidia/version")


def resolve(requested: str, devices: list[DeviceInfo]) -> tuple[DeviceInfo | None, str]:
    """The device a run on ``requested`` uses, or (None, reason) when it is not available.
    "auto": the first CUDA device, else MPS, else CPU (as inference.pick_device)."""
    if requested not in CHOICES:
        return None, f"Unknown device {requested!r} (choose {', '.join(CHOICES)})."
    by_kind = {}
    for d in devices:
        by_kind.setdefault(d.kind, d)
    if requested == "auto":
        for kind in ("cuda", "mps", "cpu"):
            if kind in by_kind:
                return by_kind[kind], ""
    if requested in by_kind:
        return by_kind[requested], ""
    return None, f"No {requested.upper()} device detected; choose auto or CPU."


def fast_mode_offer(device: DeviceInfo | None) -> tuple[bool, str]:
    """(offer fast mode, why): on CPU, and on a GPU with less than FAST_MODE_GPU_GB of memory."""
    if device is None or device.kind == "cpu":
        return True, "running on CPU"
    if device.kind == "cuda" and device.memory_gb is not None and device.memory_gb < FAST_MODE_GPU_GB:
        return True, f"GPU has {device.memory_gb:.1f} GB (< {FAST_MODE_GPU_GB:.0f} GB)"
    return False, ""


def describe(devices: list[DeviceInfo], note: str = "") -> str:
    """One line for the panel: what was detected (and a hint when the GPU is not usable)."""
    text = "Detected: " + "; ".join(d.label() for d in devices)
    return f"{text}. {note}" if note else text
