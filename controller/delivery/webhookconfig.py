"""The MutatingWebhookConfiguration: which objects the API server sends to the webhook,
and keeping it in step with the webhook's certificate.

Where it sits: ``webhook.Delivery`` asks ``kube.certs.CertKeeper`` for the
current certificate bundle, then calls ``ensure_webhook_config`` with
``webhooks(client_config(...))`` carrying that bundle as ``caBundle``, at
start and at every certificate check: in that order, so the API server
trusts a new CA before any replica presents a certificate it signed.
Every replica writes the same document, so they converge.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from api import names as c
from controller.delivery import secretaccess
from kube import client as kube

log = logging.getLogger(__name__)

MWC = kube.Resource("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
                    False, "MutatingWebhookConfiguration")
WEBHOOK_PATH = "/mutate"
TIMEOUT_SECONDS = 5  # the API server waits at most this long per call (limit: 30, asked: ≤ 10)


def _has_any(var: str, *keys: str) -> str:
    inner = " || ".join(f"'{k}' in {var}.metadata.annotations" for k in keys)
    return f"has({var}.metadata.annotations) && ({inner})"


def _ref_present(var: str, path: tuple[str, ...]) -> str:
    steps = [f"{var}.spec" + "".join(f".{p}" for p in path[:i]) for i in range(len(path) + 1)]
    return " && ".join(f"has({s})" for s in steps)


def _names_a_secret() -> str:
    """CEL: a Model that names a Secret (CREATE), or whose source naming one changed
    (UPDATE: another Secret, or another URL); paths from ``secretaccess.SECRET_REF_PATHS``,
    the same rule as ``secretaccess.to_review``."""
    paths = secretaccess.SECRET_REF_PATHS
    created = " || ".join(f"({_ref_present('object', p)})" for p in paths)
    changed = " || ".join(
        f"(({_ref_present('object', p)}) && !(({_ref_present('oldObject', p[:-1])}) && "
        f"object.spec.{'.'.join(p[:-1])} == oldObject.spec.{'.'.join(p[:-1])}))"
        for p in paths)
    return f"oldObject == null ? ({created}) : ({changed})"


def webhooks(client_config: dict[str, Any], *,
             exclude_namespaces: tuple[str, ...] = ("kube-system",)) -> list[dict[str, Any]]:
    """The three webhooks. ``matchConditions`` (CEL on the annotations) keep every object that
    does not ask for models away from the webhook, so ``failurePolicy: Fail`` refuses only
    annotated objects while the controller is down; everything else never calls it. The
    third checks Models that name a Secret (``secretaccess.py``) and patches nothing;
    a Model without Secret references never calls it."""
    common: dict[str, Any] = {
        "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
        "timeoutSeconds": TIMEOUT_SECONDS, "matchPolicy": "Equivalent",
        # a webhook added after ours (a sidecar injector) may add containers: run again
        "reinvocationPolicy": "IfNeeded",
        "namespaceSelector": {"matchExpressions": [{
            "key": "kubernetes.io/metadata.name", "operator": "NotIn",
            "values": list(exclude_namespaces)}]},
        "objectSelector": {},
        "clientConfig": client_config,
    }
    asks = (c.ANN_MODELS, c.ANN_CLUSTER_MODELS)
    return [
        {**common, "name": "workloads.modelcache.io",
         "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": ["deployments", "statefulsets", "daemonsets"],
                    "scope": "Namespaced"},
                   {"apiGroups": ["batch"], "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["jobs", "cronjobs"],
                    "scope": "Namespaced"}],
         "matchConditions": [{
             "name": "asks-for-models-or-was-injected",
             # UPDATE: the annotation may just have been removed (strip what we added)
             "expression": f"({_has_any('object', *asks, c.ANN_INJECTED)}) || "
                           f"(oldObject != null && {_has_any('oldObject', *asks)})"}]},
        {**common, "name": "pods.modelcache.io",
         "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                    "resources": ["pods"], "scope": "Namespaced"}],
         "matchConditions": [{
             "name": "asks-for-models",
             "expression": _has_any("object", *asks)},
             {"name": "not-from-an-injected-template",
              "expression": f"!(has(object.metadata.ownerReferences) && "
                            f"{_has_any('object', c.ANN_INJECTED)})"}]},
        {**common, "name": "models.modelcache.io",
         "rules": [{"apiGroups": [c.API_VERSION.partition("/")[0]], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["models"],
                    "scope": "Namespaced"}],
         "matchConditions": [{"name": "names-a-secret",
                              "expression": _names_a_secret()}]},
    ]


def service_client_config(namespace: str, service: str, port: int, ca_b64: str) -> dict[str, Any]:
    return {"service": {"namespace": namespace, "name": service, "port": port,
                        "path": WEBHOOK_PATH}, "caBundle": ca_b64}


def url_client_config(url: str, ca_b64: str) -> dict[str, Any]:
    """``url`` as given, or with ``WEBHOOK_PATH`` when it names only the server."""
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + WEBHOOK_PATH
    return {"url": url, "caBundle": ca_b64}


def _covers(live: Any, want: Any) -> bool:
    """Whether ``live`` has every field of ``want`` (the server adds defaults of its own)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(_covers(live.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(
            _covers(a, b) for a, b in zip(live, want, strict=True))
    return bool(live == want)


def ensure_webhook_config(client: kube.Kube, name: str, hooks: list[dict[str, Any]]) -> bool:
    """Create or update the MutatingWebhookConfiguration ``name``; True if it was written."""
    body = {"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "modelcache",
                                                  "app.kubernetes.io/component": "webhook"}},
            "webhooks": hooks}
    try:
        live = client.get(MWC, name)
    except kube.NotFound:
        try:
            client.create(MWC, body)
            log.info("webhook configuration created", extra={"configuration": name})
            return True
        except kube.Conflict:
            live = client.get(MWC, name)
    if _covers(live.get("webhooks"), hooks):
        return False
    # a merge patch replaces the list whole: webhooks someone else added under our name go
    client.patch(MWC, name, {"webhooks": hooks})
    log.info("webhook configuration updated", extra={"configuration": name})
    return True
