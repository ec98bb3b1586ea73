"""Run one function beside the caller: in a forked child process where that is safe, else in a
thread. A pure-Python writer (highdicom's DICOM-SEG) in a thread takes turns with the caller's own
writers for the GIL; in a child it runs on another core.

Forking is safe here only on Linux, outside the 3D Slicer application (a Qt process must not
fork), from the main thread while no other Python thread is alive (a lock another thread holds
would stay held in the child). The child runs the function, sends back its result or its
exception (pickled) through a pipe and leaves with ``os._exit``: no atexit handlers, no flushing
of the parent's buffers, no destructors of the parent's VTK or torch objects.

The caller takes the result as soon as the pipe closes and does not wait for the child's exit:
tearing down a forked copy of a process with VTK or torch loaded took 15-41 ms (knee DESS, 2
cores), twice on the command line's path (the DICOM-SEG's child, then the writer process). Such a
child is reaped later, when no one waits for it (``reap_finished``).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

FORK_ALLOWED = True  # tests switch the fork path off to check the thread path gives the same files


def can_fork() -> bool:
    if not (FORK_ALLOWED and sys.platform.startswith("linux") and hasattr(os, "fork")):
        return False
    if threading.current_thread() is not threading.main_thread() or threads_in_the_way():
        return False
    return not hasattr(sys.modules.get("slicer"), "app")  # inside the 3D Slicer application


def threads_in_the_way() -> list[threading.Thread]:
    """The threads besides the main one that a fork would copy mid-work; a thread that stops itself
    around a fork (an output lock's heartbeat, ``paused_at_fork``) is not one."""
    return [t for t in threading.enumerate()
            if t is not threading.main_thread() and not getattr(t, "paused_at_fork", False)]


class ChildJob:
    """``fn(*args)`` in a forked child; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn, *args, close_in_child=()):
        """``close_in_child``: the caller's ends of pipes it shares with ``fn`` (closed in the child so
        that the child sees end-of-file when the caller goes)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_end)
            status = 0
            try:
                for connection in close_in_child:
                    connection.close()
                try:
                    payload = pickle.dumps(("value", fn(*args)))
                except BaseException as exc:  # noqa: BLE001  (handed to the parent, which raises it)
                    try:
                        payload = pickle.dumps(("error", exc))
                    except Exception:
                        payload = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(payload)
            except BaseException:  # noqa: BLE001
                status = 1
            finally:
                os._exit(status)
        os.close(write_end)
        self.pid, self._pipe, self._outcome = pid, os.fdopen(read_end, "rb"), None
        reap_finished()  # earlier children that have ended since

    def result(self):
        if self._outcome is None:
            with self._pipe:
                payload = self._pipe.read()
            if not payload:
                _, status = os.waitpid(self.pid, 0)
                self.pid = None
                self._outcome = ("error", ChildProcessError(
                    f"the writer's child process ended without a result (wait status {status})"))
            else:  # the child closed the pipe on its way out: its exit is left to reap_finished
                _EXITING.append(self.pid)
                self.pid = None
                reap_finished()
                self._outcome = pickle.loads(payload)
        kind, value = self._outcome
        if kind == "error":
            raise value
        return value

    def stop(self) -> None:
        """Kill and reap the child if it is still running (the caller failed before ``result()``)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None
            self._pipe.close()
        reap_finished()


_EXITING: list[int] = []  # children that handed back their result and are leaving: reaped when ended


def reap_finished(wait: bool = False) -> None:
    """Reap the children in ``_EXITING`` that have ended (``wait``: all of them, waiting), so that
    none stays a zombie for the life of a long-running process (a benchmark, the Slicer panel)."""
    for pid in list(_EXITING):
        try:
            done, _ = os.waitpid(pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere
            done = pid
        if done:
            _EXITING.remove(pid)


@contextlib.contextmanager
def run_beside(fn, *args):
    """Yield a job running ``fn(*args)`` (``.result()``): a forked child where ``can_fork()``, else
    a thread. Leaving the block waits for a thread, or kills a child whose result was not taken
    (the caller failed: its staging folder is about to be removed)."""
    if can_fork():
        job = ChildJob(fn, *args)
        try:
            yield job
        finally:
            job.stop()
    else:
        with ThreadPoolExecutor(1) as pool:
            future: Future = pool.submit(fn, *args)
            yield future
