"""SharedPVC as an attacker in one namespace sees it: a forged claim reaches nothing.

A tenant of ``team-a`` (a real ServiceAccount holding the chart's
``modelcache-edit`` plus the right to create PVCs and Pods in its own
namespace, nothing cluster-wide) knows the digest of ``team-b``'s model. It
creates a PVC named like that model's claim, carrying our labels and the
annotations that name ``team-b``'s registry reference, and a Pod that mounts
it the way the webhook would. Before: the controller read the reference from
those annotations and made a materializer Job in ``team-a`` pulling
``models/team-b/...`` with the pull account's credential copied next to it.
Now the reference comes only from a Model of ``team-a`` (or a ClusterModel)
whose artifact is that digest: none backs the claim, so no Job and no
credential. When ``team-a`` does get a Model of the same digest, a PVC whose
annotations disagree with it is still not trusted.

The manager runs as in ``test_sharedpvc`` (its own RBAC, a fake kubelet in
``team-a`` that would run a materializer if one were made).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from api import names as contract
from controller.delivery import materializer, sharedpvc
from kube import client as k
from tests import kubeenv
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import ensure_namespace, wait_for
from tests.integration.test_controller import kubelet as kubelet
from tests.integration.test_sharedpvc import manager as manager
from tests.integration.test_sharedpvc import ready_model
from tests.integration.test_sharedpvc import user_kubelet as user_kubelet
from tests.integration.test_tenant_rbac import MANIFEST as TENANT_RBAC
from tests.integration.test_tenant_rbac import ROLE_BINDINGS, bind

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube

ROLES = k.Resource("rbac.authorization.k8s.io", "v1", "roles", True)
WATCH = 6.0  # seconds the manager gets to (wrongly) act on a forged claim


@pytest.fixture(scope="module")
def namespace(cluster: k.Kube) -> str:
    ns = f"team-a-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, ns)
    return ns


def tenant(kube: kubeenv.KubeEnv, cluster: k.Kube, ns: str) -> k.Kube:
    """``dev`` of ``ns``: modelcache-edit plus PVC and Pod create, in ``ns`` only."""
    kube.kubectl("apply", "-f", TENANT_RBAC)
    bind(cluster, ns, "dev", "modelcache-edit")
    cluster.create(ROLES, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "workloads"},
        "rules": [{"apiGroups": [""], "resources": ["persistentvolumeclaims", "pods"],
                   "verbs": ["create", "get", "list", "patch"]}]}, ns)
    cluster.create(ROLE_BINDINGS, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "dev-workloads"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "workloads"},
        "subjects": [{"kind": "ServiceAccount", "name": "dev", "namespace": ns}]}, ns)
    client = k.Kube.from_config(kube.serviceaccount_kubeconfig("dev", ns))
    wait_for(lambda: _can_list_pvcs(client, ns), 10, what="tenant RBAC in effect")
    return client


def _can_list_pvcs(client: k.Kube, ns: str) -> bool:
    try:
        client.list(k.PVCS, ns)
    except k.ApiError:
        return False
    return True


def forged_pvc(digest: str, reference: str) -> dict[str, Any]:
    claim = contract.pvc_name(digest)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "labels": materializer.labels(claim),
                         "annotations": {contract.ANN_PVC_DIGEST: digest,
                                         contract.ANN_PVC_REFERENCE: reference}},
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": "1Gi"}}}}


def forged_pod(name: str, claim: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {contract.LABEL_USES_SHARED_PVC: "true"}},
            "spec": {"restartPolicy": "Never", "serviceAccountName": "dev",
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "app", "image": "busybox", "command": ["true"],
                                     "volumeMounts": [{"name": "modelcache-model-x",
                                                       "mountPath": "/models"}]}],
                     "volumes": [{"name": "modelcache-model-x",
                                  "persistentVolumeClaim": {"claimName": claim,
                                                            "readOnly": True}}]}}


def nothing_for(cluster: k.Kube, ns: str, claim: str, repo: str) -> None:
    """For WATCH seconds: no Job in ``ns`` names ``repo`` or the claim, no credential copy."""
    deadline = time.monotonic() + WATCH
    while time.monotonic() < deadline:
        for job in cluster.list(k.JOBS, ns)[0]:
            text = str(job)
            assert repo not in text and claim not in text, job["metadata"]["name"]
        names = [s["metadata"]["name"] for s in cluster.list(k.SECRETS, ns)[0]]
        assert materializer.pull_secret_name(claim) not in names
        time.sleep(0.3)


def test_a_forged_claim_for_another_namespaces_model_gets_no_job_and_no_credential(
        kube, cluster, namespace, manager, user_kubelet, hub, small_model):
    team_a = namespace
    team_b = f"team-b-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, team_b)
    victim = ready_model(cluster, hub, team_b, "twin", small_model)
    digest = victim["status"]["artifact"]["digest"]
    victim_ref = victim["status"]["artifact"]["reference"]
    repo = f"models/{team_b}/"
    assert repo in victim_ref
    claim = contract.pvc_name(digest)
    dev = tenant(kube, cluster, team_a)
    try:
        dev.create(k.PVCS, forged_pvc(digest, victim_ref), team_a)
        dev.create(k.PODS, forged_pod("thief", claim), team_a)
        nothing_for(cluster, team_a, claim, repo)
        wait_for(lambda: f"{team_a}/{claim}" in manager.logs(), 10,
                 what="the manager looked at the claim")

        # team-a gets a Model of its own with the very same artifact: the claim is backed
        # now, but the forged PVC still names team-b's repository, so it is not trusted
        own = ready_model(cluster, hub, team_a, "twin", small_model)
        assert own["status"]["artifact"]["digest"] == digest
        assert repo not in own["status"]["artifact"]["reference"]
        nothing_for(cluster, team_a, claim, repo)
        wait_for(lambda: "not trusted" in manager.logs(), 10, what="the forged PVC refused")

        # pointing the PVC at team-a's own repository on another host fills it from
        # team-a's model on the DMCR: the host (where the credential goes) is never the PVC's
        own_ref = own["status"]["artifact"]["reference"]
        evil = "evil.example:5000/" + sharedpvc.path(own_ref)
        dev.patch(k.PVCS, claim, {"metadata": {"annotations": {
            contract.ANN_PVC_REFERENCE: evil}}}, team_a)
        job = wait_for(lambda: cluster.list(k.JOBS, team_a)[0], 15, what="materializer Job")[0]
        assert "evil.example" not in str(job) and repo not in str(job)
        assert own_ref in job["spec"]["template"]["spec"]["containers"][0]["command"]
    finally:
        dev.close()
