"""The spine task: its card, its registered steps, its anatomy code and its phantom."""
# its steps and hooks register on import, then its card (which names them)
from SpineKneeSegLib.tasks.spine import foramina, level_decoding, level_refinement, transitional  # noqa: F401  isort: skip
from SpineKneeSegLib.tasks.spine import card  # noqa: F401  isort: skip
