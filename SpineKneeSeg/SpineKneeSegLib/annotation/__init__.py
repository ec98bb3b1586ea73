"""Layer 5, annotation: the foramen-marker reading loop (worklists, markers, export, agreement,
corrections, RSNA import, training manifests). Imports the layers below."""
