"""Weights: the registry (Resources/Models/registry.json) and the checkpoint format.

A checkpoint is a plain ``torch.save`` dict that rebuilds its own network, so any door can load
it with ``weights_only=True`` (no pickled code; only bytes that hash to an entry of the package's
own registry go through the faster full unpickler):

    {"format": "spinekneeseg-weights/1", "task": str, "model": "labels" | auxiliary model name,
     "network": {"factory": str, "config": dict},
     "preprocessing": dict (overrides of the task card, e.g. normalisation statistics),
     "state_dict": dict, "metadata": dict}
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from SpineKneeSegLib.core.errors import InputError, NoWeightsError

FORMAT = "spinekneeseg-weights/1"
MODELS_ENV = "SPINEKNEESEG_MODELS"
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".ckpt")  # files that must be registered to be used


def models_dir() -> Path:
    """Resources/Models of the module (overridable for tests and site installs); in an installed
    wheel the same folder is the package's ``_resources/Models``."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    from SpineKneeSegLib.core.datasets import resources_dir

    return resources_dir() / "Models"


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
    # the folder the file was found in (the models folder, or a user's weights folder); not stored
    location: Path | None = field(default=None, compare=False, repr=False)

    def path(self, root: Path | None = None) -> Path:
        return Path(root or self.location or models_dir()) / self.file


def read_registry(root: Path | None = None) -> list[RegistryEntry]:
    path = (root or models_dir()) / "registry.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in fields(RegistryEntry)} - {"location"}
    return [RegistryEntry(**{k: v for k, v in entry.items() if k in known}) for entry in data.get("models", [])]


def version_key(version: str) -> tuple:
    """"0.10.0" sorts after "0.9.1"."""
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _version_key(entry: RegistryEntry) -> tuple:
    return version_key(entry.version)


def find_entry(model: str, root: Path | None = None, weights_dir: str | os.PathLike | None = None
               ) -> RegistryEntry | None:
    """Newest registered version of a weights entry (e.g. "lumbar-levels") whose file is present,
    in ``weights_dir`` (a user's folder of downloaded weights, used offline) or the models folder.
    The registry of the models folder is the only list of trusted hashes: a user's folder adds
    files, never entries. ``location`` of the result says where the file lies."""
    found = []
    for entry in read_registry(root):
        if entry.model != model:
            continue
        for folder in ([Path(weights_dir)] if weights_dir else []) + [Path(root or models_dir())]:
            if (folder / entry.file).is_file():
                entry.location = folder
                found.append(entry)
                break
    return max(found, key=_version_key) if found else None


def check_weights_dir(weights_dir: str | os.PathLike, root: Path | None = None) -> dict[str, str]:
    """Every weights file in a user's folder -> "ok", "tampered" (a registered name, another
    hash) or "unknown" (a name the registry does not list). The panel shows this; only "ok"
    files are ever loaded from the folder."""
    folder = Path(weights_dir)
    if not folder.is_dir():
        raise InputError("weights folder does not exist", folder)
    by_name = {e.file: e for e in read_registry(root)}
    status = {}
    for path in sorted(p for p in folder.iterdir() if p.name.lower().endswith(WEIGHT_SUFFIXES)):
        entry = by_name.get(path.name)
        status[path.name] = "unknown" if entry is None else ("ok" if _verify(path, entry) is None else "tampered")
    return status


def _verify(path: Path, entry: RegistryEntry) -> str | None:
    """None when ``path`` is the registered file (size, then SHA256), else the reason."""
    return _registered_bytes(path, entry)[1]


