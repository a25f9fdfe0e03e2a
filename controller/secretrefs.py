"""Which Secrets of the controller's namespace a ClusterModel or a catalog source may use.

A ClusterModel's ``authSecretRef`` and a ModelCatalogSource's
``tokenSecretRef`` name a Secret in the controller's namespace, and the
worker sends its value to the source's URL, which the object's author
chose. Without a rule that makes the controller a deputy: a source at
``https://attacker/`` naming ``dmcr-credentials`` would receive the
registry push password as its bearer token. So a Secret there is usable
only when an admin opted it in (``names.LABEL_SECRET_USABLE: "true"``),
and the controller's own Secrets are refused by name (and by the
managed-by label: the per-Job copies, upload tokens) even if labelled.

A namespaced Model's Secret is always in the Model's own namespace
(``publishjob.plan``); this module is about the controller's namespace.
Pure: the callers bring the Secret's labels (from the cache or a get).
"""

from __future__ import annotations

from collections.abc import Mapping

from api import names

REASON = "SecretNotAllowed"

# the chart's (and the manager's flag defaults') own Secrets: never a source credential
CONTROLLER_SECRETS = frozenset({
    "dmcr-credentials", "dmcr-pull-credentials", "dmcr-htpasswd", "dmcr-pull-htpasswd",
    "modelcache-report-key", "modelcache-upload-admin-token", "modelcache-webhook-tls",
    "modelcache-catalog-tls", "modelcache-dmcr-tls", "modelcache-dmcr-token"})


def refusal(namespace: str, name: str, labels: Mapping[str, str] | None, *,
            reserved: frozenset[str] = frozenset()) -> str | None:
    """Why Secret ``namespace/name`` may not be used by a cluster-scoped object, or None.

    ``labels``: the Secret's labels, None when it does not exist (then only the
    name is judged; the caller waits for it). ``reserved``: more names of the
    controller's own (its ``--registry-secret``, say).
    """
    where = f"Secret {namespace}/{name}"
    if name in CONTROLLER_SECRETS or name in reserved or (
            (labels or {}).get(names.LABEL_MANAGED) == names.MANAGER):
        return f"{where} is one of the controller's own credentials and is never lent to a source"
    if labels is not None and labels.get(names.LABEL_SECRET_USABLE) != "true":
        return (f"{where} is not marked usable: an admin opts a Secret in with the label "
                f"{names.LABEL_SECRET_USABLE}=true")
    return None
