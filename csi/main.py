"""``modelcache-node``: the NodeCache CSI node plugin's command line.

Parses flags, sets up JSON logs and metrics, builds the cache, the
resolver and the registry clients, starts the gRPC server, recovers the
cache, then runs periodic eviction and scrub until SIGTERM/SIGINT. Scrub is
on by default: a round every ``--scrub-interval`` (24h, counted from the
last complete round, across restarts), reading at most ``--scrub-rate``
(50 MiB/s); with a cluster, what it finds is also an Event on this Node.

Two resolvers: ``--models-file`` (standalone nodes, tests, csi-sanity) or
the Kubernetes one (``--resolver kube``: Model/ClusterModel status, with
``--kubeconfig`` or the pod's service account). With a cluster, the plugin
also keeps its Node's cache labels (``csi.nodelabels``) and prefetches
selected models (``csi.prefetch``); both default to on with the Kubernetes
resolver and off otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import signal
import threading
import time

from api import names
from csi import metrics
from csi.cache import Cache, Finding
from csi.identity import DRIVER_NAME
from csi.nodelabels import NodeLabeler
from csi.prefetch import Prefetcher
from csi.resolvers.base import NoResolver, Resolver
from csi.resolvers.file import FileResolver
from csi.resolvers.kube import KubeResolver
from csi.server import create_server, socket_path
from kube import client as kubeclient
from kube import logs
from kube.events import Recorder
from kube.flags import binary_size_arg
from modelpack.oci import mirrors as oci_mirrors
from modelpack.oci.ranged import RangePolicy
from modelpack.oci.registry import RegistryClient

log = logging.getLogger("csi")


def duration_arg(text: str) -> float:
    """``90s``, ``15m``, ``24h``, ``0`` (off) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 24h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def rate_arg(text: str) -> int:
    """``50Mi/s``, ``50Mi``, ``0`` (no limit) -> bytes a second."""
    return binary_size_arg(text.strip().removesuffix("/s"))


