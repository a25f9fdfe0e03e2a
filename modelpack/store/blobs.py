"""A content-addressed blob store: ``<root>/blobs/sha256/<hex>``.

A blob becomes visible only once its bytes hash to its name: data goes to
``<root>/ingest/<hex>.part`` while it is hashed in the same pass, is
fsynced, and is renamed into place only when the digest matches. A crash
leaves at most a ``.part`` file, which the next writer of that digest
resumes (it rehashes the prefix and continues) and ``recover`` removes
once no one can resume it. The same layout is the ``blobs/`` directory of
an OCI image layout.

Single flight per digest, across threads and processes (``partlock``): a
``PartialBlob`` holds an exclusive lock on its ``.part`` for its whole
life, so one writer at a time fills it and the bytes committed are exactly
the bytes that writer hashed. A second writer of the digest waits for the
lock, then finds the blob stored (``present``: nothing to fetch) or resumes
the prefix the first one left. The commit renames without replacing
(``rename_noreplace``): a writer that finds the name taken by a file of the
right size has lost a race it did not need to win, which is success.
Clean-up (``drop_parts``, ``recover``) removes only files whose lock is
free. Every failure leaves as a ``StoreError`` (retryable when space or a
lost race may be the cause) or an ``IntegrityError``, never a raw OSError.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable

from modelpack import digest as dg
from modelpack.errors import IntegrityError, StoreError
from modelpack.store import partlock
from modelpack.store.partial import PartialBlob, store_error

__all__ = ["BlobStore", "PartialBlob", "fsync_dir", "store_error"]

Progress = Callable[[int], None]


def _noop(_: int) -> None:
    pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Blobs by digest under ``root``; writes are atomic, verified, one writer per digest.

    ``stall``: how long a writer waits on another writer of the same digest
    that makes no progress before it gives up (``BlobBusyError``).
    """

    def __init__(self, root: str, *, stall: float = partlock.STALL) -> None:
        self.root = root
        self.blob_dir = os.path.join(root, "blobs", "sha256")
        self.ingest_dir = os.path.join(root, "ingest")
        self.stall = stall
        try:
            os.makedirs(self.blob_dir, exist_ok=True)
            os.makedirs(self.ingest_dir, exist_ok=True)
        except OSError as e:
            raise store_error(e, root) from e

    def path(self, digest: str) -> str:
        return os.path.join(self.blob_dir, dg.hex_of(digest))

    def part_path(self, digest: str) -> str:
        return os.path.join(self.ingest_dir, dg.hex_of(digest) + ".part")

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def open_partial(self, digest: str, size: int | None, *,
                     direct: bool = True) -> PartialBlob:
        """The writer of ``digest``, once no one else is; commit it with ``commit``.

        Check ``present`` first: the blob may have been stored while this waited.
        ``direct=False``: no O_DIRECT writes, for a blob read back at once (the
        page cache then serves that read instead of the disk).
        """
        return PartialBlob(self.part_path(digest), digest, size, committed=self.path(digest),
                           stall=self.stall, direct=direct)

    def commit(self, part: PartialBlob) -> str:
        """Verify a finished partial blob and rename it into place; return its digest.

        The name is never taken from a good file: if a file of the same size
        is already there (a writer that learnt the digest only at its end got
        there first), that file stays and this part is dropped; a file of
        another size under the name is not that blob and is replaced.
        """
        try:
            got = part.finish()
        except IntegrityError:
            part.discard()
            raise
        if part.present:
            part.close()
            return got
        final = self.path(got)
        try:
            os.fchmod(part.fd, 0o444)
            if not partlock.rename_noreplace(part.path, final):
                if os.stat(final).st_size == part.offset:
                    os.unlink(part.path)
                else:
                    os.replace(part.path, final)
            fsync_dir(self.blob_dir)
        except OSError as e:
            raise store_error(e, final) from e
        finally:
            part.close()
        return got

    def ingest_stream(self, stream: dg.Readable, expected: str | None = None,
                      size: int | None = None, progress: Progress = _noop) -> str:
        """Copy a stream into the store, hashing in the same pass; return its digest."""
        if expected is not None and self.has(expected, size):
            progress(size or 0)
            return expected
        if expected is not None:
            part = self.open_partial(expected, size)
        else:  # a name of its own: nobody resumes it, so nobody waits for it
            part = PartialBlob(os.path.join(self.ingest_dir, f"tmp-{secrets.token_hex(8)}.part"),
                               None, size, stall=self.stall)
        if part.present:
            part.close()
            progress(part.offset)
            return part.finish()
        try:
            if part.offset:  # a prefix left by an earlier writer: go on from there if we can
                seekable = getattr(stream, "seekable", None)
                if seekable is not None and seekable():
                    stream.seek(part.offset, os.SEEK_CUR)  # type: ignore[attr-defined]
                    progress(part.offset)
                else:
                    part.restart()
            buf = bytearray(dg.CHUNK)
            view = memoryview(buf)
            while True:
                n = stream.readinto(view)
                if not n:
                    break
                part.write(view[:n])
                progress(n)
        except BaseException:
            if expected is None:
                part.discard()
            else:
                part.close()
            raise
        return self.commit(part)

    def ingest_file(self, path: str, expected: str | None = None,
                    progress: Progress = _noop) -> str:
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror or e}") from e
        with f:
            return self.ingest_stream(f, expected, os.fstat(f.fileno()).st_size, progress)

    def delete(self, digest: str) -> None:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise store_error(e, self.path(digest)) from e

    def digests(self) -> list[str]:
        return ["sha256:" + h for h in sorted(_listdir(self.blob_dir)) if _is_hex(h)]

    def scrub(self) -> list[str]:
        """Rehash every blob; delete and return those whose content is not their name."""
        bad = []
        for d in self.digests():
            try:
                got, _ = dg.of_file(self.path(d))
            except FileNotFoundError:
                continue  # deleted meanwhile (evicted): nothing to check
            except OSError as e:
                raise StoreError(f"cannot read {self.path(d)}: {e.strerror or e}") from e
            if got != d:
                self.delete(d)
                bad.append(d)
        return bad

    def drop_parts(self, digests: Iterable[str]) -> int:
        """Remove the ``.part`` files of ``digests`` that no writer holds (after a
        disk-full failure: they cannot finish now); how many went."""
        return sum(partlock.remove_if_idle(self.part_path(d)) for d in set(digests))

    def recover(self, max_age: float | None = None) -> list[str]:
        """Remove what is in ``ingest/`` that no one is writing and no one can resume:
        files not named ``<hex>.part`` (writers that learnt their digest at the end
        never resume), empty parts, parts of blobs stored since, and parts older than
        ``max_age`` seconds. A part a live writer holds is never touched. Returns the
        names removed."""
        removed = []
        now = time.time()
        for name in sorted(_listdir(self.ingest_dir)):
            full = os.path.join(self.ingest_dir, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)  # no writer makes directories here
                removed.append(name)
                continue
            fd = partlock.try_acquire(full)
            if fd is None:
                continue  # a live writer's, or gone
            try:
                st = os.fstat(fd)
                key = name.removesuffix(".part")
                if (not name.endswith(".part") or not _is_hex(key) or st.st_size == 0
                        or os.path.exists(os.path.join(self.blob_dir, key))
                        or (max_age is not None and now - st.st_mtime > max_age)):
                    os.unlink(full)  # ours to remove: the lock is held
                    removed.append(name)
            except OSError as e:
                raise store_error(e, full) from e
            finally:
                os.close(fd)
        return removed


def _is_hex(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise store_error(e, path) from e
