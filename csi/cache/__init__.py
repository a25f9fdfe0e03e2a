"""The node cache: verified ModelPacks on node-local disk, one pull per digest.

``Cache`` is the one object the node plugin uses (``csi.node``,
``csi.prefetch``, ``csi.server``, ``csi.main``); it wires the jobs below
and delegates to them, one module each:

    store.py      the shared state under one lock: trees, state files, the
                  index, leases, refs; lookups and space accounting
    pull.py       one pull per reference and per digest, on its own pool
    evict.py      LRU eviction between the watermarks, idle trees only
    scrub.py      the periodic, rate-limited rehash of blobs and tree files
    taint.py      corrupt trees still mounted: moved aside, removed after unmount
    inventory.py  inventory.json / ``/inventory``, gauges, change listeners
    recover.py    restart recovery and loading the index

Layout under ``--cache-dir`` (a ``BlobStore`` root plus trees and state)::

    blobs/sha256/<hex>     layers, configs and manifests, verified on write
    ingest/<hex>.part      a blob being downloaded (resumed after a crash)
    models/<hex>/          the read-only tree of manifest <hex>; what pods see
    tainted/<hex>-<ns>/    a tree scrub found corrupt while mounted (taint.py)
    state/<hex>.json       per model: references, pin, placement method;
                           its mtime is the model's last use (LRU)
    refs.json              tag -> digest, last resolved (publish offline)
    inventory.json         what the controller reads (also served on HTTP)
    scrub.json             when the last scrub round completed

A tree appears only complete (``place_tree`` renames a finished temp dir),
and it is listed only once its manifest, config and state are on disk, so a
crash at any point leaves either nothing visible or a whole verified model.

Concurrency: ``pull`` returns one shared future per reference, and a lock
per digest makes two references to the same model fetch once. A publish
``lease``s a tree from before it mounts until the mount is made; eviction
skips leased, mounted (read from mountinfo), pinned and in-flight models.
Pulls run on their own thread pool so the gRPC event loop never blocks.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from csi.cache import recover as _recover
from csi.cache import scrub as _scrub
from csi.cache import taint as _taint
from csi.cache.evict import Evictor
from csi.cache.inventory import Inventory
from csi.cache.pull import ClientFactory, Puller
from csi.cache.recover import PART_MAX_AGE
from csi.cache.store import ModelStore, Tree
from modelpack.oci import reference
from modelpack.oci.manifest import ModelPack
from modelpack.oci.reference import Reference

__all__ = ["PART_MAX_AGE", "Cache", "ClientFactory", "Finding", "Tree"]

Finding = _scrub.Finding

# one logger for the whole cache: its lines keep "logger": "csi.cache" after the split
log = logging.getLogger(__name__)


class Cache:
    """The node-local model cache; thread-safe."""

    def __init__(self, root: str, client_for: ClientFactory, *, capacity: int | None = None,
                 high_watermark: float = 0.85, low_watermark: float = 0.70,
                 pull_workers: int = 4, blob_workers: int = 4, tag_ttl: float = 60.0,
                 scrub_rate: float = 0.0) -> None:
        if not 0 < low_watermark <= high_watermark <= 1:  # before anything is made on disk
            raise ValueError("watermarks need 0 < low <= high <= 1")
        self._models = ModelStore(root, capacity=capacity, tag_ttl=tag_ttl)
        self._inventory = Inventory(self._models, high=high_watermark, low=low_watermark)
        self._evictor = Evictor(self._models, high=high_watermark, low=low_watermark,
                                changed=self._inventory.refresh)
        self._puller = Puller(self._models, client_for, make_room=self._evictor.make_room,
                              changed=self._inventory.refresh, workers=pull_workers,
                              blob_workers=blob_workers)
        # the settings, read-only, as before the split
        self.root = self._models.root
        self.store = self._models.blobs
        self.models_dir = self._models.models_dir
        self.state_dir = self._models.state_dir
        self.client_for = client_for
        self.configured_capacity = capacity
        self.high = high_watermark
        self.low = low_watermark
        self.blob_workers = blob_workers
        self.tag_ttl = tag_ttl
        self.scrub_rate = scrub_rate  # bytes a second, 0: no limit
        self._stopping = threading.Event()
        self._started = time.time()
        self._scrub_listeners: list[Callable[[Finding], None]] = []
        self.last_scrub: _scrub.Report | None = None

    def tree_path(self, digest: str) -> str:
        return self._models.tree_path(digest)

    def recover(self) -> None:
        """Make the cache consistent after a crash; load the index (``recover.py``)."""
        _recover.recover(self._models, self._inventory.refresh)
        self.sweep_tainted()  # trees tainted before the restart whose pods are gone

    # -- lookup and leases (store.py) -----------------------------------------------

    def local_digest(self, ref: Reference, *, fresh_only: bool = True) -> str | None:
        """The digest ``ref`` names, without the network; tags only while fresh."""
        return self._models.local_digest(ref, fresh_only=fresh_only)

    def lease(self, digest: str) -> Tree | None:
        """Hold a cached tree against eviction until ``release``; None if not cached."""
        return self._models.lease(digest)

    def release(self, digest: str) -> None:
        self._models.release(digest)

    def pack_of(self, digest: str) -> ModelPack | None:
        return self._models.pack_of(digest)

    def digests(self) -> list[str]:
        """Manifest digests of the complete trees in the cache."""
        return self._models.digests()

    def pulled_as(self, ref: Reference) -> bool:
        """Whether a cached tree was pulled as ``ref`` (``<repository>@<digest>``)."""
        return self._models.pulled_as(ref)

    # -- pulling (pull.py) -------------------------------------------------------------

    def pull(self, ref: Reference, pin: bool = False) -> cf.Future[str]:
        """Ensure ``ref`` is cached; one shared future (of its digest) per reference."""
        return self._puller.pull(ref, pin)

    # -- space and eviction (store.py, evict.py) ---------------------------------------

    def capacity(self) -> int:
        return self._models.capacity()

    def usage(self) -> int:
        """Bytes the cache holds: blobs, plus trees placed by copy (they share nothing)."""
        return self._models.usage()

    def mounted(self) -> Counter[str]:
        """Manifest hexes of cached trees mounted anywhere (from mountinfo), with counts."""
        return self._models.mounted()

    def evict(self, target_bytes: int, need_free: int = 0) -> list[str]:
        """Evict least-recently-used idle trees until usage <= target_bytes."""
        return self._evictor.evict(target_bytes, need_free)

    def maybe_evict(self) -> list[str]:
        """Evict down to the low watermark if usage is above the high one."""
        return self._evictor.maybe_evict()

    # -- scrub (scrub.py) ----------------------------------------------------------------

    def scrub(self) -> list[str]:
        """One scrub round (``scrub.py``): rehash blobs and tree files within the I/O
        budget; drop corrupt blobs and idle trees, taint mounted ones, pull pinned ones
        again. Returns the corrupt blobs; ``last_scrub`` holds the whole report."""
        try:
            report = _scrub.scrub(self._models, _scrub.Budget(self.scrub_rate, self._stopping))
        except _scrub.Stopped:
            return []
        finally:
            self._inventory.refresh()
        self.last_scrub = report
        for ref in report.repin:
            fut = self._puller.pull(reference.parse(ref), pin=True)
            fut.add_done_callback(_log_repin_failure)
        for finding in report.findings:
            for fn in self._scrub_listeners:
                fn(finding)
        log.info("scrub round done", extra={"bytes": report.bytes,
                                            "seconds": round(report.seconds, 1),
                                            "corruptBlobs": report.corrupt_blobs,
                                            "findings": len(report.findings)})
        return report.corrupt_blobs

    def scrub_due_in(self, interval: float) -> float:
        """Seconds until the next round is due: ``interval`` after the last complete one
        (kept in ``scrub.json`` across restarts), or after this process started."""
        return _scrub.due_in(self._models, interval, self._started)

    def sweep_tainted(self) -> int:
        """Remove tainted trees no mount shows any more; return how many are left."""
        return _taint.sweep(self._models)

    def add_scrub_listener(self, fn: Callable[[Finding], None]) -> None:
        """Call ``fn`` with each model scrub dropped or tainted (it must not block)."""
        self._scrub_listeners.append(fn)

    # -- inventory (inventory.py) ----------------------------------------------------------

    def inventory(self) -> dict[str, Any]:
        return self._inventory.report()

    def write_inventory(self) -> None:
        self._inventory.write()

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (no arguments; it must not block) whenever the set of cached trees
        may have changed: after recovery, a pull, an eviction, a scrub (node labels)."""
        self._inventory.add_listener(fn)

    def close(self) -> None:
        self._stopping.set()  # a running scrub round stops at its next read
        self._puller.close()


def _log_repin_failure(fut: cf.Future[str]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("pinned model not pulled again after scrub; the next publish pulls it",
                    extra={"error": str(fut.exception())[:200]})
