"""Weights guarantees: every weights file in the tree is registered (SHA256, size, card); registered
files are verified before use; tampered or unknown files are refused with a clear message; a user's
folder of downloaded weights works offline; loading never runs pickled code (weights_only, except the
registry's own files, whose bytes are hashed and checked first)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from SpineKneeSegLib.core.errors import InputError, NoWeightsError
from SpineKneeSegLib.engine.weights import (
    WEIGHT_SUFFIXES,
    check_weights_dir,
    find_entry,
    initialise_weights,
    load_checkpoint,
    models_dir,
    read_registry,
    register_model,
    resolve_weights,
    sha256_of,
)
from SpineKneeSegLib.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
CARD = TASKS["knee-bones"]


def _tree_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (what a commit could pick up)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return [ROOT / p for p in out.split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (a source archive)
        return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]


def test_no_unregistered_weights_anywhere_in_the_tree():
    weights = [p for p in _tree_files() if p.name.lower().endswith(WEIGHT_SUFFIXES)]
    assert weights, "the shipped models should be found"
    for path in weights:
        entries = {e.file: e for e in read_registry(path.parent)}
        assert path.name in entries, f"{path.relative_to(ROOT)} is not in {path.parent.name}/registry.json"
        entry = entries[path.name]
        assert (sha256_of(path), path.stat().st_size) == (entry.sha256, entry.size), f"{path} differs from its entry"


def test_registry_entries_are_versioned_with_cards():
    entries = read_registry()
    assert entries
    for e in entries:
        assert re.fullmatch(r"\d+\.\d+\.\d+", e.version), e
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and e.size > 0
        card = models_dir() / e.card
        assert e.card.endswith(".md") and card.is_file() and card.stat().st_size > 200, f"model card of {e.file}"
        assert e.task in TASKS and load_checkpoint(e.path())["task"] == e.task


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A models folder with one registered knee checkpoint (tiny, untrained) and no other."""
    folder = tmp_path / "Models"
    folder.mkdir()
    initialise_weights("knee-bones", folder / "knee-bones-9.0.0.pt", {"channels": (4, 8)}, seed=3)
    register_model(folder / "knee-bones-9.0.0.pt", "knee-bones", "9.0.0", "card.md", root=folder)
    monkeypatch.setenv("SPINEKNEESEG_MODELS", str(folder))
    return folder


def test_tampered_registered_file_is_refused_before_loading(models):
    path = models / "knee-bones-9.0.0.pt"
    assert resolve_weights(CARD).entry.version == "9.0.0"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"SHA256 [0-9a-f]{64} does not match the registry.*refusing") as info:
        resolve_weights(CARD)
    assert str(path) in str(info.value)
    path.write_bytes(bytes(data[:-10]))  # truncated: caught by the size, without hashing
    with pytest.raises(InputError, match="does not match the registry"):
        resolve_weights(CARD)


def test_user_weights_folder_works_offline_and_refuses_unknown_or_tampered(models, tmp_path, monkeypatch):
    user = tmp_path / "downloaded"
    user.mkdir()
    shutil.move(models / "knee-bones-9.0.0.pt", user / "knee-bones-9.0.0.pt")  # registered, not bundled
    with pytest.raises(NoWeightsError):
        resolve_weights(CARD)

    def no_network(*args, **kwargs):
        raise AssertionError("weights resolution must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = resolve_weights(CARD, weights_dir=user)
    assert loaded.path == user / "knee-bones-9.0.0.pt" and loaded.entry.version == "9.0.0"
    # files the registry does not know are reported, and never loaded
    initialise_weights("knee-bones", user / "mystery.pt", {"channels": (4, 8)}, seed=9)
    (user / "notes.txt").write_text("not weights")
    assert check_weights_dir(user) == {"knee-bones-9.0.0.pt": "ok", "mystery.pt": "unknown"}
    # a registered name with other contents is tampered: refused, with the file named
    shutil.copyfile(user / "mystery.pt", user / "knee-bones-9.0.0.pt")
    assert check_weights_dir(user)["knee-bones-9.0.0.pt"] == "tampered"
    with pytest.raises(InputError, match="knee-bones-9.0.0.pt.*does not match the registry"):
        resolve_weights(CARD, weights_dir=user)
    with pytest.raises(InputError, match="does not match the registry's knee-bones-9.0.0.pt"):
        resolve_weights(CARD, user / "knee-bones-9.0.0.pt")  # the same file given explicitly
    with pytest.raises(InputError, match="weights folder does not exist"):
        resolve_weights(CARD, weights_dir=tmp_path / "nowhere")
    assert find_entry("knee-bones", weights_dir=user) is not None  # present (the hash is checked on use)


def test_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "spinekneeseg-weights/1", "task": "knee-bones", "state_dict": {}, "x": Payload()}, path)
    with pytest.raises(InputError, match="not a readable weights file"):
        load_checkpoint(path)
    assert not marker.exists()
    json_file = tmp_path / "model.pt"
    json_file.write_text(json.dumps({"format": "spinekneeseg-weights/1"}))
    with pytest.raises(InputError, match="not a readable weights file"):
        load_checkpoint(json_file)


