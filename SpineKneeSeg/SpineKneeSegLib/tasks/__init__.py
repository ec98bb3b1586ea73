"""Layer 4, tasks: one sub-package per task. Each registers its card and the steps, window finders,
label decoders and input checks the card names, so a new task is one folder here plus one name in
the import line below (Testing/test_steps.py registers a toy task the same way)."""
from SpineKneeSegLib.tasks import knee, spine, brain, xray  # noqa: F401  isort: skip  (the panel's order)
from SpineKneeSegLib.engine.cards import TASKS, get_task, make_phantom, phantom_tasks  # noqa: F401  (every task loaded)
