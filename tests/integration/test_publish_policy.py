"""The attack end to end (issue 14, M4): a tenant steers the publish Job in the
controller's namespace with its Model's ``spec.publish``.

The real kube-apiserver; the tenant is a ServiceAccount of its own namespace
holding only the ``modelcache-edit`` role (daemonset/tenant-rbac.yaml), calling
with its own token; the manager runs as a process with its default publish
policy (no flags: no node selectors or tolerations, at most cpu 4, memory
16Gi, ephemeral-storage 100Gi, no GPU). No kubelet runs: a Job that is made
stays there to be looked at. The chart's ``controller.publishPolicy`` values
become the same flags (checked on the rendering).
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kube import client as k
from tests import kubeenv
from tests.integration.test_chart import helm as helm  # the fixture
from tests.integration.test_chart import render
from tests.integration.test_controller import (
    ManagerProcess,
    ensure_namespace,
    install_crds,
    phase_is,
    wait_for,
)
from tests.integration.test_tenant_rbac import MANIFEST, bind

kube = kubeenv.kube
pytestmark = pytest.mark.timeout(180)

ATTACKS = {
    "gpus": {"resources": {"requests": {"nvidia.com/gpu": 8}, "limits": {"nvidia.com/gpu": 8}}},
    "every-taint": {"tolerations": [{"operator": "Exists"}]},
    "node-pool": {"nodeSelector": {"pool": "a100-reserved"}},
    "huge": {"resources": {"requests": {"memory": "900Gi", "ephemeral-storage": "900Gi"}}},
}


@pytest.fixture(scope="module")
def env(kube: kubeenv.KubeEnv, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[dict[str, Any]]:
    install_crds(kube)
    kube.kubectl("apply", "-f", MANIFEST)
    admin = k.Kube.from_config(kube.kubeconfig)
    system = f"mc-policy-{uuid.uuid4().hex[:6]}"
    ns = f"tenant-{uuid.uuid4().hex[:6]}"
    ensure_namespace(admin, system)
    ensure_namespace(admin, ns)
    bind(admin, ns, "dev", "modelcache-edit")
    tenant = k.Kube.from_config(kube.serviceaccount_kubeconfig("dev", ns))
    m = ManagerProcess(kube, "127.0.0.1:1", "http://127.0.0.1:9", str(
        tmp_path_factory.mktemp("manager") / "manager.log"),
        extra=["--namespace", system]).start()
    try:
        yield {"admin": admin, "tenant": tenant, "ns": ns, "system": system, "manager": m}
    finally:
        m.kill()
        tenant.close()
        admin.close()


def create(env: dict[str, Any], name: str, publish: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name},
            "spec": {"source": {"http": {"url": "https://models.example/m.gguf"}},
                     "publish": publish}}
    made: dict[str, Any] = env["tenant"].create(k.MODELS, body, env["ns"])  # the tenant's token
    return made


def system_jobs(env: dict[str, Any], uid: str) -> list[dict[str, Any]]:
    items, _ = env["admin"].list(k.JOBS, env["system"], label_selector=f"modelcache.io/uid={uid}")
    return items


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tenant_cannot_steer_the_publish_job(env: dict[str, Any], attack: str) -> None:
    made = create(env, attack, ATTACKS[attack])
    m = wait_for(phase_is(env["admin"], env["ns"], attack, "Failed", "Publishing"), 60,
                 what="Failed")
    st = m["status"]
    assert st["phase"] == "Failed", (st, env["manager"].logs())
    published = next(c for c in st["conditions"] if c["type"] == "Published")
    assert published["status"] == "False" and published["reason"] == "PublishPolicyDenied"
    assert "spec.publish." in published["message"], published
    assert (st.get("publish") or {}).get("jobName") is None
    assert system_jobs(env, made["metadata"]["uid"]) == []

    def warned() -> bool:
        events, _ = env["admin"].list(k.EVENTS, env["ns"])
        return any(e.get("reason") == "PublishPolicyDenied" and e.get("type") == "Warning"
                   and (e.get("involvedObject") or {}).get("name") == attack for e in events)
    wait_for(warned, 30, what="a PublishPolicyDenied Warning event")


def test_terminal_until_the_spec_changes(env: dict[str, Any]) -> None:
    made = create(env, "fixed", ATTACKS["gpus"])
    wait_for(phase_is(env["admin"], env["ns"], "fixed", "Failed"), 60, what="Failed")
    assert system_jobs(env, made["metadata"]["uid"]) == []
    # the tenant drops the GPUs (None: merge-patch delete): a new generation, within the
    # policy, gets its Job
    env["tenant"].patch(k.MODELS, "fixed", {"spec": {"publish": {"resources": {
        "requests": {"cpu": "1", "nvidia.com/gpu": None},
        "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": None}}}}}, env["ns"])
    jobs = wait_for(lambda: system_jobs(env, made["metadata"]["uid"]), 60, what="a publish Job")
    pod = jobs[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}


def test_a_model_within_the_policy_gets_its_job(env: dict[str, Any]) -> None:
    made = create(env, "modest", {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                                                "limits": {"memory": "16Gi"}}})
    jobs = wait_for(lambda: system_jobs(env, made["metadata"]["uid"]), 60, what="a publish Job")
    box = jobs[0]["spec"]["template"]["spec"]["containers"][0]
    assert box["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert wait_for(phase_is(env["admin"], env["ns"], "modest", "Publishing"), 30,
                    what="Publishing")


def test_chart_values_become_the_policy_flags(helm: str) -> None:
    def args(*sets: str) -> list[str]:
        (dep,) = [o for o in render(helm, "ai", *sets) if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "modelcache-controller"]
        return [a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]
                if a.startswith("--publish-allow") or a.startswith("--publish-max")]
    assert args() == ["--publish-max-resource=cpu=4",
                      "--publish-max-resource=ephemeral-storage=100Gi",
                      "--publish-max-resource=memory=16Gi",
                      "--publish-max-resource=nvidia.com/gpu=0"]
    wide = args("controller.publishPolicy.nodeSelectors={pool=publish}",
                "controller.publishPolicy.tolerations={publish:NoSchedule}",
                "controller.publishPolicy.maxResources.nvidia\\.com/gpu=1")
    assert "--publish-allow-node-selector=pool=publish" in wide
    assert "--publish-allow-toleration=publish:NoSchedule" in wide
    assert "--publish-max-resource=nvidia.com/gpu=1" in wide


def test_manager_refuses_a_bad_policy_flag() -> None:
    from controller import main

    with pytest.raises(SystemExit, match="publish-max-resource"):
        main._publish_policy(argparse.Namespace(
            publish_allow_node_selector=[], publish_allow_toleration=[],
            publish_max_resource=["cpu"]))
