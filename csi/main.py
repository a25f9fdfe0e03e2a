"""``modelcache-node``: the NodeCache CSI node plugin's command line.

Parses flags, sets up JSON logs and metrics, builds the cache, the
resolver and the registry clients, starts the gRPC server, recovers the
cache, then runs periodic eviction and scrub until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import signal
import threading

from csi import logs, metrics
from csi.cache import Cache
from csi.identity import DRIVER_NAME
from csi.resolver import FileResolver, NoResolver, Resolver
from csi.server import create_server, socket_path
from modelpack.oci.registry import RegistryClient

log = logging.getLogger("csi")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size_arg(text: str) -> int:
    """``500Gi``, ``20G``, ``1048576`` -> bytes (binary units either way)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtKMGT]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500Gi)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def duration_arg(text: str) -> float:
    """``90s``, ``15m``, ``24h``, ``0`` (off) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 24h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def fraction_arg(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError("a watermark is a fraction in (0, 1]")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelcache-node",
        description=f"NodeCache CSI node plugin ({DRIVER_NAME}): serves ephemeral inline "
                    "volumes that show a ModelPack, pulled once per node into a verified "
                    "content-addressed cache, read-only in the pod.",
        epilog="Example: modelcache-node --endpoint unix:///csi/csi.sock "
               "--cache-dir /var/lib/modelcache --node-id $NODE_NAME "
               "--models-file /etc/modelcache/models.yaml --insecure-registry 127.0.0.1:5000",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--endpoint", required=True,
                   help="gRPC endpoint kubelet talks to, unix:///path/to/csi.sock")
    p.add_argument("--cache-dir", required=True,
                   help="node-local cache directory (blobs, model trees, state); "
                        "reflink-capable filesystems (XFS, btrfs) make publishes copy-free")
    p.add_argument("--node-id", required=True, help="this node's name, returned by NodeGetInfo")
    p.add_argument("--models-file", default=None,
                   help="JSON/YAML mapping model names to registry references "
                        "({models: {ns/name: ref}, clusterModels: {name: ref}}); re-read on "
                        "change. Without it every model is NOT_FOUND.")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                   help="talk plain HTTP to this registry (repeatable)")
    p.add_argument("--registry-ca", default=None, help="CA bundle for registry TLS")
    p.add_argument("--metrics-address", default="",
                   help="host:port serving /metrics, /inventory and /healthz "
                        "(empty: not served)")
    p.add_argument("--cache-capacity", type=size_arg, default=None,
                   help="bytes the cache may use (default: the filesystem's size)")
    p.add_argument("--high-watermark", type=fraction_arg, default=0.85,
                   help="evict idle models when usage exceeds this fraction of the capacity")
    p.add_argument("--low-watermark", type=fraction_arg, default=0.70,
                   help="eviction stops at this fraction of the capacity")
    p.add_argument("--pull-workers", type=int, default=4, help="models pulled at once")
    p.add_argument("--blob-workers", type=int, default=4, help="parallel blob downloads per pull")
    p.add_argument("--tag-ttl", type=duration_arg, default=60.0,
                   help="reuse a tag's resolved digest this long before asking the registry "
                        "again; a registry that is down falls back to the last digest anyway")
    p.add_argument("--max-wait", type=duration_arg, default=110.0,
                   help="longest a publish waits for a pull before answering ABORTED "
                        "(also bounded by the call's deadline)")
    p.add_argument("--evict-interval", type=duration_arg, default=60.0,
                   help="how often to check the high watermark (0: only before pulls)")
    p.add_argument("--scrub-interval", type=duration_arg, default=0.0,
                   help="rehash every cached blob this often, dropping corrupt ones (0: off)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "text"])
    return p


class Clients:
    """One RegistryClient per registry host, created on first use."""

    def __init__(self, insecure: list[str], ca_bundle: str | None) -> None:
        self.insecure = set(insecure)
        self.ca_bundle = ca_bundle
        self._lock = threading.Lock()
        self._clients: dict[str, RegistryClient] = {}

    def __call__(self, host: str) -> RegistryClient:
        with self._lock:
            client = self._clients.get(host)
            if client is None:
                client = RegistryClient(host, insecure=host in self.insecure,
                                        ca_bundle=self.ca_bundle, timeout=(5.0, 60.0),
                                        retries=2)
                self._clients[host] = client
            return client


async def _periodic(interval: float, fn: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            await loop.run_in_executor(None, fn)  # type: ignore[arg-type]
        except Exception:  # a failed round is logged and tried again next interval
            log.exception("periodic task failed", extra={"task": what})


async def run(args: argparse.Namespace) -> None:
    cache = Cache(args.cache_dir, Clients(args.insecure_registry, args.registry_ca),
                  capacity=args.cache_capacity, high_watermark=args.high_watermark,
                  low_watermark=args.low_watermark, pull_workers=args.pull_workers,
                  blob_workers=args.blob_workers, tag_ttl=args.tag_ttl)
    resolver: Resolver = FileResolver(args.models_file) if args.models_file else NoResolver()
    plugin = await create_server(args.endpoint, args.node_id, cache, resolver,
                                 max_wait=args.max_wait)
    log.info("serving", extra={"endpoint": args.endpoint, "nodeId": args.node_id,
                               "cacheDir": args.cache_dir})
    if args.metrics_address:
        def inventory() -> dict[str, object]:
            return {"nodeId": args.node_id, **cache.inventory()}

        metrics.serve(args.metrics_address, inventory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await plugin.recover()
    # What startup made (modules, grpc, protobuf, the cache index) lives as long as the
    # process: move it out of the collector's reach, so a full collection, which
    # stops the event loop, does not rescan it while publishes wait.
    gc.freeze()
    tasks = []
    if args.evict_interval > 0:
        tasks.append(asyncio.create_task(_periodic(args.evict_interval, cache.maybe_evict,
                                                   "evict")))
    if args.scrub_interval > 0:
        tasks.append(asyncio.create_task(_periodic(args.scrub_interval, cache.scrub, "scrub")))
    await stop.wait()
    log.info("stopping")
    for t in tasks:
        t.cancel()
    await plugin.stop()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        socket_path(args.endpoint)
    except ValueError as e:
        parser().error(str(e))
    if args.low_watermark > args.high_watermark:
        parser().error("--low-watermark must not exceed --high-watermark")
    logs.setup(args.log_level, args.log_format)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
