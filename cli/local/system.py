"""The whole system on loopback, each part as the real program, and its supervision.

Where it sits: under ``modelcache demo`` (cli/demo.py, which adds the demo's
own steps: the model, the pod, the volume). Brings up etcd +
kube-apiserver (``cluster.py``), the CRDs and the CSIDriver, the DMCR
(Debian docker-registry, ``registry.py``), a Hugging Face Hub-compatible
server (``hub.py``), the upload gateway (``modelcache-controller
upload-gateway``: ``source.upload`` and ``source.pvc`` publish through it),
the controller manager (``modelcache-controller manager --embedded-jobs``:
its Jobs run as local processes, ``controller/embedded/jobrunner.py``, their
output kept under ``jobs_dir``; the admission webhook served on loopback and
registered with the API server by URL, as ``--webhook-url`` does out of
cluster) and the NodeCache node plugin (``modelcache-node``, resolving
models from the API server). A PVC of the demo's namespace is the directory
``claim_dir(name)``: no provisioner runs, the reader Job reads that
directory. Every step
prints ``[n] …``; a failure raises ``DemoError`` naming the component and
why; ``down()`` stops everything started so far, last started first.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from api import names as contract
from cli.local import cluster as localcluster
from cli.local import hub as localhub
from cli.local import registry as localregistry
from csi import mounts
from csi.stubs import pb, rpc
from kube import client as kube

CRDS_DIR = os.path.join(localcluster.REPO_ROOT, "crds")
CSIDRIVER_FILE = os.path.join(localcluster.REPO_ROOT, "daemonset", "csidriver.yaml")
SYSTEM_NAMESPACE = "modelcache-system"
WEBHOOK_CONFIG = "modelcache"  # the manager's --webhook-config-name default
SERVICE_ACCOUNTS = kube.Resource("", "v1", "serviceaccounts", True, "ServiceAccount")
NODE_ID = "demo-node"


class DemoError(Exception):
    """A step failed; ``component`` says which part of the system."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(message)
        self.component = component


