"""One writer per ``.part`` file, across threads and processes: ``flock`` on the file.

Sits under ``blobs.PartialBlob``, the one writer of ``ingest/<key>.part``
(``<key>`` is the blob's hex digest, or a caller's key for a blob whose
digest is not known yet). Why a lock on the ``.part`` itself and not a
unique temp per writer: two pulls of models sharing a layer should fetch
it once (the second waits, then finds it stored), and a writer that
crashed leaves a prefix the next one resumes; a temp per writer would
download the layer twice and strand every crashed writer's bytes.

The protocol, which every actor follows:

- ``acquire`` opens (creating) the path, takes an exclusive ``flock`` and
  then checks that the path still names the inode it locked; if not (the
  holder renamed it into place or removed it meanwhile), it tries again.
  A lock is held for the life of the open file: a writer that dies,
  SIGKILL included, releases it, and the kernel does that, not us.
- The path is renamed or unlinked only by whoever holds its lock, so a
  verified lock means the path is ours until we let go.
- Clean-up (``try_acquire``) takes the lock without waiting and skips a
  file someone holds: a live writer's file is never removed.

``flock`` (not ``fcntl`` record locks) because it is per open file: two
threads of one process exclude each other, and closing some other
descriptor of the file does not drop the lock. Every descriptor is
close-on-exec (Python's default), so a child process never inherits one.

A waiter gives up only when the holder makes no progress: it watches the
file's size and mtime, and raises ``BlobBusyError`` (retryable) after
``stall`` seconds without a change, however long the download itself takes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import time
from typing import Any

from modelpack.errors import BlobBusyError

STALL = 300.0  # seconds a waiter tolerates a holder that writes nothing
_POLL_MIN = 0.002
_POLL_MAX = 0.1


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _wait_lock(fd: int, path: str, stall: float) -> None:
    """Block until ``fd`` is locked; BlobBusyError after ``stall`` s of no progress."""
    delay = _POLL_MIN
    seen: tuple[int, int] | None = None
    since = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        st = os.fstat(fd)
        now = time.monotonic()
        if (st.st_size, st.st_mtime_ns) != seen:
            seen = (st.st_size, st.st_mtime_ns)
            since = now
        elif now - since > stall:
            raise BlobBusyError(
                f"{os.path.basename(path)} is held by another writer that has made no "
                f"progress for {stall:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)


def acquire(path: str, stall: float = STALL) -> int:
    """An open, writable descriptor of ``path`` (created if absent), exclusively locked.

    OSError is the caller's to map; BlobBusyError when the holder stalls.
    """
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _wait_lock(fd, path, stall)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # committed or removed while we waited: look again


def try_acquire(path: str) -> int | None:
    """A locked read-only descriptor of an existing ``path``; None if it is gone or held."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def remove_if_idle(path: str) -> bool:
    """Unlink ``path`` unless a writer holds it; whether it was removed."""
    fd = try_acquire(path)
    if fd is None:
        return False
    try:
        os.unlink(path)
    finally:
        os.close(fd)
    return True


# renameat2(RENAME_NOREPLACE): a commit never replaces a file another writer put there
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2: Any = None
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
except (OSError, AttributeError):  # glibc < 2.28 or not Linux: the check-then-rename below
    _renameat2 = None


def rename_noreplace(src: str, dst: str) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists; False (nothing moved) if it does.

    Without renameat2 (old libc, a filesystem that refuses the flag) it checks,
    then renames: writers of a digest hold its lock, so the only ones that can
    race here are writers that learnt the digest at the end, and both hold
    verified bytes of it; the later one then replaces an identical file.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), src)
    if os.path.lexists(dst):
        return False
    os.replace(src, dst)
    return True
