"""Control plane at cluster scale: N simulated nodes, M Models, P annotated pods at R/s.

The real kube-apiserver + etcd (``cli/local/cluster.py``), kwok
(``sigs.k8s.io/kwok``, built by ``hack/install.d/kwok.sh``) keeping N fake
nodes alive (Ready, leases, status heartbeats), the real manager
(``modelcache-controller manager``) with the RBAC of
``daemonset/controller-rbac.yaml``, its admission webhook registered with the
API server by URL (as ``cli/local/system.py`` does), and a real registry.

The run, in order:

1. N nodes, annotated for kwok; wait until kwok reports them all Ready.
2. One small generated model is packed once into a seed repository; its
   digest D is what every Model will adopt. Every node gets the cache label
   of D, as N node plugins would after caching it (the "node-label work").
3. M Models carry ``modelcache.io/imported-digest: D`` (the air-gap import
   path, ``controller/models/adopt.py``) while D is not yet in their
   repositories: the manager holds them Pending (``ImportedArtifactMissing``).
4. P pods, pod i asking for Model i % M, created at R/s through the webhook:
   each must come back mutated (the gate and the CSI volume).
5. D is copied into each Model's repository; the manager adopts it and
   writes Ready itself, at its next re-check of a missing artifact (every
   10 s: Models turn Ready in waves), or at once with ``--nudge`` (the bench
   annotates each Model after its push, as a registry notification would).
   Two watches on the bench's own connection record when each Model's Ready
   is first seen and when each pod's gate is first seen gone; the
   difference is "Ready → gate lifted". Also timed: the push itself, each
   Model's manifest put → Ready, and how many pods were lifted while a pod
   of a Model that turned Ready earlier still waited (FIFO by Model: only
   the lifts in flight at each Model's boundary, one or two Models behind).

Measured: webhook latency (the API server's
``apiserver_admission_webhook_admission_duration_seconds`` and the manager's
own ``modelcache_webhook_admission_duration_seconds``, deltas over the pod
phase, quantiles interpolated within buckets like ``histogram_quantile``),
the bench's create latency, Ready → lifted, the manager's RSS and CPU from
/proc, and the manager's API requests counted exactly from the API server's
audit log (a policy that logs only the manager's ServiceAccount), and the
API server's own latency for the pod creates (webhook included) and the
lift PATCHes (p50, p99 and mean: lifts in flight / mean = the most lifts/s).

    python3 -m bench.scale.run [--nodes 1000] [--models 200] [--pods 10000] [--rate 100]
                               [--nudge] [--land-over SECONDS]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from api import names
from cli.local import cluster as localcluster
from cli.local import registry as localregistry
from kube import client as k
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import modelgen

REPO_ROOT = localcluster.REPO_ROOT
SYSTEM_NS = "modelcache-system"
NS = "scale"
MANAGER_SA = "modelcache-controller"
MANAGER_USER = f"system:serviceaccount:{SYSTEM_NS}:{MANAGER_SA}"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
NUDGE_ANNOTATION = "bench.modelcache.io/artifact"  # --nudge: "pushed" after the push
NAMESPACES = k.Resource("", "v1", "namespaces", False, "Namespace")
SERVICE_ACCOUNTS = k.Resource("", "v1", "serviceaccounts", True, "ServiceAccount")
CRDS = k.Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", False)

AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
  users: ["{MANAGER_USER}"]
- level: None
"""


class ScaleError(RuntimeError):
    """A step of the bench did not complete; the message says which and why."""


def kwok_binary() -> str:
    v = localcluster.versions().get("KWOK_VERSION", "")
    path = os.environ.get("KWOK") or os.path.join(localcluster.TOOLS, f"kwok-{v}", "kwok")
    if not os.access(path, os.X_OK):
        raise ScaleError(f"kwok not built: {path} (run hack/install.d/kwok.sh)")
    if not os.path.exists(os.path.join(os.path.dirname(path), "node-stages.yaml")):
        raise ScaleError(f"no node-stages.yaml next to {path} (run hack/install.d/kwok.sh)")
    return path