def step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def say(text: str) -> None:
    print(f"    {text}", flush=True)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _wait(component: str, what: str, check: Callable[[], bool], timeout: float,
          proc: subprocess.Popen[bytes] | None = None, log: str | None = None) -> None:
    """Poll ``check`` until true; a DemoError naming ``component`` (with its log) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DemoError(component, f"exited with status {proc.returncode}"
                            + (f"; last lines of {log}:\n{localcluster.tail(log)}" if log else ""))
        if check():
            return
        time.sleep(0.1)
    raise DemoError(component, f"{what} not within {timeout:.0f} s"
                    + (f"; last lines of {log}:\n{localcluster.tail(log)}" if log else ""))
class LocalSystem:
    """The running system; the ``start_*`` steps bring it up, ``down()`` stops it all."""

    def __init__(self, work: str | None = None, namespace: str = "default") -> None:
        self.work = work or tempfile.mkdtemp(prefix="modelcache-demo-")
        os.makedirs(self.work, exist_ok=True)
        self.namespace = namespace
        self._stack = contextlib.ExitStack()
        self.cluster: localcluster.LocalCluster | None = None
        self.registry: localregistry.LocalRegistry | None = None
        self.hub: localhub.HubServer | None = None
        self.client: Any = None  # kube.client.Kube
        self.manager: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_url = ""
        self.node: subprocess.Popen[bytes] | None = None
        self.node_socket = os.path.join(self.work, "node", "csi.sock")
        self.manager_log = os.path.join(self.work, "manager.log")
        self.gateway_log = os.path.join(self.work, "gateway", "gateway.log")
        self.jobs_dir = os.path.join(self.work, "jobs")  # the Job runner's: one dir per pod
        self.node_log = os.path.join(self.work, "node", "node.log")
        self.csi: Any = None  # the node plugin's Node service stub

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every child process the demo started (for health checks and tests)."""
        out = [p for p in (self.gateway, self.manager, self.node) if p is not None]
        if self.cluster is not None:
            out += [self.cluster.etcd, self.cluster.apiserver]
        if self.registry is not None:
            out.append(self.registry.proc)
        return out

    # -- bring-up -------------------------------------------------------------

    def start_cluster(self, n: int) -> None:
        v = localcluster.versions()
        step(n, f"start etcd {v['ETCD_VERSION']} + kube-apiserver {v['KUBE_VERSION']} "
                "on 127.0.0.1")
        try:
            self.cluster = localcluster.start(os.path.join(self.work, "kube"))
        except localcluster.ClusterError as e:
            component = "kube-apiserver" if "kube-apiserver" in str(e) else (
                "etcd" if str(e).startswith("etcd") else "kube tools")
            raise DemoError(component, str(e)) from e
        self._stack.callback(self.cluster.stop)
        self.client = kube.Kube.from_config(self.cluster.kubeconfig)
        self._stack.callback(self.client.close)
        say(f"API server {self.cluster.server} (ready in {self.cluster.startup_seconds:.1f} s)")
        say(f"kubeconfig {self.cluster.kubeconfig}")

    def kubectl(self, component: str, *args: str) -> str:
        assert self.cluster is not None
        res = self.cluster.kubectl(*args, check=False)
        if res.returncode != 0:
            raise DemoError(component, f"kubectl {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    def install_api(self, n: int) -> None:
        step(n, "install the CRDs (crds/) and the CSIDriver nodecache.modelcache.io")
        files = sorted(os.path.join(CRDS_DIR, f) for f in os.listdir(CRDS_DIR)
                       if f.endswith(".yaml"))
        args = sum((["-f", f] for f in [*files, CSIDRIVER_FILE]), [])
        for line in self.kubectl("CRDs", "apply", "--server-side", *args).splitlines():
            say(line)
        self.kubectl("CRDs", "wait", "--for=condition=Established", "--timeout=30s",
                     *(f"crd/{p}.modelcache.io" for p in
                       ("models", "clustermodels", "modelcatalogsources")))
        for ns in {SYSTEM_NAMESPACE, self.namespace}:
            if self.cluster is not None and self.cluster.kubectl(
                    "get", "namespace", ns, check=False).returncode != 0:
                self.kubectl("namespaces", "create", "namespace", ns)
        # no controller-manager makes the "default" ServiceAccount, and the API server
        # refuses a Pod whose ServiceAccount does not exist
        with contextlib.suppress(kube.Conflict):
            self.client.create(SERVICE_ACCOUNTS, {
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": self.namespace}}, self.namespace)
        say(f"namespaces {SYSTEM_NAMESPACE} (the controller's) and {self.namespace} ready")

    def start_registry(self, n: int) -> None:
        step(n, "start the DMCR (docker-registry, CNCF distribution) on 127.0.0.1")
        try:
            self.registry = localregistry.start(os.path.join(self.work, "registry"))
        except RuntimeError as e:
            raise DemoError("DMCR (docker-registry)", str(e)) from e
        self._stack.callback(self.registry.stop)
        say(f"registry http://{self.registry.host}")

    def start_hub(self, n: int, name: str, src: str) -> None:
        """A local Hub serving the model directory ``src`` as repository ``name``."""
        step(n, f"start a local Hugging Face Hub serving {name}")
        try:
            self.hub = localhub.HubServer().start()
        except OSError as e:
            raise DemoError("local hub", f"cannot listen on loopback: {e}") from e
        self._stack.callback(self.hub.stop)
        repo = self.hub.add_repo(name, src)
        size = sum(f.size for f in repo.files.values())
        say(f"hub {self.hub.url}: {len(repo.files)} files, {mib(size)}, commit {repo.sha[:12]}")
        say(f"from {src}")

    def start_gateway(self, n: int) -> None:
        """The upload gateway, and the admin token the manager opens sessions with."""
        step(n, "start the upload gateway (modelcache-controller upload-gateway) on 127.0.0.1")
        root = os.path.join(self.work, "gateway")
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.gateway_token_file = os.path.join(root, "admin-token")
        fd = os.open(self.gateway_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        port = localcluster.free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "controller.main", "upload-gateway",
                "--listen", f"127.0.0.1:{port}", "--root", os.path.join(root, "sessions"),
                "--public-url", self.gateway_url, "--admin-token-file", self.gateway_token_file,
                "--insecure-registry", "--log-level", "INFO"]
        self.gateway = self._spawn(argv, self.gateway_log)
        _wait("upload gateway", "/readyz", lambda: _http_ok(f"{self.gateway_url}/readyz"),
              30, self.gateway, self.gateway_log)
        say(f"gateway {self.gateway_url}, pid {self.gateway.pid}, log {self.gateway_log}")

    def claim_dir(self, claim: str) -> str:
        """The directory a PVC ``claim`` of the demo's namespace stands for (no provisioner)."""
        return os.path.join(self.jobs_dir, "namespaces", self.namespace, "pvcs",
                            self.namespace, claim)

    def start_manager(self, n: int) -> None:
        assert self.cluster is not None and self.registry is not None and self.hub is not None
        step(n, "start the controller manager (embedded mode: Jobs run as local processes)")
        port, hook_port = localcluster.free_port(), localcluster.free_port()
        argv = [sys.executable, "-m", "controller.main", "manager",
                "--kubeconfig", self.cluster.kubeconfig, "--namespace", SYSTEM_NAMESPACE,
                "--registry", self.registry.host, "--registry-insecure",
                "--hf-endpoint", self.hub.url, "--listen", f"127.0.0.1:{port}",
                "--report-url", f"http://127.0.0.1:{port}", "--no-leader-elect",
                "--workers", "2", "--progress-interval", "0.5",
                "--embedded-jobs", self.jobs_dir, "--embedded-jobs-namespace", self.namespace,
                # the API server calls the webhook on loopback, registered by URL
                "--webhook-url", f"https://127.0.0.1:{hook_port}",
                "--webhook-listen", f"127.0.0.1:{hook_port}"]
        if self.gateway is not None:
            argv += ["--upload-gateway-url", self.gateway_url,
                     "--upload-admin-token-file", self.gateway_token_file,
                     "--upload-poll-interval", "0.5"]
        self.manager = self._spawn(argv, self.manager_log)

        _wait("controller manager", "/readyz", lambda: _http_ok(f"http://127.0.0.1:{port}/readyz"),
              60, self.manager, self.manager_log)
        say(f"manager pid {self.manager.pid}, health and metrics on 127.0.0.1:{port}, "
            f"log {self.manager_log}")
        # the API server picks a new configuration up a moment after it is written: until
        # it calls the webhook, an annotated workload would be stored unchanged
        _wait("admission webhook", "the API server calling the webhook", self._webhook_serving,
              30, self.manager, self.manager_log)
        say(f"admission webhook https://127.0.0.1:{hook_port}/mutate, registered as "
            f"MutatingWebhookConfiguration {WEBHOOK_CONFIG}")

    def _webhook_serving(self) -> bool:
        """A server-side dry run of a Pod asking for a model that does not exist: denied
        by the webhook once the API server calls it, admitted unchanged before."""
        assert self.cluster is not None
        probe = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "webhook-probe", "namespace": self.namespace,
                              "annotations": {contract.ANN_MODELS: "webhook-probe"}},
                 "spec": {"containers": [{"name": "c", "image": "probe"}]}}
        res = self.cluster.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-",
                                   input=json.dumps(probe), check=False)
        return res.returncode != 0 and "denied the request" in res.stderr

    def _spawn(self, argv: list[str], log_path: str) -> subprocess.Popen[bytes]:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    cwd=self.work,
                                    env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                        p for p in (localcluster.REPO_ROOT,
                                                    os.environ.get("PYTHONPATH")) if p)})
        self._stack.callback(localcluster.stop_process, proc, 20.0)
        return proc

    def start_node(self, n: int) -> None:
        assert self.registry is not None
        step(n, f"start the node plugin (modelcache-node) on unix://{self.node_socket}")
        os.makedirs(os.path.dirname(self.node_socket), exist_ok=True)
        argv = [sys.executable, "-m", "csi.main", "--endpoint", f"unix://{self.node_socket}",
                "--cache-dir", os.path.join(self.work, "node", "cache"), "--node-id", NODE_ID,
                "--insecure-registry", self.registry.host, "--log-format", "text"]
        assert self.cluster is not None
        # no kubelet registers this node: the Node object the plugin labels is ours
        with contextlib.suppress(kube.Conflict):
            self.client.create(kube.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": NODE_ID, "labels": {"kubernetes.io/hostname": NODE_ID}}})
        argv += ["--resolver", "kube", "--kubeconfig", self.cluster.kubeconfig]
        self.node = self._spawn(argv, self.node_log)
        channel = grpc.insecure_channel(f"unix://{self.node_socket}")
        self._stack.callback(channel.close)
        identity, self.csi = rpc.IdentityStub(channel), rpc.NodeStub(channel)

        def ready() -> bool:
            try:
                return bool(identity.Probe(pb.ProbeRequest(), timeout=1).ready.value)
            except grpc.RpcError:
                return False
        _wait("node plugin", "Probe ready", ready, 60, self.node, self.node_log)
        info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5)
        say(f"{info.name} {info.vendor_version}, node {NODE_ID}, pid {self.node.pid}, "
            f"log {self.node_log}")

    # -- supervision and teardown -----------------------------------------------

    def down(self) -> None:
        """Unmount, stop every process (last started first), remove the work dir."""
        self._stack.close()
        leftover = [m for m in _mounts_under(self.work)]
        for m in leftover:
            subprocess.run(["umount", "-l", m], check=False, capture_output=True)
        if leftover:
            print(f"modelcache demo: unmounted leftovers: {', '.join(leftover)}",
                  file=sys.stderr)
        shutil.rmtree(self.work, ignore_errors=True)

    def wait(self) -> None:
        """Keep everything running until SIGINT/SIGTERM or a component exits."""
        names = {id(self.manager): "controller manager", id(self.node): "node plugin",
                 id(self.gateway): "upload gateway"}
        if self.cluster is not None:
            names[id(self.cluster.etcd)] = "etcd"
            names[id(self.cluster.apiserver)] = "kube-apiserver"
        if self.registry is not None:
            names[id(self.registry.proc)] = "DMCR (docker-registry)"
        stop = threading.Event()
        with signals(lambda *_: stop.set()):
            while not stop.wait(0.5):
                for p in self.processes:
                    if p.poll() is not None:
                        print(f"modelcache demo: {names.get(id(p), 'a component')} exited with "
                              f"status {p.returncode}; stopping", file=sys.stderr)
                        return


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def _mounts_under(path: str) -> list[str]:
    real = os.path.realpath(path)
    return sorted((m.mount_point for m in mounts.read_mounts()
                   if m.mount_point.startswith(real + "/")), key=len, reverse=True)


@contextlib.contextmanager
def signals(handler: Any) -> Iterator[None]:
    """SIGTERM handled like SIGINT by ``handler`` for the block."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
