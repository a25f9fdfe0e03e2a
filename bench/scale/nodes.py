"""Node-side work at cluster scale: N node agents prefetching and labelling their Nodes.

``bench/scale/run.py`` measures the manager with N kwok nodes; this bench
measures what N node plugins cost the API server, and how fast they react,
when Models with a prefetch ``nodeSelector`` turn Ready. Each simulated node
runs an *agent* made of the node plugin's own code: ``csi.resolvers.kube``'s
two informers (Models, ClusterModels), ``csi.prefetch.Prefetcher`` (its
watch of its own Node and its decision loop) and ``csi.nodelabels.NodeLabeler``,
each agent with its own API connections, as the node plugin's ServiceAccount
(``daemonset/node-rbac.yaml``). What is not real: the cache. ``StandInCache``
records a pull and returns it as done at once, so what is timed is the
control plane's part (watch delivery, the prefetch decision, the label
patches), not a download. Agents are packed into a few worker processes
(1,000 Python processes would not fit in memory); each worker runs
``python3 -m bench.scale.nodes agents`` and talks JSON lines over its stdin
and stdout.

The cluster is ``run.py``'s (the real kube-apiserver + etcd, kwok keeping the
nodes Ready with their heartbeats) without the manager: no controller writes
a Model's status here, the bench does, so a Model's Ready moment is exact.

The run, in order:

1. N kwok nodes, every other one labelled ``PREFETCH_LABEL=yes``; M Models
   whose ``spec.delivery.nodeCache.prefetch.nodeSelector`` names that label.
2. The agents start and sync (their lists and watches); then an idle spell.
3. The bench writes every Model's status Ready at once (an artifact digest
   each). Each matching agent must start one prefetch per Model, and label
   its Node with the M ``api.names.node_label`` keys; the others neither.

Measured: Model Ready → prefetch started (each node, each Model), Ready →
a node's labels complete, the agents' API requests (counted by their client:
every request they send, by verb and resource) and the API server's own
``apiserver_request_total`` for the node plugin's resources, the API server's
and etcd's CPU from /proc, its WATCH count (``apiserver_longrunning_requests``)
and the workers' RSS per agent. The agents' own count is one per call of
``kube.client``; urllib3 underneath retries a 429 that carries Retry-After by
itself (the API server's priority and fairness answers so when a thousand
agents list at once), so the API server's count can be the higher one.

    python3 -m bench.scale.nodes [--nodes 1000] [--models 20] [--processes 4]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import datetime
import glob
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

from api import names
from bench.scale import run as scale
from cli.local import cluster as localcluster
from csi.nodelabels import NodeLabeler
from csi.prefetch import Prefetcher
from csi.resolvers.kube import KubeResolver
from kube import client as k
from kube import logs
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient

PREFETCH_LABEL = "bench.modelcache.io/prefetch"
NODE_SA = "modelcache-node"
# the phases, as the report names them
START, IDLE, READY = "agents start and sync", "idle", "Ready → prefetched and labelled"
NODE_RBAC = os.path.join(scale.REPO_ROOT, "daemonset", "node-rbac.yaml")
SWITCH_INTERVAL = 0.05  # seconds; CPython's default is 0.005
PLURALS = {"nodes", "models", "clustermodels", "namespaces", "events"}


def node_name(i: int) -> str:
    return str(scale._node(i)["metadata"]["name"])


def matches(i: int) -> bool:
    """Half the nodes match the Models' prefetch selector."""
    return i % 2 == 0


def model_digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(f"bench-model-{i}".encode()).hexdigest()


# --- one node's agent (runs in a worker process) ------------------------------------------


class Tally:
    """What the agents of one worker sent and did, on the system-wide monotonic clock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.pulls: list[tuple[str, str, float]] = []  # (node, digest, started at)
        self.labels: list[tuple[str, float, list[str]]] = []  # (node, patched at, keys set)

    def request(self, what: str) -> None:
        with self.lock:
            self.requests[what] += 1


def request_kind(method: str, path: str, query: dict[str, Any] | None) -> str:
    """``VERB resource`` as the API server's metrics name it (LIST, WATCH, GET, PATCH…)."""
    parts = path.split("?")[0].strip("/").split("/")
    collection = parts[-1] in PLURALS
    resource = parts[-1] if collection else parts[-2]
    verb = method
    if method == "GET" and collection:
        verb = "WATCH" if (query or {}).get("watch") else "LIST"
    return f"{verb} {resource}"