@dataclass(frozen=True)
class Params:
    nodes: int = 1000
    models: int = 200
    pods: int = 10000
    rate: float = 100.0
    threads: int = 16  # client threads creating pods (a slow answer must not delay the next)
    workers: int = 4  # the manager's --workers
    # after each push, touch its Model (an annotation), as a registry notification would:
    # the manager adopts at once instead of at its next missing-artifact re-check (adopt.py's
    # MISSING_RETRY), so Models turn Ready as their artifacts land, not in waves
    nudge: bool = False
    # spread the pushes evenly over this many seconds (0: all at once, as fast as 8 threads
    # go): Models landing over time, as publish Jobs finishing one by one would, so the lift
    # demand is models / land_over × pods per Model per second instead of one burst
    land_over: float = 0.0
    timeout: float = 600.0  # for each wait


@dataclass
class Report:
    params: Params
    nodes_ready_s: float = 0.0
    label_s: float = 0.0
    create_s: float = 0.0
    late: int = 0
    pods_mutated: int = 0
    pods_lifted: int = 0
    pods_with_affinity: int = 0
    models_ready: int = 0
    ready_to_lift: list[float] = field(default_factory=list)
    create_latency: list[float] = field(default_factory=list)
    apiserver_webhook: tuple[float, float] = (float("nan"), float("nan"))
    manager_webhook: tuple[float, float] = (float("nan"), float("nan"))
    admissions: int = 0
    rss_kib: int = 0
    hwm_kib: int = 0
    idle_rss_kib: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # manager CPU seconds per phase
    requests: dict[str, collections.Counter[str]] = field(default_factory=dict)  # per phase
    node_events_s: float = 0.0
    # TCP connections to the webhook after the pod phase: whether the API server keeps them
    hook_sockets: dict[str, int] = field(default_factory=dict)
    # urllib3's "Connection pool is full, discarding connection" in the manager's log: each a
    # connection to the API server thrown away after one request (a new TLS handshake next)
    pool_discards: int = 0
    ready_spread_s: float = 0.0  # first Model Ready → last Model Ready
    lift_span_s: float = 0.0  # first Model Ready → last gate lifted
    # the API server's own latency for PATCH pods while the gates are lifted (p50, p99, mean)
    patch_latency: tuple[float, float, float] = (float("nan"),) * 3
    # the API server's own latency for POST pods (webhook included) while pods are created
    create_server_latency: tuple[float, float] = (float("nan"), float("nan"))
    push_span_s: float = 0.0  # first repository push started → last manifest put
    # per Model: its manifest put (the bench's clock) → its Ready seen: the manager's
    # adoption latency, the missing-artifact re-check interval included
    pushed_to_ready: list[float] = field(default_factory=list)
    # pods lifted while a pod of a Model that turned Ready earlier was still gated, and the
    # most such Models at one lift (``out_of_order``)
    lifted_out_of_order: tuple[int, int] = (0, 0)

    def requests_per_pod(self) -> float:
        return sum(self.requests.get("pods", collections.Counter()).values()) / \
            max(1, self.params.pods)


# --- measuring ---------------------------------------------------------------------


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' ``histogram_quantile`` over cumulative (le, count) pairs."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lo_le, lo_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return lo_le
            return lo_le + (le - lo_le) * ((rank - lo_n) / (n - lo_n) if n > lo_n else 1.0)
        lo_le, lo_n = le, n
    return buckets[-1][0]


def scrape(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=30, context=context) as r:
        return str(r.read().decode())


def buckets_of(text: str, family: str, match: Callable[[dict[str, str]], bool]
               ) -> dict[float, float]:
    """Cumulative bucket counts of one histogram family, summed over matching series."""
    out: dict[float, float] = collections.defaultdict(float)
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for s in fam.samples:
            if s.name == family + "_bucket" and match(s.labels):
                out[float(s.labels["le"])] += s.value
    return out


def sum_count(text: str, family: str, match: Callable[[dict[str, str]], bool]
              ) -> tuple[float, float]:
    """(sum, count) of one histogram family, summed over matching series."""
    total, count = 0.0, 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for s in fam.samples:
            if match(s.labels) and s.name == family + "_sum":
                total += s.value
            elif match(s.labels) and s.name == family + "_count":
                count += s.value
    return total, count


def out_of_order(lifted: dict[str, float], ready: dict[str, float],
                 model_of: Callable[[str], str]) -> tuple[int, int]:
    """(pods lifted while a pod of a Model that turned Ready before theirs was still gated,
    the most such Models at one lift): (0, 0) when the lifter frees the Models' pods first
    come, first served; with lifts in flight, a few pods at each Model's boundary."""
    left = collections.Counter(model_of(pod) for pod in lifted)
    waiting = sorted((at, m) for m, at in ready.items() if left[m])
    n, worst = 0, 0
    for pod in sorted(lifted, key=lifted.__getitem__):
        m = model_of(pod)
        ahead = sum(1 for at, other in waiting if left[other] and at < ready.get(m, at))
        n, worst = n + (ahead > 0), max(worst, ahead)
        left[m] -= 1
    return n, worst


