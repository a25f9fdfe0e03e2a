"""``spec.validation`` on ``upload`` and ``pvc`` Models: the same Job, before Ready, as for
a publish Job.

The upload gateway (in-process) verifies and publishes the files (sent by the
test, or by the PVC reader Job); the manager (a subprocess) then runs the
Model's check on that candidate in the Model's namespace. That namespace's
kubelet is test_validation.py's embedded Job runner (the node plugin's
resolver for the check's volume, a directory per claim for the reader's).
The session and its token are kept until the verdict.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from jobs import upload_client
from kube import client as k
from tests import kubeenv
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import cond, get_model, wait_for
from tests.integration.test_controller_upload import gateway as gateway
from tests.integration.test_controller_upload import get_secret, token_of, upload_model, waiting
from tests.integration.test_controller_upload import start_manager as start_manager
from tests.integration.test_source_pvc import make_claim, pvc_model
from tests.integration.test_validation import CHECK_CONFIG, resolve_code, wait_phase
from tests.integration.test_validation import ns as ns
from tests.integration.test_validation import resolver as resolver
from tests.integration.test_validation import tenant_kubelet as tenant_kubelet

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube


def _validated_upload(name: str, ns: str, command: str) -> dict[str, Any]:
    obj = upload_model(name, ns)
    obj["spec"]["validation"] = {"image": "busybox", "command": ["sh", "-c", command]}
    return obj


def test_uploaded_model_is_validated_before_ready(cluster, ns, start_manager, gateway,
                                                  tenant_kubelet, resolver, small_model):
    manager = start_manager()
    name = "val-up"
    tenant_kubelet.hold()
    try:
        cluster.create(k.MODELS, _validated_upload(name, ns, CHECK_CONFIG), ns)
        m = waiting(cluster, ns, name)
        secret = m["status"]["upload"]["tokenSecretRef"]["name"]
        done = upload_client.upload(m["status"]["upload"]["url"], token_of(cluster, ns, m),
                                    small_model)
        m = wait_phase(cluster, ns, name, "Validating", manager)
        candidate = m["status"]["validation"]["digest"]
        assert candidate == done["result"]["digest"]
        assert not (m["status"].get("artifact") or {}).get("digest")  # not servable yet
        assert cond(m, "Ready")["status"] == "False"
        assert get_secret(cluster, ns, secret) is not None  # kept until the verdict
        wait_for(lambda: resolve_code(resolver, ns, name, candidate) == candidate, 30,
                 what="the resolver answering the pinned candidate")
    finally:
        tenant_kubelet.release()
    m = wait_phase(cluster, ns, name, "Ready", manager)
    assert m["status"]["artifact"]["digest"] == candidate
    assert cond(m, "Validated")["reason"] == "ValidationPassed"
    run = [r for r in tenant_kubelet.runs if r["job"] == m["status"]["validation"]["jobName"]]
    assert [r["exitCode"] for r in run] == [0]
    with open(os.path.join(os.path.dirname(run[0]["stderr"]), "stdout")) as f:
        assert "model_type llama" in f.read()  # it read the uploaded tree
    wait_for(lambda: get_secret(cluster, ns, secret) is None, 10, what="token Secret deleted")


def test_uploaded_model_failing_its_check_is_failed(cluster, ns, start_manager, gateway,
                                                    tenant_kubelet, small_model):
    manager = start_manager()
    name = "val-up-fail"
    cluster.create(k.MODELS, _validated_upload(name, ns, "echo 'no runtime here' >&2; exit 4"),
                   ns)
    m = waiting(cluster, ns, name)
    upload_client.upload(m["status"]["upload"]["url"], token_of(cluster, ns, m), small_model)
    m = wait_phase(cluster, ns, name, "Failed", manager)
    validated = cond(m, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ValidationFailed")
    assert validated["message"].endswith("no runtime here"), validated
    assert not (m["status"].get("artifact") or {}).get("digest")
    assert (get_model(cluster, ns, name) or {})["status"]["phase"] == "Failed"


def test_pvc_model_is_validated_before_ready(cluster, ns, start_manager, gateway,
                                            tenant_kubelet, small_model):
    manager = start_manager()
    name = "val-pvc"
    make_claim(cluster, ns, "val-weights")
    shutil.copytree(small_model, os.path.join(tenant_kubelet.claim_dir("val-weights"), "llama"))
    obj = pvc_model(name, ns, "val-weights", "llama/")
    obj["spec"]["validation"] = {"image": "busybox", "command": ["sh", "-c", CHECK_CONFIG]}
    cluster.create(k.MODELS, obj, ns)
    m = wait_phase(cluster, ns, name, "Ready", manager, timeout=120)
    validated = cond(m, "Validated")
    assert (validated["status"], validated["reason"]) == ("True", "ValidationPassed")
    assert m["status"]["artifact"]["digest"] == m["status"]["validation"]["digest"]
    run = [r for r in tenant_kubelet.runs if r["job"] == m["status"]["validation"]["jobName"]]
    assert [r["exitCode"] for r in run] == [0]
    with open(os.path.join(os.path.dirname(run[0]["stderr"]), "stdout")) as f:
        assert "model_type llama" in f.read()  # it read the tree the reader sent
    wait_for(lambda: get_secret(cluster, ns, f"{name}-upload-token") is None, 10,
             what="token Secret deleted")
