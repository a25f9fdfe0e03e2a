"""SharedPVC delivery against a real API server and a real registry.

``modelcache-controller manager`` runs as a subprocess; Models are really
published (the HF test hub, publish Jobs run by the FAKE kubelet of the
controller namespace). Workloads are produced as the webhook would make them
(``api.inject.mutate``). A second FAKE kubelet runs the Jobs
of the workload namespace, the materializer among them, mapping each PVC to
a directory (``FakeKubelet.claim_dir``). Nothing else runs: the test plays
the garbage collector (a deleted Job's pods) and the pvc-protection
controller (the finalizer of a deleted, unused PVC) where it needs them.

Acceptance: two workloads of one model → one PVC (RWX, the model's storage
class, artifact size + headroom) and one materializer Job; the tree under
the PVC's subPath is byte-identical to the model and verifies against its
manifest; the PVC gets ``ANN_PVC_MATERIALIZED``; with both workloads gone,
after the grace period, the PVC and the Job are deleted. Another model →
another PVC (the default storage class). A corrupt blob → a Warning Event on
the PVC and a retry with backoff that succeeds once the blob is repaired.
A restarted manager adopts its PVC and Job.
"""

from __future__ import annotations

import base64
import copy
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api import inject
from api import names as contract
from controller.delivery import sharedpvc
from kube import client as k
from modelpack import pull
from modelpack.oci import reference
from tests import kubeenv, modelgen
from tests.fake_kubelet import FakeKubelet
from tests.integration.test_controller import (
    REPO_ROOT,
    SYSTEM_NS,
    ManagerProcess,
    ensure_namespace,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import kubelet as kubelet
from tests.servers.helpers import same_tree

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube

GRACE = 3.0
DEFAULT_CLASS = "rwx-default"
PVC_PROTECTION = "kubernetes.io/pvc-protection"


@pytest.fixture(scope="module")
def namespace(cluster: k.Kube) -> str:
    ns = f"spvc-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, ns)
    return ns


@pytest.fixture(scope="module")
def user_kubelet(cluster: k.Kube, namespace: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubelet]:
    with FakeKubelet(cluster, namespace,
                     work_root=str(tmp_path_factory.mktemp("user-kubelet"))) as fake:
        yield fake


PULL_SECRET = "dmcr-pull"
MANAGER_FLAGS = ["--shared-pvc-grace", str(GRACE), "--shared-pvc-storage-class", DEFAULT_CLASS,
                 "--shared-pvc-retry-base", "1", "--registry-pull-secret", PULL_SECRET,
                 "--job-service-account", "modelcache-publish"]


@pytest.fixture(scope="module")
def manager(kube: kubeenv.KubeEnv, cluster: k.Kube, kubelet: FakeKubelet,
            user_kubelet: FakeKubelet, registry: Any, hub_server: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    # the manager holds exactly what daemonset/controller-rbac.yaml grants: a missing
    # permission on any SharedPVC path is a 403 and a failing test
    kube.kubectl("apply", "-f", os.path.join(REPO_ROOT, "daemonset", "controller-rbac.yaml"))
    sa_config = kube.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS)
    try:
        cluster.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                   "metadata": {"name": PULL_SECRET},
                                   "data": {"username": b64("puller"), "password": b64("pw"),
                                            "push-token": b64("never-copied")}}, SYSTEM_NS)
    except k.Conflict:
        pass
    m = ManagerProcess(kube, registry.host, hub_server.url,
                       str(tmp_path_factory.mktemp("manager") / "manager.log"),
                       extra=[*MANAGER_FLAGS, "--kubeconfig", sa_config]).start()
    yield m
    m.stop()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- helpers --------------------------------------------------------------------------


def ready_model(cluster: k.Kube, hub: Any, ns: str, name: str, src: str,
                storage_class: str | None = None) -> dict[str, Any]:
    hub.add_repo(f"acme/{name}", src)
    delivery: dict[str, Any] = {"mode": "SharedPVC"}
    if storage_class:
        delivery["sharedPVC"] = {"storageClassName": storage_class}
    cluster.create(k.MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"source": {"huggingFace": {"repo": f"acme/{name}"}}, "delivery": delivery}},
        ns)

    def ready() -> Any:
        m = cluster.get(k.MODELS, name, ns)
        return m if (m.get("status") or {}).get("phase") in ("Ready", "Failed") else None
    m = wait_for(ready, 90, what=f"Model {name} Ready")
    assert m["status"]["phase"] == "Ready", m["status"]
    return m


POD = {"containers": [{"name": "app", "image": "busybox", "command": ["true"]}],
       "restartPolicy": "Never"}


