"""Layer 2, mrml: the MRML node adapter, the headless slicer-core harness and results loading.
Imports core only."""