class CountingKube(k.Kube):
    """``kube.client.Kube`` that tallies every request it sends, and each Node label
    patch's time and keys (for the label phase)."""

    def __init__(self, api_client: Any, tally: Tally) -> None:
        super().__init__(api_client)
        self.tally = tally

    def _call(self, method: str, path: str, *, query: dict[str, Any] | None = None,
              **kw: Any) -> Any:
        self.tally.request(request_kind(method, path, query))
        return super()._call(method, path, query=query, **kw)

    def patch(self, res: k.Resource, name: str, patch: Any, namespace: str | None = None,
              **kw: Any) -> dict[str, Any]:
        out = super().patch(res, name, patch, namespace, **kw)
        if res is k.NODES:
            keys = [key for key, v in ((patch.get("metadata") or {}).get("labels") or {}).items()
                    if v is not None]
            with self.tally.lock:
                self.tally.labels.append((name, time.monotonic(), keys))
        return out


class StandInCache:
    """A stand-in for ``csi.cache.Cache`` (not a real cache): ``pull`` records the request
    and returns a future already done, so a prefetch "completes" at once and the node
    labels follow, as after a real pull. Implements ``csi.prefetch.PrefetchCache`` and
    what ``NodeLabeler`` and its listener read (``digests``, ``add_listener``)."""

    def __init__(self, node: str, tally: Tally) -> None:
        self.node = node
        self.tally = tally
        self._held: set[str] = set()
        self._listeners: list[Callable[[], None]] = []

    def pull(self, ref: Reference, pin: bool = False) -> cf.Future[str]:
        digest = str(ref.digest)
        with self.tally.lock:
            self.tally.pulls.append((self.node, digest, time.monotonic()))
            self._held.add(digest)
        for fn in self._listeners:
            fn()
        done: cf.Future[str] = cf.Future()
        done.set_result(digest)
        return done

    def pack_of(self, digest: str) -> object | None:
        with self.tally.lock:
            return True if digest in self._held else None

    def digests(self) -> list[str]:
        with self.tally.lock:  # read by the labeler's thread while the prefetcher's adds
            return sorted(self._held)

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)


def _no_registry(host: str) -> RegistryClient:
    # a prefetch never asks the resolver for a registry; only a pinned publish would
    raise RuntimeError(f"the bench's agents have no registry ({host})")


class Agent:
    """One simulated node plugin: the resolver's informers, the prefetcher and the
    node labeler, over its own API client (pool of 8, as ``csi.main``)."""

    def __init__(self, kubeconfig: str, node: str, tally: Tally) -> None:
        self.client = CountingKube(k.Kube.from_config(kubeconfig, pool_size=8).api, tally)
        self.cache = StandInCache(node, tally)
        self.resolver = KubeResolver(self.client, _no_registry)
        self.labeler = NodeLabeler(self.client, node, self.cache.digests)
        self.cache.add_listener(self.labeler.poke)
        self.prefetcher = Prefetcher(self.client, node, self.resolver, self.cache)

    def start(self) -> None:
        self.resolver.start()
        self.labeler.start()
        self.prefetcher.start()

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in (self.resolver.models,
                                               self.resolver.cluster_models,
                                               self.prefetcher.node_info))

    def stop(self) -> None:
        self.prefetcher.stop()
        self.labeler.stop()
        self.resolver.stop()


def rss_kib(pid: int | None = None) -> int:
    return scale.proc_status(pid or os.getpid())["VmRSS"]