def delta_quantiles(before: dict[float, float], after: dict[float, float]
                    ) -> tuple[float, float, float]:
    """(p50, p99, count) of the observations between two scrapes."""
    d = [(le, after[le] - before.get(le, 0.0)) for le in after]
    total = max((n for _, n in d), default=0.0)
    return histogram_quantile(d, 0.5), histogram_quantile(d, 0.99), total


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def sockets_on(port: int) -> dict[str, int]:
    """TCP sockets with ``port`` at either end, by state (from /proc/net/tcp): ESTABLISHED
    counts both ends of each kept connection; TIME_WAIT, the connections closed in the
    last minute (a new TLS handshake each, had the API server not kept them)."""
    states = {"01": "established", "06": "time_wait"}
    out: collections.Counter[str] = collections.Counter()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            ports = {int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)}
            if port in ports and cols[3] in states:
                out[states[cols[3]]] += 1
    return dict(out)


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Audit:
    """The manager's requests, from the API server's audit log (one JSON line each)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0

    def since_mark(self) -> collections.Counter[str]:
        """Requests completed since the last call, by ``verb resource[/sub]``."""
        out: collections.Counter[str] = collections.Counter()
        if not os.path.exists(self.path):
            return out
        with open(self.path) as f:
            f.seek(self.offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break
                self.offset += len(line.encode())
                ev = json.loads(line)
                if ev.get("user", {}).get("username") != MANAGER_USER:
                    continue
                ref = ev.get("objectRef") or {}
                what = ref.get("resource", ev.get("requestURI", "?"))
                if ref.get("subresource"):
                    what += "/" + ref["subresource"]
                out[f"{ev.get('verb')} {what}"] += 1
        return out


def wait_until(what: str, check: Callable[[], bool], timeout: float,
               procs: tuple[tuple[str, subprocess.Popen[bytes], str], ...] = (),
               interval: float = 0.2) -> float:
    """Poll ``check``; seconds it took, or a ScaleError (with the log of a dead process)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for name, p, log in procs:
            if p.poll() is not None:
                raise ScaleError(f"{name} exited {p.returncode} while waiting for {what}:\n"
                                 f"{localcluster.tail(log)}")
        if check():
            return time.monotonic() - t0
        time.sleep(interval)
    raise ScaleError(f"{what}: not within {timeout:.0f} s")


