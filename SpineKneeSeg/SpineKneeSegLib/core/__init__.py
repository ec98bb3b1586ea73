"""Layer 1, core: images, image I/O, atomic writes, errors, tables, label specs, progress, data
locations and shared phantom helpers. Imports nothing else of the package."""