def serve_agents(kubeconfig: str, first: int, count: int, out: IO[str] = sys.stdout,
                 commands: IO[str] = sys.stdin) -> None:
    """A worker: ``count`` agents for nodes ``first``…; answers ``status`` and ``report``
    lines on ``commands``, stops at their end."""

    def emit(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc) + "\n")
        out.flush()
    logs.setup("warning", "json")  # the agents' failures, with their error, in the log
    # 250 agents share one interpreter where a real node plugin has its own: a longer
    # switch interval keeps a thousand threads from waking every 5 ms to fight for the GIL
    sys.setswitchinterval(SWITCH_INTERVAL)
    rss0 = rss_kib()
    tally = Tally()
    agents = [Agent(kubeconfig, node_name(i), tally) for i in range(first, first + count)]
    for a in agents:
        a.start()
    while not all(a.synced() for a in agents):
        time.sleep(0.2)
    emit({"event": "synced", "rss0": rss0, "rss": rss_kib()})
    for line in commands:
        with tally.lock:
            if line.strip() == "status":
                emit({"pulls": len(tally.pulls),
                      "label_keys": sum(len(keys) for _, _, keys in tally.labels)})
            else:
                emit({"pulls": tally.pulls, "labels": tally.labels,
                      "requests": dict(tally.requests), "rss": rss_kib()})
    for a in agents:
        a.stop()


# --- the bench (main process) -------------------------------------------------------------


class NodeSystem(scale.System):
    """``run.py``'s cluster and kwok, with the node plugin's RBAC and no manager."""

    def start(self) -> None:
        kwok = scale.kwok_binary()
        self.env = localcluster.start(os.path.join(self.work, "kube"), extra_apiserver_args=[
            "--max-requests-inflight=800", "--max-mutating-requests-inflight=400"])
        self.stack.callback(self.env.stop)
        self.client = k.Kube.from_config(self.env.kubeconfig, pool_size=self.p.threads + 8)
        self.stack.callback(self.client.close)
        self.say(f"API server {self.env.server} up in {self.env.startup_seconds:.1f} s")
        self._install()
        self.env.kubectl("apply", "-f", NODE_RBAC)
        self.node_kubeconfig = self.env.serviceaccount_kubeconfig(NODE_SA, scale.SYSTEM_NS)
        self._start_kwok(kwok)

    @property
    def procs(self) -> tuple[tuple[str, subprocess.Popen[bytes], str], ...]:
        return (("kwok", self.kwok, self.kwok_log),)


class Worker:
    """A worker process of agents, driven over its stdin and stdout."""

    def __init__(self, s: NodeSystem, first: int, count: int) -> None:
        self.log = os.path.join(s.work, f"agents-{first}.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.scale.nodes", "agents", "--kubeconfig",
                 s.node_kubeconfig, "--first", str(first), "--count", str(count)],
                cwd=scale.REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True)
        s.stack.callback(localcluster.stop_process, self.proc, 10.0)  # type: ignore[arg-type]
        self.count = count

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise scale.ScaleError(f"an agents worker exited {self.proc.wait()}:\n"
                                   f"{localcluster.tail(self.log)}")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def warnings(self) -> collections.Counter[str]:
        """The agents' log lines (warnings and worse), by message and error's start."""
        out: collections.Counter[str] = collections.Counter()
        with open(self.log, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    out[f"{doc.get('msg')}: {str(doc.get('error', ''))[:60]}"] += 1
        return out

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@dataclass(frozen=True)
class Params:
    nodes: int = 1000
    models: int = 20
    processes: int = 4
    idle: float = 10.0  # seconds of quiet after the agents synced
    timeout: float = 600.0  # for each wait


@dataclass
class Report:
    params: Params
    matching: int = 0
    sync_s: float = 0.0  # agents started → every agent's informers synced
    ready_to_prefetch: list[float] = field(default_factory=list)  # each node and Model
    ready_to_first: list[float] = field(default_factory=list)  # each matching node's first
    ready_to_labelled: list[float] = field(default_factory=list)  # each matching node
    pulls_per_pair: collections.Counter[int] = field(default_factory=collections.Counter)
    wrong_pulls: int = 0  # pulls by nodes the selector does not match
    wrongly_labelled: int = 0  # nodes whose final labels are not what their cache holds
    requests: dict[str, collections.Counter[str]] = field(default_factory=dict)  # by phase
    server_requests: dict[str, collections.Counter[str]] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> process -> s
    phase_s: dict[str, float] = field(default_factory=dict)
    watches: dict[str, float] = field(default_factory=dict)  # WATCH requests open, by resource
    rss_per_agent_kib: float = 0.0
    worker_rss_kib: list[int] = field(default_factory=list)
    apiserver_rss_kib: int = 0
    agent_warnings: collections.Counter[str] = field(default_factory=collections.Counter)


def _node_with_selector_label(i: int) -> dict[str, Any]:
    node = scale._node(i)
    if matches(i):
        node["metadata"]["labels"][PREFETCH_LABEL] = "yes"
    return node


def _model(i: int) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": f"pf-{i:04d}", "namespace": scale.NS},
            "spec": {"source": {"huggingFace": {"repo": f"bench/pf-{i:04d}"}},
                     "delivery": {"nodeCache": {"prefetch": {
                         "nodeSelector": {PREFETCH_LABEL: "yes"}}}}}}


