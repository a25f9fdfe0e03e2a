"""The admission webhook against the real kube-apiserver (tests/kubeenv.py).

The webhook runs in-process (``controller.delivery.webhook.Delivery``, as the
manager runs it) on 127.0.0.1; ``certs.py`` writes its CA and certificate to
a Secret and registers the MutatingWebhookConfiguration with
``clientConfig.url`` and that CA, so the API server itself calls it over TLS
and applies its JSON patches. Models get their status through the status
subresource (no controller runs here). For each of the six kinds the stored
object is asserted field by field in both modes; re-apply is idempotent
(the generation does not move), removing the annotation removes the
injection, bad requests are refused with the message users see. No
controller-manager runs, so Deployments make no pods: pass-through is shown
with a Pod built from a stored template.

The fixtures here are shared with test_delivery_gates.py.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from api import names as c
from controller.delivery import webhook, webhookconfig
from controller.metrics import Metrics
from kube import certs
from kube import client as k
from kube.events import Recorder
from kube.informer import Informer
from tests import kubeenv
from tests.integration.test_crds import install_crds

kube = kubeenv.kube

SYSTEM_NS = "modelcache-system"
KINDS = ["Pod", "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"]
RES = {"Pod": k.PODS, "Deployment": k.DEPLOYMENTS, "StatefulSet": k.STATEFULSETS,
       "DaemonSet": k.DAEMONSETS, "Job": k.JOBS, "CronJob": k.CRONJOBS}
NAMESPACES = k.Resource("", "v1", "namespaces", False, "Namespace")


def wait_for(fn: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def new_digest() -> str:
    return "sha256:" + hashlib.sha256(uuid.uuid4().bytes).hexdigest()


class Env:
    """The webhook as the manager runs it, and helpers to drive models and workloads."""

    def __init__(self, kenv: kubeenv.KubeEnv) -> None:
        self.kenv = kenv
        self.client = k.Kube.from_config(kenv.kubeconfig)
        self.metrics = Metrics()
        self.models = Informer(self.client, k.MODELS)
        self.cluster_models = Informer(self.client, k.CLUSTER_MODELS)
        self.nodes = Informer(self.client, k.NODES, transform=webhook.gates.node_transform)
        self.pods = Informer(self.client, k.PODS, label_selector=f"{c.LABEL_GATED}=true",
                             transform=webhook.gates.pod_transform)
        self.pvcs = Informer(self.client, k.PVCS, label_selector=f"{c.LABEL_PVC}=true")
        self.informers = [self.models, self.cluster_models, self.nodes, self.pods, self.pvcs]
        self.recorder = Recorder(self.client)
        port = kubeenv.free_port()
        self.cfg = webhook.Config(listen=("127.0.0.1", port), url=f"https://127.0.0.1:{port}",
                                  config_name=f"modelcache-test-{uuid.uuid4().hex[:6]}")
        self.delivery = webhook.Delivery(
            self.client, self.cfg, SYSTEM_NS, models=self.models,
            cluster_models=self.cluster_models, pods=self.pods, nodes=self.nodes,
            pvcs=self.pvcs, recorder=self.recorder, metrics=self.metrics)

    def start(self) -> None:
        for i in self.informers:
            i.start()
        for i in self.informers:
            assert i.synced.wait(30), i.res.plural
        self.recorder.start()
        self.delivery.start()

    def stop(self) -> None:
        self.delivery.stop()
        self.recorder.stop()
        for i in self.informers:
            i.stop()
        self.client.delete(webhookconfig.MWC, self.cfg.config_name)
        self.client.close()

    # -- namespaces and models -----------------------------------------------

    def namespace(self, prefix: str = "wl") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.client.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": name}})
        # no controller-manager makes it, and pods need it (ServiceAccount admission)
        self.client.create(k.Resource("", "v1", "serviceaccounts"), {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, name)
        return name

    def model(self, name: str, namespace: str | None, *, phase: str = "Ready",
              digest: str | None = None, mode: str | None = None,
              reason: str = "Published", message: str = "") -> str:
        """Create (or re-status) a Model (ClusterModel when ``namespace`` is None)."""
        res = k.MODELS if namespace else k.CLUSTER_MODELS
        kind = "Model" if namespace else "ClusterModel"
        spec: dict[str, Any] = {"source": {"huggingFace": {"repo": f"org/{name}"}}}
        if mode:
            spec["delivery"] = {"mode": mode}
        try:
            self.client.create(res, {"apiVersion": "modelcache.io/v1alpha1", "kind": kind,
                                     "metadata": {"name": name}, "spec": spec}, namespace)
        except k.Conflict:
            pass
        digest = digest or new_digest()
        status: dict[str, Any] = {
            "phase": phase, "resolved": {"family": "qwen2", "format": "Safetensors"},
            "conditions": [{"type": "Ready", "status": "True" if phase == "Ready" else "False",
                            "reason": reason if phase != "Pending" else "Pending",
                            "message": message or phase,
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        if phase in ("Ready", "Failed"):
            status["artifact"] = {"digest": digest, "sizeBytes": 1}
        self.client.patch(res, name, {"status": status}, namespace, sub="status")
        inf = self.models if namespace else self.cluster_models
        wait_for(lambda: ((inf.get((namespace or "", name)) or {}).get("status") or {})
                 .get("phase") == phase, what=f"{kind} {name} {phase} in the cache")
        return digest

    # -- workloads ---------------------------------------------------------------

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.client.create(RES[kind], body, namespace)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.client.get(RES[kind], name, namespace)

    def count(self) -> float:
        return sum(s.value for m in self.metrics.admissions.collect() for s in m.samples
                   if s.name.endswith("_total"))


def running_env(kube: kubeenv.KubeEnv) -> Iterator[Env]:
    """CRDs, the controller's namespace, and the webhook started (shared with the gates'
    tests, which also start the lifter)."""
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    try:
        client.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": SYSTEM_NS}})
    except k.Conflict:
        pass
    client.close()
    e = Env(kube)
    e.start()
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="module")
def env(kube: kubeenv.KubeEnv) -> Iterator[Env]:
    yield from running_env(kube)


# -- workload bodies ----------------------------------------------------------------


def pod_spec(restart: str = "Always") -> dict[str, Any]:
    return {"restartPolicy": restart, "automountServiceAccountToken": False,
            "initContainers": [{"name": "warm", "image": "busybox"}],
            "containers": [{"name": "app", "image": "vllm",
                            "env": [{"name": "USER_VAR", "value": "1"}],
                            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            "volumes": [{"name": "scratch", "emptyDir": {}}]}


def body(kind: str, name: str, annotations: dict[str, str]) -> dict[str, Any]:
    labels = {"app": name}
    tpl = {"metadata": {"labels": labels}, "spec": pod_spec()}
    job_tpl = {"metadata": {"labels": labels}, "spec": pod_spec("Never")}
    meta = {"name": name, "annotations": annotations}
    api = {"Pod": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1",
           "Job": "batch/v1", "CronJob": "batch/v1"}[kind]
    spec: dict[str, Any]
    if kind == "Pod":
        meta["labels"] = labels
        spec = pod_spec()
    elif kind == "Job":
        spec = {"template": job_tpl}
    elif kind == "CronJob":
        spec = {"schedule": "@daily", "jobTemplate": {"spec": {"template": job_tpl}}}
    else:
        spec = {"selector": {"matchLabels": labels}, "template": tpl}
        if kind == "StatefulSet":
            spec["serviceName"] = name
    return {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}


def template(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind == "Pod":
        return obj
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def user_labels(labels: dict[str, str]) -> dict[str, str]:
    """Without the labels the Job API adds to its template."""
    return {k: v for k, v in labels.items() if "job-name" not in k and "controller-uid" not in k}


def models_env(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"name": "AI_MODELS_MODELS_DIR", "value": "/data/modelcache/models"},
            {"name": "AI_MODELS_MODELS", "value": json.dumps(entries, separators=(",", ":"))}]


# -- injection, six kinds, two modes --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_nodecache_injection_is_stored(env: Env, kind: str) -> None:
    ns = env.namespace()
    d1 = env.model("qwen", ns)
    cm = f"llama-{uuid.uuid4().hex[:6]}"
    d2 = env.model(cm, None)
    stored = env.create(kind, ns, body(kind, "w", {c.ANN_MODELS: "qwen",
                                                   c.ANN_CLUSTER_MODELS: cm}))
    tpl = template(stored, kind)
    spec, meta = tpl["spec"], tpl["metadata"]
    vol_c = {"name": f"modelcache-c-{cm}", "csi": {
        "driver": "nodecache.modelcache.io", "readOnly": True,
        "volumeAttributes": {"clusterModel": cm, "digest": d2}}}
    assert spec["volumes"] == [
        {"name": "scratch", "emptyDir": {}},
        {"name": "modelcache-m-qwen", "csi": {"driver": "nodecache.modelcache.io",
                                              "readOnly": True, "volumeAttributes": {
                                                  "model": "qwen", "digest": d1}}},
        vol_c]
    mounts = [{"name": "modelcache-m-qwen", "mountPath": "/data/modelcache/models/qwen",
               "readOnly": True},
              {"name": f"modelcache-c-{cm}", "mountPath": f"/data/modelcache/models/{cm}",
               "readOnly": True}]
    want_env = models_env([
        {"name": "qwen", "path": "/data/modelcache/models/qwen", "digest": d1,
         "family": "qwen2", "format": "Safetensors"},
        {"name": cm, "path": f"/data/modelcache/models/{cm}", "digest": d2,
         "family": "qwen2", "format": "Safetensors"}])
    app, warm = spec["containers"][0], spec["initContainers"][0]
    assert [(m["name"], m["mountPath"], m.get("readOnly")) for m in app["volumeMounts"]] == \
        [("scratch", "/scratch", None)] + [(m["name"], m["mountPath"], True) for m in mounts]
    assert all("subPath" not in m for m in app["volumeMounts"])
    assert app["env"] == [{"name": "USER_VAR", "value": "1"}, *want_env]
    assert [(m["name"], m["mountPath"]) for m in warm["volumeMounts"]] == \
        [(m["name"], m["mountPath"]) for m in mounts]
    assert warm["env"] == want_env
    assert spec["schedulingGates"] == [{"name": "modelcache.io/model-ready"}]
    assert user_labels(meta["labels"]) == {"app": "w", c.LABEL_GATED: "true"}
    fp = meta["annotations"][c.ANN_INJECTED]
    if kind != "Pod":
        assert stored["metadata"]["annotations"][c.ANN_INJECTED] == fp
        assert c.LABEL_USES_SHARED_PVC not in (stored["metadata"].get("labels") or {})
    assert "affinity" not in spec  # no node caches these digests


@pytest.mark.parametrize("kind", KINDS)
def test_sharedpvc_injection_is_stored(env: Env, kind: str) -> None:
    ns = env.namespace()
    digest = env.model("emb", ns, mode="SharedPVC")
    stored = env.create(kind, ns, body(kind, "w", {c.ANN_MODELS: "emb"}))
    tpl = template(stored, kind)
    assert tpl["spec"]["volumes"][-1] == {"name": "modelcache-m-emb", "persistentVolumeClaim": {
        "claimName": c.pvc_name(digest), "readOnly": True}}
    for ctr in tpl["spec"]["containers"] + tpl["spec"]["initContainers"]:
        m = ctr["volumeMounts"][-1]
        assert (m["name"], m["mountPath"], m["readOnly"], m["subPath"]) == (
            "modelcache-m-emb", "/data/modelcache/models/emb", True, c.pvc_subpath(digest))
    assert tpl["metadata"]["labels"][c.LABEL_USES_SHARED_PVC] == "true"
    assert tpl["metadata"]["labels"][c.LABEL_GATED] == "true"
    assert stored["metadata"]["labels"][c.LABEL_USES_SHARED_PVC] == "true"
    assert tpl["spec"]["schedulingGates"] == [{"name": c.GATE}]


def test_delivery_annotation_overrides_the_model(env: Env) -> None:
    ns = env.namespace()
    env.model("emb", ns, mode="SharedPVC")
    stored = env.create("Deployment", ns, body("Deployment", "w", {
        c.ANN_MODELS: "emb", c.ANN_DELIVERY: "NodeCache"}))
    assert "csi" in template(stored, "Deployment")["spec"]["volumes"][-1]


# -- re-apply, removal ----------------------------------------------------------------


def _apply(env: Env, ns: str, obj: dict[str, Any]) -> str:
    done = env.kenv.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj),
                            check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet", "CronJob"])
def test_reapply_is_idempotent_and_removal_restores(env: Env, kind: str) -> None:
    ns = env.namespace()
    env.model("qwen", ns)
    plain = body(kind, "plain", {})
    env.create(kind, ns, plain)  # the same workload, never injected: the reference
    want = env.get(kind, ns, "plain")
    obj = body(kind, "w", {c.ANN_MODELS: "qwen", "team": "a"})
    _apply(env, ns, obj)
    first = env.get(kind, ns, "w")
    _apply(env, ns, obj)  # kubectl apply again: nothing may change
    again = env.get(kind, ns, "w")
    assert again["metadata"]["generation"] == first["metadata"]["generation"]
    assert template(again, kind) == template(first, kind)
    # a full replace (PUT of what was read) is idempotent too: no duplicate volumes
    env.client.replace(RES[kind], "w", again, ns)
    third = env.get(kind, ns, "w")
    assert template(third, kind) == template(first, kind)
    assert len(template(third, kind)["spec"]["volumes"]) == 2
    # drop the annotation: the injection goes, the user's fields stay
    del obj["metadata"]["annotations"][c.ANN_MODELS]
    _apply(env, ns, obj)
    back = env.get(kind, ns, "w")
    assert template(back, kind)["spec"] == template(want, kind)["spec"]
    assert template(back, kind)["metadata"]["labels"] == {"app": "w"}
    assert c.ANN_INJECTED not in (template(back, kind)["metadata"].get("annotations") or {})
    assert c.ANN_INJECTED not in back["metadata"]["annotations"]
    assert back["metadata"]["annotations"]["team"] == "a"


def test_metadata_update_after_the_model_is_gone(env: Env) -> None:
    """Labels, replicas: the injection stays as it was and no model is looked up."""
    ns = env.namespace()
    env.model("qwen", ns)
    dep = env.create("Deployment", ns, body("Deployment", "w", {c.ANN_MODELS: "qwen"}))
    env.client.delete(k.MODELS, "qwen", ns)
    wait_for(lambda: env.models.get((ns, "qwen")) is None, what="model gone from the cache")
    env.kenv.kubectl("label", "-n", ns, "deployment/w", "touched=yes")
    env.kenv.kubectl("scale", "-n", ns, "deployment/w", "--replicas=3")
    out = env.get("Deployment", ns, "w")
    assert out["metadata"]["labels"]["touched"] == "yes" and out["spec"]["replicas"] == 3
    assert template(out, "Deployment") == template(dep, "Deployment")
    # a template change does look the model up again, and is refused now
    out["spec"]["template"]["spec"]["containers"][0]["image"] = "vllm:2"
    with pytest.raises(k.ApiError, match=f"Model qwen not found in namespace {ns}"):
        env.client.replace(k.DEPLOYMENTS, "w", out, ns)


def test_job_update_passes_through(env: Env) -> None:
    ns = env.namespace()
    env.model("qwen", ns)
    job = env.create("Job", ns, body("Job", "j", {c.ANN_MODELS: "qwen"}))
    job["metadata"].setdefault("labels", {})["touched"] = "yes"
    out = env.client.replace(k.JOBS, "j", job, ns)
    assert out["metadata"]["labels"]["touched"] == "yes"
    assert template(out, "Job")["spec"]["volumes"] == template(job, "Job")["spec"]["volumes"]


# -- refusals -------------------------------------------------------------------------


def _refused(env: Env, kind: str, ns: str, obj: dict[str, Any]) -> str:
    with pytest.raises(k.ApiError) as e:
        env.create(kind, ns, obj)
    return str(e.value)


def test_unknown_and_foreign_models_are_refused(env: Env) -> None:
    ns, other = env.namespace(), env.namespace()
    env.model("elsewhere", other)
    msg = _refused(env, "Deployment", ns, body("Deployment", "w", {c.ANN_MODELS: "elsewhere"}))
    assert 'admission webhook "workloads.modelcache.io" denied the request: ' \
           f"Model elsewhere not found in namespace {ns}" in msg
    msg = _refused(env, "Pod", ns, body("Pod", "p", {c.ANN_MODELS: "nope"}))
    assert f'"pods.modelcache.io" denied the request: Model nope not found in namespace {ns}' \
        in msg
    msg = _refused(env, "Deployment", ns, body("Deployment", "w",
                                               {c.ANN_MODELS: f"{other}/elsewhere"}))
    assert f"Model {other}/elsewhere does not exist or is not shared with namespace {ns}" \
        in msg  # no grant in its spec.sharing (test_model_sharing.py)
    msg = _refused(env, "Job", ns, body("Job", "j", {c.ANN_CLUSTER_MODELS: "no-such"}))
    assert "ClusterModel no-such not found" in msg
    msg = _refused(env, "Deployment", ns, body("Deployment", "w", {
        c.ANN_MODELS: "elsewhere", c.ANN_DELIVERY: "Magic"}))
    assert "'Magic' is not one of NodeCache, SharedPVC" in msg


def test_sharedpvc_refused_until_ready(env: Env) -> None:
    ns = env.namespace()
    env.model("emb", ns, phase="Publishing", mode="SharedPVC")
    msg = _refused(env, "Deployment", ns, body("Deployment", "w", {c.ANN_MODELS: "emb"}))
    assert "Model emb is not Ready yet (phase Publishing): SharedPVC delivery needs the " \
           "model's digest at admission" in msg
    env.model("emb", ns, phase="Ready")
    env.create("Deployment", ns, body("Deployment", "w", {c.ANN_MODELS: "emb"}))


def test_failed_model_is_admitted_with_a_warning(env: Env) -> None:
    ns = env.namespace()
    env.model("bad", ns, phase="Failed", reason="SourceNotFound", message="repo gone")
    out = _apply(env, ns, body("Deployment", "w", {c.ANN_MODELS: "bad"}))
    assert "Warning: Model bad is Failed (SourceNotFound): pods wait at the scheduling " \
           "gate modelcache.io/model-ready until it is Ready" in out
    stored = env.get("Deployment", ns, "w")
    assert template(stored, "Deployment")["spec"]["schedulingGates"] == [{"name": c.GATE}]


def test_model_created_just_before_the_workload(env: Env) -> None:
    """A cache miss is checked live: ``kubectl apply -f dir/`` creates both at once."""
    ns = env.namespace()
    env.client.create(k.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                                 "metadata": {"name": "fresh"},
                                 "spec": {"source": {"huggingFace": {"repo": "o/r"}}}}, ns)
    stored = env.create("Pod", ns, body("Pod", "p", {c.ANN_MODELS: "fresh"}))
    assert stored["spec"]["volumes"][-1]["csi"]["volumeAttributes"] == {"model": "fresh"}


# -- what never calls the webhook, what passes through ---------------------------------------


def test_unannotated_objects_never_reach_the_webhook(env: Env) -> None:
    ns = env.namespace()
    before = env.count()
    for kind in KINDS:
        env.create(kind, ns, body(kind, "plain", {"other": "x"}))
    assert env.count() == before


def test_pod_from_an_injected_template_passes_through(env: Env) -> None:
    ns = env.namespace()
    env.model("qwen", ns)
    dep = env.create("Deployment", ns, body("Deployment", "w", {c.ANN_MODELS: "qwen"}))
    tpl = template(dep, "Deployment")
    before = env.count()
    pod = env.create("Pod", ns, {"apiVersion": "v1", "kind": "Pod",
                                 "metadata": {**copy.deepcopy(tpl["metadata"]), "name": "w-1"},
                                 "spec": copy.deepcopy(tpl["spec"])})
    assert env.count() == before  # matchConditions: no model annotation on the pod
    for key in ("volumes", "schedulingGates", "initContainers"):
        assert pod["spec"][key] == tpl["spec"][key], key
    assert pod["spec"]["containers"][0]["env"] == tpl["spec"]["containers"][0]["env"]
    assert pod["spec"]["containers"][0]["volumeMounts"] == \
        tpl["spec"]["containers"][0]["volumeMounts"]
    # the same pod with an owner and the annotation (put on a template by its user) is left
    # alone as well, by the webhook's match conditions
    meta = copy.deepcopy(tpl["metadata"])
    meta["annotations"][c.ANN_MODELS] = "qwen"
    owned = env.create("Pod", ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        **meta, "name": "w-2", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "w",
            "uid": dep["metadata"]["uid"]}]}, "spec": copy.deepcopy(tpl["spec"])})
    assert owned["spec"]["volumes"] == tpl["spec"]["volumes"]
    assert env.count() == before


# -- cache-aware scheduling -------------------------------------------------------------


def test_preferred_affinity_when_a_node_caches_the_model(env: Env) -> None:
    ns = env.namespace()
    digest = env.model("qwen", ns)
    node = f"node-{uuid.uuid4().hex[:6]}"
    env.client.create(k.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": node, "labels": {c.node_label(digest): "true"}}})
    wait_for(lambda: c.node_label(digest) in env.delivery.node_index, what="node index")
    user_term = {"weight": 5, "preference": {"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["a"]}]}}
    obj = body("Deployment", "w", {c.ANN_MODELS: "qwen"})
    obj["spec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [user_term]}}
    stored = env.create("Deployment", ns, obj)
    terms = template(stored, "Deployment")["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms == [user_term, {"weight": 50, "preference": {"matchExpressions": [
        {"key": c.node_label(digest), "operator": "Exists"}]}}]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in \
        template(stored, "Deployment")["spec"]["affinity"]["nodeAffinity"]
    env.client.delete(k.NODES, node)


# -- certificates ---------------------------------------------------------------------


def test_certificate_rotation_keeps_the_webhook_trusted(env: Env) -> None:
    ns = env.namespace()
    env.model("qwen", ns)
    keeper = env.delivery.keeper
    secret = env.client.get(k.SECRETS, env.cfg.secret, SYSTEM_NS)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "ca.key", "ca-bundle.crt", "tls.crt", "tls.key"}
    first = keeper.ensure()
    assert keeper.ensure() == first  # nothing due: nothing rewritten
    real_clock = keeper.clock
    try:
        # 70 days on: the 90-day serving certificate is due, the CA is not
        keeper.clock = lambda: real_clock() + datetime.timedelta(days=70)
        second = keeper.ensure()
        assert second.cert != first.cert and second.ca_bundle == first.ca_bundle
        # 500 days on: a new CA; the old one stays in the bundle until it expires
        keeper.clock = lambda: real_clock() + datetime.timedelta(days=500)
        third = keeper.ensure()
        assert third.ca_bundle.count(b"BEGIN CERTIFICATE") == 2
        assert third.ca_bundle.endswith(first.ca_bundle)
    finally:
        keeper.clock = real_clock
    # back to today: the future CA is not valid yet, so it is replaced again; the
    # configuration's bundle is written before the new certificate is served
    env.delivery.sync_certificates()
    now = keeper.ensure()
    assert now.ca_bundle.endswith(first.ca_bundle) and now.cert not in (first.cert, third.cert)
    mwc = env.client.get(webhookconfig.MWC, env.cfg.config_name)
    assert {base64.b64decode(w["clientConfig"]["caBundle"]) for w in mwc["webhooks"]} == \
        {now.ca_bundle}
    # the API server still reaches the webhook, now serving the certificate of the new CA
    pod = env.create("Pod", ns, body("Pod", "after-rotation", {c.ANN_MODELS: "qwen"}))
    assert pod["spec"]["schedulingGates"] == [{"name": c.GATE}]


def test_webhook_configuration(env: Env) -> None:
    mwc = env.client.get(webhookconfig.MWC, env.cfg.config_name)
    by = {w["name"]: w for w in mwc["webhooks"]}
    assert set(by) == {"workloads.modelcache.io", "pods.modelcache.io", "models.modelcache.io"}
    for w in by.values():
        assert w["failurePolicy"] == "Fail" and w["timeoutSeconds"] <= 10
        assert w["sideEffects"] == "None"
        assert w["clientConfig"]["url"] == f"https://127.0.0.1:{env.cfg.listen[1]}/mutate"
    assert by["pods.modelcache.io"]["rules"][0]["operations"] == ["CREATE"]
    assert {r for rule in by["workloads.modelcache.io"]["rules"] for r in rule["resources"]} == \
        {"deployments", "statefulsets", "daemonsets", "jobs", "cronjobs"}
    # a second sync writes nothing
    assert not webhookconfig.ensure_webhook_config(
        env.client, env.cfg.config_name,
        webhookconfig.webhooks(env.delivery.client_config(env.delivery.keeper.ensure())))


# -- latency ----------------------------------------------------------------------------


def test_admission_latency(env: Env) -> None:
    """200 bare Pods through the real API server, with and without the webhook in the
    path; figures printed (run with -s), only a loose bound asserted."""
    ns = env.namespace()
    env.model("qwen", ns)
    handler: list[float] = []
    review = env.delivery.admission.review

    def timed(b: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            return review(b)
        finally:
            handler.append(time.perf_counter() - t0)

    env.delivery.server.admission.review = timed  # type: ignore[union-attr,method-assign]
    try:
        def run(annotations: dict[str, str], prefix: str) -> list[float]:
            out = []
            for i in range(200):
                t0 = time.perf_counter()
                env.create("Pod", ns, body("Pod", f"{prefix}-{i}", annotations))
                out.append(time.perf_counter() - t0)
            return out

        with_hook = run({c.ANN_MODELS: "qwen"}, "lat")
        without = run({}, "plain")
    finally:
        del env.delivery.server.admission.review  # type: ignore[union-attr]

    def pct(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000

    print(f"\nadmission latency over 200 pod creates: webhook handler p50 "
          f"{pct(handler, .5):.2f} ms p99 {pct(handler, .99):.2f} ms; API create with webhook "
          f"p50 {pct(with_hook, .5):.1f} ms p99 {pct(with_hook, .99):.1f} ms, without "
          f"p50 {pct(without, .5):.1f} ms p99 {pct(without, .99):.1f} ms "
          f"(mean delta {1000 * (statistics.mean(with_hook) - statistics.mean(without)):.1f} ms)")
    assert len(handler) == 200
    assert pct(with_hook, .99) < webhookconfig.TIMEOUT_SECONDS * 1000


def test_certificate_plan_renews_for_new_hosts_and_drops_expired_cas() -> None:
    """``certs.plan_secret`` alone (no API server): host changes and CA expiry."""
    now = datetime.datetime.now(datetime.UTC)
    life = {"ca_lifetime": datetime.timedelta(days=730),
            "cert_lifetime": datetime.timedelta(days=90)}
    first = certs.plan_secret({}, ["svc.ns.svc"], now, **life)
    assert certs.plan_secret(first, ["svc.ns.svc"], now, **life) == first
    moved = certs.plan_secret(first, ["svc.other.svc"], now, **life)
    assert moved[certs.TLS_CERT] != first[certs.TLS_CERT]
    assert moved[certs.CA_CERT] == first[certs.CA_CERT]
    rotated = certs.plan_secret(first, ["svc.ns.svc"], now + datetime.timedelta(days=600),
                                **life)
    assert rotated[certs.CA_BUNDLE].count(b"BEGIN CERTIFICATE") == 2
    # once the old CA has expired it leaves the bundle
    later = certs.plan_secret(rotated, ["svc.ns.svc"], now + datetime.timedelta(days=800),
                              **life)
    assert later[certs.CA_BUNDLE] == later[certs.CA_CERT] == rotated[certs.CA_CERT]
