"""Chaos: the node plugin, the manager and publish workers SIGKILLed while models that
share layers are published and mounted; afterwards nothing wrong is visible.

Everything is the real program on loopback: etcd + kube-apiserver (a cluster
of its own: the manager takes on every Model of a cluster, and this test
kills it), the DMCR (the suite's docker-registry), the manager
(``modelcache-controller manager --embedded-jobs``: its publish Jobs run as
local processes, controller/embedded/jobrunner.py, with a work PVC so a retry
can resume), and the node plugin (``modelcache-node --resolver kube`` with the
node ServiceAccount of daemonset/node-rbac.yaml, its cache on a loop XFS),
called over its unix socket as kubelet calls it (tests/chaosrig.py). The
source is the local Hugging Face Hub at a bounded rate; the node pulls through
a rate-bounded proxy, so kills land inside transfers.

Four Models share layers: the same config.json and tokenizer.json, one weight
shard (under two different paths), plus a shard of their own. A seeded
schedule (``MODELCACHE_CHAOS_SEED``, else random; printed first) applies the
Models, starts pods (several per model; a pod's volume is published once its
Model was seen Ready, as the scheduling gate makes it, pinned to the digest
when the Model was Ready at admission, as the webhook pins it) and SIGKILLs
4-8 times the node plugin, the manager (both started again at once) or a
publish worker (the Job's retry starts another; at most two per model, within
the default backoffLimit). The seed replays the schedule, not the exact
interleaving with the processes.

Afterwards, with bounded waits: every Model is Ready; every target is one
read-only bind mount showing exactly the files of its model's manifest (read
from the registry by digest), each hashing to its layer digest; no answer
kubelet takes as final was given; no ``.part``/``.lock``/temp file or hidden
temp tree is left in the node cache, no publish worker is left running, no
work claim directory or emptyDir is left by the Job runner; unpublishing
everything leaves no mount and no tainted tree. Needs root (mounts, loop XFS).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from api import names as contract
from cli.local import cluster as localcluster
from csi import mounts
from csi.stubs import pb, rpc
from kube import client as k
from modelpack.oci import manifest as mf
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from tests import chaosrig, loopfs, modelgen
from tests.csi_fixtures import Proxy, unmount_everything_under
from tests.integration.test_controller import install_crds

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SEED_ENV = "MODELCACHE_CHAOS_SEED"
SYSTEM_NS = "modelcache-system"  # the node ServiceAccount's namespace (node-rbac.yaml)
NODE = "chaos-node"
MODELS = ("m0", "m1", "m2", "m3")
SHARED = 3 << 20  # the shard every model has
OWN = 3 << 19  # each model's own shard
HUB_RATE = 3 << 19  # bytes/s per source response: a publish lasts seconds
PULL_RATE = 6 << 20  # bytes/s per registry response the node pulls through
CHAOS_WINDOW = 16.0  # kills happen within this many seconds of the start
RECOVERY = 90.0  # the longest the system may take to converge afterwards
WORKER_KILLS_PER_MODEL = 2  # the publish Job's backoffLimit is 3


def _say(text: str) -> None:
    print(f"chaos: {text}", flush=True)


def wait_until(what: str, check: Callable[[], Any], timeout: float, seed: int,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"[seed {seed}] {what}: not within {timeout:.0f} s; last: {last!r}")


# -- the models ---------------------------------------------------------------------


def model_files(tmp: str) -> dict[str, dict[str, bytes]]:
    """name -> {path: bytes}: shared config, tokenizer and shard, plus a shard of its own."""
    def shard(seed: int, size: int) -> bytes:
        path = os.path.join(tmp, f"shard-{seed}.safetensors")
        modelgen.write_big_safetensors(path, size, seed=seed)
        with open(path, "rb") as f:
            return f.read()

    config = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                         "torch_dtype": "float16"}).encode()
    tokenizer = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}
                           ).encode()
    shared = shard(1, SHARED)
    out = {}
    for i, name in enumerate(MODELS):
        files = {"config.json": config, "tokenizer.json": tokenizer}
        if name == "m3":  # the shared shard under another path, in a subdirectory
            files["weights/base.safetensors"] = shared
            files["weights/adapter.safetensors"] = shard(100 + i, OWN)
        else:
            files["model-00001-of-00002.safetensors"] = shared
            files["model-00002-of-00002.safetensors"] = shard(100 + i, OWN)
        out[name] = files
    return out


def model_body(name: str, ns: str) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"source": {"huggingFace": {"repo": f"chaos/{name}"}}}}


def status_of(client: k.Kube, ns: str, name: str) -> dict[str, Any]:
    try:
        return dict(client.get(k.MODELS, name, ns).get("status") or {})
    except k.NotFound:
        return {}


# -- the pods, as kubelet sees them -----------------------------------------------------


@dataclass
class Pod:
    model: str
    name: str
    uid: str
    start_after: float  # seconds after its Model was seen Ready
    pinned: str = ""  # the digest the webhook pinned, if the Model was Ready at admission
    target: str = ""
    volume_id: str = ""
    done: bool = False
    error: str = ""

    def request(self, ns: str, pods_root: str) -> Any:
        parent = os.path.join(pods_root, self.uid, "volumes", "kubernetes.io~csi", "model")
        os.makedirs(parent, exist_ok=True)  # kubelet makes only the parent
        self.target = os.path.join(parent, "mount")
        self.volume_id = "csi-" + hashlib.sha256(f"{self.uid}/model".encode()).hexdigest()[:40]
        attrs = {contract.ATTR_MODEL: self.model}
        if self.pinned:
            attrs[contract.ATTR_DIGEST] = self.pinned
        ctx = {**attrs, "csi.storage.k8s.io/pod.name": self.name,
               "csi.storage.k8s.io/pod.namespace": ns, "csi.storage.k8s.io/pod.uid": self.uid,
               "csi.storage.k8s.io/serviceAccount.name": "default",
               "csi.storage.k8s.io/ephemeral": "true"}
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY))
        cap.mount.SetInParent()
        return pb.NodePublishVolumeRequest(volume_id=self.volume_id, target_path=self.target,
                                           volume_capability=cap, readonly=True,
                                           volume_context=ctx)


# -- the system -------------------------------------------------------------------------


@dataclass
class System:
    seed: int
    work: str
    ns: str
    client: k.Kube
    registry: Any
    manager: chaosrig.Program
    node: chaosrig.Program
    kubelet: chaosrig.Kubelet
    jobs_root: str
    cache: str
    pods_root: str


def _http_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            return False
    return ready


def _probe_ready(socket: str) -> Callable[[], bool]:
    def ready() -> bool:
        channel = grpc.insecure_channel(f"unix://{socket}")
        try:
            return bool(rpc.IdentityStub(channel).Probe(pb.ProbeRequest(), timeout=1)
                        .ready.value)
        except grpc.RpcError:
            return False
        finally:
            channel.close()
    return ready


def _stop_all(manager: chaosrig.Program, node: chaosrig.Program, jobs_root: str) -> None:
    """Nothing of the system left running: the manager, the plugin, every publish worker."""
    manager.kill()  # SIGKILL: a SIGTERM waits out the workers' grace here
    node.kill(__import__("signal").SIGTERM)
    for pid in chaosrig.publish_workers(jobs_root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@contextlib.contextmanager
def system(seed: int, work: str, registry: Any, sources: dict[str, dict[str, bytes]]
           ) -> Iterator[System]:
    with contextlib.ExitStack() as stack:
        cluster = localcluster.start(os.path.join(work, "kube"))
        stack.callback(cluster.stop)
        install_crds(cluster)
        client = k.Kube.from_config(cluster.kubeconfig)
        stack.callback(client.close)
        ns = "chaos"
        for n in (ns, SYSTEM_NS):
            with contextlib.suppress(k.Conflict):
                client.create(k.Resource("", "v1", "namespaces", False),
                              {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}})
        manifests = os.path.join(localcluster.REPO_ROOT, "daemonset")
        cluster.kubectl("apply", "-f", os.path.join(manifests, "node-rbac.yaml"))
        node_kubeconfig = cluster.serviceaccount_kubeconfig("modelcache-node", SYSTEM_NS)
        client.create(k.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": NODE, "labels": {"kubernetes.io/hostname": NODE}}})

        hub = chaosrig.SlowHub(HUB_RATE).start()
        stack.callback(hub.stop)
        for name, files in sources.items():
            hub.add_repo(f"chaos/{name}", files=files)
        proxy = Proxy(registry.host)
        proxy.rate = PULL_RATE
        stack.callback(proxy.stop)

        cache_fs = stack.enter_context(loopfs.loop_mount("xfs"))
        cache = os.path.join(cache_fs, "cache")
        pods_root = os.path.join(work, "kubelet", "pods")
        os.makedirs(pods_root)
        stack.callback(unmount_everything_under, work)
        stack.callback(unmount_everything_under, cache_fs)

        jobs_root = os.path.join(work, "jobs")
        port = localcluster.free_port()
        py = [sys.executable, "-m"]
        manager = chaosrig.Program("manager", py + [
            "controller.main", "manager", "--kubeconfig", cluster.kubeconfig,
            "--namespace", SYSTEM_NS, "--registry", registry.host, "--registry-insecure",
            "--hf-endpoint", hub.url, "--listen", f"127.0.0.1:{port}",
            "--report-url", f"http://127.0.0.1:{port}", "--no-leader-elect",
            "--workers", "4", "--progress-interval", "0.5",
            "--publish-work-size", "1Gi", "--publish-work-storage-class", "local",
            "--embedded-jobs", jobs_root],
            os.path.join(work, "manager.log"), REPO_ROOT,
            _http_ready(f"http://127.0.0.1:{port}/readyz"),
            # kept in a Secret in a cluster: a restarted manager accepts its workers' reports
            env={"MODELCACHE_REPORT_KEY": "chaos"})
        socket = os.path.join(work, "node", "csi.sock")
        os.makedirs(os.path.dirname(socket))
        node = chaosrig.Program("node plugin", py + [
            "csi.main", "--endpoint", f"unix://{socket}", "--cache-dir", cache,
            "--node-id", NODE, "--resolver", "kube", "--kubeconfig", node_kubeconfig,
            "--insecure-registry", registry.host, "--insecure-registry", proxy.host,
            "--pull-via", f"{registry.host}={proxy.host}", "--log-format", "text"],
            os.path.join(work, "node", "node.log"), REPO_ROOT, _probe_ready(socket))
        stack.callback(_stop_all, manager, node, jobs_root)
        manager.start()
        node.start()
        yield System(seed, work, ns, client, registry, manager, node,
                     chaosrig.Kubelet(socket), jobs_root, cache, pods_root)


REPO_ROOT = localcluster.REPO_ROOT
