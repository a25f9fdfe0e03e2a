"""Volume records: which model each published target shows, across restarts.

A record ``{target, volumeId, key, digest, publishedAt}`` lets a repeated
publish answer without a registry round trip, makes a different model at a
mounted target ALREADY_EXISTS, and lets NodeGetVolumeStats find its volume.

Records are held in memory and in one append-only journal,
``<cache>/volumes.jsonl``: one line per publish (the record) or unpublish
(``{"target": ..., "dropped": true}``), later lines winning. A journal
rather than a file per volume because creating an inode on the node's disk
costs far more than a publish's mount(2) calls (~0.5 ms of kernel CPU on
ext4 here, against ~2 us for an append to an open file). Each line is one
write(2) on an O_APPEND descriptor, so a crash leaves at most a torn last
line, which loading skips.

Nothing here is fsynced (the per-volume files before were not either): a
record only matters while its bind mount exists, and mounts do not survive
the power loss that could drop an unsynced line or rewrite; a process crash
loses nothing, the page cache outlives it. A record that is lost anyway
costs one slow publish (the mount is compared with the tree, and the record
written again), never a wrong answer. So no publish ever waits on a disk flush.

``load`` (at startup) reads the journal, keeps the records whose target is
still a mount point and rewrites the journal with just those; the journal
is rewritten the same way whenever dead lines outnumber live ones by far.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

JOURNAL = "volumes.jsonl"
LEGACY_DIR = "volumes"  # one <sha256(target)[:32]>.json per volume, before the journal
COMPACT_MIN_LINES = 1000


class VolumeRecords:
    """The records of published volumes; thread-safe."""

    def __init__(self, cache_root: str) -> None:
        self.root = cache_root
        self.path = os.path.join(cache_root, JOURNAL)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._lines = 0
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")  # end a line torn by a crash, or the next one is lost with it
        return fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- reads and writes ----------------------------------------------------------

    def get(self, target: str) -> dict[str, Any] | None:
        with self._lock:
            return self._records.get(target)

    def put(self, target: str, volume_id: str, key: str, digest: str) -> None:
        rec = {"target": target, "volumeId": volume_id, "key": key, "digest": digest,
               "publishedAt": time.time()}
        with self._lock:
            self._append(rec)
            self._records[target] = rec
            self._maybe_compact()

    def drop(self, target: str) -> None:
        with self._lock:
            # written even when no record is known: load may not have run yet
            self._append({"target": target, "dropped": True})
            self._records.pop(target, None)
            self._maybe_compact()

    def _append(self, obj: dict[str, Any]) -> None:
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        n = os.write(self._fd, line)
        if n != len(line):  # a short write (disk full): end the torn line so the next parses
            os.write(self._fd, b"\n")
            raise OSError(f"short write to {self.path}: {n} of {len(line)} bytes")
        self._lines += 1

    # -- startup and compaction ----------------------------------------------------

    def load(self, mount_points: Iterable[str]) -> None:
        """Read the journal (and records of the old layout), keep those still mounted."""
        points = set(mount_points)
        with self._lock:
            records: dict[str, dict[str, Any]] = {}
            for rec in self._legacy():
                records[rec["target"]] = rec
            try:
                with open(self.path, "rb") as f:
                    for raw in f:
                        try:
                            rec = json.loads(raw)
                            target = rec["target"]
                        except (ValueError, KeyError, TypeError):
                            continue  # a torn line from a crash
                        if not isinstance(target, str):
                            continue
                        if rec.get("dropped"):
                            records.pop(target, None)
                        else:
                            records[target] = rec
            except FileNotFoundError:
                pass
            for target in [t for t in records if t not in points]:
                rec = records.pop(target)
                log.info("dropping record of an unmounted volume",
                         extra={"target": target, "volumeId": rec.get("volumeId")})
            self._records = records
            self._rewrite()
            self._drop_legacy()

    def _maybe_compact(self) -> None:
        if self._lines > max(COMPACT_MIN_LINES, 4 * len(self._records)):
            self._rewrite()

    def _rewrite(self) -> None:
        """Replace the journal with one line per live record; caller holds the lock."""
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            for rec in self._records.values():
                f.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
        os.replace(tmp, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = self._open()
        self._lines = len(self._records)

    def _legacy(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        legacy = os.path.join(self.root, LEGACY_DIR)
        try:
            names = os.listdir(legacy)
        except FileNotFoundError:
            return out
        for name in names:
            try:
                with open(os.path.join(legacy, name)) as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("target"), str):
                out.append(rec)
        return out

    def _drop_legacy(self) -> None:
        legacy = os.path.join(self.root, LEGACY_DIR)
        try:
            names = os.listdir(legacy)
        except FileNotFoundError:
            return
        for name in names:
            try:
                os.unlink(os.path.join(legacy, name))
            except OSError:
                pass
        try:
            os.rmdir(legacy)
        except OSError:
            pass
