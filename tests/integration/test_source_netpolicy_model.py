"""The attack end to end: a tenant's Model points its HTTP source at a loopback service.

The real kube-apiserver, the manager as a process (its default source policy,
no opt-out) and its publish Job run by the fake kubelet with the deny list
on: the Model fails with reason ``SourceAddressDenied`` and the target server
never sees a request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kube import client as k
from tests import kubeenv
from tests.fake_kubelet import FakeKubelet
from tests.integration.test_controller import (
    ManagerProcess,
    ensure_namespace,
    install_crds,
    phase_is,
    wait_for,
)
from tests.integration.test_source_netpolicy import Server

kube = kubeenv.kube
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def env(kube: kubeenv.KubeEnv, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[dict[str, Any]]:
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    system = f"mc-netpol-{uuid.uuid4().hex[:6]}"
    users = f"netpol-{uuid.uuid4().hex[:6]}"
    ensure_namespace(client, system)
    ensure_namespace(client, users)
    target = Server()
    with FakeKubelet(client, system, work_root=str(tmp_path_factory.mktemp("kubelet")),
                     deny_private_sources=True):
        m = ManagerProcess(kube, "127.0.0.1:1", "http://127.0.0.1:9", str(
            tmp_path_factory.mktemp("manager") / "manager.log"),
            extra=["--namespace", system], allow_private_sources=False).start()
        try:
            yield {"client": client, "ns": users, "target": target, "manager": m}
        finally:
            m.kill()
            target.close()
    client.close()


def test_model_pointing_at_loopback_is_refused_without_a_connection(env: dict[str, Any]) -> None:
    client, ns, target = env["client"], env["ns"], env["target"]
    client.create(k.MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
        "metadata": {"name": "ssrf", "namespace": ns},
        "spec": {"source": {"http": {"url": f"{target.url}/model.safetensors"}}}}, ns)
    m = wait_for(phase_is(client, ns, "ssrf", "Failed", "Ready"), 120, what="Failed")
    st = m["status"]
    assert st["phase"] == "Failed", (st, env["manager"].logs())
    assert "SourceAddressDenied" in json.dumps(st.get("conditions")), st
    assert target.requests == 0