class Watcher:
    """First time each object of ``res`` in ``NS`` satisfies ``seen``, on this clock."""

    def __init__(self, client: k.Kube, res: k.Resource, seen: Callable[[dict[str, Any]], bool],
                 also: Callable[[dict[str, Any]], object] | None = None) -> None:
        self.client, self.res, self.seen, self.also = client, res, seen, also
        self.at: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Watcher:
        self.thread.start()
        return self

    def _note(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name not in self.at and self.seen(obj):
            self.at[name] = time.monotonic()
            if self.also is not None:
                self.also(obj)

    def _run(self) -> None:
        rv = ""
        while not self.stop.is_set():
            try:
                if not rv:
                    items, rv = self.client.list(self.res, NS)
                    for obj in items:
                        self._note(obj)
                for ev in self.client.watch(self.res, rv, NS, timeout_seconds=60):
                    obj = ev["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._note(obj)
                    if self.stop.is_set():
                        return
            except k.ApiError:
                rv = ""  # Gone: list again
            except Exception:
                time.sleep(0.5)


# --- the system ----------------------------------------------------------------------


class System:
    """The cluster, registry, manager and kwok for one run; ``close()`` stops them all."""

    def __init__(self, params: Params, say: Callable[[str], None]) -> None:
        self.p, self.say = params, say
        self.stack = contextlib.ExitStack()
        self.work = tempfile.mkdtemp(prefix="modelcache-scale-")
        self.stack.callback(shutil.rmtree, self.work, True)

    def close(self) -> None:
        self.stack.close()

    def start(self) -> None:
        kwok = kwok_binary()
        policy = os.path.join(self.work, "audit-policy.yaml")
        with open(policy, "w") as f:
            f.write(AUDIT_POLICY)
        self.audit = Audit(os.path.join(self.work, "audit.log"))
        self.env = localcluster.start(os.path.join(self.work, "kube"), extra_apiserver_args=[
            f"--audit-policy-file={policy}", f"--audit-log-path={self.audit.path}",
            "--audit-log-maxsize=0", "--audit-log-maxbackup=0",
            # a thousand nodes' heartbeats and a hundred pods a second from one client
            "--max-requests-inflight=800", "--max-mutating-requests-inflight=400"])
        self.stack.callback(self.env.stop)
        self.client = k.Kube.from_config(self.env.kubeconfig, pool_size=self.p.threads + 8)
        self.stack.callback(self.client.close)
        self.say(f"API server {self.env.server} up in {self.env.startup_seconds:.1f} s")
        self._install()
        self.registry = localregistry.start(os.path.join(self.work, "registry"))
        self.stack.callback(self.registry.stop)
        self.reg = RegistryClient(self.registry.host, insecure=True)
        self._start_manager()
        self._start_kwok(kwok)

    def _install(self) -> None:
        crds = sorted(os.path.join(REPO_ROOT, "crds", f) for f in os.listdir(
            os.path.join(REPO_ROOT, "crds")) if f.endswith(".yaml"))
        self.env.kubectl("apply", "--server-side", *sum((["-f", f] for f in crds), []))
        self.env.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                         "crd/models.modelcache.io", "crd/clustermodels.modelcache.io")
        for ns in (SYSTEM_NS, NS):
            with contextlib.suppress(k.Conflict):
                self.client.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": ns}})
        # no controller-manager makes the "default" ServiceAccount pods need
        with contextlib.suppress(k.Conflict):
            self.client.create(SERVICE_ACCOUNTS, {"apiVersion": "v1", "kind": "ServiceAccount",
                                                  "metadata": {"name": "default"}}, NS)
        self.env.kubectl("apply", "-f", os.path.join(REPO_ROOT, "daemonset",
                                                     "controller-rbac.yaml"))

    def _start_manager(self) -> None:
        sa = self.env.serviceaccount_kubeconfig(MANAGER_SA, SYSTEM_NS)
        self.port, hook = localcluster.free_port(), localcluster.free_port()
        self.hook_port = hook
        self.manager_log = os.path.join(self.work, "manager.log")
        with open(self.manager_log, "wb") as log:
            self.manager = subprocess.Popen([
                sys.executable, "-m", "controller.main", "manager", "--kubeconfig", sa,
                "--namespace", SYSTEM_NS, "--registry", self.registry.host,
                "--registry-insecure", "--listen", f"127.0.0.1:{self.port}",
                "--no-leader-elect", "--workers", str(self.p.workers), "--log-level", "WARNING",
                "--webhook-url", f"https://127.0.0.1:{hook}",
                "--webhook-listen", f"127.0.0.1:{hook}"],
                cwd=REPO_ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)})
        self.stack.callback(localcluster.stop_process, self.manager, 20.0)
        procs = (("manager", self.manager, self.manager_log),)
        wait_until("manager /readyz", lambda: _http_ok(f"http://127.0.0.1:{self.port}/readyz"),
                   60, procs)
        wait_until("the API server calling the webhook", self._webhook_serving, 60, procs)
        self.say(f"manager pid {self.manager.pid}, webhook registered")

    def _webhook_serving(self) -> bool:
        probe = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "webhook-probe", "namespace": NS,
                              "annotations": {names.ANN_MODELS: "webhook-probe"}},
                 "spec": {"containers": [{"name": "c", "image": "probe"}]}}
        res = self.env.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-",
                               input=json.dumps(probe), check=False)
        return res.returncode != 0 and "denied the request" in res.stderr

    def _start_kwok(self, kwok: str) -> None:
        self.kwok_log = os.path.join(self.work, "kwok.log")
        with open(self.kwok_log, "wb") as log:
            self.kwok = subprocess.Popen([
                kwok, "--kubeconfig", self.env.kubeconfig, "--manage-all-nodes=false",
                # kwok's own node stages (hack/install.d/kwok.sh): Ready, then a lease
                # renewed every ~10 s and a status heartbeat, as kubelets do
                "--config", os.path.join(os.path.dirname(kwok), "node-stages.yaml"),
                "--node-lease-duration-seconds=40", "-v=WARN",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                "--cidr=10.0.0.1/16", "--node-ip=10.0.0.1",
                "--server-address", f"127.0.0.1:{localcluster.free_port()}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.stack.callback(localcluster.stop_process, self.kwok, 10.0)

    @property
    def procs(self) -> tuple[tuple[str, subprocess.Popen[bytes], str], ...]:
        return (("manager", self.manager, self.manager_log), ("kwok", self.kwok, self.kwok_log))

    def metrics(self) -> str:
        return scrape(f"http://127.0.0.1:{self.port}/metrics")

    def apiserver_metrics(self) -> str:
        tls = ssl.create_default_context(cafile=self.env.pki.ca)
        tls.load_cert_chain(self.env.pki.path("admin.crt"), self.env.pki.path("admin.key"))
        return scrape(f"{self.env.server}/metrics", tls)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def _node(i: int) -> dict[str, Any]:
    name = f"kwok-node-{i:05d}"
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {KWOK_ANNOTATION: "fake"},
                         "labels": {"kubernetes.io/hostname": name, "type": "kwok"}},
            "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake",
                                 "effect": "NoSchedule"}]}}