def _ready_status(i: int) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = model_digest(i)
    return {"status": {
        "phase": "Ready",
        "artifact": {"digest": digest,
                     "reference": f"registry.invalid/models/{scale.NS}/pf-{i:04d}@{digest}"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Published",
                        "message": "", "lastTransitionTime": now}]}}


def server_requests(text: str) -> collections.Counter[str]:
    """``apiserver_request_total`` for the node plugin's resources (no subresource: kwok's
    status heartbeats are ``nodes/status``), by ``VERB resource``."""
    out: collections.Counter[str] = collections.Counter()
    for fam in text_string_to_metric_families(text):
        if fam.name != "apiserver_request":
            continue
        for s in fam.samples:
            lb = s.labels
            if s.name == "apiserver_request_total" and not lb.get("subresource") and \
                    lb.get("resource") in ("models", "clustermodels", "nodes"):
                out[f"{lb.get('verb')} {lb.get('resource')}"] += int(s.value)
    return out


def open_watches(text: str) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for fam in text_string_to_metric_families(text):
        if fam.name != "apiserver_longrunning_requests":
            continue
        for s in fam.samples:
            if s.labels.get("verb") == "WATCH":
                out[s.labels.get("resource", "?")] += s.value
    return dict(out)


class Marks:
    """Per-phase deltas of the agents' requests, the server's counts and CPU."""

    def __init__(self, s: NodeSystem, rep: Report) -> None:
        self.s, self.rep = s, rep
        self.workers: list[Worker] = []  # none yet: the first phase counts their start
        self.last = self._now()

    def _now(self) -> tuple[float, collections.Counter[str], collections.Counter[str],
                            dict[str, float], list[dict[str, Any]]]:
        reports = [w.ask("report") for w in self.workers]
        sent: collections.Counter[str] = collections.Counter()
        for r in reports:
            sent.update(r["requests"])
        cpu = {"kube-apiserver": scale.proc_cpu(self.s.env.apiserver.pid),
               "etcd": scale.proc_cpu(self.s.env.etcd.pid),
               "agents": sum(scale.proc_cpu(w.proc.pid) for w in self.workers)}
        return (time.monotonic(), sent, server_requests(self.s.apiserver_metrics()), cpu,
                reports)

    def phase(self, name: str) -> list[dict[str, Any]]:
        """Close phase ``name``; the workers' full reports at its end."""
        now = self._now()
        t0, sent0, server0, cpu0, _ = self.last
        t1, sent1, server1, cpu1, reports = now
        self.rep.phase_s[name] = t1 - t0
        self.rep.requests[name] = sent1 - sent0
        self.rep.server_requests[name] = server1 - server0
        self.rep.cpu[name] = {p: cpu1[p] - cpu0[p] for p in cpu1}
        self.last = now
        return reports


def run(p: Params, say: Callable[[str], None] = print) -> Report:
    rep = Report(params=p)
    s = NodeSystem(scale.Params(nodes=p.nodes, models=p.models, pods=0, timeout=p.timeout), say)
    try:
        s.start()
        _run(s, p, rep, say)
    except BaseException:
        say("kwok log tail:\n" + localcluster.tail(getattr(s, "kwok_log", ""), 20))
        for log in sorted(glob.glob(os.path.join(s.work, "agents-*.log"))):
            say(f"{os.path.basename(log)} tail:\n" + localcluster.tail(log, 20))
        raise
    finally:
        s.close()
    return rep


