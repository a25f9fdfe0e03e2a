"""``spec.validation``: a user's check runs as a real Job on the candidate before Ready.

The manager runs as a subprocess against the real API server, the HF test
hub and a real registry; the FAKE kubelet runs its publish Jobs in the
controller's namespace (tests/integration/test_controller.py). The
validation Job runs in the Model's own namespace, so a second embedded Job
runner plays kubelet there, with the node plugin's part for ``csi``
volumes: the real ``KubeResolver`` resolves the volume's attributes (as
kubelet passes them, with the pod's namespace) and the tree is pulled from
the registry, as the node cache would, and shown at the mount path. Like
kubelet, a mount the resolver answers "not yet" is retried.

Each test reads the Model's status, the node resolver's answers, the Job
the manager made, and the manager's ``/metrics``.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from api import names
from controller.embedded.jobrunner import JobRunner
from csi import errors
from csi.errors import CsiError
from csi.resolvers.base import NAMESPACE_KEY, Volume
from csi.resolvers.kube import KubeResolver
from kube import client as k
from modelpack.oci.registry import RegistryClient
from modelpack.pull import pull_to_dir
from tests import kubeenv
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import cond, ensure_namespace, get_model, wait_for
from tests.integration.test_controller import kubelet as kubelet
from tests.integration.test_controller import manager as manager

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube

CHECK_CONFIG = ('test -f "$MODELCACHE_MODEL_PATH/config.json" && python3 -c "import json, os; '
                "c = json.load(open(os.environ['MODELCACHE_MODEL_PATH'] + '/config.json')); "
                "print('model_type', c['model_type'])\"")


@pytest.fixture(scope="module")
def resolver(cluster: k.Kube) -> Iterator[KubeResolver]:
    r = KubeResolver(cluster, lambda host: RegistryClient(host, insecure=True)).start()
    assert r.models.synced.wait(30)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def ns(cluster: k.Kube) -> str:
    name = f"val-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, name)
    return name


@pytest.fixture(scope="module")
def tenant_kubelet(cluster: k.Kube, ns: str, resolver: KubeResolver,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRunner]:
    trees = tmp_path_factory.mktemp("trees")
    mounted: list[dict[str, Any]] = []

    def mount(src: dict[str, Any], namespace: str) -> str:
        """The node plugin's NodePublishVolume: resolve (retried, as kubelet does), pull."""
        volume = Volume.from_context({**src.get("volumeAttributes", {}),
                                      NAMESPACE_KEY: namespace})

        def answer() -> Any:
            try:
                return resolver.resolve(volume).reference
            except CsiError as e:
                if e.code.name != "UNAVAILABLE":
                    raise
                return None
        ref = wait_for(answer, 30, what=f"the node resolver answering {volume.key}")
        dest = str(trees / uuid.uuid4().hex)
        pull_to_dir(RegistryClient(ref.host, insecure=True), ref, dest)
        mounted.append({"volume": volume, "reference": str(ref), "dir": dest})
        return dest

    # every Job of the namespace: validation Jobs, and source.pvc readers
    # (test_validation_sessions.py), which send to the upload gateway on loopback
    runner = JobRunner(cluster, ns, work_root=str(tmp_path_factory.mktemp("tenant")),
                       label_selector=None, csi=mount,
                       base_env={"MODELCACHE_ALLOW_PRIVATE_SOURCES": "1"})
    runner.mounted = mounted  # type: ignore[attr-defined]
    with runner:
        yield runner


def hf(name: str, repo: str, validation: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"huggingFace": {"repo": repo}}}
    if validation is not None:
        spec["validation"] = validation
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name}, "spec": spec}


def wait_phase(client: k.Kube, ns: str, name: str, phase: str, manager: Any,
               timeout: float = 90) -> dict[str, Any]:
    def check() -> Any:
        m = get_model(client, ns, name) or {}
        return m if (m.get("status") or {}).get("phase") == phase else None
    try:
        return wait_for(check, timeout, what=f"{name} {phase}")  # type: ignore[no-any-return]
    except AssertionError as e:
        raise AssertionError(f"{e}\nstatus: {(get_model(client, ns, name) or {}).get('status')}"
                             f"\nmanager:\n{manager.logs()}") from None


