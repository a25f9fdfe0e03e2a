"""A one-node Kubernetes cluster on loopback with a REAL kubelet and the whole
modelcache system on it, for tests/e2e.

Sits under ``test_node_e2e.py``: everything between "a Model and an
annotated Deployment are created" and "a container reads the model" is real
code, Kubernetes' and ours:
- etcd + kube-apiserver from ``tests/kubeenv.py`` (``cli/local/cluster.py``);
- kube-controller-manager (Deployment -> ReplicaSet -> Pod, the ``default``
  ServiceAccount, node lifecycle), kube-scheduler;
- containerd + runc from Debian, with their own config, root, state and
  socket under the temp dir;
- kubelet, built from Go modules by ``hack/install.d/node-e2e.sh``;
- the CRDs (``crds/``), the controller's namespace and both RBAC manifests
  (``daemonset/controller-namespace.yaml``, ``controller-rbac.yaml``,
  ``node-rbac.yaml``) and the CSIDriver (``daemonset/csidriver.yaml``);
- the controller manager (``python -m controller.main manager``) as the
  ``modelcache-controller`` ServiceAccount, with only the manifest's RBAC:
  reconcilers, leader election, and workload delivery (``--webhook-url``:
  the admission webhook it serves on loopback and registers itself, its
  certificates, the gate lifter);
- the NodeCache plugin (``python -m csi.main --resolver kube``) as the
  ``modelcache-node`` ServiceAccount (Models from the API server, its Node's
  cache labels), on ``<kubelet root>/plugins/nodecache.modelcache.io/csi.sock``,
  registered with kubelet through the plugin-registration socket in
  ``<kubelet root>/plugins_registry`` (``fake_node_driver_registrar.py``,
  standing in for node-driver-registrar, which the Go module proxy cannot
  serve).

Shortcuts, each because a test node on loopback needs nothing more:
- the Kubernetes components (kubelet included) authenticate as the admin
  client cert (``system:masters``) instead of a node identity
  (``system:node:<name>`` + the Node authorizer) or per-controller service
  accounts; our two processes get ServiceAccount tokens (TokenRequest), as
  their pods would;
- our two processes run on the host, not in the Deployment/DaemonSet pods of
  ``daemonset/``: there is no image of them (no Docker engine here to build
  one) and no pod network to reach the webhook through a Service, so the
  manager registers the webhook by URL (``https://127.0.0.1:<port>``);
- kubelet's own API listens on 127.0.0.1 only, which kubelet will not
  report as the node's address ("nodeIP can't be loopback"), so the API
  server cannot reach it: no ``kubectl logs``/``exec``. Tests read what a
  container printed from kubelet's pod log files (``container_log``);
- pods must use ``hostNetwork: true``: no CNI network is set up. containerd
  still wants a CNI config before it reports NetworkReady (and kubelet marks
  the node Ready), so it gets a loopback-only one (Debian's
  containernetworking-plugins), which is enough for host-network pods;
- ``cgroupsPerQOS: false``: kubelet makes no kubepods/ QoS cgroup tree on
  this shared machine (containers still get their own cgroups from runc);
  this VM has cgroup v1 (hybrid), which kubelet 1.35+ refuses unless
  ``failCgroupV1: false``; cgroup driver ``cgroupfs`` (no systemd here);
- containerd clamps oom_score_adj to its own (``restrict_oom_score_adj``):
  this VM withholds CAP_SYS_RESOURCE, so the sandbox's -998 cannot be set;
- eviction thresholds are near zero so a full shared disk does not evict
  the test's pods; image GC is effectively off;
- pods should set ``automountServiceAccountToken: false`` (no projected
  token needed; the ServiceAccount still must exist, the controller makes it).
kubelet symlinks container logs into the fixed ``/var/log/containers``;
teardown removes the links that point into the temp dir.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from cli.local.cluster import stop_process, tail
from tests import kubeenv
from tests.integration.test_crds import install_crds

DRIVER = "nodecache.modelcache.io"
NODE_NAME = "modelcache-e2e"
SYSTEM_NS = "modelcache-system"  # the controller's namespace (daemonset/*.yaml)
# applied in this order: the namespace the RBAC objects live in comes first
MANIFESTS = tuple(os.path.join(kubeenv.REPO_ROOT, "daemonset", f) for f in (
    "controller-namespace.yaml", "controller-rbac.yaml", "node-rbac.yaml", "csidriver.yaml"))
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
CONTAINER_LOGS = "/var/log/containers"  # kubelet's fixed symlink dir
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PARENT = "k8s.io"  # containerd's parent for pod cgroups without cgroupsPerQOS
START_TIMEOUT = 180.0  # a shared 2-core machine: components take their time



_taken: set[int] = set()


def listen_port() -> int:
    """A free port below the ephemeral range, never the same one twice.

    ``bind(0)`` hands out ephemeral ports, and while kubelet, containerd and the
    control plane start they open many outgoing connections from that same
    range: a port picked that way may be some connection's source port by the
    time the server binds it (EADDRINUSE, seen once in CI). Ports below 32768
    are never used as source ports.
    """
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32768)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port

class NodeEnvError(RuntimeError):
    """A component of the test node could not be found or started."""


@dataclass(frozen=True)
class NodeBinaries:
    kubelet: str
    kube_scheduler: str
    kube_controller_manager: str
    containerd: str
    ctr: str


def node_binaries() -> NodeBinaries:
    kube_dir = os.path.join(kubeenv.TOOLS, f"kube-{kubeenv.versions()['KUBE_VERSION']}")
    found = NodeBinaries(
        kubelet=os.path.join(kube_dir, "kubelet"),
        kube_scheduler=os.path.join(kube_dir, "kube-scheduler"),
        kube_controller_manager=os.path.join(kube_dir, "kube-controller-manager"),
        containerd=shutil.which("containerd") or "/usr/bin/containerd",
        ctr=shutil.which("ctr") or "/usr/bin/ctr",
    )
    missing = [p for p in vars(found).values() if not os.access(p, os.X_OK)]
    if not shutil.which("runc"):
        missing.append("runc")
    if not os.access(os.path.join(CNI_BIN_DIR, "loopback"), os.X_OK):
        missing.append(os.path.join(CNI_BIN_DIR, "loopback"))
    if missing:
        raise NodeEnvError(f"not installed: {', '.join(missing)} "
                           "(run MODELCACHE_NODE_E2E=1 hack/install.d/node-e2e.sh)")
    return found


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: str


@dataclass
class NodeEnv:
    """The running node; ``kube`` is the API server (admin kubeconfig)."""

    dir: str
    kube: Any  # kubeenv.KubeEnv
    node_name: str
    kubelet_root: str
    containerd_socket: str
    plugin_socket: str
    cache_dir: str
    manager_port: int = 0  # the manager's /healthz, /readyz, /metrics
    procs: list[Process] = field(default_factory=list)

    def manager_metrics(self) -> str:
        """The controller manager's Prometheus text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.manager_port}/metrics",
                                    timeout=5) as r:
            text: str = r.read().decode()
        return text

    def logs(self, n: int = 25) -> str:
        """The last lines of every component's log, for failure messages."""
        parts = []
        for p in self.procs:
            state = "running" if p.proc.poll() is None else f"exited {p.proc.returncode}"
            parts.append(f"--- {p.name} ({state}) {p.log}\n{tail(p.log, n)}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.proc.poll() is not None:
                raise NodeEnvError(f"{p.name} exited with {p.proc.returncode}:\n{tail(p.log, 40)}")


def _spawn(env: NodeEnv, name: str, argv: Sequence[str],
           extra_env: dict[str, str] | None = None) -> Process:
    log = os.path.join(env.dir, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(list(argv), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=kubeenv.REPO_ROOT,
                                env={**os.environ, **(extra_env or {})})
    p = Process(name, proc, log)
    env.procs.append(p)
    return p


def wait_for(env: NodeEnv, what: str, check: Callable[[], Any], timeout: float = START_TIMEOUT,
             interval: float = 0.5, describe: Callable[[], str] | None = None) -> Any:
    """Poll ``check()`` until it returns something truthy; fail early when a
    component died; on timeout the error carries ``describe()`` and the logs."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        env.check_alive()
        try:
            got = check()
            if got:
                return got
        except AssertionError:
            raise
        except Exception as e:  # a component not ready yet fails in any way
            last = e
        time.sleep(interval)
    extra = describe() if describe else ""
    raise NodeEnvError(f"{what}: not within {timeout:.0f}s (last error: {last})\n"
                       f"{extra}\n{env.logs()}")


# --- configs -----------------------------------------------------------------------


def containerd_config(root: str, sandbox_image: str, cni_conf_dir: str, hosts_dir: str) -> str:
    """containerd 1.6 (Debian 12) config: everything under ``root``.

    ``sandbox_image``: containerd's default ``registry.k8s.io/pause`` is out of
    reach; the test's own busybox-based image stands in (tests/e2e/images.py).
    ``config_path``: per-registry ``hosts.toml`` files (``registry_hosts``)
    so the loopback registry is pulled over plain HTTP.
    """
    return f"""\
version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{root}/containerd.sock"

[ttrpc]
  address = "{root}/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # this VM withholds CAP_SYS_RESOURCE even from root, so no process may
  # lower an oom_score_adj; runc's init fails ("can't get final child's PID
  # from pipe: EOF") writing the sandbox's -998. Clamp to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts_dir}"
"""


def registry_hosts(hosts_dir: str, registry: str) -> None:
    """``hosts.toml`` telling containerd to use plain HTTP for ``registry``."""
    d = os.path.join(hosts_dir, registry)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "hosts.toml"), "w") as f:
        f.write(f'server = "http://{registry}"\n\n'
                f'[host."http://{registry}"]\n'
                '  capabilities = ["pull", "resolve"]\n')


def loopback_cni(conf_dir: str) -> None:
    # the only network: loopback. Enough for containerd to report
    # NetworkReady; pods use hostNetwork and never get an interface from it.
    os.makedirs(conf_dir, exist_ok=True)
    with open(os.path.join(conf_dir, "10-loopback.conflist"), "w") as f:
        json.dump({"cniVersion": "0.4.0", "name": "modelcache-e2e-lo",
                   "plugins": [{"type": "loopback"}]}, f)


def kubelet_config(env: NodeEnv, port: int, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        # only holders of a cert from the test CA get in, and then may do anything
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": env.kube.pki.ca}},
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{env.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "podLogsDir": os.path.join(env.dir, "pod-logs"),
        "volumePluginDir": os.path.join(env.dir, "flexvolume"),
        "resolvConf": "/etc/resolv.conf",
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "registerNode": True,
        # kubelet would pick the node's lease and heartbeat timings; defaults are fine
    }


# --- lifecycle -------------------------------------------------------------------


def _node_ready(core: Any, name: str) -> bool:
    node = core.read_node(name)
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def _csinode_has_driver(storage: Any, name: str) -> bool:
    csinode = storage.read_csi_node(name)
    return any(d.name == DRIVER for d in csinode.spec.drivers or [])


def _manager_ready(env: NodeEnv) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.manager_port}/readyz", timeout=2) as r:
        return r.status == 200


def _webhook_serving(kube: Any) -> bool:
    """True once the API server calls our webhook: a server-side dry run of a
    Deployment asking for a model that does not exist is denied by it (the
    webhook registers itself, and the API server picks its configuration up
    a moment later; a Deployment created before that would go in unmutated)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    probe = {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "webhook-probe",
                          "annotations": {"modelcache.io/models": "webhook-probe"}},
             "spec": {"selector": {"matchLabels": {"app": "probe"}},
                      "template": {"metadata": {"labels": {"app": "probe"}},
                                   "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
    try:
        client.AppsV1Api(kube.api_client()).create_namespaced_deployment(
            SYSTEM_NS, probe, dry_run="All")
    except ApiException as e:
        if "denied the request" in str(e.body) and "webhook-probe not found" in str(e.body):
            return True
        raise
    return False


def start_control_plane(env: NodeEnv, kube: Any, bins: NodeBinaries) -> None:
    """kube-controller-manager and kube-scheduler as ``env``'s processes
    (also the two-node cluster's, tests/e2e/cluster2.py)."""
    admin = kube.kubeconfig
    # admin identity, no leader election
    _spawn(env, "kube-controller-manager", [
        bins.kube_controller_manager, f"--kubeconfig={admin}",
        f"--authentication-kubeconfig={admin}", f"--authorization-kubeconfig={admin}",
        "--bind-address=127.0.0.1", f"--secure-port={listen_port()}",
        "--leader-elect=false", "--controllers=*",
        f"--root-ca-file={kube.pki.ca}",
        f"--service-account-private-key-file={kube.pki.path('sa.key')}",
        "--use-service-account-credentials=false",
        # a node that stops heartbeating is marked NotReady sooner, so a broken
        # kubelet shows up as such in the test's failure message
        "--node-monitor-grace-period=20s", "--v=1",
    ])
    _spawn(env, "kube-scheduler", [
        bins.kube_scheduler, f"--kubeconfig={admin}",
        f"--authentication-kubeconfig={admin}", f"--authorization-kubeconfig={admin}",
        "--bind-address=127.0.0.1", f"--secure-port={listen_port()}",
        "--leader-elect=false", "--v=1",
    ])


def _start(env: NodeEnv, kube: Any, *, sandbox_image: str, registries: Sequence[str],
           model_registry: str, node_pull_via: str | None) -> None:
    from kubernetes import client

    bins = node_binaries()
    admin = kube.kubeconfig
    core = client.CoreV1Api(kube.api_client())
    storage = client.StorageV1Api(kube.api_client())

    # the API the system adds, its namespace and identities (the manifests'
    # RBAC, nothing more), and the CSIDriver object: kubelet refuses an inline
    # volume of a driver without one that allows the Ephemeral lifecycle mode
    install_crds(kube)
    kube.kubectl("apply", *(a for m in MANIFESTS for a in ("-f", m)))
    controller_kc = kube.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS)
    node_kc = kube.serviceaccount_kubeconfig("modelcache-node", SYSTEM_NS)

    start_control_plane(env, kube, bins)

    # our controller manager: started now so its start-up overlaps kubelet's.
    # Leader election stays on (one replica takes the Lease at once). No
    # SharedPVC here (no RWX storage on this node); models are adopted, so
    # no publish Job is made and --worker-image is never used.
    env.manager_port = listen_port()
    webhook_port = listen_port()
    _spawn(env, "modelcache-manager", [
        sys.executable, "-m", "controller.main", "manager", "--kubeconfig", controller_kc,
        "--namespace", SYSTEM_NS, "--registry", model_registry, "--registry-insecure",
        "--listen", f"127.0.0.1:{env.manager_port}", "--no-shared-pvc",
        "--webhook-url", f"https://127.0.0.1:{webhook_port}",
        "--webhook-listen", f"127.0.0.1:{webhook_port}", "--log-level", "INFO",
    ])

    # the NodeCache plugin on kubelet's plugin dir, reading Models from the API
    # server; also started before kubelet (it needs only the API server), its
    # registration with kubelet comes once kubelet runs
    os.makedirs(os.path.dirname(env.plugin_socket), exist_ok=True)
    pull = ["--pull-via", f"{model_registry}={node_pull_via}",
            "--insecure-registry", node_pull_via] if node_pull_via else []
    _spawn(env, "modelcache-node", [
        sys.executable, "-m", "csi.main", "--endpoint", f"unix://{env.plugin_socket}",
        "--cache-dir", env.cache_dir, "--node-id", env.node_name, "--log-level", "info",
        "--resolver", "kube", "--kubeconfig", node_kc, "--node-labels",
        "--insecure-registry", model_registry, *pull,
    ])

    # containerd
    ctd = os.path.join(env.dir, "containerd")
    hosts_dir = os.path.join(ctd, "certs.d")
    cni_dir = os.path.join(env.dir, "cni")
    os.makedirs(ctd, exist_ok=True)
    for r in registries:
        registry_hosts(hosts_dir, r)
    loopback_cni(cni_dir)
    conf = os.path.join(ctd, "config.toml")
    with open(conf, "w") as f:
        f.write(containerd_config(ctd, sandbox_image, cni_dir, hosts_dir))
    _spawn(env, "containerd", [bins.containerd, "--config", conf, "--log-level", "info"])
    wait_for(env, "containerd socket", lambda: subprocess.run(
        [bins.ctr, "--address", env.containerd_socket, "version"], capture_output=True,
        timeout=10).returncode == 0, timeout=60)

    # kubelet
    port, healthz = listen_port(), listen_port()
    kconf = os.path.join(env.dir, "kubelet-config.yaml")
    with open(kconf, "w") as f:
        yaml.safe_dump(kubelet_config(env, port, healthz), f)
    _spawn(env, "kubelet", [
        bins.kubelet, f"--config={kconf}", f"--kubeconfig={admin}",
        f"--root-dir={env.kubelet_root}", f"--cert-dir={os.path.join(env.dir, 'kubelet-pki')}",
        f"--hostname-override={env.node_name}", "--v=2",
    ])
    wait_for(env, f"node {env.node_name} Ready", lambda: _node_ready(core, env.node_name))

    wait_for(env, "modelcache-node socket", lambda: os.path.exists(env.plugin_socket), timeout=60)
    _spawn(env, "plugin-registrar", [
        sys.executable, "-m", "tests.e2e.fake_node_driver_registrar",
        f"--csi-address={env.plugin_socket}",
        f"--kubelet-registration-path={env.plugin_socket}",
        f"--plugin-registration-dir={os.path.join(env.kubelet_root, 'plugins_registry')}",
        f"--kube-version={kubeenv.versions()['KUBE_VERSION']}",
    ])
    wait_for(env, f"CSINode {env.node_name} lists {DRIVER}",
             lambda: _csinode_has_driver(storage, env.node_name))
    wait_for(env, "modelcache manager /readyz", lambda: _manager_ready(env), timeout=60)
    wait_for(env, "the API server calling the modelcache webhook",
             lambda: _webhook_serving(kube), timeout=60)


def _cleanup_containers(env: NodeEnv) -> None:
    """Safety net after kubelet is gone: stop whatever containers are left.

    containerd's shims outlive containerd, so containers a failed test left
    would keep running; kill them through containerd while it still runs.
    """
    bins = node_binaries()
    base = [bins.ctr, "--address", env.containerd_socket, "--namespace", "k8s.io"]
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        tasks = subprocess.run([*base, "tasks", "ls", "-q"], capture_output=True, text=True,
                               timeout=30).stdout.split()
        for t in tasks:
            subprocess.run([*base, "tasks", "kill", "-s", "SIGKILL", t], capture_output=True,
                           timeout=30)
        for t in tasks:
            subprocess.run([*base, "tasks", "rm", "-f", t], capture_output=True, timeout=30)


def _unmount_under(path: str) -> None:
    real = os.path.realpath(path)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == real or mp.startswith(real + "/"):
                points.append(mp)
    for mp in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def _remove_log_links(root: str) -> None:
    if not os.path.isdir(CONTAINER_LOGS):
        return
    for name in os.listdir(CONTAINER_LOGS):
        path = os.path.join(CONTAINER_LOGS, name)
        if os.path.islink(path) and os.readlink(path).startswith(root + "/"):
            os.unlink(path)


def _remove_cgroup_parents() -> None:
    # runc leaves the empty parent cgroup containerd puts pods under
    # (/k8s.io in each v1 hierarchy); rmdir fails harmlessly while any
    # container (another run's) is still in it
    for path in glob.glob(os.path.join(CGROUP_ROOT, "*", CGROUP_PARENT)):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def stop(env: NodeEnv) -> None:
    """Stop the node: workloads first (so kubelet unpublishes volumes), then
    components in reverse order of start; unmount what is left."""
    by_name = {p.name: p for p in env.procs}
    for name in ("modelcache-manager", "plugin-registrar", "kubelet", "kube-scheduler",
                 "kube-controller-manager"):
        if name in by_name:
            stop_process(by_name[name].proc, timeout=20)
    if "containerd" in by_name and by_name["containerd"].proc.poll() is None:
        _cleanup_containers(env)
    for name in ("modelcache-node", "containerd"):
        if name in by_name:
            stop_process(by_name[name].proc, timeout=20)
    _unmount_under(env.dir)
    _remove_log_links(env.dir)
    _remove_cgroup_parents()


def container_log(env: NodeEnv, pod: Any, container: str) -> str:
    """What ``container`` of ``pod`` (a V1Pod) printed, from kubelet's log
    files (CRI format: ``<time> <stream> <P|F> <text>``; P = partial line)."""
    meta = pod.metadata
    d = os.path.join(env.dir, "pod-logs", f"{meta.namespace}_{meta.name}_{meta.uid}", container)
    if not os.path.isdir(d):
        return ""
    text: list[str] = []
    # rotated files are 0.log, 1.log, ... (plus .gz/.tmp kubelet may leave)
    names = sorted((n for n in os.listdir(d) if n.split(".")[0].isdigit() and n.endswith(".log")),
                   key=lambda n: int(n.split(".")[0]))
    for name in names:
        with open(os.path.join(d, name), errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 3)
                if len(parts) == 4:
                    text.append(parts[3] + ("\n" if parts[2] == "F" else ""))
    return "".join(text)


def delete_and_wait_pods(env: NodeEnv, namespace: str, timeout: float = 120) -> None:
    """Delete every Deployment and Pod of ``namespace``; wait until kubelet
    has torn the pods down (volumes unpublished, containers stopped)."""
    from kubernetes import client

    apps = client.AppsV1Api(env.kube.api_client())
    core = client.CoreV1Api(env.kube.api_client())
    apps.delete_collection_namespaced_deployment(namespace)
    core.delete_collection_namespaced_pod(namespace, grace_period_seconds=1)
    wait_for(env, f"pods of {namespace} gone",
          lambda: not core.list_namespaced_pod(namespace).items, timeout=timeout)


@contextlib.contextmanager
def running(*, sandbox_image: str, registries: Sequence[str], model_registry: str,
            node_pull_via: str | None = None, keep_dir: bool = False) -> Iterator[NodeEnv]:
    """API server + controller-manager + scheduler + containerd + kubelet +
    modelcache's manager and NodeCache plugin, all on loopback in one temp dir.

    ``registries``: host:port of plain-HTTP registries containerd pulls from;
    ``model_registry``: the plain-HTTP registry (host:port) models live in,
    the manager's ``--registry``; ``node_pull_via``: another host:port the
    node plugin fetches them from instead (``--pull-via``, as a node uses
    the DMCR's read-only endpoint; the test's counting proxy).
    """
    if os.geteuid() != 0:
        raise NodeEnvError("the node e2e needs root (containerd, runc, mounts)")
    # short: unix socket paths under it must stay below 108 bytes
    work = tempfile.mkdtemp(prefix="mc-node-", dir="/tmp")
    with kubeenv.running() as kube:
        kubelet_root = os.path.join(work, "kubelet")
        env = NodeEnv(
            dir=work, kube=kube, node_name=NODE_NAME, kubelet_root=kubelet_root,
            containerd_socket=os.path.join(work, "containerd", "containerd.sock"),
            plugin_socket=os.path.join(kubelet_root, "plugins", DRIVER, "csi.sock"),
            cache_dir=os.path.join(work, "cache"),
        )
        try:
            _start(env, kube, sandbox_image=sandbox_image, registries=registries,
                   model_registry=model_registry, node_pull_via=node_pull_via)
            yield env
        finally:
            with contextlib.suppress(Exception):
                stop(env)
            if keep_dir or os.environ.get("MODELCACHE_E2E_KEEP"):
                sys.stderr.write(f"nodeenv: kept {work}\n")
            else:
                shutil.rmtree(work, ignore_errors=True)


def _main() -> None:
    """Bring the node up by hand for debugging: python -m tests.e2e.nodeenv."""
    from cli.local import registry as localregistry
    from modelpack.oci.registry import RegistryClient
    from tests.e2e import images

    with localregistry.running() as reg:
        imgs = images.push_images(RegistryClient(reg.host, insecure=True))
        with running(sandbox_image=imgs.pause, registries=[reg.host], model_registry=reg.host,
                     keep_dir=True) as env:
            print(f"KUBECONFIG={env.kube.kubeconfig}  node={env.node_name}  "
                  f"busybox={imgs.busybox}  dir={env.dir}", flush=True)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    _main()
