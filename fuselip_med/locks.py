"""One writer per folder: the lock every incremental writer (index build, code cache, synthesis output, training
run directory) takes before it writes.

The lock is an OS file lock (``filelock``: ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) on a sibling
file ``.<name>.lock`` of the folder or file written (a sibling, so a run directory can be renamed aside while
locked). The kernel drops the lock when its process dies, however it dies, so a lock of a dead process never
blocks anyone (stale locks recover by themselves). Beside it, ``.<name>.lock.holder`` says who holds it (pid,
host, the writer's name such as ``index build``, start time; never the command line, whose input paths may name
patients: PS3.15 Annex E), written by the holder after it has the lock and removed before it lets go; a second
writer either waits (the code cache: the other writer's rows are then reused) or refuses with one line naming the
holder (``FolderBusyError``).
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fuselip_med.errors import UserError
from fuselip_med.io import atomic_write_json, check_writable

__all__ = ["FolderBusyError", "holder_of", "lock_path", "writer_lock"]


class FolderBusyError(UserError, OSError):
    """Another live process holds the writer lock of the folder (the message names it and what to do)."""


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target`` (a folder or a file): ``.<name>.lock`` beside it."""
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.lock")


def _holder_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".holder")


def holder_of(target: str | os.PathLike) -> str:
    """Who holds (or last held) the lock of ``target``: ``process 1234 on host (command) since 17:40:02 UTC``,
    or ``another process`` when its holder file is not (yet) readable."""
    try:
        info = json.loads(_holder_path(lock_path(target)).read_text(encoding="utf-8"))
        since = time.strftime("%H:%M:%S UTC", time.gmtime(float(info["since"])))
        return f"process {info['pid']} on {info['host']} ({info['command']}) since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def writer_lock(target: str | os.PathLike, what: str, *, wait: bool = False, wait_timeout_s: float | None = None,
                advice: str = "write elsewhere", say: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold the writer lock of ``target`` (a folder or a file) for the block; yields the lock file's path.

    ``what`` names the writer in messages (``index build``). Held by a live process: with ``wait`` say so once
    (naming the holder) and wait for it, at most ``wait_timeout_s`` seconds (None: as long as it takes);
    without ``wait``, or when the wait runs out, raise ``FolderBusyError`` naming the holder and ending with
    ``advice``. The parent folder is created and proved writable first (``io.OutputError`` naming it
    otherwise). A process that takes the lock again while holding it blocks: take it once, at the outermost
    writer.
    """
    from filelock import FileLock, Timeout

    lock = lock_path(target)
    check_writable(lock.parent)
    handle = FileLock(lock, thread_local=False)
    try:
        handle.acquire(timeout=0)
    except Timeout:
        holder = holder_of(target)
        if not wait:
            raise FolderBusyError(f"{target} is being written by {holder}; wait for that {what} to finish (or stop "
                                  f"it), or {advice}.") from None
        limit = "" if wait_timeout_s is None else f" (at most {wait_timeout_s / 60:g} min)"
        say(f"{target} is being written by {holder}; waiting for it to finish{limit}...")
        try:
            handle.acquire(timeout=-1 if wait_timeout_s is None else wait_timeout_s)
        except Timeout:
            raise FolderBusyError(f"{target} is still being written by {holder_of(target)} after "
                                  f"{wait_timeout_s / 60:g} min of waiting; let that {what} finish (or stop it), "
                                  f"or {advice}.") from None
    holder = _holder_path(lock)
    try:
        atomic_write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
                                   "since": time.time()}, indent=None)
        yield lock
    finally:
        holder.unlink(missing_ok=True)  # while still held: a next holder's file is never removed
        handle.release()