def metric(manager: Any, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{manager.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m is not None, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def _job(client: k.Kube, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return client.get(k.JOBS, name, ns)
    except k.NotFound:
        return None


def resolve_code(resolver: KubeResolver, ns: str, name: str, digest: str | None) -> str:
    try:
        return str(resolver.resolve(Volume(ns, model=name, digest=digest)).reference.digest)
    except Exception as e:
        return errors.to_csi(e).code.name


def test_passing_validation_runs_on_the_candidate_then_ready(
        cluster, ns, manager, kubelet, tenant_kubelet, hub, small_model, resolver):
    name = "val-pass"
    hub.add_repo("acme/val-pass", small_model)
    passed = metric(manager, "modelcache_validation_total", '{result="passed"}')
    tenant_kubelet.hold()  # the check "runs" while the test looks
    try:
        cluster.create(k.MODELS, hf(name, "acme/val-pass", {
            "image": "python:3.12-slim", "command": ["sh", "-c", CHECK_CONFIG],
            "timeout": "5m", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}), ns)
        m = wait_phase(cluster, ns, name, "Validating", manager)
        st = m["status"]
        candidate = st["validation"]["digest"]
        validated, ready = cond(m, "Validated"), cond(m, "Ready")
        assert (validated["status"], validated["reason"]) == ("Unknown", "ValidationRunning")
        assert (ready["status"], ready["reason"]) == ("False", "Validating"), ready
        assert cond(m, "Published")["status"] == "True"
        assert not (st.get("artifact") or {}).get("digest")  # not servable yet
        # the Job (made right after this status: the node must know the candidate
        # first): in the Model's namespace, owned by it, the candidate read-only
        job = wait_for(lambda: _job(cluster, ns, st["validation"]["jobName"]), 30,
                       what="the validation Job")
        assert job["metadata"]["ownerReferences"][0]["uid"] == m["metadata"]["uid"]
        pod = job["spec"]["template"]["spec"]
        assert pod["volumes"][0]["csi"] == {"driver": names.CSI_DRIVER, "readOnly": True,
                                            "volumeAttributes": {names.ATTR_MODEL: name,
                                                                 names.ATTR_DIGEST: candidate}}
        assert pod["automountServiceAccountToken"] is False
        assert job["spec"]["activeDeadlineSeconds"] == 300
        # the node: the candidate only when pinned, in the model's namespace only
        wait_for(lambda: resolve_code(resolver, ns, name, candidate) == candidate, 30,
                 what="the resolver answering the pinned candidate")
        assert resolve_code(resolver, ns, name, None) == "UNAVAILABLE"
        assert resolve_code(resolver, "default", name, candidate) == "NOT_FOUND"
    finally:
        tenant_kubelet.release()
    m = wait_phase(cluster, ns, name, "Ready", manager)
    assert m["status"]["artifact"]["digest"] == candidate
    validated = cond(m, "Validated")
    assert (validated["status"], validated["reason"]) == ("True", "ValidationPassed")
    assert cond(m, "Ready")["status"] == "True"
    run = [r for r in tenant_kubelet.runs if r["job"] == st["validation"]["jobName"]]
    assert [r["exitCode"] for r in run] == [0]
    with open(os.path.join(os.path.dirname(run[0]["stderr"]), "stdout")) as f:
        assert "model_type llama" in f.read()  # it read the tree's config.json
    mount = [x for x in tenant_kubelet.mounted if x["volume"].model == name]
    assert mount and mount[0]["reference"].endswith(f"/models/{ns}/{name}@{candidate}")
    assert wait_for(lambda: resolve_code(resolver, ns, name, None) == candidate, 30)
    assert metric(manager, "modelcache_validation_total", '{result="passed"}') == passed + 1
    assert metric(manager, "modelcache_validation_duration_seconds_count") >= 1


def test_failed_validation_keeps_the_previous_artifact_serving(
        cluster, ns, manager, kubelet, tenant_kubelet, hub, small_model, resolver):
    name, repo = "val-fail", "acme/val-fail"
    hub.add_repo(repo, small_model)
    cluster.create(k.MODELS, hf(name, repo, {"image": "busybox", "command": ["sh", "-c",
                                                                            CHECK_CONFIG]}), ns)
    good = wait_phase(cluster, ns, name, "Ready", manager)["status"]["artifact"]["digest"]
    failed = metric(manager, "modelcache_validation_total", '{result="failed"}')
    published = metric(manager, "modelcache_publish_finished_total",
                       '{kind="Model",result="ready"}')
    # the upstream moves, and the owner tightens the check: it fails on the new commit
    hub.add_repo(repo, small_model, files={"README.md": b"# v2\n"})
    cluster.patch(k.MODELS, name, {"spec": {"validation": {
        "image": "busybox", "command": ["sh", "-c"],
        "args": ["for i in $(seq 1 200); do echo noise $i; done; "
                 "echo 'FATAL: tokenizer does not load' >&2; exit 3"]}}}, ns)
    m = wait_phase(cluster, ns, name, "Failed", manager)
    st = m["status"]
    assert st["validation"]["digest"] != good  # a new artifact was published, and refused
    validated, ready = cond(m, "Validated"), cond(m, "Ready")
    assert (validated["status"], validated["reason"]) == ("False", "ValidationFailed")
    assert "(exit code 3)" in validated["message"]
    assert validated["message"].endswith("FATAL: tokenizer does not load"), validated
    assert "noise 200" in validated["message"] and "noise 1\n" not in validated["message"]
    assert len(validated["message"].encode()) <= 1024
    assert (ready["status"], ready["reason"]) == ("True", "ServingPreviousArtifact"), ready
    assert good in ready["message"] and "ValidationFailed" in ready["message"]
    assert st["artifact"]["digest"] == good
    wait_for(lambda: resolve_code(resolver, ns, name, None) == good, 30,
             what="the resolver still answering the good artifact")
    assert metric(manager, "modelcache_validation_total", '{result="failed"}') == failed + 1
    assert metric(manager, "modelcache_publish_finished_total",
                  '{kind="Model",result="ready"}') == published
    reasons = {e["reason"] for e in cluster.list(k.EVENTS, ns, field_selector=(
        f"involvedObject.uid={m['metadata']['uid']}"))[0]}
    assert {"ValidationStarted", "ValidationPassed", "ValidationFailed"} <= reasons
    time.sleep(2)  # nothing more is owed: the failed key stays failed, no new Job
    assert (get_model(cluster, ns, name) or {})["status"]["phase"] == "Failed"


def test_validation_past_its_timeout_is_failed_without_an_artifact(
        cluster, ns, manager, kubelet, tenant_kubelet, hub, small_model, resolver):
    name = "val-slow"
    hub.add_repo("acme/val-slow", small_model)
    timeouts = metric(manager, "modelcache_validation_total", '{result="timeout"}')
    cluster.create(k.MODELS, hf(name, "acme/val-slow", {
        "image": "busybox", "command": ["sh", "-c", "echo loading; sleep 60"],
        "timeout": "3s"}), ns)
    m = wait_phase(cluster, ns, name, "Failed", manager)
    validated, ready = cond(m, "Validated"), cond(m, "Ready")
    assert (validated["status"], validated["reason"]) == ("False", "ValidationTimeout")
    assert "ran past its timeout" in validated["message"]
    assert (ready["status"], ready["reason"]) == ("False", "ValidationTimeout")
    assert not (m["status"].get("artifact") or {}).get("digest")
    assert resolve_code(resolver, ns, name, None) == "UNAVAILABLE"
    assert metric(manager, "modelcache_validation_total", '{result="timeout"}') == timeouts + 1


def test_user_guide_example_validates_and_becomes_ready(
        cluster, ns, manager, kubelet, tenant_kubelet, hub, small_model):
    """docs/user-guide.md's "Validating a model before Ready" Model, as written."""
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "user-guide.md")) as f:
        doc = f.read()
    block = re.search(r"```yaml\n# save as: validated.yaml\n(.*?)```", doc, re.S)
    assert block is not None
    obj = yaml.safe_load(block.group(1))
    hub.add_repo(obj["spec"]["source"]["huggingFace"]["repo"], small_model)
    obj["metadata"]["namespace"] = ns
    cluster.create(k.MODELS, obj, ns)
    m = wait_phase(cluster, ns, obj["metadata"]["name"], "Ready", manager)
    assert cond(m, "Validated")["reason"] == "ValidationPassed"
    run = [r for r in tenant_kubelet.runs if r["job"] == m["status"]["validation"]["jobName"]]
    with open(os.path.join(os.path.dirname(run[-1]["stderr"]), "stdout")) as f:
        assert f.read().strip() == "ok: llama"


def test_removing_validation_removes_its_condition(
        cluster, ns, manager, kubelet, tenant_kubelet, hub, small_model):
    """An owner who drops ``spec.validation`` sees no ``Validated`` condition any more (and
    no ``status.validation``): kubectl would otherwise show a verdict on a check nobody
    asks for. The next publish is Ready without a validation Job."""
    name, repo = "val-drop", "acme/val-drop"
    hub.add_repo(repo, small_model)
    cluster.create(k.MODELS, hf(name, repo, {"image": "busybox", "command": ["sh", "-c",
                                                                            CHECK_CONFIG]}), ns)
    m = wait_phase(cluster, ns, name, "Ready", manager)
    assert cond(m, "Validated")["reason"] == "ValidationPassed"
    checks = {r["job"] for r in tenant_kubelet.runs}
    cluster.patch(k.MODELS, name, {"spec": {"validation": None}}, ns)

    def dropped() -> Any:
        cur = get_model(cluster, ns, name) or {}
        st = cur.get("status") or {}
        gone = "validation" not in st and not [
            x for x in st.get("conditions") or [] if x["type"] == "Validated"]
        return cur if gone and st.get("observedGeneration") == cur["metadata"]["generation"] \
            and st.get("phase") == "Ready" else None
    try:
        m = wait_for(dropped, 60, what="Validated gone, Ready again")
    except AssertionError as e:
        raise AssertionError(f"{e}\nstatus: {(get_model(cluster, ns, name) or {}).get('status')}"
                             ) from None
    assert cond(m, "Ready")["status"] == "True"
    assert m["status"]["artifact"]["digest"]
    time.sleep(1)
    assert {r["job"] for r in tenant_kubelet.runs} == checks  # no new check ran
