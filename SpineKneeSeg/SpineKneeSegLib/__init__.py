"""SpineKneeSeg library: everything the Slicer panel, the CLI, Training/ and the tests share.

Importable without Slicer; only ``mrml`` and ``mrml_harness`` import ``slicer``/``vtk``.
"""
__version__ = "0.1.0"
