"""The gate lifter against the real kube-apiserver, fed by the real webhook.

Bare Pods are created through the webhook of test_delivery_webhook.py's
fixture (no controller-manager runs, so Deployments make no pods), held by
the ``modelcache.io/model-ready`` gate, and the lifter (as the leader runs
it) is watched lifting the gate only when every model is Ready, keeping it
for a Failed model with one Warning Event, waiting for a SharedPVC's
``materialized`` annotation (set here in the SharedPVC reconciler's place),
and merging a preferred node affinity term into a gated pod just before it
lifts (the API server's rule for gated pods, tried for real).
"""

from __future__ import annotations

import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api import names as c
from kube import client as k
from tests import kubeenv
from tests.integration.test_controller import ManagerProcess
from tests.integration.test_crds import install_crds
from tests.integration.test_delivery_webhook import (
    NAMESPACES,
    SYSTEM_NS,
    Env,
    body,
    new_digest,
    running_env,
    wait_for,
)

kube = kubeenv.kube


def test_manager_runs_delivery_on_the_manifest_rbac(kube: kubeenv.KubeEnv, tmp_path) -> None:
    """``modelcache-controller manager --webhook-url …`` as a process, with only the RBAC of
    daemonset/controller-rbac.yaml: it registers the webhook, injects, and its lifter lifts.
    First in this module, so no other webhook is registered while it runs."""
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    for name in (SYSTEM_NS, ns := f"mgr-{uuid.uuid4().hex[:6]}"):
        try:
            client.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": name}})
        except k.Conflict:
            pass
    client.create(k.Resource("", "v1", "serviceaccounts"), {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, ns)
    kube.kubectl("apply", "-f", os.path.join(kubeenv.REPO_ROOT, "daemonset",
                                             "controller-rbac.yaml"))
    sa = kube.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS)
    port = kubeenv.free_port()
    m = ManagerProcess(kube, "127.0.0.1:1", "http://127.0.0.1:1", str(tmp_path / "mgr.log"),
                       extra=["--kubeconfig", sa, "--no-leader-elect",
                              "--webhook-url", f"https://127.0.0.1:{port}",
                              "--webhook-listen", f"127.0.0.1:{port}"]).start()
    try:
        client.create(k.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                                 "metadata": {"name": "a"},
                                 "spec": {"source": {"huggingFace": {"repo": "o/a"}}}}, ns)
        stored = client.create(k.PODS, body("Pod", "p", {c.ANN_MODELS: "a"}), ns)
        assert stored["spec"]["schedulingGates"] == [{"name": c.GATE}]
        assert stored["spec"]["volumes"][-1]["csi"]["volumeAttributes"] == {"model": "a"}
        digest = new_digest()
        client.patch(k.MODELS, "a", {"status": {"phase": "Ready", "artifact": {
            "digest": digest}}}, ns, sub="status")
        wait_for(lambda: "schedulingGates" not in client.get(k.PODS, "p", ns)["spec"],
                 what="the manager's lifter lifting the gate")
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'modelcache_webhook_admissions_total{kind="Pod",operation="CREATE",' \
               'result="mutated"} 1.0' in metrics
        assert "modelcache_scheduling_gates_lifted_total 1.0" in metrics
        assert " 403 " not in m.logs() and "Forbidden" not in m.logs()
    finally:
        m.stop()
        client.delete(k.Resource("admissionregistration.k8s.io", "v1",
                                 "mutatingwebhookconfigurations", False), "modelcache")
        client.close()


@pytest.fixture(scope="module")
def env(kube: kubeenv.KubeEnv) -> Iterator[Env]:
    for e in running_env(kube):
        e.delivery.lead()  # this replica leads: start the lifter's workers
        yield e


def pod(env: Env, ns: str, name: str, annotations: dict[str, str],
        **spec: Any) -> dict[str, Any]:
    b = body("Pod", name, annotations)
    b["spec"].update(spec)
    return env.create("Pod", ns, b)


def gates_of(env: Env, ns: str, name: str) -> list[str]:
    return [g["name"] for g in env.get("Pod", ns, name)["spec"].get("schedulingGates") or []]


def lifted(env: Env, ns: str, name: str) -> bool:
    p = env.get("Pod", ns, name)
    return c.GATE not in [g["name"] for g in p["spec"].get("schedulingGates") or []] and \
        p["metadata"]["labels"].get(c.LABEL_GATED) == "false"


