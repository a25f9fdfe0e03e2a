"""The admission webhook fails closed when it cannot look a model up.

The attack: a workload names a Model the webhook's caches do not hold yet
(the case where it asks the API server live), while that lookup fails: the
API server is down, slow, answers 500 or an HTML page, answers a JSON that
is not the Model, or answers another namespace's Ready Model in its place.
The hope is an admission anyway (with a guessed or foreign digest). Each is
a 503 denial with a reason and no patch; once the API server answers again
the same request is admitted at once (nothing of the failure was kept).

The lookups go, with the controller's own ServiceAccount token and the RBAC
of daemonset/controller-rbac.yaml, through the misbehaving loopback proxy of
test_catalog_fail_closed.py in front of the real kube-apiserver; the
informers are real but never started (every lookup is a cache miss). A
webhook that cannot be reached at all is refused by the API server itself
(``failurePolicy: Fail``): ``test_unreachable_webhook_refuses_the_pod``.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from api import names as c
from controller.delivery import gates, webhook, webhookconfig
from kube import client as k
from kube.events import Recorder
from kube.informer import Informer
from tests import kubeenv
from tests.integration import test_catalog_api as api
from tests.integration import test_controller
from tests.integration.test_catalog_fail_closed import ApiProxy

kube = kubeenv.kube
cluster = test_controller.cluster


@pytest.fixture(scope="module")
def namespace(kube: kubeenv.KubeEnv, cluster: k.Kube) -> str:
    api.apply_controller_rbac(kube)
    ns = f"wfc-{uuid.uuid4().hex[:6]}"
    test_controller.ensure_namespace(cluster, ns)
    # no controller-manager makes it, and pods need it (ServiceAccount admission)
    cluster.create(k.Resource("", "v1", "serviceaccounts"), {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, ns)
    cluster.create(k.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                              "metadata": {"name": "m1"},
                              "spec": {"source": {"http": {"url": "https://x.example/m.tar"}}}},
                   ns)
    return ns


@pytest.fixture(scope="module")
def proxy(kube: kubeenv.KubeEnv) -> Iterator[ApiProxy]:
    p = ApiProxy(kube.server, kube.pki.ca)
    yield p
    p.stop()


def controller_client(kube: kubeenv.KubeEnv, url: str) -> k.Kube:
    from kubernetes import client as kc

    cfg = kc.Configuration()
    cfg.host = url
    cfg.api_key = {"authorization": "Bearer " + api.sa_token(kube, "modelcache-controller",
                                                               api.SYSTEM_NS)}
    return k.Kube(kc.ApiClient(cfg))


def admission(client: k.Kube) -> webhook.Admission:
    # real informers, not started: empty caches, so every model is looked up live
    return webhook.Admission(client, Informer(client, k.MODELS),
                             Informer(client, k.CLUSTER_MODELS), gates.NodeIndex())


@pytest.fixture
def adm(kube: kubeenv.KubeEnv, namespace: str, proxy: ApiProxy) -> Iterator[webhook.Admission]:
    proxy.mode, proxy.only = "ok", ""
    if proxy.server is None:
        proxy.start()
    client = controller_client(kube, proxy.url)
    yield admission(client)
    client.close()


def review(adm: webhook.Admission, ns: str, model: str = "m1") -> dict[str, Any]:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "w", "namespace": ns, "annotations": {c.ANN_MODELS: model}},
           "spec": {"containers": [{"name": "app", "image": "vllm"}]}}
    body = {"request": {"uid": uuid.uuid4().hex, "kind": {"kind": "Pod"},
                        "operation": "CREATE", "namespace": ns, "object": pod}}
    return dict(adm.review(body)["response"])


def assert_refused(resp: dict[str, Any]) -> None:
    assert resp["allowed"] is False, resp
    assert resp["status"]["code"] == 503 and resp["status"]["reason"] == "ServiceUnavailable"
    assert "cannot look up Model m1" in resp["status"]["message"]
    assert "patch" not in resp


def assert_admitted(resp: dict[str, Any]) -> None:
    assert resp["allowed"] is True and resp.get("patch"), resp


@pytest.mark.parametrize("mode", ["500", "garbage", "strings", "nouser", "hang"])
def test_failed_lookup_is_a_503_denial_and_not_kept(adm: webhook.Admission, proxy: ApiProxy,
                                                    namespace: str, mode: str) -> None:
    assert_admitted(review(adm, namespace))  # the path works with the controller's RBAC
    proxy.mode, proxy.hang = mode, webhook.LOOKUP_TIMEOUT + 1.0
    assert_refused(review(adm, namespace))
    proxy.mode = "ok"
    assert_admitted(review(adm, namespace))


def test_dead_api_server_is_a_503_denial(adm: webhook.Admission, proxy: ApiProxy,
                                         namespace: str) -> None:
    proxy.stop()  # nothing listens on the API server's address now
    assert_refused(review(adm, namespace))
    proxy.start()
    assert_admitted(review(adm, namespace))


def test_another_object_in_the_answer_is_refused(kube: kubeenv.KubeEnv,
                                                 namespace: str) -> None:
    """Something answering in the API server's place with another namespace's Ready Model
    does not get its digest into the pod."""
    foreign = json.dumps({
        "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
        "metadata": {"name": "secret-model", "namespace": "team-b"},
        "spec": {"source": {"http": {"url": "https://x.example/b.tar"}}},
        "status": {"phase": "Ready", "artifact": {
            "digest": "sha256:" + "b" * 64, "reference": "dmcr/models/team-b/secret@x"}}}
    ).encode()

    class Liar(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(foreign)))
            self.end_headers()
            self.wfile.write(foreign)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = controller_client(kube, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        resp = review(admission(client), namespace)
        assert_refused(resp)
        assert "b" * 64 not in json.dumps(resp)
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def test_unreachable_webhook_refuses_the_pod(kube: kubeenv.KubeEnv, cluster: k.Kube,
                                             namespace: str) -> None:
    """The webhook itself down: the API server refuses annotated objects
    (``failurePolicy: Fail``) rather than admitting them uninjected."""
    dead = f"https://127.0.0.1:{kubeenv.free_port()}{webhookconfig.WEBHOOK_PATH}"
    hooks = webhookconfig.webhooks(webhookconfig.url_client_config(dead, ""))
    for h in hooks:  # only this test's namespace: other tests share the API server
        h["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    name = f"modelcache-dead-{uuid.uuid4().hex[:6]}"
    cluster.create(webhookconfig.MWC, {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name}, "webhooks": hooks})
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "w", "annotations": {c.ANN_MODELS: "m1"}},
           "spec": {"automountServiceAccountToken": False,
                    "containers": [{"name": "app", "image": "vllm"}]}}
    try:
        deadline = 20
        while True:  # the API server picks the configuration up within a moment
            try:
                cluster.create(k.PODS, pod, namespace)
            except k.ApiError as e:
                assert e.status == 500 and "failed calling webhook" in str(e), e
                break
            cluster.delete(k.PODS, "w", namespace)
            deadline -= 1
            assert deadline > 0, "the pod was admitted past a dead webhook"
            threading.Event().wait(0.25)
        with pytest.raises(k.NotFound):
            cluster.get(k.PODS, "w", namespace)
    finally:
        cluster.delete(webhookconfig.MWC, name)


@pytest.mark.parametrize("mode", ["500", "dead"])
def test_gate_stays_when_the_lift_cannot_be_written(kube: kubeenv.KubeEnv, cluster: k.Kube,
                                                    namespace: str, proxy: ApiProxy,
                                                    mode: str) -> None:
    """The gate lifter decides from its caches and lifts only by a successful patch: with
    the API server failing, the pod keeps its gate and the key is retried."""
    name = f"gated-{mode}"
    cluster.create(k.PODS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {c.LABEL_GATED: "true"}},
        "spec": {"automountServiceAccountToken": False, "schedulingGates": [{"name": c.GATE}],
                 "containers": [{"name": "app", "image": "vllm"}]}}, namespace)
    pods = Informer(cluster, k.PODS, namespace=namespace,
                    label_selector=f"{c.LABEL_GATED}=true", transform=gates.pod_transform)
    pods.start()
    proxy.mode, proxy.only = ("500" if mode == "500" else "ok"), ""
    if mode == "dead":
        proxy.stop()
    client = controller_client(kube, proxy.url)
    try:
        assert pods.synced.wait(30)
        lifter = gates.GateLifter(client, pods=pods, models=Informer(client, k.MODELS),
                                  cluster_models=Informer(client, k.CLUSTER_MODELS),
                                  pvcs=None, nodes=gates.NodeIndex(), recorder=Recorder(client))
        with pytest.raises(k.ApiError):
            lifter.sync((namespace, name))  # nothing blocks it: it tries to lift
        stored = cluster.get(k.PODS, name, namespace)
        assert stored["spec"]["schedulingGates"] == [{"name": c.GATE}]
        assert stored["metadata"]["labels"][c.LABEL_GATED] == "true"
    finally:
        pods.stop()
        client.close()
        if proxy.server is None:
            proxy.start()
        proxy.mode = "ok"
