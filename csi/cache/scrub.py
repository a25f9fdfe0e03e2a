"""Scrub: rehash what the cache serves, within an I/O budget, and repair what fails.

Sits on ``store.ModelStore``; ``Cache.scrub`` runs one round and
``csi.main`` runs it every ``--scrub-interval`` (24h), reading at most
``--scrub-rate`` bytes a second (50 MiB/s): a token bucket (``Budget``) is
asked before every read.

What is read: every blob, then every file of every listed tree that is not
its blob's own inode. A hardlinked tree file *is* the blob (one inode), so
the blob's read covers it. A copied file has blocks of its own, and a
reflinked one shares the blob's blocks only until either side is written
(copy on write), so both can diverge from a blob that still hashes right;
they are what pods read, so they are read too (on XFS or btrfs that doubles
the bytes, within the same budget). Reads use O_DIRECT where the filesystem
allows: the disk is checked rather than the page cache, and a scrub of a
terabyte does not push the pods' working set out of memory.

What happens:

* a corrupt blob is deleted (``ModelStore.condemn``). One a running pull may
  be reusing is deleted when that pull lets go, and the pull does not list
  its tree (``check_condemned``: a retryable IntegrityError), so a pull
  that started during the round never places a blob scrub rejected;
* a listed tree built from a corrupt blob, or with a file that does not hash
  to its layer, is *dropped* when idle (``evict.evict_one``: pulled again on
  next use) or *tainted* when mounted or leased (``taint.py``: moved aside
  for the pods that have it, removed after their unmount; the next publish
  pulls a fresh tree). A pinned model either way is pulled again at once
  (``Cache.scrub``), so scrub never silently unpins;
* every finding counts in ``modelcache_node_scrub_corrupt_total{kind}``
  (``blob`` or ``tree``) and logs one error line naming the model, the
  blob or file, what it hashed to, and what was done.

A round records its end in ``<root>/scrub.json``, so a plugin restart does
not push the next round a whole interval away.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field

from csi import metrics
from csi.cache import taint
from csi.cache.evict import evict_one
from csi.cache.store import ModelStore, blob_digests, file_ident, write_json
from modelpack.errors import ModelPackError
from modelpack.paths import join_under

# one logger for the whole cache: its lines keep "logger": "csi.cache" after the split
log = logging.getLogger(__package__)

READ = 4 << 20  # bytes per read (and per token request): page-aligned for O_DIRECT


class Stopped(Exception):
    """The plugin is stopping: the round ends where it is."""


class Budget:
    """A token bucket of bytes a second; ``rate`` 0 means no limit.

    ``take(n)`` spends ``n`` tokens and sleeps off any debt, so a round that
    reads N bytes lasts at least N/rate seconds. The bucket starts empty and
    holds at most one second's worth (the burst after a pause).
    """

    def __init__(self, rate: float, stop: threading.Event | None = None) -> None:
        self.rate = rate
        self.stop = stop or threading.Event()
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def take(self, n: int) -> None:
        if self.stop.is_set():
            raise Stopped()
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate) - n
        self._stamp = now
        if self._tokens < 0 and self.stop.wait(-self._tokens / self.rate):
            raise Stopped()


def _open_direct(path: str) -> tuple[int, bool]:
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # tmpfs and some FUSE filesystems refuse O_DIRECT
                raise
    return os.open(path, os.O_RDONLY), False


def hash_file(path: str, budget: Budget) -> tuple[str, int, tuple[int, int]]:
    """(digest, size, (st_dev, st_ino)) of the file at ``path``, read within ``budget``."""
    fd, direct = _open_direct(path)
    buf = mmap.mmap(-1, READ)  # page-aligned, as O_DIRECT wants
    view = memoryview(buf)
    try:
        st = os.fstat(fd)
        h = hashlib.sha256()
        size = 0
        while True:
            budget.take(max(0, min(READ, st.st_size - size)))
            try:
                n = os.preadv(fd, [view], size)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                os.close(fd)  # O_DIRECT opened but refuses to read: go buffered
                fd, direct = os.open(path, os.O_RDONLY), False
                continue
            if not n:
                break
            h.update(view[:n])
            size += n
        return "sha256:" + h.hexdigest(), size, (st.st_dev, st.st_ino)
    finally:
        view.release()
        buf.close()
        os.close(fd)


# a listed tree that failed: (its directory's identity when read, kind, what, why)
Bad = tuple[tuple[int, int] | None, str, str, str]


@dataclass(frozen=True)
class Finding:
    """One listed model that failed, and what was done about it."""

    digest: str  # the model (manifest digest)
    kind: str  # "blob" (a blob it is built from) or "tree" (a file pods read)
    what: str  # the blob's digest or the tree file's path
    reason: str
    action: str  # "tainted" or "dropped"
    mounts: int


@dataclass
class Report:
    corrupt_blobs: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    repin: list[str] = field(default_factory=list)  # references of pinned models dropped
    bytes: int = 0
    seconds: float = 0.0
    complete: bool = False


def scrub(s: ModelStore, budget: Budget) -> Report:
    """One round: every blob, then every tree; drop or taint what fails. Raises
    Stopped (after acting on what it found) if ``budget.stop`` is set midway."""
    start = time.monotonic()
    report = Report()
    bad: dict[str, Bad] = {}
    try:
        corrupt = _blobs(s, budget, report)
        _trees(s, budget, report, corrupt, bad)
        report.complete = True
    finally:
        _act(s, report, bad)
        report.seconds = time.monotonic() - start
        if report.complete:
            write_json(state_path(s), {"completedAt": time.time(), "bytes": report.bytes,
                                       "seconds": round(report.seconds, 3),
                                       "corruptBlobs": len(report.corrupt_blobs),
                                       "findings": len(report.findings)})
            metrics.SCRUB_COMPLETED.set(time.time())
        taint.sweep(s)
    return report


def _blobs(s: ModelStore, budget: Budget, report: Report) -> dict[str, str]:
    """Hash every blob; condemn the corrupt ones; return them with what they hashed to."""
    corrupt: dict[str, str] = {}
    for d in s.blobs.digests():
        try:
            got, size, ident = hash_file(s.blobs.path(d), budget)
        except FileNotFoundError:  # evicted since listed
            continue
        report.bytes += size
        metrics.SCRUB_BYTES.inc(size)
        if got != d and s.condemn(d, ident):
            corrupt[d] = f"content hashes to {got} ({size} bytes)"
            report.corrupt_blobs.append(d)
            metrics.SCRUB_CORRUPT.labels("blob").inc()
            log.warning("integrity scrub: corrupt blob deleted",
                        extra={"blob": d, "got": got, "bytes": size})
    return corrupt


def _trees(s: ModelStore, budget: Budget, report: Report, corrupt: dict[str, str],
           bad: dict[str, Bad]) -> None:
    """Find the listed trees built from a corrupt blob or with a file that does not hash
    to its layer; ``bad[hex]`` = (the tree directory's identity, kind, what, why)."""
    with s.lock:
        listed = [(h, e.pack) for h, e in s.index.items()]
    for hexd, pack in listed:
        tree = s.tree_path(pack.digest)
        ident = file_ident(tree)
        hit = next((d for d in blob_digests(pack) if d in corrupt), None)
        if hit is not None:
            bad[hexd] = (ident, "blob", hit, corrupt[hit])
            continue
        for layer in pack.layers:
            try:
                path = join_under(tree, layer.path)
            except ModelPackError:
                continue  # placement refused such a path: the tree cannot hold it
            have = file_ident(path)
            if have is not None and have == file_ident(s.blobs.path(layer.digest)):
                continue  # a hardlink: the blob's read covered this very inode
            try:
                got, size, _ = hash_file(path, budget)
            except FileNotFoundError:
                got, size = "nothing (the file is missing)", 0
            report.bytes += size
            metrics.SCRUB_BYTES.inc(size)
            if got != layer.digest:
                metrics.SCRUB_CORRUPT.labels("tree").inc()
                bad[hexd] = (ident, "tree", path, f"hashes to {got}, not {layer.digest}")
                break


def _act(s: ModelStore, report: Report, bad: dict[str, Bad]) -> None:
    """Drop the idle bad trees, taint the busy ones, under the lock."""
    if not bad:
        return
    with s.lock:
        busy = s.mounted()
        for hexd, (ident, kind, what, why) in bad.items():
            entry = s.index.get(hexd)
            if entry is None or file_ident(s.tree_path(entry.pack.digest)) != ident:
                continue  # evicted, or replaced by a fresh pull, since it was read
            in_use = busy[hexd] + s.leases[hexd]
            if in_use:
                if taint.taint(s, hexd) is None:
                    continue
                action = "tainted"
            else:
                evict_one(s, hexd)
                action = "dropped"
            if entry.pinned and entry.references:
                report.repin.append(entry.references[0])
            f = Finding(entry.pack.digest, kind, what, why, action, busy[hexd])
            report.findings.append(f)
            log.error(f"integrity scrub: model {action}" + (
                "; pods that have it mounted keep the corrupt copy until restarted, new "
                "publishes get a fresh one" if in_use else "; pulled again on next use"),
                extra={"digest": f.digest, "kind": kind, "corrupt": what, "reason": why,
                       "action": action, "mounts": f.mounts, "references": entry.references,
                       "pinned": entry.pinned})


def state_path(s: ModelStore) -> str:
    return os.path.join(s.root, "scrub.json")


def due_in(s: ModelStore, interval: float, started: float) -> float:
    """Seconds until the next round: ``interval`` after the last one completed (read
    from ``scrub.json``), or after ``started`` (wall clock) if none ever did."""
    try:
        with open(state_path(s)) as f:
            last = float(json.load(f)["completedAt"])
    except (OSError, ValueError, KeyError, TypeError):
        last = started
    return max(0.0, min(interval, last + interval - time.time()))
