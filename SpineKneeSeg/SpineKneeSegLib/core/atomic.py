"""Atomic outputs: write next to the target, then rename, so a failure leaves nothing partial."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove folders ``<prefix><pid>.*`` in ``parent`` left by runs that died (SIGKILL, power
    loss); a live run's folder (its process still exists) is left alone. Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for item in parent.glob(f"{prefix}*"):
            pid = item.name[len(prefix):].split(".", 1)[0].split("-", 1)[0]
            if item.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(item, ignore_errors=True)
                removed.append(item)
    return removed


def staging_dir(parent: Path, name: str) -> Path:
    """A hidden staging folder ``.<name>.partial.<pid>.<random>`` beside the output; stale ones of
    dead runs into the same place are swept first."""
    prefix = f".{name}.partial."
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
    from SpineKneeSegLib.core.errors import InputError

    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError("output path exists and is not a folder", probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError("output folder is not writable", probe)
    return path


@contextlib.contextmanager
def output_lock(target: str | os.PathLike):
    """Hold ``.<name>.lock`` beside the output folder for the whole run: a second run into the same
    folder while this one lives raises OutputBusy (naming the owner); a lock left by a dead process
    (SIGKILL, power loss) is taken over. The lock holds the owner's pid, host and start time."""
    import json
    import socket
    import time

    from SpineKneeSegLib.core.errors import OutputBusy

    lock = _lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if _owner_gone(owner):
                with contextlib.suppress(FileNotFoundError):  # stale: its process is gone; take it over
                    os.unlink(lock)
                continue
            if owner is None:  # being written this very moment (or left empty by a process killed then)
                with contextlib.suppress(OSError):
                    if time.time() - lock.stat().st_mtime > 10:
                        os.unlink(lock)
                time.sleep(0.05)
                continue
            raise OutputBusy(f"another run (process {owner.get('pid')} on {owner.get('host')}, started "
                             f"{owner.get('started')}) is writing to this output folder; wait for it to "
                             f"finish or choose another output folder", target) from None
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    else:
        raise OutputBusy(f"could not take the output folder's lock {lock.name}", target)
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text() == mine:
                os.unlink(lock)


def clear_stale_lock(target: str | os.PathLike) -> bool:
    """Remove the output lock of ``target`` when the process that holds it is gone (it was killed
    after writing its result, before releasing the lock); True if one was removed. A manifest's
    re-run calls it for the finished cases it skips, which it never locks itself."""
    if lock_is_stale(target):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_lock_path(target))
            return True
    return False


def lock_is_stale(target: str | os.PathLike) -> bool:
    """``target``'s output lock is held by a process of this host that is gone."""
    return _owner_gone(_lock_owner(_lock_path(target)))


def _lock_path(target: str | os.PathLike) -> Path:
    """``.<name>.lock`` beside the output folder ``target``."""
    target = Path(target)
    return (target.parent if str(target.parent) else Path(".")) / f".{target.name}.lock"


def _owner_gone(owner: dict | None) -> bool:
    """A lock's owner (``_lock_owner``) is a process of this host that no longer exists."""
    import socket

    return bool(owner) and owner.get("host") == socket.gethostname() and not pid_alive(int(owner["pid"]))


def _lock_owner(lock: Path) -> dict | None:
    import json

    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) and str(owner.get("pid", "")).isdigit() else None
    except (OSError, ValueError):
        return None