def _run(s: NodeSystem, p: Params, rep: Report, say: Callable[[str], None]) -> None:
    c = s.client
    # 1. nodes (half of them matching the selector) and the Models, not yet Ready
    scale._parallel(p.nodes, s.p.threads,
                    lambda i: c.create(k.NODES, _node_with_selector_label(i)))
    t = scale.wait_until(
        f"kwok reporting {p.nodes} nodes Ready",
        lambda: sum(map(scale._ready, c.list(k.NODES, label_selector="type=kwok")[0]))
        >= p.nodes, p.timeout, s.procs, interval=1.0)
    say(f"{p.nodes} nodes Ready after {t:.1f} s")
    scale._parallel(p.models, s.p.threads, lambda i: c.create(k.MODELS, _model(i), scale.NS))
    rep.matching = sum(map(matches, range(p.nodes)))

    # 2. the agents, packed into workers; an idle spell once they all synced
    marks = Marks(s, rep)
    t0 = time.monotonic()
    per = -(-p.nodes // p.processes)
    workers = [Worker(s, first, min(per, p.nodes - first)) for first in range(0, p.nodes, per)]
    synced = [w.read() for w in workers]
    rep.sync_s = time.monotonic() - t0
    rep.rss_per_agent_kib = sum(d["rss"] - d["rss0"] for d in synced) / p.nodes
    say(f"{p.nodes} agents in {len(workers)} workers synced in {rep.sync_s:.1f} s; "
        f"{rep.rss_per_agent_kib:.0f} KiB RSS per agent")
    marks.workers = workers
    time.sleep(2)  # the first label reconciles (one GET each) land in the start phase
    marks.phase(START)
    time.sleep(p.idle)
    marks.phase(IDLE)
    rep.watches = open_watches(s.apiserver_metrics())

    # 3. every Model Ready at once; wait for the prefetches and the labels
    ready_at: dict[str, float] = {}

    def make_ready(i: int) -> None:
        c.patch(k.MODELS, f"pf-{i:04d}", _ready_status(i), scale.NS, sub="status")
        ready_at[model_digest(i)] = time.monotonic()
    scale._parallel(p.models, s.p.threads, make_ready)
    want = rep.matching * p.models

    said = [time.monotonic()]

    def all_done() -> bool:
        states = [w.ask("status") for w in workers]
        pulls: int = sum(d["pulls"] for d in states)
        keys: int = sum(d["label_keys"] for d in states)
        if time.monotonic() - said[0] > 10:  # progress, for a slow run
            said[0] = time.monotonic()
            say(f"{pulls} of {want} prefetches started, {keys} of {want} labels set")
        return pulls >= want and keys >= want
    scale.wait_until(f"{want} prefetches and node labels", all_done, p.timeout, s.procs,
                     interval=0.5)
    time.sleep(3)  # late requests (a last label round, repeats) land in this phase
    reports = marks.phase(READY)
    _outcome(s, p, rep, reports, ready_at)
    rep.worker_rss_kib = [r["rss"] for r in reports]
    rep.apiserver_rss_kib = rss_kib(s.env.apiserver.pid)
    for w in workers:
        w.close()
        rep.agent_warnings.update(w.warnings())


def _outcome(s: NodeSystem, p: Params, rep: Report, reports: list[dict[str, Any]],
             ready_at: dict[str, float]) -> None:
    """Latencies from the workers' records; correctness from them and the Nodes."""
    names_matching = {node_name(i) for i in range(p.nodes) if matches(i)}
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in reports:
        for node, digest, t in r["pulls"]:
            pairs[(node, digest)] += 1
            if node in names_matching:
                rep.ready_to_prefetch.append(t - ready_at[digest])
            else:
                rep.wrong_pulls += 1
    rep.pulls_per_pair = collections.Counter(pairs.values())
    first_ready = min(ready_at.values())
    firsts: dict[str, float] = {}
    for r in reports:
        for node, _, t in r["pulls"]:
            firsts[node] = min(t, firsts.get(node, t))
    rep.ready_to_first = [t - first_ready for t in firsts.values()]
    want = {names.node_label(model_digest(i)) for i in range(p.models)}
    held: dict[str, set[str]] = collections.defaultdict(set)
    complete_at: dict[str, float] = {}
    for r in reports:
        for node, t, keys in sorted(r["labels"], key=lambda x: x[1]):
            held[node].update(keys)
            if node not in complete_at and held[node] >= want:
                complete_at[node] = t
    rep.ready_to_labelled = [t - first_ready for t in complete_at.values()]
    for node in s.client.list(k.NODES, label_selector="type=kwok")[0]:
        ours = {key for key in node["metadata"].get("labels") or {}
                if key.startswith(names.NODE_LABEL_PREFIX)}
        if ours != (want if node["metadata"]["name"] in names_matching else set()):
            rep.wrongly_labelled += 1


# --- the report ----------------------------------------------------------------------------


def table(rep: Report) -> Iterator[str]:
    p = rep.params
    q = scale.quantile

    def ms(x: float) -> str:
        return f"{x * 1000:.0f} ms"

    def dist(xs: list[float]) -> str:
        return f"{ms(q(xs, 0.5))} / {ms(q(xs, 0.99))} / {ms(max(xs, default=float('nan')))}"
    yield "| figure | value |"
    yield "|---|---|"
    yield f"| nodes (kwok) / agents per worker | {p.nodes} / {-(-p.nodes // p.processes)} " \
          f"in {p.processes} processes |"
    yield f"| Models with a prefetch selector / matching nodes | {p.models} / {rep.matching} |"
    yield f"| agents started → all synced | {rep.sync_s:.1f} s |"
    yield f"| prefetches per (node, Model): count of pairs | {dict(rep.pulls_per_pair)}; " \
          f"{rep.wrong_pulls} by non-matching nodes; {rep.wrongly_labelled} nodes labelled " \
          "wrong |"
    yield f"| Model Ready → prefetch started, p50 / p99 / max (each node × Model) | " \
          f"{dist(rep.ready_to_prefetch)} |"
    yield f"| first Model Ready → a node's first prefetch started, p50 / p99 / max | " \
          f"{dist(rep.ready_to_first)} |"
    yield f"| Ready → a node's {p.models} labels complete, p50 / p99 / max | " \
          f"{dist(rep.ready_to_labelled)} |"
    watches = {r: int(rep.watches.get(r, 0)) for r in ("models", "clustermodels", "nodes")}
    yield f"| open WATCH requests on the API server (agents idle) | {watches}; all resources " \
          f"{sum(rep.watches.values()):.0f} |"
    yield f"| agent RSS (worker RSS growth / agents) | {rep.rss_per_agent_kib:.0f} KiB; " \
          f"workers at the end {[r // 1024 for r in rep.worker_rss_kib]} MiB |"
    yield f"| kube-apiserver RSS at the end | {rep.apiserver_rss_kib / 1024:.0f} MiB |"
    for phase, sent in rep.requests.items():
        detail = ", ".join(f"{w} {n}" for w, n in sent.most_common(6)) or "none"
        yield f"| agents' requests, {phase} ({rep.phase_s[phase]:.1f} s) | " \
              f"{sum(sent.values())} ({sum(sent.values()) / p.nodes:.2f} per node): {detail} |"
    for phase, seen in rep.server_requests.items():
        detail = ", ".join(f"{w} {n}" for w, n in seen.most_common(6)) or "none"
        yield f"| API server's apiserver_request_total (models, clustermodels, nodes; all " \
              f"clients), {phase} | {sum(seen.values())}: {detail} |"
    warned = "; ".join(f"{n}× {m}" for m, n in rep.agent_warnings.most_common(4)) or "none"
    yield f"| agents' warnings | {warned} |"
    for phase, cpu in rep.cpu.items():
        yield f"| CPU s, {phase} | " + ", ".join(f"{n} {v:.2f}" for n, v in cpu.items()) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command")
    worker = sub.add_parser("agents", help="(internal) a worker process of node agents")
    worker.add_argument("--kubeconfig", required=True)
    worker.add_argument("--first", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for each wait")
    args = ap.parse_args()
    if args.command == "agents":
        serve_agents(args.kubeconfig, args.first, args.count)
        return 0
    rep = run(Params(nodes=args.nodes, models=args.models, processes=args.processes,
                     idle=args.idle, timeout=args.timeout),
              say=lambda t: print(t, file=sys.stderr, flush=True))
    for line in table(rep):
        print(line)
    print(f"\n`python3 -m bench.scale.nodes --nodes {args.nodes} --models {args.models} "
          f"--processes {args.processes}`; /proc/loadavg at the end: "
          f"{open('/proc/loadavg').read().strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
