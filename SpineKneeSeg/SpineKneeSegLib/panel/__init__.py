"""Layer 5, panel: the Slicer panel's controller, parameters, background runner, self-test and
dependency installer. Imports the layers below."""