def workload(kind: str, name: str, model: dict[str, Any]) -> dict[str, Any]:
    """A workload asking for ``model`` by annotation, injected as the webhook would."""
    ann = {contract.ANN_MODELS: model["metadata"]["name"]}
    meta = {"name": name, "annotations": ann}
    pod = copy.deepcopy(POD)
    if kind == "Deployment":
        pod["restartPolicy"] = "Always"
        obj = {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod}}}
    elif kind == "Job":
        obj = {"apiVersion": "batch/v1", "kind": kind, "metadata": meta,
               "spec": {"backoffLimit": 0, "template": {"spec": pod}}}
    elif kind == "CronJob":
        obj = {"apiVersion": "batch/v1", "kind": kind, "metadata": meta, "spec": {
            "schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": {"spec": pod}}}}}
    else:
        raise AssertionError(kind)
    ns = model["metadata"]["namespace"]
    res = inject.mutate(kind, obj, operation="CREATE", namespace=ns,
                        lookup=lambda ref: model if ref.name == model["metadata"]["name"]
                        else None)
    assert res.planned and res.planned[0].mode == "SharedPVC", res
    return res.obj


def ours(cluster: k.Kube, res: k.Resource, ns: str) -> list[dict[str, Any]]:
    items, _ = cluster.list(res, ns, label_selector=f"{contract.LABEL_PVC}=true")
    return items


