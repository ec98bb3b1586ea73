"""The command line's writer process: the MRML outputs (and a DICOM input's DICOM-SEG) written by a
child forked once the inputs have passed their checks, before torch loads.

The child imports slicer-core and VTK (1.0-1.7 s on 2 cores, session 37) and, for a DICOM input,
highdicom with the DICOM tables it parses on first use, on the other core while the run imports
torch, corrects, segments and post-processes; the run's own start-up loses those seconds. At the end the run sends
the card and the result; the child writes ``segmentation.seg.nrrd``, the markups, tables and
scene (the Slicer module's own MRML adapter, as in-process), with the DICOM-SEG beside them,
while the run writes ``labels.nii.gz`` and the overlay PNGs. A failure in the child is raised in
the run, which then leaves nothing behind, as when it writes them itself.

The hand-off is what the writers read and no more: the label map through memory shared since
the fork, the rest pickled without the images' meta (the child has the input's own). On the knee
DESS the labels' 80 DICOM headers (1.4 MB) took 0.09 s to pickle and unpickle and the 21 MB map
0.07 s to send; the child's receive ended 0.13 s after the send (session 39).

In-process writing stays for everything else: the Slicer panel, a manifest's worker threads, a
Dask worker, and wherever ``core.beside.can_fork()`` says no.
"""
from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import time
from pathlib import Path

import numpy as np

from SpineKneeSegLib.core import beside
from SpineKneeSegLib.core.memory import imports_done


class WriterProcess:
    def __init__(self, image, dicom_seg: bool):
        requests, self._requests = multiprocessing.Pipe(duplex=False)  # the run sends, the child receives
        # a uint8 label map on the input's grid: shared with the child (anonymous mmaps are MAP_SHARED)
        self._shared = mmap.mmap(-1, max(1, image.array.size))
        self._job = beside.ChildJob(_serve, image, dicom_seg, requests, self._shared,
                                    close_in_child=(self._requests,))
        requests.close()
        self.pid = self._job.pid
        self.sent_at: float | None = None
        self._shape = image.array.shape

    def submit(self, card, result, folder: Path, scene: bool) -> None:
        from SpineKneeSegLib.engine.pipeline import RunResult

        self.sent_at = time.perf_counter()
        labels = result.labels
        shared = labels.array.dtype == np.uint8 and labels.array.shape == self._shape
        if shared:
            np.copyto(shared_labels(self._shared, self._shape), labels.array)
        # what the MRML writers use, not the probability maps or summaries
        subset = RunResult(labels=lean_image(labels, with_array=not shared),
                           layers={name: lean_image(layer) for name, layer in result.layers.items()},
                           tables=result.tables, points=result.points)
        self._requests.send((card, subset, str(folder), scene, shared))
        self._requests.close()

    def result(self) -> dict:
        """{"written": the child's outputs in order, "dicom_seg": (seconds, problem) or None,
        "waited_s": how long the request waited for the child's start-up}; the child's error, if any."""
        done = self._job.result()
        done["waited_s"] = max(0.0, done.pop("ready_at") - (self.sent_at or done["ready_at"]))
        return done

    def stop(self) -> None:
        """Kill the child if it still runs (the run failed); its MRML temporary folder, which a
        killed child cannot remove, is swept with those of other dead processes. A child that
        handed back its result is waited for here, once the run's files are in place."""
        self._requests.close()
        if self._job.pid is not None:
            self._job.stop()
            from SpineKneeSegLib.mrml.harness import sweep_dead_caches

            sweep_dead_caches()
        beside.reap_finished(wait=True)


def shared_labels(buffer: mmap.mmap, shape) -> np.ndarray:
    return np.frombuffer(buffer, np.uint8, count=int(np.prod(shape))).reshape(shape)


def lean_image(image, with_array: bool = True):
    """``image``'s voxels and geometry without its meta (a DICOM input's headers, which the child has
    from the fork); ``with_array=False``: an empty stand-in, the voxels being in shared memory."""
    from SpineKneeSegLib.core.image import Image

    array = image.array if with_array else np.zeros((1, 1, 1), np.uint8)
    return Image(array, image.spacing, image.origin, image.direction)


@contextlib.contextmanager
def writer_process(image, dicom_seg: bool):
    """A WriterProcess where forking is safe, else None (the run writes in-process); stopped (killed
    if still running) when the block is left."""
    writer = None
    if beside.can_fork():
        try:
            writer = WriterProcess(image, dicom_seg)
        except OSError:  # no process to be had (memory, a process limit): the run writes in-process
            writer = None
    if writer is None:
        yield None
        return
    try:
        yield writer
    finally:
        writer.stop()


def _serve(image, dicom_seg: bool, requests, shared: mmap.mmap) -> dict | None:
    """The child: start-up first, then one request (None if the run ended without writing)."""
    from SpineKneeSegLib.engine import pipeline
    from SpineKneeSegLib.mrml import nodes  # noqa: F401  (slicer-core and VTK)
    from SpineKneeSegLib.mrml.harness import get_app

    if dicom_seg:
        pipeline.warm_dicom_seg_writer()
    app = get_app()
    imports_done()  # the collector paused by the command line (inherited) resumes here too
    try:
        ready_at = time.perf_counter()
        try:
            card, result, folder, scene, in_shared = requests.recv()
        except EOFError:
            return None
        if in_shared:  # the map the run copied there, on the geometry it sent
            from SpineKneeSegLib.core.image import Image

            sent = result.labels
            result.labels = Image(shared_labels(shared, image.array.shape), sent.spacing, sent.origin, sent.direction)
        folder = Path(folder)
        with contextlib.ExitStack() as scope:
            seg_job = (scope.enter_context(beside.run_beside(pipeline.write_dicom_seg_output, card, image, result,
                                                             folder)) if dicom_seg else None)
            written = pipeline.write_mrml_outputs(card, image, result, folder, scene, overlays=False)
            seg = seg_job.result() if seg_job is not None else None
        return {"written": written, "dicom_seg": seg, "ready_at": ready_at}
    finally:
        remove = getattr(app, "_remove_cache", None)
        if remove is not None:  # the child leaves by os._exit, which skips this atexit clean-up
            remove()

