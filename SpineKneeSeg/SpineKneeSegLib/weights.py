"""Weights: the registry (Resources/Models/registry.json) and the checkpoint format.

A checkpoint is a plain ``torch.save`` dict that rebuilds its own network, so any door can load
it with ``weights_only=True`` (no pickled code):

    {"format": "spinekneeseg-weights/1", "task": str, "model": "labels" | auxiliary model name,
     "network": {"factory": str, "config": dict},
     "preprocessing": dict (overrides of the task card, e.g. normalisation statistics),
     "state_dict": dict, "metadata": dict}
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, NoWeightsError

FORMAT = "spinekneeseg-weights/1"
MODELS_ENV = "SPINEKNEESEG_MODELS"


def models_dir() -> Path:
    """Resources/Models of the module (overridable for tests and site installs)."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class RegistryEntry:
    model: str  # the task card's weights entry name (e.g. "lumbar-levels")
    task: str
    version: str
    file: str
    sha256: str
    size: int
    card: str = ""
    description: str = ""

    def path(self, root: Path | None = None) -> Path:
        return (root or models_dir()) / self.file


def read_registry(root: Path | None = None) -> list[RegistryEntry]:
    path = (root or models_dir()) / "registry.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [RegistryEntry(**entry) for entry in data.get("models", [])]


def find_entry(model: str, root: Path | None = None) -> RegistryEntry | None:
    """Newest registered version of a weights entry (e.g. "lumbar-levels") whose file is present."""
    entries = [e for e in read_registry(root) if e.model == model and e.path(root).exists()]
    if not entries:
        return None
    return max(entries, key=lambda e: tuple(int(p) for p in e.version.split(".") if p.isdigit()))


@dataclass
class LoadedWeights:
    path: Path
    sha256: str
    checkpoint: dict
    entry: RegistryEntry | None = None

    @property
    def network(self) -> dict:
        return self.checkpoint["network"]

    @property
    def preprocessing(self) -> dict:
        return self.checkpoint.get("preprocessing", {})


def resolve_weights(card, explicit: str | os.PathLike | None = None, model: str = "labels") -> LoadedWeights | None:
    """``explicit`` (--weights PATH) if given, else the registry entry of the card's ``model``
    ("labels" = the main network, else an auxiliary model's name). A missing main model raises
    NoWeightsError; a missing optional auxiliary model returns None."""
    entry_name = card.weights_entry if model == "labels" else card.auxiliary_model(model).weights_entry
    entry = None
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise InputError("weights file does not exist", path)
    else:
        entry = find_entry(entry_name)
        if entry is None:
            if model != "labels" and not card.auxiliary_model(model).required:
                return None
            raise NoWeightsError(card.name, f"no {entry_name!r} model registered in "
                                            f"{models_dir() / 'registry.json'}; pass --weights PATH")
        path = entry.path()
    digest = sha256_of(path)
    if entry is not None and digest != entry.sha256:
        raise InputError(f"SHA256 {digest} does not match the registry ({entry.sha256}); the file is damaged "
                         "or was replaced", path)
    checkpoint = load_checkpoint(path)
    if checkpoint.get("task") != card.name or checkpoint.get("model", "labels") != model:
        raise InputError(f"weights are for task {checkpoint.get('task')!r} model {checkpoint.get('model', 'labels')!r}, "
                         f"not task {card.name!r} model {model!r}", path)
    return LoadedWeights(path, digest, checkpoint, entry)


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(f"not a readable weights file ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise InputError(f"not a SpineKneeSeg weights file (expected format {FORMAT})", path)
    return checkpoint


def save_checkpoint(path: str | os.PathLike, task: str, factory: str, config: dict, state_dict: dict,
                    preprocessing: dict | None = None, metadata: dict | None = None, model: str = "labels") -> str:
    """Write atomically; returns the SHA256 to put in the registry."""
    from .atomic import atomic_path

    payload = {"format": FORMAT, "task": task, "model": model,
               "network": {"factory": factory, "config": dict(config)},
               "preprocessing": dict(preprocessing or {}), "state_dict": state_dict,
               "metadata": dict(metadata or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return sha256_of(path)


def initialise_weights(task: str, path: str | os.PathLike, config: dict | None = None, seed: int = 0,
                       metadata: dict | None = None, model: str = "labels", preprocessing: dict | None = None) -> str:
    """Write an untrained (He-initialised) checkpoint of the task card's network, with ``config``
    overriding the card's (e.g. tiny channels for tests). Returns its SHA256.

    The input/output channel counts always follow the card, so the checkpoint fits the pipeline.
    """
    from .models import build_network
    from .tasks import get_task

    card = get_task(task)
    spec = card.network if model == "labels" else card.auxiliary_model(model).network
    full = {**spec.config, **(config or {})}
    # one set of context slices per input channel stack (the first input + the weights' extra_inputs)
    full["in_channels"] = card.preprocessing.context_slices * (1 + len((preprocessing or {}).get("extra_inputs", ())))
    full["out_channels"] = card.output_channels if model == "labels" else card.auxiliary_model(model).channels
    torch.manual_seed(seed)
    net = build_network(spec.factory, full)
    return save_checkpoint(path, task, spec.factory, full, net.state_dict(), model=model, preprocessing=preprocessing,
                           metadata={"trained": False, "note": "untrained initialisation", **(metadata or {})})


def register_model(checkpoint: str | os.PathLike, model: str, version: str, card: str = "", description: str = "",
                   root: Path | None = None) -> RegistryEntry:
    """Add (or replace) a registry entry (``model`` = a card's weights entry name) for a checkpoint
    that lies in the models folder."""
    from .atomic import write_text_atomic

    root = root or models_dir()
    checkpoint = Path(checkpoint)
    if checkpoint.resolve().parent != root.resolve():
        raise InputError(f"weights must lie in the models folder {root} to be registered", checkpoint)
    task = load_checkpoint(checkpoint)["task"]  # refuse to register something that does not load
    entry = RegistryEntry(model, task, version, checkpoint.name, sha256_of(checkpoint), checkpoint.stat().st_size,
                          card, description)
    registry_path = root / "registry.json"
    data = json.loads(registry_path.read_text()) if registry_path.exists() else {"format": "spinekneeseg-registry/1"}
    models = [m for m in data.get("models", []) if not (m["model"] == model and m["version"] == version)]
    models.append(entry.__dict__)
    data["models"] = sorted(models, key=lambda m: (m["model"], m["version"]))
    write_text_atomic(registry_path, json.dumps(data, indent=2) + "\n")
    return entry
