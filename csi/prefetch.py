"""Prefetch: pull selected models into this node's cache before any pod asks.

A Model or ClusterModel with ``spec.delivery.nodeCache.prefetch.nodeSelector``
is prefetched by every node whose labels match the selector (all pairs
equal; an empty selector matches every node, as in a Pod's nodeSelector),
once it is Ready. The pull goes through ``Cache.pull``, the same
one-pull-per-digest path a publish takes, so a publish arriving mid-prefetch
joins the same pull; nothing is mounted.

Inputs are the resolver's informers (Models, ClusterModels) and a watch of
this node's own Node object (its labels; ``fieldSelector=metadata.name``),
so a label added to the node, or a model becoming Ready, starts a prefetch
within a second. One prefetch pull runs at a time: the cache's pull pool is
shared with publishes, which must never queue behind a row of prefetches.
A failed pull is retried with a backoff (30 s doubling to 10 min).

A digest is prefetched once per plugin run: if the cache later evicts it
(idle, and the cache above its high watermark), it is not pulled again, or
a cache too small for every prefetched model would pull them round and
round. ``nodeCache.pin: true`` keeps a model from eviction instead.
Progress and errors: logs (``prefetch``, and the cache's ``pulling`` /
``pulled``) and the metrics ``modelcache_node_prefetch{result}`` and
``modelcache_node_prefetch_pending``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from typing import Any, Protocol, Self

from csi import metrics
from csi.debounced import Debounced
from csi.resolvers.kube import KubeResolver, ModelEntry, connection_gauge
from kube import client as kube
from kube.informer import Informer
from modelpack.oci.reference import Reference

log = logging.getLogger(__name__)


class PrefetchCache(Protocol):
    """What a prefetch needs of the node cache (``csi.cache.Cache``); a seam so that
    ``bench/scale/nodes.py`` can run many prefetchers in one process over a stand-in."""

    def pull(self, ref: Reference, pin: bool = False) -> cf.Future[str]: ...

    def pack_of(self, digest: str) -> object | None: ...


def _labels(node: dict[str, Any]) -> dict[str, str]:
    return dict((node.get("metadata") or {}).get("labels") or {})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Prefetcher(Debounced):
    """Starts prefetch pulls from a thread of its own; woken by the watches."""

    name = "prefetch"

    def __init__(self, api: Any, node: str, resolver: KubeResolver, cache: PrefetchCache, *,
                 debounce: float = 0.5, retry: float = 30.0, max_retry: float = 600.0) -> None:
        super().__init__(debounce, retry)  # also wakes to retry failed pulls
        self.node = node
        self.resolver = resolver
        self.cache = cache
        self.retry = retry
        self.max_retry = max_retry
        self.node_info = Informer(api, kube.NODES, field_selector=f"metadata.name={node}",
                                  transform=_labels, on_connection=connection_gauge("node"))
        for informer in (self.node_info, resolver.models, resolver.cluster_models):
            informer.handlers.append(lambda *_: self.poke())
        self._done: set[str] = set()  # digests cached (by us or anyone) during this run
        self._failed: dict[str, tuple[float, float]] = {}  # digest -> (retry at, backoff)
        self._inflight: str | None = None
        self._lock = threading.Lock()

    def start(self) -> Self:
        self.node_info.start()
        return super().start()

    def stop(self) -> None:
        super().stop()
        self.node_info.stop()

    def wanted(self) -> list[ModelEntry]:
        """Ready models whose prefetch selector matches this node's labels."""
        labels = self.node_info.get(("", self.node))
        if labels is None:  # the Node is not known (yet): select nothing
            return []
        return [e for e in self.resolver.entries()
                if e.prefetch is not None and not e.problem and selects(e.prefetch, labels)]

    def round(self) -> None:
        """Start the next prefetch pull, if one is owed and none runs."""
        pending: dict[str, ModelEntry] = {}
        for e in self.wanted():
            assert e.digest is not None  # no problem means Ready with an artifact
            if e.digest in self._done:
                continue
            if self.cache.pack_of(e.digest) is not None:
                self._done.add(e.digest)
                continue
            if e.digest not in pending or e.pin:
                pending[e.digest] = e
        metrics.PREFETCH_PENDING.set(len(pending))
        now = time.monotonic()
        with self._lock:
            if self._inflight is not None:
                return
            ready = [e for d, e in pending.items() if now >= self._failed.get(d, (0.0, 0.0))[0]]
            if not ready:
                return
            entry = ready[0]
            self._inflight = entry.digest
        ref = entry.reference()
        log.info("prefetch", extra={"model": entry.what, "reference": str(ref),
                                    "node": self.node})
        metrics.PREFETCH.labels("started").inc()
        self.cache.pull(ref, entry.pin).add_done_callback(
            lambda fut: self._finished(entry, fut))

    def _finished(self, entry: ModelEntry, fut: cf.Future[str]) -> None:
        digest = str(entry.digest)
        error = fut.exception()
        with self._lock:
            self._inflight = None
            if error is None:
                self._done.add(digest)
                self._failed.pop(digest, None)
            else:
                backoff = self._failed.get(digest, (0.0, self.retry / 2))[1] * 2
                backoff = min(backoff, self.max_retry)
                self._failed[digest] = (time.monotonic() + backoff, backoff)
        if error is None:
            metrics.PREFETCH.labels("pulled").inc()
            log.info("prefetched", extra={"model": entry.what, "digest": digest})
        else:
            metrics.PREFETCH.labels("error").inc()
            log.warning("prefetch failed", extra={"model": entry.what, "digest": digest,
                                                  "error": str(error)[:300],
                                                  "retryIn": self._failed[digest][1]})
        self.poke()
