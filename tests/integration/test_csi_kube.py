"""NodeCache's Kubernetes side against a real API server, registry and mounts.

The real plugin process (``python -m csi.main --resolver kube``) runs with
the node plugin's own ServiceAccount token, bound by the ClusterRole of
daemonset/node-rbac.yaml (so the manifest's RBAC is what is tested), and
serves NodePublishVolume over a real gRPC unix socket with the
volume_context kubelet sends for an inline volume (podInfoOnMount).
Models and ClusterModels are created through the API with their status set
through the status subresource, standing in for the controller, and point
at ModelPacks pushed to the real registry. Nodes are created as API
objects (no kubelet runs here); their labels are what the plugin patches
and what prefetch selects on. Needs root (bind mounts).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
import uuid
from typing import Any

import grpc
import pytest
from kubernetes import client

from csi import mounts
from modelpack import pull as mpull
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as cf_
from tests import kubeenv, modelgen
from tests.integration import test_csi_node
from tests.integration.test_crds import install_crds

kube = kubeenv.kube
targets = test_csi_node.targets  # a per-test pods dir, unmounted after
pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

GROUP, VERSION = "modelcache.io", "v1alpha1"
MANIFESTS = os.path.join(kubeenv.REPO_ROOT, "daemonset")
TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"
SECRET_TOKEN = "tok-" + uuid.uuid4().hex  # must never reach a log line
RUN = uuid.uuid4().hex[:6]


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(kube: kubeenv.KubeEnv) -> Any:
    install_crds(kube)
    return kube.api_client()


@pytest.fixture(scope="module")
def crd_api(api: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture(scope="module")
def node_kubeconfig(kube: kubeenv.KubeEnv, api: Any) -> str:
    """A kubeconfig holding only what daemonset/node-rbac.yaml grants the plugin."""
    kube.kubectl("apply", "-f", os.path.join(MANIFESTS, "controller-namespace.yaml"))
    kube.kubectl("apply", "-f", os.path.join(MANIFESTS, "node-rbac.yaml"))
    return kube.serviceaccount_kubeconfig("modelcache-node", "modelcache-system")


@pytest.fixture(scope="module")
def namespaces(api: Any) -> tuple[str, str]:
    core = client.CoreV1Api(api)
    names = (f"team-a-{RUN}", f"team-b-{RUN}")
    for n in names:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=n)))
    return names


@pytest.fixture(scope="module")
def packs(registry, namespaces, tmp_path_factory) -> dict[str, tuple[str, Any]]:
    """name -> (pushed reference, ModelPack); repositories follow the controller's layout."""
    ns_a, ns_b = namespaces
    reg = RegistryClient(registry.host, insecure=True)
    specs = {
        "small": (ns_a, "small", "v1", lambda d: modelgen.make_safetensors_model(d, seed=11)),
        "v1": (ns_a, "versions", "v1", lambda d: modelgen.make_safetensors_model(d, seed=12)),
        "v2": (ns_a, "versions", "v2", lambda d: modelgen.make_safetensors_model(d, seed=13)),
        "only-b": (ns_b, "only-b", "v1", lambda d: modelgen.make_safetensors_model(d, seed=14)),
        "shared": ("cluster", "shared", "v1", lambda d: modelgen.make_safetensors_model(d, seed=15)),
        "late": (ns_a, "late", "v1", lambda d: modelgen.make_safetensors_model(d, seed=16)),
        "pf": (ns_a, "pf", "v1", lambda d: modelgen.make_big_model(d, files=2, total=2 << 20,
                                                                  seed=17)),
        "e1": (ns_a, "e1", "v1", lambda d: modelgen.make_big_model(d, files=2, total=4 << 20,
                                                                  seed=18)),
        "e2": (ns_a, "e2", "v1", lambda d: modelgen.make_big_model(d, files=2, total=4 << 20,
                                                                  seed=19)),
        "e3": (ns_a, "e3", "v1", lambda d: modelgen.make_big_model(d, files=2, total=4 << 20,
                                                                  seed=20)),
    }
    out = {}
    for key, (ns, repo, tag, make) in specs.items():
        src = str(tmp_path_factory.mktemp(f"src-{key}"))
        make(src)
        ref = f"{registry.host}/models/{ns}/{repo}:{tag}"
        out[key] = (ref, pack_to_registry(src, reg, reference.parse(ref)).pack)
    return out