def test_registered_files_load_from_the_checked_bytes_and_pickled_code_never_runs(models, tmp_path):
    """A registered file is read once, hashed, and those very bytes unpickled (the full unpickler:
    they are the registry's own artifact); anything else goes through weights_only loading."""
    path = models / "knee-bones-9.0.0.pt"
    fast = resolve_weights(CARD)
    plain = load_checkpoint(path)  # weights-only
    assert fast.checkpoint.keys() == plain.keys() and fast.checkpoint["network"] == plain["network"]
    assert all(torch.equal(fast.checkpoint["state_dict"][k], v) for k, v in plain["state_dict"].items())
    # the bytes given are what is loaded, whatever the file holds by then (no check-then-swap)
    other = tmp_path / "other.pt"
    initialise_weights("knee-bones", other, {"channels": (4, 8)}, seed=11)
    key = next(k for k, v in plain["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    from_bytes = load_checkpoint(other, path.read_bytes())["state_dict"][key]
    assert torch.equal(from_bytes, plain["state_dict"][key])
    assert not torch.equal(from_bytes, load_checkpoint(other)["state_dict"][key])  # another seed
    # a pickle that would run code, under the registered name: refused by its hash, never unpickled
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "spinekneeseg-weights/1", "task": "knee-bones", "x": Payload()}, path)
    with pytest.raises(InputError, match="does not match the registry"):
        resolve_weights(CARD)
    with pytest.raises(InputError, match="does not match the registry's knee-bones-9.0.0.pt"):
        resolve_weights(CARD, path)  # given explicitly: the same refusal
    evil = tmp_path / "evil.pt"
    shutil.copyfile(path, evil)
    with pytest.raises(InputError, match="not a readable weights file"):
        resolve_weights(CARD, evil)  # an unregistered file: weights_only refuses the payload
    assert not marker.exists()


def test_ensemble_checkpoint_keeps_its_members_and_refuses_mismatched_ones(tmp_path):
    """save_ensemble: one file, every member's SHA256 recorded, softmax members averaged as
    probabilities; members for another task or with other preprocessing are refused."""
    from SpineKneeSegLib.engine.inference import load_network
    from SpineKneeSegLib.engine.weights import save_ensemble

    tiny = {"channels": [4, 8]}
    paths = [tmp_path / f"m{k}.pt" for k in range(2)]
    for k, p in enumerate(paths):
        initialise_weights("knee-bones", p, tiny, seed=k)
    save_ensemble(tmp_path / "e.pt", paths, "softmax", {"note": "test"})
    weights = resolve_weights(CARD, tmp_path / "e.pt")
    assert [m["sha256"] for m in weights.checkpoint["metadata"]["members"]] == [sha256_of(p) for p in paths]
    net = load_network(weights, torch.device("cpu"))
    members = [load_network(resolve_weights(CARD, p), torch.device("cpu")) for p in paths]
    x = torch.randn(2, weights.network["config"]["in_channels"], 32, 32)
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        assert torch.allclose(net(x).softmax(1), mean, atol=1e-5)
    initialise_weights("knee-bones", tmp_path / "other.pt", tiny, preprocessing={"in_plane_spacing_mm": 2.0})
    with pytest.raises(InputError, match="preprocessing"):
        save_ensemble(tmp_path / "bad.pt", [paths[0], tmp_path / "other.pt"], "softmax")
    initialise_weights("lumbar-foramina", tmp_path / "spine.pt", {"levels": 3, "base_channels": 4, "max_channels": 8})
    with pytest.raises(InputError, match="task"):
        save_ensemble(tmp_path / "bad.pt", [paths[0], tmp_path / "spine.pt"], "softmax")
    assert not (tmp_path / "bad.pt").exists()
