"""Scrub: rehash every blob, drop corrupt ones and the idle trees built from them.

Sits on ``store.ModelStore`` and removes trees through ``evict.evict_one``;
``csi.main`` runs it every ``--scrub-interval``. Blobs a running pull needs
are skipped (they may be half placed). A hardlinked tree shares the corrupt
inode, so the tree must go too; a mounted or leased one cannot be replaced
under a pod and is reported instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from csi import metrics
from csi.cache.evict import evict_one
from csi.cache.store import ModelStore, blob_digests
from modelpack import digest as dg

# one logger for the whole cache: its lines keep "logger": "csi.cache" after the split
log = logging.getLogger(__package__)


def scrub(s: ModelStore, changed: Callable[[], None]) -> list[str]:
    """Rehash every blob; return the corrupt ones dropped. ``changed`` runs if any were."""
    with s.lock:
        protected = set(s.protected)
    bad = []
    for d in s.blobs.digests():
        if d in protected:
            continue
        try:
            got, _ = dg.of_file(s.blobs.path(d))
        except FileNotFoundError:
            continue
        if got != d:
            s.blobs.delete(d)
            bad.append(d)
    if not bad:
        return []
    metrics.SCRUB_CORRUPT.inc(len(bad))
    badset = set(bad)
    with s.lock:
        busy = s.mounted()
        for hexd, entry in list(s.index.items()):
            if not set(blob_digests(entry.pack)) & badset:
                continue
            if busy[hexd] or s.leases[hexd]:
                log.error("corrupt blob under a mounted model; it is re-pulled once "
                          "unmounted", extra={"digest": entry.pack.digest})
                continue
            evict_one(s, hexd)
    log.warning("scrub dropped corrupt blobs", extra={"digests": bad})
    changed()
    return bad
