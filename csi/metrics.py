"""Prometheus metrics of the node plugin, and the HTTP endpoint serving them.

The same small HTTP server answers ``/metrics`` (Prometheus text format),
``/inventory`` (the cache inventory as JSON, to loopback peers only: 403 to others) and
``/healthz``. Metrics are module singletons: one process, one plugin.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client as prom

log = logging.getLogger(__name__)

CACHE_BYTES = prom.Gauge("modelcache_node_cache_bytes", "Bytes used by the node cache (blobs)")
CACHE_MODELS = prom.Gauge("modelcache_node_cache_models", "Model trees in the node cache")
CACHE_CAPACITY = prom.Gauge("modelcache_node_cache_capacity_bytes",
                            "Capacity the node cache evicts against")
HITS = prom.Counter("modelcache_node_cache_hits", "Publishes served from a cached tree")
MISSES = prom.Counter("modelcache_node_cache_misses", "Publishes that needed a pull")
PULL_BYTES = prom.Counter("modelcache_node_pull_bytes", "Bytes downloaded from registries")
PULL_SECONDS = prom.Histogram("modelcache_node_pull_seconds", "Duration of model pulls",
                              ["result"], buckets=(0.1, 0.5, 1, 5, 15, 60, 180, 600, 1800, 3600))
PUBLISH_SECONDS = prom.Histogram(
    "modelcache_node_publish_seconds", "NodePublishVolume latency", ["code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120))
UNPUBLISH_SECONDS = prom.Histogram("modelcache_node_unpublish_seconds",
                                   "NodeUnpublishVolume latency", ["code"])
EVICTIONS = prom.Counter("modelcache_node_evictions", "Model trees evicted from the cache")
EVICTED_BYTES = prom.Counter("modelcache_node_evicted_bytes", "Blob bytes freed by eviction")
# the integrity scrub (csi/cache/scrub.py, taint.py)
SCRUB_CORRUPT = prom.Counter("modelcache_node_scrub_corrupt",
                             "Corrupt content found by scrub: kind=blob (a stored blob, deleted) "
                             "or tree (a file pods read, its tree dropped or tainted)", ["kind"])
for _kind in ("blob", "tree"):  # present at 0, so an alert's increase() sees the first
    SCRUB_CORRUPT.labels(_kind)
SCRUB_BYTES = prom.Counter("modelcache_node_scrub_bytes", "Bytes read and hashed by scrub")
SCRUB_COMPLETED = prom.Gauge("modelcache_node_scrub_completed_timestamp_seconds",
                             "When the last complete scrub round ended (Unix time)")
TAINTED_TREES = prom.Gauge("modelcache_node_tainted_trees",
                           "Corrupt model trees kept only for the pods that still mount them")
# the Kubernetes side (csi/resolvers/kube.py, csi/nodelabels.py, csi/prefetch.py)
KUBE_WATCH_CONNECTED = prom.Gauge("modelcache_node_kube_watch_connected",
                                  "1 while the watch of this resource is connected",
                                  ["resource"])
NODE_LABEL_PATCHES = prom.Counter("modelcache_node_label_patches",
                                  "Patches of this node's cache labels, by result", ["result"])
PREFETCH = prom.Counter("modelcache_node_prefetch",
                        "Prefetch pulls by result (started, pulled, error)", ["result"])
PREFETCH_PENDING = prom.Gauge("modelcache_node_prefetch_pending",
                              "Models selected for prefetch on this node and not cached yet")


IDLE_TIMEOUT = 30.0  # seconds a connection may stay silent


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def serve(address: str, inventory: Callable[[], dict[str, Any]]) -> ThreadingHTTPServer:
    """Start the metrics/inventory HTTP server on ``host:port`` in a daemon thread."""
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_TIMEOUT  # a client that sends nothing loses its connection and thread

        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype = prom.generate_latest(), prom.CONTENT_TYPE_LATEST
            elif self.path == "/inventory" and not _loopback(self.client_address[0]):
                # what every namespace caches is nobody's business off this node
                self.send_error(403)
                return
            elif self.path == "/inventory":
                body, ctype = json.dumps(inventory(), indent=1).encode(), "application/json"
            elif self.path == "/healthz":
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics listening", extra={"address": f"{host}:{server.server_address[1]}"})
    return server
