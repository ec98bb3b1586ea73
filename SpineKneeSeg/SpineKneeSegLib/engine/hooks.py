"""What a task plugs into the engine besides its post-processing steps (steps.py), by name: window
finders (where a square crop window goes), label decoders (a checkpoint's other label layout into
the card's labels) and input checks (refusals the user may waive). A card names them; the engine
looks them up here and knows none by name; a card naming an unregistered one is refused when it is
registered (at import, not mid-run)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class WindowFinder:
    """``find(coarse_labels, canonical_image, label_variant) -> (centre RAS or None, note, what)``:
    the window centre from a coarse pass of the task's own network over the whole field of view
    (``what`` says what it was found from, for the report)."""
    name: str
    find: Callable


@dataclass(frozen=True)
class LabelDecoder:
    """``decode(labels, image) -> (labels in the card's values, summary dict)`` for a checkpoint
    whose metadata "variant" is ``name``; ``channels``: its network's output channels."""
    name: str
    channels: int
    decode: Callable


@dataclass(frozen=True)
class InputCheck:
    """``check(image, path, settings) -> Image | None`` raises InputError (naming what the user may
    pass to waive it), or records its evidence in ``image.meta["checks"]`` and returns None (or a
    corrected image, e.g. a radiograph's grey scale turned over). ``settings``: the run's
    ``input_settings`` (e.g. {"invert": "auto"})."""
    name: str
    check: Callable


WINDOW_FINDERS: dict[str, WindowFinder] = {}
LABEL_DECODERS: dict[str, LabelDecoder] = {}
INPUT_CHECKS: dict[str, InputCheck] = {}
PLAIN_VARIANT = "multiclass"  # the card's own labels, no decoder


def _register(table: dict, kind: str, name: str, entry) -> None:
    if name in table and table[name] != entry:
        raise ValueError(f"{kind} {name!r} is registered twice")
    table[name] = entry


def window_finder(name: str):
    def register(fn):
        _register(WINDOW_FINDERS, "window finder", name, WindowFinder(name, fn))
        return fn
    return register


def label_decoder(name: str, channels: int):
    def register(fn):
        _register(LABEL_DECODERS, "label decoder", name, LabelDecoder(name, channels, fn))
        return fn
    return register


def input_check(name: str):
    def register(fn):
        _register(INPUT_CHECKS, "input check", name, InputCheck(name, fn))
        return fn
    return register


def check_hooks(card) -> None:
    """Every window finder, label decoder and input check the card names is registered."""
    owner = f"task {card.name!r}"
    crop_window = card.preprocessing.crop_window
    if crop_window is not None and crop_window not in WINDOW_FINDERS:
        raise ValueError(f"{owner}: unknown crop window {crop_window!r}; registered: {', '.join(sorted(WINDOW_FINDERS))}")
    unknown = [v for v in card.label_variants if v != PLAIN_VARIANT and v not in LABEL_DECODERS]
    if unknown:
        raise ValueError(f"{owner}: unknown label variant(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(sorted(LABEL_DECODERS))}")
    unknown = [c for spec in card.inputs for c in spec.checks if c not in INPUT_CHECKS]
    if unknown:
        raise ValueError(f"{owner}: unknown input check(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(sorted(INPUT_CHECKS))}")
