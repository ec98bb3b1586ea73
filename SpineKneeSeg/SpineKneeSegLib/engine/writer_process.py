"""The command line's writer process: the MRML outputs (and a DICOM input's DICOM-SEG) written by a
child forked once the inputs have passed their checks, before torch loads.

The child imports slicer-core and VTK (1.0-1.7 s on 2 cores, session 37) and, for a DICOM input,
highdicom with the DICOM tables it parses on first use, on the other core while the run imports
torch, corrects, segments and post-processes; the run's own start-up loses those seconds. At the end the run sends
the card and the result; the child writes ``segmentation.seg.nrrd``, the markups, tables and
scene (the Slicer module's own MRML adapter, as in-process), with the DICOM-SEG beside them,
while the run writes ``labels.nii.gz`` and the overlay PNGs. A failure in the child is raised in
the run, which then leaves nothing behind, as when it writes them itself.

In-process writing stays for everything else: the Slicer panel, a manifest's worker threads, a
Dask worker, and wherever ``core.beside.can_fork()`` says no.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import time
from pathlib import Path

from SpineKneeSegLib.core import beside
from SpineKneeSegLib.core.memory import imports_done


class WriterProcess:
    def __init__(self, image, dicom_seg: bool):
        requests, self._requests = multiprocessing.Pipe(duplex=False)  # the run sends, the child receives
        self._job = beside.ChildJob(_serve, image, dicom_seg, requests, close_in_child=(self._requests,))
        requests.close()
        self.pid = self._job.pid
        self.sent_at: float | None = None

    def submit(self, card, result, folder: Path, scene: bool) -> None:
        from SpineKneeSegLib.engine.pipeline import RunResult

        # what the MRML writers use, not the probability maps or summaries
        subset = RunResult(labels=result.labels, layers=result.layers, tables=result.tables, points=result.points)
        self.sent_at = time.perf_counter()
        self._requests.send((card, subset, str(folder), scene))
        self._requests.close()

    def result(self) -> dict:
        """{"written": the child's outputs in order, "dicom_seg": (seconds, problem) or None,
        "waited_s": how long the request waited for the child's start-up}; the child's error, if any."""
        done = self._job.result()
        done["waited_s"] = max(0.0, done.pop("ready_at") - (self.sent_at or done["ready_at"]))
        return done

    def stop(self) -> None:
        """Kill the child if it still runs (the run failed); its MRML temporary folder, which a
        killed child cannot remove, is swept with those of other dead processes."""
        self._requests.close()
        if self._job.pid is not None:
            self._job.stop()
            from SpineKneeSegLib.mrml.harness import sweep_dead_caches

            sweep_dead_caches()


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


def _serve(image, dicom_seg: bool, requests) -> dict | None:
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
            card, result, folder, scene = requests.recv()
        except EOFError:
            return None
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

