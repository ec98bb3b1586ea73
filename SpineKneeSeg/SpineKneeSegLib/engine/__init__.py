"""Layer 3, engine: task cards, the step registry, preprocessing, inference, models, weights,
generic post-processing, the pipeline, batch runs, DICOM-SEG, rendering and devices. Imports core
and mrml; knows no task by name (tasks plug in through engine.cards and engine.steps)."""
