"""Safe expansion of a staged tar or zip archive into the staging store.

Pipeline position: the worker has staged an archive as one verified blob;
this turns it into model files, each streamed into the ``BlobStore`` and
hashed in the same pass, never written under a path of its own choosing.
Refused with ``UnsafeSourceError``: names that are absolute, climb with
``..`` or repeat; symlinks, hardlinks, devices and FIFOs; more entries,
more bytes, or a higher expansion ratio than the bounds allow (a bomb is
caught from the declared sizes before its bytes are inflated; zip reads
are also capped at the declared size by ``zipfile`` and CRC-checked).
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from typing import IO

from ingest.sources import base
from modelpack.errors import UnsafePathError
from modelpack.paths import safe_relpath
from modelpack.store.blobs import BlobStore


@dataclass(frozen=True)
class Limits:
    max_entries: int = 100_000
    max_bytes: int = 4 << 40
    max_ratio: float = 100.0  # expanded / archive size, enforced past ratio_floor bytes
    ratio_floor: int = 64 << 20


@dataclass(frozen=True)
class Entry:
    path: str
    digest: str
    size: int


def _name(raw: str) -> str:
    name = raw[2:] if raw.startswith("./") else raw
    name = name.rstrip("/") if name.endswith("/") else name
    try:
        return safe_relpath(name)
    except UnsafePathError as e:
        raise base.UnsafeSourceError(f"archive entry refused: {e}", reason="UnsafePath") from e


class _Budget:
    def __init__(self, archive_size: int, limits: Limits) -> None:
        self.archive_size = max(archive_size, 1)
        self.limits = limits
        self.entries = 0
        self.total = 0
        self.names: set[str] = set()
        self.dirs: set[str] = set()

    def entry(self, name: str, size: int, is_dir: bool) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise base.UnsafeSourceError(
                f"archive has more than {self.limits.max_entries} entries", reason="ArchiveBomb")
        if is_dir:
            self.dirs.add(name)
            return
        if name in self.names:
            raise base.UnsafeSourceError(f"archive entry {name!r} appears twice",
                                         reason="UnsafePath")
        self.names.add(name)
        if size < 0:
            raise base.UnsafeSourceError(f"archive entry {name!r} has a negative size",
                                         reason="UnsafePath")
        self.total += size
        if self.total > self.limits.max_bytes:
            raise base.UnsafeSourceError(
                f"archive expands past {self.limits.max_bytes} bytes", reason="ArchiveBomb")
        if (self.total > self.limits.ratio_floor
                and self.total / self.archive_size > self.limits.max_ratio):
            raise base.UnsafeSourceError(
                f"archive of {self.archive_size} bytes expands to over {self.total} bytes "
                f"(ratio above {self.limits.max_ratio:g})", reason="ArchiveBomb")

    def check_tree(self) -> None:
        for name in self.names:  # a file may not also be a directory of another file
            parent = name.rsplit("/", 1)[0] if "/" in name else ""
            while parent:
                if parent in self.names:
                    raise base.UnsafeSourceError(f"{parent!r} is both a file and a directory",
                                                 reason="UnsafePath")
                parent = parent.rsplit("/", 1)[0] if "/" in parent else ""


def _ingest(store: BlobStore, stream: IO[bytes], size: int, name: str) -> str:
    try:
        return store.ingest_stream(stream, None, size)  # type: ignore[arg-type]
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise base.SourceIntegrityError(f"archive entry {name!r} is corrupt: {e}",
                                        reason="CorruptArchive") from e


def _tar(path: str, store: BlobStore, budget: _Budget) -> list[Entry]:
    out: list[Entry] = []
    with tarfile.open(path, "r:*") as tf:
        while True:
            member = tf.next()
            if member is None:
                break
            if member.issym() or member.islnk():
                raise base.UnsafeSourceError(
                    f"archive entry {member.name[:100]!r} is a link; links are refused",
                    reason="LinkInArchive")
            if member.isdir():
                budget.entry(_name(member.name), 0, True)
                continue
            if not member.isreg():
                raise base.UnsafeSourceError(
                    f"archive entry {member.name[:100]!r} is not a regular file",
                    reason="UnsafePath")
            name = _name(member.name)
            budget.entry(name, member.size, False)
            f = tf.extractfile(member)
            if f is None:
                raise base.UnsafeSourceError(f"archive entry {name!r} has no data",
                                             reason="UnsafePath")
            with f:
                out.append(Entry(name, _ingest(store, f, member.size, name), member.size))
    return out


def _zip(path: str, store: BlobStore, budget: _Budget) -> list[Entry]:
    out: list[Entry] = []
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > budget.limits.max_entries:
            raise base.UnsafeSourceError(
                f"archive has more than {budget.limits.max_entries} entries", reason="ArchiveBomb")
        for info in infos:  # all bounds first, from the central directory
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise base.UnsafeSourceError(
                    f"archive entry {info.filename[:100]!r} is a link; links are refused",
                    reason="LinkInArchive")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise base.UnsafeSourceError(
                    f"archive entry {info.filename[:100]!r} is not a regular file",
                    reason="UnsafePath")
            if info.flag_bits & 0x1:
                raise base.SourceError(f"archive entry {info.filename[:100]!r} is encrypted",
                                       reason="UnsupportedArchive")
            budget.entry(_name(info.filename), info.file_size, info.is_dir())
        budget.check_tree()
        for info in infos:
            if info.is_dir():
                continue
            name = _name(info.filename)
            with zf.open(info) as f:
                out.append(Entry(name, _ingest(store, f, info.file_size, name), info.file_size))
    return out


def expand(path: str, store: BlobStore, limits: Limits | None = None) -> list[Entry]:
    """Expand the archive at ``path`` into ``store``; return its files, sorted."""
    budget = _Budget(os.path.getsize(path), limits or Limits())
    try:
        if zipfile.is_zipfile(path):
            out = _zip(path, store, budget)
        elif tarfile.is_tarfile(path):
            out = _tar(path, store, budget)
            budget.check_tree()
        else:
            raise base.SourceError("not a tar or zip archive", reason="UnsupportedArchive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, EOFError) and e.errno is not None:
            raise  # a local I/O error is the store's, not the archive's
        raise base.SourceIntegrityError(f"archive is corrupt: {e}",
                                        reason="CorruptArchive") from e
    if not out:
        raise base.SourceError("archive holds no files", reason="EmptyArchive")
    return sorted(out, key=lambda e: e.path)
