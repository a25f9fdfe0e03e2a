"""Eviction: keep the cache between its watermarks, least recently used first.

Sits on ``store.ModelStore``. A pull asks ``make_room`` before it fetches;
``csi.main`` runs ``maybe_evict`` periodically; ``scrub`` drops a corrupt
tree through ``evict_one``. Only idle trees go: not mounted anywhere (read
from mountinfo), not leased by a publish in progress, not pinned and not
being pulled. A blob goes with its tree unless another listed model or a
running pull needs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from csi import metrics
from csi.cache.store import ModelStore, blob_digests
from modelpack.errors import StoreError
from modelpack.store.placement import Method, remove_tree

# one logger for the whole cache: its lines keep "logger": "csi.cache" after the split
log = logging.getLogger(__package__)


class Evictor:
    """LRU eviction against the high and low watermarks (fractions of capacity,
    checked by ``Cache`` before it creates anything on disk)."""

    def __init__(self, store: ModelStore, *, high: float, low: float,
                 changed: Callable[[], None]) -> None:
        self.store = store
        self.high = high
        self.low = low
        self.changed = changed  # gauges and inventory, after trees went

    def make_room(self, needed: int, digest: str) -> None:
        """Evict so that ``needed`` more bytes fit; StoreError (retryable) if they cannot."""
        s = self.store
        cap = s.capacity()
        if needed > cap:
            raise StoreError(f"model {digest} needs {needed} bytes; the cache holds {cap}",
                             retryable=True)
        if s.usage() + needed > self.high * cap or needed > s.free():
            self.evict(max(0, int(self.low * cap) - needed), need_free=needed)
        if needed > s.free():
            raise StoreError(f"no space left in the cache for {digest}: needs {needed} bytes, "
                             f"{s.free()} free and nothing else evictable", retryable=True)

    def evict(self, target_bytes: int, need_free: int = 0) -> list[str]:
        """Evict least-recently-used idle trees until usage <= target_bytes.

        Idle means: not mounted anywhere, not leased by a publish in progress,
        not pinned and not being pulled. Returns the evicted digests.
        """
        s = self.store
        evicted: list[str] = []
        with s.lock:
            busy = s.mounted()
            candidates = sorted(
                (e.last_used, h) for h, e in s.index.items()
                if not busy[h] and not s.leases[h] and not e.pinned and not s.pulling[h])
            usage = s.usage()
            for _, hexd in candidates:
                if usage <= target_bytes and s.free() >= need_free:
                    break
                freed = evict_one(s, hexd)
                usage -= freed
                evicted.append("sha256:" + hexd)
        if evicted:
            self.changed()
        return evicted

    def maybe_evict(self) -> list[str]:
        """Evict down to the low watermark if usage is above the high one."""
        cap = self.store.capacity()
        if self.store.usage() > self.high * cap:
            return self.evict(int(self.low * cap))
        return []


def evict_one(s: ModelStore, hexd: str) -> int:
    """Remove one tree and the blobs no other model needs; caller holds the lock."""
    entry = s.index.pop(hexd)
    digest = "sha256:" + hexd
    trash = os.path.join(s.models_dir, f".evict-{hexd}")
    try:
        os.rename(s.tree_path(digest), trash)
    except FileNotFoundError:
        trash = ""
    try:
        os.unlink(s.state_path(hexd))
    except FileNotFoundError:
        pass
    keep: set[str] = set(s.protected)
    for other in s.index.values():
        keep.update(blob_digests(other.pack))
    freed = 0
    for d in set(blob_digests(entry.pack)) - keep:
        try:
            freed += os.stat(s.blobs.path(d)).st_size
        except FileNotFoundError:
            continue
        s.blobs.delete(d)
    if entry.method == Method.COPY.value:
        freed += entry.pack.size
    if trash:
        remove_tree(trash)
    metrics.EVICTIONS.inc()
    metrics.EVICTED_BYTES.inc(freed)
    log.info("evicted", extra={"digest": digest, "freedBytes": freed,
                               "references": entry.references})
    return freed