def events(env: Env, ns: str, name: str) -> list[dict[str, Any]]:
    items, _ = env.client.list(k.EVENTS, ns)
    return [e for e in items if e["involvedObject"].get("name") == name
            and e["involvedObject"].get("kind") == "Pod"]


def settle(env: Env, seconds: float = 1.0) -> None:
    """Give the lifter time to act on what it has seen (for asserting it did NOT act)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(env.delivery.lifter.queue):
        time.sleep(0.05)
    time.sleep(0.3)


def test_gate_lifted_only_when_every_model_is_ready(env: Env) -> None:
    ns = env.namespace("gate")
    env.model("a", ns)
    env.model("b", ns, phase="Publishing")
    pod(env, ns, "p", {c.ANN_MODELS: "a,b"},
        schedulingGates=[{"name": "example.com/other"}])
    settle(env)
    assert gates_of(env, ns, "p") == ["example.com/other", c.GATE]
    env.model("b", ns, phase="Ready")
    wait_for(lambda: lifted(env, ns, "p"), what="gate lifted")
    assert gates_of(env, ns, "p") == ["example.com/other"]  # someone else's gate stays


def test_ready_at_creation_is_lifted_at_once(env: Env) -> None:
    ns = env.namespace("gate")
    env.model("a", ns)
    cm = f"cm-{uuid.uuid4().hex[:6]}"
    env.model(cm, None)
    pod(env, ns, "p", {c.ANN_MODELS: "a", c.ANN_CLUSTER_MODELS: cm})
    wait_for(lambda: lifted(env, ns, "p"), what="gate lifted")
    assert "schedulingGates" not in env.get("Pod", ns, "p")["spec"]


def test_failed_model_keeps_the_gate_with_one_event(env: Env) -> None:
    ns = env.namespace("gate")
    env.model("bad", ns, phase="Failed", reason="SourceNotFound", message="repo org/bad is gone")
    pod(env, ns, "p", {c.ANN_MODELS: "bad"})
    evs = wait_for(lambda: events(env, ns, "p"), what="an event on the pod")
    assert len(evs) == 1
    e = evs[0]
    assert (e["type"], e["reason"]) == ("Warning", "ModelFailed")
    assert e["message"].startswith("Model bad is Failed (SourceNotFound: repo org/bad is gone)")
    # the model changes again (still Failed, another message), and the pod is touched:
    # no new event, the gate stays
    env.model("bad", ns, phase="Failed", reason="SourceNotFound", message="still gone")
    env.client.patch(k.PODS, "p", {"metadata": {"labels": {"touch": "1"}}}, ns)
    settle(env)
    evs = events(env, ns, "p")
    assert len(evs) == 1 and evs[0].get("count", 1) == 1
    assert gates_of(env, ns, "p") == [c.GATE]
    env.model("bad", ns, phase="Ready")
    wait_for(lambda: lifted(env, ns, "p"), what="gate lifted after the fix")


def test_deleted_model_keeps_the_gate_with_an_event(env: Env) -> None:
    ns = env.namespace("gate")
    env.model("gone", ns, phase="Publishing")
    pod(env, ns, "p", {c.ANN_MODELS: "gone"})
    env.client.delete(k.MODELS, "gone", ns)
    evs = wait_for(lambda: events(env, ns, "p"), what="an event on the pod")
    assert evs[0]["reason"] == "ModelNotFound"
    assert evs[0]["message"].startswith(f"Model gone not found in namespace {ns}")
    assert gates_of(env, ns, "p") == [c.GATE]


def test_sharedpvc_waits_for_the_materialized_claim(env: Env) -> None:
    ns = env.namespace("gate")
    digest = env.model("emb", ns, mode="SharedPVC")
    pod(env, ns, "p", {c.ANN_MODELS: "emb"})
    # the SharedPVC reconciler's part, played here: the claim, then its annotation
    claim = c.pvc_name(digest)
    env.client.create(k.PVCS, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "labels": {c.LABEL_PVC: "true"},
                     "annotations": {c.ANN_PVC_DIGEST: digest}},
        "spec": {"accessModes": ["ReadWriteMany"],
                 "resources": {"requests": {"storage": "1Gi"}}}}, ns)
    settle(env)
    assert gates_of(env, ns, "p") == [c.GATE]
    env.client.patch(k.PVCS, claim, {"metadata": {"annotations": {
        c.ANN_PVC_MATERIALIZED: new_digest()}}}, ns)  # another digest: not ours
    settle(env)
    assert gates_of(env, ns, "p") == [c.GATE]
    env.client.patch(k.PVCS, claim, {"metadata": {"annotations": {
        c.ANN_PVC_MATERIALIZED: digest}}}, ns)
    wait_for(lambda: lifted(env, ns, "p"), what="gate lifted once materialized")


def test_preferred_affinity_merged_into_a_gated_pod_before_lifting(env: Env) -> None:
    """The pod is admitted before any node has the model (no term then); the node gets
    it while the pod waits; the lifter adds the term, merged with the user's, and lifts."""
    ns = env.namespace("gate")
    env.model("qwen", ns, phase="Publishing")
    user = {"weight": 5, "preference": {"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["a"]}]}}
    required = {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "gpu", "operator": "Exists"}]}]}
    pod(env, ns, "p", {c.ANN_MODELS: "qwen"}, affinity={"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [user],
        "requiredDuringSchedulingIgnoredDuringExecution": required}})
    pod(env, ns, "bare", {c.ANN_MODELS: "qwen"})  # no affinity at all
    digest = new_digest()
    node = f"node-{uuid.uuid4().hex[:6]}"
    env.client.create(k.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": node, "labels": {c.node_label(digest): "true"}}})
    wait_for(lambda: c.node_label(digest) in env.delivery.node_index, what="node index")
    env.model("qwen", ns, phase="Ready", digest=digest)
    ours = {"weight": 50, "preference": {"matchExpressions": [
        {"key": c.node_label(digest), "operator": "Exists"}]}}
    for name in ("p", "bare"):
        wait_for(lambda name=name: lifted(env, ns, name), what=f"{name} lifted")
    aff = env.get("Pod", ns, "p")["spec"]["affinity"]["nodeAffinity"]
    assert aff["preferredDuringSchedulingIgnoredDuringExecution"] == [user, ours]
    assert aff["requiredDuringSchedulingIgnoredDuringExecution"] == required
    assert env.get("Pod", ns, "bare")["spec"]["affinity"] == {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [ours]}}
    env.client.delete(k.NODES, node)


