"""A tar written by hand so that every blob's data starts on a 4 KiB boundary.

Where it sits: the writing end of an air-gap bundle (``bundle_export.py``).
Aligned data goes to the disk with O_DIRECT straight from the download
buffer (on the project's VMs ~1.5 GB/s against ~0.27 GB/s buffered plus
fsync); headers, padding and a blob's unaligned tail take the buffered path.
The alignment is a PAX ``comment`` record of computed length, which every
tar reader ignores. Every header and small file is hashed on the way; blob
bytes are hashed by the caller, in tar order, into the same ``h``: the
bundle's sha256.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tarfile

from modelpack.oci.bundle import ALIGN


def _open_direct(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):  # tmpfs refuses O_DIRECT; not Linux: no O_DIRECT
        return -1


class AlignedTarWriter:
    """The tar at ``path``; ``finish`` ends it, ``close`` releases it (the caller renames)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = _open_direct(path)
        self.h = hashlib.sha256()
        self.offset = 0

    def _write(self, data: bytes | memoryview) -> None:
        """Headers, small files, padding: hashed and written buffered, in order."""
        self.h.update(data)
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, self.offset)
            view, self.offset = view[n:], self.offset + n

    def _header(self, name: str, size: int, align: bool) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = \
            size, 0, 0o444, 0, 0, "", ""
        blocks = (-self.offset - tarfile.BLOCKSIZE) % ALIGN // tarfile.BLOCKSIZE
        if align and blocks:
            # a PAX header is one block, its records, then the ustar block: >= 3 blocks
            records = (blocks if blocks >= 2 else blocks + ALIGN // tarfile.BLOCKSIZE) - 1
            length = records * tarfile.BLOCKSIZE
            ti.pax_headers = {"comment": "x" * (length - 10 - len(str(length)))}
        buf = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._write(buf)
        if align:
            assert self.offset % ALIGN == 0, (name, self.offset)

    def add_bytes(self, name: str, data: bytes) -> None:
        self._header(name, len(data), align=False)
        self._write(data)
        self._pad()

    def begin_blob(self, name: str, size: int) -> int:
        """The header of a layer of ``size`` bytes; returns where its data starts (aligned).

        The data itself is hashed by the caller and written with ``write_at``;
        ``end_blob`` then moves past it."""
        self._header(name, size, align=True)
        return self.offset

    def end_blob(self, size: int) -> None:
        self.offset += size
        self._pad()

    def write_at(self, view: memoryview, offset: int) -> None:
        """Write already-hashed layer bytes at ``offset`` (4 KiB aligned): the aligned part
        with O_DIRECT straight from the page-aligned buffer, a tail buffered."""
        whole = len(view) - len(view) % ALIGN
        done = 0
        if whole and self.dfd >= 0:
            try:
                while done < whole:
                    done += os.pwrite(self.dfd, view[done:whole], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: O_DIRECT refused after all; go buffered
                    raise
                os.close(self.dfd)
                self.dfd = -1
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def _pad(self) -> None:
        if self.offset % tarfile.BLOCKSIZE:
            self._write(bytes(tarfile.BLOCKSIZE - self.offset % tarfile.BLOCKSIZE))

    def finish(self) -> None:
        """The end-of-archive marker, padding to a whole record, then fsync."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.offset % tarfile.RECORDSIZE))
        os.fsync(self.fd)

    def close(self) -> None:
        for fd in (self.dfd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.dfd = self.fd = -1
