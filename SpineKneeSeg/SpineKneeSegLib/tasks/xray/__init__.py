"""The xray task: its card, its registered steps, its anatomy code and its phantom."""
# its steps and hooks register on import, then its card (which names them)
from SpineKneeSegLib.tasks.xray import anatomy, chest, orientation, polarity  # noqa: F401  isort: skip
from SpineKneeSegLib.tasks.xray import card  # noqa: F401  isort: skip