def get_secret(cluster: k.Kube, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return cluster.get(k.SECRETS, name, ns)
    except k.NotFound:
        return None


def get_pvc(cluster: k.Kube, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return cluster.get(k.PVCS, name, ns)
    except k.NotFound:
        return None


def materialized(cluster: k.Kube, ns: str, digest: str) -> Any:
    def check() -> Any:
        pvc = get_pvc(cluster, ns, contract.pvc_name(digest))
        ann = ((pvc or {}).get("metadata") or {}).get("annotations") or {}
        return pvc if ann.get(contract.ANN_PVC_MATERIALIZED) == digest else None
    return check


def collected(cluster: k.Kube, ns: str, claim: str) -> Any:
    """Gone; plays the pvc-protection controller (no pod uses it any more)."""
    def check() -> bool:
        pvc = get_pvc(cluster, ns, claim)
        if pvc is None:
            return True
        fins = pvc["metadata"].get("finalizers") or []
        if pvc["metadata"].get("deletionTimestamp") and PVC_PROTECTION in fins:
            cluster.patch(k.PVCS, claim, {"metadata": {
                "finalizers": [f for f in fins if f != PVC_PROTECTION] or None}}, ns)
        return False
    return check


def delete_job_and_pods(cluster: k.Kube, ns: str, name: str) -> None:
    """Delete a Job and, playing the garbage collector, its pods."""
    cluster.delete(k.JOBS, name, ns)
    for pod in cluster.list(k.PODS, ns, label_selector=f"job-name={name}")[0]:
        cluster.delete(k.PODS, pod["metadata"]["name"], ns, propagation=None)


def events_on(cluster: k.Kube, ns: str, uid: str) -> list[dict[str, Any]]:
    return cluster.list(k.EVENTS, ns, field_selector=f"involvedObject.uid={uid}")[0]


def metrics(manager: ManagerProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{manager.port}/metrics", timeout=2) as r:
        return r.read().decode()


def check_tree(user_kubelet: FakeKubelet, client: Any, model: dict[str, Any], src: str) -> None:
    digest = model["status"]["artifact"]["digest"]
    tree = os.path.join(user_kubelet.claim_dir(contract.pvc_name(digest)),
                        contract.pvc_subpath(digest))
    same_tree(src, tree)
    pack = pull.resolve(client, reference.parse(model["status"]["artifact"]["reference"]))
    assert pack.digest == digest
    pull.verify_tree(pack, tree)


# --- acceptance ----------------------------------------------------------------------------


def test_two_workloads_share_one_pvc_until_both_are_gone(
        cluster, namespace, manager, user_kubelet, hub, client, small_model):
    ns = namespace
    model = ready_model(cluster, hub, ns, "shared", small_model, storage_class="nfs-fast")
    digest = model["status"]["artifact"]["digest"]
    claim = contract.pvc_name(digest)
    user_kubelet.hold()  # the materializer waits until the credential copy was looked at
    try:
        cluster.create(k.DEPLOYMENTS, workload("Deployment", "web", model), ns)
        cluster.create(k.JOBS, workload("Job", "batch", model), ns)
        copy_ = wait_for(lambda: get_secret(cluster, ns, f"{claim}-pull"), 30,
                         what="pull credential copy")
        assert sorted(copy_["data"]) == ["password", "username"]  # never the other keys
        assert copy_["metadata"]["ownerReferences"][0]["kind"] == "PersistentVolumeClaim"
    finally:
        user_kubelet.release()

    pvc = wait_for(materialized(cluster, ns, digest), 90, what="PVC materialized")
    assert [p["metadata"]["name"] for p in ours(cluster, k.PVCS, ns)] == [claim]
    mjobs = ours(cluster, k.JOBS, ns)
    assert [j["metadata"]["name"] for j in mjobs] == [
        contract.materializer_job_name(ns, digest)], manager.logs()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "nfs-fast"
    size = model["status"]["artifact"]["sizeBytes"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == sharedpvc.pvc_size(size)
    ann = pvc["metadata"]["annotations"]
    assert ann[contract.ANN_PVC_DIGEST] == digest
    assert ann[contract.ANN_PVC_REFERENCE].endswith("@" + digest)
    # the materializer mounted the PVC read-write and ran once, successfully
    runs = [r for r in user_kubelet.runs if r["job"] == mjobs[0]["metadata"]["name"]]
    assert [r["exitCode"] for r in runs] == [0]
    # the pull-only credential reached it through a per-PVC copy, gone once materialized
    job = cluster.get(k.JOBS, mjobs[0]["metadata"]["name"], ns)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not [e for e in env if "valueFrom" in e]  # files of the Secret, not env values
    assert [v["secret"]["secretName"] for v in job["spec"]["template"]["spec"]["volumes"]
            if "secret" in v] == [f"{claim}-pull"]
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    wait_for(lambda: get_secret(cluster, ns, f"{claim}-pull") is None, 10, what="copy deleted")
    check_tree(user_kubelet, client, model, small_model)
    wait_for(lambda: "Materialized" in {e["reason"] for e in events_on(
        cluster, ns, pvc["metadata"]["uid"])}, 15, what="Materialized event")

    # one user left: the PVC stays, past the grace period
    cluster.delete(k.DEPLOYMENTS, "web", ns)
    time.sleep(GRACE + 2)
    assert get_pvc(cluster, ns, claim) is not None
    assert not (get_pvc(cluster, ns, claim)["metadata"].get("deletionTimestamp"))

    # no user left: collected after the grace period, Job and all
    delete_job_and_pods(cluster, ns, "batch")
    gone_at = time.monotonic()
    wait_for(collected(cluster, ns, claim), 30 + GRACE, interval=0.3, what="PVC collected")
    assert time.monotonic() - gone_at >= GRACE - 1.5  # never before the grace (1 s stamps)
    wait_for(lambda: not ours(cluster, k.JOBS, ns), 15, what="materializer Job deleted")


def test_another_model_gets_its_own_pvc_and_a_restart_adopts_it(
        cluster, namespace, manager, user_kubelet, hub, client, tmp_path):
    ns = namespace
    src = str(tmp_path / "other")
    modelgen.make_safetensors_model(src, seed=5)
    first = ready_model(cluster, hub, ns, "first", src)
    second_src = str(tmp_path / "second")
    modelgen.make_safetensors_model(second_src, seed=6)
    second = ready_model(cluster, hub, ns, "second", second_src)
    d1, d2 = (m["status"]["artifact"]["digest"] for m in (first, second))
    assert d1 != d2
    cluster.create(k.CRONJOBS, workload("CronJob", "nightly", first), ns)
    cluster.create(k.JOBS, workload("Job", "other", second), ns)
    p1 = wait_for(materialized(cluster, ns, d1), 90, what="first PVC")
    p2 = wait_for(materialized(cluster, ns, d2), 90, what="second PVC")
    assert p1["metadata"]["name"] != p2["metadata"]["name"]
    assert p1["spec"]["storageClassName"] == p2["spec"]["storageClassName"] == DEFAULT_CLASS
    check_tree(user_kubelet, client, first, src)
    check_tree(user_kubelet, client, second, second_src)

    # a restarted manager finds what it made: no second PVC or Job, nothing re-run
    runs = len(user_kubelet.runs)
    manager.kill()
    manager.start()
    wait_for(lambda: "modelcache_leader 1.0" in metrics(manager), 30, what="leading again")
    time.sleep(2)  # its first passes over every claim
    assert sorted(p["metadata"]["uid"] for p in ours(cluster, k.PVCS, ns)) == sorted(
        [p1["metadata"]["uid"], p2["metadata"]["uid"]])
    assert len(ours(cluster, k.JOBS, ns)) == 2
    assert len(user_kubelet.runs) == runs

    cluster.delete(k.CRONJOBS, "nightly", ns)
    delete_job_and_pods(cluster, ns, "other")
    for d in (d1, d2):
        wait_for(collected(cluster, ns, contract.pvc_name(d)), 30 + GRACE, interval=0.3,
                 what="PVC collected")


def test_a_failed_materializer_is_reported_and_retried(
        cluster, namespace, manager, user_kubelet, hub, client, registry, tmp_path):
    ns = namespace
    src = str(tmp_path / "fragile")
    modelgen.make_safetensors_model(src, seed=21)  # its own blobs: corrupting one hurts no one
    model = ready_model(cluster, hub, ns, "fragile", src)
    digest = model["status"]["artifact"]["digest"]
    pack = pull.resolve(client, reference.parse(model["status"]["artifact"]["reference"]))
    weight = next(x for x in pack.layers if x.path == "model.safetensors")
    blob = registry.blob_path(weight.digest)
    good = open(blob, "rb").read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    with open(blob, "wb") as f:
        f.write(bad)
    try:
        cluster.create(k.JOBS, workload("Job", "fragile-user", model), ns)
        claim = contract.pvc_name(digest)

        def warned() -> Any:
            pvc = get_pvc(cluster, ns, claim)
            if pvc is None:
                return None
            return [e for e in events_on(cluster, ns, pvc["metadata"]["uid"])
                    if e["reason"] == "MaterializeFailed"]
        ev = wait_for(warned, 90, what="MaterializeFailed event")
        assert ev[0]["type"] == "Warning"
        assert "DigestMismatch" in ev[0]["message"], ev[0]["message"]
        pvc = get_pvc(cluster, ns, claim)
        assert contract.ANN_PVC_MATERIALIZED not in pvc["metadata"]["annotations"]
        assert not os.path.exists(os.path.join(user_kubelet.claim_dir(claim),
                                               contract.pvc_subpath(digest)))
    finally:
        with open(blob, "wb") as f:
            f.write(good)
    # the backoff (1 s, doubled per failure here) brings a new Job, which now succeeds
    wait_for(materialized(cluster, ns, digest), 90, what="materialized after the repair")
    check_tree(user_kubelet, client, model, src)
    assert len(ours(cluster, k.JOBS, ns)) == 1
    delete_job_and_pods(cluster, ns, "fragile-user")
    wait_for(collected(cluster, ns, claim), 30 + GRACE, interval=0.3, what="PVC collected")


# --- what counts as a user (no cluster needed) ----------------------------------------------


@pytest.mark.parametrize("kind", inject.KINDS)
def test_claims_are_read_from_every_kind_as_the_webhook_writes_it(kind):
    digest = "sha256:" + "ab" * 32
    model = {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
             "metadata": {"name": "m", "namespace": "ns"},
             "spec": {"delivery": {"mode": "SharedPVC"}},
             "status": {"phase": "Ready", "artifact": {"digest": digest}}}
    pod = copy.deepcopy(POD)
    # a user's own PVC (not ours) and an emptyDir must not count
    pod["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "modelcache-x"}},
                      {"name": "tmp", "emptyDir": {}}]
    template = {"metadata": {"labels": {"app": "x"}}, "spec": pod}
    spec: dict[str, Any] = {
        "Pod": pod, "Deployment": {"template": template}, "StatefulSet": {"template": template},
        "DaemonSet": {"template": template}, "Job": {"template": template},
        "CronJob": {"schedule": "@daily", "jobTemplate": {"spec": {"template": template}}},
    }[kind]
    obj = {"kind": kind, "metadata": {"name": "w", "annotations": {contract.ANN_MODELS: "m"}},
           "spec": spec}
    res = inject.mutate(kind, obj, operation="CREATE", namespace="ns", lookup=lambda _: model)
    assert sharedpvc.claims_of(kind, res.obj) == [contract.pvc_name(digest)]
    cached = sharedpvc.workload_transform(kind)(res.obj)
    assert cached["claims"] == [contract.pvc_name(digest)] and "spec" not in cached
    assert sharedpvc.claims_of(kind, obj) == []


def test_pvc_size_is_the_artifact_plus_headroom():
    gib = 1 << 30
    assert sharedpvc.pvc_size(0) == "1Gi"
    assert sharedpvc.pvc_size(10 * gib) == "12Gi"  # 10 + 1.0 + 1
    assert sharedpvc.pvc_size(16 * gib) == "19Gi"  # 16 + 1.6 + 1 = 18.6 → 19
    assert sharedpvc.pvc_size(140 * gib) == "155Gi"  # 140 + 14 + 1
