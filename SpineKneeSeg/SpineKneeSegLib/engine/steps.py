"""Post-processing steps by name. Each module that owns a step registers it here (``@step``); a
task card names its steps, the pipeline runs them in order and knows none of them by name, and a
card naming an unregistered step is refused when it is registered (at import, not mid-run)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class StepContext:
    """What a step reads and changes. ``result`` is the pipeline's RunResult (labels, tables,
    points, summaries, warnings); ``raw`` the network's own labels, for checks that must not see
    the clean-up; ``maps``/``maps_grids`` probability maps by name ("probabilities": the main
    network's, when a step asked for them) and their grids; ``settings`` the checkpoint's
    per-step parameters (metadata "postprocessing")."""
    card: Any
    image: Any
    result: Any
    raw: np.ndarray
    maps: dict = field(default_factory=dict)
    maps_grids: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    raw_components: Any = None  # the raw labels' connected components, labelled once when a step needs them
    # (array, its components): a step that knows the components of the labels it made (the
    # largest-component clean-up: one per label) leaves them for checks on those same labels
    made_components: Any = None
    # auxiliary models a step runs itself (AuxiliaryModel output "step"): name -> (network, its weights)
    networks: dict = field(default_factory=dict)
    network_s: float = 0.0  # seconds those networks ran (counted as network time, not post-processing)
    # (labels array, a box holding every labelled voxel of it), left by whoever knows one (the
    # pipeline for the network's raw labels, the level decoding for its own), so that later steps
    # need not scan the whole volume; see labelled_box
    known_box: Any = None


def labelled_box(ctx: StepContext) -> tuple[slice, ...] | None:
    """A box holding every labelled voxel of ``ctx.result.labels``, when a step left one for that
    very array (None: unknown; a step that replaced the labels without one)."""
    known = ctx.known_box
    return known[1] if known is not None and known[0] is ctx.result.labels.array else None


def set_labels(ctx: StepContext, array: np.ndarray, box: tuple[slice, ...] | None = None) -> None:
    """``array`` as the result's labels, with a box known to hold all of them (or None)."""
    ctx.result.labels = ctx.image.with_array(array)
    ctx.known_box = (ctx.result.labels.array, box) if box is not None else None


def within(box: tuple[slice, ...] | None, found: tuple[slice, ...]) -> tuple[slice, ...]:
    """A box ``found`` inside the crop ``box`` (None: the whole array), in the whole array's indices."""
    return found if box is None else tuple(slice(b.start + f.start, b.start + f.stop) for b, f in zip(box, found))


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[StepContext], None]
    # the main network's probabilities, not only its labels: True (on the input grid) or "network"
    # (on the network's own grid, maps_grids["probabilities"]: none of C maps resampled)
    needs_probabilities: bool | str = False


STEPS: dict[str, Step] = {}


def step(name: str, needs_probabilities: bool | str = False):
    """Register the decorated function as the post-processing step ``name``."""
    def register(fn: Callable[[StepContext], None]):
        if name in STEPS and STEPS[name].run is not fn:
            raise ValueError(f"post-processing step {name!r} is registered twice")
        STEPS[name] = Step(name, fn, needs_probabilities)
        return fn
    return register


def check_steps(names, owner: str) -> None:
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"{owner}: unknown post-processing step(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(sorted(STEPS))}")


def needs_probabilities(names) -> bool | str:
    """False, "network" when every step that reads the main network's probabilities takes them on
    the network's grid, else True (the input grid)."""
    wanted = {STEPS[n].needs_probabilities for n in names} - {False}
    return ("network" if wanted == {"network"} else True) if wanted else False
