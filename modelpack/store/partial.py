"""One blob being written: ``PartialBlob``, the only writer of an ``ingest/`` file.

Sits under ``blobs.BlobStore`` (which names the file, commits and cleans
up) and is filled by the registry client, the publish staging and the upload
gateway. It hashes every byte in the same pass as it writes it, holds the
file's lock (``partlock``) for its whole life, resumes a prefix left by a
crash by rehashing it, and maps every local file error to a typed
``StoreError`` (``store_error``).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
from typing import Any

from modelpack import digest as dg
from modelpack.errors import IntegrityError, StoreError
from modelpack.store import partlock

# Start writeback of every finished window as the download goes, so the
# final fsync finds little left to do and dirty pages never pile up behind
# it (the disk works while the network does). SYNC_FILE_RANGE_WRITE only
# starts the I/O; it does not wait for it.
WRITEBACK_WINDOW = 16 << 20
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None
try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):  # not Linux/glibc: the final fsync does it all
    _sync_file_range = None


# Large blobs are written with O_DIRECT when the filesystem allows it: the
# bytes go from the download buffer to the disk without a page-cache copy or
# a writeback pass (on the project's VMs ~1 GB/s versus ~0.3-0.8 GB/s for
# buffered writes plus fsync). Direct writes need aligned offsets, lengths and
# buffers; anything else (a resume at an odd offset, the last piece, tmpfs)
# takes the buffered path, so correctness never depends on it.
DIRECT_MIN = 8 << 20
DIRECT_ALIGN = 4096


# A ranged download (``modelpack.oci.ranged``) writes several byte ranges of one
# blob at once into the preallocated ``.part`` and records, in this extended
# attribute of the ``.part`` itself, how far each range got. An attribute and
# not a sidecar file: it lives and dies with the file under the file's own lock
# (a rename, an unlink, ``BlobStore.recover`` take it along), so no clean-up
# can part the state from its bytes. Its value:
# {"size": S, "ranges": [[start, end, done], ...]}, ranges sorted and covering
# [0, S); done counts the bytes written (and fdatasynced) from start on.
RANGES_XATTR = "user.modelcache.ranges"
_NO_XATTR = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.E2BIG, errno.ERANGE})


def _read_ranges(fd: int, size: int | None) -> list[list[int]] | None:
    """The recorded ranges of the open ``.part``, or None (none, unreadable, inconsistent)."""
    try:
        raw = os.getxattr(fd, RANGES_XATTR)
    except OSError as e:
        if e.errno in _NO_XATTR:
            return None
        raise
    try:
        state = json.loads(raw)
        ranges = [[int(a), int(b), int(d)] for a, b, d in state["ranges"]]
        pos = 0
        for a, b, d in ranges:
            if a != pos or b < a or not 0 <= d <= b - a:
                raise ValueError("ranges do not tile the blob")
            pos = b
        if int(state["size"]) != size or pos != size:
            raise ValueError("another size")
    except (ValueError, KeyError, TypeError):
        return []  # present but not trusted: dropped by the caller
    return ranges


def contiguous(ranges: list[list[int]]) -> int:
    """How many bytes from 0 on are written, by the ranges' record."""
    pos = 0
    for a, b, d in ranges:
        if a != pos:
            break
        pos = a + d
        if a + d < b:
            break
    return pos


def _open_direct(path: str) -> int:
    if not hasattr(os, "O_DIRECT"):
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:  # tmpfs and some FUSE filesystems refuse O_DIRECT
        return -1


def start_writeback(fd: int, offset: int, length: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# what may pass if tried again: space freed, a file another writer removed or renamed
# under us, a momentary shortage of descriptors or memory
_RETRYABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.ESTALE, errno.EMFILE,
                        errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EBUSY})


