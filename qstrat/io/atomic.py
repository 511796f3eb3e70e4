"""Atomic file output: write to a hidden temporary name beside the target, fsync, rename.

A reader therefore sees either no file or a complete one; an interrupted run leaves only
``.<name>.tmp-<pid>-<random>`` files, which never look like outputs and are removed on the next run.
Each writer holds an flock on its temporary while it writes, so a cleaner in a directory no lock
guards tells a live writer's file from a dead one's by that lock alone: pids do not tell, across
containers (pid namespaces) or hosts sharing a volume, and the random part keeps two writers with the
same pid (each its container's pid 1) from sharing a name.
A run writes its many per-tensor files without the fsync (``durable=False``) and makes them
durable together with :func:`make_durable` before its manifest: one flush of the disk cache
instead of one per file.  Until then a power loss can tear a renamed file; resuming checks
every file against its recorded sha256, so a torn one is redone, never trusted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import os
import re
import secrets
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from qstrat.errors import FormatError, OutputError
from qstrat.io.names import LOCK_NAME

TEMP_MARKER = ".tmp-"
_OVERLAP_BYTES = 4 << 20  # below this, a thread costs more than it saves


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def _create_held(tmp: Path, target: Path) -> int:
    """Create ``tmp`` (a fresh name) and return a descriptor holding an exclusive flock on it, which
    marks its writer as alive until the descriptor is closed (by the writer, or by its death)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise OutputError(describe_os_error(target, err)) from None
    with contextlib.suppress(OSError):  # a filesystem without flock: the file is still written
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


class HashingWriter:
    """A binary sink that hashes (sha256) and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _OVERLAP_BYTES:
            # hashing and writing both release the GIL: hash on a second thread meanwhile
            hasher = threading.Thread(target=self._hash.update, args=(view,), name="qstrat-sha256")
            hasher.start()
            try:
                self._raw.write(view)
            finally:
                hasher.join()
        else:
            self._hash.update(view)
            self._raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def describe_os_error(path: Path, err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}"
    if err.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(err)):
        # numpy's tofile says only this of a full disk (or an exhausted quota)
        return f"no space left on the device while writing {path} (a short write: {err})"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied writing {path}"
    return f"cannot write {path}: {err.strerror or err}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; renamed onto it if the block completes, removed if not.

    For writers that open the file themselves (the GGUF writer); whatever they write must be
    flushed and closed when the block ends.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    held = _create_held(tmp, path)  # writers open the same file again: the lock is on it, not on them
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(describe_os_error(path, err)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(held)


@contextlib.contextmanager
def atomic_writer(path: Path, durable: bool = True) -> Iterator[HashingWriter]:
    """Yield a hashing writer whose content appears at ``path`` only if the block completes
    (fsynced first when ``durable``)."""
    with atomic_path(path) as tmp:
        try:
            raw = open(tmp, "wb")
        except OSError as err:
            raise OutputError(describe_os_error(Path(path), err)) from None
        with raw:
            writer = HashingWriter(raw)
            yield writer
            raw.flush()
            if durable:
                os.fsync(raw.fileno())
            else:
                start_writeback(raw.fileno())


def _sync_file_range():
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk without waiting (Linux; elsewhere nothing).

    The disk then works while the next tensors are computed, and :func:`make_durable` finds
    little left to flush.  Only a hint: write errors surface at the fsync.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def make_durable(paths: Iterable[Path], directory: Path) -> None:
    """fsync files written with ``durable=False``, then the directory holding their names."""
    for path in [*paths, directory]:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise OutputError(describe_os_error(Path(path), err)) from None


def remove_stale_temporaries(directory: Path, *, keep_live_writers: bool = False, of: str | None = None) -> int:
    """Delete temporaries left by interrupted writers; returns how many were removed.  A run holding
    its output's lock removes every one; ``keep_live_writers`` keeps those whose writer still holds
    its lock on them (it is alive, in whatever container or host), for a directory no lock guards;
    ``of``: only those of that file name (in a directory of the user's, where nothing else is qstrat's)."""
    removed = 0
    for entry in Path(directory).glob(f".{'*' if of is None else glob.escape(of)}{TEMP_MARKER}*"):
        # one that cannot be opened or locked to tell (another user's; no flock here) is kept
        with contextlib.suppress(OSError):
            if keep_live_writers:
                with flock_path(entry, blocking=False) as free:
                    if not free:
                        continue
                    entry.unlink()  # under its lock: no writer can take it meanwhile
            else:
                entry.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def flock_path(path: Path, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive flock on the file or directory ``path`` (released when the holder dies, however
    it dies); yields whether it was taken (always, if ``blocking``).  A live holder, in whatever
    container or host, is told by its lock: pids do not tell across pid namespaces."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


_HASH_CHUNK = 1 << 22


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes (what a manifest records of each file); None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def require_sha256(path: Path, expected: str, directory: Path) -> None:
    """Stop with a :class:`FormatError` naming ``path`` unless its bytes have the sha256 the manifest
    of ``directory`` records (``expected``): a file changed since the run is not the model."""
    found = file_sha256(path)
    if found != expected:
        why = "cannot be read" if found is None else "differs from the manifest's sha256 (changed or corrupted since it was written)"
        raise FormatError(f"{path}: {why}; qstrat verify {directory} checks every file")


@contextlib.contextmanager
def output_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output directory for the whole run.

    An OS file lock (flock): it is released when the process dies, however it dies, so a
    lock left by a killed run never blocks the next one.
    """
    path = directory / LOCK_NAME
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as err:
        raise OutputError(describe_os_error(path, err)) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputError(f"output {directory} is in use by {holder}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)  # released: an empty lock file names nobody
    finally:
        handle.close()
