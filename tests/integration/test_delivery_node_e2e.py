"""Delivery end to end on one node: webhook injection -> API server -> kubelet's CSI call.

A Pod annotated ``modelcache.io/models: qwen`` goes through the webhook's
injection (``api.inject.mutate``, with the Model read from
the real API server as the webhook's lookup would), and the mutated Pod is
created in the real API server (which validates the inline CSI volume and
assigns the uid). Then the test plays kubelet (none runs here): for the
Pod's CSI volume it calls NodePublishVolume on the real plugin process
(``--resolver kube``, the node ServiceAccount of daemonset/node-rbac.yaml)
exactly as kubelet does for an inline volume: volume_id
``csi-<sha256(podUID + volume name)>``, target
``<root>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount``, readonly,
volume_context = the volume's volumeAttributes + the pod's identity
(podInfoOnMount). The files appear read-only and hash to the layer
digests; the same call with another namespace's pod identity is refused,
even when that namespace has a Model of the same name and the tree is in
the node's cache. Needs root (bind mounts).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import uuid
from typing import Any

import grpc
import pytest
from kubernetes import client

from api import inject
from api import names as contract
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as cf_
from tests import kubeenv, modelgen
from tests.integration.test_crds import install_crds
from tests.integration.test_csi_kube import (
    GROUP,
    VERSION,
    KubePlugin,
    assert_read_only_tree,
    call,
    publish,
    put_model,
)

kube = kubeenv.kube
pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

RUN = uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def cluster(kube: kubeenv.KubeEnv, registry, tmp_path_factory) -> dict[str, Any]:
    install_crds(kube)
    api = kube.api_client()
    core = client.CoreV1Api(api)
    ns_a, ns_b, ns_c = (f"e2e-{x}-{RUN}" for x in "abc")
    for ns in (ns_a, ns_b, ns_c):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        # no controller-manager here to make the "default" ServiceAccount pods need
        core.create_namespaced_service_account(
            ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default")))
    reg = RegistryClient(registry.host, insecure=True)
    crds = client.CustomObjectsApi(api)
    packs = {}
    for ns, seed in ((ns_a, 41), (ns_c, 42)):  # a "qwen" in A and another one in C
        src = str(tmp_path_factory.mktemp(f"qwen-{ns}"))
        modelgen.make_safetensors_model(src, family="qwen2", seed=seed)
        ref = f"{registry.host}/models/{ns}/qwen:v1"
        pack = pack_to_registry(src, reg, reference.parse(ref)).pack
        put_model(crds, ns, "qwen", ref, pack.digest)
        packs[ns] = pack
    kube.kubectl("apply", "-f", os.path.join(kubeenv.REPO_ROOT, "daemonset",
                                             "controller-namespace.yaml"))
    kube.kubectl("apply", "-f", os.path.join(kubeenv.REPO_ROOT, "daemonset", "node-rbac.yaml"))
    return {"api": api, "crds": crds, "core": core, "ns": (ns_a, ns_b, ns_c), "packs": packs,
            "kubeconfig": kube.serviceaccount_kubeconfig("modelcache-node",
                                                         "modelcache-system")}


@pytest.fixture
def plugin(tmp_path, registry, cluster):
    p = KubePlugin(str(tmp_path / "plugin"), cluster["kubeconfig"], [registry.host], [],
                   f"e2e-node-{RUN}")
    os.makedirs(p.workdir)
    p.start()
    yield p
    p.kill()
    cf_.unmount_everything_under(str(tmp_path))


def injected_pod(cluster: dict[str, Any], namespace: str) -> dict[str, Any]:
    """What the webhook makes of an annotated Pod, created in the API server."""
    crds = cluster["crds"]

    def lookup(ref: inject.Ref) -> dict[str, Any] | None:
        try:
            if ref.kind == "Model":
                return dict(crds.get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                              "models", ref.name))
            return dict(crds.get_cluster_custom_object(GROUP, VERSION, "clustermodels",
                                                       ref.name))
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"app-{uuid.uuid4().hex[:6]}", "namespace": namespace,
                        "annotations": {contract.ANN_MODELS: "qwen"}},
           "spec": {"containers": [{"name": "app", "image": "busybox"}]}}
    result = inject.mutate("Pod", pod, operation="CREATE", namespace=namespace, lookup=lookup)
    assert result.patch, "the webhook injected nothing"
    created = cluster["core"].create_namespaced_pod(namespace, result.obj)
    out = cluster["api"].sanitize_for_serialization(created)
    assert isinstance(out, dict)
    return out


def csi_volume(pod: dict[str, Any]) -> dict[str, Any]:
    vols = [v for v in pod["spec"]["volumes"]
            if (v.get("csi") or {}).get("driver") == contract.CSI_DRIVER]
    assert len(vols) == 1, pod["spec"]["volumes"]
    return vols[0]


def kubelet_publish(pods_root: str, pod: dict[str, Any], volume: dict[str, Any],
                    as_pod: dict[str, Any] | None = None) -> Any:
    """NodePublishVolume as kubelet builds it for an inline CSI volume of ``pod``
    (``as_pod``: the identity kubelet would pass, if another pod's)."""
    who = (as_pod or pod)["metadata"]
    uid, name = who["uid"], volume["name"]
    parent = os.path.join(pods_root, uid, "volumes", "kubernetes.io~csi", name)
    os.makedirs(parent, exist_ok=True)  # kubelet creates only the parent
    ctx = dict(volume["csi"].get("volumeAttributes") or {})
    ctx.update({"csi.storage.k8s.io/pod.name": who["name"],
                "csi.storage.k8s.io/pod.namespace": who["namespace"],
                "csi.storage.k8s.io/pod.uid": uid,
                "csi.storage.k8s.io/serviceAccount.name":
                    (as_pod or pod)["spec"].get("serviceAccountName") or "default",
                "csi.storage.k8s.io/ephemeral": "true"})
    return cf_.pb.NodePublishVolumeRequest(
        volume_id="csi-" + hashlib.sha256((uid + name).encode()).hexdigest(),
        target_path=os.path.join(parent, "mount"),
        volume_capability=cf_.volume_capability(),
        readonly=bool(volume["csi"].get("readOnly", True)), volume_context=ctx)


def test_injected_pod_gets_its_model_and_no_other_namespace_does(plugin, cluster, tmp_path):
    ns_a, ns_b, ns_c = cluster["ns"]
    pack = cluster["packs"][ns_a]
    pods_root = str(tmp_path / "kubelet" / "pods")
    pod = injected_pod(cluster, ns_a)
    volume = csi_volume(pod)
    assert volume["csi"]["readOnly"] is True
    assert volume["csi"]["volumeAttributes"] == {contract.ATTR_MODEL: "qwen",
                                                 contract.ATTR_DIGEST: pack.digest}
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"]
                 if m["name"] == volume["name"])
    assert mount == {"name": volume["name"], "mountPath": f"{contract.MOUNT_ROOT}/qwen",
                     "readOnly": True}
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert json.loads(env[contract.ENV_MODELS])[0]["digest"] == pack.digest

    node = plugin.node()
    req = kubelet_publish(pods_root, pod, volume)
    assert publish(node, req) == (grpc.StatusCode.OK, "")
    assert_read_only_tree(pack, req.target_path)  # every file hashes to its layer digest
    assert call(node, req)[0] == grpc.StatusCode.OK  # kubelet's retry: idempotent

    # the same volume, as kubelet would send it for a pod of namespace B (no qwen there)
    other = copy.deepcopy(pod)
    other["metadata"].update(namespace=ns_b, uid=str(uuid.uuid4()))
    code, details = publish(node, kubelet_publish(pods_root, pod, volume, as_pod=other))
    assert code == grpc.StatusCode.NOT_FOUND and ns_b in details
    # ... and for a pod of namespace C, which has its own "qwen": A's pinned digest is
    # not in C's repository, although A's tree sits in this node's cache
    other["metadata"].update(namespace=ns_c, uid=str(uuid.uuid4()))
    req_c = kubelet_publish(pods_root, pod, volume, as_pod=other)
    code, details = publish(node, req_c)
    assert code == grpc.StatusCode.NOT_FOUND and "own repository" in details
    assert not os.path.exists(req_c.target_path)

    # C's own injected pod gets C's model
    pod_c = injected_pod(cluster, ns_c)
    req_c = kubelet_publish(pods_root, pod_c, csi_volume(pod_c))
    assert publish(node, req_c)[0] == grpc.StatusCode.OK
    assert_read_only_tree(cluster["packs"][ns_c], req_c.target_path)
    for r in (req, req_c):
        node.NodeUnpublishVolume(cf_.unpublish_request(r.volume_id, r.target_path), timeout=30)
        assert not os.path.exists(r.target_path)