def test_lifted_pods_leave_the_watch(env: Env) -> None:
    ns = env.namespace("gate")
    env.model("a", ns)
    pod(env, ns, "p", {c.ANN_MODELS: "a"})
    wait_for(lambda: lifted(env, ns, "p"), what="gate lifted")
    wait_for(lambda: env.pods.get((ns, "p")) is None, what="pod gone from the gated cache")


def test_a_ready_model_frees_exactly_its_own_pods(env: Env) -> None:
    """Pods indexed by what they wait for: Model a turning Ready lifts all of a's pods
    together (many lifts in flight) and none of b's, which still wait for b; a lifted pod
    leaves the index, so a later event of a queues nothing."""
    ns = env.namespace("gate")
    env.model("a", ns, phase="Publishing")
    env.model("b", ns, phase="Publishing")
    a_pods, b_pods = [f"a-{i}" for i in range(24)], [f"b-{i}" for i in range(6)]
    for name in a_pods:
        pod(env, ns, name, {c.ANN_MODELS: "a"})
    for name in b_pods:
        pod(env, ns, name, {c.ANN_MODELS: "b"})
    lifter = env.delivery.lifter
    wait_for(lambda: sorted(lifter.waiting_for(("Model", ns, "b"))) ==
             sorted((ns, p) for p in b_pods), what="b's pods indexed")
    assert len(lifter.waiting_for(("Model", ns, "a"))) == len(a_pods)
    env.model("a", ns, phase="Ready")
    for name in a_pods:
        wait_for(lambda name=name: lifted(env, ns, name), what=f"{name} lifted")
    wait_for(lambda: not lifter.waiting_for(("Model", ns, "a")), what="a's pods unindexed")
    settle(env)
    assert all(gates_of(env, ns, name) == [c.GATE] for name in b_pods)
    assert len(lifter.waiting_for(("Model", ns, "b"))) == len(b_pods)
    env.model("b", ns, phase="Ready")
    for name in b_pods:
        wait_for(lambda name=name: lifted(env, ns, name), what=f"{name} lifted")