def put_model(crds: client.CustomObjectsApi, namespace: str | None, name: str,
              ref: str | None, digest: str | None, *, phase: str = "Ready",
              node_cache: dict[str, Any] | None = None) -> None:
    """Create a Model (namespace given) or ClusterModel and set its status, as the
    controller would after a publish."""
    kind = "Model" if namespace else "ClusterModel"
    spec: dict[str, Any] = {"source": {"huggingFace": {"repo": f"org/{name}"}}}
    if node_cache is not None:
        spec["delivery"] = {"nodeCache": node_cache}
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind,
            "metadata": {"name": name, **({"namespace": namespace} if namespace else {})},
            "spec": spec}
    status: dict[str, Any] = {"phase": phase}
    if ref and digest:
        status["artifact"] = {"digest": digest, "reference": ref, "sizeBytes": 1}
    if namespace:
        crds.create_namespaced_custom_object(GROUP, VERSION, namespace, "models", body)
        crds.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "models", name,
                                                   {"status": status})
    else:
        crds.create_cluster_custom_object(GROUP, VERSION, "clustermodels", body)
        crds.patch_cluster_custom_object_status(GROUP, VERSION, "clustermodels", name,
                                                {"status": status})


def model_of(crds, namespace, name, packs, key, **kw) -> None:
    ref, pack = packs[key]
    put_model(crds, namespace, name, ref, pack.digest, **kw)


@pytest.fixture(scope="module")
def models(crd_api, namespaces, packs) -> dict[str, str]:
    ns_a, ns_b = namespaces
    model_of(crd_api, ns_a, "small", packs, "small")
    model_of(crd_api, ns_a, "versions", packs, "v2")  # the current version is v2
    model_of(crd_api, ns_b, "only-b", packs, "only-b")
    for e in ("e1", "e2", "e3"):
        model_of(crd_api, ns_a, e, packs, e)
    shared = f"shared-{RUN}"
    model_of(crd_api, None, shared, packs, "shared")
    return {"shared": shared}


def make_node(api: Any, name: str, labels: dict[str, str]) -> None:
    client.CoreV1Api(api).create_node(client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels=labels)))


def node_labels(api: Any, name: str) -> dict[str, str]:
    return dict(client.CoreV1Api(api).read_node(name).metadata.labels or {})


class KubePlugin(cf_.PluginProcess):
    """The plugin with the Kubernetes resolver instead of a models file."""

    def __init__(self, workdir: str, kubeconfig: str, insecure: list[str],
                 extra: list[str], node_id: str) -> None:
        super().__init__(workdir, os.path.join(workdir, "cache"), "", insecure, extra, node_id)
        self.kubeconfig = kubeconfig

    def argv(self) -> list[str]:
        args = super().argv()
        i = args.index("--models-file")
        del args[i:i + 2]
        return args + ["--resolver", "kube", "--kubeconfig", self.kubeconfig]

    def inventory(self) -> set[str]:
        try:
            with open(os.path.join(self.cache_dir, "inventory.json")) as f:
                return {m["digest"] for m in json.load(f)["models"]}
        except FileNotFoundError:
            return set()


@pytest.fixture
def plugin_factory(tmp_path, registry, node_kubeconfig, models):
    made: list[KubePlugin] = []

    def make(node_id: str = "", extra: list[str] | None = None,
             kubeconfig: str | None = None) -> KubePlugin:
        work = tmp_path / f"plugin{len(made)}"
        work.mkdir()
        p = KubePlugin(str(work), kubeconfig or node_kubeconfig, [registry.host],
                       extra or [], node_id or f"node-{uuid.uuid4().hex[:6]}")
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.kill()
    cf_.unmount_everything_under(str(tmp_path))


# -- kubelet's side --------------------------------------------------------------------