def _ready(node: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node.get("status") or {}).get("conditions") or [])


def _pod(i: int, model: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"p-{i:05d}", "namespace": NS,
                         "annotations": {names.ANN_MODELS: model}},
            "spec": {"automountServiceAccountToken": False,
                     "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists",
                                      "effect": "NoSchedule"}],
                     "containers": [{"name": "app", "image": "serve"}]}}


def _gated(pod: dict[str, Any]) -> bool:
    return names.GATE in [g.get("name") for g in pod["spec"].get("schedulingGates") or []]


def _mutated(pod: dict[str, Any]) -> bool:
    return _gated(pod) and any((v.get("csi") or {}).get("volumeAttributes")
                               for v in pod["spec"].get("volumes") or [])


def _has_affinity(pod: dict[str, Any]) -> bool:
    terms = (((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {})
             .get("preferredDuringSchedulingIgnoredDuringExecution") or [])
    return any(names.NODE_LABEL_PREFIX in json.dumps(t) for t in terms)


def _parallel(n: int, threads: int, fn: Callable[[int], Any]) -> list[Any]:
    with cf.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, range(n)))


# --- the run ---------------------------------------------------------------------------


def run(p: Params, say: Callable[[str], None] = print) -> Report:
    rep = Report(params=p)
    sysm = System(p, say)
    try:
        sysm.start()
        _run(sysm, p, rep, say)
    except BaseException:
        with contextlib.suppress(Exception):
            items, _ = sysm.client.list(k.MODELS, NS)
            say("model phases: " + json.dumps(collections.Counter(
                (m.get("status") or {}).get("phase") for m in items)))
            pods, _ = sysm.client.list(k.PODS, NS)
            say(f"pods still gated: {sum(map(_gated, pods))} of {len(pods)}")
        say("manager log tail:\n" + localcluster.tail(getattr(sysm, "manager_log", ""), 40))
        say("kwok log tail:\n" + localcluster.tail(getattr(sysm, "kwok_log", ""), 20))
        raise
    finally:
        sysm.close()
    return rep