def fraction_arg(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError("a watermark is a fraction in (0, 1]")
    return v


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the ``None`` of options that are off or inferred."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelcache-node",
        description=f"NodeCache CSI node plugin ({DRIVER_NAME}): serves ephemeral inline "
                    "volumes that show a ModelPack, pulled once per node into a verified "
                    "content-addressed cache, read-only in the pod.",
        epilog="Example: modelcache-node --endpoint unix:///csi/csi.sock "
               "--cache-dir /var/lib/modelcache --node-id $NODE_NAME "
               "--models-file /etc/modelcache/models.yaml --insecure-registry 127.0.0.1:5000; "
               "in a cluster: --resolver kube (the pod's service account) or "
               "--kubeconfig PATH.",
        formatter_class=_Help)
    p.add_argument("--endpoint", required=True,
                   help="gRPC endpoint kubelet talks to, unix:///path/to/csi.sock")
    p.add_argument("--cache-dir", required=True,
                   help="node-local cache directory (blobs, model trees, state); "
                        "reflink-capable filesystems (XFS, btrfs) make publishes copy-free")
    p.add_argument("--node-id", required=True, help="this node's name, returned by NodeGetInfo")
    p.add_argument("--models-file", default=None,
                   help="JSON/YAML mapping model names to registry references "
                        "({models: {ns/name: ref}, clusterModels: {name: ref}}); re-read on "
                        "change. Without it (and without --resolver kube) every model is "
                        "NOT_FOUND.")
    p.add_argument("--resolver", choices=["file", "kube"], default=None,
                   help="where model names are looked up: 'file' (--models-file) or 'kube' "
                        "(Model/ClusterModel status in the API server; a Model only in the "
                        "pod's namespace). Default: 'file' with --models-file, else 'kube' "
                        "with --kubeconfig or in a pod, else none (every model NOT_FOUND)")
    p.add_argument("--kubeconfig", default=None, metavar="PATH",
                   help="kubeconfig for the API server; without it, the pod's service "
                        "account (in-cluster credentials)")
    p.add_argument("--kube-max-stale", type=duration_arg, default=600.0,
                   help="with the API server unreachable, keep answering from the watched "
                        "Models this long, then answer UNAVAILABLE")
    p.add_argument("--node-labels", action=argparse.BooleanOptionalAction, default=None,
                   help=f"label this node (--node-id) {names.NODE_LABEL_PREFIX}sha256-<digest "
                        "prefix>=true for every model its cache holds, and remove the labels "
                        "of evicted ones, so workloads can prefer nodes that need no pull "
                        "(default: on with --resolver kube)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="pull Ready models whose spec.delivery.nodeCache.prefetch.nodeSelector "
                        "matches this node's labels ahead of any pod (needs --resolver kube; "
                        "default: on with it)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                   help="talk plain HTTP to this registry (repeatable)")
    p.add_argument("--registry-ca", default=None, help="CA bundle for registry TLS")
    p.add_argument("--pull-via", action="append", default=[], metavar="FROM=TO",
                   help="fetch references on registry FROM from registry TO instead (in a "
                        "cluster: the DMCR's read-only pull endpoint); repeatable")
    p.add_argument("--registry-mirror", action="append", default=[], metavar="HOST=URL",
                   help="ask URL first for HOST's blobs and pinned manifests (repeatable, in "
                        "order; every byte is verified, the registry is the fallback)")
    p.add_argument("--registry-hosts-dir", default=None, metavar="DIR",
                   help="mirrors in containerd's certs.d layout: DIR/HOST/hosts.toml")
    p.add_argument("--registry-credentials", default=None, metavar="DIR",
                   help="a directory with 'username' and 'password' files (a mounted Secret: "
                        "the DMCR pull user), sent to every registry this node pulls from; "
                        "re-read when they change")
    p.add_argument("--metrics-address", default="",
                   help="host:port serving /metrics, /inventory and /healthz "
                        "(empty: not served)")
    p.add_argument("--cache-capacity", type=binary_size_arg, default=None,
                   help="bytes the cache may use (default: the filesystem's size)")
    p.add_argument("--high-watermark", type=fraction_arg, default=0.85,
                   help="evict idle models when usage exceeds this fraction of the capacity")
    p.add_argument("--low-watermark", type=fraction_arg, default=0.70,
                   help="eviction stops at this fraction of the capacity")
    p.add_argument("--pull-workers", type=int, default=4, help="models pulled at once")
    p.add_argument("--blob-workers", type=int, default=4, help="parallel blob downloads per pull")
    p.add_argument("--range-streams", type=int, default=8,
                   help="byte ranges fetched at once for a blob of 256 MiB or more whose one "
                        "stream proves slow (1: one stream)")
    p.add_argument("--tag-ttl", type=duration_arg, default=60.0,
                   help="reuse a tag's resolved digest this long before asking the registry "
                        "again; a registry that is down falls back to the last digest anyway")
    p.add_argument("--max-wait", type=duration_arg, default=110.0,
                   help="longest a publish waits for a pull before answering ABORTED "
                        "(also bounded by the call's deadline)")
    p.add_argument("--evict-interval", type=duration_arg, default=60.0,
                   help="how often to check the high watermark (0: only before pulls)")
    p.add_argument("--scrub-interval", type=duration_arg, default="24h",
                   help="rehash every cached blob and model file this often, counted from "
                        "the last complete round; corrupt models are pulled again (mounted "
                        "ones once their pods restart) (0: off)")
    p.add_argument("--scrub-rate", type=rate_arg, default="50Mi/s",
                   help="most bytes a second scrub reads from the cache's disk (0: no limit)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "text"])
    return p


class Clients:
    """One RegistryClient per registry host, created on first use.

    ``pull_via`` maps a host named in references to the host actually asked
    (the DMCR's read-only endpoint serves the same repositories and digests),
    so a node never holds a credential that can push.

    ``credentials_dir`` (a mounted Secret) is read again at most every
    ``reread`` seconds: kubelet replaces a mounted Secret's files when the
    Secret changes, so a new DMCR pull password reaches the plugin without a
    restart. When the pair changed, the clients are made again with it; pulls
    already running keep the client they have.
    """

    def __init__(self, insecure: list[str], ca_bundle: str | None, *,
                 pull_via: dict[str, str] | None = None,
                 credentials: tuple[str, str] | None = None,
                 credentials_dir: str | None = None, reread: float = 10.0,
                 range_streams: int = 8, mirrors: oci_mirrors.Mirrors | None = None) -> None:
        self.insecure = set(insecure)
        self.mirrors = mirrors or oci_mirrors.Mirrors()  # by the host references name
        self.ranges = RangePolicy(streams=range_streams)
        self.ca_bundle = ca_bundle
        self.pull_via = dict(pull_via or {})
        self.credentials_dir = credentials_dir
        self.credentials = credentials if credentials is not None else \
            read_credentials(credentials_dir)
        self.reread = reread
        self._read_at = time.monotonic()
        self._lock = threading.Lock()
        self._clients: dict[str, RegistryClient] = {}

    def _refresh(self) -> None:
        """Re-read the credential files when due (holding ``_lock``)."""
        now = time.monotonic()
        if not self.credentials_dir or now - self._read_at < self.reread:
            return
        self._read_at = now
        try:
            fresh = read_credentials(self.credentials_dir)
        except OSError as e:  # mid-update or gone: keep the pair that worked
            log.warning("registry credentials unreadable; keeping the previous ones",
                        extra={"dir": self.credentials_dir, "error": type(e).__name__})
            return
        if fresh != self.credentials:
            log.info("registry credentials changed", extra={"dir": self.credentials_dir})
            self.credentials = fresh
            self._clients.clear()

    def __call__(self, host: str) -> RegistryClient:
        target = self.pull_via.get(host, host)
        with self._lock:
            self._refresh()
            client = self._clients.get(target)
            if client is None:
                user, password = self.credentials or (None, None)
                client = RegistryClient(target, insecure=target in self.insecure,
                                        ca_bundle=self.ca_bundle, timeout=(5.0, 60.0),
                                        retries=2, username=user, password=password,
                                        ranges=self.ranges)
                # a mirror list is keyed by the host in references, as containerd's is
                self.mirrors.attach(client, host if self.mirrors.of(host) else target)
                self._clients[target] = client
            return client


def pull_via_arg(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        src, sep, dst = v.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"--pull-via {v!r}: expected FROM=TO (two registry hosts)")
        out[src.strip()] = dst.strip()
    return out


def read_credentials(directory: str | None) -> tuple[str, str] | None:
    """username/password files of a mounted Secret; never logged."""
    if not directory:
        return None
    with open(os.path.join(directory, "username")) as u, \
            open(os.path.join(directory, "password")) as pw:
        return u.read().strip(), pw.read().strip()


async def _periodic(interval: float, fn: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            await loop.run_in_executor(None, fn)  # type: ignore[arg-type]
        except Exception:  # a failed round is logged and tried again next interval
            log.exception("periodic task failed", extra={"task": what})


async def _scrub_rounds(cache: Cache, interval: float) -> None:
    loop = asyncio.get_running_loop()
    delay = cache.scrub_due_in(interval)
    while True:
        await asyncio.sleep(delay)
        try:
            await loop.run_in_executor(None, cache.scrub)
            delay = cache.scrub_due_in(interval)
        except Exception:  # a failed round is logged and tried again next interval
            log.exception("periodic task failed", extra={"task": "scrub"})
            delay = interval


def _scrub_event(events: Recorder, node: str, f: Finding) -> None:
    """A Warning Event on this Node for a model scrub dropped or tainted."""
    events.record({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}},
                  "Warning", "ModelCorrupt",
                  f"integrity scrub: {f.kind} {f.what} of model {f.digest} {f.reason}; "
                  f"the model was {f.action}" + (f" ({f.mounts} mounts keep the corrupt copy "
                                                 "until their pods restart)" if f.mounts else ""))


def settle_kube_flags(args: argparse.Namespace) -> str | None:
    """Infer --resolver, --node-labels and --prefetch; an error message if they clash."""
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if args.resolver is None:
        args.resolver = ("file" if args.models_file else
                         "kube" if args.kubeconfig or in_cluster else None)
    if args.resolver == "file" and not args.models_file:
        return "--resolver file needs --models-file"
    if args.resolver == "kube" and args.models_file:
        return "--models-file and --resolver kube exclude each other"
    if args.node_labels is None:
        args.node_labels = args.resolver == "kube"
    if args.prefetch is None:
        args.prefetch = args.resolver == "kube"
    if args.prefetch and args.resolver != "kube":
        return "--prefetch reads Models from the API server: it needs --resolver kube"
    if (args.resolver == "kube" or args.node_labels) and not (args.kubeconfig or in_cluster):
        return "no API server: give --kubeconfig, or run in a pod"
    return None


async def run(args: argparse.Namespace, api: kubeclient.Kube | None = None) -> None:
    clients = Clients(args.insecure_registry, args.registry_ca,
                      pull_via=pull_via_arg(args.pull_via),
                      credentials_dir=args.registry_credentials,
                      range_streams=args.range_streams,
                      mirrors=oci_mirrors.load(args.registry_hosts_dir, args.registry_mirror))
    cache = Cache(args.cache_dir, clients,
                  capacity=args.cache_capacity, high_watermark=args.high_watermark,
                  low_watermark=args.low_watermark, pull_workers=args.pull_workers,
                  blob_workers=args.blob_workers, tag_ttl=args.tag_ttl,
                  scrub_rate=args.scrub_rate)
    resolver: Resolver = NoResolver()
    kube: KubeResolver | None = None
    if args.resolver == "file":
        resolver = FileResolver(args.models_file, cache.client_for)
    elif args.resolver == "kube":
        assert api is not None  # main() made it
        resolver = kube = KubeResolver(api, cache.client_for, max_stale=args.kube_max_stale,
                                       verified=cache.pulled_as).start()
    labeler: NodeLabeler | None = None
    if args.node_labels:
        assert api is not None  # main() made it
        labeler = NodeLabeler(api, args.node_id, cache.digests)
    if labeler is not None:
        cache.add_listener(labeler.poke)
    events: Recorder | None = None
    if api is not None:
        events = Recorder(api, component="modelcache-node")
        events.start()
        cache.add_scrub_listener(lambda f: _scrub_event(events, args.node_id, f))
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
    # after recovery: the first label reconcile and prefetch round see the whole cache
    background: list[NodeLabeler | Prefetcher] = []
    if labeler is not None:
        background.append(labeler.start())
    if args.prefetch and kube is not None:
        background.append(Prefetcher(api, args.node_id, kube, cache).start())
    log.info("kubernetes", extra={"resolver": args.resolver or "none",
                                  "nodeLabels": args.node_labels, "prefetch": args.prefetch})
    # What startup made (modules, grpc, protobuf, the cache index) lives as long as the
    # process: move it out of the collector's reach, so a full collection, which
    # stops the event loop, does not rescan it while publishes wait.
    gc.freeze()
    tasks = []
    if args.evict_interval > 0:
        tasks.append(asyncio.create_task(_periodic(args.evict_interval, cache.maybe_evict,
                                                   "evict")))
    if args.scrub_interval > 0:
        tasks.append(asyncio.create_task(_scrub_rounds(cache, args.scrub_interval)))
    await stop.wait()
    log.info("stopping")
    for t in tasks:
        t.cancel()
    for b in background:
        b.stop()
    if kube is not None:
        kube.stop()
    await plugin.stop()  # closes the cache: a scrub round still reading stops
    if events is not None:
        events.stop()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        socket_path(args.endpoint)
    except ValueError as e:
        parser().error(str(e))
    if args.low_watermark > args.high_watermark:
        parser().error("--low-watermark must not exceed --high-watermark")
    try:
        pull_via_arg(args.pull_via)
        read_credentials(args.registry_credentials)
    except (ValueError, OSError) as e:
        parser().error(str(e))
    problem = settle_kube_flags(args)
    if problem:
        parser().error(problem)
    api = None
    if args.resolver == "kube" or args.node_labels:
        try:
            # two long watches (Models, ClusterModels), the Node watch, and short calls
            api = kubeclient.Kube.from_config(args.kubeconfig, pool_size=8)
        except kubeclient.ConfigError as e:
            parser().error(str(e))
    logs.setup(args.log_level, args.log_format)
    asyncio.run(run(args, api))


if __name__ == "__main__":
    main()
