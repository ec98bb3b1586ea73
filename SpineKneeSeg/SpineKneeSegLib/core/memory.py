"""Freed memory kept in the process for the next array (glibc's malloc on Linux).

By default glibc maps every large block (a 21 M-voxel volume, a batch's activations) fresh from
the kernel and unmaps it when freed, so each new array faults in all its pages again. On the
2-core machine of session 37 that made the knee-bones network up to 1.6x slower, and the steps
around it slower too. With mapping off and trimming set high, a freed block is reused by the next one.
The process then keeps what it freed (its peak, about 0.3 GB more resident between runs in an
all-task benchmark, not growing from run to run), which suits a command-line run, a cohort or a
training run (Training/trainloop.py: a CPU training step 1.15-1.75x faster, session 38); the 3D
Slicer panel leaves Slicer's allocator alone.
"""
from __future__ import annotations

import ctypes
import gc
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
KEEP_FREE_BYTES = 1 << 30  # free memory at the heap's top kept rather than returned to the system


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every block from its heap and keep freed memory. True when
    set; False where there is no glibc (macOS, Windows, musl), which then allocates as before."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES))


_collection_paused = False
_imports_frozen = False


def pause_collection() -> None:
    """Stop the cyclic garbage collector until ``imports_done()``, for a process that runs cases
    (the command line, a benchmark, a Dask worker), once. While torch, scipy, SimpleITK and
    slicer-core import, it walks their ever-growing heap some 700 times: 0.42-0.45 s of collection
    in 2.3-2.5 s of imports (session 38, 2 cores); paused, a command's start-up fell by 0.17-0.28 s.
    A no-op once a run's imports were frozen, or with the collector off."""
    global _collection_paused
    if gc.isenabled() and not _imports_frozen:
        gc.disable()
        _collection_paused = True


def imports_done() -> None:
    """After a run's imports: what they made goes to the collector's permanent generation, then
    collection resumes. Walking those millions of objects is most of a full collection's cost: a
    warm knee run spent 0.21 s in one, 0.01 s with them frozen (session 38); and a forked child's
    copy of them is not touched either. A no-op unless ``pause_collection()`` paused it, so
    a process that never paused (the Slicer panel, a test) keeps its collector as it was."""
    global _collection_paused, _imports_frozen
    if _collection_paused:
        _collection_paused = False
        _imports_frozen = True
        gc.freeze()
        gc.enable()
