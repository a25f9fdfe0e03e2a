"""The per-node inventory: what the cache holds, as JSON, and who hears of changes.

Sits on ``store.ModelStore``; ``Cache`` hands it the watermarks it reports.
``inventory.json`` under the cache root and the ``/inventory`` HTTP
endpoint (``csi.metrics``) serve the same ``report``, which the controller
reads. ``refresh`` runs after every change to the set of trees (recovery,
pull, eviction, scrub): it sets the cache gauges, rewrites the file and
calls the listeners (node labels).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from csi import metrics
from csi.cache import taint
from csi.cache.store import ModelStore, write_json
from modelpack.errors import StoreError

# one logger for the whole cache: its lines keep "logger": "csi.cache" after the split
log = logging.getLogger(__package__)


class Inventory:
    """Reports the cache's content; tells listeners when it may have changed."""

    def __init__(self, store: ModelStore, *, high: float, low: float) -> None:
        self.store = store
        self.high = high
        self.low = low
        self._listeners: list[Callable[[], None]] = []

    def report(self) -> dict[str, Any]:
        s = self.store
        busy = s.mounted()
        with s.lock:
            models = [{
                "digest": e.pack.digest,
                "references": list(e.references),
                "sizeBytes": e.pack.size,
                "files": len(e.pack.layers),
                "lastUsed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.last_used)),
                "pinned": e.pinned,
                "mounts": busy[h],
                "method": e.method,
                "format": e.pack.metadata().get("format"),
            } for h, e in sorted(s.index.items(), key=lambda kv: -kv[1].last_used)]
            pulling = sorted(s.inflight)
        return {"capacityBytes": s.capacity(), "usedBytes": s.usage(),
                "highWatermark": self.high, "lowWatermark": self.low,
                "models": models, "pulling": pulling,
                # corrupt trees kept for the pods that mount them (csi.cache.taint)
                "tainted": taint.listing(s)}

    def write(self) -> None:
        try:
            write_json(os.path.join(self.store.root, "inventory.json"), self.report())
        except (StoreError, OSError) as e:  # a full disk must not fail the caller
            log.warning("inventory not written", extra={"error": str(e)[:200]})
        for fn in self._listeners:  # the inventory is rewritten whenever the trees change
            fn()

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def refresh(self) -> None:
        """Set the cache gauges, then ``write``."""
        self.update_gauges()
        self.write()

    def update_gauges(self) -> None:
        s = self.store
        metrics.CACHE_BYTES.set(s.usage())
        metrics.CACHE_CAPACITY.set(s.capacity())
        with s.lock:
            metrics.CACHE_MODELS.set(len(s.index))
