"""The manager runs on exactly the RBAC of daemonset/controller-rbac.yaml.

The manifest is applied to the real API server (RBAC authorizer on), the
manager authenticates with a bound token of ServiceAccount
``modelcache-system/modelcache-controller`` and is taken through every path
that calls the API: a Model with a source Secret (Secret watch and read, the
per-Job copy, Job create, pod list, status and finalizer patches, Events,
the Lease) to Ready, then deleted (Job and copy deleted, finalizer
released); a ClusterModel (Job with an ownerReference) to Ready and deleted.
Any permission the manifest lacks shows up as a 403 in the manager's log.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kube import client as k
from tests import kubeenv
from tests.fake_kubelet import FakeKubelet
from tests.integration.test_controller import (
    HUB_TOKEN,
    REPO_ROOT,
    SYSTEM_NS,
    ManagerProcess,
    get_model,
    hf_model,
    jobs_of,
    phase_is,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import namespace as namespace

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube


@pytest.fixture(scope="module")
def rbac_manager(kube: kubeenv.KubeEnv, cluster: k.Kube, registry: Any, hub_server: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    kube.kubectl("apply", "-f", os.path.join(REPO_ROOT, "daemonset", "controller-rbac.yaml"))
    sa_config = kube.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS)
    log = str(tmp_path_factory.mktemp("rbac") / "manager.log")
    # the later --kubeconfig wins: the manager holds only what the manifest grants
    m = ManagerProcess(kube, registry.host, hub_server.url, log, extra=[
        "--kubeconfig", sa_config, "--job-service-account", "modelcache-publish"]).start()
    yield m
    m.stop()


def test_manager_needs_nothing_beyond_the_manifest_rbac(
        cluster, namespace, rbac_manager, hub, small_model, tmp_path):
    hub.add_repo("acme/rbac", small_model, private=True)
    hub.add_repo("acme/rbac-shared", small_model)
    with FakeKubelet(cluster, SYSTEM_NS, work_root=str(tmp_path / "kubelet")):
        cluster.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                   "metadata": {"name": "rbac-token"},
                                   "data": {"token": base64.b64encode(HUB_TOKEN.encode()).decode()}},
                       namespace)
        cluster.create(k.MODELS, hf_model("rbac", namespace, "acme/rbac",
                                          authSecretRef={"name": "rbac-token"}), namespace)
        m = wait_for(phase_is(cluster, namespace, "rbac", "Ready", "Failed"), 90, what="Ready")
        assert m["status"]["phase"] == "Ready", (m["status"], rbac_manager.logs())
        job = jobs_of(cluster, m["metadata"]["uid"])[0]
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "modelcache-publish"
        cluster.delete(k.MODELS, "rbac", namespace)
        wait_for(lambda: get_model(cluster, namespace, "rbac") is None, 30,
                 what="finalizer released")

        name = f"rbac-{uuid.uuid4().hex[:4]}"
        cluster.create(k.CLUSTER_MODELS, {
            "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
            "metadata": {"name": name},
            "spec": {"source": {"huggingFace": {"repo": "acme/rbac-shared"}}}})

        def cluster_model() -> Any:
            try:
                return cluster.get(k.CLUSTER_MODELS, name)
            except k.NotFound:
                return None

        def done() -> Any:
            cm = cluster_model()
            return cm if cm and (cm.get("status") or {}).get("phase") in ("Ready", "Failed") \
                else None
        cm = wait_for(done, 90, what="ClusterModel Ready")
        assert cm["status"]["phase"] == "Ready", (cm["status"], rbac_manager.logs())
        owners = jobs_of(cluster, cm["metadata"]["uid"])[0]["metadata"]["ownerReferences"]
        assert owners[0]["uid"] == cm["metadata"]["uid"] and owners[0]["blockOwnerDeletion"]
        cluster.delete(k.CLUSTER_MODELS, name)
        wait_for(lambda: cluster_model() is None, 30, what="ClusterModel finalizer released")
    with open(rbac_manager.log_path, errors="replace") as f:
        logs = f.read()
    assert " 403 " not in logs and "Forbidden" not in logs, logs
