"""M5: the controller's own token cannot list or watch Secrets outside its namespace.

The attack: whoever holds the manager's ServiceAccount token (a compromised
manager pod) tries to enumerate or stream every Secret of the cluster, or of a
tenant namespace. With daemonset/controller-rbac.yaml applied to the real API
server it is refused (403); only its own namespace can be listed, and a
single named Secret can still be read (a namespaced Model's authSecretRef).
The manager still works on exactly that RBAC: a tenant's Secret change
re-publishes through the periodic re-check (controller/models/secretreader.py,
``--secret-recheck-interval``), not a watch.
"""

from __future__ import annotations

import base64
import os
import uuid
from typing import Any

import pytest

from kube import client as k
from tests import kubeenv
from tests.fake_kubelet import FakeKubelet
from tests.integration.test_controller import (
    HUB_TOKEN,
    REPO_ROOT,
    SYSTEM_NS,
    hf_model,
    jobs_of,
    phase_is,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import namespace as namespace
from tests.integration.test_controller_rbac import rbac_manager as rbac_manager

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube


def _secret(name: str, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"token": base64.b64encode(token.encode()).decode()}}


def _refused(call: Any) -> None:
    with pytest.raises(k.ApiError) as e:
        call()
    assert e.value.status == 403, e.value


def test_controller_token_cannot_list_or_watch_secrets(kube: kubeenv.KubeEnv, cluster: k.Kube,
                                                        namespace: str) -> None:
    kube.kubectl("apply", "-f", os.path.join(REPO_ROOT, "daemonset", "controller-rbac.yaml"))
    name = f"tenant-{uuid.uuid4().hex[:4]}"
    cluster.create(k.SECRETS, _secret(name, "tenant-value"), namespace)
    ctl = k.Kube.from_config(kube.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS))
    try:
        def check() -> bool:  # RBAC takes a moment to reach the authorizer's cache
            try:
                ctl.list(k.SECRETS, SYSTEM_NS)
                return True
            except k.ApiError:
                return False
        wait_for(check, 10, what="the manifest's RBAC in effect")
        _refused(lambda: ctl.list(k.SECRETS))                     # cluster-wide list
        _refused(lambda: next(iter(ctl.watch(k.SECRETS, "0", timeout_seconds=1))))
        _refused(lambda: ctl.list(k.SECRETS, namespace))          # a tenant's namespace
        _refused(lambda: next(iter(ctl.watch(k.SECRETS, "0", namespace, timeout_seconds=1))))
        # what it still has: its own namespace's list, one named Secret's get
        items, _ = ctl.list(k.SECRETS, SYSTEM_NS)
        assert isinstance(items, list)
        assert ctl.get(k.SECRETS, name, namespace)["metadata"]["name"] == name
    finally:
        ctl.close()


def test_secret_change_republishes_without_a_watch(cluster, namespace, rbac_manager, hub,
                                                   small_model, tmp_path) -> None:
    hub.add_repo("acme/rbac-rotate", small_model, private=True)
    with FakeKubelet(cluster, SYSTEM_NS, work_root=str(tmp_path / "kubelet")):
        cluster.create(k.SECRETS, _secret("rotate-token", "hf_wrong"), namespace)
        cluster.create(k.MODELS, hf_model("rotate", namespace, "acme/rbac-rotate",
                                          authSecretRef={"name": "rotate-token"}), namespace)
        m = wait_for(phase_is(cluster, namespace, "rotate", "Failed", "Ready"), 90,
                     what="Failed with a wrong token")
        assert m["status"]["phase"] == "Failed", (m["status"], rbac_manager.logs())
        cluster.patch(k.SECRETS, "rotate-token", {"data": {
            "token": base64.b64encode(HUB_TOKEN.encode()).decode()}}, namespace)
        m2 = wait_for(phase_is(cluster, namespace, "rotate", "Ready"), 90,
                      what="Ready after the Secret changed")
        assert len(jobs_of(cluster, m2["metadata"]["uid"])) == 2
    logs = rbac_manager.logs()
    assert " 403 " not in logs and "Forbidden" not in logs, logs
