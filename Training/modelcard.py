"""The one model-card writer of Training/: every script's ``model_card`` passes only its content
(status line, data + licence, split, preprocessing, network, training commands, metrics, known
limits); this module lays out the card and ships it: weights into SpineKneeSeg/Resources/Models,
the card beside them, the SHA256 and the registry entry (SpineKneeSegLib.engine.weights).

The shipped cards are never rewritten here (their SHA256s are in the registry)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence


def render(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """``# Model card: TITLE``, the intro (status line, what it is), then ``## heading`` + body per
    section in the order given (a section with an empty heading continues the previous one)."""
    parts = [f"# Model card: {title}\n"]
    if intro.strip():
        parts.append(intro.strip("\n") + "\n")
    for heading, body in sections:
        parts.append((f"## {heading}\n" if heading else "") + body.strip("\n") + "\n")
    return "\n".join(parts)


def table(header: Sequence[str], rows: Iterable[Sequence], fmt: Callable[[object], str] | None = None) -> str:
    """A markdown table; cells through ``fmt`` (default: floats to 3 decimals, None as an em dash)."""
    def cell(v):
        if fmt is not None:
            return fmt(v)
        if v is None:
            return "—"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(model: str, version: str, card_text: str, description: str, weights: Path | None = None,
            checkpoint: dict | None = None, metadata: dict | None = None):
    """Ship a model: ``weights`` copied (or a loaded ``checkpoint`` saved again with ``metadata``,
    which the script extends: decoding rules, cross-validation) to MODELS/MODEL-VERSION.pt, the card
    written beside it as .md, and the registry entry (SHA256, size, card, description) added.
    Returns the entry."""
    from SpineKneeSegLib.core.atomic import write_text_atomic
    from SpineKneeSegLib.engine.weights import models_dir, register_model, save_checkpoint

    target = models_dir() / f"{model}-{version}.pt"
    card = models_dir() / f"{model}-{version}.md"
    if checkpoint is not None:
        save_checkpoint(target, checkpoint["task"], checkpoint["network"]["factory"], checkpoint["network"]["config"],
                        checkpoint["state_dict"], checkpoint["preprocessing"], metadata,
                        checkpoint.get("model", "labels"))
    else:
        shutil.copyfile(weights, target)
    write_text_atomic(card, card_text)
    entry = register_model(target, model, version, card=card.name, description=description)
    list_in_cmake(target, card)
    return entry


def list_in_cmake(*files: Path) -> list[str]:
    """Add shipped files to the module's CMakeLists.txt resources (the Slicer build installs only
    what is listed there), each after the last line of its model, when the models folder is the
    module's own (not a test's or a site's folder). Returns the lines added."""
    from SpineKneeSegLib.core.atomic import write_text_atomic

    cmake = Path(files[0]).resolve().parent.parent.parent / "CMakeLists.txt"
    if Path(files[0]).resolve().parent.parts[-2:] != ("Resources", "Models") or not cmake.is_file():
        return []
    lines = cmake.read_text(encoding="utf-8").splitlines()
    added = []
    for f in sorted(files, key=lambda f: Path(f).name):
        entry = f"  Resources/Models/{Path(f).name}"
        if entry in lines:
            continue
        model = Path(f).name.rsplit("-", 1)[0]
        same = [i for i, line in enumerate(lines)  # "brain-wmh-0..." but not "brain-wmh-t1-0..."
                if re.fullmatch(rf"  Resources/Models/{re.escape(model)}-\d[^/]*", line)]
        at = (same[-1] + 1) if same else lines.index("  Resources/Models/registry.json")
        lines.insert(at, entry)
        added.append(entry.strip())
    if added:
        write_text_atomic(cmake, "\n".join(lines) + "\n")
    return added