def _run(s: System, p: Params, rep: Report, say: Callable[[str], None]) -> None:
    c, pid = s.client, s.manager.pid
    rep.idle_rss_kib = proc_status(pid)["VmRSS"]
    s.audit.since_mark()

    # 1. nodes, kept alive by kwok
    cpu0 = proc_cpu(pid)
    _parallel(p.nodes, p.threads, lambda i: c.create(k.NODES, _node(i)))
    rep.nodes_ready_s = wait_until(
        f"kwok reporting {p.nodes} nodes Ready",
        lambda: sum(map(_ready, c.list(k.NODES, label_selector="type=kwok")[0])) >= p.nodes,
        p.timeout, s.procs, interval=1.0)
    say(f"{p.nodes} nodes Ready after {rep.nodes_ready_s:.1f} s")
    # a quiet spell: what N heartbeating nodes cost the manager, with nothing else going on
    t_idle, cpu1 = time.monotonic(), proc_cpu(pid)
    time.sleep(10)
    rep.cpu["nodes idle, per 10 s"] = proc_cpu(pid) - cpu1
    rep.node_events_s = time.monotonic() - t_idle
    rep.cpu["nodes"] = proc_cpu(pid) - cpu0
    rep.requests["nodes"] = s.audit.since_mark()

    # 2. the artifact every Model adopts; every node labelled as caching it
    src = os.path.join(s.work, "model")
    modelgen.make_safetensors_model(src, layers=1, hidden=16)
    packed = pack_to_registry(src, s.reg, parse(f"{s.registry.host}/seed/model:v1"))
    raw, digest, media = s.reg.get_manifest(parse(f"{s.registry.host}/seed/model:v1"))
    manifest = json.loads(raw)
    blobs = [s.reg.get_blob_bytes("seed/model", d["digest"])
             for d in [manifest["config"], *manifest["layers"]]]
    del packed
    label = names.node_label(digest)
    cpu0, t0 = proc_cpu(pid), time.monotonic()
    _parallel(p.nodes, p.threads, lambda i: c.patch(
        k.NODES, f"kwok-node-{i:05d}", {"metadata": {"labels": {label: "true"}}}))
    rep.label_s = time.monotonic() - t0
    time.sleep(2)  # the manager's node informer catches up
    rep.cpu["node labels"] = proc_cpu(pid) - cpu0
    rep.requests["node labels"] = s.audit.since_mark()
    say(f"{p.nodes} nodes labelled {label} in {rep.label_s:.1f} s")

    # 3. Models, held Pending until their artifact arrives
    cpu0 = proc_cpu(pid)
    model_names = [f"m-{i:04d}" for i in range(p.models)]
    _parallel(p.models, p.threads, lambda i: c.create(k.MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
        "metadata": {"name": model_names[i], "namespace": NS,
                     "annotations": {names.IMPORTED: digest}},
        "spec": {"source": {"huggingFace": {"repo": f"bench/{model_names[i]}"}}}}, NS))

    def all_pending() -> bool:
        items, _ = c.list(k.MODELS, NS)
        return sum(1 for m in items if (m.get("status") or {}).get("phase") == "Pending") \
            >= p.models
    wait_until(f"{p.models} Models Pending (artifact missing)", all_pending, p.timeout, s.procs)
    rep.cpu["models pending"] = proc_cpu(pid) - cpu0
    rep.requests["models pending"] = s.audit.since_mark()

    # 4. pods at R/s through the webhook
    lifted = Watcher(c, k.PODS, lambda o: not _gated(o),
                     also=lambda o: _has_affinity(o) and _count(rep, "pods_with_affinity"))
    ready = Watcher(c, k.MODELS, lambda o: (o.get("status") or {}).get("phase") == "Ready")
    lifted.start()
    ready.start()
    hook_api0 = buckets_of(s.apiserver_metrics(),
                           "apiserver_admission_webhook_admission_duration_seconds",
                           lambda lb: lb.get("type") == "admit" and lb.get("operation") == "CREATE")
    hook_mgr0 = buckets_of(s.metrics(), "modelcache_webhook_admission_duration_seconds",
                           lambda lb: True)
    create0 = buckets_of(s.apiserver_metrics(), "apiserver_request_duration_seconds",
                         _pod_create)
    cpu0 = proc_cpu(pid)
    lat: list[float] = [0.0] * p.pods
    mutated = [False] * p.pods
    late: list[int] = []
    t_start = time.monotonic() + 0.2

    def create(i: int) -> None:
        wait = t_start + i / p.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif wait < -0.1:
            late.append(i)  # the client, not the server, fell behind the schedule
        t = time.monotonic()
        stored = c.create(k.PODS, _pod(i, model_names[i % p.models]), NS)
        lat[i] = time.monotonic() - t
        mutated[i] = _mutated(stored)
    _parallel(p.pods, p.threads, create)
    rep.create_s = time.monotonic() - t_start
    rep.late = len(late)
    rep.create_latency = lat
    rep.pods_mutated = sum(mutated)
    say(f"{p.pods} pods created in {rep.create_s:.1f} s ({p.pods / rep.create_s:.0f}/s; "
        f"{rep.late} started >100 ms late); {rep.pods_mutated} mutated")
    time.sleep(2)  # let the manager's gated-pod informer see the last creates
    rep.cpu["pods created"] = proc_cpu(pid) - cpu0
    rep.requests["pods created"] = s.audit.since_mark()
    a, b, n = delta_quantiles(hook_api0, buckets_of(
        s.apiserver_metrics(), "apiserver_admission_webhook_admission_duration_seconds",
        lambda lb: lb.get("type") == "admit" and lb.get("operation") == "CREATE"))
    rep.apiserver_webhook = (a, b)
    a, b, _ = delta_quantiles(create0, buckets_of(
        s.apiserver_metrics(), "apiserver_request_duration_seconds", _pod_create))
    rep.create_server_latency = (a, b)
    a, b, n2 = delta_quantiles(hook_mgr0, buckets_of(
        s.metrics(), "modelcache_webhook_admission_duration_seconds", lambda lb: True))
    rep.manager_webhook, rep.admissions = (a, b), int(n2)
    rep.hook_sockets = sockets_on(s.hook_port)
    if lifted.at:
        raise ScaleError(f"{len(lifted.at)} pods lifted before any Model was Ready")

    # 5. the artifact lands in each Model's repository; the manager writes Ready
    cpu0 = proc_cpu(pid)
    text0 = s.apiserver_metrics()
    patch0 = buckets_of(text0, "apiserver_request_duration_seconds", _pod_patch)
    patch_sum0 = sum_count(text0, "apiserver_request_duration_seconds", _pod_patch)
    tag = names.imported_tag(digest)
    pushed: dict[str, float] = {}

    def push(i: int) -> None:
        if p.land_over > 0:
            wait = t_push + i * p.land_over / p.models - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        repo = f"models/{NS}/{model_names[i]}"
        for blob in blobs:
            s.reg.upload_bytes(repo, blob)
        s.reg.put_manifest(repo, tag, raw, media)
        pushed[model_names[i]] = time.monotonic()
        if p.nudge:
            c.patch(k.MODELS, model_names[i], {"metadata": {"annotations": {
                NUDGE_ANNOTATION: "pushed"}}}, NS)
    t_push = time.monotonic() + 0.1
    _parallel(p.models, 8, push)
    rep.push_span_s = time.monotonic() - t_push
    say(f"artifact copied into {p.models} repositories in {rep.push_span_s:.1f} s")
    wait_until(f"all {p.pods} gates lifted", lambda: len(lifted.at) >= p.pods, p.timeout,
               s.procs, interval=0.5)
    time.sleep(2)  # late writes by the manager, if any, land in this phase's count
    rep.cpu["ready and lift"] = proc_cpu(pid) - cpu0
    text1 = s.apiserver_metrics()
    a, b, _ = delta_quantiles(patch0, buckets_of(
        text1, "apiserver_request_duration_seconds", _pod_patch))
    total, count = sum_count(text1, "apiserver_request_duration_seconds", _pod_patch)
    total, count = total - patch_sum0[0], count - patch_sum0[1]
    rep.patch_latency = (a, b, total / count if count else float("nan"))
    rep.requests["ready and lift"] = s.audit.since_mark()
    lifted.stop.set()
    ready.stop.set()
    rep.models_ready = len(ready.at)
    rep.pods_lifted = len(lifted.at)
    rep.ready_to_lift = [lifted.at[f"p-{i:05d}"] - ready.at[model_names[i % p.models]]
                         for i in range(p.pods)
                         if f"p-{i:05d}" in lifted.at and model_names[i % p.models] in ready.at]
    rep.pushed_to_ready = [ready.at[m] - pushed[m] for m in model_names
                           if m in ready.at and m in pushed]
    rep.lifted_out_of_order = out_of_order(
        lifted.at, ready.at, lambda pod: model_names[int(pod[2:]) % p.models])
    if ready.at and lifted.at:
        rep.ready_spread_s = max(ready.at.values()) - min(ready.at.values())
        rep.lift_span_s = max(lifted.at.values()) - min(ready.at.values())
    st = proc_status(pid)
    rep.rss_kib, rep.hwm_kib = st["VmRSS"], st["VmHWM"]
    rep.requests["pods"] = rep.requests["pods created"] + rep.requests["ready and lift"]
    with open(s.manager_log, errors="replace") as f:
        rep.pool_discards = sum("Connection pool is full" in line for line in f)