def _registered_bytes(path: Path, entry: RegistryEntry) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) when they are the registered file's (size, then the SHA256 of these
    very bytes, so that what is loaded is what was checked), else (None, the reason)."""
    size = path.stat().st_size
    if entry.size and size != entry.size:
        return None, f"size {size} bytes does not match the registry ({entry.size} bytes)"
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        return None, f"SHA256 {digest} does not match the registry ({entry.sha256})"
    return data, None


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


def main_entry_name(card, inputs_given: int = 1, weights_dir: str | os.PathLike | None = None) -> str:
    """The registry entry of the main network for a run with the card's first ``inputs_given``
    inputs: an entry of ``card.weights_with_input`` whose input is given and whose file is present
    (e.g. brain-wmh-t1 for FLAIR + T1), else ``card.weights_entry``."""
    given = {spec.name for spec in card.inputs[:inputs_given]}
    return next((name for needs, name in card.weights_with_input
                 if needs in given and find_entry(name, weights_dir=weights_dir) is not None), card.weights_entry)


def resolve_weights(card, explicit: str | os.PathLike | None = None, model: str = "labels",
                    weights_dir: str | os.PathLike | None = None, inputs_given: int = 1) -> LoadedWeights | None:
    """``explicit`` (--weights PATH) if given, else the registry entry of the card's ``model``
    ("labels" = the main network, else an auxiliary model's name), found in ``weights_dir`` or
    the models folder. A missing main model raises NoWeightsError; a missing optional auxiliary
    model returns None.

    Registered files are checked (size and SHA256) before loading; a mismatch is refused. An
    explicit file is the user's own checkpoint: used as given (still ``weights_only`` loading),
    except that a file named like a registered one with another hash is refused as tampered.
    ``inputs_given``: how many of the card's inputs the run has; an entry of
    ``card.weights_with_input`` whose input is among them is preferred when present."""
    entry_name = (main_entry_name(card, inputs_given, weights_dir) if model == "labels"
                  else card.auxiliary_model(model).weights_entry)
    entry = None
    if weights_dir is not None and not Path(weights_dir).is_dir():
        raise InputError("weights folder does not exist", weights_dir)
    registered = None  # the bytes of a registered file, checked against its SHA256
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise InputError("weights file does not exist", path)
        digest = sha256_of(path)
        same_name = [e for e in read_registry() if e.file == path.name]
        entry = next((e for e in same_name if e.sha256 == digest), None)
        if same_name and entry is None:
            raise InputError(f"SHA256 {digest} does not match the registry's {path.name} "
                             f"({same_name[0].sha256}); the file is damaged or was replaced", path)
    else:
        entry = find_entry(entry_name, weights_dir=weights_dir)
        if entry is None:
            if model != "labels" and not card.auxiliary_model(model).required:
                return None
            where = f" or in {weights_dir}" if weights_dir else ""
            raise NoWeightsError(card.name, f"no {entry_name!r} model registered in "
                                            f"{models_dir() / 'registry.json'} is present{where}; "
                                            "pass --weights PATH")
        path = entry.path()
        registered, reason = _registered_bytes(path, entry)
        if reason:
            raise InputError(f"{reason}; the file is damaged or was replaced: refusing to load it", path)
        digest = entry.sha256
    checkpoint = load_checkpoint(path, registered)
    if checkpoint.get("task") != card.name or checkpoint.get("model", "labels") != model:
        found = f"task {checkpoint.get('task')!r} model {checkpoint.get('model', 'labels')!r}"
        raise InputError(f"weights are for {found}, not task {card.name!r} model {model!r}", path)
    return LoadedWeights(path, digest, checkpoint, entry)


def load_checkpoint(path: str | os.PathLike, registered: bytes | None = None) -> dict:
    """The checkpoint at ``path``, unpickled weights-only (tensors and plain containers: a file from
    anywhere cannot run code). ``registered``: the file's bytes, already found to hash to a registry
    entry (our own artifact, checked byte for byte): those are unpickled by the full, C unpickler,
    which is 2x faster (lumbar-levels v0.4.0: 29 -> 14 ms)."""
    try:
        if registered is not None:
            checkpoint = torch.load(io.BytesIO(registered), map_location="cpu", weights_only=False)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(f"not a readable weights file ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise InputError(f"not a SpineKneeSeg weights file (expected format {FORMAT})", path)
    return checkpoint


def save_checkpoint(path: str | os.PathLike, task: str, factory: str, config: dict, state_dict: dict,
                    preprocessing: dict | None = None, metadata: dict | None = None, model: str = "labels") -> str:
    """Write atomically; returns the SHA256 to put in the registry."""
    from SpineKneeSegLib.core.atomic import atomic_path

    payload = {"format": FORMAT, "task": task, "model": model,
               "network": {"factory": factory, "config": dict(config)},
               "preprocessing": dict(preprocessing or {}), "state_dict": state_dict,
               "metadata": dict(metadata or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return sha256_of(path)


def save_ensemble(path: str | os.PathLike, members: list, activation: str, metadata: dict | None = None) -> str:
    """One checkpoint holding several trained ones (factory ``mean_of``: their probabilities
    averaged). Members must be for the same task and model with the same preprocessing and channel
    counts; each member's SHA256 and metadata are kept. Returns the SHA256."""
    checkpoints = [load_checkpoint(m) for m in members]
    first = checkpoints[0]
    for m, c in zip(members, checkpoints):
        for key in ("task", "model", "preprocessing"):
            if c.get(key) != first.get(key):
                raise InputError(f"ensemble member differs in {key} ({c.get(key)!r} vs {first.get(key)!r})", m)
    channels = {k: first["network"]["config"].get(k) for k in ("in_channels", "out_channels")}
    state = {f"members.{i}.{k}": v for i, c in enumerate(checkpoints) for k, v in c["state_dict"].items()}
    config = {"members": [c["network"] for c in checkpoints], "activation": activation, **channels}
    meta = {"members": [{"file": str(m), "sha256": sha256_of(m), "metadata": c.get("metadata", {})}
                        for m, c in zip(members, checkpoints)], **(metadata or {})}
    return save_checkpoint(path, first["task"], "mean_of", config, state, first.get("preprocessing"), meta,
                           first.get("model", "labels"))


def initialise_weights(task: str, path: str | os.PathLike, config: dict | None = None, seed: int = 0,
                       metadata: dict | None = None, model: str = "labels", preprocessing: dict | None = None) -> str:
    """Write an untrained (He-initialised) checkpoint of the task card's network, with ``config``
    overriding the card's (e.g. tiny channels for tests). Returns its SHA256.

    The input/output channel counts always follow the card, so the checkpoint fits the pipeline.
    """
    from SpineKneeSegLib.engine.cards import get_task
    from SpineKneeSegLib.engine.models import build_network

    card = get_task(task)
    spec = card.network if model == "labels" else card.auxiliary_model(model).network
    full = {**spec.config, **(config or {})}
    # one set of context slices per input channel stack (the first input + the weights' extra_inputs)
    if "in_channels" not in spec.config:  # else a network with inputs of its own (the level refiner)
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
    from SpineKneeSegLib.core.atomic import write_text_atomic

    root = root or models_dir()
    checkpoint = Path(checkpoint)
    if checkpoint.resolve().parent != root.resolve():
        raise InputError(f"weights must lie in the models folder {root} to be registered", checkpoint)
    task = load_checkpoint(checkpoint)["task"]  # refuse to register something that does not load
    entry = RegistryEntry(model, task, version, checkpoint.name, sha256_of(checkpoint), checkpoint.stat().st_size,
                          card, description)
    registry_path = root / "registry.json"
    data = (json.loads(registry_path.read_text(encoding="utf-8")) if registry_path.exists()
            else {"format": "spinekneeseg-registry/1"})
    models = [m for m in data.get("models", []) if not (m["model"] == model and m["version"] == version)]
    models.append(entry.__dict__)
    data["models"] = sorted(models, key=lambda m: (m["model"], m["version"]))
    write_text_atomic(registry_path, json.dumps(data, indent=2) + "\n")
    return entry
