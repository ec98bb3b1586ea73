"""Atomic outputs: write next to the target, then rename, so a failure leaves nothing partial."""
from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
import weakref
from pathlib import Path

_UMASK = os.umask(0o022)  # read the process umask once (setting it back at once)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    ``suffix`` defaults to the target's full suffix (``.nii.gz``, ``.seg.nrrd``) because writers
    such as SimpleITK and MRML storage nodes choose the format from the file name.
    """
    target = Path(target)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8, all or nothing; an undecodable file name in it (a case's input) as \\xNN."""
    from SpineKneeSegLib.core.errors import printable

    with atomic_path(target) as tmp:
        Path(tmp).write_text(printable(text), encoding="utf-8")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat), or None where that
    cannot be read (not Linux, gone, hidden): a live pid whose start differs is another process
    that reuses the number of a dead one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def sweep_stale(parent: Path, prefix: str, every: bool = False) -> list[Path]:
    """Remove folders ``<prefix><pid>.*`` in ``parent`` left by runs that died (SIGKILL, power
    loss); a live run's folder (its process still exists) is left alone. ``every``: all but this
    process's, for a caller that holds the target's lock (the pids may be another machine's).
    Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for item in parent.glob(f"{prefix}*"):
            pid = item.name[len(prefix):].split(".", 1)[0].split("-", 1)[0]
            if item.is_dir() and pid.isdigit() and int(pid) != os.getpid() and (every or not pid_alive(int(pid))):
                shutil.rmtree(item, ignore_errors=True)
                removed.append(item)
    return removed


def _staging_prefix(name: str) -> str:
    return f".{name}.partial."


def staging_dir(parent: Path, name: str) -> Path:
    """A hidden staging folder ``.<name>.partial.<pid>.<random>`` beside the output; stale ones of
    dead runs into the same place are swept first."""
    prefix = _staging_prefix(name)
    sweep_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", dir=parent))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, stale: tuple[str, ...] = ()):
    """Yield a staging folder beside ``target``; on success its files are moved into ``target``.

    ``target`` may already exist (files of the same name are replaced, and the names in ``stale``
    -- an earlier result's outputs -- removed when the new result does not write them); on failure
    the staging folder is removed and ``target`` is left as it was (and not created if it did not
    exist).
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    stage = staging_dir(parent, target.name)
    try:
        yield stage
        created = not target.exists()
        target.mkdir(exist_ok=True)
        written = {item.name for item in stage.iterdir()}
        try:
            for item in sorted(stage.iterdir()):
                dest = target / item.name
                if dest.is_dir() and not item.is_dir():
                    shutil.rmtree(dest)
                os.replace(item, dest) if not item.is_dir() else _replace_dir(item, dest)
            for name in set(stale) - written:  # plain names of entries in target (finished_result)
                old = target / name
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else \
                    old.unlink(missing_ok=True)
        except BaseException:
            if created:
                shutil.rmtree(target, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _replace_dir(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    os.replace(src, dest)


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Fail early (InputError) when an output folder cannot be created or written."""
    from SpineKneeSegLib.core.errors import InputError, encodable_path

    path = encodable_path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError("output path exists and is not a folder", probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError("output folder is not writable", probe)
    return path


LEASE_ENV = "SPINEKNEESEG_LOCK_LEASE_S"
DEFAULT_LEASE_S = 30.0  # a lock of another machine silent this long is taken over


# a cohort's first pass: another machine's young lock counts as held, not watched (locks_at_a_glance)
_AT_A_GLANCE = contextvars.ContextVar("spinekneeseg_locks_at_a_glance", default=False)


@contextlib.contextmanager
def locks_at_a_glance():
    """Within (this thread): a young lock of another machine counts as held at once instead of
    being watched for its heartbeat. Runs over one cohort that start together all meet each other's
    fresh locks; a watch each would cost them seconds a case, one after another. The cohort
    judges the cases it so put off in full at its end."""
    token = _AT_A_GLANCE.set(True)
    try:
        yield
    finally:
        _AT_A_GLANCE.reset(token)


def lock_lease_s() -> float:
    """How long a lock of another machine (a cluster's node, a container) may go without its owner's
    heartbeat before it counts as left by a dead run: $SPINEKNEESEG_LOCK_LEASE_S, default 30 s."""
    try:
        lease = float(os.environ.get(LEASE_ENV, ""))
    except ValueError:
        return DEFAULT_LEASE_S
    return lease if lease > 0 else DEFAULT_LEASE_S


class HeldLock:
    """An output lock this process holds. A daemon thread refreshes the file's modification time
    every lease / 6 (the heartbeat by which another machine, which cannot ask whether our pid lives,
    sees that the run goes on), and notes when the file no longer holds our claim: a run on another
    machine took it over after our heartbeat stopped (this process frozen, or its file system cut
    off). ``check`` then refuses to commit the result. The thread is stopped around every fork
    (``_HELD``), so the run's forked writers still start from a one-thread process."""

    def __init__(self, path: Path, claim: str):
        self.path, self.claim, self.lost, self._released = path, claim, False, False
        self._start()
        _HELD.add(self)

    def _start(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(self._stop,), name="output-lock-heartbeat",
                                        daemon=True)
        self._thread.paused_at_fork = True  # core/beside.can_fork: not a thread the fork would copy
        self._thread.start()

    def _beat(self, stop) -> None:
        while not stop.wait(lock_lease_s() / 6):
            try:
                if self.path.read_text(encoding="utf-8") != self.claim:
                    self.lost = True
                    return
                os.utime(self.path)
            except OSError:  # the file is gone
                self.lost = True
                return

    def _pause(self) -> None:
        self._stop.set()
        self._thread.join()

    def _resume(self) -> None:
        if not (self._released or self.lost):
            self._start()

    def check(self, target) -> None:
        from SpineKneeSegLib.core.errors import OutputBusy

        if self.lost:
            raise OutputBusy("this run lost its output lock (its heartbeat stopped for longer than the lease, "
                             f"{lock_lease_s():g} s, and another run took the folder over); its result was not "
                             "written", target)

    def release(self) -> None:
        with signals_deferred():  # a Ctrl-C during the heartbeat's join must not leave the lock behind
            self._released = True
            _HELD.discard(self)
            self._pause()
            with contextlib.suppress(FileNotFoundError):
                if self.path.read_text(encoding="utf-8") == self.claim:
                    os.unlink(self.path)


_HELD: weakref.WeakSet = weakref.WeakSet()  # this process's held locks, whose heartbeats pause for a fork


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C (SIGINT) and SIGTERM that arrive inside the block take effect at its end. Python raises
    KeyboardInterrupt between any two bytecodes: one between making a lock file and holding it
    would leave the lock of a gone process, which the next run counts as a death of the case (two
    such and the case is given up). Only the main thread receives these; elsewhere it does nothing."""
    import signal
    import threading

    watched = (signal.SIGINT, signal.SIGTERM)
    # a handler installed outside Python (None) could not be put back
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, watched):
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number))
                for sig in watched}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for number in caught[:1]:  # as if it had come now, to the handler that was in place
            handler = previous[number]
            if callable(handler):
                handler(number, None)
            elif handler == signal.SIG_DFL and number == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)


def _pause_heartbeats() -> None:
    for held in list(_HELD):
        held._pause()


def _resume_heartbeats() -> None:
    for held in list(_HELD):
        held._resume()


def _forget_heartbeats() -> None:  # a forked child holds no lock: it never beats or releases the parent's
    _HELD.clear()


os.register_at_fork(before=_pause_heartbeats, after_in_parent=_resume_heartbeats, after_in_child=_forget_heartbeats)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike):
    """Hold ``.<name>.lock`` beside the output folder for the whole run: a second run into the same
    folder while this one lives raises OutputBusy (naming the owner). A lock left by a dead run
    (SIGKILL, power loss, a lost cluster node) is taken over: at once where its process is of this
    machine and gone, else once it has gone a whole lease without a heartbeat (``HeldLock``): a
    run that meets a young lock of another machine watches it for up to that long. The lock
    holds the owner's pid, host, pid namespace and start time. Yields the ``HeldLock``."""
    import json
    import time

    from SpineKneeSegLib.core.errors import HeldByAnotherRun, OutputBusy

    lock = _lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"pid": os.getpid(), "pid_start": process_start(os.getpid()), **_this_machine(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    held = None
    try:  # from the lock's making to its release: a Ctrl-C anywhere between leaves no lock behind
        for _ in range(5):
            with signals_deferred():  # made and held, or not made (one that came meanwhile is raised here)
                held = _take_lock(lock, mine)
            if held is not None:
                break
            claim = _read_claim(lock)
            owner = _parse_claim(claim)
            if _owner_gone(owner, lock, wait=True):  # stale: its process is gone; take it over
                _remove_dead_runs_lock(target, claim)
                continue
            if owner is None:  # being written this very moment (or left empty by a process killed then)
                with contextlib.suppress(OSError):
                    if time.time() - lock.stat().st_mtime > 10:
                        os.unlink(lock)
                time.sleep(0.05)
                continue
            if not lock.exists():  # its run finished while we watched it
                continue
            raise HeldByAnotherRun(describe_owner(owner), target) from None
        else:
            raise OutputBusy(f"could not take the output folder's lock {lock.name}", target)
        yield held
    finally:
        if held is not None:
            held.release()


def _take_lock(lock: Path, claim: str) -> HeldLock | None:
    """The lock made with our claim and held; None where it exists already."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(claim)
        return HeldLock(lock, claim)
    except BaseException:  # e.g. a full disk: no empty lock left behind for the next run to puzzle over
        with contextlib.suppress(OSError):
            os.unlink(lock)
        raise


def describe_owner(owner: dict) -> str:
    """A lock's owner in words, for messages: 'process 4242 on node-7, started ...'."""
    return f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


def lock_holder(target: str | os.PathLike) -> dict | None:
    """The owner of ``target``'s output lock while it may be alive, judged without waiting: a
    process of this machine that exists, or another machine's lock refreshed within its lease (a
    young one may yet turn out dead: only ``output_lock``'s watch can tell). None: free or stale."""
    lock = _lock_path(target)
    owner = _lock_owner(lock)
    return None if owner is None or _owner_gone(owner, lock) else owner


def clear_stale_lock(target: str | os.PathLike, wait: bool = False) -> bool:
    """Remove the output lock of ``target`` when the run that holds it is gone (it was killed
    after writing its result, before releasing the lock); True if one was removed. A manifest's
    re-run calls it for the finished cases it skips, which it never locks itself. ``wait``: watch
    a young lock of another machine for up to its lease (``output_lock``)."""
    lock = _lock_path(target)
    claim = _read_claim(lock)
    return _owner_gone(_parse_claim(claim), lock, wait) and _remove_dead_runs_lock(target, claim)


def _remove_dead_runs_lock(target: str | os.PathLike, judged: str | None) -> bool:
    """Remove a dead run's lock, whose claim was ``judged`` stale, after its staging folders: only a
    run that holds the lock stages into the target, so any there are the dead run's, whether its pid
    was this machine's or another's (``staging_dir``'s own sweep, by pid, could not judge them).
    Runs that judge one dead lock at the same moment (a cohort's re-run as several jobs) take turns
    through ``.<name>.lock.taking`` (made exclusively), and the claim is checked again under it: else
    one could remove the fresh lock that another had just made. False when another run is taking it
    over, or it is no longer the judged one."""
    import time

    lock = _lock_path(target)
    guard = lock.with_name(f"{lock.name}.taking")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        with contextlib.suppress(OSError):  # left by a run that died taking it over: held for milliseconds
            if file_system_now(lock.parent) - guard.stat().st_mtime > 10:
                os.unlink(guard)
        time.sleep(0.05)  # the other run's turn
        return False
    try:
        if judged is None or _read_claim(lock) != judged:
            return False
        sweep_stale(lock.parent, _staging_prefix(Path(target).name), every=True)
        os.unlink(lock)
        return True
    except FileNotFoundError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(guard)


def lock_is_stale(target: str | os.PathLike, wait: bool = False) -> bool:
    """``target``'s output lock is held by a run that is gone: a process of this machine that no
    longer exists, or a lock of another machine without a heartbeat for a whole lease (``wait``:
    watched for up to the rest of that lease when younger)."""
    lock = _lock_path(target)
    return _owner_gone(_lock_owner(lock), lock, wait)


def _lock_path(target: str | os.PathLike) -> Path:
    """``.<name>.lock`` beside the output folder ``target``."""
    target = Path(target)
    return (target.parent if str(target.parent) else Path(".")) / f".{target.name}.lock"


def machine_tag() -> str:
    """A short name of this machine (``_this_machine``) for the pid-named folders of a place other
    machines may share (a /tmp that containers share): a pid of another machine means nothing here,
    so only this machine's are judged by it."""
    import hashlib

    here = _this_machine()
    return hashlib.sha1(f"{here['host']}|{here['pidns']}".encode()).hexdigest()[:8]


def _this_machine() -> dict:
    """Where a pid means this process: the host name, and the pid namespace (containers that share
    a host name do not share pids)."""
    import socket

    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        namespace = None
    return {"host": socket.gethostname(), "pidns": namespace}


def _owner_gone(owner: dict | None, lock: Path, wait: bool = False) -> bool:
    """A lock's owner (``_lock_owner``) is gone: a process of this machine that no longer exists,
    or whose pid another process has since taken (``process_start``: else a reused pid would keep a
    dead run's case busy for ever), or for another machine's, no heartbeat for a whole lease
    (``_silent_for_lease``)."""
    if not owner:
        return False
    here = _this_machine()
    if owner.get("host") == here["host"] and owner.get("pidns", here["pidns"]) == here["pidns"]:
        pid = int(owner["pid"])
        if not pid_alive(pid):
            return True
        now = process_start(pid) if owner.get("pid_start") else None
        return now is not None and now != owner["pid_start"]  # its pid reused by another process since
    return _silent_for_lease(lock, wait)


def _silent_for_lease(lock: Path, wait: bool) -> bool:
    """``lock`` was not refreshed for a whole lease, judged by the file system's clock (the
    machines' clocks may differ); ``wait``: a younger lock is watched until its lease ends, and
    any change to it (a heartbeat, a release) ends the watch with False."""
    import time

    first = _modified(lock)
    if first is None:
        return False
    lease = lock_lease_s()
    left = lease - (file_system_now(lock.parent) - first)
    if left <= 0:
        return True
    if not wait or _AT_A_GLANCE.get():
        return False
    deadline = time.monotonic() + left
    while time.monotonic() < deadline:
        time.sleep(min(lease / 12, 1.0, max(deadline - time.monotonic(), 0.0)))
        if _modified(lock) != first:
            return False
    return True


def _modified(path: Path) -> float | None:
    """The file's modification time, asked of the file server (an open revalidates NFS's cached
    attributes); None when it is gone."""
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_mtime
    except OSError:
        return None


def file_system_now(folder: Path) -> float:
    """The clock that stamps the lock's modification time: that of a file made now in ``folder``
    (a shared file system's server), else this machine's."""
    import time

    try:
        fd, probe = tempfile.mkstemp(prefix=".clock.", dir=folder)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _lock_owner(lock: Path) -> dict | None:
    return _parse_claim(_read_claim(lock))


def _read_claim(lock: Path) -> str | None:
    try:
        return lock.read_text(encoding="utf-8")
    except OSError:
        return None


def _parse_claim(claim: str | None) -> dict | None:
    import json

    try:
        owner = json.loads(claim) if claim else None
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and str(owner.get("pid", "")).isdigit() else None