def kubelet_request(base: str, namespace: str, attributes: dict[str, str],
                    extra: dict[str, str] | None = None) -> Any:
    """NodePublishVolume as kubelet sends it for a CSI inline volume: a volume_id and a
    target unique per pod, the pod's identity (podInfoOnMount) and the attributes."""
    uid = str(uuid.uuid4())
    volume_id = f"csi-{uid}"
    parent = os.path.join(base, uid, "volumes", "kubernetes.io~csi", "model")
    os.makedirs(parent)  # kubelet creates only the parent
    ctx = {"csi.storage.k8s.io/pod.name": f"pod-{uid[:8]}",
           "csi.storage.k8s.io/pod.namespace": namespace,
           "csi.storage.k8s.io/pod.uid": uid,
           "csi.storage.k8s.io/serviceAccount.name": "default",
           "csi.storage.k8s.io/ephemeral": "true", **attributes, **(extra or {})}
    return cf_.pb.NodePublishVolumeRequest(
        volume_id=volume_id, target_path=os.path.join(parent, "mount"),
        volume_capability=cf_.volume_capability(), readonly=True, volume_context=ctx)


def call(node: Any, req: Any) -> tuple[grpc.StatusCode, str]:
    try:
        node.NodePublishVolume(req, timeout=60)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


def publish(node: Any, req: Any, timeout: float = 45) -> tuple[grpc.StatusCode, str]:
    """Call until a final answer, as kubelet retries UNAVAILABLE and ABORTED."""
    deadline = time.monotonic() + timeout
    while True:
        code, details = call(node, req)
        if code not in RETRIED or time.monotonic() > deadline:
            return code, details
        time.sleep(0.2)


def unpublish(node: Any, req: Any) -> None:
    node.NodeUnpublishVolume(cf_.unpublish_request(req.volume_id, req.target_path), timeout=30)


def assert_read_only_tree(pack: Any, target: str) -> None:
    mpull.verify_tree(pack, target)
    top = mounts.mounts_at(target)
    assert top and top[-1].read_only
    with pytest.raises(OSError):
        open(os.path.join(target, "new-file"), "w")