def _pod_patch(labels: dict[str, str]) -> bool:
    return labels.get("verb") == "PATCH" and labels.get("resource") == "pods"


def _pod_create(labels: dict[str, str]) -> bool:
    return labels.get("verb") == "POST" and labels.get("resource") == "pods" and \
        not labels.get("subresource")


_count_lock = threading.Lock()


def _count(rep: Report, attr: str) -> bool:
    with _count_lock:
        setattr(rep, attr, getattr(rep, attr) + 1)
    return True


# --- the report --------------------------------------------------------------------------


def table(rep: Report) -> Iterator[str]:
    p = rep.params

    def ms(x: float) -> str:
        return f"{x * 1000:.1f} ms"
    yield "| figure | value |"
    yield "|---|---|"
    yield f"| nodes (kwok) | {p.nodes}, Ready {rep.nodes_ready_s:.1f} s after create |"
    yield f"| models / pods | {p.models} / {p.pods} at {p.rate:g}/s ({rep.late} started late; " \
          f"created in {rep.create_s:.1f} s) |"
    yield f"| pods mutated / lifted | {rep.pods_mutated} / {rep.pods_lifted} of {p.pods} " \
          f"({rep.pods_with_affinity} with the cached-node affinity) |"
    yield f"| webhook p50 / p99 (API server's histogram) | {ms(rep.apiserver_webhook[0])} / " \
          f"{ms(rep.apiserver_webhook[1])} |"
    yield f"| webhook p50 / p99 (manager's handler, {rep.admissions} admissions) | " \
          f"{ms(rep.manager_webhook[0])} / {ms(rep.manager_webhook[1])} |"
    yield f"| webhook TCP sockets after the pods (both ends) | {rep.hook_sockets} |"
    yield f"| pod create p50 / p99 (bench client, whole round trip) | " \
          f"{ms(quantile(rep.create_latency, 0.5))} / {ms(quantile(rep.create_latency, 0.99))} |"
    yield f"| Model Ready → gate lifted p50 / p99 / max | {ms(quantile(rep.ready_to_lift, 0.5))}" \
          f" / {ms(quantile(rep.ready_to_lift, 0.99))} / " \
          f"{ms(max(rep.ready_to_lift, default=float('nan')))} |"
    yield f"| pod create p50 / p99 (API server's own, webhook included) | " \
          f"{ms(rep.create_server_latency[0])} / {ms(rep.create_server_latency[1])} |"
    yield f"| artifact pushed to {p.models} repositories; manifest put → Model Ready p50 / p99 " \
          f"| {rep.push_span_s:.1f} s; {ms(quantile(rep.pushed_to_ready, 0.5))} / " \
          f"{ms(quantile(rep.pushed_to_ready, 0.99))} |"
    yield f"| pods lifted before an earlier-Ready Model's; most such Models at once | " \
          f"{rep.lifted_out_of_order[0]}; {rep.lifted_out_of_order[1]} |"
    yield f"| Models Ready first → last; first Ready → last lift | {rep.ready_spread_s:.1f} s; " \
          f"{rep.lift_span_s:.1f} s ({rep.pods_lifted / max(rep.lift_span_s, 1e-9):.0f} " \
          f"lifts/s) |"
    yield f"| API server's PATCH pods p50 / p99 / mean during the lifts | " \
          f"{ms(rep.patch_latency[0])} / {ms(rep.patch_latency[1])} / " \
          f"{ms(rep.patch_latency[2])} |"
    yield f"| manager RSS idle / end / peak | {rep.idle_rss_kib / 1024:.0f} / " \
          f"{rep.rss_kib / 1024:.0f} / {rep.hwm_kib / 1024:.0f} MiB |"
    yield f"| manager's API connections discarded (pool full) | {rep.pool_discards} |"
    yield f"| manager API requests per pod | {rep.requests_per_pod():.2f} |"
    for phase, cnt in rep.requests.items():
        detail = ", ".join(f"{w} {n}" for w, n in cnt.most_common(6)) or "none"
        yield f"| manager requests, {phase} | {sum(cnt.values())}: {detail} |"
    for phase, sec in rep.cpu.items():
        yield f"| manager CPU, {phase} | {sec:.2f} s |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for each wait")
    ap.add_argument("--land-over", type=float, default=0.0, metavar="SECONDS",
                    help="spread the artifacts' pushes evenly over SECONDS (default 0: all "
                         "at once, the worst case for Ready → lifted)")
    ap.add_argument("--nudge", action="store_true",
                    help="annotate each Model after its push (as a registry notification "
                         "would): adopted at once, not at the next re-check")
    args = ap.parse_args()
    rep = run(Params(nodes=args.nodes, models=args.models, pods=args.pods, rate=args.rate,
                     threads=args.threads, workers=args.workers,
                     timeout=args.timeout, nudge=args.nudge, land_over=args.land_over),
              say=lambda t: print(t, file=sys.stderr, flush=True))
    for line in table(rep):
        print(line)
    print(f"\n`python3 -m bench.scale.run --nodes {args.nodes} --models {args.models} "
          f"--pods {args.pods} --rate {args.rate:g}{' --nudge' if args.nudge else ''}"
          f"{f' --land-over {args.land_over:g}' if args.land_over else ''}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
