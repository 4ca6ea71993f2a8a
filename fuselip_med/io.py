"""Atomic writes: a file or a directory is either absent, the old complete version or the new complete version.

Files are written to a temp file in the same directory (same filesystem), flushed and fsynced, then swapped in
with ``os.replace`` (atomic on POSIX and Windows); the directory entry is fsynced where the platform allows.
Directories are built in a temp sibling and swapped in the same way. Temp names carry ``TEMP_MARK``
(``.model.safetensors.tmp-k2j4``) so that ``remove_temp_files`` can clear what a killed process left behind.

Standard library only (plus ``fuselip_med.errors`` where the package is installed): the data tools load this file
by path in the download image (no torch, no package).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_MARK",
    "OutputError",
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "check_writable",
    "disk_full",
    "is_disk_full",
    "damaged_files",
    "file_record",
    "publish_directory",
    "remove_temp_files",
    "same_file",
    "temp_directory",
]

TEMP_MARK = ".tmp-"


try:
    from fuselip_med.errors import UserError as _UserError
except ImportError:  # loaded by path in the download image, without the package
    _UserError = Exception  # type: ignore[assignment,misc]


class OutputError(OSError, _UserError):
    """An output location that cannot take the output: not writable, or its device is full. The message is one
    line naming the folder (and, when full, the space needed); the CLI prints it as ``error: ...``."""

    def __str__(self) -> str:
        return str(self.strerror)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def disk_full(folder: str | os.PathLike, needed: int | None) -> OutputError:
    """The ``OutputError`` for a full device under ``folder``: names it, what is free and what was needed."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    need = f"about {_size(needed)} more is needed, " if needed else ""
    return OutputError(errno.ENOSPC, f"no space left on the device of {folder}: {need}{_size(free)} is free; free "
                                     "some space or write elsewhere, then run the command again (finished work is "
                                     "kept, nothing partial is left)")


def is_disk_full(error: BaseException) -> bool:
    """True for the ways writers report a full device: ``OSError`` ENOSPC/EDQUOT, or a wrapped one in the message
    (torch's ``file write failed``, safetensors' ``StorageFull``)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "StorageFull", "file write failed"))


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) if needed and prove it writable with a probe file, before any work;
    returns it. Raises ``OutputError`` naming the folder and the reason (read-only, permissions, a file in the way)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-probe{TEMP_MARK}", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        if is_disk_full(error):
            raise disk_full(folder, None) from None
        raise OutputError(error.errno, f"cannot write to {folder} ({error.strerror or error}); choose another output "
                                       "location or fix its permissions") from None
    return folder


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` both exist and are one file (``os.path.samefile``: through symlinks, hard links
    and other spellings of the path): an output that would replace an input."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], size: int | None = None) -> Path:
    """Call ``write(temp_path)`` to write the whole file, then swap it in for ``path``; returns ``path``.

    For writers that take a path (``safetensors.torch.save_file``, ``pyarrow.parquet.write_table``,
    ``numpy.save``, ``DataFrame.to_csv``). Parent folders are created. On any exception (or interrupt) the temp
    file is removed and ``path`` keeps its previous content; a full device raises ``OutputError`` naming the
    folder and the space needed (``size`` bytes when the caller knows it, else at least what was written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full(path.parent, size or written) from None
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see module docstring); returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` (``encoding``, default UTF-8, newlines as given) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2, **dumps: Any) -> Path:
    """``json.dumps(value, indent=indent, **dumps)`` written to ``path`` atomically; returns ``path``.

    Raises ``TypeError``/``ValueError`` from ``json.dumps`` before anything is written.
    """
    return atomic_write_text(path, json.dumps(value, indent=indent, **dumps))


def temp_directory(target: str | os.PathLike) -> Path:
    """A new empty temp directory beside ``target`` (same filesystem) to build it in; parents are created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}", dir=target.parent))


def publish_directory(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Swap the finished directory ``tmp`` in for ``target``; returns ``target``.

    An existing ``target`` is renamed aside first and removed after the swap: readers see the old or the new
    directory, never a mix (``target`` is absent only between the two renames). If the swap fails, the old
    directory is put back and the ``OSError`` is raised; ``tmp`` is then the caller's to remove.
    """
    tmp, target = Path(tmp), Path(target)
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None and not target.exists():
            os.replace(backup, target)
        raise
    _fsync_directory(target.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return target


def atomic_write_csv(path: str | os.PathLike, frame: Any, **to_csv: Any) -> Path:
    """A pandas ``DataFrame`` as CSV (header, no index unless ``index=True``, RFC 4180 quoting, UTF-8) written
    to ``path`` atomically; ``to_csv`` options pass through to ``DataFrame.to_csv``. Returns ``path``."""
    return atomic_write_text(path, frame.to_csv(**{"index": False, **to_csv}))


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temp sibling (yielded) that replaces ``target`` when the block succeeds.

    ``with atomic_directory(run / "final") as tmp: save_file(state, tmp / "model.safetensors")``. On an
    exception (or interrupt) the temp directory is removed and ``target`` keeps its previous content.
    """
    tmp = temp_directory(target)
    try:
        yield tmp
        publish_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temp files an interrupted write left directly in ``folder`` (names with ``TEMP_MARK``);
    returns how many. Folders and files of other writers are left alone."""
    removed = 0
    if os.path.isdir(folder):
        with os.scandir(folder) as entries:
            for entry in entries:
                if TEMP_MARK in entry.name and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file as written, for a manifest that ``damaged_files`` checks later."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def damaged_files(directory: str | os.PathLike, records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{file name: what is wrong} for the files of ``records`` ({name: ``file_record``}) in ``directory`` that are
    missing, of another size (cut short or grown) or of another SHA-256 than recorded; {} when all are intact.
    The size is checked first (a stat), the checksum only for files of the right size."""
    damaged: dict[str, str] = {}
    for name, record in records.items():
        path = Path(directory, name)
        try:
            size = path.stat().st_size
        except OSError:
            damaged[name] = "missing"
            continue
        if size != record["size"]:
            damaged[name] = f"{size:,} bytes, {record['size']:,} were written"
        elif file_record(path)["sha256"] != record["sha256"]:
            damaged[name] = "its checksum does not match the one recorded when it was written"
    return damaged