def wait_for(predicate, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# -- resolution ------------------------------------------------------------------------


def test_model_is_found_only_in_the_pods_namespace(plugin_factory, targets, namespaces,
                                                   packs, node_kubeconfig):
    ns_a, ns_b = namespaces
    p = plugin_factory()
    node = p.node()
    req = kubelet_request(targets, ns_a, {"model": "small"}, {TOKENS_KEY: SECRET_TOKEN})
    assert publish(node, req) == (grpc.StatusCode.OK, "")
    assert_read_only_tree(packs["small"][1], req.target_path)
    # kubelet retrying the same call: idempotent
    assert call(node, req)[0] == grpc.StatusCode.OK
    unpublish(node, req)

    # the same attributes from a pod of another namespace: no such Model there
    code, details = publish(node, kubelet_request(targets, ns_b, {"model": "small"}))
    assert code == grpc.StatusCode.NOT_FOUND and ns_b in details
    # a Model that exists, but in another namespace, is NOT_FOUND too
    code, details = publish(node, kubelet_request(targets, ns_a, {"model": "only-b"}))
    assert code == grpc.StatusCode.NOT_FOUND and ns_a in details
    # ... and served in its own
    req_b = kubelet_request(targets, ns_b, {"model": "only-b"})
    assert publish(node, req_b)[0] == grpc.StatusCode.OK
    assert_read_only_tree(packs["only-b"][1], req_b.target_path)

    log_text = open(p.log_path).read()
    assert SECRET_TOKEN not in log_text
    with open(node_kubeconfig) as f:
        sa_token = json.load(f)["users"][0]["user"]["token"]
    assert sa_token not in log_text
    assert "listed" in log_text  # the informers ran with the ServiceAccount's RBAC


def test_not_ready_is_unavailable_until_ready(plugin_factory, targets, namespaces, packs,
                                              crd_api):
    ns_a, _ = namespaces
    put_model(crd_api, ns_a, "late", None, None, phase="Publishing")
    p = plugin_factory()
    node = p.node()
    req = kubelet_request(targets, ns_a, {"model": "late"})
    code, details = publish(node, req, timeout=3)  # retried: stays UNAVAILABLE
    assert code == grpc.StatusCode.UNAVAILABLE and "not ready" in details
    assert "Publishing" in details
    ref, pack = packs["late"]
    crd_api.patch_namespaced_custom_object_status(GROUP, VERSION, ns_a, "models", "late", {
        "status": {"phase": "Ready", "artifact": {"digest": pack.digest, "reference": ref}}})
    # kubelet's next retry succeeds: the watch brought the Ready status
    assert publish(node, req, timeout=20) == (grpc.StatusCode.OK, "")
    assert_read_only_tree(pack, req.target_path)


def test_cluster_model_from_any_namespace(plugin_factory, targets, namespaces, packs, models):
    p = plugin_factory()
    node = p.node()
    for ns in namespaces:
        req = kubelet_request(targets, ns, {"clusterModel": models["shared"]})
        assert publish(node, req) == (grpc.StatusCode.OK, "")
        assert_read_only_tree(packs["shared"][1], req.target_path)
    code, _ = publish(node, kubelet_request(targets, namespaces[0],
                                            {"clusterModel": "no-such-" + RUN}))
    assert code == grpc.StatusCode.NOT_FOUND


def test_pinned_digest_stays_in_the_models_repository(plugin_factory, targets, namespaces,
                                                      packs):
    ns_a, ns_b = namespaces
    p = plugin_factory()
    node = p.node()
    # the Model is at v2 now; a pod admitted at v1 keeps v1
    v1 = packs["v1"][1]
    req = kubelet_request(targets, ns_a, {"model": "versions", "digest": v1.digest})
    assert publish(node, req) == (grpc.StatusCode.OK, "")
    assert_read_only_tree(v1, req.target_path)
    req = kubelet_request(targets, ns_a, {"model": "versions"})
    assert publish(node, req)[0] == grpc.StatusCode.OK
    assert_read_only_tree(packs["v2"][1], req.target_path)

    # namespace B's model is in this node's cache (a pod of B mounted it) ...
    other = packs["only-b"][1]
    assert publish(node, kubelet_request(targets, ns_b, {"model": "only-b"}))[0] == \
        grpc.StatusCode.OK
    assert other.digest in p.inventory()
    # ... yet a pod of A pinning that digest on its own Model is refused
    req = kubelet_request(targets, ns_a, {"model": "versions", "digest": other.digest})
    code, details = publish(node, req)
    assert code == grpc.StatusCode.NOT_FOUND and "own repository" in details
    assert not os.path.exists(req.target_path)


# -- API server down ---------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP relay to the API server that can be cut and brought back."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = kubeenv.free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.start()

    def start(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                down, _ = ls.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self._conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._listener is not None:
            try:  # wakes the accept() blocked in its thread (close alone would not)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._conns.clear()


def test_api_server_down_serves_fresh_answers_then_unavailable(
        plugin_factory, targets, namespaces, packs, kube, node_kubeconfig):
    ns_a, _ = namespaces
    proxy = TcpProxy(int(kube.server.rsplit(":", 1)[1]))
    try:
        with open(node_kubeconfig) as f:
            token = json.load(f)["users"][0]["user"]["token"]
        kc = kubeenv.write_kubeconfig(os.path.join(kube.dir, f"kc-proxy-{RUN}"),
                                      f"https://127.0.0.1:{proxy.port}", kube.pki.ca,
                                      {"token": token})
        p = plugin_factory(kubeconfig=kc, extra=["--kube-max-stale", "4s",
                                                 "--no-node-labels", "--no-prefetch"])
        node = p.node()
        assert publish(node, kubelet_request(targets, ns_a, {"model": "small"}))[0] == \
            grpc.StatusCode.OK
        proxy.stop()
        cut = time.monotonic()
        # fresh enough: the watched answer still serves a new pod
        req = kubelet_request(targets, ns_a, {"model": "small"})
        assert call(node, req)[0] == grpc.StatusCode.OK
        assert_read_only_tree(packs["small"][1], req.target_path)
        # a name the cache does not hold cannot be confirmed absent: retryable, not final
        code, details = call(node, kubelet_request(targets, ns_a, {"model": "unknown"}))
        assert code == grpc.StatusCode.UNAVAILABLE and "cannot ask the API server" in details
        # past --kube-max-stale: every answer is UNAVAILABLE (kubelet keeps retrying)
        time.sleep(max(0.0, 5.0 - (time.monotonic() - cut)))
        req = kubelet_request(targets, ns_a, {"model": "small"})
        code, details = call(node, req)
        assert code == grpc.StatusCode.UNAVAILABLE and "unreachable" in details
        # the API server is back: the watch reconnects and the same call succeeds
        proxy.start()
        assert publish(node, req, timeout=60)[0] == grpc.StatusCode.OK
    finally:
        proxy.stop()


# -- node labels -----------------------------------------------------------------------


def test_node_labels_follow_the_cache(plugin_factory, targets, namespaces, packs, api):
    ns_a, _ = namespaces
    name = f"node-labels-{RUN}"
    stale = "nodecache.modelcache.io/sha256-" + "0" * 40
    make_node(api, name, {"team": "ml", stale: "true", "nodecache.modelcache.io/pool": "x"})
    # capacity for two of the 4 MiB models: a third pull evicts the idle one
    p = plugin_factory(node_id=name, extra=["--cache-capacity", "10Mi", "--high-watermark",
                                            "0.9", "--low-watermark", "0.5"])
    node = p.node()
    # the full reconcile at start removes a label no tree backs; others are untouched
    wait_for(lambda: stale not in node_labels(api, name), what="the stale label removed")
    labels = node_labels(api, name)
    assert labels["team"] == "ml" and labels["nodecache.modelcache.io/pool"] == "x"

    def label(key: str) -> str:
        return "nodecache.modelcache.io/sha256-" + packs[key][1].digest[7:47]

    r1 = kubelet_request(targets, ns_a, {"model": "e1"})
    assert publish(node, r1)[0] == grpc.StatusCode.OK
    wait_for(lambda: node_labels(api, name).get(label("e1")) == "true", what="e1's label")
    unpublish(node, r1)  # e1 is idle now
    time.sleep(0.05)  # e1 strictly older in LRU order
    r2 = kubelet_request(targets, ns_a, {"model": "e2"})
    assert publish(node, r2)[0] == grpc.StatusCode.OK  # stays mounted
    r3 = kubelet_request(targets, ns_a, {"model": "e3"})
    assert publish(node, r3)[0] == grpc.StatusCode.OK  # evicts e1
    assert packs["e1"][1].digest not in p.inventory()
    wait_for(lambda: label("e1") not in node_labels(api, name), what="e1's label removed")
    labels = node_labels(api, name)
    assert labels.get(label("e2")) == labels.get(label("e3")) == "true"
    assert labels["team"] == "ml"
    ours = [k for k in labels if k.startswith("nodecache.modelcache.io/sha256-")]
    assert sorted(ours) == sorted([label("e2"), label("e3")])


# -- prefetch --------------------------------------------------------------------------


def metric(port: int, line_prefix: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    for line in body.decode().splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_prefetch_pulls_onto_matching_nodes_only(plugin_factory, namespaces, packs, api,
                                                 crd_api):
    ns_a, _ = namespaces
    gpu, cpu = f"gpu-{RUN}", f"cpu-{RUN}"
    make_node(api, gpu, {"accelerator": "h100"})
    make_node(api, cpu, {"accelerator": "none"})
    port = kubeenv.free_port()
    p_gpu = plugin_factory(node_id=gpu, extra=["--metrics-address", f"127.0.0.1:{port}"])
    p_cpu = plugin_factory(node_id=cpu)
    ref, pack = packs["pf"]
    put_model(crd_api, ns_a, "pf", ref, pack.digest,
              node_cache={"prefetch": {"nodeSelector": {"accelerator": "h100"}}})

    wait_for(lambda: pack.digest in p_gpu.inventory(), what="prefetch on the gpu node")
    mpull.verify_tree(pack, os.path.join(p_gpu.cache_dir, "models", pack.digest[7:]))
    # nothing was mounted: the tree is cached, not published
    assert not [m for m in mounts.read_mounts() if pack.digest[7:] in m.root]
    # the cache labels follow, so the webhook can prefer this node
    label = "nodecache.modelcache.io/sha256-" + pack.digest[7:47]
    wait_for(lambda: node_labels(api, gpu).get(label) == "true", what="the prefetch label")
    assert metric(port, 'modelcache_node_prefetch_total{result="pulled"}') == 1.0
    assert metric(port, "modelcache_node_prefetch_pending ") == 0.0
    # the other node does not match: nothing pulled there
    time.sleep(1.5)
    assert pack.digest not in p_cpu.inventory()
    assert label not in node_labels(api, cpu)

    # relabel the cpu node: its plugin sees its Node change and prefetches too
    client.CoreV1Api(api).patch_node(cpu, {"metadata": {"labels": {"accelerator": "h100"}}})
    wait_for(lambda: pack.digest in p_cpu.inventory(), what="prefetch after relabelling")
    assert "prefetched" in open(p_cpu.log_path).read()