def store_error(e: OSError, what: str) -> StoreError:
    """The one mapping of a local file error to the store's typed error."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left while writing {what}", retryable=True)
    return StoreError(f"cannot write {what}: {e.strerror or e}", retryable=e.errno in _RETRYABLE)


class PartialBlob:
    """A blob being written: hashes every byte it is given, resumable, one writer at a time.

    Construction takes the ``.part``'s lock (``partlock.acquire``; it waits
    while another writer holds it) and keeps it until ``close``. ``offset``
    tells how many verified-prefix bytes are already there (after a crash
    or a dropped connection); the writer continues from it.

    ``committed``: where the finished blob would go. If a file of the right
    size is there once the lock is ours (another writer finished while we
    waited), the part is ``present``: ``offset`` is the whole size, nothing
    needs writing, ``path`` is the stored blob (read-only to us) and
    ``finish`` returns ``expected``. Should the caller still ``restart`` and
    send the bytes again, they are hashed and checked, not written.
    """

    def __init__(self, part_path: str, expected: str | None, size: int | None,
                 *, resume: bool = False, committed: str | None = None,
                 stall: float = partlock.STALL, direct: bool = True) -> None:
        self.path = part_path
        self.expected = expected
        self.size = size
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.dfd = -1
        self.present = False
        self.ranges: list[list[int]] | None = None  # a ranged download's record, when resumed
        self._trusted = False  # present, and not sent again: the stored blob answers
        try:
            self.fd = partlock.acquire(part_path, stall)
        except OSError as e:
            raise store_error(e, part_path) from e
        try:
            if committed is not None and self._adopt(committed):
                return
            self._load_prefix(resume)
        except OSError as e:
            self.close()
            raise store_error(e, part_path) from e
        except BaseException:
            self.close()
            raise
        self.dfd = _open_direct(part_path) \
            if direct and size is not None and size >= DIRECT_MIN else -1

    def _adopt(self, committed: str) -> bool:
        """Whether the blob is already stored at ``committed``; if so, let the part go."""
        try:
            st = os.stat(committed)
        except FileNotFoundError:
            return False
        if self.size is not None and st.st_size != self.size:
            return False  # a wrong file under the name: ours replaces it at commit
        os.unlink(self.path)  # ours to remove: the lock is held
        os.close(self.fd)
        self.fd = -1
        self.path = committed
        self.size = self.offset = st.st_size
        self.present = self._trusted = True
        return True

    def _load_prefix(self, resume: bool) -> None:
        existing = os.fstat(self.fd).st_size
        ranges = _read_ranges(self.fd, self.size) if existing and self.expected else None
        if ranges and existing == self.size:
            # a ranged download's part: the written prefix is rehashed now, the other
            # finished ranges later, in order, as the prefix reaches them
            self.ranges = ranges
            self._rehash(contiguous(ranges))
            return
        if ranges is not None:  # a record we cannot use: none of its bytes is trusted
            os.removexattr(self.fd, RANGES_XATTR)
            existing = 0
        # an unnamed blob resumes only when the caller keys its .part by a pinned source
        if existing and (self.expected is not None or resume) and (
                self.size is None or existing <= self.size):
            self._rehash(existing)
        if self.offset != os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, self.offset)

    def _rehash(self, end: int) -> None:
        """Hash the file's bytes from ``offset`` up to ``end`` (fewer if it is shorter)."""
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            buf = bytearray(dg.CHUNK)
            view = memoryview(buf)
            while self.offset < end:
                n = f.readinto(view[:min(len(view), end - self.offset)])
                if not n:
                    break
                self.hasher.update(view[:n])
                self.offset += n

    # -- ranged writing: several writers of byte ranges, one hasher in order --

    def begin_ranged(self, ranges: list[list[int]]) -> bool:
        """Preallocate the file and record ``ranges``; False where the filesystem
        keeps no extended attributes (the caller then writes in one stream)."""
        assert self.size is not None and not self.present
        try:
            if os.fstat(self.fd).st_size != self.size:
                os.posix_fallocate(self.fd, 0, self.size)  # ENOSPC now, not at 90 %
            self._record(ranges)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                self.drop_ranges()
                return False
            raise store_error(e, self.path) from e
        self.ranges = ranges
        return True

    def _record(self, ranges: list[list[int]]) -> None:
        os.setxattr(self.fd, RANGES_XATTR,
                    json.dumps({"size": self.size, "ranges": ranges}).encode())

    def write_at(self, data: memoryview, at: int) -> None:
        """Write bytes of a range (not hashed here: ``hash_to`` reads them back in order).

        Aligned pieces go with O_DIRECT, as one stream's do: a buffered write
        costs this VM's kernel more than the download itself (bench/RESULTS.md,
        "cold path"). Several range threads share the descriptor, so a refused
        direct write falls back to the buffered path for that piece only."""
        try:
            if self.dfd >= 0 and at % DIRECT_ALIGN == 0 and len(data) % DIRECT_ALIGN == 0:
                data, at = self._write_direct_at(data, at)
            while data:
                n = os.pwrite(self.fd, data, at)
                data = data[n:]
                at += n
        except OSError as e:
            raise store_error(e, self.path) from e

    def _write_direct_at(self, view: memoryview, at: int) -> tuple[memoryview, int]:
        try:
            while view:
                n = os.pwrite(self.dfd, view, at)
                if n <= 0 or n % DIRECT_ALIGN:
                    break  # a short write: the buffered path writes the rest
                view = view[n:]
                at += n
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        return view, at

    def hash_to(self, end: int) -> None:
        """Extend the hashed prefix to ``end`` from the file (the page cache, mostly)."""
        try:
            self._rehash(end)
        except OSError as e:
            raise store_error(e, self.path) from e
        if self.offset < end:
            raise StoreError(f"{self.path} is shorter than its written ranges", retryable=True)

    def save_ranges(self, ranges: list[list[int]]) -> None:
        """Make the written bytes durable, then record them (a crash resumes from here)."""
        try:
            os.fdatasync(self.fd)
            self._record(ranges)
        except OSError as e:
            raise store_error(e, self.path) from e

    def drop_ranges(self) -> None:
        """Back to one stream: keep the hashed prefix only, forget the ranges."""
        if self.ranges is None:
            return
        self.ranges = None
        try:
            os.ftruncate(self.fd, self.offset)
            os.removexattr(self.fd, RANGES_XATTR)
        except OSError as e:
            if e.errno not in _NO_XATTR:
                raise store_error(e, self.path) from e

    def restart(self) -> None:
        """Forget the prefix (the source cannot resume): start from byte 0."""
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.drop_ranges()
        if self.present:
            self._trusted = False
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError as e:
            raise store_error(e, self.path) from e

    def write(self, data: memoryview | bytes) -> None:
        if self.size is not None and self.offset + len(data) > self.size:
            raise IntegrityError(
                f"source sent more than the declared {self.size} bytes", reason="SizeMismatch")
        self.hasher.update(data)
        if self.present:  # stored already: the bytes are checked at finish, not written
            self.offset += len(data)
            return
        if self.ranges is not None:
            self.drop_ranges()  # a stream continues the prefix: the ranges' record goes
        view = memoryview(data).cast("B")
        before = self.offset
        try:
            if (self.dfd >= 0 and before % DIRECT_ALIGN == 0
                    and len(view) % DIRECT_ALIGN == 0):
                view = self._write_direct(view, before)
            at = before + len(data) - len(view)
            while view:
                n = os.pwrite(self.fd, view, at)
                view = view[n:]
                at += n
        except OSError as e:
            raise store_error(e, self.path) from e
        self.offset += len(data)
        if before // WRITEBACK_WINDOW != self.offset // WRITEBACK_WINDOW:
            window = self.offset // WRITEBACK_WINDOW * WRITEBACK_WINDOW
            start_writeback(self.fd, window - WRITEBACK_WINDOW, WRITEBACK_WINDOW)

    def _write_direct(self, view: memoryview, at: int) -> memoryview:
        """Write what O_DIRECT takes; return the rest for the buffered path."""
        try:
            while len(view) >= DIRECT_ALIGN:
                n = os.pwrite(self.dfd, view, at)
                if n <= 0 or n % DIRECT_ALIGN:
                    n -= n % DIRECT_ALIGN
                    if n <= 0:
                        break
                view = view[n:]
                at += n
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: an unaligned buffer; go buffered
                raise
            os.close(self.dfd)
            self.dfd = -1
        return view

    def finish(self) -> str:
        """fsync, check size and digest; return the digest. The file stays at ``path``."""
        if self._trusted and self.expected is not None:
            return self.expected
        if self.size is not None and self.offset != self.size:
            raise IntegrityError(
                f"got {self.offset} bytes, expected {self.size}", reason="SizeMismatch")
        got = "sha256:" + self.hasher.hexdigest()
        if self.expected is not None and got != self.expected:
            raise IntegrityError(f"content hashes to {got}, expected {self.expected}")
        if not self.present:
            try:
                if self.ranges is not None:  # a stored blob carries no download state
                    self.ranges = None
                    os.removexattr(self.fd, RANGES_XATTR)
                os.fsync(self.fd)
            except OSError as e:
                raise store_error(e, self.path) from e
        return got

    def close(self) -> None:
        """Let go of the file and its lock; what was written stays for a resume."""
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Remove the ``.part`` (never a stored blob) and let go of it."""
        if not self.present and self.fd >= 0:
            try:
                os.unlink(self.path)  # while the lock is held: the path is still ours
            except FileNotFoundError:
                pass
        self.close()
