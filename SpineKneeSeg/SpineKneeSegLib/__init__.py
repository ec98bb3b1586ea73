"""SpineKneeSeg library: everything the Slicer panel, the CLI, Training/ and the tests share.

Importable without Slicer; only ``mrml.nodes`` and ``mrml.harness`` import ``slicer``/``vtk``. Layers:
core -> mrml -> engine -> tasks -> panel, annotation -> the doors (cli, annotate_cli, demo).
"""
__version__ = "0.1.0"
